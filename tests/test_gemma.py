"""Gemma decoder: causality, scan == unrolled, remat, GQA against a plain
reference, RoPE relativity, padding invariance, dropout, axes metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jetformer import sharding
from jetformer.models import gemma

D, T = 16, 6


def fill(module, seed=0, std=0.25):
  """Random numpy values for every Param (the RMSNorm scales too, which start at zero)."""
  rng = np.random.default_rng(seed)
  params = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(
      lambda a: jnp.asarray(std * rng.standard_normal(a.shape), jnp.float32), params))
  return module


def make_decoder(seed=0, **kw):
  # Shapes from eval_shape, values from numpy: an eager init compiles one XLA
  # program per random op and shape, seconds on CPU (test_init covers it).
  cfg = dict(width=D, depth=2, mlp_dim=32, num_heads=4, num_kv_heads=2, head_dim=8)
  cfg = gemma.DecoderConfig(**{**cfg, **kw})
  return fill(nnx.eval_shape(lambda: gemma.Decoder(cfg, rngs=nnx.Rngs(0))), seed)


def inputs(b=2, t=T, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return x, positions, causal(b, t)


def causal(b, t):
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))


run = nnx.jit(lambda m, x, pos, mask, key=None: m(x, pos, mask, key))


def test_init():
  cfg = gemma.DecoderConfig(width=D, depth=2, mlp_dim=32, num_heads=4, num_kv_heads=2,
                            head_dim=8)
  # rbg keys: XLA:CPU compiles the threefry bits of each eager random op ~4x slower.
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  np.testing.assert_array_equal(model.final_norm.scale[...], 0.0)
  np.testing.assert_array_equal(model.layers.pre_ffw_norm.scale[...], 0.0)
  attn, mlp = model.layers.attn, model.layers.mlp
  fan_in = [(attn.query, D), (attn.key, D), (attn.value, D), (attn.out, 4 * 8),
            (mlp.gating, D), (mlp.linear, 32)]
  for p, n in fan_in:  # lecun normal over the right input axes
    np.testing.assert_allclose(np.std(p[...]), n ** -0.5, rtol=0.2)
  assert float(jnp.abs(mlp.gating[0] - mlp.gating[1]).max()) > 0  # layers differ
  assert float(jnp.abs(mlp.gating[0, 0] - mlp.gating[0, 1]).max()) > 0  # gate != up


def test_causality():
  model = make_decoder(num_kv_heads=1)
  x, pos, mask = inputs(b=1)
  # Row j + 1 of the batch has token j changed; row 0 is the original.
  xs = np.repeat(np.asarray(x), T + 1, axis=0)
  xs[np.arange(1, T + 1), np.arange(T)] += 1.0
  out = run(model, jnp.asarray(xs), jnp.repeat(pos, T + 1, 0), jnp.repeat(mask, T + 1, 0))
  for j in range(T):
    np.testing.assert_allclose(out[j + 1, :j], out[0, :j], atol=1e-6)
    assert float(jnp.abs(out[j + 1, j:] - out[0, j:]).max(axis=-1).min()) > 1e-4, j


def sin_loss(m, x, pos, mask):
  out = m(x, pos, mask)
  return jnp.sum(jnp.sin(out)), out


grad = nnx.jit(nnx.value_and_grad(sin_loss, has_aux=True))  # module level: ref compiles once


@pytest.mark.parametrize("remat,scan", [("dots", True), ("full", True), ("none", False),
                                        ("full", False)])
def test_scan_and_remat_match_plain_scan(remat, scan):
  ref, model = make_decoder(remat="none"), make_decoder(remat=remat, scan=scan)
  x, pos, mask = inputs()
  (_, out), g = grad(model, x, pos, mask)
  (_, out_ref), g_ref = grad(ref, x, pos, mask)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_shapes(num_kv_heads):
  cfg = gemma.DecoderConfig(width=D, depth=3, mlp_dim=32, num_heads=4,
                            num_kv_heads=num_kv_heads, head_dim=8)
  model = nnx.eval_shape(lambda: gemma.Decoder(cfg, rngs=nnx.Rngs(0)))
  x, pos, mask = inputs()
  assert nnx.eval_shape(lambda m: m(x, pos, mask), model).shape == x.shape
  attn, mlp = model.layers.attn, model.layers.mlp
  assert attn.query.shape == (3, D, 4, 8)
  assert attn.key.shape == attn.value.shape == (3, D, num_kv_heads, 8)
  assert attn.out.shape == (3, 4, 8, D)
  assert mlp.gating.shape == (3, 2, D, 32) and mlp.linear.shape == (3, 32, D)
  assert model.layers.pre_attention_norm.scale.shape == (3, D)
  assert model.final_norm.scale.shape == (D,)


def rope_complex(x, positions, max_wavelength=10_000.0):
  """RoPE as a complex rotation of (x1 + i x2), x1/x2 the two halves of Dh."""
  half = x.shape[-1] // 2
  freq = 1.0 / max_wavelength ** (2 * np.arange(half) / x.shape[-1])
  rot = np.exp(1j * np.asarray(positions)[:, :, None, None] * freq)  # [B, T, 1, Dh/2]
  z = (np.asarray(x[..., :half]) + 1j * np.asarray(x[..., half:])) * rot
  return np.concatenate([z.real, z.imag], axis=-1)


def reference_attention(attn, x, positions, mask):
  """Plain multi-head attention with K/V repeated to all query heads (float64)."""
  p = {k: np.asarray(getattr(attn, k)[...], np.float64)
       for k in ("query", "key", "value", "out")}
  x = np.asarray(x, np.float64)
  q = rope_complex(np.einsum("btd,dnh->btnh", x, p["query"]), positions)
  k = rope_complex(np.einsum("btd,dkh->btkh", x, p["key"]), positions)
  v = np.einsum("btd,dkh->btkh", x, p["value"])
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head n reads KV head n // G
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.asarray(mask)[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.einsum("bnts,bsnh->btnh", probs, v)
  return np.einsum("btnh,nhd->btd", y, p["out"])


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_attention_matches_reference(num_kv_heads):
  cfg = gemma.DecoderConfig(width=D, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8)
  attn = fill(nnx.eval_shape(lambda: gemma.Attention(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, T, D)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 50, (2, T)), jnp.int32)
  mask = jnp.asarray((rng.random((2, T, T)) < 0.6) | np.eye(T, dtype=bool))
  out = nnx.jit(lambda a, *args: a(*args))(attn, x, positions, mask)
  np.testing.assert_allclose(out,
                             reference_attention(attn, x, positions, mask),
                             rtol=1e-4, atol=1e-5)


def test_rope_is_relative():
  model = make_decoder()
  x, pos, mask = inputs()
  base = run(model, x, pos, mask)
  np.testing.assert_allclose(run(model, x, pos + 7, mask), base, atol=2e-5)
  assert float(jnp.abs(run(model, x, 2 * pos, mask) - base).max()) > 1e-3  # positions matter


def test_padding_invariance():
  model = make_decoder(num_kv_heads=1)
  x, pos, mask = inputs(b=1)
  base = run(model, x, pos, mask)
  # Three garbage tokens inserted after the first two; masked out as keys.
  pad = jnp.asarray(10.0 * np.random.default_rng(9).standard_normal((1, 3, D)), jnp.float32)
  xp = jnp.concatenate([x[:, :2], pad, x[:, 2:]], axis=1)                # [1, T+3, D]
  valid = jnp.array([[1, 1, 0, 0, 0] + [1] * (T - 2)], bool)
  posp = (jnp.cumsum(valid, axis=1) - 1).astype(jnp.int32)
  maskp = causal(1, T + 3) & valid[:, None, :]
  out = run(model, xp, posp, maskp)
  np.testing.assert_allclose(out[:, valid[0]], base, rtol=1e-5, atol=1e-5)


def test_dropout():
  model = make_decoder(dropout=0.3)
  x, pos, mask = inputs()
  det = run(model, x, pos, mask)
  np.testing.assert_allclose(det, run(model, x, pos, mask), atol=0)
  np.testing.assert_allclose(det, run(make_decoder(dropout=0.0), x, pos, mask), atol=1e-6)
  k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")  # rbg: see test_init
  a = run(model, x, pos, mask, k1)
  np.testing.assert_allclose(a, run(model, x, pos, mask, k1), atol=0)
  assert float(jnp.abs(a - det).max()) > 1e-2
  assert float(jnp.abs(a - run(model, x, pos, mask, k2)).max()) > 1e-2
  # Per-layer keys are folded in from the layer index: the same in a scan and unrolled.
  unrolled = make_decoder(dropout=0.3, scan=False)
  np.testing.assert_allclose(run(unrolled, x, pos, mask, k1), a, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_is_close():
  x, pos, mask = inputs()
  out32 = run(make_decoder(), x, pos, mask)
  out16 = run(make_decoder(dtype="bfloat16"), x, pos, mask)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.1)


def test_axes_metadata_and_sharding():
  model = make_decoder()
  params = nnx.state(model, nnx.Param)
  flat = jax.tree.leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert len(flat) == 9
  for path, var in flat:
    axes = var.get_metadata().get("axes")
    stacked = jax.tree_util.keystr(path).startswith("['layers']")
    assert axes is not None and len(axes) + stacked == var.ndim, (path, axes, var.shape)
    assert all(a is None or a in sharding.LOGICAL_AXES for a in axes), axes
  mesh = sharding.make_mesh([("data", 2), ("model", -1)])
  rules = [("embed", "data"), ("mlp", "model"), ("heads", "model"), ("kv_heads", None)]
  specs = sharding.state_shardings(params, rules, mesh)
  assert specs["layers"]["attn"]["query"].spec == P(None, "data", "model", None)
  assert specs["layers"]["mlp"]["gating"].spec == P(None, None, "data", "model")


def test_config_errors():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    gemma.DecoderConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat"):
    gemma.DecoderConfig(remat="some")


@pytest.mark.parametrize("num_kv_heads,bidirectional,dtype", [
    (1, 0, "float32"), (2, 0, "float32"), (4, 3, "float32"), (1, 0, "bfloat16")])
def test_cached_decoding_matches_full_forward(num_kv_heads, bidirectional, dtype):
  """Prefill a padded prompt batch, then extend one token at a time inside lax.scan."""
  model = make_decoder(num_kv_heads=num_kv_heads, dtype=dtype)  # bfloat16: a bfloat16 cache
  b, p, t = 2, 4, 9
  x = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, D)), jnp.float32)
  valid = jnp.ones((b, t), bool).at[1, 1:3].set(False)     # row 1: a shorter prompt
  positions = jnp.cumsum(valid, 1) - 1
  mask = causal(b, t) & valid[:, None, :]
  if bidirectional:
    block = jnp.arange(t) < bidirectional
    mask |= (block[:, None] & block[None, :])[None] & valid[:, None, :]
  full = run(model, x, positions, mask)

  @nnx.jit
  def cached(model, x):
    cache = gemma.init_cache(model.cfg, b, t)
    h0, cache = model.extend(x[:, :p], valid[:, :p], cache, bidirectional)

    def step(cache, x_t):
      h, cache = model.extend(x_t[:, None], jnp.ones((b, 1), bool), cache)
      return cache, h[:, 0]
    cache, hs = jax.lax.scan(step, cache, x[:, p:].swapaxes(0, 1))
    return jnp.concatenate([h0, hs.swapaxes(0, 1)], 1), cache

  out, cache = cached(model, x)
  assert cache.k.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(out[valid], full[valid], rtol=1e-5, atol=1e-5)
  assert int(cache.end) == t
  np.testing.assert_array_equal(cache.next_pos, jnp.sum(valid, 1))
