"""Attention through jax.nn.dot_product_attention against the explicit softmax(QK^T)V it
replaced (float32, 1e-5), for every mask form the models use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jetformer.models import gemma, vit

D, T = 16, 7


def explicit_attention(q, k, v, mask=None):
  """q [B, T, N, Dh], k, v [B, S, K, Dh], mask [B, T, S] or None -> [B, T, N, Dh], float32.

  The form the models had before: heads-major products, masked logits at the
  float32 minimum, query head n reading KV head n // (N/K).
  """
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)


def vit_reference(attn, x, context):
  p = lambda d, name: d[name][...]
  q, k, v = (jnp.einsum("btd,dnh->btnh", a, p(getattr(attn, n), "kernel")) + p(getattr(attn, n), "bias")
             for n, a in (("query", x), ("key", context), ("value", context)))
  y = explicit_attention(q, k, v)
  return jnp.einsum("btnh,nhd->btd", y, attn.out["kernel"][...]) + attn.out["bias"][...]


@pytest.mark.parametrize("context_len", [T, 1], ids=["self", "cross-to-class"])
def test_vit_attention_equals_the_explicit_form(context_len):
  attn = vit.Attention(D, 4, rngs=nnx.Rngs(0), out_init=jax.nn.initializers.normal(0.3))
  x, c = (jax.random.normal(jax.random.key(i), (2, n, D)) for i, n in ((1, T), (2, context_len)))
  np.testing.assert_allclose(attn(x, c), vit_reference(attn, x, c), rtol=1e-5, atol=1e-5)


def gemma_attention(num_kv_heads):
  cfg = gemma.DecoderConfig(width=D, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8)
  return gemma.Attention(cfg, rngs=nnx.Rngs(0))


def masks(b=2, t=T):
  """Every mask form of the decoder: causal, causal with padding (a padding query sees
  nothing), a non-causal prefix, and the KV cache's decode step."""
  causal = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
  valid = jnp.ones((b, t), bool).at[1, 2:4].set(False)
  padded = causal & valid[:, None, :]
  prefix = padded | ((jnp.arange(t) < 3)[:, None] & (jnp.arange(t) < 3)[None])[None] & valid[:, None]
  decode = gemma.extend_mask(valid, jnp.int32(t - 1), 1)           # [B, 1, S]
  return {"causal": causal, "padded": padded, "prefix": prefix, "decode": decode}


@pytest.mark.parametrize("form", ["causal", "padded", "prefix", "decode"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_decoder_attention_equals_the_explicit_form(form, num_kv_heads):
  attn = gemma_attention(num_kv_heads)
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  positions = jnp.arange(T)[None].repeat(2, 0)
  mask = masks()[form]
  q, k, v = attn.project(x, positions)
  q = q[:, -mask.shape[1]:]                                        # decode: the last token
  expected = explicit_attention(q, k, v, mask).reshape(*q.shape[:2], -1) @ (
      attn.out[...].reshape(-1, D))
  np.testing.assert_allclose(attn.attend(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


def test_a_fully_masked_query_gets_a_uniform_softmax():
  attn = gemma_attention(1)
  q, k, v = attn.project(jax.random.normal(jax.random.key(1), (1, T, D)),
                         jnp.arange(T)[None])
  out = attn.attend(q, k, v, jnp.zeros((1, T, T), bool))
  assert np.all(np.isfinite(out))
  mean_v = jnp.broadcast_to(v.mean(1, keepdims=True), (1, T, 1, 8)).repeat(4, 2)
  np.testing.assert_allclose(out, mean_v.reshape(1, T, -1) @ attn.out[...].reshape(-1, D),
                             rtol=1e-5, atol=1e-5)


def test_unknown_implementation_is_a_clear_error():
  with pytest.raises(ValueError, match="attention_impl"):
    gemma.DecoderConfig(attention_impl="flash")
