"""Classifier-free guided sampling from the GMM image head (docs/method.md, section 2.6).

Per soft token: pick a component c from the *conditional* weights, then draw
each dim from the density proportional to p_c(x)^(1+w) / p_u(x)^w. As in
big_vision (`models/proj/givt/parallel_decode.py`, `CFGDensity`, called by
`trainers/proj/jetformer/predict_fns.py`), p_c and p_u are the same component c
of the conditional and unconditional heads, so both are Gaussians per dim and
the target is Gaussian with precision (1+w)/s_c^2 - w/s_u^2 when that is > 0:
we sample it in closed form, no loop (the reference rejection-samples every
dim, with an envelope, max of p on a +-10 grid over q(m_c), that is not a
bound: shifted targets come out biased). When the precision is <= 0 the
target is not normalisable, no envelope bounds it and every proposal would be
rejected: we return the conditional sample, the fallback the reference
reaches after its 1000 tries (bar its rare far-tail acceptances).
`rejection_only=True` rejection-samples every dim instead, for comparison;
`rejection_sample` takes any 1-D Gaussian mixture as p_u. Weights w >= 0.
"""

import jax
import jax.numpy as jnp

from jetformer.models.gmm import Mixture


def temper(mix: Mixture, t_scale=1.0, t_probs=1.0) -> Mixture:
  """Scales times t_scale; mixture logits *times* t_probs.

  Matches big_vision `jetformer.Model.get_pdf` (`prob_logits * temperature_probs`,
  `scales * temperature_scales`): t_probs is an inverse temperature, > 1
  sharpens the component weights. The reference tempers both the conditional
  and the unconditional head before CFG; callers should do the same.
  """
  return Mixture(mix.logits * t_probs, mix.means, mix.scales * t_scale)


def _pick(a, comp):  # a [..., K, d], comp [...] -> [..., d]
  return jnp.take_along_axis(a, comp[..., None, None], axis=-2)[..., 0, :]


def closed_form(eps, m_c, s_c, m_u, s_u, w):
  """The Gaussian target for eps ~ N(0,1), all [..., d] -> (x, proper).

  With r = s_c/s_u and rho = 1 + w (1 - r^2) = s_c^2 * precision, the target
  has mean m_c + w r^2 (m_c - m_u) / rho and std s_c / sqrt(rho): written
  this way w = 0 gives m_c + s_c * eps exactly, `gmm.sample`'s draw (bit for
  bit, up to a fused multiply-add under jit).
  """
  r2 = jnp.square(s_c / s_u)
  rho = 1.0 + w * (1.0 - r2)
  proper = rho > 0
  rho = jnp.where(proper, rho, 1.0)
  return m_c + w * r2 * (m_c - m_u) / rho + s_c * jax.lax.rsqrt(rho) * eps, proper


def _max_of_min(a, b, c):
  """max_y min_j (-a_j y^2 / 2 + b_j y + c_j) and its argmax; [..., J] -> [...].

  The lower envelope is continuous, piecewise quadratic and -> -inf at both
  ends when some a_j > 0, so its max sits at a vertex b_j/a_j (a_j > 0) or
  where two parabolas cross: checking those J^2 points is exact (O(J^3)).
  """
  pos = a > 0
  vertex = b / jnp.where(pos, a, 1.0)                                  # [..., J]
  diff = lambda v: v[..., :, None] - v[..., None, :]                    # [..., J, J]
  qa, qb, qc = -0.5 * diff(a), diff(b), diff(c)  # crossings: qa y^2 + qb y + qc = 0
  disc = jnp.square(qb) - 4 * qa * qc
  q = -0.5 * (qb + jnp.where(qb >= 0, 1.0, -1.0) * jnp.sqrt(jnp.maximum(disc, 0.0)))
  real = (disc >= 0) & (q != 0)
  roots = jnp.stack([q / jnp.where(qa != 0, qa, 1.0), qc / jnp.where(real, q, 1.0)], -1)
  ok_roots = jnp.stack([real & (qa != 0), real], -1)                   # [..., J, J, 2]
  flat = lambda v: v.reshape(*v.shape[:-3], -1)
  cand = jnp.concatenate([vertex, flat(roots)], -1)                    # [..., C]
  valid = jnp.concatenate([pos, flat(ok_roots)], -1) & jnp.isfinite(cand)
  cand = jnp.where(valid, cand, 0.0)
  env = jnp.min(-0.5 * a[..., None, :] * jnp.square(cand[..., None])
                + b[..., None, :] * cand[..., None] + c[..., None, :], -1)  # [..., C]
  env = jnp.where(valid, env, -jnp.inf)  # NaN-free: XLA's min may drop NaNs
  best = jnp.argmax(env, -1)
  return jnp.max(env, -1), jnp.take_along_axis(cand, best[..., None], -1)[..., 0]


