"""JetFormer training: studies build, sharded == single-device, the loss falls on digits,
every ablation override and the demos run end to end (runlocal, mock TFDS data)."""

import functools
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import input_pipeline
from configs import common, digits_jetformer, jetformer_image_text, jetformer_imagenet256
from conftest import subprocess_env
from input_pipeline import pca
from jetformer import sharding, steps, train

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The study as it is, and the paper's ablations as documented in configs/jetformer_imagenet256.py.
ABLATIONS = {
    "paper_setting": {},
    "no_curriculum": {"objective.noise_sigma0": 0.0},
    "no_factoring_out": {"model.latent_dim": 0},
    "learned_pre_proj": {"model.pre_proj": "learned"},
    "pca_pre_proj": {"model.pre_proj": "pca"},
    "single_gaussian": {"model.num_mixtures": 1},
    "one_class_token": {"model.num_vocab_repeats": 1},
}


def local(module, data_dir, **overrides):
  """The study's runlocal config; `overrides` (dotted keys) win over the shrink."""
  config = module.get_config()
  config.runlocal = True
  with config.unlocked():
    for key, value in overrides.items():
      parent, name = key.rpartition(".")[::2]
      (config if not parent else _get(config, parent))[name] = value
    config.dataset.data_dir = str(data_dir)
  return common.finalize(config, keep=set(overrides))


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def run(config, workdir, writer):
  results = train.train_and_evaluate(config, str(workdir), data=input_pipeline, writer=writer,
                                     progress=lambda n: (lambda step: None))
  return results, writer.scalars


@pytest.mark.parametrize("variant", sorted(common.DECODERS))
@pytest.mark.parametrize("module", [jetformer_imagenet256, jetformer_image_text])
def test_paper_studies_build(module, variant):
  config = module.get_config(variant)
  with config.unlocked():
    if config.text.tokenizer:  # the image-text study: a 32k tokenizer the user provides
      config.text.tokenizer, config.model.vocab_size = "", 32_000
  cfg = train.jetformer_config(config, data=None)
  _, params, _ = steps.abstract_model(cfg)  # abstract: nothing allocated
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert cfg.num_tokens == 256 and cfg.token_dim == 768 and cfg.soft_dim == 128
  assert params["decoder"]["layers"]["attn"]["query"].shape[:2] == (
      cfg.decoder.depth, common.DECODERS[variant]["width"])
  print(f"{module.__name__} {variant}: decoder {count(params['decoder']):,}, "
        f"Jet {count(params['jet']):,}, total {count(params):,} parameters")


def test_fsdp_step_equals_single_device(tmp_path):
  config = local(digits_jetformer, tmp_path)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3)).astype(np.float32) / 127.5 - 1,
           "label": rng.integers(0, 10, (8,)).astype(np.int32)}

  def two_steps(mesh):
    cfg, tx = train.model_config(config), train.make_optimizer(config, 10)
    graphdef, params, frozen = steps.abstract_model(cfg)
    init = functools.partial(steps.init_state, cfg, tx, False, 0)
    shardings = steps.state_shardings(tx, jax.eval_shape(init), params, frozen,
                                      config.sharding_rules, mesh)
    state = jax.jit(init, out_shardings=shardings)()
    step = train.compile_train_step(config, graphdef, tx, shardings, mesh, 10)
    for i in range(2):
      state, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(i))
    return state, jax.device_get(metrics)

  single, m1 = two_steps(sharding.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]))
  sharded, m8 = two_steps(sharding.make_mesh([("data", 2), ("fsdp", 4)]))
  q = sharded["params"]["decoder"]["layers"]["attn"]["query"]
  assert "fsdp" in q.sharding.spec
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.device_get(single), jax.device_get(sharded))
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)


def test_constrain_batch_pins_the_batch_axis():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  f = jax.jit(lambda x: sharding.constrain_batch(x * 2))
  with jax.set_mesh(mesh):
    assert f(np.ones((8, 3))).sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert f(np.ones((6, 3))).sharding.is_fully_replicated    # 6 rows: left to XLA
  assert sharding.constrain_batch(np.ones((8, 3))).shape == (8, 3)  # no mesh: a no-op


@pytest.mark.slow
def test_loss_falls_on_digits(tmp_path, writer):
  config = local(digits_jetformer, tmp_path / "tfds", total_steps=60, log_every=20,
                 eval_every=60, batch_size=32)
  results, scalars = run(config, tmp_path / "work", writer)
  bpd = [scalars[s]["train_image_bpd"] for s in (20, 40, 60)]
  assert bpd[0] > bpd[1] > bpd[2] and bpd[0] - bpd[2] > 0.3, bpd
  assert results["val_image_bpd"] < bpd[0]


def test_pca_of_patches_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(40, 8, 8, 3)) * np.linspace(0.1, 2, 3)
  batches = [{"image": images[i:i + 16], "mask": np.ones(len(images[i:i + 16]))}
             for i in range(0, 40, 16)]
  mean, comps, var = pca.patch_pca(batches, 4, 40)
  x = pca.patches(images, 4)
  np.testing.assert_allclose(mean, x.mean(0), atol=1e-10)
  np.testing.assert_allclose(comps.T @ comps, np.eye(48), atol=1e-8)
  np.testing.assert_allclose(var, np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1],
                             atol=1e-8)
  assert np.all(np.diff(var) <= 0)


@pytest.mark.slow
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_imagenet256_ablations_run(ablation, tmp_path, writer):
  overrides = dict(ABLATIONS[ablation])
  if ablation == "pca_pre_proj":
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "pca.npz", mean=np.zeros(48),
             components=np.linalg.qr(rng.normal(size=(48, 48)))[0])
    overrides["model.pca_path"] = str(tmp_path / "pca.npz")
  config = local(jetformer_imagenet256, tmp_path / "tfds", **overrides)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    results, scalars = run(config, tmp_path / "work", writer)
  assert np.isfinite(results["val_image_bpd"]), results
  assert np.isfinite(scalars[config.total_steps]["train_loss"])


@pytest.mark.slow
def test_image_text_runlocal_on_mock_coco(tmp_path, writer):
  data_dir = tmp_path / "tfds"
  spm = input_pipeline.dataset_tokenizer("digits", str(data_dir))  # any sentencepiece model
  config = local(jetformer_image_text, data_dir, **{"dataset.name": "coco_captions",
                                                    "text.tokenizer": spm})
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    results, scalars = run(config, tmp_path / "work", writer)
  assert np.isfinite(results["val_image_bpd"]) and np.isfinite(results["val_text_nll"])
  assert {"train_text_nll", "train_image_bpd_prefix"} <= set(scalars[config.total_steps])


def run_main(config, workdir, data_dir, *flags):
  cmd = [sys.executable, str(ROOT / "main.py"), f"--config=configs/{config}.py",
         f"--workdir={workdir}", "--config.runlocal=True",
         f"--config.dataset.data_dir={data_dir}", *flags]
  env = subprocess_env(2)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_class_conditional_demo_runs_through_main(tmp_path):
  """The text demo runs through main.py in tests/test_evaluate.py."""
  stdout = run_main("digits_jetformer", tmp_path / "work", tmp_path / "tfds")
  assert "Validation: image_bpd" in stdout
  assert "Final: digits_sample_accuracy" in stdout
  assert (tmp_path / "work" / "checkpoints" / "6").is_dir()
  assert (tmp_path / "work" / "digits_6.png").is_file()
