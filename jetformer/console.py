"""What the entry points print: libraries' routine logs dropped, a header per run."""

import logging

import jax

# Paths of modules whose INFO lines repeat on every run and say nothing a user
# acts on (orbax: every checkpoint step; TFDS: "Load dataset info" per split
# read; JAX: the backends it tried and did not find).
_ROUTINE = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge.py")
# TFDS warnings that are advice, not faults: PIL decodes our small images fast
# enough, and a dataset folder without metadata is what first use looks like.
_ADVICE = ("OpenCV is not installed", "has no dataset_info.json")


class QuietLibraries(logging.Filter):
  """Keeps our INFO lines and every library's warnings, minus the routine ones."""

  def filter(self, record):
    if record.levelno < logging.WARNING:
      return not any(p in record.pathname for p in _ROUTINE)
    return not any(a in record.getMessage() for a in _ADVICE)


def header(config, model: str, num_params: int, step: int, total: int, mesh, workdir) -> str:
  """Names what is trained, on what, and where its checkpoints and logs go."""
  axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  devices = jax.devices()
  warm = f" from the weights in {config.init_from}" if config.init_from and step == 0 else ""
  return (f"Training {model} ({num_params:,} parameters) on {config.dataset.name}, "
          f"batch {config.batch_size}, starting at step {step} of {total}{warm}; mesh {axes} over "
          f"{len(devices)} {devices[0].platform.upper()} device(s) on "
          f"{jax.process_count()} host(s).\n"
          f"Workdir {workdir}: checkpoints every {config.ckpt_every} steps; "
          f"TensorBoard: tensorboard --logdir={workdir}")
