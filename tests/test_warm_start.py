"""init_from: weights only from another run; a trained Jet into a JetFormer's adaptor."""

import jax
import numpy as np
import pytest

import input_pipeline
from configs import common, digits_jet, digits_jetformer
from conftest import train_state
from jetformer import checkpoint, train


def local(module, data_dir, **overrides):
  config = module.get_config()
  config.runlocal = True
  config = common.finalize(config)
  with config.unlocked():
    config.update_from_flattened_dict({**overrides, "dataset.data_dir": str(data_dir)})
  return config


def run(config, workdir, writer):
  return train.train_and_evaluate(config, workdir, data=input_pipeline, writer=writer,
                                  progress=lambda n: lambda step: None)


# digits_jetformer's adaptor (runlocal): 4x4 patches, 4 channel couplings of width 64.
ADAPTOR_SHAPED = {"model.ps": 4, "model.num_classes": 0, "model.kinds": ("channels",),
                  "label_drop_prob": 0.0, "total_steps": 3, "ckpt_every": 3}


def test_frozen_flow_trains_around_a_trained_jet_it_never_changes(tmp_path, writer):
  data = tmp_path / "data"
  run(local(digits_jet, data, **ADAPTOR_SHAPED), tmp_path / "jet", writer)
  jet = train_state(tmp_path / "jet" / "checkpoints" / "3")
  config = local(digits_jetformer, data, init_from=str(tmp_path / "jet"), ema_decay=0.9,
                 **{"objective.frozen_flow": True, "total_steps": 4, "ckpt_every": 4})
  run(config, tmp_path / "jf", writer)
  jf = train_state(tmp_path / "jf" / "checkpoints" / "4")
  jax.tree.map(np.testing.assert_array_equal, jf["params"]["jet"], jet["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jf["ema"]["jet"], jet["params"])  # the EMA of a constant
  jax.tree.map(np.testing.assert_array_equal, jf["frozen"]["jet"], jet["frozen"])
  counts = [int(v) for path, v in jax.tree_util.tree_leaves_with_path(jf["opt"])
            if jax.tree_util.keystr(path).endswith("['count']")]
  assert counts and set(counts) == {4}  # Adam and the schedule started afresh


def test_init_from_names_what_does_not_fit_and_frozen_flow_needs_it(tmp_path, writer):
  data = tmp_path / "data"
  run(local(digits_jet, data, **ADAPTOR_SHAPED, **{"model.emb_dim": 32}), tmp_path / "jet",
      writer)
  config = local(digits_jetformer, data, init_from=str(tmp_path / "jet" / "checkpoints" / "3"))
  with pytest.raises(checkpoint.MismatchError, match=r"init_from=.*/jet/checkpoints/3 \(step 3 "
                     r"in .*\) does not match this config: params/\S+ is \(.*\) there, \(.*\) "
                     r"here;.*a model with these shapes"):
    run(config, tmp_path / "jf", writer)
  with pytest.raises(train.ConfigError, match="--config.init_from"):
    run(local(digits_jetformer, data, **{"objective.frozen_flow": True}), tmp_path / "jf2",
        writer)
