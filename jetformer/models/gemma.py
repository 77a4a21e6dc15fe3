"""A Gemma-v1-style decoder stack: the JetFormer transformer (docs/method.md, section 2.3).

Pre-RMSNorm blocks of grouped-query attention (1 KV head = multi-query) with
RoPE, and a GeGLU MLP; residual dropout; a final RMSNorm. Token embedding and
the output heads belong to the caller: `Decoder` maps [B, T, D] embeddings to
[B, T, D] features. Layers are stacked on a leading `layers` axis (nnx.vmap)
and run with `lax.scan` or unrolled, with a remat policy, as in `jet.Jet`.

Parameter axes name the unstacked layer; `sharding.spec_for` prepends
"layers" for the stacked ones, as for the Jet couplings.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jetformer.models import jet
from jetformer.models import precision
from jetformer.models import vit

# The decoder names none of its products, so the policies that pick by name do not apply.
REMAT_POLICIES = {k: jet.REMAT_POLICIES[k] for k in ("none", "full", "dots")}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  width: int = 256
  depth: int = 4
  mlp_dim: int = 1024
  num_heads: int = 4
  num_kv_heads: int = 1          # 1: multi-query; num_heads: multi-head; between: grouped-query
  head_dim: int = 64
  dropout: float = 0.0
  remat: str = "dots"            # a key of REMAT_POLICIES
  scan: bool = True
  dtype: str = "float32"         # matmul operands (precision.py) and KV cache; params float32
  rope_max_wavelength: float = 10_000.0
  attention_impl: str | None = None  # jax.nn.dot_product_attention's: None (XLA), "cudnn"

  def __post_init__(self):
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (1: multi-query; "
                       f"num_heads: multi-head).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates two halves.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {list(REMAT_POLICIES)}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must be in [0, 1).")
    jet.check_attention_impl(self.attention_impl)


def lecun(in_axis, out_axis, batch_axis=()):
  return jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


def apply_rope(x, positions, max_wavelength):
  """Rotate-half RoPE: x [B, T, N, Dh], positions [B, T] -> [B, T, N, Dh]."""
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angle = positions[..., None].astype(jnp.float32) / timescale     # [B, T, Dh/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)            # [B, T, N, Dh/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + 1e-6) * (1 + scale), scale initialised to zeros (Gemma)."""

  def __init__(self, dim, *, rngs):
    del rngs
    self.scale = nnx.Param(jnp.zeros((dim,)), axes=("embed",))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * (1.0 + self.scale[...])


class Attention(nnx.Module):
  """Grouped-query attention with RoPE; no biases.

  Split in `project` (x -> q, k, v) and `attend` (q against any k, v) so that a
  KV cache can slot in between: decoding writes this step's k, v into the
  cache and attends against the whole cache with a [B, T, S_cache] mask.
  """

  def __init__(self, cfg: DecoderConfig, *, rngs):
    d, n, kv, dh = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.query = vit.param(lecun(0, (1, 2)), rngs.params(), (d, n, dh),
                           ("embed", "heads", "head_dim"))
    self.key = vit.param(lecun(0, (1, 2)), rngs.params(), (d, kv, dh),
                         ("embed", "kv_heads", "head_dim"))
    self.value = vit.param(lecun(0, (1, 2)), rngs.params(), (d, kv, dh),
                           ("embed", "kv_heads", "head_dim"))
    self.out = vit.param(lecun((0, 1), 2), rngs.params(), (n, dh, d),
                         ("heads", "head_dim", "embed"))
    self.dtype = jnp.dtype(cfg.dtype)
    self.max_wavelength = cfg.rope_max_wavelength
    self.implementation = cfg.attention_impl

  def project(self, x, positions):
    """x [B, T, D] -> q [B, T, N, Dh], k, v [B, T, K, Dh] in `dtype`, q and k RoPE'd."""
    q = precision.matmul(x, self.query[...], self.dtype)
    k = precision.matmul(x, self.key[...], self.dtype)
    v = precision.matmul(x, self.value[...], self.dtype)
    q = apply_rope(q, positions, self.max_wavelength)
    k = apply_rope(k, positions, self.max_wavelength)
    return q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype)

  def attend(self, q, k, v, mask):
    """q [B, T, N, Dh], k, v [B, S, K, Dh], mask [B, T, S] -> [B, T, D].

    Query head n reads KV head n // (N/K); logits scaled by 1/sqrt(Dh). A fully
    masked row (a padding query) gets a uniform softmax, not NaNs.
    """
    y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                     mask=mask[:, None], implementation=self.implementation)
    return precision.matmul(y, self.out[...], self.dtype, contract=2)  # [B, T, D]

  def __call__(self, x, positions, mask):
    return self.attend(*self.project(x, positions), mask)


class MlpBlock(nnx.Module):
  """GeGLU: (gelu_tanh(x @ W_gate) * (x @ W_up)) @ W_down; gating [2, D, F] as in Gemma."""

  def __init__(self, cfg: DecoderConfig, *, rngs):
    d, f = cfg.width, cfg.mlp_dim
    self.gating = vit.param(lecun(1, 2, batch_axis=0), rngs.params(), (2, d, f),
                            (None, "embed", "mlp"))
    self.linear = vit.param(lecun(0, 1), rngs.params(), (f, d), ("mlp", "embed"))
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    w = self.gating[...]
    gate = jax.nn.gelu(precision.matmul(x, w[0], self.dtype), approximate=True)  # [B, T, F]
    up = precision.matmul(x, w[1], self.dtype)                                   # [B, T, F]
    return precision.matmul(gate * up, self.linear[...], self.dtype)


