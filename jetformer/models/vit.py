"""Pre-LayerNorm ViT blocks: the conditioning network inside each Jet coupling.

Parameter layouts follow flax.linen's `MultiHeadDotProductAttention`,
`LayerNorm` and `Dense` (as used by big_vision's `vit.Encoder`), so that
reference weights load one to one (see `jetformer/convert/big_vision.py`).
Every parameter carries logical axis names in its `axes` metadata; the
sharding rules of a study map them onto the mesh (`jetformer/sharding.py`).
"""

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
    y = checkpoint_name(precision.matmul(x, self.kernel[...], self.dtype), self.name)
    return y + self.bias[...]


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
  """Multi-head attention with biases; q/k/v kernels [D, H, Dh], out [H, Dh, D].

  `implementation` goes to `jax.nn.dot_product_attention`: None (XLA) or
  "cudnn" (fused kernels on NVIDIA GPUs).
  """

  def __init__(self, dim, num_heads, *, rngs, out_init=None, dtype=jnp.float32,
               implementation=None):
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
    self.dtype = jnp.dtype(dtype)
    self.implementation = implementation

  def _proj(self, p, x):  # [B, T, D] -> [B, T, H, Dh]
    y = checkpoint_name(precision.matmul(x, p["kernel"][...], self.dtype), ATTENTION_PROJ)
    return (y + p["bias"][...]).astype(self.dtype)

  def __call__(self, x, context):  # [B, T, D], [B, S, D] -> [B, T, D]
    q = self._proj(self.query, x)        # [B, T, H, Dh]
    k = self._proj(self.key, context)    # [B, S, H, Dh]
    v = self._proj(self.value, context)  # [B, S, H, Dh]
    y = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = precision.matmul(y, self.out["kernel"][...], self.dtype, contract=2)  # [B, T, D]
    return checkpoint_name(out, ATTENTION_PROJ) + self.out["bias"][...]


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

  def __init__(self, dim, num_heads, *, rngs, dtype=jnp.float32, attention_impl=None):
    self.LayerNorm_0 = LayerNorm(dim, rngs=rngs)
    self.MultiHeadDotProductAttention_0 = Attention(dim, num_heads, rngs=rngs, dtype=dtype,
                                                    implementation=attention_impl)
    self.LayerNorm_1 = LayerNorm(dim, rngs=rngs)
    self.MlpBlock_0 = MlpBlock(dim, 4 * dim, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    y = self.LayerNorm_0(x)
    x = x + self.MultiHeadDotProductAttention_0(y, y)
    return x + self.MlpBlock_0(self.LayerNorm_1(x))


class Encoder(nnx.Module):
  """`depth` blocks and a final LayerNorm (block_depth is small: unrolled)."""

  def __init__(self, dim, depth, num_heads, *, rngs, dtype=jnp.float32, attention_impl=None):
    self.blocks = nnx.List([EncoderBlock(dim, num_heads, rngs=rngs, dtype=dtype,
                                         attention_impl=attention_impl)
                            for _ in range(depth)])
    self.encoder_norm = LayerNorm(dim, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.encoder_norm(x)
