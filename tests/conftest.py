"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import sys

import pytest


def device_env(devices):
  """Environment for `devices` fake CPU devices, here and in the tests' subprocesses.

  Each collective blocks a thread of XLA:CPU's intra-op pool until all devices
  join it, and XLA:CPU orders a device's collectives only by when they start,
  so one device can have several in flight. The pool has max(cores, devices)
  threads: with 8 devices it filled with half-joined collectives and hung (seen
  in CI: 4 devices waiting in an all-reduce, 4 in an all-gather, every thread
  taken). XLA sizes the pool from PJRT_NPROC: two threads per device. The
  rendezvous timeouts give a device's thread time to reach a collective on 2
  busy cores, and turn a hang into a failure after 5 minutes.
  """
  return {
      "XLA_FLAGS": (f"--xla_force_host_platform_device_count={devices}"
                    " --xla_cpu_collective_timeout_seconds=300"
                    " --xla_cpu_collective_call_terminate_timeout_seconds=300"),
      "PJRT_NPROC": str(2 * devices),
  }


def subprocess_env(devices):
  """os.environ with `devices` fake devices, for a test's subprocess."""
  return dict(os.environ, **device_env(devices))


_IN_PROCESS = device_env(8)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + _IN_PROCESS["XLA_FLAGS"]
os.environ.setdefault("PJRT_NPROC", _IN_PROCESS["PJRT_NPROC"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu is installed for aot.py's compiles (requirements-aot.txt): no worker starts a TPU
# runtime, and the workers share libtpu's lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Writer:
  """The two methods train_and_evaluate uses of a clu metric writer; keeps the scalars."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)

  def flush(self):
    pass


@pytest.fixture
def writer():
  return Writer()
