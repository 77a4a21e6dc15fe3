"""The train state and the jitted step functions (no input pipeline, no config).

The train state is a dict of pure arrays (params as `nnx.State.to_pure_dict`)
rather than an `nnx.Optimizer`, so that it passes through one `jax.jit` with
explicit shardings and orbax saves it as it is.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jetformer import objectives, sharding
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
  """Weights by the rules (weight_shardings); the optimizer state as XLA propagates it."""
  out = weight_shardings(params, frozen, rules, mesh, ema="ema" in abstract_state)
  repl = sharding.replicated(mesh)
  abstract_params = sharding.abstract(abstract_state["params"], out["params"])
  opt_sh = jax.jit(tx.init).lower(abstract_params).compile().output_shardings
  # Leaves that do not derive from a param (step counts) come back on one device.
  opt_sh = jax.tree.map(lambda s: repl if s.is_fully_replicated else s, opt_sh)
  return {"step": repl, "opt": opt_sh, **out}


def train_step(state, batch, key, *, graphdef, tx, ema_decay, objective, total_steps=1):
  def loss_fn(params):
    model = nnx.merge(graphdef, params, state["frozen"])
    progress = state["step"].astype(jnp.float32) / total_steps
    return objectives.loss(model, batch, key, objective, progress)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new = dict(state, step=state["step"] + 1, params=params, opt=opt)
  if "ema" in state:
    new["ema"] = optax.incremental_update(params, state["ema"], 1 - ema_decay)
  metrics["grad_norm"] = optax.global_norm(grads)
  return new, metrics


def eval_step(params, frozen, batch, key, *, graphdef, objective):
  """{metric: (sum, count)} over the real (unpadded) examples of the batch."""
  return objectives.eval_sums(nnx.merge(graphdef, params, frozen), batch, key, objective)
