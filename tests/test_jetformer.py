"""JetFormer model and loss: the GMM head against scipy, causality and the placement of
both orders' outputs, text padding, the pre-projections, the noise curriculum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jetformer import objectives
from jetformer.models import gemma, gmm
from jetformer.models import jet as jet_lib
from jetformer.models import jetformer as jf

L, N = 4, 16   # text slots, image tokens (16x16 images, patch 4)


def make(pca_path="", **kw):
  jet = jet_lib.JetConfig(image_shape=(4, 4, 48), ps=1, depth=2, block_depth=1, emb_dim=32,
                          num_heads=2, kinds=("channels",))
  dec = gemma.DecoderConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1,
                            head_dim=32)
  cfg = jf.JetFormerConfig(image_shape=(16, 16, 3), jet=jet, decoder=dec, patch_size=4,
                           num_mixtures=3, vocab_size=10, pca_path=pca_path,
                           **{"latent_dim": 16, **kw})
  model = jf.JetFormer(cfg, rngs=nnx.Rngs(0))
  # Non-zero heads, so that every output depends on its inputs.
  rng = np.random.default_rng(1)
  for dense in (model.head.proj,):
    dense.kernel[...] = jnp.asarray(rng.normal(0, 0.05, dense.kernel.shape), jnp.float32)
  return model


def inputs(b=2, seed=0):
  rng = np.random.default_rng(seed)
  text = jnp.asarray(rng.integers(0, 10, (b, L)), jnp.int32)
  soft = jnp.asarray(rng.normal(size=(b, N, 16)), jnp.float32)
  return text, jnp.ones((b, L), jnp.int32), soft


def random_mixture(rng, lead, k, d):
  return gmm.Mixture(jnp.asarray(rng.normal(size=lead + (k,)), jnp.float32),
                     jnp.asarray(rng.normal(size=lead + (k, d)), jnp.float32),
                     jnp.asarray(rng.uniform(0.3, 2.0, lead + (k, d)), jnp.float32))


@pytest.mark.parametrize("k", [1, 4])
def test_gmm_log_prob_matches_scipy(k):
  rng = np.random.default_rng(0)
  mix = random_mixture(rng, (2, 3), k, 5)
  x = rng.normal(size=(2, 3, 5)).astype(np.float32)
  got = gmm.log_prob(mix, jnp.asarray(x))                          # [2, 3]
  w = np.exp(mix.logits) / np.exp(mix.logits).sum(-1, keepdims=True)
  want = np.zeros((2, 3))
  for i in np.ndindex(2, 3):
    dens = [w[i][c] * stats.multivariate_normal.pdf(
        x[i], np.asarray(mix.means[i][c]), np.diag(np.asarray(mix.scales[i][c]) ** 2))
            for c in range(k)]
    want[i] = np.log(np.sum(dens))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gmm_sample_moments():
  rng = np.random.default_rng(0)
  mix = random_mixture(rng, (), 3, 2)
  draws = gmm.sample(jax.random.key(0), jax.tree.map(lambda a: jnp.broadcast_to(
      a, (200_000,) + a.shape), mix))                               # [200000, 2]
  w = np.asarray(jax.nn.softmax(mix.logits))
  mean = (w[:, None] * mix.means).sum(0)
  second = (w[:, None] * (np.square(mix.means) + np.square(mix.scales))).sum(0)
  np.testing.assert_allclose(draws.mean(0), mean, atol=0.02)
  np.testing.assert_allclose(draws.var(0), second - mean ** 2, rtol=0.02)


def test_head_scale_floor_and_zero_init():
  head = gmm.Head(8, 4, 3, rngs=nnx.Rngs(0), tol=0.7)
  mix = head(jnp.ones((2, 5, 8)))
  assert mix.means.shape == mix.scales.shape == (2, 5, 4, 3) and mix.logits.shape == (2, 5, 4)
  # Zero-initialised: raw 0 -> squareplus(0) = 1, above the floor.
  np.testing.assert_allclose(mix.scales, 1.0)
  np.testing.assert_allclose(gmm.squareplus(jnp.array([-1e4, 0.0, 3.0])),
                             [1e-4, 1.0, (3 + np.sqrt(13)) / 2], rtol=1e-3)
  head.proj.bias[...] = jnp.full(head.proj.bias.shape, -100.0)
  assert float(head(jnp.ones((1, 8))).scales.min()) == pytest.approx(0.7)


def outputs(model, text, mask, soft, text_first):
  out = model(text, mask, soft, jnp.full((text.shape[0],), text_first))
  return np.asarray(out.text_logits), np.asarray(out.image.means)


@pytest.mark.parametrize("text_first", [True, False])
def test_image_outputs_are_causal(text_first):
  """Output i predicts soft token i: it sees tokens < i and never tokens >= i."""
  model = make()
  text, mask, soft = inputs()
  t0, i0 = outputs(model, text, mask, soft, text_first)
  j = 6
  t1, i1 = outputs(model, text, mask, soft.at[:, j].add(1.0), text_first)
  np.testing.assert_array_equal(i0[:, :j + 1], i1[:, :j + 1])
  assert np.abs(i0[:, j + 1:] - i1[:, j + 1:]).min() > 0
  if text_first:  # text comes before the image: untouched
    np.testing.assert_array_equal(t0, t1)
  else:           # the caption follows the image: every slot sees it
    assert np.abs(t0 - t1).min() > 0


@pytest.mark.parametrize("text_first", [True, False])
def test_text_outputs_are_causal(text_first):
  """Text output j predicts token j: it sees tokens < j only."""
  model = make()
  text, mask, soft = inputs()
  t0, i0 = outputs(model, text, mask, soft, text_first)
  j = 2
  t1, i1 = outputs(model, text.at[:, j].set((text[:, j] + 1) % 10), mask, soft, text_first)
  np.testing.assert_array_equal(t0[:, :j + 1], t1[:, :j + 1])
  assert np.abs(t0[:, j + 1:] - t1[:, j + 1:]).min() > 0
  if text_first:  # the image follows the text: every token sees it
    assert np.abs(i0 - i1).min() > 0
  else:
    np.testing.assert_array_equal(i0, i1)


@pytest.mark.parametrize("text_first", [True, False])
def test_text_padding_is_invisible(text_first):
  """A caption padded from 2 to 4 slots (any pad ids) predicts exactly as the unpadded one."""
  model = make()
  text, _, soft = inputs()
  pad_mask = jnp.asarray([[1, 1, 0, 0]] * 2, jnp.int32)
  short = model(text[:, :2], jnp.ones((2, 2), jnp.int32), soft, jnp.full((2,), text_first))
  for pads in ([0, 0], [7, 3]):
    padded = text.at[:, 2:].set(jnp.asarray(pads))
    long = model(padded, pad_mask, soft, jnp.full((2,), text_first))
    np.testing.assert_allclose(long.image.means, short.image.means, atol=1e-5)
    np.testing.assert_allclose(long.text_logits[:, :2], short.text_logits, atol=1e-5)


def test_orders_can_mix_in_one_batch():
  model = make()
  text, mask, soft = inputs()
  mixed = model(text, mask, soft, jnp.array([True, False]))
  for i, first in enumerate([True, False]):
    alone = model(text[i:i + 1], mask[i:i + 1], soft[i:i + 1], jnp.array([first]))
    np.testing.assert_allclose(mixed.image.means[i], alone.image.means[0], atol=1e-5)
    np.testing.assert_allclose(mixed.text_logits[i], alone.text_logits[0], atol=1e-5)


def test_noncausal_prefix_sees_the_whole_prefix():
  model = make(noncausal_prefix=True)
  text, mask, soft = inputs()
  t0, i0 = outputs(model, text, mask, soft, True)
  t1, i1 = outputs(model, text.at[:, 3].set((text[:, 3] + 1) % 10), mask, soft, True)
  assert np.abs(t0[:, 0] - t1[:, 0]).min() > 0      # slot 0 now sees the last text token


def test_class_tokens_use_one_table_per_slot():
  model = make(num_vocab_repeats=4)
  emb = model.embed_text(jnp.full((1, 4), 3))[0]                   # the same class, 4 slots
  table = model.embed[...][:, 3] * np.sqrt(64)
  np.testing.assert_allclose(emb, table, rtol=1e-6)
  assert model.embed.shape == (4, 13, 64)                           # 10 + BOS, BOI, NOLABEL


@pytest.mark.parametrize("pre_proj", ["none", "learned", "pca"])
def test_encode_decode_and_pre_projection_logdet(pre_proj, tmp_path):
  rng = np.random.default_rng(0)
  path = ""
  if pre_proj == "pca":
    path = str(tmp_path / "pca.npz")
    np.savez(path, mean=rng.normal(size=48), components=np.linalg.qr(rng.normal(size=(48, 48)))[0])
  model = make(pre_proj=pre_proj, pca_path=path)
  if pre_proj == "learned":
    model.pre_proj.matrix[...] = jnp.asarray(np.eye(48) + 0.3 * rng.normal(size=(48, 48)),
                                             jnp.float32)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  soft, factored, logdet = model.encode(x)
  assert soft.shape == (2, N, 16) and factored.shape == (2, N, 32)
  np.testing.assert_allclose(model.decode(soft, factored), x, atol=2e-5)
  tokens, want = jf.patchify(x, 4), 0.0
  if pre_proj != "none":
    sign, w_logdet = np.linalg.slogdet(np.asarray(model.pre_proj.matrix[...], np.float64))
    tokens, ld = model.pre_proj(tokens)
    np.testing.assert_allclose(ld, w_logdet, rtol=1e-4, atol=1e-4)
    want = N * w_logdet
  want = want + model.jet(tokens.reshape(2, 4, 4, 48))[1]
  np.testing.assert_allclose(logdet, want, rtol=1e-4, atol=1e-4)


def test_no_factoring_out_models_every_dim():
  model = make(latent_dim=0)
  soft, factored, _ = model.encode(jnp.zeros((1, 16, 16, 3)))
  assert soft.shape == (1, N, 48) and factored.shape == (1, N, 0)


def test_noise_curriculum_values():
  s = lambda t: float(objectives.noise_sigma(t, 64.0, 3.0))
  assert s(0.0) == pytest.approx(64.0) and s(1.0) == pytest.approx(3.0)
  assert s(0.5) == pytest.approx(33.5)
  assert s(0.25) == pytest.approx(3 + 61 * (1 + np.cos(np.pi / 4)) / 2)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3)) / 127.5 - 1,
                  jnp.float32)
  noisy = (objectives.rgb_noise(jax.random.key(0), x, 10.0) + 1) * 127.5
  np.testing.assert_allclose(noisy, np.round(noisy), atol=1e-3)     # still 8-bit values
  assert 8 < float(jnp.std(noisy - (x + 1) * 127.5)) < 11


def test_loss_terms_add_up():
  model = make()
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 16, 16, 3)) / 127.5 - 1, jnp.float32),
           "text": jnp.asarray(rng.integers(0, 10, (4, L)), jnp.int32),
           "text_mask": jnp.asarray([[1, 1, 1, 0]] * 4, jnp.int32)}
  obj = objectives.JetFormerObjective(text_prefix_prob=0.5, text_loss_weight=0.1)
  t = objectives.jetformer_terms(model, batch, jax.random.key(0), obj, progress=0.3)
  np.testing.assert_allclose(t["image_bpd"], t["nll_gmm_bpd"] + t["nll_factored_bpd"]
                             - t["logdet_bpd"], rtol=1e-5)
  loss, metrics = objectives.jetformer_loss(model, batch, jax.random.key(0), obj, 0.3)
  first = np.asarray(t["text_first"], np.float32)
  w = (1 - first)[:, None] * np.asarray(t["text_mask"])
  want = (np.sum(t["image_bpd"] * first) / first.sum()
          + 0.1 * np.sum(t["text_nll"] * w) / w.sum())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert set(metrics) >= {"image_bpd", "image_bpd_prefix", "text_nll", "logdet_bpd",
                          "nll_factored_bpd", "noise_sigma"}


def test_frozen_flow_gets_no_gradient():
  model = make()
  batch = {"image": jnp.zeros((2, 16, 16, 3)), "label": jnp.array([1, 2])}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, frozen_flow):
    m = nnx.merge(graphdef, p, rest)
    obj = objectives.JetFormerObjective(frozen_flow=frozen_flow)
    return objectives.jetformer_loss(m, batch, jax.random.key(0), obj, 0.0)[0]
  for frozen_flow in (False, True):
    grads = jax.grad(loss)(params, frozen_flow)
    jet_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads["jet"]))
    assert (jet_norm == 0) == frozen_flow


def test_every_parameter_has_logical_axes():
  model = make(pre_proj="learned", tie_embeddings=False)
  params, frozen = nnx.state(model, nnx.Param, jet_lib.Frozen)
  for path, v in [*nnx.to_flat_state(params), *nnx.to_flat_state(frozen)]:
    axes = v.get_metadata().get("axes")
    stacked = path[0] in ("decoder", "jet") and path[1] in ("layers", "couplings")
    assert axes is not None and len(axes) + stacked == v.value.ndim, (path, axes)
