"""Matmuls with low-precision operands and float32 results, forward and backward.

`dot(x, y, "bfloat16")` multiplies bfloat16 copies of its operands with
float32 accumulation and result, and casts the incoming gradient to bfloat16,
so that the two backward products (input and weight gradients) are bfloat16 x
bfloat16 -> float32 as well. That is what a float32 matmul at default precision
computes on a TPU, where the reference implementation runs. On XLA:CPU with
AVX512-BF16 these products run up to twice as fast as float32 ones, but only
with a float32 result (a bfloat16 result takes a slow path) and only if both
operands are bfloat16: JAX's own backward would multiply the float32 cotangent,
which promotes the product back to float32. Hence the hand-written cast of the
cotangent. Each gradient leaves a product rounded to bfloat16.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cotangent_as(y, dtype):
  """Identity whose cotangent is cast to `dtype` (forward-mode autodiff is not defined)."""
  return y


_cotangent_as.defvjp(lambda y, dtype: (y, None), lambda dtype, _, g: (g.astype(dtype),))


def dot(x, y, dtype=jnp.float32):
  """jnp.matmul(x, y) with `dtype` operands in all three products; float32 result."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.matmul(x, y)
  out = jnp.matmul(x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)
  return _cotangent_as(out, dtype)
