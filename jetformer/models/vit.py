"""Pre-LayerNorm ViT blocks: the conditioning network inside each Jet coupling.

Parameter layouts follow flax.linen's `MultiHeadDotProductAttention`,
`LayerNorm` and `Dense` (as used by big_vision's `vit.Encoder`), so that
reference weights load one to one (see `jetformer/convert/big_vision.py`).
Every parameter carries logical axis names in its `axes` metadata; the
sharding rules of a study map them onto the mesh (`jetformer/sharding.py`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jetformer.models import precision

xavier = jax.nn.initializers.xavier_uniform()

# Names of the dense products' outputs, for remat policies that pick by name
# (jet.REMAT_POLICIES): every 2-D product here carries one.
MLP_HIDDEN = "mlp_hidden"  # the MLP's first layer, 4x wider than the rest
ATTENTION_PROJ = "attention_proj"  # the query, key, value and output projections
CPU_HEAD_GROUPS = 2  # attention's groups of heads on XLA:CPU: the 2 cores measured (4: no faster)


def param(init, key, shape, axes, dtype=jnp.float32):
  """An `nnx.Param` with logical axis names, one per dimension."""
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(init(key, shape, dtype), axes=axes)


class Dense(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out]; the product is named `name` for remat."""

  def __init__(self, din, dout, *, axes, rngs, kernel_init=None,
               bias_init=jax.nn.initializers.zeros, dtype=jnp.float32, name="dense"):
    kernel_init = kernel_init or jax.nn.initializers.lecun_normal()
    self.kernel = param(kernel_init, rngs.params(), (din, dout), axes)
    self.bias = param(bias_init, rngs.params(), (dout,), axes[1:])
    self.dtype = dtype
    self.name = name

  def __call__(self, x):  # [..., in] -> [..., out]
    # A 2-D matmul: XLA:CPU runs the backward of a 3-D dot_general several
    # times slower than that of the same product on flattened rows.
    k = self.kernel[...]
    y = checkpoint_name(precision.dot(x.reshape(-1, k.shape[0]), k, self.dtype), self.name)
    return (y + self.bias[...]).reshape(*x.shape[:-1], k.shape[1])


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, epsilon 1e-6 as in flax.linen."""

  def __init__(self, dim, *, rngs, eps=1e-6):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,)), axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,)), axes=("embed",))
    self.eps = eps

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Attention(nnx.Module):
  """Multi-head attention with biases; q/k/v kernels [D, H, Dh], out [H, Dh, D]."""

  def __init__(self, dim, num_heads, *, rngs, out_init=None, dtype=jnp.float32):
    if dim % num_heads:
      raise ValueError(f"emb_dim {dim} must be divisible by num_heads {num_heads}")
    hd = dim // num_heads
    qkv_axes = ("embed", "heads", "head_dim")

    def kernel_init(key, shape, dtype):  # xavier on the flattened [D, H*Dh] matrix
      return xavier(key, (shape[0], np.prod(shape[1:])), dtype).reshape(shape)

    for name in ("query", "key", "value"):
      setattr(self, name, nnx.Dict(
          kernel=param(kernel_init, rngs.params(), (dim, num_heads, hd), qkv_axes),
          bias=nnx.Param(jnp.zeros((num_heads, hd)), axes=qkv_axes[1:])))
    out_init = out_init or (lambda k, s, d: kernel_init(k, s[::-1], d).reshape(s))
    self.out = nnx.Dict(
        kernel=param(out_init, rngs.params(), (num_heads, hd, dim),
                     ("heads", "head_dim", "embed")),
        bias=nnx.Param(jnp.zeros((dim,)), axes=("embed",)))
    self.dtype = dtype

  def _proj(self, p, x):  # [B, T, D] -> [B, T, H, Dh], as a 2-D matmul (see Dense)
    k = p["kernel"][...]
    y = precision.dot(x.reshape(-1, k.shape[0]), k.reshape(k.shape[0], -1), self.dtype)
    y = checkpoint_name(y, ATTENTION_PROJ)
    return y.reshape(*x.shape[:-1], *k.shape[1:]) + p["bias"][...]

  def __call__(self, x, context):  # [B, T, D], [B, S, D] -> [B, T, D]
    q = self._proj(self.query, x)        # [B, T, H, Dh]
    k = self._proj(self.key, context)    # [B, S, H, Dh]
    v = self._proj(self.value, context)  # [B, S, H, Dh]
    q = q / np.sqrt(q.shape[-1]).astype(q.dtype)
    # XLA:CPU runs each batched product on one core, and independent products
    # at once: groups of heads keep the cores busy (bench/RESULTS.md). Fewer
    # groups where H does not divide (odd H: one). The slices stay local as
    # long as no study shards the heads axis (none does).
    h = q.shape[2]
    groups = math.gcd(h, CPU_HEAD_GROUPS) if precision.xla_cpu() else 1
    g = h // groups                                                 # heads per group
    y = jnp.concatenate([self._attend(*(a[:, :, i:i + g] for a in (q, k, v)))
                         for i in range(0, h, g)], axis=1)          # [B, H, T, Dh]
    y = y.transpose(0, 2, 1, 3)                                     # [B, T, H, Dh]
    w = self.out["kernel"][...]                                     # [H, Dh, D]
    w = w.reshape(-1, w.shape[2])
    out = checkpoint_name(precision.dot(y.reshape(-1, w.shape[0]), w, self.dtype), ATTENTION_PROJ)
    return out.reshape(*y.shape[:2], -1) + self.out["bias"][...]

  def _attend(self, q, k, v):  # [B, T, G, Dh], [B, S, G, Dh] x2 -> [B, G, T, Dh]
    # Heads-major batched matmuls: XLA:CPU runs these ~5x faster than the
    # equivalent einsums over [B, T, H, Dh] operands. Flattened to 3-D after the
    # transpose, so that the operands are row-major: XLA:CPU runs bfloat16
    # products on transposed layouts in float32.
    b, t, g, hd = q.shape
    q, k, v = (a.transpose(0, 2, 1, 3).reshape(b * g, -1, hd)
               for a in (q, k, v))                                  # q [BG, T, Dh], k/v [BG, S, Dh]
    logits = precision.dot(q, k, self.dtype, y_transposed=True)     # [BG, T, S]
    probs = jax.nn.softmax(logits, axis=-1)
    return precision.dot(probs, v, self.dtype).reshape(b, g, t, hd)


class MlpBlock(nnx.Module):
  """Dense -> GELU (tanh approximation, flax's default) -> Dense."""

  def __init__(self, dim, mlp_dim, *, rngs, dtype=jnp.float32):
    tiny = jax.nn.initializers.normal(1e-6)
    self.Dense_0 = Dense(dim, mlp_dim, axes=("embed", "mlp"), rngs=rngs,
                         kernel_init=xavier, bias_init=tiny, dtype=dtype, name=MLP_HIDDEN)
    self.Dense_1 = Dense(mlp_dim, dim, axes=("mlp", "embed"), rngs=rngs,
                         kernel_init=xavier, bias_init=tiny, dtype=dtype, name="mlp_out")

  def __call__(self, x):
    return self.Dense_1(jax.nn.gelu(self.Dense_0(x)))


class EncoderBlock(nnx.Module):
  """x + MHSA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, dim, num_heads, *, rngs, dtype=jnp.float32):
    self.LayerNorm_0 = LayerNorm(dim, rngs=rngs)
    self.MultiHeadDotProductAttention_0 = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
    self.LayerNorm_1 = LayerNorm(dim, rngs=rngs)
    self.MlpBlock_0 = MlpBlock(dim, 4 * dim, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    y = self.LayerNorm_0(x)
    x = x + self.MultiHeadDotProductAttention_0(y, y)
    return x + self.MlpBlock_0(self.LayerNorm_1(x))


class Encoder(nnx.Module):
  """`depth` blocks and a final LayerNorm (block_depth is small: unrolled)."""

  def __init__(self, dim, depth, num_heads, *, rngs, dtype=jnp.float32):
    self.blocks = nnx.List([EncoderBlock(dim, num_heads, rngs=rngs, dtype=dtype)
                            for _ in range(depth)])
    self.encoder_norm = LayerNorm(dim, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.encoder_norm(x)
