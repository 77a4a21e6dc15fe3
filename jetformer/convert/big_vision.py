"""Load big_vision Jet weights (`big_vision/models/proj/jet/jet.py`) into this Jet.

big_vision stores the couplings' splits as dense permutation matrices
(`*-FREEZE_ME`); here they become the flat gather indices of
`jetformer/models/permutations.py`. Everything else maps name for name.
"""

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetformer.models import jet as jet_lib
from jetformer.models import permutations

_RENAMES = (
    (re.compile(r"/vit/encoderblock_(\d+)/"), r"/vit/blocks/\1/"),
    (re.compile(r"/dnn/MultiHeadDotProductAttention_0/"), r"/dnn/cross/"),
)
_CHANNEL_MASKS = "channel_coupling_masks-FREEZE_ME"
_SPATIAL_MASKS = "spatial_coupling_masks-FREEZE_ME"


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
