"""The Jet paper's ablations: CNN backbone, masking split, ActNorm, invertible dense.

Each is checked as the flow itself is (test_jet.py): inverse(forward(x)) == x,
logdet == log |det J| from jax.jacfwd, identity at init, scan == unrolled;
then in a JetFormer's adaptor and, sharded, in a train step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetformer import objectives
from jetformer.models import gemma
from jetformer.models import jet as jet_lib
from jetformer.models import jetformer as jetformer_lib
from test_jet import images, make_jet

VARIANTS = {
    "cnn_channels": dict(backbone="cnn", kinds=("channels",)),
    "cnn_spatial": dict(backbone="cnn", kinds=("spatial", "channels")),
    "masking_channels": dict(split="masking", kinds=("channels",)),
    "masking_spatial": dict(split="masking", kinds=("spatial", "channels")),
    "masking_cnn": dict(split="masking", backbone="cnn", kinds=("spatial", "channels")),
    "actnorm": dict(actnorm=True),
    "invertible_dense": dict(invertible_dense=True),
    "all_conditional": dict(backbone="cnn", split="masking", actnorm=True,
                            invertible_dense=True, num_classes=3),
}


def layer(jet, i):
  """Coupling i of the stacked couplings, as a module of its own."""
  graphdef, params = nnx.split(jet.couplings)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))


def context(jet, batch=2):
  return jet.embed_labels(jnp.arange(batch) % 3) if jet.cfg.num_classes else None


@pytest.mark.parametrize("name", VARIANTS)
def test_inverse_roundtrip(name):
  jet = make_jet(**VARIANTS[name], spatial_projs=("vstripes", "checkerboard-inv"))
  x = images()
  z, logdet = jet(x, context(jet))
  x_rec, logdet_inv = jet.inverse(z, context(jet))
  assert float(jnp.abs(z - x).max()) > 1e-2
  np.testing.assert_allclose(x_rec, x, atol=3e-6)
  np.testing.assert_allclose(logdet_inv, -logdet, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_logdet_matches_jacobian(name):
  jet = make_jet(image_shape=(4, 4, 2), **VARIANTS[name], spatial_projs=("hstripes",))
  ctx = context(jet, batch=1)
  flat = lambda v: jet(v.reshape(1, 4, 4, 2), ctx)[0].reshape(-1)
  x = images((1, 4, 4, 2))
  jac = jax.jacfwd(flat)(x.reshape(-1))                      # [M, M]
  sign, expected = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert sign != 0
  np.testing.assert_allclose(jet(x, ctx)[1][0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_identity_at_init(name):
  jet = make_jet(perturb=0, **VARIANTS[name])
  x = images()
  z, logdet = jet(x, context(jet))
  np.testing.assert_array_equal(z, x)
  np.testing.assert_array_equal(logdet, 0.0)


@pytest.mark.parametrize("name", ["masking_cnn", "all_conditional"])
def test_scan_equals_unrolled(name):
  scanned = make_jet(depth=4, **VARIANTS[name])
  unrolled = make_jet(depth=4, scan=False, **VARIANTS[name])
  x = images()
  fwd = nnx.jit(lambda m, v: m(v, context(m)))
  for a, b in zip(fwd(scanned, x), fwd(unrolled, x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  loss = lambda m: jnp.sum(m(x, context(m))[0] ** 2) - jnp.sum(m(x, context(m))[1])
  grad = nnx.jit(nnx.grad(loss))
  for a, b in zip(jax.tree.leaves(grad(scanned)), jax.tree.leaves(grad(unrolled))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_actnorm_data_init_standardises_every_coupling_input():
  jet = make_jet(perturb=0.05, depth=3, actnorm=True)
  x = 3 * images((16, 8, 8, 3)) + 1
  jet.init_actnorm(x)
  h = jet_lib.patchify(x, jet.cfg.ps)
  for i in range(jet.cfg.depth):
    coupling = layer(jet, i)
    normed, _ = coupling.actnorm(h)                           # what the coupling sees
    np.testing.assert_allclose(normed.mean((0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(normed.std((0, 1)), 1.0, atol=1e-4)
    h, _ = coupling(h, jet.perm[...][i], jet.inv_perm[...][i])


def test_invertible_dense_logdet_is_its_matrix_determinant():
  dense = jet_lib.InvertibleDense(6)
  for p, k in zip((dense.lower, dense.upper, dense.log_s), jax.random.split(jax.random.key(0), 3)):
    p[...] = 0.3 * jax.random.normal(k, p.shape)
  lower, upper = dense.factors()
  w = np.asarray(lower @ upper, np.float64)
  x = images((2, 5, 6))
  y, logdet = dense(x)
  np.testing.assert_allclose(y, np.einsum("bnd,de->bne", x, w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logdet, 5 * np.linalg.slogdet(w)[1], rtol=1e-5)
  np.testing.assert_allclose(dense(y, inverse=True)[0], x, atol=1e-5)


def test_masking_transforms_only_the_second_half():
  jet = make_jet(depth=1, split="masking", kinds=("spatial",), spatial_projs=("hstripes",))
  x = images()
  z, _ = jet(x)
  rows = jnp.arange(8) // 2 % 2                               # 2x2 patches: token rows
  kept = rows[None, :, None, None] == 0                       # hstripes' first half: even rows
  np.testing.assert_array_equal(jnp.where(kept, z, 0), jnp.where(kept, x, 0))
  assert float(jnp.abs(jnp.where(kept, 0, z - x)).max()) > 1e-2


def test_jetformer_adaptor_with_every_ablation():
  jet = jet_lib.JetConfig(image_shape=(4, 4, 48), ps=1, depth=2, block_depth=1, emb_dim=32,
                          num_heads=2, kinds=("channels", "spatial"), backbone="cnn",
                          split="masking", actnorm=True, invertible_dense=True)
  dec = gemma.DecoderConfig(width=64, depth=1, mlp_dim=128, num_heads=2, num_kv_heads=1,
                            head_dim=32)
  model = jetformer_lib.JetFormer(jetformer_lib.JetFormerConfig(
      image_shape=(16, 16, 3), jet=jet, decoder=dec, patch_size=4, num_mixtures=3,
      vocab_size=10, latent_dim=16), rngs=nnx.Rngs(0))
  x = 2 * images((4, 16, 16, 3)) + 0.5
  objectives.init_actnorm(model, {"image": x}, jax.random.key(0), objectives.JetFormerObjective())
  grid, _ = model.adaptor_input(x)
  normed, _ = layer(model.jet, 0).actnorm(grid.reshape(4, 16, 48))
  # The init saw the batch dequantized (+ U[0, 1/127.5)), which moves the std a little.
  np.testing.assert_allclose(normed.std((0, 1)), 1.0, atol=5e-3)
  soft, factored, _ = model.encode(x)
  np.testing.assert_allclose(model.decode(soft, factored), x, atol=3e-6)


@pytest.mark.parametrize("dtype,operand", [("bfloat16", "bf16"), ("float32", "f32")])
def test_cnn_convolutions_follow_the_precision_policy(dtype, operand):
  graphdef, state = nnx.split(make_jet(backbone="cnn", dtype=dtype, perturb=0))
  text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, images()).as_text()
  convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  operands = [re.search(r": \((.*)\) -> tensor", c).group(1).split(", ") for c in convs]
  assert operands and all(t.endswith(f"x{operand}>") for ts in operands for t in ts), operands