def envelope(s_c, u_logp, u_dm, u_s, w):
  """Proposal N(mu, sq) and log envelope M for rejection; [..., d(, J)] -> 3 x [..., d].

  Target f(y) = N(y; 0, s_c)^(1+w) / p_u(y)^w with y = x - m_c and
  p_u = sum_j pi_j N(y; u_dm_j, u_s_j) (u_logp = log pi_j, u_dm = mean - m_c).
  Since p_u >= max_j pi_j N_j and w >= 0, log f <= min_j g_j (2*pi terms
  dropped throughout; they cancel), with
    g_j(y) = -lam_j y^2 / 2 + b_j y + c_j,  lam_j = (1+w)/s_c^2 - w/u_s_j^2,
    b_j = -w u_dm_j / u_s_j^2,  c_j = w u_dm_j^2 / (2 u_s_j^2) - (1+w) log s_c
          + w log u_s_j - w log pi_j,
  and -log q(y) = (y - mu)^2 / (2 sq^2) + log sq is quadratic too, so
  M = max_y min_j (g_j - log q) bounds log f - log q: the acceptance
  exp(log f - log q - M) is <= 1 everywhere, and M is within w log J of the
  best constant (exact for J = 1). The reference uses sq = 2 max(s_c, s_u)
  centred at m_c; we keep that width (widened to sqrt(2 / max_j lam_j) so
  that the widest component keeps a positive curvature) but centre it at the
  peak of min_j g_j, the target mean for J = 1: guidance moves that mean by
  w r^2 (m_c - m_u) / rho, often several proposal widths away from m_c.
  max_j lam_j <= 0: f is not normalisable, M = inf.
  """
  w = jnp.expand_dims(w, -1)
  lam = (1.0 + w) / jnp.square(s_c)[..., None] - w / jnp.square(u_s)     # [..., d, J]
  b = -w * u_dm / jnp.square(u_s)
  c = (w * jnp.square(u_dm) / (2 * jnp.square(u_s)) - (1.0 + w) * jnp.log(s_c)[..., None]
       + w * jnp.log(u_s) - w * u_logp)
  lam_max = jnp.max(lam, -1)                                           # [..., d]
  proper = lam_max > 0
  _, mu = _max_of_min(lam, b, c)
  mu = jnp.where(proper, mu, 0.0)
  sq2 = 4.0 * jnp.maximum(jnp.square(s_c), jnp.max(jnp.square(u_s), -1))
  sq2 = jnp.maximum(sq2, jnp.where(proper, 2.0 / jnp.where(proper, lam_max, 1.0), 0.0))
  m, _ = _max_of_min(lam - 1.0 / sq2[..., None], b - (mu / sq2)[..., None],
                     c + (0.5 * jnp.square(mu) / sq2 + 0.5 * jnp.log(sq2))[..., None])
  return mu, jnp.sqrt(sq2), jnp.where(proper, m, jnp.inf)


