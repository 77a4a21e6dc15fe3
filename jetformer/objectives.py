"""Training objectives: a model and a batch in, a scalar loss and metrics out."""

import jax
import jax.numpy as jnp

from jetformer import losses


def jet_context(jet, labels, key=None, drop_prob=0.0):
  """Class context for a class-conditional Jet ([B, 1, E]), None otherwise."""
  if not jet.cfg.num_classes:
    return None
  return jet.embed_labels(labels, key, drop_prob)


def jet_bpd(jet, batch, key, label_drop_prob=0.0):
  """Per-example bits/dim terms of a batch, with fresh dequantization noise."""
  k_noise, k_drop = jax.random.split(key)
  x = losses.dequantize(k_noise, batch["image"])                 # [B, H, W, C]
  z, logdet = jet(x, jet_context(jet, batch["label"], k_drop, label_drop_prob))
  return losses.bits_per_dim(z, logdet)                           # {name: [B]}


def jet_loss(jet, batch, key, label_drop_prob=0.0):
  terms = jet_bpd(jet, batch, key, label_drop_prob)
  metrics = {k: jnp.mean(v) for k, v in terms.items()}
  return metrics["bpd"], metrics
