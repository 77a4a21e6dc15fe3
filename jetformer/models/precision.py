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

On XLA:CPU, 2-D products get hand-written gradients as well. The weight
gradient x^T g contracts the major dimension of both operands; YNNPACK takes no
such product, so XLA upcasts it to float32 and runs it in Eigen at ~110
GFLOP/s. Here it is a canonical bfloat16 product (~200 GFLOP/s in a train
step) on a transposed copy of the narrower operand, made exactly by a product
with the identity, which YNNPACK runs faster than XLA's transpose, and which XLA
cannot fold back into the weight gradient as it folds a transpose. Jet train steps
run 1.1-1.17x faster (bench/RESULTS.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NN = (((1,), (0,)), ((), ()))  # dot_general dimension numbers of x @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y.T


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


def _transposed(a):  # [M, D] -> [D, M], exactly (one nonzero term per sum)
  eye = jnp.eye(a.shape[1], dtype=a.dtype)
  return lax.dot_general(eye, a, _NT, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def _with_cpu_gradients(x, y, out):
  """`out` = x @ y, with the gradients of x @ y formed for XLA:CPU.

  The product itself is taken outside, so that remat policies which save dot
  outputs see a dot_general (a custom VJP's outputs are opaque to them).
  """
  del x, y
  return out


def _with_cpu_gradients_fwd(x, y, out):
  return out, (x, y)


def _with_cpu_gradients_bwd(res, g):  # x [M, K], y [K, N], g [M, N]
  x, y = res
  g = g.astype(x.dtype)
  dx = lax.dot_general(g, y, _NT, preferred_element_type=jnp.float32)             # [M, K]
  if y.shape[0] <= y.shape[1]:
    dy = lax.dot_general(_transposed(x), g, _NN, preferred_element_type=jnp.float32)  # [K, N]
  else:  # dy^T = g^T x; the barrier keeps XLA from folding the final transpose into it
    dy_t = lax.dot_general(_transposed(g), x, _NN, preferred_element_type=jnp.float32)
    dy = lax.optimization_barrier(dy_t).T                                          # [K, N]
  return dx.astype(x.dtype), dy.astype(y.dtype), None


_with_cpu_gradients.defvjp(_with_cpu_gradients_fwd, _with_cpu_gradients_bwd)


def _xla_cpu():
  return jax.default_backend() == "cpu"


def dot(x, y, dtype=jnp.float32):
  """jnp.matmul(x, y) with `dtype` operands in all three products; float32 result.

  dtype float32 is the plain matmul (at the platform's default precision).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.matmul(x, y)
  x, y = x.astype(dtype), y.astype(dtype)
  if x.ndim == y.ndim == 2 and _xla_cpu():
    out = jnp.matmul(lax.stop_gradient(x), lax.stop_gradient(y), preferred_element_type=jnp.float32)
    return _with_cpu_gradients(x, y, out)
  return _cotangent_as(jnp.matmul(x, y, preferred_element_type=jnp.float32), dtype)
