"""evaluate.py reproduces training's numbers on another mesh; converted big_vision weights restore."""

import json
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits_jet
from conftest import ROOT, TESTDATA, finish_processes, start_processes, subprocess_env
from jetformer import evaluation
from jetformer.convert import big_vision
from jetformer.metrics import inception
from test_metrics import random_inception_params

# digits_jet's model changed into the one of jet_ref_a.json.
REF_MODEL = dict(depth=4, num_heads=2, num_classes=0,
                 spatial_projs=("checkerboard", "checkerboard-inv"),
                 dtype="float32")  # float32 matmuls reproduce the reference to round-off


def run(args, devices):
  env = subprocess_env(devices)
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout + out.stderr


def ref_config():
  config = digits_jet.get_config()
  config.model.update(REF_MODEL)
  return config


@pytest.mark.slow
def test_evaluate_reproduces_training_on_one_device(tmp_path):
  study = ["--config=configs/digits_jet.py", f"--workdir={tmp_path / 'run'}",
           "--config.runlocal=True", f"--config.dataset.data_dir={tmp_path / 'data'}",
           "--config.ema_decay=0.9", "--config.compare_png=False"]
  log = run(["main.py", *study, "--config.mesh=(('data',2),('fsdp',4))"], devices=8)
  # clu's logging writer prints the final eval as "[10] val_bpd=5.12345, val_ema_bpd=...".
  trained = {k: float(v) for k, v in re.findall(r"\b(val_\w+)=([-+.\de]+)", log)}
  run(["evaluate.py", *study, "--config.mesh=(('data',1),('fsdp',1))"], devices=1)
  evaluated = json.loads((tmp_path / "run" / "eval_10.json").read_text())
  assert evaluated.pop("step") == 10
  assert set(evaluated) == set(trained) and "val_ema_bpd" in trained
  for name, value in trained.items():
    assert evaluated[name] == pytest.approx(value, abs=1e-4), name
  # The class-conditional flow inverted on its own latents gives back every pixel.
  run(["evaluate.py", *study, "--tasks=reconstruct"], devices=2)
  assert json.loads((tmp_path / "run" / "eval_10.json").read_text())["reconstruct_max_error"] == 0
  assert (tmp_path / "run" / "reconstructions_10.png").stat().st_size > 0


def evaluated_files(work, step):
  """What evaluate.py wrote at `step`: its numbers (less the timing), samples, captions."""
  numbers = json.loads((work / f"eval_{step}.json").read_text())
  numbers.pop("sample_seconds")
  with np.load(work / f"samples_{step}.npz") as f:
    samples = f["images"]
  return numbers, samples, (work / f"captions_{step}.jsonl").read_text()


