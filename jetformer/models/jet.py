"""Jet: a normalizing flow of affine couplings conditioned by ViT blocks.

docs/method.md, section 1. `z, logdet = jet(x)` and `x, logdet = jet.inverse(z)` on
[B, H, W, C] arrays; couplings are stacked on a leading `layers` axis and run
with `lax.scan` (or unrolled, for testing), optionally rematerialised.
"""

import dataclasses
from typing import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetformer import sharding
from jetformer.models import permutations
from jetformer.models import precision
from jetformer.models import vit

REMAT_POLICIES = {  # what the backward pass finds saved of each coupling's forward
    "none": None,                                                      # everything
    "full": jax.checkpoint_policies.nothing_saveable,                  # nothing
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the dense products
    # Every named product but the MLP's 4x wider hidden layer, which is recomputed.
    "dots_except_mlp_hidden": jax.checkpoint_policies.save_any_names_but_these(vit.MLP_HIDDEN),
}


ATTENTION_IMPLS = (None, "xla", "cudnn")


def check_attention_impl(impl):
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}: use None (XLA) or 'cudnn' (NVIDIA GPUs).")


class Frozen(nnx.Variable):
  """Fixed state drawn at init and never trained (the couplings' splits)."""


@dataclasses.dataclass(frozen=True)
class JetConfig:
  image_shape: Sequence[int]              # (H, W, C)
  ps: int = 4
  depth: int = 8
  block_depth: int = 2
  emb_dim: int = 256
  num_heads: int = 4
  scale_factor: float = 2.0
  kinds: Sequence[str] = ("channels", "channels", "spatial")
  channel_projs: Sequence[str] = ("random",)
  spatial_projs: Sequence[str] = ("checkerboard", "checkerboard-inv")
  num_classes: int = 0                    # > 0: class-conditional via cross-attention
  remat: str = "dots"                     # a key of REMAT_POLICIES
  scan: bool = True
  dtype: str = "float32"                  # matmul operands of the ViT (precision.py; bf16: no jvp)
  attention_impl: str | None = None       # jax.nn.dot_product_attention's: None (XLA), "cudnn"
  # The Jet paper's ablations (docs/method.md, section 1.6); the defaults are its choices.
  backbone: str = "vit"                   # conditioning network: "vit" or "cnn"
  split: str = "pairing"                  # "pairing" (halves) or "masking" (zeroed half)
  actnorm: bool = False                   # per-dim affine before each coupling (Glow)
  invertible_dense: bool = False          # a learned D x D map before each coupling (Glow)

  def __post_init__(self):
    h, w, _ = self.image_shape
    if h % self.ps or w % self.ps:
      raise ValueError(f"Image size {h}x{w} is not divisible by the patch size "
                       f"ps={self.ps}: change the image size or the patch size.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {list(REMAT_POLICIES)}.")
    check_attention_impl(self.attention_impl)
    if self.backbone not in BACKBONES:
      raise ValueError(f"backbone={self.backbone!r}: use one of {list(BACKBONES)}.")
    if self.split not in SPLITS:
      raise ValueError(f"split={self.split!r}: use one of {SPLITS}.")

  @property
  def grid(self):  # (H/ps, W/ps, ps*ps*C)
    h, w, c = self.image_shape
    return h // self.ps, w // self.ps, self.ps * self.ps * c


def patchify(x, ps):
  return einops.rearrange(x, "B (h p) (w q) C -> B (h w) (p q C)", p=ps, q=ps)  # [B, N, D]


def unpatchify(x, ps, h):
  return einops.rearrange(x, "B (h w) (p q C) -> B (h p) (w q) C", p=ps, q=ps, h=h)


class DNN(nnx.Module):
  """Dense -> + posemb -> [cross-attention to context] -> ViT -> zero Dense.

  On the kept values [B, N, din] (din = D/2 when pairing, D when masking), the
  bias and raw scale [B, N, dout] of the transformed ones.
  """

  def __init__(self, cfg: JetConfig, din, dout, *, rngs):
    nh, nw, _ = cfg.grid
    dt, e = jnp.dtype(cfg.dtype), cfg.emb_dim
    self.init_proj = vit.Dense(din, e, axes=(_axis(din, cfg), "embed"), rngs=rngs, dtype=dt)
    self.posemb = vit.param(jax.nn.initializers.normal(1 / np.sqrt(e)), rngs.params(),
                            (1, nh * nw, e), (None, "tokens", "embed"))
    zeros = jax.nn.initializers.zeros
    self.cross = (vit.Attention(e, cfg.num_heads, rngs=rngs, out_init=zeros, dtype=dt,
                                implementation=cfg.attention_impl)
                  if cfg.num_classes else None)
    self.vit = vit.Encoder(e, cfg.block_depth, cfg.num_heads, rngs=rngs, dtype=dt,
                           attention_impl=cfg.attention_impl)
    # Scales and shifts: kept float32 (a small product that sets the logdet).
    self.final_proj = vit.Dense(e, 2 * dout, axes=("embed", "patch"), rngs=rngs,
                                kernel_init=jax.nn.initializers.zeros)

  def __call__(self, x1, context):  # [B, N, din] -> 2 x [B, N, dout]
    x = self.init_proj(x1) + self.posemb[...]                           # [B, N, E]
    if self.cross is not None:
      if context is None:
        raise ValueError("This Jet is class-conditional: pass context=jet.embed_labels(...).")
      x = x + self.cross(x, context)
    bias, raw_scale = jnp.split(self.final_proj(self.vit(x)), 2, -1)
    return bias, raw_scale


