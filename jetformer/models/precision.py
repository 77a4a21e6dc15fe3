"""The precision policy: float32 parameters and activations, matmuls at the study's dtype.

`matmul(x, w, dtype)` is one `dot_general` whose dot algorithm is the policy:
for "bfloat16" XLA rounds both operands to bfloat16 and accumulates in float32
(`BF16_BF16_F32`, the MXU's and the tensor cores' native product), with a
float32 result (`preferred_element_type`). JAX keeps the algorithm when it
transposes a product, so both backward products (input and weight gradients)
run the same way, with no cast of the cotangent by hand. This is also what
`jax.nn.dot_product_attention` asks of its products for bfloat16 inputs.
"float32" is the plain product at the platform's default precision. A backend
without bfloat16 products (XLA:CPU) computes them in float32: the same code
runs everywhere, and only accelerators round.

What stays float32 whatever the dtype is the caller's choice: the Jet
couplings' scale/shift projection, the logdet, norms, softmax and the
likelihoods.
"""

import jax.numpy as jnp
from jax import lax

ALGORITHMS = {"float32": None, "bfloat16": lax.DotAlgorithmPreset.BF16_BF16_F32}


def algorithm(dtype):
  """The dot algorithm of a policy dtype ("float32" or "bfloat16")."""
  name = jnp.dtype(dtype).name
  if name not in ALGORITHMS:
    raise ValueError(f"dtype={name!r}: matmuls run in one of {list(ALGORITHMS)}.")
  return ALGORITHMS[name]


def matmul(x, w, dtype=jnp.float32, contract=1):
  """x [..., I1..Ic] @ w [I1..Ic, O...] -> [..., O...] float32, at `dtype`'s algorithm.

  `contract` is the number of trailing axes of x (leading axes of w) summed over.
  """
  dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
  return lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dims,
                         precision=algorithm(dtype), preferred_element_type=jnp.float32)


def conv(x, w, dtype=jnp.float32):
  """SAME convolution x [B, H, W, I] * w [kh, kw, I, O] -> [B, H, W, O] float32.

  lax.conv_general_dilated takes no dot algorithm (it reads one as DEFAULT), so
  for "bfloat16" the operands are cast and the result accumulates in float32
  (`preferred_element_type`): the same product as `matmul`'s on accelerators.
  Unlike `matmul` on XLA:CPU, the rounding to bfloat16 then happens there too.
  """
  operand = jnp.bfloat16 if algorithm(dtype) is not None else jnp.float32
  return lax.conv_general_dilated(
      x.astype(operand), w.astype(operand), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
