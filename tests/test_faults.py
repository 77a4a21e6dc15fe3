"""Faults: a signal saves the step reached and the same command resumes there exactly."""

import os
import re
import signal
import subprocess

import jax
import numpy as np
import pytest

from conftest import ROOT, main_command, run_main, subprocess_env, train_state

STEPS = 200
FLAGS = (f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.eval_every=1000",
         "--config.ckpt_every=1000", "--config.model.dtype=float32")


def start(workdir, data_dir, *flags, devices=2):
  return subprocess.Popen(main_command(workdir, data_dir, *FLAGS, *flags), cwd=ROOT,
                          env=subprocess_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def read_until_step(proc, step):
  """proc's log up to the line of train metrics at `step` (clu's "[step] train_...")."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if f"] [{step}] train_" in line:
      return "".join(lines)
  raise AssertionError("".join(lines[-50:]))


def saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def preempted_step(log):
  match = re.search(r"Preempted: checkpoint saved at step (\d+)", log)
  assert match, log[-3000:]
  return int(match[1])


def assert_same_final_state(a, b):
  final = (train_state(d / "checkpoints" / str(STEPS)) for d in (a, b))
  jax.tree.map(np.testing.assert_array_equal, *final)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """(workdir, data_dir) of a single-process run to the end."""
  root = tmp_path_factory.mktemp("uninterrupted")
  run_main(root / "work", root / "data", *FLAGS)
  return root / "work", root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_reached_and_resumes_exactly(tmp_path, uninterrupted, signum):
  full, data = uninterrupted
  cut = tmp_path / "cut"
  proc = start(cut, data)
  log = read_until_step(proc, 20)
  proc.send_signal(signum)
  log += proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-3000:]
  step = preempted_step(log)
  assert 20 <= step < STEPS and saved_steps(cut) == [step]
  assert f"starting at step {step} of {STEPS}" in run_main(cut, data, *FLAGS)
  assert_same_final_state(full, cut)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_both_at_one_step(tmp_path, uninterrupted):
  """JAX's preemption sync: the signalled process tells the other; both save, both resume."""
  data, port = uninterrupted[1], 20000 + os.getpid() % 20000

  def two(workdir, port):
    return [start(workdir, data, "--config.mesh=(('data',2),('fsdp',1))", "--distributed",
                  f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", devices=1) for i in range(2)]

  def finish(procs, log0=""):
    logs = [log0 + procs[0].communicate(timeout=600)[0], procs[1].communicate(timeout=600)[0]]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    return logs

  finish(two(tmp_path / "full", port))
  procs = two(tmp_path / "cut", port + 1)
  log0 = read_until_step(procs[0], 20)
  procs[1].send_signal(signal.SIGTERM)
  steps = {preempted_step(log) for log in finish(procs, log0)}
  assert len(steps) == 1 and saved_steps(tmp_path / "cut") == list(steps)
  finish(two(tmp_path / "cut", port + 2))
  assert_same_final_state(tmp_path / "full", tmp_path / "cut")
