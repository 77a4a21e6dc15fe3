"""CFG sampling: closed form, rejection and fallbacks against quadrature of the target."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jetformer import guidance
from jetformer.models import gmm

NUM = 20000
# Jitted once for the whole file: eager mode would compile every op separately.
sample = jax.jit(guidance.guided_sample, static_argnames=("rejection_only", "max_tries", "chunk"))
rejection = jax.jit(guidance.rejection_sample, static_argnames=("max_tries", "chunk"))
gmm_sample = jax.jit(gmm.sample)


def same(a, b):
  """Equal up to a fused multiply-add."""
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def mixture(logits, means, scales, n=NUM):
  """A Mixture [n] (or [n, d]) repeating one parameter set: logits [K], means/scales [K, d]."""
  lead = (n,) if np.ndim(n) == 0 else tuple(n)
  bc = lambda a: jnp.asarray(np.broadcast_to(np.asarray(a, np.float32), lead + np.shape(a)))
  return gmm.Mixture(bc(logits), bc(means), bc(scales))


def target_cdf(m_c, s_c, u_w, u_m, u_s, w, pi_c=None):
  """CDF of sum_c pi_c f_c / Z_c by quadrature, f_c = N(m_c, s_c)^(1+w) / (sum_j u_w N(u_m, u_s))^w.

  Scalars per cond component c (lists when pi_c is given); returns (cdf, mean, var).
  """
  m_c, s_c = np.atleast_1d(m_c), np.atleast_1d(s_c)
  pi_c = np.ones(1) if pi_c is None else np.asarray(pi_c)
  u_w, u_m, u_s = (np.asarray(a, np.float64).reshape(len(m_c), -1) for a in (u_w, u_m, u_s))
  x = np.linspace(m_c.min() - 20 * s_c.max(), m_c.max() + 20 * s_c.max(), 400001)
  dens = np.zeros_like(x)
  for c in range(len(m_c)):
    log_pu = special.logsumexp(stats.norm.logpdf(x, u_m[c][:, None], u_s[c][:, None]), 0,
                               b=u_w[c][:, None])
    log_f = (1 + w) * stats.norm.logpdf(x, m_c[c], s_c[c]) - w * log_pu
    f = np.exp(log_f - log_f.max())
    dens += pi_c[c] * f / np.trapezoid(f, x)
  cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
  mean = np.trapezoid(x * dens, x)
  var = np.trapezoid((x - mean) ** 2 * dens, x)
  return (lambda v: np.interp(v, x, cdf / cdf[-1])), mean, var


def check(samples, cdf, mean, var):
  samples = np.asarray(samples, np.float64)
  assert stats.kstest(samples, cdf).pvalue > 1e-3
  se = np.sqrt(var / len(samples))
  assert abs(samples.mean() - mean) < 5 * se
  assert abs(samples.var() / var - 1) < 5 * np.sqrt(2 / len(samples))


def test_closed_form_matches_quadrature():
  # Two conditional components, both proper for w = 2, d = 2; the guided mean moves away from m_c.
  logits_c = np.log([0.3, 0.7])
  m_c, s_c = np.array([[-1.0, 0.5], [1.5, 0.0]]), np.array([[0.5, 1.0], [0.7, 0.3]])
  m_u, s_u = np.array([[-0.5, 0.0], [1.0, 1.0]]), np.array([[0.6, 1.5], [0.9, 0.28]])
  w = 2.0
  x = sample(jax.random.key(0), mixture(logits_c, m_c, s_c), mixture([0.0, 0.0], m_u, s_u), w)
  for i in range(2):
    check(x[:, i], *target_cdf(m_c[:, i], s_c[:, i], [[1.0], [1.0]], m_u[:, i], s_u[:, i], w,
                               pi_c=[0.3, 0.7]))


def reject(key, m_c, s_c, u_w, u_m, u_s, w, lead=(NUM,), **kw):
  """rejection_sample for one parameter set repeated over lead: scalars m_c, s_c; lists u_*."""
  bc = lambda a, extra=(): jnp.asarray(
      np.broadcast_to(np.asarray(a, np.float32), lead + (1,) + extra))
  j = (len(u_w),)
  return rejection(key, bc(m_c), bc(s_c), bc(np.log(u_w), j), bc(u_m, j), bc(u_s, j), w, **kw)


@pytest.mark.parametrize("u_w, u_m, u_s, w", [
    ([0.6, 0.4], [-1.0, 1.0], [1.0, 0.5], 2.0),        # narrow bump inside a wide one
    ([0.2, 0.5, 0.3], [0.0, 2.0, -1.0], [0.9, 1.2, 0.3], 4.0)])
def test_rejection_mixture_unconditional_matches_quadrature(u_w, u_m, u_s, w):
  # p_u a Gaussian mixture: normalisable ((1+w)/s_c^2 > w/max s_u^2) but not Gaussian. The
  # envelope is up to w log J loose here (acceptance ~1% for the second case): more tries.
  x, ok = reject(jax.random.key(1), 0.5, 0.8, u_w, u_m, u_s, w, max_tries=10000, chunk=64)
  assert ok.all()
  cdf, mean, var = target_cdf(0.5, 0.8, u_w, u_m, u_s, w)
  check(x[:, 0], cdf, mean, var)
  gauss_cdf = lambda v: stats.norm.cdf(v, mean, np.sqrt(var))
  assert stats.kstest(np.asarray(x[:, 0], np.float64), gauss_cdf).pvalue < 1e-3   # not Gaussian


def test_envelope_bounds_the_ratio():
  rng = np.random.default_rng(0)
  n, j = 400, 3
  s_c = rng.uniform(0.05, 2.0, n)
  u_logp = np.log(rng.dirichlet(np.ones(j), n))
  u_dm = rng.normal(0, 2, (n, j))
  u_s = rng.uniform(0.05, 3.0, (n, j))
  w = rng.uniform(0, 8, n)
  mu, sq, log_m = jax.jit(guidance.envelope)(s_c, u_logp, u_dm, u_s, w)
  finite = np.isfinite(log_m)
  lam_max = np.max((1 + w[:, None]) / s_c[:, None] ** 2 - w[:, None] / u_s ** 2, -1)
  np.testing.assert_array_equal(finite, lam_max > 0)
  assert 0.3 < finite.mean() < 1
  y = np.asarray(mu) + np.linspace(-40, 40, 4001)[:, None] * np.asarray(sq)   # [G, n]
  ratio = jax.jit(guidance._log_ratio)(
      jnp.asarray(y, jnp.float32), s_c, u_logp, u_dm, u_s, w, mu, sq)
  gap = (np.max(np.asarray(ratio), 0) - np.asarray(log_m))[finite]
  assert np.all(gap < 1e-5 * (1 + np.abs(np.asarray(log_m)[finite])))   # float32 rounding
  assert np.median(gap) > -3   # and not uselessly loose


def test_improper_falls_back_to_the_conditional_sample():
  # s_u < s_c sqrt(w / (1+w)): the target grows without bound, no draw can be accepted.
  cond, uncond = mixture([0.0, 1.0], [[0.0], [2.0]], [[1.0], [0.5]], 256), mixture(
      [0.0, 0.0], [[0.3], [2.5]], [[0.5], [0.2]], 256)
  key = jax.random.key(3)
  want = gmm_sample(key, cond)
  same(sample(key, cond, uncond, 3.0), want)
  same(sample(key, cond, uncond, 3.0, rejection_only=True), want)


def test_zero_weight_is_the_conditional_sample():
  cond = mixture([0.0, 0.5, -1.0], np.arange(6.0).reshape(3, 2),
                 [[1.0, 0.5], [0.3, 2.0], [1.0, 1.0]])
  uncond = mixture([0.0, 0.0, 0.0], np.zeros((3, 2)), np.full((3, 2), 0.1))
  key = jax.random.key(4)
  same(sample(key, cond, uncond, 0.0), gmm_sample(key, cond))
  cond1, uncond1 = mixture([0.0], [[1.0]], [[0.7]]), mixture([0.0], [[-3.0]], [[0.2]])
  x = sample(key, cond1, uncond1, 0.0, rejection_only=True)[:, 0]
  assert stats.kstest(np.asarray(x, np.float64), stats.norm(1.0, 0.7).cdf).pvalue > 1e-3


def test_temper():
  mix = gmm.Mixture(jnp.array([1.0, -2.0]), jnp.zeros((2, 3)), jnp.ones((2, 3)))
  ident = guidance.temper(mix)
  for a, b in zip(ident, mix):
    np.testing.assert_array_equal(a, b)
  hot = guidance.temper(mix, t_scale=0.5, t_probs=3.0)
  np.testing.assert_allclose(hot.logits, [3.0, -6.0])
  np.testing.assert_allclose(hot.scales, 0.5)
  # t_probs multiplies the logits (big_vision): large values pick the argmax component.
  cond = mixture([0.0, 0.1], [[-5.0], [5.0]], [[1.0], [1.0]])
  x = sample(jax.random.key(5), guidance.temper(cond, 0.5, 200.0), cond, 0.0)
  assert np.all(np.asarray(x) > 0)
  assert abs(np.std(np.asarray(x)) - 0.5) < 0.02


@pytest.mark.parametrize("kw", [{}, {"rejection_only": True}])
def test_shapes_and_jit(kw):
  b, n, k, d = 2, 5, 4, 3
  rng = np.random.default_rng(6)
  mk = lambda: gmm.Mixture(*(jnp.asarray(a, jnp.float32) for a in (
      rng.normal(size=(b, n, k)), rng.normal(size=(b, n, k, d)),
      np.exp(0.3 * rng.normal(size=(b, n, k, d))))))
  cond, uncond = mk(), mk()
  fn = jax.jit(lambda key, w: guidance.guided_sample(key, cond, uncond, w, **kw))
  x = fn(jax.random.key(7), jnp.array([[0.0], [2.0]]))   # weight [B, 1]
  assert x.shape == (b, n, d) and x.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(x)))
  if not kw:  # weight 0 for the first example: its tokens are the conditional draws (up to FMA).
    same(x[0], gmm_sample(jax.random.key(7), cond)[0])


def test_rejection_sample_shapes():
  m_c, s_c = np.zeros((2, 5, 3), np.float32), np.ones((2, 5, 3), np.float32)
  u = np.ones((2, 5, 3, 4), np.float32)
  x, ok = rejection(jax.random.key(0), m_c, s_c, np.log(u / 4), u, u, 2.0)
  assert x.shape == ok.shape == (2, 5, 3) and ok.all()


def test_rejection_only_agrees_with_closed_form():
  # Mean shifted by w r^2 (m_c - m_u) / rho = 3 s_c from m_c, where the reference centres its
  # proposal (and its samples come out with mean ~1.25 here).
  cond, uncond, w = mixture([0.0], [[0.0]], [[0.5]]), mixture([0.0], [[-0.5]], [[0.5]]), 3.0
  exact = stats.norm(1.5, 0.5)
  xc = sample(jax.random.key(8), cond, uncond, w)[:, 0]
  xr = sample(jax.random.key(9), cond, uncond, w, rejection_only=True)[:, 0]
  for x in (xc, xr):
    check(x, exact.cdf, exact.mean(), exact.var())
  assert stats.ks_2samp(np.asarray(xc), np.asarray(xr)).pvalue > 1e-3