class CNN(nnx.Module):
  """The convolutional conditioning network of the Jet paper's ablation: on the token
  grid [nh, nw], a 3x3 convolution to emb_dim, `block_depth` residual blocks
  (LayerNorm, 3x3 conv, GELU, 3x3 conv), the class embedding added when
  conditional, and the same zero-initialised Dense as DNN's.

  Same contract as DNN. Pairing in a spatial coupling hands it the folded
  half-grid ([N, D/2]: token k of the half fills rows 2k and 2k+1), laid out
  as nh x nw, whose neighbours are not the image's; masking hands it the
  image's own grid with the transformed tokens zeroed.
  """

  def __init__(self, cfg: JetConfig, din, dout, *, rngs):
    self.nh, _, _ = cfg.grid
    dt, e = jnp.dtype(cfg.dtype), cfg.emb_dim
    self.init_conv = Conv(din, e, (_axis(din, cfg), "embed"), rngs=rngs, dtype=dt)
    self.blocks = nnx.List([
        nnx.Dict(norm=vit.LayerNorm(e, rngs=rngs),
                 conv1=Conv(e, e, ("embed", "mlp"), rngs=rngs, dtype=dt),
                 conv2=Conv(e, e, ("mlp", "embed"), rngs=rngs, dtype=dt))
        for _ in range(cfg.block_depth)])
    self.final_proj = vit.Dense(e, 2 * dout, axes=("embed", "patch"), rngs=rngs,
                                kernel_init=jax.nn.initializers.zeros)

  def __call__(self, x1, context):  # [B, N, din] -> 2 x [B, N, dout]
    grid = einops.rearrange(x1, "B (h w) D -> B h w D", h=self.nh)
    x = self.init_conv(grid)                                            # [B, h, w, E]
    if context is not None:
      x = x + context[:, :, None, :]                                    # [B, 1, 1, E]
    for block in self.blocks:
      x = x + block.conv2(jax.nn.gelu(block.conv1(block.norm(x))))
    out = self.final_proj(einops.rearrange(x, "B h w E -> B (h w) E"))
    bias, raw_scale = jnp.split(out, 2, -1)
    return bias, raw_scale


class Conv(nnx.Module):
  """A 3x3 SAME convolution without bias; `kernel` [3, 3, in, out] (decayed like Dense's)."""

  def __init__(self, din, dout, axes, *, rngs, dtype=jnp.float32):
    init = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    self.kernel = vit.param(init, rngs.params(), (3, 3, din, dout), (None, None) + axes)
    self.dtype = dtype

  def __call__(self, x):  # [B, h, w, in] -> [B, h, w, out]
    return precision.conv(x, self.kernel[...], self.dtype)


BACKBONES = {"vit": DNN, "cnn": CNN}
SPLITS = ("pairing", "masking")


def _axis(dim, cfg):
  """The logical name of a conditioning network's input dim: all D values or half."""
  return "patch" if dim == cfg.grid[2] else "half_patch"


def permute(x, perm):
  """x[:, perm] for a permutation `perm` of x's second axis."""
  return x.at[:, perm].get(unique_indices=True, mode="promise_in_bounds")


class ActNorm(nnx.Module):
  """y = (x + bias) * exp(log_scale) per token value [D] (Glow): the identity until
  `init_from` sets it to standardise a batch, as Glow's data-dependent init does."""

  def __init__(self, d):
    self.bias = nnx.Param(jnp.zeros((d,)), axes=("patch",))
    self.log_scale = nnx.Param(jnp.zeros((d,)), axes=("patch",))

  def init_from(self, x):  # x [B, N, D]
    mean = jnp.mean(x, axis=(0, 1))
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=(0, 1)))
    self.bias[...] = -mean
    self.log_scale[...] = -jnp.log(std + 1e-6)

  def __call__(self, x, inverse=False):  # [B, N, D] -> [B, N, D], logdet [B]
    s = self.log_scale[...]
    y = x * jnp.exp(-s) - self.bias[...] if inverse else (x + self.bias[...]) * jnp.exp(s)
    logdet = jnp.full((x.shape[0],), x.shape[1] * jnp.sum(s))
    return y, (-logdet if inverse else logdet)


