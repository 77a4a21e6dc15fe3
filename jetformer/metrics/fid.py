"""FID, Inception Score and k-NN precision/recall of Inception features.

The math is numpy on the host, in float64: arrays in, numbers out.
`inception_features` runs the network (`inception.py`) over image batches
sharded over a mesh, and `save_reference` / `load_reference` cache a data
set's statistics in an .npz with pytorch-fid's key names ('mu', 'sigma'), so
files written by `python -m pytorch_fid --save-stats` load too (computed on
pytorch-fid's input path: compare them with a network converted from its .pth).
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetformer import sharding


def statistics(features):
  """Mean [D] and covariance [D, D] (ddof 1, as pytorch-fid) of features [N, D]."""
  x = np.asarray(features, np.float64)
  return x.mean(0), np.cov(x, rowvar=False)


def _factor(sigma):
  """L [D, D] with L @ L.T = sigma, for a symmetric PSD sigma."""
  w, v = np.linalg.eigh(sigma)
  return v * np.sqrt(np.clip(w, 0, None))


def _trace_sqrt_product(sigma1, sigma2):
  """tr(sqrtm(sigma1 @ sigma2)) for symmetric PSD covariances.

  With sigma_i = L_i @ L_i.T, sigma1 @ sigma2 has the eigenvalues of
  (L2.T L1).T (L2.T L1), so the trace is the sum of the singular values of
  L2.T @ L1. Unlike a general sqrtm this has no complex round-off, does not
  fail on singular covariances, and takes no square root of an eigenvalue
  that round-off made tiny (identical statistics give 0 to ~1e-13, not ~1e-5).
  """
  return np.linalg.svd(_factor(sigma2).T @ _factor(sigma1), compute_uv=False).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) of two Gaussians.

  `eps` times the identity is added to both covariances only if their
  decompositions fail to converge, as pytorch-fid does when its sqrtm fails.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"Mismatched statistics: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}.")
  if not all(np.isfinite(x).all() for x in (mu1, mu2, s1, s2)):
    raise ValueError("Non-finite statistics.")
  try:
    tr_covmean = _trace_sqrt_product(s1, s2)
  except np.linalg.LinAlgError:
    offset = eps * np.eye(len(s1))
    tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
  """(mean, std) over `splits` parts of exp(E_x KL(p(y|x) || p(y))), from logits [N, K].

  As Salimans et al. (2016): consecutive parts, np.std (ddof 0). Their code, and
  torch-fidelity, feed the 1008 logits without the fc bias (`fc_bias=False`).
  """
  z = np.asarray(logits, np.float64)
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))  # [N, K] log p(y|x)
  n = len(logp)
  if n < splits:
    raise ValueError(f"{n} samples for {splits} splits.")
  scores = []
  for i in range(splits):
    part = logp[i * n // splits:(i + 1) * n // splits]  # [n/splits, K]
    p = np.exp(part)
    log_py = np.log(p.mean(0))  # [K]
    scores.append(np.exp((p * (part - log_py)).sum(1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(a, b, b_sq):
  """[n, m] squared Euclidean distances of rows of a [n, D] to rows of b [m, D]."""
  a_sq = np.einsum("nd,nd->n", a, a)
  return np.maximum(a_sq[:, None] - 2 * a @ b.T + b_sq[None], 0)


def _knn_radii(x, k, block):
  """[N] squared distance of each row of x [N, D] to its k-th nearest other row."""
  if not 0 < k < len(x):
    raise ValueError(f"k={k} needs more than k points, got {len(x)}.")
  x_sq = np.einsum("nd,nd->n", x, x)
  radii = [np.partition(_sq_distances(x[i:i + block], x, x_sq), k, axis=1)[:, k]  # itself at 0
           for i in range(0, len(x), block)]
  return np.concatenate(radii)


def _in_manifold(queries, points, radii, block):
  """[Q] whether each query lies within radii[j] of some points[j]."""
  p_sq = np.einsum("nd,nd->n", points, points)
  inside = [(_sq_distances(queries[i:i + block], points, p_sq) <= radii[None]).any(1)
            for i in range(0, len(queries), block)]
  return np.concatenate(inside)


def precision_recall(real, fake, k=3, block=500):
  """(precision, recall) of Kynkaenniemi et al. (2019) with k-NN manifolds.

  Precision: the fraction of fake samples inside the real manifold (the union
  of balls around each real sample reaching its k-th nearest real neighbour);
  recall, the converse. Distances are computed `block` rows at a time:
  memory is O(block * N), so 50k x 50k sets fit.
  """
  real = np.asarray(real, np.float64)  # [N, D]
  fake = np.asarray(fake, np.float64)  # [M, D]
  precision = _in_manifold(fake, real, _knn_radii(real, k, block), block).mean()
  recall = _in_manifold(real, fake, _knn_radii(fake, k, block), block).mean()
  return float(precision), float(recall)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, images, fc_bias):
  return nnx.merge(graphdef, state)(images, fc_bias=fc_bias)


def _check_pixels(x):
  """Images in [-1, 1] (the models' range) would be clipped to near-black pixels."""
  if len(x) and np.min(x) < 0:
    raise ValueError("Inception batches are pixel values in [0, 255], not negative "
                     "(images in [-1, 1]? pass (x + 1) * 127.5).")


def _pad(x, size):
  """numpy [n, ...] -> [size, ...] with zero rows after the n real ones."""
  return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def inception_features(model, batches, *, mesh=None, fc_bias=False):
  """(pool features [N, 2048], logits [N, 1008] or None) as numpy float32 on every host.

  Each device of `mesh` (all devices of all hosts) computes its rows of every
  batch; the features are gathered to every host, which is what the
  statistics and the k-NN precision/recall need.

  Args:
    model: an `inception.InceptionV3`; without a classifier head the logits are None.
    batches: iterable of global [B, H, W, 3] batches of pixel values in [0, 255]
      (uint8 or float): numpy arrays that every host holds whole (a batch
      smaller than the first is padded, not recompiled), or jax.Arrays already
      sharded over the batch on `mesh`.
    mesh: the devices to run on; by default this host's first device.
    fc_bias: whether the logits add the fc bias (the Inception Score does not).
  """
  if mesh is None:
    mesh = sharding.make_mesh((("data", 1),), jax.local_devices()[:1])
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.replicated(mesh))
  pools, logits, size = [], [], None
  for x in batches:
    n = len(x)
    if not isinstance(x, jax.Array):
      _check_pixels(x)
      size = max(size or 0, -(-n // mesh.size) * mesh.size)   # a multiple of the devices
      x = sharding.put_batch(_pad(np.asarray(x), size), mesh)
    p, l = sharding.to_host(_forward(graphdef, state, x, fc_bias))  # jit follows x's sharding
    pools.append(p[:n])
    logits.append(None if l is None else l[:n])
  return np.concatenate(pools), (None if model.fc is None else np.concatenate(logits))


@dataclasses.dataclass(frozen=True)
class Reference:
  """A data set's Inception statistics; `features` [N, 2048] only for precision/recall,
  `network` the `inception.fingerprint` they were computed with, if recorded."""
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray] = None
  network: Optional[str] = None


def save_reference(path, features, *, keep_features=True, network=None):
  """Writes mu, sigma (and the features [N, D] themselves, the network's fingerprint)
  of `features` to an .npz."""
  mu, sigma = statistics(features)
  extra = {"features": np.asarray(features, np.float32)} if keep_features else {}
  if network is not None:
    extra["network"] = np.array(network)
  np.savez(path, mu=mu, sigma=sigma, **extra)
  return Reference(mu, sigma, extra.get("features"), network)


def load_reference(path):
  with np.load(path) as f:
    return Reference(f["mu"], f["sigma"], f["features"] if "features" in f.files else None,
                     str(f["network"]) if "network" in f.files else None)


def image_metrics(pool, logits, reference, *, k=3, splits=10):
  """{'fid'[, 'inception_score', 'inception_score_std'][, 'precision', 'recall']} of samples.

  pool [N, 2048] and logits [N, 1008] (None: a network without a classifier
  head, no Inception Score) come from `inception_features`; precision and
  recall need `reference.features`.
  """
  mu, sigma = statistics(pool)
  out = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
  if logits is not None:
    out["inception_score"], out["inception_score_std"] = inception_score(logits, splits)
  if reference.features is not None:
    out["precision"], out["recall"] = precision_recall(reference.features, pool, k)
  return out
