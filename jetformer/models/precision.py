"""The precision policy: float32 parameters, matmul operands in the study's dtype,
float32 accumulation and results.

`matmul(x, w, dtype)` casts both operands to `dtype` and asks XLA for a
float32 result (`preferred_element_type`), as MaxText's and flax's dense
layers do. Its backward products take `dtype` operands as well: the incoming
float32 cotangent is cast to `dtype` first, otherwise JAX would multiply it
with the `dtype` operand and promote both backward products to float32
(on a GPU, two thirds of a layer's FLOPs at the float32 or TF32 rate). Each
gradient is then rounded to the operand dtype once. With `dtype` float32 this
is the plain product at the platform's default precision.

What stays float32 whatever the dtype is the caller's choice: the Jet
couplings' scale/shift projection, the logdet, norms, softmax and the
likelihoods.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


# A cotangent of another dtype than its primal: JAX accepts this for float
# dtypes (`_temporary_dtype_exception` in custom_derivatives.py);
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


def matmul(x, w, dtype=jnp.float32, contract=1):
  """x [..., I1..Ic] @ w [I1..Ic, O...] -> [..., O...] float32, operands in `dtype`.

  `contract` is the number of trailing axes of x (leading axes of w) summed over.
  """
  dtype = jnp.dtype(dtype)
  dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
  y = lax.dot_general(x.astype(dtype), w.astype(dtype), dims,
                      preferred_element_type=jnp.float32)
  return y if dtype == jnp.float32 else _cotangent_as(y, dtype)
