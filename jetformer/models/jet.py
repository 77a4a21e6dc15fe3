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

  def __post_init__(self):
    h, w, _ = self.image_shape
    if h % self.ps or w % self.ps:
      raise ValueError(f"Image size {h}x{w} is not divisible by the patch size "
                       f"ps={self.ps}: change the image size or the patch size.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {list(REMAT_POLICIES)}.")
    check_attention_impl(self.attention_impl)

  @property
  def grid(self):  # (H/ps, W/ps, ps*ps*C)
    h, w, c = self.image_shape
    return h // self.ps, w // self.ps, self.ps * self.ps * c


def patchify(x, ps):
  return einops.rearrange(x, "B (h p) (w q) C -> B (h w) (p q C)", p=ps, q=ps)  # [B, N, D]


def unpatchify(x, ps, h):
  return einops.rearrange(x, "B (h w) (p q C) -> B (h p) (w q) C", p=ps, q=ps, h=h)


class DNN(nnx.Module):
  """Dense -> + posemb -> [cross-attention to context] -> ViT -> zero Dense."""

  def __init__(self, cfg: JetConfig, *, rngs):
    nh, nw, d = cfg.grid
    dt, e = jnp.dtype(cfg.dtype), cfg.emb_dim
    self.init_proj = vit.Dense(d // 2, e, axes=("half_patch", "embed"), rngs=rngs, dtype=dt)
    self.posemb = vit.param(jax.nn.initializers.normal(1 / np.sqrt(e)), rngs.params(),
                            (1, nh * nw, e), (None, "tokens", "embed"))
    zeros = jax.nn.initializers.zeros
    self.cross = (vit.Attention(e, cfg.num_heads, rngs=rngs, out_init=zeros, dtype=dt,
                                implementation=cfg.attention_impl)
                  if cfg.num_classes else None)
    self.vit = vit.Encoder(e, cfg.block_depth, cfg.num_heads, rngs=rngs, dtype=dt,
                           attention_impl=cfg.attention_impl)
    # Scales and shifts: kept float32 (a small product that sets the logdet).
    self.final_proj = vit.Dense(e, d, axes=("embed", "patch"), rngs=rngs,
                                kernel_init=jax.nn.initializers.zeros)

  def __call__(self, x1, context):  # [B, N, D/2] -> 2 x [B, N, D/2]
    x = self.init_proj(x1) + self.posemb[...]                           # [B, N, E]
    if self.cross is not None:
      if context is None:
        raise ValueError("This Jet is class-conditional: pass context=jet.embed_labels(...).")
      x = x + self.cross(x, context)
    bias, raw_scale = jnp.split(self.final_proj(self.vit(x)), 2, -1)
    return bias, raw_scale


def permute(x, perm):
  """x[:, perm] for a permutation `perm` of x's second axis."""
  return x.at[:, perm].get(unique_indices=True, mode="promise_in_bounds")


class Coupling(nnx.Module):
  """One affine coupling; the split is a gather by a flat index (permutations.py)."""

  def __init__(self, cfg: JetConfig, *, rngs):
    self.dnn = DNN(cfg, rngs=rngs)
    self.scale_factor = cfg.scale_factor

  def __call__(self, x, perm, inv_perm, context=None, inverse=False):
    b, n, d = x.shape
    flat = permute(x.reshape(b, n * d), perm)                      # [B, N*D]
    x1, x2 = (h.reshape(b, n, d // 2) for h in jnp.split(flat, 2, axis=1))
    bias, raw_scale = self.dnn(x1, context)                        # [B, N, D/2] each
    scale = jax.nn.sigmoid(raw_scale) * self.scale_factor
    logdet = jnp.sum(jax.nn.log_sigmoid(raw_scale) + np.log(self.scale_factor), (1, 2))
    x2 = x2 / scale - bias if inverse else (x2 + bias) * scale
    flat = jnp.concatenate([x1.reshape(b, -1), x2.reshape(b, -1)], axis=1)
    x = permute(flat, inv_perm).reshape(b, n, d)                   # [B, N, D]
    return x, (-logdet if inverse else logdet)


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
