"""precision.dot: bfloat16 operands in the forward and both backward products, float32 results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jetformer.models import precision


def bf16(a):  # the bfloat16 value of a, as float64
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


# [M, K] x [K, N]: on XLA:CPU the weight gradient transposes x when K <= N, else g.
@pytest.fixture(params=[(64, 48, 32), (64, 32, 48)], ids=["K>N", "K<=N"])
def operands(request):
  m, k, n = request.param
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n)),
          jax.random.normal(kg, (m, n)))


@pytest.fixture(params=["xla_cpu", "other"])
def backend(request, monkeypatch):
  """Both gradient paths of precision.dot: hand-written for XLA:CPU, and JAX's own."""
  monkeypatch.setattr(precision, "_xla_cpu", lambda: request.param == "xla_cpu")
  return request.param


def test_forward_is_the_bfloat16_product_accumulated_in_float32(operands):
  x, w, _ = operands
  out = precision.dot(x, w, jnp.bfloat16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, bf16(x) @ bf16(w), rtol=1e-5, atol=1e-5)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.abs(np.asarray(out) - exact).max() > 1e-3  # not the float32 product


def test_gradients_are_bfloat16_products(operands, backend):
  x, w, g = operands
  dx, dw = jax.grad(lambda x, w: jnp.sum(precision.dot(x, w, jnp.bfloat16) * g), (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.float32
  # Each gradient is the product of bfloat16 operands (accumulated in float32),
  # rounded once to bfloat16: within half a bfloat16 ulp of the exact product.
  for grad, ref in ((dx, bf16(g) @ bf16(w).T), (dw, bf16(x).T @ bf16(g))):
    np.testing.assert_array_equal(grad, bf16(grad))
    np.testing.assert_allclose(grad, ref, rtol=2**-8, atol=1e-6)
  xd, wd, gd = (np.asarray(a, np.float64) for a in (x, w, g))
  for grad, exact in ((dx, gd @ wd.T), (dw, xd.T @ gd)):
    np.testing.assert_allclose(grad, exact, rtol=3e-2, atol=0.1)


def test_every_product_of_the_gradient_takes_bfloat16_operands(operands, backend):
  x, w, g = operands
  loss = lambda x, w: jnp.sum(jnp.tanh(precision.dot(x, w, "bfloat16")) * g)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  # forward, input gradient, weight gradient (on XLA:CPU also the transposing product)
  assert len(dots) == {"xla_cpu": 4, "other": 3}[backend]
  for e in dots:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    assert e.params["preferred_element_type"] == jnp.float32


def test_remat_policies_see_the_forward_product(operands, backend, capsys):
  x, w, _ = operands
  f = jax.checkpoint(lambda x, w: jnp.sum(jnp.tanh(precision.dot(x, w, "bfloat16"))),
                     policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  print_saved_residuals(f, x, w)  # the only public listing of what a policy saves
  # the product is saved, not recomputed
  assert f"f32[{x.shape[0]},{w.shape[1]}] output of dot_general" in capsys.readouterr().out


def test_batched_operands_forward_and_gradient_shape(operands):
  q = jax.random.normal(jax.random.key(1), (2, 3, 8, 16))
  k = jax.random.normal(jax.random.key(2), (2, 3, 16, 8))
  np.testing.assert_allclose(precision.dot(q, k, jnp.bfloat16), bf16(q) @ bf16(k),
                             rtol=1e-5, atol=1e-5)
  dq = jax.grad(lambda q: jnp.sum(precision.dot(q, k, jnp.bfloat16)))(q)
  assert dq.shape == q.shape and dq.dtype == jnp.float32


def test_float32_is_the_plain_matmul(operands):
  x, w, _ = operands
  np.testing.assert_array_equal(precision.dot(x, w), jnp.matmul(x, w))
