"""The flags that join the processes of a multi-host run, shared by main.py and evaluate.py.

On TPU pods and under SLURM, `--distributed` alone suffices (JAX finds the
cluster); elsewhere, e.g. several CPU processes on one machine, give the
coordinator, the number of processes and each one's id.
"""

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0; unset on TPU pods and SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")


def initialize():
  """jax.distributed.initialize() as the flags say; nothing without --distributed."""
  if not _DISTRIBUTED.value:
    return
  # Only the CPU client reads this (multi-process CPU runs, e.g. the tests).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
