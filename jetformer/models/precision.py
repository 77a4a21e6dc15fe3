"""Matmuls with low-precision operands and float32 results, and gradients shaped for XLA:CPU.

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

On XLA:CPU, the products get hand-written gradients as well. The gradient of
the right operand, x^T g, contracts the major axis of both operands; YNNPACK
takes no such product, so XLA upcasts it to float32 and runs it in Eigen at
~110 GFLOP/s. Here it is a canonical bfloat16 product (~200 GFLOP/s in a train
step) on a row-major transposed copy of the narrower operand (`_transposed`).
Products batched over leading axes (attention) are treated alike; their
operands must be row-major (XLA:CPU also upcasts a product whose operand is a
transposed view), hence `y_transposed` for x @ y^T instead of a transposed y.
Jet train steps run 1.1-1.17x faster for the dense layers, 1.04-1.11x more for
attention, and 1.03-1.12x more for the cheaper transposed copy (bench/RESULTS.md).

`add_broadcast` is the one non-product here: an add whose gradient XLA:CPU
would otherwise reduce slowly.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


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


def _mm(a, b, nt=False):
  """a @ b (nt: a @ b^T) over the last two axes, batched over the leading ones; float32 result."""
  batch = tuple(range(a.ndim - 2))
  contract = ((a.ndim - 1,), (b.ndim - 1 if nt else b.ndim - 2,))
  return lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=jnp.float32)


def _transposed(a):
  """[..., M, D] -> [..., D, M]: a row-major copy, which XLA:CPU multiplies in bfloat16.

  JAX's transpose is a view (a transposed layout), and a bfloat16 product that
  takes a view is upcast to float32 before XLA picks layouts. Flattened, the
  view must be copied into row-major order; the barrier keeps XLA from folding
  the reshapes, and then the transpose, back into the product. The copy is one
  pass over memory.
  """
  t = jnp.swapaxes(a, -1, -2)
  return lax.optimization_barrier(t.reshape(*t.shape[:-2], -1)).reshape(t.shape)


def _tn(a, b):
  """a^T @ b for a [..., M, P], b [..., M, Q] -> [..., P, Q], float32.

  Both operands contract their major axis, which YNNPACK does not take; this
  copies the narrower one transposed and runs a canonical product.
  """
  if a.shape[-1] <= b.shape[-1]:
    return _mm(_transposed(a), b)
  # (b^T a)^T; the barrier keeps XLA from folding the final transpose into the product.
  return lax.optimization_barrier(_mm(_transposed(b), a)).swapaxes(-1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _with_cpu_gradients(x, y, out, nt):
  """`out` = x @ y (nt: x @ y^T), with the gradients formed for XLA:CPU.

  The product itself is taken outside, so that remat policies which save dot
  outputs see a dot_general (a custom VJP's outputs are opaque to them).
  """
  del x, y
  return out


def _with_cpu_gradients_fwd(x, y, out, nt):
  del nt
  return out, (x, y)


def _with_cpu_gradients_bwd(nt, res, g):  # x [.., M, K], y [.., K, N] (nt: [.., N, K])
  x, y = res
  g = g.astype(x.dtype)
  dx = _mm(g, y, nt=not nt)                # [..., M, K]
  dy = _tn(g, x) if nt else _tn(x, g)     # [..., N, K] or [..., K, N]
  return dx.astype(x.dtype), dy.astype(y.dtype), None


_with_cpu_gradients.defvjp(_with_cpu_gradients_fwd, _with_cpu_gradients_bwd)


def xla_cpu():
  """Whether the XLA:CPU forms here (and vit.Attention's head groups) apply: by the default backend."""
  return jax.default_backend() == "cpu"


def add_broadcast(x, p):
  """x + p, for p [1, ...] broadcast over the leading (batch) axis of x [B, ...].

  p's gradient is a sum over the batch. As the transpose of a broadcast, that
  is a reduction of a short axis into a wide output, which YNNPACK runs
  slowly: J-64's position embeddings ([16, 256, 256] -> [256, 256]) took
  85 ms of a profiled 4.2 s step. So on one XLA:CPU device the broadcast is a
  concatenation of B copies, whose transpose sums B contiguous slices in one
  loop fusion: 3 ms (J-small's [32, 64, 256]: 5 ms, against 2 for the
  reduction). A product with ones was worse: XLA fused the cotangent's whole
  backward into the product's transposed copy of it (14% of a J-small step).
  Under a mesh of several devices, which split the batch, XLA would gather
  the slices onto every device first: there it is the plain add.
  """
  assert p.shape[0] == 1 and p.ndim == x.ndim, (x.shape, p.shape)
  if not xla_cpu() or jax.sharding.get_abstract_mesh().size > 1:
    return x + p
  return x + jnp.concatenate([p] * x.shape[0])


def dot(x, y, dtype=jnp.float32, *, y_transposed=False):
  """x @ y (y_transposed: x @ y^T) with `dtype` operands in all three products; float32 result.

  Batched over leading axes that x and y share. dtype float32 is the plain
  matmul (at the platform's default precision).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return _mm(x, y, nt=y_transposed)
  x, y = x.astype(dtype), y.astype(dtype)
  if xla_cpu():
    out = _mm(lax.stop_gradient(x), lax.stop_gradient(y), nt=y_transposed)
    return _with_cpu_gradients(x, y, out, y_transposed)
  return _cotangent_as(_mm(x, y, nt=y_transposed), dtype)
