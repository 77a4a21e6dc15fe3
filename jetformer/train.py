"""Training Jet: config in, checkpoints and metrics in the workdir out.

Reads in data-flow order: mesh, model, optimizer, input, sharded init,
restore, then the loop (step, log, evaluate, save) and a final save.
The entry point passes in what would import TensorFlow (the input module
`input_pipeline`, and clu's metric writer and progress report), so that this
package never does.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jetformer import (checkpoint, console, generation, objectives, optim, preemption, sharding,
                       steps, warm_start)
from jetformer.models import gemma
from jetformer.models import jet as jet_lib
from jetformer.models import jetformer as jetformer_lib


class ConfigError(ValueError):
  """A config that cannot train as asked; the message says what to change."""


def is_jetformer(config):
  return config.get("task", "jet") == "jetformer"


def jet_config(config):
  size = config.dataset.image_size
  return jet_lib.JetConfig(image_shape=(size, size, 3), **config.model)


def jetformer_config(config, data):
  """JetFormerConfig; a text study's vocabulary size comes from its tokenizer."""
  m = config.model.to_dict()
  size, p = config.dataset.image_size, m["patch_size"]  # JetFormerConfig checks size % p
  jet = jet_lib.JetConfig(image_shape=(size // p, size // p, p * p * 3), ps=1, **m.pop("jet"))
  if config.text.tokenizer:
    m["vocab_size"] = data.load_tokenizer(tokenizer_path(config, data)).vocab_size
  return jetformer_lib.JetFormerConfig(image_shape=(size, size, 3), jet=jet,
                                       decoder=gemma.DecoderConfig(**m.pop("decoder")), **m)


def model_config(config, data=None):
  return jetformer_config(config, data) if is_jetformer(config) else jet_config(config)


def objective(config):
  if is_jetformer(config):
    return objectives.JetFormerObjective(**config.objective)
  return objectives.JetObjective(label_drop_prob=config.label_drop_prob)


def tokenizer_path(config, data):
  return data.resolve_tokenizer(config.text.tokenizer, config.dataset.name,
                                config.dataset.data_dir)


def text_options(config, data):
  """The input pipeline's `text` argument: None for class-conditional studies."""
  if not is_jetformer(config) or not config.text.tokenizer:
    return None
  return {"tokenizer": tokenizer_path(config, data), "max_len": config.text.max_len}


def evaluate(eval_fn, params, frozen, data, mesh, seed):
  """Validation metrics (each a mean over its examples or tokens), fresh noise per batch."""
  totals = None
  for i, local in enumerate(data):
    batch = sharding.global_batch(local, mesh)
    sums = eval_fn(params, frozen, batch, jax.random.fold_in(jax.random.key(seed), i))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {k: float(s / max(n, 1)) for k, (s, n) in totals.items()}


def num_train_steps(config, data):
  if config.get("total_steps"):
    return config.total_steps
  ds = config.dataset
  n = data.num_examples(ds.name, ds.train_split, ds.data_dir)
  return int(config.num_epochs * n // config.batch_size)


def make_train_data(config, data, worker_count=None):
  ds = config.dataset
  return data.make_train_iterator(
      name=ds.name, split=ds.train_split, image_size=ds.image_size,
      global_batch_size=config.batch_size, seed=config.seed, data_dir=ds.data_dir,
      flip=ds.flip, worker_count=ds.worker_count if worker_count is None else worker_count,
      **_text_kwargs(config, data))


_COUNTERS = ("skipped", "skipped_steps", "nonfinite_in_a_row")  # train_step's skip counts


def log_history(writer, step, history, max_in_a_row, last_checkpoint):
  """Writes the train metrics of the steps since the last log; returns a new history.

  Each metric is the mean over the steps that were not skipped (their loss is
  the non-finite value that made them skipped), `skipped_steps` the total so far.
  """
  history = jax.device_get(history)
  kept = [h for h in history if not h["skipped"]]
  scalars = {f"train_{k}": float(np.mean([h[k] for h in kept]))
             for k in history[0] if k not in _COUNTERS and kept}
  scalars["train_skipped_steps"] = int(history[-1]["skipped_steps"])
  writer.write_scalars(step, scalars)
  in_a_row = max(int(h["nonfinite_in_a_row"]) for h in history)
  if in_a_row >= max_in_a_row:
    where = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
             else "no checkpoint was written")
    raise FloatingPointError(
        f"{in_a_row} steps in a row had a non-finite loss or gradient (skipped, up to step "
        f"{step}); {where}. Lower optim.lr, raise optim.warmup_frac or check the input "
        "data, then rerun; max_nonfinite_in_a_row sets the limit.")
  return []


def make_eval_data(config, data, *, split=None, text=True, **hosts):
  """A callable giving one pass over the eval split (or `split`); `text=False` leaves out
  the captions; `hosts` (process_index, process_count) override JAX's host slicing."""
  ds = config.dataset
  text = _text_kwargs(config, data) if text else {}  # resolve the tokenizer once
  return lambda: data.make_eval_iterator(
      name=ds.name, split=split or ds.eval_split, image_size=ds.image_size,
      global_batch_size=config.eval_batch_size, data_dir=ds.data_dir, **text, **hosts)


def _text_kwargs(config, data):
  text = text_options(config, data)
  return {} if text is None else {"text": text}


def make_optimizer(config, total_steps):
  frozen = ("jet",) if is_jetformer(config) and config.objective.frozen_flow else ()
  return optim.make(total_steps=total_steps, frozen=frozen, **config.optim)


def compile_train_step(config, graphdef, tx, shardings, mesh, total_steps):
  """The jitted train step, donating the state, explicitly sharded."""
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return sharding.on_mesh(jax.jit(
      functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=config.ema_decay,
                        objective=objective(config), total_steps=total_steps),
      in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
      donate_argnums=0), mesh)


def flow_config(cfg):
  """The JetConfig of a model config: the Jet's own, or a JetFormer's adaptor's."""
  return cfg if isinstance(cfg, jet_lib.JetConfig) else cfg.jet


def init_actnorm(config, graphdef, shardings, mesh, data, state):
  """A fresh state with its ActNorms set from the first training batch (Glow's init)."""
  # One batch: no prefetch workers to start for it.
  batch = sharding.global_batch(next(make_train_data(config, data, worker_count=0)), mesh)
  fn = sharding.on_mesh(jax.jit(
      functools.partial(steps.init_actnorm, graphdef=graphdef, objective=objective(config)),
      in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=shardings, donate_argnums=0), mesh)
  return fn(state, batch, jax.random.key(config.seed))


def compile_eval_step(config, graphdef, shardings, mesh):
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return sharding.on_mesh(jax.jit(
      functools.partial(steps.eval_step, graphdef=graphdef, objective=objective(config)),
      in_shardings=(shardings["params"], shardings["frozen"], batch_sh, repl),
      out_shardings=repl), mesh)


def evaluate_state(eval_fn, state, eval_data, mesh, seed):
  """val_* bits/dim of state's params, and val_ema_* of their EMA if it has one."""
  results = {}
  for name in ("params", "ema") if "ema" in state else ("params",):
    prefix = "val_" if name == "params" else "val_ema_"
    metrics = evaluate(eval_fn, state[name], state["frozen"], eval_data(), mesh, seed)
    results.update({prefix + k: v for k, v in metrics.items()})
  return results


def grid_writer(config, cfg, graphdef, shardings, mesh, data, writer):
  """write(step, state): a grid of config.sample's samples to TensorBoard ("samples")."""
  s, tok = config.sample, None
  if is_jetformer(config) and config.text.tokenizer:
    tok = data.load_tokenizer(tokenizer_path(config, data))
  _, inputs = generation.prompt_inputs(cfg, s, tok, config.text.max_len if tok else 0)
  fn = generation.image_sampler(cfg, graphdef, shardings, mesh, generation.image_options(s),
                                s.temperature)

  def write(step, state):
    weights = (state.get("ema", state["params"]), state["frozen"])
    images = generation.sample_grid(fn, weights, inputs, per_prompt=s.per_prompt,
                                    batch_size=s.batch_size, mesh=mesh, seed=s.seed)
    writer.write_images(step, {"samples": generation.grid(images)[None]})
  return write


def train_and_evaluate(config, workdir, *, data, writer, progress):
  """Trains (or resumes) the study `config` in `workdir`; returns final eval metrics.

  Args:
    data: the input module (`input_pipeline`).
    writer: a clu metric writer (`write_scalars(step, dict)`, `flush()`).
    progress: `progress(total_steps)` returns a per-step hook `hook(step)`, e.g.
      `lambda n: clu.periodic_actions.ReportProgress(num_train_steps=n, writer=writer)`.
  """
  checkpoint.check_writable(workdir)
  if is_jetformer(config) and config.objective.frozen_flow and not config.init_from:
    raise ConfigError(
        "objective.frozen_flow freezes the Jet adaptor, which is the identity when "
        "initialised: train a Jet of the adaptor's shapes first and pass its workdir as "
        "--config.init_from (configs/jetformer_imagenet256.py says how).")
  mesh = sharding.make_mesh(config.mesh)
  cfg, total, ds = model_config(config, data), num_train_steps(config, data), config.dataset
  tx = make_optimizer(config, total)
  graphdef, params, frozen = steps.abstract_model(cfg)
  init = functools.partial(steps.init_state, cfg, tx, config.ema_decay > 0, config.seed)
  abstract_state = jax.eval_shape(init)
  shardings = steps.state_shardings(tx, abstract_state, params, frozen,
                                    config.sharding_rules, mesh)
  train_iter, eval_data = make_train_data(config, data), make_eval_data(config, data)

  mgr = checkpoint.manager(workdir, save_every=config.ckpt_every, keep=config.keep_ckpts)
  step, state = checkpoint.restore(mgr, sharding.abstract(abstract_state, shardings), train_iter)
  if state is None:
    state = jax.jit(init, out_shardings=shardings)()
    if config.init_from:
      state = warm_start.load(config.init_from, state, shardings)
    elif flow_config(cfg).actnorm:
      state = init_actnorm(config, graphdef, shardings, mesh, data, state)
      logging.info("ActNorm layers initialised from the first training batch.")
  logging.info(console.header(config, type(cfg).__name__.removesuffix("Config"),
                              sum(x.size for x in jax.tree.leaves(params)), step, total,
                              mesh, workdir))
  train_fn = compile_train_step(config, graphdef, tx, shardings, mesh, total)
  eval_fn = compile_eval_step(config, graphdef, shardings, mesh)
  report = progress(total)
  write_grid = config.sample.every and grid_writer(config, cfg, graphdef, shardings, mesh,
                                                   data, writer)
  key, history = jax.random.key(config.seed), []

  def run_eval(at):
    results = evaluate_state(eval_fn, state, eval_data, mesh, config.seed)
    writer.write_scalars(at, results)
    return results

  watcher = preemption.Watcher(mgr)
  try:
    while step < total:
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = train_fn(state, batch, jax.random.fold_in(key, step))
      step, history = step + 1, history + [metrics]  # read only when logging: no sync per step
      report(step)
      preempted = watcher.reached(step) and step < total
      if step % config.log_every == 0 or step == total or preempted:
        history = log_history(writer, step, history, config.max_nonfinite_in_a_row,
                              mgr.latest_step())
      if preempted:
        checkpoint.save(mgr, step, state, train_iter, force=True)
        break
      if step % config.eval_every == 0 and step < total:
        run_eval(step)
      if write_grid and (step % config.sample.every == 0 or step == total):
        write_grid(step, state)
      # Not while steps are being skipped: the params may be what makes the loss non-finite.
      if step % config.ckpt_every == 0 and not jax.device_get(metrics["nonfinite_in_a_row"]):
        checkpoint.save(mgr, step, state, train_iter, force=True)
    else:
      if mgr.latest_step() != step:  # before the evaluation: a preemption may come during it
        checkpoint.save(mgr, step, state, train_iter, force=True)
      results = run_eval(step)
  finally:
    watcher.close()
    mgr.wait_until_finished()
    writer.flush()
  if step < total:
    raise preemption.Preempted(step)
  if config.compare_png:
    images = data.raw_images(ds.name, ds.eval_split, ds.data_dir, image_size=ds.image_size)
    for codec in ("png", "webp"):
      results[f"val_{codec}_bpd"] = data.codec_bits_per_dim(images, codec)
  return results