def _log_ratio(y, s_c, u_logp, u_dm, u_s, w, mu, sq):
  """log f(y) - log q(y) (no 2*pi terms) at proposals y [T, ..., d]."""
  z_u = (y[..., None] - u_dm) / u_s                                    # [T, ..., d, J]
  comp = u_logp - 0.5 * jnp.square(z_u) - jnp.log(u_s)
  log_pu = comp[..., 0] if comp.shape[-1] == 1 else jax.nn.logsumexp(comp, -1)
  return ((1.0 + w) * (-0.5 * jnp.square(y / s_c) - jnp.log(s_c)) - w * log_pu
          + 0.5 * jnp.square((y - mu) / sq) + jnp.log(sq))


def rejection_sample(key, m_c, s_c, u_logp, u_means, u_scales, w, *,
                     max_tries=1000, chunk=4):
  """Rejection-sample f = N(m_c, s_c)^(1+w) / p_u^w per element.

  m_c, s_c: [..., d]; u_logp, u_means, u_scales: [..., d, J] (log weights,
  means, stds of a 1-D mixture p_u per element). Draws `chunk` proposals per
  element at a time in a while_loop until every element has accepted one or
  max_tries proposals are spent. Returns (x [..., d], accepted [..., d]);
  x = m_c where not accepted (callers put their fallback there).
  """
  w = jnp.broadcast_to(jnp.asarray(w, m_c.dtype), jnp.broadcast_shapes(jnp.shape(w), m_c.shape))
  u_dm = u_means - m_c[..., None]
  mu, sq, log_m = envelope(s_c, u_logp, u_dm, u_scales, w)             # [..., d]
  chunk = max(1, min(chunk, max_tries))
  n_chunks = -(-max_tries // chunk)

  def body(state):
    i, y_out, ok = state
    k_y, k_u = jax.random.split(jax.random.fold_in(key, i))
    y = mu + sq * jax.random.normal(k_y, (chunk,) + m_c.shape)         # [T, ..., d]
    log_u = -jax.random.exponential(k_u, y.shape)
    tries = (i * chunk + jnp.arange(chunk)).reshape((chunk,) + (1,) * m_c.ndim)
    log_ratio = _log_ratio(y, s_c, u_logp, u_dm, u_scales, w, mu, sq)  # [T, ..., d]
    acc = (log_u < log_ratio - log_m) & (tries < max_tries)
    first = jnp.take_along_axis(y, jnp.argmax(acc, 0)[None], 0)[0]     # [..., d]
    new = acc.any(0) & ~ok
    return i + 1, jnp.where(new, first, y_out), ok | new

  def cond(state):
    i, _, ok = state
    return (i < n_chunks) & ~jnp.all(ok | jnp.isinf(log_m))

  init = (jnp.int32(0), jnp.zeros_like(m_c), jnp.zeros(m_c.shape, bool))
  _, y, ok = jax.lax.while_loop(cond, body, init)
  return m_c + y, ok


def guided_sample(key, cond: Mixture, uncond: Mixture, weight, *, rejection_only=False,
                  max_tries=1000, chunk=4):
  """One CFG draw per leading index [...] -> [..., d]; weight: scalar or [...].

  The component comes from `cond.logits` with the same key use as
  `gmm.sample`, so weight = 0 (and every improper dim) returns its draw.
  """
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.categorical(k_comp, cond.logits, axis=-1)          # [...]
  m_c, s_c = _pick(cond.means, comp), _pick(cond.scales, comp)          # [..., d]
  m_u, s_u = _pick(uncond.means, comp), _pick(uncond.scales, comp)
  eps = jax.random.normal(k_noise, m_c.shape)
  fallback = m_c + s_c * eps
  w = jnp.asarray(weight, m_c.dtype)
  w = w[..., None] if w.ndim else w                                    # [..., 1]
  if not rejection_only:
    x, proper = closed_form(eps, m_c, s_c, m_u, s_u, w)
    return jnp.where(proper, x, fallback)
  x, ok = rejection_sample(jax.random.fold_in(key, 2), m_c, s_c, jnp.zeros_like(m_u)[..., None],
                           m_u[..., None], s_u[..., None], w, max_tries=max_tries, chunk=chunk)
  return jnp.where(ok, x, fallback)
