"""precision.matmul: operands in the policy's dtype in the forward and both backward
products, float32 accumulation and results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jetformer.models import precision


def bf16(a):  # the bfloat16 value of a, as float64
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def t(a):  # swap the last two axes
  return np.swapaxes(a, -1, -2)


# x [..., M, K] @ w [K, N]: a dense layer on 2-D and on 3-D activations.
@pytest.fixture(params=[(), (3,)], ids=["2d", "3d"])
def operands(request):
  """(x, w, g) with g the cotangent of x @ w."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  lead = request.param
  return (jax.random.normal(kx, (*lead, 64, 48)), jax.random.normal(kw, (48, 32)),
          jax.random.normal(kg, (*lead, 64, 32)))


def test_forward_is_the_bfloat16_product_accumulated_in_float32(operands):
  x, w, _ = operands
  out = precision.matmul(x, w, jnp.bfloat16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, bf16(x) @ bf16(w), rtol=1e-5, atol=1e-5)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.abs(np.asarray(out) - exact).max() > 1e-3  # not the float32 product


def test_gradients_are_bfloat16_products(operands):
  x, w, g = operands
  dx, dw = jax.grad(lambda x, w: jnp.sum(precision.matmul(x, w, jnp.bfloat16) * g), (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32
  # Each gradient is the product of bfloat16 operands (accumulated in float32),
  # rounded once to bfloat16: within half a bfloat16 ulp of that product.
  xs, gs = bf16(x).reshape(-1, 48), bf16(g).reshape(-1, 32)
  for grad, ref in ((dx, bf16(g) @ t(bf16(w))), (dw, t(xs) @ gs)):
    np.testing.assert_array_equal(grad, bf16(grad))
    np.testing.assert_allclose(grad, ref, rtol=2**-8, atol=1e-6)


def test_every_product_of_the_gradient_takes_bfloat16_operands(operands):
  x, w, g = operands
  loss = lambda x, w: jnp.sum(jnp.tanh(precision.matmul(x, w, "bfloat16")) * g)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3  # forward, input gradient, weight gradient
  for e in dots:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    assert e.params["preferred_element_type"] == jnp.float32


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