class Block(nnx.Module):
  """x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

  def __init__(self, cfg: DecoderConfig, *, rngs):
    self.pre_attention_norm = RMSNorm(cfg.width, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.pre_ffw_norm = RMSNorm(cfg.width, rngs=rngs)
    self.mlp = MlpBlock(cfg, rngs=rngs)
    self.dropout_rate = cfg.dropout

  def cached(self, x, positions, mask, k_cache, v_cache, layer, end):
    """This block in `Decoder.extend`: writes its k, v into the stacked caches
    [L, B, S, K, Dh] at (layer, slot end) in place, attends to its whole layer.
    -> (x [B, T, D], k_cache, v_cache)."""
    q, k, v = self.attn.project(self.pre_attention_norm(x), positions)
    at = (layer, 0, end, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
    x = x + self.attn.attend(q, k_cache[layer], v_cache[layer], mask)
    return x + self.mlp(self.pre_ffw_norm(x)), k_cache, v_cache

  def __call__(self, x, positions, mask, dropout_key=None):
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x = x + dropout(self.attn(self.pre_attention_norm(x), positions, mask),
                    self.dropout_rate, keys[0])
    return x + dropout(self.mlp(self.pre_ffw_norm(x)), self.dropout_rate, keys[1])


class Cache(NamedTuple):
  """Keys and values of every layer for S slots, filled left to right by `Decoder.extend`."""
  k: jax.Array         # [L, B, S, K, Dh]
  v: jax.Array         # [L, B, S, K, Dh]
  valid: jax.Array     # [B, S] bool: slot holds a real (not padding) token
  end: jax.Array       # [] int32: slots filled so far
  next_pos: jax.Array  # [B] int32: RoPE position of the next real token


def init_cache(cfg: DecoderConfig, batch, size):
  """An empty cache of `size` slots: at least the prompt plus every token to be decoded
  (a write past the end is clamped by dynamic_update_slice and would overwrite slots)."""
  shape = (cfg.depth, batch, size, cfg.num_kv_heads, cfg.head_dim)
  return Cache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype),
               jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32),
               jnp.zeros((batch,), jnp.int32))


def extend_mask(valid, end, t, bidirectional=0):
  """[B, T, S]: new token t (slot end+t) sees valid slots <= end+t; optionally the first
  `bidirectional` new tokens see each other (a non-causal prefix)."""
  s = jnp.arange(valid.shape[1])
  q = end + jnp.arange(t)                                          # [T] query slots
  mask = s[None, :] <= q[:, None]
  if bidirectional:
    group = (q < end + bidirectional)[:, None] & (s >= end) & (s < end + bidirectional)
    mask |= group
  return mask[None] & valid[:, None, :]


class Decoder(nnx.Module):
  """`depth` Blocks stacked on a leading axis, and the final RMSNorm."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return Block(cfg, rngs=rngs)
    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.width, rngs=rngs)

  def __call__(self, x, positions, mask, dropout_key=None):
    """x [B, T, D] float32 embeddings, positions [B, T] int32, mask [B, T, S] bool
    (True where query t may attend key s) -> [B, T, D] after the final RMSNorm.
    dropout_key None = deterministic (no dropout)."""
    cfg = self.cfg
    if x.shape[-1] != cfg.width:
      raise ValueError(f"Decoder built for width {cfg.width}, got inputs {x.shape}.")
    graphdef, params = nnx.split(self.layers)

    def body(h, layer):
      p, i = layer
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      return nnx.merge(graphdef, p)(h, positions, mask, key), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan)
    h = x.astype(jnp.float32)
    index = jnp.arange(cfg.depth, dtype=jnp.int32)
    if cfg.scan:
      h, _ = jax.lax.scan(body, h, (params, index))
    else:
      for i in range(cfg.depth):
        h, _ = body(h, jax.tree.map(lambda a: a[i], (params, index)))
    return self.final_norm(h)

  def extend(self, x, valid, cache: Cache, bidirectional=0):
    """Appends T tokens to the cache and returns their features (no dropout, no remat).

    x [B, T, D] embeddings, valid [B, T] bool (False: padding, e.g. in a batch of
    prompts of different lengths; it takes a slot but no position and is never
    attended to). Prefill a prompt with one call, then decode with T=1.
    `bidirectional`: the first that many new tokens attend to each other (the
    non-causal prefix option). -> (h [B, T, D] after the final norm, cache).
    """
    t = x.shape[1]
    valid = valid.astype(bool)
    positions = cache.next_pos[:, None] + jnp.cumsum(valid, 1) - 1           # [B, T]
    slots = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.end, 1)
    mask = extend_mask(slots, cache.end, t, bidirectional)                  # [B, T, S]
    graphdef, params = nnx.split(self.layers)

    def body(carry, layer):  # the caches ride in the carry: updated in place
      (h, k, v), (p, i) = carry, layer
      return nnx.merge(graphdef, p).cached(h, positions, mask, k, v, i, cache.end), None

    index = jnp.arange(self.cfg.depth, dtype=jnp.int32)
    (h, k, v), _ = jax.lax.scan(body, (x.astype(jnp.float32), cache.k, cache.v),
                                (params, index))
    cache = Cache(k, v, slots, cache.end + t, cache.next_pos + jnp.sum(valid, 1))
    return self.final_norm(h), cache
