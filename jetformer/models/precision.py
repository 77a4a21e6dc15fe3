"""Matmuls with low-precision operands and float32 results, forward and backward.

`dot(x, y, "bfloat16")` multiplies bfloat16 copies of its operands with
float32 accumulation and a float32 result, and casts the incoming gradient to
bfloat16, so that the two backward products (input and weight gradients) are
bfloat16 x bfloat16 -> float32 as well; JAX then rounds each gradient to the
operand dtype, bfloat16, once. Close to a float32 matmul at a TPU's default
precision (which keeps the gradients in float32). On XLA:CPU with AVX512-BF16
these products run up to twice as fast as float32 ones, but only with a float32
result (a bfloat16 result takes a slow path) and only if both operands are
bfloat16: JAX's own backward would multiply the float32 cotangent, which
promotes the product back to float32. Hence the hand-written cast of the
cotangent.
"""

import functools

import jax
import jax.numpy as jnp


# A cotangent of another dtype than its primal: JAX 0.10 accepts this for
# float dtypes (`_temporary_dtype_exception` in custom_derivatives.py);
# tests/test_precision.py fails loudly if a later JAX stops accepting it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cotangent_as(y, dtype):
  """Identity whose cotangent is cast to `dtype` (forward-mode autodiff is not defined)."""
  return y


def _cotangent_as_fwd(y, dtype):
  del dtype
  return y, None


def _cotangent_as_bwd(dtype, _, g):
  return (g.astype(dtype),)


_cotangent_as.defvjp(_cotangent_as_fwd, _cotangent_as_bwd)


def dot(x, y, dtype=jnp.float32):
  """jnp.matmul(x, y) with `dtype` operands in all three products; float32 result.

  dtype float32 is the plain matmul (at the platform's default precision).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.matmul(x, y)
  out = jnp.matmul(x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)
  return _cotangent_as(out, dtype)
