"""The image head: a mixture of K diagonal Gaussians per soft token (docs/method.md, section 2.4).

`Head` maps decoder outputs [..., width] to mixture parameters; `log_prob` and
`sample` work on any leading shape (e.g. [B, N]). K=1 is the single-Gaussian
ablation.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetformer.models import vit


class Mixture(NamedTuple):
  logits: jax.Array   # [..., K] mixture logits
  means: jax.Array    # [..., K, d]
  scales: jax.Array   # [..., K, d] standard deviations, > 0


def squareplus(x):
  """(x + sqrt(x^2 + 4)) / 2: smooth, positive, ~x for large x and ~-1/x for very negative x.

  Written as 2 / (sqrt(x^2 + 4) - x) for x < 0, the same value without the
  cancellation that rounds it to 0 in float32.
  """
  root = jnp.sqrt(jnp.square(x) + 4.0)
  return jnp.where(x >= 0, (x + root) / 2.0, 2.0 / (root - jnp.minimum(x, 0.0)))


class Head(nnx.Module):
  """Zero-initialised Dense to K logits, K*d means and K*d raw scales."""

  def __init__(self, width, num_mixtures, dim, *, rngs, dtype="float32", tol=1e-6):
    self.num_mixtures, self.dim, self.tol = num_mixtures, dim, tol
    out = num_mixtures * (1 + 2 * dim)
    self.proj = vit.Dense(width, out, axes=("embed", "mixtures"), rngs=rngs,
                          kernel_init=jax.nn.initializers.zeros, dtype=jnp.dtype(dtype))

  def __call__(self, h):  # [..., width] -> Mixture
    k, d = self.num_mixtures, self.dim
    raw = self.proj(h)                                            # [..., K(1+2d)]
    lead = raw.shape[:-1]
    logits, means, raw_scales = jnp.split(raw, [k, k + k * d], axis=-1)
    scales = jnp.maximum(squareplus(raw_scales), self.tol)
    return Mixture(logits, means.reshape(*lead, k, d), scales.reshape(*lead, k, d))


def log_prob(mix: Mixture, x):
  """log p(x) in nats for x [..., d] -> [...] (logsumexp over the components)."""
  z = (x[..., None, :] - mix.means) / mix.scales                   # [..., K, d]
  comp = jnp.sum(-0.5 * jnp.square(z) - jnp.log(mix.scales) - 0.5 * np.log(2 * np.pi), -1)
  return jax.nn.logsumexp(jax.nn.log_softmax(mix.logits, -1) + comp, axis=-1)


def sample(key, mix: Mixture):
  """One draw per leading index: [..., d]."""
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.categorical(k_comp, mix.logits, axis=-1)      # [...]
  pick = lambda a: jnp.take_along_axis(a, comp[..., None, None], axis=-2)[..., 0, :]
  eps = jax.random.normal(k_noise, mix.means.shape[:-2] + mix.means.shape[-1:])
  return pick(mix.means) + pick(mix.scales) * eps
