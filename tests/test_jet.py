"""Jet: invertibility, exact log-determinant, identity at init, scan == unrolled."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from jetformer.models import jet as jet_lib

PATTERNS = ["checkerboard", "vstripes", "hstripes"]
PATTERNS += [p + "-inv" for p in PATTERNS]


def make_jet(seed=0, perturb=0.05, **kw):
  cfg = dict(image_shape=(8, 8, 3), ps=2, depth=3, block_depth=1, emb_dim=16, num_heads=2)
  jet = jet_lib.Jet(jet_lib.JetConfig(**{**cfg, **kw}), rngs=nnx.Rngs(seed))
  if perturb:  # move off the identity init so the test is not vacuous
    params = nnx.state(jet, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [a + perturb * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    nnx.update(jet, jax.tree.unflatten(tree, leaves))
  return jet


def images(shape=(2, 8, 8, 3), seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


@pytest.mark.parametrize("kinds,pattern", [(("channels",), "checkerboard")] +
                         [(("spatial",), p) for p in PATTERNS])
def test_inverse_roundtrip(kinds, pattern):
  jet = make_jet(kinds=kinds, spatial_projs=(pattern,))
  x = images()
  z, logdet = jet(x)
  x_rec, logdet_inv = jet.inverse(z)
  assert float(jnp.abs(z - x).max()) > 1e-2
  np.testing.assert_allclose(x_rec, x, atol=2e-6)
  np.testing.assert_allclose(logdet_inv, -logdet, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kinds", [("channels", "spatial"), ("spatial", "channels")])
def test_logdet_matches_jacobian(kinds):
  jet = make_jet(image_shape=(4, 4, 2), kinds=kinds, spatial_projs=("hstripes", "vstripes-inv"))
  x = images((1, 4, 4, 2))
  flat = lambda v: jet(v.reshape(1, 4, 4, 2))[0].reshape(-1)
  jac = jax.jacfwd(flat)(x.reshape(-1))                      # [M, M]
  _, logdet = jet(x)
  sign, expected = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert sign != 0
  np.testing.assert_allclose(logdet[0], expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_matmuls_still_invert_exactly():
  # The conditioning network computes one function in both directions, so
  # bfloat16 matmuls change the flow a little but not its invertibility.
  jet32, jet16 = make_jet(), make_jet(dtype="bfloat16")
  x = images()
  z, logdet = jet16(x)
  x_rec, logdet_inv = jet16.inverse(z)
  np.testing.assert_allclose(x_rec, x, atol=2e-6)
  np.testing.assert_allclose(logdet_inv, -logdet, rtol=1e-5, atol=1e-5)
  z32, logdet32 = jet32(x)
  assert 1e-6 < float(jnp.abs(z - z32).max()) < 2e-2
  np.testing.assert_allclose(logdet, logdet32, rtol=2e-2, atol=2e-2)


def test_identity_at_init():
  jet = make_jet(perturb=0)
  x = images()
  z, logdet = jet(x)
  np.testing.assert_array_equal(z, x)
  np.testing.assert_array_equal(logdet, 0.0)


@pytest.mark.parametrize("remat", list(jet_lib.REMAT_POLICIES))
def test_scan_equals_unrolled(remat):
  scanned = make_jet(depth=4, remat=remat)
  unrolled = make_jet(depth=4, remat=remat, scan=False)
  x = images()
  fwd = nnx.jit(lambda m, v: m(v))
  for a, b in zip(fwd(scanned, x), fwd(unrolled, x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  loss = lambda m: jnp.sum(m(x)[0] ** 2) - jnp.sum(m(x)[1])
  grad = nnx.jit(nnx.grad(loss))
  ga, gb = grad(scanned), grad(unrolled)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat,saves_hidden", [("dots", True), ("dots_except_mlp_hidden", False)])
def test_remat_policy_saves_the_dense_products(remat, saves_hidden, capsys):
  graphdef, params = nnx.split(make_jet(depth=1, remat=remat))
  f = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)[0])
  print_saved_residuals(f, params, images())  # the only public listing of what a policy saves
  saved = capsys.readouterr().out
  # 2 images of 16 tokens, stacked over the one coupling by the scan: the MLP's
  # hidden layer is [1, 32, 4 * emb], q, k, v and the other layers [1, 32, emb]
  assert ("f32[1,32,64]" in saved) == saves_hidden
  assert saved.count("f32[1,32,16]") == 6


def test_class_conditional_uses_label():
  jet = make_jet(num_classes=5)
  x = images()
  ctx = lambda labels: jet.embed_labels(jnp.asarray(labels))
  z0, _ = jet(x, ctx([0, 0]))
  z1, _ = jet(x, ctx([1, 1]))
  assert float(jnp.abs(z0 - z1).max()) > 1e-3
  x_rec, _ = jet.inverse(z1, ctx([1, 1]))
  np.testing.assert_allclose(x_rec, x, atol=2e-6)
  dropped = jet.embed_labels(jnp.asarray([0, 1]), jax.random.key(0), drop_prob=1.0)
  np.testing.assert_array_equal(dropped, jnp.broadcast_to(jet.class_embed[...][5], (2, 1, 16)))


def test_splits_are_permutations_with_stated_halves():
  from jetformer.models import permutations
  for pattern, (nh, nw) in itertools.product(PATTERNS, [(4, 4), (2, 6)]):
    idx1, idx2 = permutations.spatial_halves(pattern, nh, nw)
    assert sorted(np.concatenate([idx1, idx2]).tolist()) == list(range(nh * nw))
  rows, cols = np.divmod(permutations.spatial_halves("checkerboard", 4, 4)[0], 4)
  assert np.all((rows + cols) % 2 == 0)
  assert np.all(permutations.spatial_halves("hstripes-inv", 4, 4)[0] // 4 % 2 == 1)


def test_permute_differentiates_by_gathers():
  """Same derivatives as the plain gather, both modes, without its scatter-add transpose."""
  x, g = jax.random.normal(jax.random.key(0), (2, 3, 12))
  perm = jax.random.permutation(jax.random.key(1), 12).astype(jnp.int32)
  inv_perm = jnp.argsort(perm).astype(jnp.int32)
  for f in (lambda x: jet_lib.permute(x, perm, inv_perm), lambda x: x[:, perm]):
    np.testing.assert_array_equal(f(x), x[:, perm])
    np.testing.assert_array_equal(jax.jvp(f, (x,), (g,))[1], g[:, perm])
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(f(x) * g))(x), g[:, inv_perm])
  loss = lambda x: jnp.sum(jnp.tanh(jet_lib.permute(x, perm, inv_perm)))
  assert "scatter" not in jax.jit(jax.grad(loss)).lower(x).compile().as_text()


@pytest.mark.parametrize("inverse", [False, True])
def test_flow_derivatives_match_plain_gathers(inverse, monkeypatch):
  """The couplings pass perm and inv_perm to permute in the right order."""
  jet, x = make_jet(), images()
  def derivatives():
    f = lambda x: (jet.inverse if inverse else jet)(x)[0]
    return jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x), jax.jvp(f, (x,), (jnp.cos(x),))[1]
  expected = derivatives()
  monkeypatch.setattr(jet_lib, "permute", lambda x, perm, inv_perm: x[:, perm])
  for a, b in zip(expected, derivatives()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,context_len,products", [(4, 6, (8, 6)), (4, 1, (8, 6)),
                                                         (3, 6, (6, 6))])
def test_attention_head_groups_compute_the_same(dtype, heads, context_len, products, monkeypatch):
  """XLA:CPU's two groups of heads (one where H is odd) against one: values and gradients."""
  from jetformer.models import precision, vit
  monkeypatch.setattr(precision, "xla_cpu", lambda: True)
  attn = vit.Attention(12, heads, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
  x, c = (jax.random.normal(jax.random.key(i), (2, n, 12)) for i, n in ((1, 6), (2, context_len)))
  def run(groups):
    monkeypatch.setattr(vit, "CPU_HEAD_GROUPS", groups)
    f = lambda x, c: attn(x, c)  # a new function: make_jaxpr caches by function
    count = str(jax.make_jaxpr(f)(x, c)).count("dot_general")  # 4 projections + 2 per group
    return count, f(x, c), *jax.grad(lambda x, c: jnp.sum(jnp.sin(f(x, c))), (0, 1))(x, c)
  (n2, *grouped), (n1, *whole) = run(2), run(1)
  assert (n2, n1) == products
  for a, b in zip(grouped, whole):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_patch_size_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    jet_lib.JetConfig(image_shape=(10, 10, 3), ps=4)
