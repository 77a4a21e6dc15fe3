"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import sys

import pytest


def xla_flags(devices):
  """XLA_FLAGS for `devices` fake CPU devices, here and in the tests' subprocesses.

  The devices' threads share 2 cores: one can reach a collective minutes after
  the first, past XLA:CPU's default rendezvous timeout (which aborts the
  process), so the timeouts are raised.
  """
  return (f"--xla_force_host_platform_device_count={devices}"
          " --xla_cpu_collective_timeout_seconds=1200"
          " --xla_cpu_collective_call_terminate_timeout_seconds=1200")


os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)
# Each collective blocks a thread of XLA:CPU's intra-op pool until all devices
# join it, and XLA:CPU orders a device's collectives only by when they start,
# so one device can have several in flight. The pool has max(cores, devices)
# threads: with 8 devices it can fill with half-joined collectives and hang
# (seen in CI: 4 devices waiting in an all-reduce, 4 in an all-gather, all 8
# threads taken). XLA sizes the pool from PJRT_NPROC where set: 16 threads, two
# per device (32 made the suite 6 minutes slower on 2 cores).
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
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
