"""precision.dot: bfloat16 operands in the forward and both backward products, float32 results;
precision.add_broadcast: the add, with a gradient XLA:CPU sums without a reduction."""

import re

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


# [..., M, K] x [..., K, N], y given as is or transposed ([..., N, K]). On XLA:CPU
# the weight gradient transposes x when K <= N, else g; batched products are
# what attention multiplies.
@pytest.fixture(params=[(64, 48, 32), (64, 32, 48)], ids=["K>N", "K<=N"])
def shape(request):
  return request.param


@pytest.fixture(params=[(), (3,)], ids=["2d", "batched"])
def batch(request):
  return request.param


@pytest.fixture(params=[False, True], ids=["x@y", "x@y^T"])
def y_transposed(request):
  return request.param


@pytest.fixture
def operands(shape, batch, y_transposed):
  """(x, y, g, dot) with dot(x, y, dtype) the product under test and y as passed to it."""
  m, k, n = shape
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  y = jax.random.normal(kw, (*batch, n, k) if y_transposed else (*batch, k, n))
  dot = lambda a, b, dtype=jnp.float32: precision.dot(a, b, dtype, y_transposed=y_transposed)
  return (jax.random.normal(kx, (*batch, m, k)), y, jax.random.normal(kg, (*batch, m, n)), dot)


def as_kn(y, y_transposed):  # y as [..., K, N]
  return t(y) if y_transposed else y


@pytest.fixture(params=["xla_cpu", "other"])
def backend(request, monkeypatch):
  """Both paths of precision.py: hand-written for XLA:CPU, and JAX's own."""
  monkeypatch.setattr(precision, "xla_cpu", lambda: request.param == "xla_cpu")
  return request.param


def test_forward_is_the_bfloat16_product_accumulated_in_float32(operands, y_transposed):
  x, y, _, dot = operands
  out = dot(x, y, jnp.bfloat16)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, bf16(x) @ as_kn(bf16(y), y_transposed), rtol=1e-5, atol=1e-5)
  exact = np.asarray(x, np.float64) @ as_kn(np.asarray(y, np.float64), y_transposed)
  assert np.abs(np.asarray(out) - exact).max() > 1e-3  # not the float32 product


def test_gradients_are_bfloat16_products(operands, backend, y_transposed):
  x, y, g, dot = operands
  dx, dy = jax.grad(lambda x, y: jnp.sum(dot(x, y, jnp.bfloat16) * g), (0, 1))(x, y)
  assert dx.dtype == dy.dtype == jnp.float32
  # Each gradient is the product of bfloat16 operands (accumulated in float32),
  # rounded once to bfloat16: within half a bfloat16 ulp of the exact product.
  yk = as_kn(bf16(y), y_transposed)
  dy_kn = as_kn(np.asarray(dy), y_transposed)
  for grad, ref in ((dx, bf16(g) @ t(yk)), (dy_kn, t(bf16(x)) @ bf16(g))):
    np.testing.assert_array_equal(grad, bf16(grad))
    np.testing.assert_allclose(grad, ref, rtol=2**-8, atol=1e-6)
  xd, gd = np.asarray(x, np.float64), np.asarray(g, np.float64)
  yd = as_kn(np.asarray(y, np.float64), y_transposed)
  for grad, exact in ((dx, gd @ t(yd)), (dy_kn, t(xd) @ gd)):
    np.testing.assert_allclose(grad, exact, rtol=3e-2, atol=0.1)


def test_every_product_of_the_gradient_takes_bfloat16_operands(operands, backend):
  x, y, g, dot = operands
  loss = lambda x, y: jnp.sum(jnp.tanh(dot(x, y, "bfloat16")) * g)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, y)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3  # forward, input gradient, weight gradient
  for e in dots:
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    assert e.params["preferred_element_type"] == jnp.float32


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's passes")
def test_xla_cpu_keeps_every_product_of_the_gradient_in_bfloat16(operands, monkeypatch):
  """After XLA's passes, not only in the jaxpr: XLA:CPU upcasts a product on a transposed view."""
  x, y, g, dot = operands
  monkeypatch.setattr(precision, "xla_cpu", lambda: True)
  loss = lambda x, y: jnp.sum(jnp.tanh(dot(x, y, "bfloat16")) * g)
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, y).compile().as_text()
  dtypes = dict(re.findall(r"%?([\w.\-]+) = (\w+)\[", hlo))  # instruction -> dtype
  dots = re.findall(r"\bdot\(%?([\w.\-]+), %?([\w.\-]+)\)", hlo)
  assert len(dots) == 3, hlo
  upcast = [d for d in dots if [dtypes[o] for o in d] != ["bf16", "bf16"]]
  assert not upcast, hlo


def test_remat_policies_see_the_forward_product(operands, backend, capsys):
  x, y, g, dot = operands
  f = jax.checkpoint(lambda x, y: jnp.sum(jnp.tanh(dot(x, y, "bfloat16"))),
                     policy=jax.checkpoint_policies.dots_saveable)
  print_saved_residuals(f, x, y)  # the only public listing of what a policy saves
  # the product is saved, not recomputed
  assert f"f32[{','.join(map(str, g.shape))}] output of dot_general" in capsys.readouterr().out


def test_float32_is_the_plain_matmul(operands, y_transposed):
  x, y, _, dot = operands
  np.testing.assert_array_equal(dot(x, y), jnp.matmul(x, as_kn(y, y_transposed)))


def test_add_broadcast_is_the_add_with_its_gradients(backend):
  kx, kp, kg = jax.random.split(jax.random.key(0), 3)
  x, p, g = (jax.random.normal(k, s) for k, s in ((kx, (5, 7, 3)), (kp, (1, 7, 3)), (kg, (5, 7, 3))))
  np.testing.assert_array_equal(precision.add_broadcast(x, p), x + p)
  dx, dp = jax.grad(lambda x, p: jnp.sum(precision.add_broadcast(x, p) * g), (0, 1))(x, p)
  np.testing.assert_array_equal(dx, g)
  np.testing.assert_allclose(dp, g.sum(0, keepdims=True), rtol=1e-6, atol=1e-6)
  _, tangent = jax.jvp(lambda p: precision.add_broadcast(x, p), (p,), (g[:1],))  # forward mode too
  np.testing.assert_array_equal(tangent, jnp.broadcast_to(g[:1], x.shape))


def test_xla_cpu_sums_the_broadcast_gradient_without_a_reduction(monkeypatch):
  """A reduction over the batch axis is what XLA:CPU runs slowly."""
  monkeypatch.setattr(precision, "xla_cpu", lambda: True)
  x, p = jnp.ones((16, 8, 4)), jnp.ones((1, 8, 4))
  loss = lambda x, p: jnp.sum(jnp.tanh(precision.add_broadcast(x, p)))
  hlo = jax.jit(jax.grad(loss, 1)).lower(x, p).compile().as_text()
  assert not re.search(r"\breduce\(", hlo), hlo


def test_add_broadcast_under_a_mesh_gathers_nothing(monkeypatch):
  """With the batch split over devices, the gradient is one all-reduce, not an all-gather."""
  monkeypatch.setattr(precision, "xla_cpu", lambda: True)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  x = jax.device_put(jnp.ones((16, 8, 4)), jax.NamedSharding(mesh, jax.P("data")))
  loss = lambda x, p: jnp.sum(jnp.tanh(precision.add_broadcast(x, p)))
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, 1)).lower(x, jnp.ones((1, 8, 4))).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" in hlo, hlo
