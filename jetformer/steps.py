"""The train state and the jitted step functions (no input pipeline, no config).

The train state is a dict of pure arrays (params as `nnx.State.to_pure_dict`)
rather than an `nnx.Optimizer`, so that it passes through one `jax.jit` with
explicit shardings and orbax saves it as it is.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jetformer import objectives, optim, sharding
from jetformer.models import jet as jet_lib
from jetformer.models import jetformer as jetformer_lib


def build(cfg, rngs):
  """The model a config describes: a Jet or a JetFormer."""
  if isinstance(cfg, jet_lib.JetConfig):
    return jet_lib.Jet(cfg, rngs=rngs)
  return jetformer_lib.JetFormer(cfg, rngs=rngs)


def abstract_model(cfg):
  """(graphdef, abstract params, abstract frozen) with their logical axes."""
  model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
  graphdef, params, frozen = nnx.split(model, nnx.Param, jet_lib.Frozen)
  return graphdef, params, frozen


def init_state(cfg, tx, ema, seed):
  """The train state: step, params, frozen permutations, optimizer state, [EMA]."""
  _, params, frozen = nnx.split(build(cfg, nnx.Rngs(seed)), nnx.Param, jet_lib.Frozen)
  params = params.to_pure_dict()
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "frozen": frozen.to_pure_dict(), "opt": tx.init(params)}
  if ema:
    state["ema"] = params
  return state


def weight_shardings(params, frozen, rules, mesh, ema=False):
  """{"params", "frozen"[, "ema"]: pure-dict shardings} of the model's weights, by the rules."""
  out = {"params": sharding.state_shardings(params, rules, mesh).to_pure_dict(),
         "frozen": sharding.state_shardings(frozen, rules, mesh).to_pure_dict()}
  if ema:
    out["ema"] = out["params"]
  return out


def state_shardings(tx, abstract_state, params, frozen, rules, mesh):
  """Weights by the rules (weight_shardings); the optimizer state like the params it tracks."""
  del tx  # the state's own tree says which leaves track a param (like_params)
  out = weight_shardings(params, frozen, rules, mesh, ema="ema" in abstract_state)
  repl = sharding.replicated(mesh)
  opt_sh = like_params(abstract_state["opt"], abstract_state["params"], out["params"], repl)
  return {"step": repl, "opt": opt_sh, **out}


def like_params(opt_state, params, param_shardings, default):
  """Shardings for opt_state: a leaf whose path ends in a param's path, with its shape, as it.

  Adam's moments sit in optax's state as trees like the params
  (`[1].mu['couplings']...`, under multi_transform's masks too). XLA's
  propagation through `jit(tx.init)` cannot place them, since zeros_like
  reads only a shape: it replicated them on every device. Step counts and
  other leaves get `default`.
  """
  shapes = {path: x.shape for path, x in jax.tree_util.tree_leaves_with_path(params)}
  placed = dict(jax.tree_util.tree_leaves_with_path(param_shardings))

  def one(path, leaf):
    for i in range(len(path)):  # the longest matching suffix first
      if shapes.get(path[i:]) == leaf.shape:
        return placed[path[i:]]
    return default
  return jax.tree_util.tree_map_with_path(one, opt_state)


def train_step(state, batch, key, *, graphdef, tx, ema_decay, objective, total_steps=1):
  def loss_fn(params):
    model = nnx.merge(graphdef, params, state["frozen"])
    progress = state["step"].astype(jnp.float32) / total_steps
    return objectives.loss(model, batch, key, objective, progress)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  # A non-finite loss with finite gradients is as bad: make the gradients say so, and the
  # optimizer (optim.make's apply_if_finite) leaves params and its own state unchanged.
  grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new = dict(state, step=state["step"] + 1, params=params, opt=opt)
  if "ema" in state:
    ema = optax.incremental_update(params, state["ema"], 1 - ema_decay)
    new["ema"] = jax.tree.map(lambda e, old: jnp.where(opt.last_finite, e, old), ema,
                              state["ema"])
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics.update(optim.skip_counts(opt), skipped=~opt.last_finite)
  return new, metrics


def init_actnorm(state, batch, key, *, graphdef, objective):
  """The fresh state with its ActNorms set from `batch` (objectives.init_actnorm), the
  EMA too; the optimizer state is untouched (its moments are zeros of the same shapes)."""
  model = nnx.merge(graphdef, state["params"], state["frozen"])
  objectives.init_actnorm(model, batch, key, objective)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  return dict(state, params=params, **({"ema": params} if "ema" in state else {}))


def eval_step(params, frozen, batch, key, *, graphdef, objective):
  """{metric: (sum, count)} over the real (unpadded) examples of the batch."""
  return objectives.eval_sums(nnx.merge(graphdef, params, frozen), batch, key, objective)
