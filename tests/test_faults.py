"""Faults: signals save the step reached and the same command resumes there exactly;
non-finite steps are skipped and counted, and too many in a row stop the run."""

import functools
import json
import re
import shutil
import signal
import subprocess
import types

import jax
import numpy as np
import pytest

import input_pipeline
from configs import common, digits_jet
from conftest import (ROOT, finish_processes, main_command, run_main, start_processes,
                      subprocess_env, train_state)
from jetformer import checkpoint, steps, train

STEPS = 200
FLAGS = (f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.eval_every=1000",
         "--config.ckpt_every=1000", "--config.model.dtype=float32")


def start(workdir, data_dir, *flags, devices=2):
  return subprocess.Popen(main_command(workdir, data_dir, *flags), cwd=ROOT,
                          env=subprocess_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def start_two(workdir, *, data_dir, flags=(), devices=1):
  return start_processes(main_command(workdir, data_dir, *flags), devices=devices)


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
  proc = start(cut, data, *FLAGS)
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
  data = uninterrupted[1]
  two = functools.partial(start_two, data_dir=data,
                          flags=(*FLAGS, "--config.mesh=(('data',2),('fsdp',1))"))
  finish_processes(two(tmp_path / "full"))
  procs = two(tmp_path / "cut")
  log0 = read_until_step(procs[0], 20)
  procs[1].send_signal(signal.SIGTERM)
  steps = {preempted_step(log) for log in finish_processes(procs, log0)}
  assert len(steps) == 1 and saved_steps(tmp_path / "cut") == list(steps)
  finish_processes(two(tmp_path / "cut"))
  assert_same_final_state(tmp_path / "full", tmp_path / "cut")


def test_nonfinite_step_changes_nothing_and_is_counted():
  config = common.finalize(_runlocal(digits_jet.get_config()))
  cfg = train.jet_config(config)
  tx = train.make_optimizer(config, 10)
  graphdef, _, _ = steps.abstract_model(cfg)
  fn = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=0.9,
                                 objective=train.objective(config)))
  rng = np.random.default_rng(0)
  good = {"image": rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32),
          "label": np.zeros(4, np.int32)}
  bad = dict(good, image=np.where(np.arange(16)[:, None] == 3, np.nan, good["image"]))
  state = steps.init_state(cfg, tx, True, 0)
  state, _ = fn(state, good, jax.random.key(0))
  before = jax.device_get(state)
  state, m = fn(state, bad, jax.random.key(1))
  after = jax.device_get(state)
  assert bool(m["skipped"]) and (int(m["skipped_steps"]), int(m["nonfinite_in_a_row"])) == (1, 1)
  for key in ("params", "ema"):
    jax.tree.map(np.testing.assert_array_equal, before[key], after[key])
  jax.tree.map(np.testing.assert_array_equal, before["opt"].inner_state,
               after["opt"].inner_state)  # Adam's moments and step count
  state, m = fn(state, good, jax.random.key(2))
  assert not m["skipped"] and (int(m["skipped_steps"]), int(m["nonfinite_in_a_row"])) == (1, 0)
  assert np.isfinite(jax.device_get(state["params"]["couplings"]["dnn"]["init_proj"]["kernel"])).all()


class _Poisoned:
  """A train iterator whose images are NaN from batch `start` on (checkpointable as grain's)."""

  def __init__(self, it, start):
    self._it, self._start, self._n = it, start, 0

  def __next__(self):
    batch, self._n = next(self._it), self._n + 1
    if self._n > self._start:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch

  def get_state(self):  # bytes: what grain's checkpoint handler takes from a non-grain iterator
    return json.dumps(self._it.get_state()).encode()

  def set_state(self, state):
    self._it.set_state(json.loads(state))


def test_run_stops_after_max_nonfinite_in_a_row(tmp_path, writer):
  config = common.finalize(_runlocal(digits_jet.get_config()))
  with config.unlocked():
    config.update(total_steps=20, log_every=1, ckpt_every=4, eval_every=100,
                  max_nonfinite_in_a_row=3)
    config.dataset.data_dir = str(tmp_path / "data")
  data = types.SimpleNamespace(**vars(input_pipeline))
  data.make_train_iterator = lambda **kw: _Poisoned(input_pipeline.make_train_iterator(**kw), 6)
  with pytest.raises(FloatingPointError, match=r"3 steps in a row .* up to step 9\); the last "
                                               r"checkpoint is step 4"):
    train.train_and_evaluate(config, tmp_path / "work", data=data, writer=writer,
                             progress=lambda n: lambda step: None)
  skipped = {s: v["train_skipped_steps"] for s, v in writer.scalars.items() if s <= 9}
  assert skipped == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 1, 8: 2, 9: 3}
  assert saved_steps(tmp_path / "work") == [4]  # not step 8, two steps into the skipping
  state = train_state(tmp_path / "work" / "checkpoints" / "4")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def _runlocal(config):
  config.runlocal = True
  return config


