"""JetFormer: a Gemma decoder over text tokens and Jet's soft image tokens (docs/method.md, 2).

The image path (`encode`/`decode`) patchifies, optionally pre-projects each
patch, runs the Jet adaptor on the token grid (ps=1) and splits the latent
into the `latent_dim` soft tokens the decoder models and the factored-out rest.
`__call__` lays out both sequence orders, runs the decoder once and returns
the outputs at the positions that predict text and image tokens.

Vocabulary: the base vocabulary (tokenizer pieces, or class ids), then BOS,
BOI and NOLABEL. Class tokens are repeated `num_vocab_repeats` times, text
slot j embedded by table j % num_vocab_repeats (table 0 also embeds the
special tokens and, when tied, gives the text logits).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jetformer import sharding
from jetformer.models import gemma, gmm, vit
from jetformer.models import jet as jet_lib

PRE_PROJS = ("none", "learned", "pca")


@dataclasses.dataclass(frozen=True)
class JetFormerConfig:
  image_shape: tuple                    # (H, W, C)
  jet: jet_lib.JetConfig                # the adaptor, on the (H/p, W/p, p*p*C) grid with ps=1
  decoder: gemma.DecoderConfig
  patch_size: int = 16
  latent_dim: int = 128                 # d soft-token dims modelled, the rest ~ N(0, 1); 0: all
  num_mixtures: int = 1024
  vocab_size: int = 1000                # base vocabulary: tokenizer pieces or classes
  num_vocab_repeats: int = 1
  tie_embeddings: bool = True
  noncausal_prefix: bool = False        # the prefix attends to itself bidirectionally
  pre_proj: str = "none"                # a PRE_PROJS value (ablations)
  pca_path: str = ""                    # .npz with "mean" [D], "components" [D, D] (pre_proj=pca)
  head_dtype: str = "float32"

  def __post_init__(self):
    h, w, c = self.image_shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by patch_size={p}.")
    want = (h // p, w // p, p * p * c)
    if tuple(self.jet.image_shape) != want or self.jet.ps != 1:
      raise ValueError(f"The Jet adaptor must run on the token grid {want} with ps=1, "
                       f"got image_shape={self.jet.image_shape}, ps={self.jet.ps}.")
    if not 0 <= self.latent_dim <= self.token_dim:
      raise ValueError(f"latent_dim={self.latent_dim} must be in [0, {self.token_dim}] "
                       "(0: model all dims, no factoring out).")
    if self.pre_proj not in PRE_PROJS:
      raise ValueError(f"pre_proj={self.pre_proj!r}: use one of {PRE_PROJS}.")
    if self.pre_proj == "pca" and not self.pca_path:
      raise ValueError("pre_proj='pca' needs pca_path: make one with "
                       "`python -m input_pipeline.pca --config=... --out=pca.npz`.")

  @property
  def soft_dim(self):     # d, the dims per token the decoder models
    return self.latent_dim or self.token_dim

  @property
  def num_tokens(self):   # N image tokens
    h, w, _ = self.image_shape
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def token_dim(self):    # D = p*p*C
    return self.patch_size ** 2 * self.image_shape[2]

  @property
  def bos(self):
    return self.vocab_size

  @property
  def boi(self):
    return self.vocab_size + 1

  @property
  def nolabel(self):
    return self.vocab_size + 2

  @property
  def total_vocab(self):
    return self.vocab_size + 3


class Outputs(NamedTuple):
  text_logits: jax.Array   # [B, L, V] predicting text slot j
  image: gmm.Mixture       # [B, N, ...] predicting soft token i


def patchify(x, p):       # [B, H, W, C] -> [B, N, p*p*C]
  return jet_lib.patchify(x, p)


class PreProjection(nnx.Module):
  """y = (x - mean) @ W per patch; log|det W| per token joins the logdet."""

  def __init__(self, cfg: JetFormerConfig, *, rngs):
    del rngs
    d = cfg.token_dim
    if cfg.pre_proj == "learned":
      self.mean = jet_lib.Frozen(jnp.zeros((d,)), axes=(None,))
      self.matrix = nnx.Param(jnp.eye(d), axes=("patch", None))
    else:  # pca: frozen, from a file made by jetformer/pca.py
      with np.load(cfg.pca_path) as f:
        mean, comps = f["mean"], f["components"]
      if comps.shape != (d, d):
        raise ValueError(f"{cfg.pca_path}: components {comps.shape}, need ({d}, {d}).")
      self.mean = jet_lib.Frozen(jnp.asarray(mean, jnp.float32), axes=(None,))
      self.matrix = jet_lib.Frozen(jnp.asarray(comps, jnp.float32), axes=(None, None))

  def __call__(self, x, inverse=False):  # [B, N, D] -> [B, N, D], logdet per token
    w = self.matrix[...]
    logdet = jnp.linalg.slogdet(w)[1]
    if inverse:
      return x @ jnp.linalg.inv(w) + self.mean[...], -logdet
    return (x - self.mean[...]) @ w, logdet


class JetFormer(nnx.Module):

  def __init__(self, cfg: JetFormerConfig, *, rngs):
    self.cfg = cfg
    width = cfg.decoder.width
    self.jet = jet_lib.Jet(cfg.jet, rngs=rngs)
    self.pre_proj = PreProjection(cfg, rngs=rngs) if cfg.pre_proj != "none" else None
    self.decoder = gemma.Decoder(cfg.decoder, rngs=rngs)
    # Variance 1/width, scaled by sqrt(width) on input: unit-scale inputs and logits.
    self.embed = vit.param(jax.nn.initializers.normal(1 / np.sqrt(width)), rngs.params(),
                           (cfg.num_vocab_repeats, cfg.total_vocab, width),
                           (None, "vocab", "embed"))
    self.image_in = vit.Dense(cfg.soft_dim, width, axes=("soft_tokens", "embed"), rngs=rngs)
    self.text_out = None if cfg.tie_embeddings else vit.Dense(
        width, cfg.total_vocab, axes=("embed", "vocab"), rngs=rngs,
        kernel_init=jax.nn.initializers.zeros)
    self.head = gmm.Head(width, cfg.num_mixtures, cfg.soft_dim, rngs=rngs,
                         dtype=cfg.head_dtype)

  # --- Image path -------------------------------------------------------------

  def adaptor_input(self, x):
    """x [B, H, W, C] -> the Jet adaptor's input grid [B, h, w, D], its logdet so far [B]."""
    cfg = self.cfg
    b, (h, w, d_tok) = x.shape[0], cfg.jet.image_shape
    tokens = patchify(x, cfg.patch_size)                            # [B, N, D]
    logdet = jnp.zeros((b,))
    if self.pre_proj is not None:
      tokens, ld = self.pre_proj(tokens)
      logdet = logdet + ld * cfg.num_tokens
    return tokens.reshape(b, h, w, d_tok), logdet

  def encode(self, x):
    """x [B, H, W, C] (dequantized) -> soft [B, N, d], factored [B, N, D-d], logdet [B]."""
    cfg = self.cfg
    grid, logdet = self.adaptor_input(x)
    z, ld = self.jet(grid)                                          # [B, h, w, D]
    z = z.reshape(x.shape[0], cfg.num_tokens, -1)
    return z[..., :cfg.soft_dim], z[..., cfg.soft_dim:], logdet + ld

  def decode(self, soft, factored):
    """Inverse of `encode`: soft [B, N, d], factored [B, N, D-d] -> x [B, H, W, C]."""
    cfg = self.cfg
    b, (h, w, d_tok) = soft.shape[0], cfg.jet.image_shape
    z = jnp.concatenate([soft, factored], -1).reshape(b, h, w, d_tok)
    tokens, _ = self.jet.inverse(z)
    tokens = tokens.reshape(b, cfg.num_tokens, d_tok)
    if self.pre_proj is not None:
      tokens, _ = self.pre_proj(tokens, inverse=True)
    return jet_lib.unpatchify(tokens, cfg.patch_size, h)

  # --- Sequence model -----------------------------------------------------------

  def embed_text(self, tokens, offset=0):
    """[B, L] -> [B, L, W]; slot j (counted from `offset`) uses table j % R."""
    table = (offset + jnp.arange(tokens.shape[1])) % self.cfg.num_vocab_repeats  # [L]
    return self.embed[...][table[None, :], tokens] * np.sqrt(self.cfg.decoder.width)

  def embed_special(self, token, batch):  # -> [B, 1, W]
    e = self.embed[...][0, token] * np.sqrt(self.cfg.decoder.width)
    return jnp.broadcast_to(e, (batch, 1, e.shape[-1]))

  def text_logits(self, h):  # [B, L, W] -> [B, L, V]
    if self.text_out is not None:
      return self.text_out(h).astype(jnp.float32)
    w = self.embed[...][0]                                           # [V, W]
    return jnp.einsum("BLW,VW->BLV", h, w, preferred_element_type=jnp.float32)

  def __call__(self, text, text_mask, soft, text_first, dropout_key=None):
    """Both orders in one decoder pass.

    Args:
      text: [B, L] int32 tokens (class-conditional: the label in every slot).
      text_mask: [B, L] 1 on real tokens.
      soft: [B, N, d] soft image tokens (the decoder's inputs; noised by the caller).
      text_first: [B] bool; True: [BOS, text, BOI, image], else [BOI, image, BOS, text].
    Returns:
      Outputs at the positions predicting each text slot and each image token.
    """
    cfg = self.cfg
    b, l = text.shape
    n = soft.shape[1]
    txt = self.embed_text(text)                                      # [B, L, W]
    img = self.image_in(soft)                                        # [B, N, W]
    bos, boi = self.embed_special(cfg.bos, b), self.embed_special(cfg.boi, b)
    ones = lambda k: jnp.ones((b, k), bool)
    m = text_mask.astype(bool)
    seq_t = jnp.concatenate([bos, txt, boi, img[:, :-1]], 1)        # [B, T=L+N+1, W]
    seq_i = jnp.concatenate([boi, img, bos, txt[:, :-1]], 1)
    valid_t = jnp.concatenate([ones(1), m, ones(n)], 1)              # [B, T]
    valid_i = jnp.concatenate([ones(n + 2), m[:, :-1]], 1)
    first = text_first[:, None]
    x = jnp.where(first[..., None], seq_t, seq_i)
    valid = jnp.where(first, valid_t, valid_i)
    prefix_len = jnp.where(text_first, l + 1, n + 1)                 # [B]: BOS+text / BOI+image
    mask = attention_mask(valid, prefix_len, cfg.noncausal_prefix)   # [B, T, T]
    h = self.decoder(sharding.constrain_batch(x), jnp.cumsum(valid, 1) - 1, mask, dropout_key)
    h = sharding.constrain_batch(h)                                  # [B, T, W]
    h_text = jnp.where(first[..., None], h[:, :l], h[:, n + 1:n + 1 + l])
    h_img = jnp.where(first[..., None], h[:, l + 1:l + 1 + n], h[:, :n])
    return Outputs(self.text_logits(h_text), self.head(h_img))


def attention_mask(valid, prefix_len, noncausal_prefix):
  """[B, T, T]: causal over valid keys; optionally full attention within the prefix."""
  t = valid.shape[1]
  idx = jnp.arange(t)
  mask = (idx[:, None] >= idx[None, :])[None] & valid[:, None, :]
  if noncausal_prefix:
    in_prefix = idx[None, :] < prefix_len[:, None]                   # [B, T]
    mask |= in_prefix[:, :, None] & in_prefix[:, None, :] & valid[:, None, :]
  return mask
