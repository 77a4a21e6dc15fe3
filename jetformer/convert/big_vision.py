"""Load big_vision Jet weights (`big_vision/models/proj/jet/jet.py`) into this Jet.

big_vision stores the couplings' splits as dense permutation matrices
(`*-FREEZE_ME`); here they become the flat gather indices of
`jetformer/models/permutations.py`. Everything else maps name for name.

As a command, it writes a big_vision `.npz` as checkpoint 0 of a study, for
`evaluate.py` (or `evaluation.evaluate_checkpoint`) with the same `--config`:

  python -m jetformer.convert.big_vision --npz=jet.npz --input_shape=64,64,3 \
    --model_kwargs_json='{"depth": 32, "ps": 4, ...}' \
    --config=configs/STUDY.py [--config.model.depth=32 ...] --workdir=DIR
  python evaluate.py --config=configs/STUDY.py [the same overrides] --workdir=DIR

The study config must build the same Jet, else the command fails and lists the
fields that differ: `config.dataset.image_size` is H = W of `input_shape` (C=3);
`config.model.{ps, depth, block_depth, emb_dim, num_heads, scale_factor, kinds}`
equal the big_vision kwargs of those names, `config.model.channel_projs` its
`channels_coupling_projs`, `config.model.spatial_projs` its
`spatial_coupling_projs` (a kwarg left out means JetConfig's default, which is
big_vision's except for depth and block_depth: give those two), and
`config.model.num_classes` is 0 (big_vision's Jet has no class embedding).
`remat`, `scan` and `dtype` are free. The checkpoint holds the weights only
(and an EMA equal to them when the study keeps one), not a train state.
"""

import dataclasses
import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from jetformer import checkpoint, train
from jetformer.models import jet as jet_lib
from jetformer.models import permutations

_RENAMES = (
    (re.compile(r"/vit/encoderblock_(\d+)/"), r"/vit/blocks/\1/"),
    (re.compile(r"/dnn/MultiHeadDotProductAttention_0/"), r"/dnn/cross/"),
)
_CHANNEL_MASKS = "channel_coupling_masks-FREEZE_ME"
_SPATIAL_MASKS = "spatial_coupling_masks-FREEZE_ME"


# JetConfig fields that change how the flow runs, not its weights.
RUNTIME_FIELDS = ("remat", "scan", "dtype")