class InvertibleDense(nnx.Module):
  """y = x @ W per token, W = L (U + diag(exp(log_s))) [D, D] (Glow's LU form, with
  the permutation left to the coupling's own split): log |det W| = sum(log_s).
  The identity at initialisation. `lower` and `upper` are stored whole and only
  their strict triangles used, so D (D + 1) of the parameters counted are idle."""

  def __init__(self, d):
    self.lower = nnx.Param(jnp.zeros((d, d)), axes=("patch", None))   # strict part used
    self.upper = nnx.Param(jnp.zeros((d, d)), axes=("patch", None))   # strict part used
    self.log_s = nnx.Param(jnp.zeros((d,)), axes=("patch",))

  def factors(self):
    d = self.log_s.shape[0]
    lower = jnp.tril(self.lower[...], -1) + jnp.eye(d)
    upper = jnp.triu(self.upper[...], 1) + jnp.diag(jnp.exp(self.log_s[...]))
    return lower, upper

  def __call__(self, x, inverse=False):  # [B, N, D] -> [B, N, D], logdet [B]
    lower, upper = self.factors()
    if inverse:  # W^-1 = U^-1 L^-1 by two triangular solves
      eye = jnp.eye(lower.shape[0])
      w = jax.scipy.linalg.solve_triangular(
          upper, jax.scipy.linalg.solve_triangular(lower, eye, lower=True), lower=False)
    else:
      w = jnp.matmul(lower, upper, precision=jax.lax.Precision.HIGHEST)
    # A small float32 map that must invert to round-off: HIGHEST, whatever the policy.
    y = jnp.einsum("bnd,de->bne", x, w, precision=jax.lax.Precision.HIGHEST)
    logdet = jnp.full((x.shape[0],), x.shape[1] * jnp.sum(self.log_s[...]))
    return y, (-logdet if inverse else logdet)