def test_unwritable_workdir_is_one_line_before_compiling(tmp_path):
  out = subprocess.run(main_command("/proc/jetformer", tmp_path / "data"), cwd=ROOT,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      "main.py: error: cannot write to --workdir=/proc/jetformer (FileNotFoundError")
  assert "Traceback" not in out.stderr and "Jet:" not in out.stderr  # before building a model


def test_checkpoint_of_another_model_is_named_and_batch_changes_are_not(tmp_path, writer):
  def run(**overrides):
    config = common.finalize(_runlocal(digits_jet.get_config()))
    with config.unlocked():
      config.update_from_flattened_dict({"eval_every": 100, **overrides,
                                         "dataset.data_dir": str(tmp_path / "data")})
    return train.train_and_evaluate(config, tmp_path / "work", data=input_pipeline,
                                    writer=writer, progress=lambda n: lambda step: None)

  run(total_steps=2, ckpt_every=2)
  with pytest.raises(checkpoint.MismatchError) as error:
    run(total_steps=4, **{"model.emb_dim": 32})
  message = str(error.value)
  assert message.startswith("the checkpoint (step 2 in ")
  assert re.search(r"config: params/\S+ is \(\d+(, \d+)*\) there, \(\d+(, \d+)*\) here;", message)
  assert "(and " in message  # the rest counted, not listed
  assert "fresh --workdir" in message and "init_from" in message and len(message) < 700
  run(total_steps=4, batch_size=8)  # a new batch size (or mesh) resumes
  assert saved_steps(tmp_path / "work") == [2, 4]


@pytest.mark.slow
def test_kill_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path):
  """kill -9 while step 8's checkpoint is being written: step 4's is restored and resumed."""
  data = tmp_path / "data"
  flags = ("--config.total_steps=12", "--config.ckpt_every=4", "--config.eval_every=100",
           "--config.model.emb_dim=256")  # a 50 MB state: its save takes a while
  run_main(tmp_path / "full", data, *flags)
  cut = tmp_path / "cut"
  proc = subprocess.Popen(main_command(cut, data, *flags), cwd=ROOT, env=subprocess_env(2),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while proc.poll() is None and not any(
      p.name.startswith("8.orbax-checkpoint-tmp") for p in _entries(cut / "checkpoints")):
    pass  # poll as fast as possible: the save is in flight for a fraction of a second
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before step 8's save began"
  assert saved_steps(cut) == [4]
  assert "starting at step 4 of 12" in run_main(cut, data, *flags)
  final = (train_state(d / "checkpoints" / "12") for d in (tmp_path / "full", cut))
  jax.tree.map(np.testing.assert_array_equal, *final)


def _entries(path):
  try:
    return list(path.iterdir())
  except FileNotFoundError:
    return []


@pytest.mark.slow
def test_resume_on_another_mesh_and_host_count(tmp_path):
  """Saved at step 4 on 8 devices, steps 5-8 run on 8, 4 and 1 devices and on 2 processes."""
  data = tmp_path / "data"
  flags = ("--config.total_steps=8", "--config.ckpt_every=4", "--config.eval_every=100",
           "--config.log_every=1", "--config.model.dtype=float32")
  logs = {8: run_main(tmp_path / "8", data, *flags, devices=8)}
  for n in (4, 1, "2x2"):
    shutil.copytree(tmp_path / "8" / "checkpoints" / "4", tmp_path / str(n) / "checkpoints" / "4")
    if n == "2x2":
      logs[n] = finish_processes(start_two(tmp_path / n, data_dir=data, flags=flags,
                                           devices=2))[0]
    else:
      logs[n] = run_main(tmp_path / str(n), data, *flags, devices=n)
    assert "starting at step 4 of 8" in logs[n]
  losses = {n: train_losses(log) for n, log in logs.items()}
  for n in (4, 1, "2x2"):
    assert sorted(losses[n]) == [5, 6, 7, 8]
    np.testing.assert_allclose([losses[n][s] for s in range(5, 9)],
                               [losses[8][s] for s in range(5, 9)], rtol=1e-5)
  final = train_state(tmp_path / "8" / "checkpoints" / "8")
  for n in (4, 1, "2x2"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), final,
                 train_state(tmp_path / str(n) / "checkpoints" / "8"))


def train_losses(log):
  """{step: train_bpd} from clu's logged train metrics."""
  return {int(m[1]): float(m[2]) for m in re.finditer(r"\] \[(\d+)\] train_bpd=([-\d.e+]+)", log)}
