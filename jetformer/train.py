"""Training Jet: config in, checkpoints and metrics in the workdir out.

Reads in data-flow order: mesh, model, optimizer, input, sharded init,
restore, then the loop (step, log, evaluate, save) and a final save.
The train state is a dict of pure arrays (params as `nnx.State.to_pure_dict`)
rather than an `nnx.Optimizer`, so that it can be passed through one `jax.jit`
with explicit shardings and saved by orbax as it is.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from flax import nnx

import input_pipeline
from jetformer import checkpoint, objectives, optim, sharding
from jetformer.models import jet as jet_lib


def jet_config(config):
  size = config.dataset.image_size
  return jet_lib.JetConfig(image_shape=(size, size, 3), **config.model)


def abstract_model(cfg):
  """(graphdef, abstract params, abstract frozen) with their logical axes."""
  model = nnx.eval_shape(lambda: jet_lib.Jet(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, frozen = nnx.split(model, nnx.Param, jet_lib.Frozen)
  return graphdef, params, frozen


def init_state(cfg, tx, ema, seed):
  """The train state: step, params, frozen permutations, optimizer state, [EMA]."""
  _, params, frozen = nnx.split(jet_lib.Jet(cfg, rngs=nnx.Rngs(seed)), nnx.Param, jet_lib.Frozen)
  params = params.to_pure_dict()
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "frozen": frozen.to_pure_dict(), "opt": tx.init(params)}
  if ema:
    state["ema"] = params
  return state


def state_shardings(tx, abstract_state, params, frozen, rules, mesh):
  """Params (and their EMA) by the rules; the optimizer state as XLA propagates it."""
  p_sh = sharding.state_shardings(params, rules, mesh).to_pure_dict()
  f_sh = sharding.state_shardings(frozen, rules, mesh).to_pure_dict()
  repl = sharding.replicated(mesh)
  abstract_params = checkpoint.abstract(abstract_state["params"], p_sh)
  opt_sh = jax.jit(tx.init).lower(abstract_params).compile().output_shardings
  out = {"step": repl, "params": p_sh, "frozen": f_sh, "opt": opt_sh}
  if "ema" in abstract_state:
    out["ema"] = p_sh
  return out


def train_step(state, batch, key, *, graphdef, tx, ema_decay, label_drop_prob):
  def loss_fn(params):
    jet = nnx.merge(graphdef, params, state["frozen"])
    return objectives.jet_loss(jet, batch, key, label_drop_prob)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new = dict(state, step=state["step"] + 1, params=params, opt=opt)
  if "ema" in state:
    new["ema"] = optax.incremental_update(params, state["ema"], 1 - ema_decay)
  metrics["grad_norm"] = optax.global_norm(grads)
  return new, metrics


def eval_step(params, frozen, batch, key, *, graphdef):
  """Sums of per-example bpd terms over the real (unpadded) examples."""
  jet = nnx.merge(graphdef, params, frozen)
  terms = objectives.jet_bpd(jet, batch, key)
  out = {k: jnp.sum(v * batch["mask"]) for k, v in terms.items()}
  out["count"] = jnp.sum(batch["mask"])
  return out


def evaluate(eval_fn, params, frozen, data, mesh, seed):
  """Validation bits/dim (mean over examples), fresh noise per batch."""
  totals = None
  for i, local in enumerate(data):
    batch = sharding.global_batch(local, mesh)
    sums = eval_fn(params, frozen, batch, jax.random.fold_in(jax.random.key(seed), i))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {k: float(v / totals["count"]) for k, v in totals.items() if k != "count"}


def num_train_steps(config):
  if config.get("total_steps"):
    return config.total_steps
  n = input_pipeline.num_examples(config.dataset.name, config.dataset.train_split,
                                  config.dataset.data_dir)
  return int(config.num_epochs * n // config.batch_size)


def check_finite(metrics, step):
  if not np.isfinite(metrics["bpd"]):
    raise FloatingPointError(
        f"Loss is {metrics['bpd']} at step {step}. The last good checkpoint is kept; "
        "lower optim.lr, raise optim.warmup_frac or check the input data, then rerun.")


def make_eval_data(config, mesh):
  del mesh
  ds = config.dataset
  return lambda: input_pipeline.make_eval_iterator(
      name=ds.name, split=ds.eval_split, image_size=ds.image_size,
      global_batch_size=config.eval_batch_size, data_dir=ds.data_dir)


def train_and_evaluate(config, workdir):
  """Trains (or resumes) the study `config` in `workdir`; returns final eval metrics."""
  mesh = sharding.make_mesh(config.mesh)
  cfg = jet_config(config)
  total = num_train_steps(config)
  tx = optim.make(total_steps=total, **config.optim)
  graphdef, params, frozen = abstract_model(cfg)
  init = functools.partial(init_state, cfg, tx, config.ema_decay > 0, config.seed)
  abstract_state = jax.eval_shape(init)
  shardings = state_shardings(tx, abstract_state, params, frozen, config.sharding_rules, mesh)

  ds = config.dataset
  train_iter = input_pipeline.make_train_iterator(
      name=ds.name, split=ds.train_split, image_size=ds.image_size,
      global_batch_size=config.batch_size, seed=config.seed, data_dir=ds.data_dir,
      flip=ds.flip, worker_count=ds.worker_count)
  eval_data = make_eval_data(config, mesh)

  mgr = checkpoint.manager(workdir, save_every=config.ckpt_every, keep=config.keep_ckpts)
  step, state = checkpoint.restore(
      mgr, checkpoint.abstract(abstract_state, shardings), train_iter)
  if state is None:
    state = jax.jit(init, out_shardings=shardings)()
  logging.info("Jet: %d parameters, starting at step %d of %d.",
               sum(x.size for x in jax.tree.leaves(params)), step, total)

  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, ema_decay=config.ema_decay,
                        label_drop_prob=config.label_drop_prob),
      in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                    in_shardings=(shardings["params"], shardings["frozen"], batch_sh, repl),
                    out_shardings=repl)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
  key = jax.random.key(config.seed)
  pending, history = None, []

  def run_eval(at):
    results = {f"val_{k}": v for k, v in evaluate(
        eval_fn, state["params"], state["frozen"], eval_data(), mesh, config.seed).items()}
    if "ema" in state:
      results.update({f"val_ema_{k}": v for k, v in evaluate(
          eval_fn, state["ema"], state["frozen"], eval_data(), mesh, config.seed).items()})
    writer.write_scalars(at, results)
    return results

  try:
    while step < total:
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
      step += 1
      if pending is not None:  # read step t-1's metrics once step t is dispatched
        history.append(jax.device_get(pending))
      pending = metrics
      report(step)
      if step % config.log_every == 0 or step == total:
        history.append(jax.device_get(pending))
        pending = None
        means = {f"train_{k}": float(np.mean([h[k] for h in history])) for k in history[0]}
        check_finite({"bpd": means["train_bpd"]}, step)
        writer.write_scalars(step, means)
        history = []
      if step % config.eval_every == 0 and step < total:
        run_eval(step)
      if step % config.ckpt_every == 0 or mgr.reached_preemption(step):
        check_finite(jax.device_get(metrics), step)
        checkpoint.save(mgr, step, state, train_iter, force=True)
    results = run_eval(step)
    if mgr.latest_step() != step:
      checkpoint.save(mgr, step, state, train_iter, force=True)
    if config.compare_png:
      images = input_pipeline.raw_images(ds.name, ds.eval_split, ds.data_dir,
                                         image_size=ds.image_size)
      results["val_png_bpd"] = input_pipeline.png_bits_per_dim(images)
  finally:
    mgr.wait_until_finished()
    writer.flush()
  return results
