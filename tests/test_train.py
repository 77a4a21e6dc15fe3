"""Training: sharded step == single-device step, main.py resumes exactly where it stopped."""

import functools
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common, digits_jet
from conftest import (ROOT, finish_processes, run_main, start_processes, subprocess_env,
                      train_state)
from jetformer import objectives, optim, sharding, steps, train

def local_config(data_dir, **overrides):
  config = digits_jet.get_config()
  config.runlocal = True
  config = common.finalize(config)
  with config.unlocked():
    config.dataset.data_dir = str(data_dir)
    for key, value in overrides.items():
      config[key] = value
  return config


def one_step(config, mesh, batch):
  cfg = train.jet_config(config)
  tx = optim.make(total_steps=10, **config.optim)
  graphdef, params, frozen = steps.abstract_model(cfg)
  init = functools.partial(steps.init_state, cfg, tx, True, 0)
  shardings = steps.state_shardings(tx, jax.eval_shape(init), params, frozen,
                                    config.sharding_rules, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  if cfg.actnorm:
    state = jax.jit(functools.partial(steps.init_actnorm, graphdef=graphdef,
                                      objective=objectives.JetObjective()),
                    out_shardings=shardings)(state, sharding.global_batch(batch, mesh),
                                             jax.random.key(9))
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=0.9,
                                   objective=objectives.JetObjective(0.5)),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  batch = sharding.global_batch(batch, mesh)
  for i in range(2):
    state, metrics = step(state, batch, jax.random.key(i))
  return jax.device_get(state), jax.device_get(metrics), state


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_step_equals_single_device(tmp_path, dtype):
  config = local_config(tmp_path)
  with config.unlocked():
    config.model.emb_dim = 32
    config.model.dtype = dtype
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3)).astype(np.float32) / 127.5 - 1,
           "label": rng.integers(0, 10, (8,)).astype(np.int32)}
  single, m1, _ = one_step(config, sharding.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batch)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  sharded, m8, live = one_step(config, mesh, batch)
  kernel = live["params"]["couplings"]["dnn"]["init_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  mu = live["opt"].inner_state[1].mu["couplings"]["dnn"]["init_proj"]["kernel"]  # Adam's first moment
  assert mu.sharding.spec == kernel.sharding.spec
  assert live["frozen"]["perm"].sharding.is_fully_replicated
  np.testing.assert_allclose(m1["bpd"], m8["bpd"], rtol=1e-6)
  if dtype == "float32":
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 single, sharded)
  else:  # sharded sums round to bfloat16 a little differently: the gradients agree, not bits
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-3)


@pytest.mark.parametrize("ablation", [dict(backbone="cnn", split="masking"),
                                      dict(actnorm=True, invertible_dense=True)])
def test_jet_ablations_step_sharded_equals_single_device(tmp_path, ablation):
  config = local_config(tmp_path)
  with config.unlocked():
    config.model.update(emb_dim=32, dtype="float32", **ablation)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3)).astype(np.float32) / 127.5 - 1,
           "label": rng.integers(0, 10, (8,)).astype(np.int32)}
  single, m1, _ = one_step(config, sharding.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batch)
  sharded, m8, _ = one_step(config, sharding.make_mesh([("data", 2), ("fsdp", 4)]), batch)
  np.testing.assert_allclose(m1["bpd"], m8["bpd"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               single, sharded)


@pytest.mark.slow
def test_main_resumes_exactly(tmp_path):
  full, resumed, data_dir = tmp_path / "full", tmp_path / "resumed", tmp_path / "data"
  flags = ("--config.total_steps=8", "--config.ckpt_every=4", "--config.eval_every=100")
  log = run_main(full, data_dir, *flags)
  assert "Validation bits/dim" in log
  # What a newcomer sees: what trains, where it goes, progress; no library chatter.
  assert "Preparing digits in" in log
  assert f"Workdir {full}: checkpoints every 4 steps; TensorBoard: tensorboard --logdir={full}" in log
  assert "steps/s" in log and "ETA" in log
  for noise in ("oneDNN", "Load dataset info", "Generating splits", "OpenCV", "Variant folder"):
    assert noise not in log, noise
  ckpts = full / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4", "8"]
  shutil.copytree(ckpts / "4", resumed / "checkpoints" / "4")  # as if stopped after step 4
  log = run_main(resumed, data_dir, *flags)
  assert "starting at step 4 of 8" in log
  a, b = (train_state(d / "checkpoints" / "8") for d in (full, resumed))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """Two processes of 2 CPU devices each (gloo) train the same model as one process of 4."""
  flags = ("--config=configs/digits_jet.py", "--config.runlocal=True",
           "--config.total_steps=4", "--config.ckpt_every=4", "--config.eval_every=100",
           f"--config.dataset.data_dir={tmp_path / 'data'}",
           "--config.mesh=(('data',2),('fsdp',2))",
           "--config.model.dtype=float32")  # exact: bfloat16 rounding follows the summation order
  run_main(tmp_path / "warm", tmp_path / "data", "--config.total_steps=1")  # prepare data once
  finish_processes(start_processes(
      [sys.executable, str(ROOT / "main.py"), f"--workdir={tmp_path / 'multi'}", *flags],
      devices=2))
  env4 = subprocess_env(4)
  out = subprocess.run([sys.executable, str(ROOT / "main.py"), f"--workdir={tmp_path / 'single'}",
                        *flags], cwd=ROOT, env=env4, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  a, b = (train_state(tmp_path / d / "checkpoints" / "4") for d in ("multi", "single"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