class Coupling(nnx.Module):
  """[ActNorm ->] [invertible dense ->] one affine coupling, whose split is a gather by a
  flat index (permutations.py): pairing transforms one half given the other; masking
  gives the conditioning network the whole grid with the transformed half zeroed."""

  def __init__(self, cfg: JetConfig, *, rngs):
    d = cfg.grid[2]
    self.masking = cfg.split == "masking"
    din, dout = (d, d) if self.masking else (d // 2, d // 2)
    self.dnn = BACKBONES[cfg.backbone](cfg, din, dout, rngs=rngs)
    self.scale_factor = cfg.scale_factor
    self.actnorm = ActNorm(d) if cfg.actnorm else None
    self.dense = InvertibleDense(d) if cfg.invertible_dense else None

  def __call__(self, x, perm, inv_perm, context=None, inverse=False):
    pre = [m for m in (self.actnorm, self.dense) if m is not None]  # applied in this order
    couple = self.masked if self.masking else self.paired
    logdet = jnp.zeros((x.shape[0],))
    if inverse:
      x, logdet = couple(x, perm, inv_perm, context, inverse=True)
      for m in reversed(pre):
        x, ld = m(x, inverse=True)
        logdet += ld
      return x, logdet
    for m in pre:
      x, ld = m(x)
      logdet += ld
    x, ld = couple(x, perm, inv_perm, context, inverse=False)
    return x, logdet + ld

  def affine(self, x2, bias, raw_scale, inverse):
    """x2 moved by the coupling, and the log-determinant of each element."""
    scale = jax.nn.sigmoid(raw_scale) * self.scale_factor
    logdet = jax.nn.log_sigmoid(raw_scale) + np.log(self.scale_factor)
    return (x2 / scale - bias if inverse else (x2 + bias) * scale), logdet

  def paired(self, x, perm, inv_perm, context, inverse):
    b, n, d = x.shape
    flat = permute(x.reshape(b, n * d), perm)                      # [B, N*D]
    x1, x2 = (h.reshape(b, n, d // 2) for h in jnp.split(flat, 2, axis=1))
    bias, raw_scale = self.dnn(x1, context)                        # [B, N, D/2] each
    x2, logdet = self.affine(x2, bias, raw_scale, inverse)
    flat = jnp.concatenate([x1.reshape(b, -1), x2.reshape(b, -1)], axis=1)
    x = permute(flat, inv_perm).reshape(b, n, d)                   # [B, N, D]
    logdet = jnp.sum(logdet, (1, 2))
    return x, (-logdet if inverse else logdet)

  def masked(self, x, perm, inv_perm, context, inverse):
    del perm
    b, n, d = x.shape
    # What pairing keeps, the split's first half, stays; the rest is transformed.
    keep = (inv_perm < n * d // 2).reshape(n, d)
    bias, raw_scale = self.dnn(jnp.where(keep, x, 0.0), context)   # [B, N, D] each
    moved, logdet = self.affine(x, bias, raw_scale, inverse)
    logdet = jnp.sum(jnp.where(keep, 0.0, logdet), (1, 2))
    return jnp.where(keep, x, moved), (-logdet if inverse else logdet)


class Jet(nnx.Module):
  """The flow. Class-conditional when cfg.num_classes > 0."""

  def __init__(self, cfg: JetConfig, *, rngs):
    self.cfg = cfg
    nh, nw, d = cfg.grid
    sched = permutations.schedule(cfg.depth, cfg.kinds, cfg.channel_projs, cfg.spatial_projs)
    perms = permutations.flat_permutations(rngs.params(), sched, nh, nw, d)
    self.perm = Frozen(perms, axes=("layers", None))
    self.inv_perm = Frozen(jnp.argsort(perms, axis=1).astype(jnp.int32), axes=("layers", None))

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_couplings(rngs):
      return Coupling(cfg, rngs=rngs)
    self.couplings = make_couplings(rngs)
    # The extra last row is the "no label" embedding for classifier-free guidance.
    self.class_embed = vit.param(
        jax.nn.initializers.normal(1 / np.sqrt(cfg.emb_dim)), rngs.params(),
        (cfg.num_classes + 1, cfg.emb_dim), ("classes", "embed")) if cfg.num_classes else None

  def embed_labels(self, labels, drop_key=None, drop_prob=0.0):
    """Context [B, 1, E] for labels [B]; drops labels with drop_prob for CFG."""
    if drop_key is not None and drop_prob > 0:
      drop = jax.random.bernoulli(drop_key, drop_prob, labels.shape)
      labels = jnp.where(drop, self.cfg.num_classes, labels)
    return self.class_embed[...][labels][:, None, :]

  def __call__(self, x, context=None):
    return self._flow(x, context, inverse=False)

  def inverse(self, z, context=None):
    return self._flow(z, context, inverse=True)

  def init_actnorm(self, x, context=None):
    """Glow's data-dependent init: each coupling's ActNorm set to standardise what reaches
    it when x [B, H, W, C] flows forward (the layers before it already set)."""
    if not self.cfg.actnorm:
      return
    graphdef, params = nnx.split(self.couplings)

    def body(h, layer):
      p, perm, inv_perm = layer
      coupling = nnx.merge(graphdef, p)
      coupling.actnorm.init_from(h)
      h, _ = coupling(h, perm, inv_perm, context)
      return h, (coupling.actnorm.bias[...], coupling.actnorm.log_scale[...])

    h = patchify(x.astype(jnp.float32), self.cfg.ps)                     # [B, N, D]
    _, (bias, log_scale) = jax.lax.scan(body, h, (params, self.perm[...], self.inv_perm[...]))
    self.couplings.actnorm.bias[...] = bias                               # [depth, D]
    self.couplings.actnorm.log_scale[...] = log_scale

  def _flow(self, x, context, inverse):  # [B, H, W, C] -> [B, H, W, C], [B]
    cfg = self.cfg
    if tuple(x.shape[1:]) != tuple(cfg.image_shape):
      raise ValueError(f"Jet built for images {tuple(cfg.image_shape)}, got {x.shape[1:]}.")
    graphdef, params = nnx.split(self.couplings)

    def body(h, layer):
      p, perm, inv_perm = layer
      return nnx.merge(graphdef, p)(h, perm, inv_perm, context, inverse)

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan)
    h = sharding.constrain_batch(patchify(x.astype(jnp.float32), cfg.ps))  # [B, N, D]
    layers = (params, self.perm[...], self.inv_perm[...])
    if cfg.scan:
      h, logdets = jax.lax.scan(body, h, layers, reverse=inverse)
    else:
      order = range(cfg.depth)[::-1] if inverse else range(cfg.depth)
      logdets = []
      for i in order:
        h, ld = body(h, jax.tree.map(lambda a: a[i], layers))
        logdets.append(ld)
    h = sharding.constrain_batch(h)
    return unpatchify(h, cfg.ps, cfg.grid[0]), jnp.sum(jnp.asarray(logdets), axis=0)
