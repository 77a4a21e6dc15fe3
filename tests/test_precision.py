"""precision.matmul: the policy's dot algorithm in the forward and both backward products,
float32 results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jetformer.models import precision


# x [..., M, K] @ w [K, N]: a dense layer on 2-D and on 3-D activations.
@pytest.fixture(params=[(), (3,)], ids=["2d", "3d"])
def operands(request):
  """(x, w, g) with g the cotangent of x @ w."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  lead = request.param
  return (jax.random.normal(kx, (*lead, 64, 48)), jax.random.normal(kw, (48, 32)),
          jax.random.normal(kg, (*lead, 64, 32)))


def test_every_product_of_the_gradient_runs_at_the_policy_algorithm(operands):
  """Forward, input-gradient and weight-gradient products: bfloat16 operands, float32
  accumulation and result, wherever the backend has such products."""
  x, w, g = operands
  loss = lambda x, w: jnp.sum(jnp.tanh(precision.matmul(x, w, "bfloat16")) * g)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3
  for e in dots:
    assert e.params["precision"] == jax.lax.DotAlgorithmPreset.BF16_BF16_F32, e
    assert e.params["preferred_element_type"] == jnp.float32
  dx, dw = jax.grad(loss, (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32


def test_unknown_dtype_is_a_clear_error(operands):
  x, w, _ = operands
  with pytest.raises(ValueError, match="matmuls run in one of"):
    precision.matmul(x, w, "float16")


def test_contracting_two_axes_is_the_flattened_product():
  """The attention output projection: [B, T, H, Dh] x [H, Dh, D]."""
  y, w = (jax.random.normal(jax.random.key(i), s) for i, s in ((0, (2, 5, 3, 4)), (1, (3, 4, 6))))
  np.testing.assert_allclose(precision.matmul(y, w, contract=2),
                             y.reshape(2, 5, 12) @ w.reshape(12, 6), rtol=1e-6, atol=1e-6)


def test_remat_policies_see_the_forward_product(operands, capsys):
  x, w, g = operands
  f = jax.checkpoint(lambda x, w: jnp.sum(jnp.tanh(precision.matmul(x, w, "bfloat16"))),
                     policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  print_saved_residuals(f, x, w)  # the only public listing of what a policy saves
  # the product is saved, not recomputed
  assert f"f32[{','.join(map(str, g.shape))}] output of dot_general" in capsys.readouterr().out


def test_float32_is_the_plain_matmul(operands):
  x, w, _ = operands
  np.testing.assert_array_equal(precision.matmul(x, w), jnp.matmul(x, w))