def config_from_big_vision(model_kwargs, input_shape, **overrides):
  """JetConfig for big_vision `Model(**model_kwargs)` on images `input_shape` (H, W, C)."""
  kw = dict(model_kwargs)
  names = {"channels_coupling_projs": "channel_projs",
           "spatial_coupling_projs": "spatial_projs"}
  kw = {names.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
  return jet_lib.JetConfig(image_shape=tuple(input_shape), **kw, **overrides)


def _perms_from_masks(cfg, channel_masks, spatial_masks):
  """[depth, N*D] gather indices from the reference's permutation matrices."""
  nh, nw, d = cfg.grid
  sched = permutations.schedule(cfg.depth, cfg.kinds, cfg.channel_projs, cfg.spatial_projs)
  perms = []
  for i, (kind, _) in enumerate(sched):
    # Column j of a mask is one-hot at the input index that lands at output j.
    if kind == "channels":
      perms.append(permutations.channel_flat(np.argmax(channel_masks[i], 0), nh * nw))
    else:
      order = np.argmax(spatial_masks[i], 0)
      perms.append(permutations.spatial_flat(order[:nh * nw // 2], order[nh * nw // 2:], d))
  return np.stack([np.asarray(p) for p in perms]).astype(np.int32)


def jet_from_big_vision(params, config, **overrides):
  """This project's Jet holding big_vision Jet weights.

  Args:
    params: {'/'-joined name: array}, as in big_vision's .npz parameter files
      (a leading 'params/' is accepted).
    config: the big_vision model kwargs plus `input_shape` (H, W, C).
    **overrides: JetConfig fields that don't change the function (remat, scan, dtype).
  """
  config = dict(config)
  cfg = config_from_big_vision(config, config.pop("input_shape"), **overrides)
  params = {k.removeprefix("params/"): np.asarray(v) for k, v in params.items()}
  jet = nnx.eval_shape(lambda: jet_lib.Jet(cfg, rngs=nnx.Rngs(0)))
  perms = _perms_from_masks(cfg, params.pop(_CHANNEL_MASKS), params.pop(_SPATIAL_MASKS))

  renamed = {}
  for name, value in params.items():
    for pattern, repl in _RENAMES:
      name = pattern.sub(repl, name)
    renamed[name] = value
  state = nnx.state(jet, nnx.Param)
  flat = {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
  missing, unused = sorted(set(flat) - set(renamed)), sorted(set(renamed) - set(flat))
  if missing or unused:
    raise ValueError(f"big_vision params do not match the config: missing {missing}, "
                     f"unexpected {unused}.")
  for name, var in flat.items():
    if var.shape != renamed[name].shape:
      raise ValueError(f"{name}: big_vision shape {renamed[name].shape}, expected {var.shape}.")
    var.set_value(jnp.asarray(renamed[name], jnp.float32))
  nnx.update(jet, state)
  jet.perm.set_value(jnp.asarray(perms))
  jet.inv_perm.set_value(jnp.asarray(np.argsort(perms, axis=1).astype(np.int32)))
  return jet


def load_npz(path):
  """{name: array} of a big_vision .npz; only its 'params/' entries when it has any."""
  with np.load(path) as f:
    names = [k for k in f.files if k.startswith("params/")] or f.files
    return {k: f[k] for k in names}


def check_config(cfg, config):
  """Raises unless `cfg` (from the big_vision kwargs) is the Jet that the study `config` builds."""
  expected = train.jet_config(config)
  diff = {f.name: (getattr(cfg, f.name), getattr(expected, f.name))
          for f in dataclasses.fields(cfg)
          if f.name not in RUNTIME_FIELDS and getattr(cfg, f.name) != getattr(expected, f.name)}
  if diff:
    raise ValueError("The big_vision model and the study config differ, as "
                     f"{{field: (big_vision, config)}}: {diff}.")


def weights_state(jet, config):
  """What evaluate.py restores (params, frozen[, ema]); no optimizer state."""
  _, params, frozen = nnx.split(jet, nnx.Param, jet_lib.Frozen)
  state = {"params": params.to_pure_dict(), "frozen": frozen.to_pure_dict()}
  if config.ema_decay > 0:
    state["ema"] = state["params"]
  return state


def convert(npz_path, model_kwargs, input_shape, config, workdir):
  """Writes the big_vision Jet in `npz_path` as checkpoint 0 of the study `config` in `workdir`."""
  free = {k: config.model[k] for k in RUNTIME_FIELDS}
  jet = jet_from_big_vision(load_npz(npz_path), dict(model_kwargs, input_shape=input_shape),
                            **free)
  check_config(jet.cfg, config)
  mgr = checkpoint.manager(workdir, save_every=1, keep=1, async_save=False)
  checkpoint.save(mgr, 0, weights_state(jet, config), force=True)
  mgr.wait_until_finished()


def main():
  """The command line (module docstring); flags are defined here, not on import."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "The study config evaluate.py will be run with.", lock_config=True)
  npz = flags.DEFINE_string("npz", None, "big_vision Jet params (.npz).")
  kwargs_json = flags.DEFINE_string("model_kwargs_json", None, "big_vision model kwargs, JSON.")
  kwargs_file = flags.DEFINE_string("model_kwargs_file", None, "A JSON file of them.")
  input_shape = flags.DEFINE_list("input_shape", None, "H,W,C of the model's images.")
  workdir = flags.DEFINE_string("workdir", None, "Where the checkpoint goes.")
  flags.mark_flags_as_required(["config", "npz", "input_shape", "workdir"])
  flags.mark_flags_as_mutual_exclusive(["model_kwargs_json", "model_kwargs_file"], required=True)

  def run(argv):
    del argv
    text = kwargs_json.value or pathlib.Path(kwargs_file.value).read_text()
    convert(npz.value, json.loads(text), tuple(int(n) for n in input_shape.value),
            config_flag.value, workdir.value)
  app.run(run)


if __name__ == "__main__":
  main()
