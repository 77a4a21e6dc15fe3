"""Likelihood terms, as pure functions of arrays (docs/method.md, section 1.4)."""

import jax
import jax.numpy as jnp
import numpy as np

LOG_127_5 = float(np.log(127.5))


def dequantize(key, x):
  """Uniform dequantization of images in [-1, 1] that hold k/127.5 - 1."""
  return x + jax.random.uniform(key, x.shape, x.dtype, 0.0, 1.0 / 127.5)


def standard_normal_nll(z):
  """sum -log N(z; 0, 1) over all but the batch axis, in nats: [B, ...] -> [B]."""
  z = z.reshape(z.shape[0], -1)
  return jnp.sum(0.5 * jnp.square(z) + 0.5 * np.log(2 * np.pi), axis=1)


def bits_per_dim(z, logdet):
  """Per-example bpd of [0, 256) data and its two terms, each [B].

  bpd = prior - logdet with prior = (NLL(z) + M log 127.5) / (M ln 2) and
  logdet = logdet / (M ln 2), M the number of sub-pixels.
  """
  m = np.prod(z.shape[1:])
  prior = (standard_normal_nll(z) + m * LOG_127_5) / (m * np.log(2))
  logdet_bpd = logdet / (m * np.log(2))
  return {"bpd": prior - logdet_bpd, "prior_bpd": prior, "logdet_bpd": logdet_bpd}
