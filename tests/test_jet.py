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
  # hidden layer is [1, 2, 16, 4 * emb], q, k, v [1, 2, 16, heads, head_dim],
  # the input, attention-output and MLP-output layers [1, 2, 16, emb]
  assert ("f32[1,2,16,64]" in saved) == saves_hidden
  assert saved.count("f32[1,2,16,2,8]") == 3
  assert saved.count("f32[1,2,16,16]") == 3


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


def test_bad_patch_size_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    jet_lib.JetConfig(image_shape=(10, 10, 3), ps=4)
