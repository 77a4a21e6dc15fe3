"""Study configs: every one loads and builds, the paper-size model has the expected size,
the data-set studies train end to end (runlocal, mock TFDS data), overrides are checked."""

import importlib
import math
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

import input_pipeline
from configs import common, imagenet64_jet
from jetformer import steps, train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
STUDIES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("common", "__init__"))
JET_STUDIES = [s for s in STUDIES if "jetformer" not in s]   # tests/test_jetformer_train.py: the rest


def load(name, runlocal=False):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.runlocal = runlocal
  return common.finalize(config)


def keys(tree, prefix=""):
  """Dotted keys of a nested dict (leaves only)."""
  out = set()
  for k, v in tree.items():
    out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
  return out


def num_params(cfg):
  _, params, _ = steps.abstract_model(cfg)
  return sum(x.size for x in jax.tree.leaves(params))


def expected_params(cfg):
  """Parameter count by hand (docs/method.md, section 1, with the vit.py layouts)."""
  e, d = cfg.emb_dim, cfg.grid[2]
  n = cfg.grid[0] * cfg.grid[1]
  attention = 4 * (e * e + e)                                  # q, k, v, out (+ biases)
  block = 2 * e + attention + 2 * e + (e * 4 * e + 4 * e) + (4 * e * e + e)  # LN, MHSA, LN, MLP
  coupling = (d // 2 * e + e) + n * e + cfg.block_depth * block + 2 * e + (e * d + d)
  if cfg.num_classes:                                           # cross-attention, label table
    return cfg.depth * (coupling + attention) + (cfg.num_classes + 1) * e
  return cfg.depth * coupling


def test_found_the_studies():
  assert {"imagenet64_jet", "imagenet32_jet", "cifar10_jet", "digits_jet"} <= set(STUDIES)


@pytest.mark.parametrize("name", JET_STUDIES)
def test_config_builds_a_model(name):
  base = keys(common.jet_base(dataset="x", image_size=32).to_dict())
  config = importlib.import_module(f"configs.{name}").get_config()
  tree = config.to_dict()
  local = keys(tree["local"], "local.")
  # Studies change values, never add keys; the shrink only overrides existing keys.
  assert keys(tree) - local == base - {k for k in base if k.startswith("local.")}
  assert {k.removeprefix("local.") for k in local} <= base
  assert config.dataset.name in input_pipeline.KNOWN_DATASETS
  train.jet_config(config)  # the full-size study is a valid JetConfig
  config = load(name, runlocal=True)
  cfg = train.jet_config(config)
  assert config.total_steps > 0 and cfg.depth <= 8 and cfg.emb_dim <= 128
  _, params, frozen = steps.abstract_model(cfg)
  assert sum(x.size for x in jax.tree.leaves(params)) == expected_params(cfg)
  assert frozen["perm"].shape == (cfg.depth, math.prod(cfg.image_shape))


@pytest.mark.parametrize("variant", sorted(imagenet64_jet.VARIANTS))
def test_imagenet64_parameter_count(variant):
  v = imagenet64_jet.VARIANTS[variant]
  config = imagenet64_jet.get_config()
  config.model.update(depth=v["depth"], block_depth=v["block_depth"])
  cfg = train.jet_config(config)
  count = num_params(cfg)  # abstract: nothing allocated
  print(f"Jet ImageNet64 {variant}: {count:,} parameters")
  assert count == v["params"] == expected_params(cfg)
  # 32x2: 6.47M per coupling, of which 2 x 3.15M in the ViT blocks.
  assert (200e6 < count < 210e6) if variant == "32x2" else (1.0e9 < count < 1.03e9)


def parse_command_line(*overrides):
  """The config as main.py gets it: config_flags with lock_config=True."""
  argv = ["main.py", f"--config={CONFIG_DIR / 'imagenet64_jet.py'}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Study config file.", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_unknown_key_override_fails():
  config = imagenet64_jet.get_config()
  config.lock()
  config.model.depth = 16  # known keys still take values
  with pytest.raises(AttributeError):
    config.model.detph = 16
  with pytest.raises(AttributeError):
    config.batchsize = 8
  # The command line: the documented 64x5 override works, a misspelt key is refused.
  config = parse_command_line("--config.model.depth=64", "--config.model.block_depth=5")
  assert (config.model.depth, config.model.block_depth) == (64, 5) and config.is_locked
  with pytest.raises(AttributeError, match="depth"):
    parse_command_line("--config.model.detph=64")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet64_jet", "imagenet32_jet", "cifar10_jet"])
def test_runlocal_trains_end_to_end(name, tmp_path, writer):
  config = load(name, runlocal=True)
  with config.unlocked():
    config.dataset.data_dir = str(tmp_path / "tfds")
    config.eval_batch_size = 8
  workdir = tmp_path / "work"
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    results = train.train_and_evaluate(config, str(workdir), data=input_pipeline,
                                       writer=writer,
                                       progress=lambda n: (lambda step: None))
  assert np.isfinite(results["val_bpd"]) and 0 < results["val_bpd"] < 20
  steps_done = config.total_steps
  assert np.isfinite(writer.scalars[steps_done]["train_bpd"])
  assert (workdir / "checkpoints" / str(steps_done)).is_dir()
