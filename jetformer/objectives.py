"""Training objectives: a model and a batch in, a scalar loss and metrics out."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jetformer import losses
from jetformer.models import gmm


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


@dataclasses.dataclass(frozen=True)
class JetObjective:
  label_drop_prob: float = 0.0      # class -> "no label", for classifier-free guidance


@dataclasses.dataclass(frozen=True)
class JetFormerObjective:
  """The training-time choices of the JetFormer loss (docs/method.md, sections 2.1 and 2.5)."""
  text_prefix_prob: float = 1.0     # P(text first): 1 = image generation only
  text_loss_weight: float = 1.0
  loss_on_prefix: bool = False      # also train on the first modality (the condition)
  cfg_drop_prob: float = 0.1        # text-first prefix -> NOLABEL, for classifier-free guidance
  noise_sigma0: float = 0.0         # RGB noise curriculum, in [0, 255] units: start ...
  noise_sigma_final: float = 0.0    # ... and end of the cosine
  teacher_noise: float = 0.3        # soft-token input noise s*N(0,1), s ~ U[0, teacher_noise]
  frozen_flow: bool = False         # no gradient into the Jet adaptor (ablation)


def noise_sigma(progress, sigma0, sigma_final):
  """Cosine from sigma0 at progress 0 to sigma_final at progress 1."""
  return sigma_final + (sigma0 - sigma_final) * (1 + jnp.cos(jnp.pi * progress)) / 2


def rgb_noise(key, image, sigma):
  """Gaussian noise of std sigma on [0, 255] pixels, rounded, back to [-1, 1]."""
  x = (image + 1) * 127.5 + sigma * jax.random.normal(key, image.shape)
  return jnp.clip(jnp.round(x), 0, 255) / 127.5 - 1


def text_inputs(cfg, batch):
  """(tokens [B, L], mask [B, L]): the caption, or the label in every class slot."""
  if "text" in batch:
    return batch["text"], batch["text_mask"]
  label = batch["label"].astype(jnp.int32)
  shape = (label.shape[0], cfg.num_vocab_repeats)
  return jnp.broadcast_to(label[:, None], shape), jnp.ones(shape, jnp.int32)


def drop_prefix(cfg, text, mask, drop):
  """Where drop [B]: the prefix becomes a single NOLABEL token."""
  first_only = (jnp.arange(text.shape[1]) == 0)[None].astype(mask.dtype)
  return (jnp.where(drop[:, None], cfg.nolabel, text),
          jnp.where(drop[:, None], first_only, mask))


def masked_mean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1)


def jetformer_terms(model, batch, key, obj, *, progress=1.0, text_first=None, train=True):
  """Per-example image bits/subpixel and per-token text NLL, with their weights.

  Args:
    progress: step / total steps (the noise curriculum's t).
    text_first: [B] bool order to force (evaluation); None draws it with text_prefix_prob.
    train: RGB noise, CFG dropping, teacher-forcing noise and dropout on.
  """
  cfg = model.cfg
  ks = jax.random.split(key, 7)
  text, text_mask = text_inputs(cfg, batch)
  b = text.shape[0]
  x, sigma = flow_input(ks[:2], batch["image"], obj, progress, train)
  soft, factored, logdet = model.encode(x)                        # [B, N, d] ...
  if obj.frozen_flow:
    soft, factored, logdet = jax.lax.stop_gradient((soft, factored, logdet))
  if text_first is None:
    text_first = jax.random.bernoulli(ks[2], obj.text_prefix_prob, (b,))
  drop = text_first & jax.random.bernoulli(ks[3], obj.cfg_drop_prob if train else 0.0, (b,))
  inputs = soft
  if train and obj.teacher_noise:
    s = jax.random.uniform(ks[4], (b, 1, 1), maxval=obj.teacher_noise)
    inputs = soft + jnp.where(text_first[:, None, None], s, 0) * jax.random.normal(
        ks[5], soft.shape)
  out = model(*drop_prefix(cfg, text, text_mask, drop), inputs, text_first,
              dropout_key=ks[6] if train else None)
  m = np.prod(x.shape[1:])
  nll_gmm = -jnp.sum(gmm.log_prob(out.image, soft), 1)                    # [B]
  nll_factored = losses.standard_normal_nll(factored)                     # [B]
  logdet_bpd = (logdet / m - losses.LOG_127_5) / np.log(2)
  image_bpd = (nll_gmm + nll_factored) / m / np.log(2) - logdet_bpd      # [B]
  logp = jax.nn.log_softmax(out.text_logits, -1)
  text_nll = -jnp.take_along_axis(logp, text[..., None], -1)[..., 0]     # [B, L]
  return dict(image_bpd=image_bpd, nll_gmm_bpd=nll_gmm / m / np.log(2),
              nll_factored_bpd=nll_factored / m / np.log(2), logdet_bpd=logdet_bpd,
              text_nll=text_nll, text_mask=text_mask * ~drop[:, None],
              text_first=text_first, noise_sigma=sigma)


def jetformer_loss(model, batch, key, obj, progress):
  """The training loss (image bits/subpixel + weighted text NLL) and its terms."""
  t = jetformer_terms(model, batch, key, obj, progress=progress)
  first = t["text_first"].astype(jnp.float32)                             # [B]
  img_w = jnp.maximum(first, float(obj.loss_on_prefix))
  txt_w = jnp.maximum(1 - first, float(obj.loss_on_prefix))[:, None] * t["text_mask"]
  loss = (masked_mean(t["image_bpd"], img_w)
          + obj.text_loss_weight * masked_mean(t["text_nll"], txt_w))
  metrics = {"image_bpd": masked_mean(t["image_bpd"], first),
             "noise_sigma": jnp.asarray(t["noise_sigma"], jnp.float32)}
  metrics.update({k: jnp.mean(t[k]) for k in ("nll_gmm_bpd", "nll_factored_bpd", "logdet_bpd")})
  if obj.text_prefix_prob < 1:  # some examples are image-first: captioning
    metrics["image_bpd_prefix"] = masked_mean(t["image_bpd"], 1 - first)
    metrics["text_nll"] = masked_mean(t["text_nll"], (1 - first)[:, None] * t["text_mask"])
  if obj.text_prefix_prob > 0 and obj.loss_on_prefix:
    metrics["text_nll_prefix"] = masked_mean(t["text_nll"], first[:, None] * t["text_mask"])
  metrics["loss"] = loss
  return loss, metrics


def flow_input(keys, image, obj, progress, train):
  """JetFormer's flow input [B, H, W, C] and the RGB noise level in it: in training, the
  curriculum's noise at `progress` (keys[0]), then dequantization noise (keys[1])."""
  k_rgb, k_deq = keys
  sigma = noise_sigma(progress, obj.noise_sigma0, obj.noise_sigma_final) if train else 0.0
  if train and (obj.noise_sigma0 or obj.noise_sigma_final):
    image = rgb_noise(k_rgb, image, sigma)
  return losses.dequantize(k_deq, image), sigma


def init_actnorm(model, batch, key, objective):
  """Glow's data-dependent ActNorm init (Jet.init_actnorm) from one batch as the first
  train step sees it, for a Jet or a JetFormer's adaptor; a no-op without ActNorm."""
  if isinstance(objective, JetObjective):
    x = losses.dequantize(key, batch["image"])                   # [B, H, W, C]
    model.init_actnorm(x, jet_context(model, batch["label"]))
  else:
    x, _ = flow_input(jax.random.split(key), batch["image"], objective, 0.0, train=True)
    model.jet.init_actnorm(model.adaptor_input(x)[0])


def loss(model, batch, key, objective, progress):
  """(scalar loss, metrics) of the model under `objective` (a Jet- or JetFormerObjective)."""
  if isinstance(objective, JetObjective):
    return jet_loss(model, batch, key, objective.label_drop_prob)
  return jetformer_loss(model, batch, key, objective, progress)


def eval_sums(model, batch, key, objective):
  """{metric: (sum, count)} over the examples with batch["mask"] = 1.

  Jet: bits/dim and its terms. JetFormer: the image's bits/subpixel given the
  text (text first), and, for studies that also caption, the text NLL per
  token given the image (image first).
  """
  mask = batch["mask"]                                                   # [B]
  count = jnp.sum(mask)
  if isinstance(objective, JetObjective):
    return {k: (jnp.sum(v * mask), count) for k, v in jet_bpd(model, batch, key).items()}
  k_img, k_txt = jax.random.split(key)
  ones = jnp.ones(mask.shape, bool)
  t = jetformer_terms(model, batch, k_img, objective, text_first=ones, train=False)
  out = {k: (jnp.sum(t[k] * mask), count)
         for k in ("image_bpd", "nll_gmm_bpd", "nll_factored_bpd", "logdet_bpd")}
  if objective.text_prefix_prob < 1:
    t = jetformer_terms(model, batch, k_txt, objective, text_first=~ones, train=False)
    w = t["text_mask"] * mask[:, None]
    out["text_nll"] = (jnp.sum(t["text_nll"] * w), jnp.sum(w))
  return out