@pytest.mark.slow
def test_evaluate_jetformer_tasks_on_other_meshes_and_two_hosts(tmp_path):
  """A text JetFormer trained on 8 devices: bpd reproduced on 2, every task's files, and
  every number, sample, caption and FID feature the same from 2 processes of 1 device."""
  work = tmp_path / "run"
  study = ["--config=configs/digits_jetformer_text.py", f"--workdir={work}",
           "--config.runlocal=True", f"--config.dataset.data_dir={tmp_path / 'data'}",
           "--config.sample.every=3"]
  log = run(["main.py", *study, "--config.mesh=(('data',2),('fsdp',4))"], devices=8)
  trained = {k: float(v) for k, v in re.findall(r"\b(val_\w+)=([-+.\de]+)", log)}
  assert "digits_sample_accuracy" in log and (work / "digits_6.png").is_file()
  weights = tmp_path / "inception.npz"    # random weights: the plumbing, not the numbers
  inception.save(inception.from_params(random_inception_params(0)), weights)
  tasks = ["--config.mesh=(('data',2),('fsdp',1))",
           "--tasks=bpd,sample,caption,reconstruct,digits,fid",
           f"--config.fid.inception_path={weights}", "--config.fid.num_samples=16",
           "--config.fid.reference_split=validation[:24]", "--config.fid.batch_size=8",
           "--config.fid.floor_split=validation[24:48]"]
  run(["evaluate.py", *study, *tasks], devices=2)
  evaluated = json.loads((work / "eval_6.json").read_text())
  for name, value in trained.items():
    assert evaluated[name] == pytest.approx(value, abs=1e-4), name
  assert 0 <= evaluated["digits_sample_accuracy"] <= 1
  assert 0 <= evaluated["digits_caption_accuracy"] <= 1
  assert evaluated["fid"] > 0 and 1 <= evaluated["inception_score"] <= 1008
  assert 0 <= evaluated["precision"] <= 1 and 0 <= evaluated["recall"] <= 1
  assert evaluated["floor_num_images"] == 16 and evaluated["floor_fid"] > 0
  assert 0 <= evaluated["floor_precision"] <= 1 and evaluated["floor_inception_score"] >= 1
  # The cache file is named by a digest of the reference images and of the network.
  cached, = work.glob("fid_reference_digits_validation__24__*_*.npz")
  with np.load(cached) as f:
    reference = f["features"]
    assert reference.shape == (24, 2048)
  cached.rename(tmp_path / "ref1.npz")
  with np.load(work / "samples_6.npz") as f:
    assert f["images"].shape == (10, 8, 16, 16, 3) and f["images"].dtype == np.uint8
    assert list(f["prompts"]) == [f"the digit {i}" for i in range(10)]
  captions = [json.loads(line) for line in (work / "captions_6.jsonl").read_text().splitlines()]
  assert len(captions) == 64 and all(set(c) == {"caption", "reference"} for c in captions)
  for name in ("samples", "reconstructions", "digits"):
    assert (work / f"{name}_6.png").stat().st_size > 100, name
  assert any(p.name.startswith("events.out.tfevents") for p in work.iterdir())

  one_host = evaluated_files(work, 6)
  finish_processes(start_processes([sys.executable, "evaluate.py", *study, *tasks]))
  two_hosts = evaluated_files(work, 6)
  assert two_hosts[0].keys() == one_host[0].keys()
  for name, value in one_host[0].items():
    assert two_hosts[0][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
  np.testing.assert_array_equal(two_hosts[1], one_host[1])
  assert two_hosts[2] == one_host[2]
  with np.load(cached) as f:  # the same key from two hosts, each hashing its share
    np.testing.assert_allclose(f["features"], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_converted_big_vision_jet_restores(tmp_path):
  meta = json.loads((TESTDATA / "jet_ref_a.json").read_text())
  run(["-m", "jetformer.convert.big_vision", f"--npz={TESTDATA / 'jet_ref_a.npz'}",
       f"--model_kwargs_json={json.dumps(meta['model_kwargs'])}",
       "--input_shape=" + ",".join(map(str, meta["input_shape"][1:])),
       "--config=configs/digits_jet.py", f"--workdir={tmp_path}",
       *(f"--config.model.{k}={v if isinstance(v, str) else repr(v)}"
         for k, v in REF_MODEL.items())], devices=1)
  config = ref_config()
  config.mesh = (("data", 1), ("fsdp", -1))  # written on one device, read FSDP over 8
  restored = evaluation.restore(config, tmp_path)
  assert restored.step == 0
  jet = nnx.merge(restored.graphdef, restored.state["params"], restored.state["frozen"])
  ref = np.load(TESTDATA / "jet_ref_a.npz")
  z, logdet = jet(jnp.asarray(ref["x"]))
  np.testing.assert_allclose(z, ref["z"], atol=1e-4)
  np.testing.assert_allclose(logdet, ref["logdet"], atol=1e-4)


def test_converter_rejects_another_model():
  meta = json.loads((TESTDATA / "jet_ref_a.json").read_text())
  cfg = big_vision.config_from_big_vision(meta["model_kwargs"], meta["input_shape"][1:])
  big_vision.check_config(cfg, ref_config())
  bf16 = ref_config()
  bf16.model.update(dtype="bfloat16", remat="full", scan=False)  # how it runs, not what it is
  big_vision.check_config(cfg, bf16)
  with pytest.raises(ValueError, match="num_classes"):
    big_vision.check_config(cfg, digits_jet.get_config())


def test_unknown_task_fails_before_restoring(tmp_path):
  with pytest.raises(ValueError, match="Unknown evaluation tasks"):
    evaluation.evaluate_checkpoint(ref_config(), tmp_path, data=None, tasks=("bpd", "cider"))
  assert not (tmp_path / "checkpoints").exists()
