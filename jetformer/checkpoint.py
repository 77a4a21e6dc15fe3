"""Orbax checkpoints: asynchronous, sharded, holding the train state and the input position.

The only module that imports orbax. The state is restored onto whatever
shardings the caller's abstract state carries, so a checkpoint written on
one mesh restores onto another.
"""

import grain
import orbax.checkpoint as ocp


def manager(workdir, *, save_every, keep, async_save=True, create=True):
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      enable_async_checkpointing=async_save, create=create)
  return ocp.CheckpointManager(f"{workdir}/checkpoints", options=options)


def save(mgr, step, state, data_iter=None, *, force=False):
  """Saves at `step` when the manager's interval or `force` says so."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mgr, abstract_state, data_iter=None, step=None, partial=False):
  """(step, state) from the latest (or given) checkpoint, or (0, None) if none.

  `abstract_state` holds jax.ShapeDtypeStructs with the target shardings;
  with `partial`, it may name only some entries of the saved state (e.g. the
  params without the optimizer state) and only those are read.
  `data_iter`, if given, is moved to the saved input position in place.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    return 0, None
  if partial:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args,
                                             partial_restore=True)}
  else:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mgr.restore(step, args=ocp.args.Composite(**items))
  return step, restored["state"]
