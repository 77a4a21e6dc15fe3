"""Sampling from a JetFormer: images given text or a class, text given an image.

The method: docs/method.md, section 2.6.

Images: prefill [BOS, text, BOI] into the decoder's KV cache, then draw the N
soft tokens one at a time from the GMM head (temperatures; classifier-free
guidance against the same prompt with the prefix dropped to NOLABEL, both in
one batch of 2B rows), factored-out dims from N(0, 1), the flow inverse.
Text: prefill [BOI, image tokens, BOS], then greedy / temperature / top-k
decoding up to EOS. Everything here is traced: jit it (the caller shards the
batch); the decode loops are `lax.scan`s.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jetformer import guidance, losses, objectives
from jetformer.models import gemma, gmm
from jetformer.models.jetformer import attention_mask


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  cfg_weight: float = 0.0         # w: p_c^(1+w) / p_u^w; 0 = no guidance
  t_scale: float = 1.0            # GMM scales times this (paper: 0.93-0.96)
  t_probs: float = 1.0            # temperature of the mixture weights
  use_cache: bool = True          # False: recompute the whole prefix every step (benchmark)
  rejection_only: bool = False    # guided dims by rejection sampling only (benchmark)


@dataclasses.dataclass(frozen=True)
class TextOptions:
  max_len: int = 16               # tokens decoded, EOS included
  temperature: float = 1.0        # 0 = greedy
  top_k: int = 0                  # 0 = the whole vocabulary


def class_prompt(cfg, labels):
  """Class ids [B] -> (text [B, R], mask [B, R]): the label in every class slot."""
  return objectives.text_inputs(cfg, {"label": labels})


def draw(key, mix, opts: ImageOptions, b):
  """One soft token per row from the head's mixtures over 2B (guided) or B rows."""
  mix = guidance.temper(mix, opts.t_scale, opts.t_probs)
  if not opts.cfg_weight:
    return gmm.sample(key, mix)
  cond, uncond = (jax.tree.map(lambda a: a[s], mix) for s in (slice(0, b), slice(b, None)))
  return guidance.guided_sample(key, cond, uncond, opts.cfg_weight,
                                rejection_only=opts.rejection_only)


def image_prompt(model, text, text_mask, guided):
  """[BOS, text, BOI] embeddings [R, L+2, W] and validity; R = 2B rows when guided."""
  cfg = model.cfg
  if guided:  # unconditional rows: the prefix dropped to NOLABEL, as in CFG training
    b = text.shape[0]
    un_text, un_mask = objectives.drop_prefix(cfg, text, text_mask, jnp.ones((b,), bool))
    text, text_mask = jnp.concatenate([text, un_text]), jnp.concatenate([text_mask, un_mask])
  r = text.shape[0]
  x = jnp.concatenate([model.embed_special(cfg.bos, r), model.embed_text(text),
                       model.embed_special(cfg.boi, r)], 1)                # [R, L+2, W]
  ones = jnp.ones((r, 1), bool)
  return x, jnp.concatenate([ones, text_mask.astype(bool), ones], 1)


def soft_tokens_cached(model, keys, prompt, valid, opts, b):
  """The N soft tokens [B, N, d], each step attending to the KV cache."""
  cfg = model.cfg
  r, p = valid.shape
  rows = r // b
  cache = gemma.init_cache(cfg.decoder, r, p + cfg.num_tokens - 1)
  prefix = p - 1 if cfg.noncausal_prefix else 0                   # BOS + text, as in training
  h, cache = model.decoder.extend(prompt, valid, cache, prefix)
  mix = model.head(h[:, -1:])                                     # [R, 1, ...]

  def step(carry, key):
    cache, mix = carry
    tok = draw(key, mix, opts, b)                                 # [B, 1, d]
    emb = jnp.tile(model.image_in(tok), (rows, 1, 1))             # [R, 1, W]
    h, cache = model.decoder.extend(emb, jnp.ones((r, 1), bool), cache)
    return (cache, model.head(h)), tok[:, 0]

  (_, mix), toks = jax.lax.scan(step, (cache, mix), keys[:-1])    # [N-1, B, d]
  return jnp.concatenate([toks.swapaxes(0, 1), draw(keys[-1], mix, opts, b)], 1)


