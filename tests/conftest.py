"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import pathlib
import socket
import subprocess
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


ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "testdata"   # the big_vision Jet reference (its README)


def main_command(workdir, data_dir, *flags):
  """main.py on the digits Jet study's runlocal shrink."""
  return [sys.executable, str(ROOT / "main.py"), "--config=configs/digits_jet.py",
          f"--workdir={workdir}", "--config.runlocal=True",
          f"--config.dataset.data_dir={data_dir}", *flags]


def run_main(workdir, data_dir, *flags, devices=2):
  """Runs main_command on `devices` devices to the end; its log."""
  out = subprocess.run(main_command(workdir, data_dir, *flags), cwd=ROOT,
                       env=subprocess_env(devices),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout + out.stderr


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(command, *, devices=1, num_processes=2):
  """`command` (an argv of main.py or evaluate.py) as `num_processes` processes of
  `devices` CPU devices each, joined by jax.distributed (gloo); output on stdout."""
  port = free_port()
  return [subprocess.Popen(
      [*command, "--distributed", f"--coordinator_address=localhost:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}"], cwd=ROOT,
      env=subprocess_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]


def finish_processes(procs, log0=""):
  """The processes' logs once all exit 0 (`log0`: what was read of process 0's already)."""
  logs = [log0 + procs[0].communicate(timeout=600)[0]]
  logs += [p.communicate(timeout=600)[0] for p in procs[1:]]
  assert [p.returncode for p in procs] == [0] * len(procs), "".join(l[-2000:] for l in logs)
  return logs


def train_state(path):
  """A saved train state, read onto one device whatever topology wrote it."""
  import jax  # noqa: PLC0415 (after the device flags above)
  import orbax.checkpoint as ocp  # noqa: PLC0415
  checkpointer = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        checkpointer.metadata(path / "state").item_metadata.tree)
  return jax.device_get(checkpointer.restore(path / "state", target))


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
