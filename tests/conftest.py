"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import sys

import pytest

# The 8 devices' threads share 2 cores: a device can reach a collective
# minutes after the first, past XLA:CPU's default rendezvous timeout (it aborts
# the process), so the timeouts are raised.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_timeout_seconds=1200"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1200")
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