def soft_tokens_recomputed(model, keys, prompt, valid, opts, b):
  """As `soft_tokens_cached`, but each step runs the decoder over the whole sequence."""
  cfg = model.cfg
  r, p = valid.shape
  n, rows = cfg.num_tokens, r // b
  x = jnp.concatenate([prompt, jnp.zeros((r, n - 1, prompt.shape[-1]))], 1)  # [R, T, W]
  valid = jnp.concatenate([valid, jnp.ones((r, n - 1), bool)], 1)
  mask = attention_mask(valid, jnp.full((r,), p - 1), cfg.noncausal_prefix)
  positions = jnp.cumsum(valid, 1) - 1

  def step(x, inputs):
    i, key = inputs
    h = model.decoder(x, positions, mask)
    mix = model.head(jax.lax.dynamic_slice_in_dim(h, p - 1 + i, 1, 1))
    tok = draw(key, mix, opts, b)                                 # [B, 1, d]
    emb = jnp.tile(model.image_in(tok), (rows, 1, 1))
    x = jax.lax.dynamic_update_slice_in_dim(x, emb, jnp.minimum(p + i, x.shape[1] - 1), 1)
    return x, tok[:, 0]

  _, toks = jax.lax.scan(step, x, (jnp.arange(n), keys))
  return toks.swapaxes(0, 1)


def sample_images(model, key, text, text_mask, opts: ImageOptions):
  """Images [B, H, W, C] in [-1, 1] for prompts text [B, L] with mask [B, L]."""
  cfg = model.cfg
  b = text.shape[0]
  k_tok, k_fac = jax.random.split(key)
  prompt, valid = image_prompt(model, text, text_mask, bool(opts.cfg_weight))
  keys = jax.random.split(k_tok, cfg.num_tokens)
  fn = soft_tokens_cached if opts.use_cache else soft_tokens_recomputed
  soft = fn(model, keys, prompt, valid, opts, b)                  # [B, N, d]
  factored = jax.random.normal(k_fac, (b, cfg.num_tokens, cfg.token_dim - cfg.soft_dim))
  return jnp.clip(model.decode(soft, factored), -1.0, 1.0)


def choose(key, logits, opts: TextOptions):
  """Next token ids [B] from logits [B, V]."""
  if opts.temperature == 0:
    return jnp.argmax(logits, -1)
  if opts.top_k:
    kth = jax.lax.top_k(logits, opts.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits / opts.temperature, -1)


def sample_text(model, key, image, opts: TextOptions, eos_id):
  """Captions [B, max_len] int32 for images [B, H, W, C] in [-1, 1]; 0 after the first EOS."""
  cfg = model.cfg
  b, v = image.shape[0], cfg.vocab_size
  k_deq, k_tok = jax.random.split(key)
  soft, _, _ = model.encode(losses.dequantize(k_deq, image))      # [B, N, d]
  x = jnp.concatenate([model.embed_special(cfg.boi, b), model.image_in(soft),
                       model.embed_special(cfg.bos, b)], 1)       # [B, N+2, W]
  cache = gemma.init_cache(cfg.decoder, b, x.shape[1] + opts.max_len)
  prefix = cfg.num_tokens + 1 if cfg.noncausal_prefix else 0     # BOI + image
  h, cache = model.decoder.extend(x, jnp.ones(x.shape[:2], bool), cache, prefix)

  def step(carry, inputs):
    cache, h, done = carry
    j, key = inputs
    tok = choose(key, model.text_logits(h)[:, 0, :v], opts)       # [B] base vocabulary only
    tok = jnp.where(done, 0, tok)
    emb = model.embed_text(tok[:, None], offset=j)               # [B, 1, W]
    h, cache = model.decoder.extend(emb, jnp.ones((b, 1), bool), cache)
    return (cache, h, done | (tok == eos_id)), tok

  # The last step's extend is wasted (one token of work), for one uniform loop body.
  steps = (jnp.arange(opts.max_len), jax.random.split(k_tok, opts.max_len))
  _, toks = jax.lax.scan(step, (cache, h[:, -1:], jnp.zeros((b,), bool)), steps)
  return toks.swapaxes(0, 1).astype(jnp.int32)
