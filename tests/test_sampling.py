"""Sampling: cached decoding equals recomputation, prompts' padding is invisible, captions
are the decoder's own greedy choices and stop at EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetformer import losses, sampling
from test_jetformer import L, make

B = 2


def prompts():
  text = jnp.asarray([[3, 4, 5, 1], [7, 1, 0, 0]], jnp.int32)        # [B, L], 1 = EOS
  return text, (text > 0).astype(jnp.int32).at[:, 0].set(1)


@nnx.jit(static_argnums=4)
def images(model, key, text, mask, opts):
  return sampling.sample_images(model, key, text, mask, opts)


@pytest.mark.parametrize("cfg_weight,noncausal", [(0.0, False), (2.0, False), (0.0, True)])
def test_cached_sampling_equals_recomputing_the_prefix(cfg_weight, noncausal):
  model = make(noncausal_prefix=noncausal)
  text, mask = prompts()
  opts = sampling.ImageOptions(cfg_weight=cfg_weight, t_scale=0.9)
  cached = images(model, jax.random.key(0), text, mask, opts)
  full = images(model, jax.random.key(0), text, mask,
                sampling.ImageOptions(cfg_weight=cfg_weight, t_scale=0.9, use_cache=False))
  assert cached.shape == (B, 16, 16, 3)
  assert float(jnp.abs(cached).max()) <= 1.0
  np.testing.assert_allclose(cached, full, atol=2e-4)
  assert float(jnp.std(cached)) > 0.05          # not a constant image


@pytest.mark.parametrize("noncausal", [False, True])
def test_sampled_tokens_follow_the_training_layout(noncausal):
  """Sharp temperatures: each drawn token is the mean of its mixture's likeliest component,
  so the teacher-forced model (the training layout) must predict the sampled tokens."""
  model = make(noncausal_prefix=noncausal)
  text, mask = prompts()
  opts = sampling.ImageOptions(t_scale=1e-6, t_probs=1e6)
  prompt, valid = sampling.image_prompt(model, text, mask, guided=False)
  keys = jax.random.split(jax.random.key(0), model.cfg.num_tokens)
  soft = nnx.jit(sampling.soft_tokens_cached, static_argnums=(4, 5))(
      model, keys, prompt, valid, opts, B)                          # [B, N, d]
  mix = model(text, mask, soft, jnp.ones((B,), bool)).image
  best = jnp.argmax(mix.logits, -1)                                # [B, N]
  means = jnp.take_along_axis(mix.means, best[..., None, None], -2)[..., 0, :]
  np.testing.assert_allclose(means, soft, atol=1e-4)


def test_prompt_padding_is_invisible():
  model = make()
  text, mask = prompts()
  opts = sampling.ImageOptions(cfg_weight=1.0)
  base = images(model, jax.random.key(1), text, mask, opts)
  pad = lambda a: jnp.concatenate([a, jnp.zeros((B, 3), jnp.int32)], 1)   # [B, L+3]
  np.testing.assert_allclose(images(model, jax.random.key(1), pad(text), pad(mask), opts),
                             base, atol=2e-4)


def test_class_prompt_fills_every_slot():
  model = make(num_vocab_repeats=3)
  text, mask = sampling.class_prompt(model.cfg, jnp.asarray([4, 9]))
  np.testing.assert_array_equal(text, [[4, 4, 4], [9, 9, 9]])
  np.testing.assert_array_equal(mask, np.ones((2, 3)))


@nnx.jit(static_argnums=(3, 4))
def captions(model, key, image, opts, eos):
  return sampling.sample_text(model, key, image, opts, eos)


def test_greedy_captions_are_the_decoders_argmax():
  model = make()
  model.embed[...] = model.embed[...] * 20.0     # peaked text logits: no near-ties
  image = jax.random.uniform(jax.random.key(2), (B, 16, 16, 3), minval=-1, maxval=1)
  opts = sampling.TextOptions(max_len=L, temperature=0.0)
  toks = captions(model, jax.random.key(3), image, opts, -1)               # no EOS
  # Teacher-forced on its own captions (same dequantization key), image first.
  soft, _, _ = model.encode(losses.dequantize(jax.random.split(jax.random.key(3))[0], image))
  out = model(toks, jnp.ones_like(toks), soft, jnp.zeros((B,), bool))
  np.testing.assert_array_equal(jnp.argmax(out.text_logits[..., :10], -1), toks)


def test_captions_stop_at_eos():
  model = make()
  image = jax.random.uniform(jax.random.key(4), (8, 16, 16, 3), minval=-1, maxval=1)
  opts = sampling.TextOptions(max_len=8, temperature=1.0)
  toks = np.asarray(captions(model, jax.random.key(5), image, opts, 2))
  assert toks.shape == (8, 8) and toks.min() >= 0 and toks.max() < 10
  for row in toks:
    if 2 in row:
      assert not row[list(row).index(2) + 1:].any()
  assert (toks == 2).any()         # some caption ended (10 tokens, 64 draws, random model)


def test_top_k_keeps_the_k_best():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]])
  opts = sampling.TextOptions(temperature=5.0, top_k=2)
  draws = [int(sampling.choose(jax.random.key(i), logits, opts)[0]) for i in range(40)]
  assert set(draws) == {1, 3}
