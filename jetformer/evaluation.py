"""Evaluating a checkpoint: restore the train state onto this run's mesh, run named tasks.

A task takes (config, restored checkpoint, input module) and returns metrics;
`bpd` is validation bits/dim with fresh dequantization noise, of the params
and of their EMA when the study keeps one, named as training logs them. The
entry point (evaluate.py) passes in the input module, so that this package
never imports TensorFlow.
"""

import dataclasses
from typing import Any

import jax

from jetformer import checkpoint, sharding, steps, train


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint on this run's mesh; nnx.merge(graphdef, params, frozen) is the model."""
  step: int
  state: dict                    # params, frozen[, ema]: no optimizer state
  graphdef: Any
  shardings: dict                # same tree as `state`
  mesh: jax.sharding.Mesh


def restore(config, workdir, step=None, data=None):
  """The model weights at `step` (default: the latest) in `workdir`, sharded as `config` says.

  The mesh and the sharding rules come from `config`, not from the training
  run, so a checkpoint written on any mesh restores onto the devices present;
  the optimizer state is not read. `data` (the input module) resolves a text
  study's tokenizer.
  """
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, frozen = steps.abstract_model(train.model_config(config, data))
  ema = config.ema_decay > 0
  shardings = steps.weight_shardings(params, frozen, config.sharding_rules, mesh, ema=ema)
  abstract = {"params": params.to_pure_dict(), "frozen": frozen.to_pure_dict()}
  if ema:
    abstract["ema"] = abstract["params"]
  mgr = checkpoint.manager(workdir, save_every=1, keep=None, async_save=False, create=False)
  step, state = checkpoint.restore(mgr, checkpoint.abstract(abstract, shardings), step=step,
                                   partial=True)
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
  return Restored(step, state, graphdef, shardings, mesh)


def bpd(config, restored, data):
  """val_* bits/dim of the params, val_ema_* of their EMA (as training reports them)."""
  r = restored
  eval_fn = train.compile_eval_step(config, r.graphdef, r.shardings, r.mesh)
  return train.evaluate_state(eval_fn, r.state, train.make_eval_data(config, data), r.mesh,
                              config.seed)


TASKS = {"bpd": bpd}


def evaluate_checkpoint(config, workdir, *, data, step=None, tasks=("bpd",)):
  """{"step": checkpoint step, metric: value, ...} of the checkpoint's model.

  Args:
    config: the study config the checkpoint was trained with (after `finalize`).
    data: the input module (`input_pipeline`).
    step: the checkpoint to read; the latest by default.
    tasks: names from TASKS, run in this order.
  """
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"Unknown evaluation tasks {unknown}; known: {sorted(TASKS)}.")
  restored = restore(config, workdir, step, data)
  results = {"step": restored.step}
  for name in tasks:
    results.update(TASKS[name](config, restored, data))
  return results
