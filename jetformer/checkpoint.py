"""Orbax checkpoints: asynchronous, sharded, holding the train state and the input position.

The only module that imports orbax. The state is restored onto whatever
shardings the caller's abstract state carries, so a checkpoint written on
one mesh restores onto another.
"""

import json

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class MismatchError(ValueError):
  """A checkpoint whose arrays do not fit the model the config builds."""


class UnwritableError(OSError):
  """A workdir this process cannot write to."""


def check_writable(workdir):
  """Fails now, before any compile, if checkpoints could not be written to `workdir`."""
  probe = epath.Path(workdir) / f".write_test_{jax.process_index()}"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UnwritableError(f"cannot write to --workdir={workdir} ({type(e).__name__}: "
                          f"{e.strerror or e}); give a directory this user can create and "
                          "write (a local path or gs://bucket/dir).") from e


def manager(workdir, *, save_every, keep, async_save=True, create=True):
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      enable_async_checkpointing=async_save, create=create)
  return ocp.CheckpointManager(f"{workdir}/checkpoints", options=options)


def reader(workdir):
  """A manager that only reads `workdir`'s checkpoints (evaluation, init_from)."""
  return manager(workdir, save_every=1, keep=None, async_save=False, create=False)


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
    check_matches(mgr, step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
  position = None if data_iter is None else _input_position(mgr, step)
  if position is not None and position.name == _position_file():
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mgr.restore(step, args=ocp.args.Composite(**items))
  if position is not None and "data" not in items:
    data_iter.set_state(json.loads(position.read_text()))
  return step, restored["state"]


def _position_file():
  """grain's name for this process's input position in a checkpoint."""
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _input_position(mgr, step):
  """This process's saved input position, or process 0's if another host count wrote it.

  Every host's position is the number of global batches it consumed (the
  pipeline gives each host a slice of every global batch), so a run resumed on
  another number of hosts, with the same global batch, continues the stream.
  """
  folder = epath.Path(mgr.directory) / str(step) / "data"
  own = folder / _position_file()
  if own.exists():
    return own
  return next(iter(sorted(folder.glob("process_0-of-*.json"))), None)


def check_matches(mgr, step, abstract_state, *, what=None, partial=False, saved=None):
  """Raises MismatchError naming the first arrays whose shapes differ from the saved ones.

  Batch size, mesh and device count do not enter a saved array's shape, so they
  may change between runs; a model or optimizer setting that does is caught
  here with names, before orbax's per-array error. With `partial`, arrays
  saved but not asked for are fine. `saved`: saved_shapes(mgr, step) if read already.
  """
  saved = saved_shapes(mgr, step) if saved is None else saved
  wanted = _shapes(abstract_state)
  params_first = lambda keys: sorted(keys, key=lambda k: not k.startswith("params/"))
  problems = [f"{k} is {saved[k]} there, {wanted[k]} here" for k in params_first(wanted)
              if k in saved and saved[k] != wanted[k]]
  problems += [f"{k} is not there" for k in params_first(wanted) if k not in saved]
  if not partial:
    problems += [f"{k} is there, not here" for k in params_first(saved) if k not in wanted]
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    if what is not None:
      advice = "Give init_from a checkpoint of a model with these shapes."
    elif not any(p.startswith("params/") for p in problems):
      advice = ("The model matches; the optimizer state does not (another optim setting, or "
                "an older jetformer): start a fresh --workdir with --config.init_from=this "
                "workdir to keep the weights.")
    else:
      advice = ("Train in a fresh --workdir, start one from these weights with "
                "--config.init_from, or rerun with the config this workdir was trained with.")
    raise MismatchError(
        f"{what or 'the checkpoint'} (step {step} in {mgr.directory}) does not match this "
        f"config: {'; '.join(problems[:3])}{more}. {advice}")


def saved_shapes(mgr, step):
  """{"params/dnn/kernel": shape} of the train state saved at `step`."""
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(mgr.directory) / str(step) / "state")
  return _shapes(meta.tree)


def _shapes(tree):
  """{"params/dnn/kernel": shape} of a state, or of its saved metadata (dicts for tuples)."""
  def name(key):
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
  return {"/".join(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
