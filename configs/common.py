"""Pieces shared by the study configs, and the `runlocal` shrink."""

import ml_collections

# jax.nn.dot_product_attention's implementation: unset (None) is XLA's, "cudnn" fused
# kernels on NVIDIA GPUs.
_ATTENTION_IMPL = ml_collections.config_dict.placeholder(str)

# The spatial patterns of the Jet paper's ImageNet studies, cycled over the spatial couplings.
ALL_SPATIAL = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv",
               "hstripes", "hstripes-inv")


# The Jet paper's ablations (docs/method.md, section 1.6); these are its choices.
# backbone "cnn": a residual CNN on the token grid instead of the ViT. In spatial
# couplings with split "pairing" it convolves the folded half-grid, whose
# neighbours are not the image's; with "masking" it sees the image's grid.
JET_ABLATIONS = dict(backbone="vit", split="pairing", actnorm=False, invertible_dense=False)


def jet_base(*, dataset, image_size, train_split="train", eval_split="validation"):
  """Every key a Jet study has; studies change values, never add keys."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = dict(name=dataset, data_dir=ml_collections.config_dict.placeholder(str), image_size=image_size, train_split=train_split,
                   eval_split=eval_split, flip=True, worker_count=0)
  c.model = dict(ps=4, depth=32, block_depth=2, emb_dim=512, num_heads=8, scale_factor=2.0,
                 kinds=("channels",) * 4 + ("spatial",), channel_projs=("random",),
                 spatial_projs=ALL_SPATIAL, num_classes=0, remat="dots_except_mlp_hidden",
                 scan=True, dtype="bfloat16",  # matmul algorithm (precision.py): TPUs, GPUs
                 attention_impl=_ATTENTION_IMPL, **JET_ABLATIONS)
  c.label_drop_prob = 0.0
  c.batch_size = 1024
  c.num_epochs = 200.0
  c.total_steps = 0                    # > 0 overrides num_epochs
  c.optim = dict(lr=3e-4, warmup_frac=0.1, b1=0.9, b2=0.95, mu_dtype="bfloat16",  # "": f32
                 weight_decay=1e-5, grad_clip=1.0)
  c.ema_decay = 0.0                    # > 0 keeps, evaluates and saves an EMA of the params
  c.init_from = ""                     # a workdir or WORKDIR/checkpoints/STEP: weights only
                                       # (jetformer/warm_start.py), when DIR has no checkpoint
  c.max_nonfinite_in_a_row = 20        # steps with a non-finite loss or gradient are skipped;
                                       # this many in a row stop the run
  c.mesh = (("data", 1), ("fsdp", -1))
  c.sharding_rules = (("embed", "fsdp"),)
  c.log_every = 100
  c.eval_every = 5000
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.eval_batch_size = 1024
  c.compare_png = False                # print PNG's and lossless WebP's bits/dim on the validation images
  # Sampling (evaluate.py --tasks=sample, the sample grid written while training).
  # cfg_weight, t_scale, t_probs and the prompts are JetFormer's; temperature is Jet's.
  c.sample = dict(labels=tuple(range(10)), prompts=(), prompts_file="", per_prompt=8,
                  cfg_weight=3.0, t_scale=0.94, t_probs=1.0, temperature=1.0, batch_size=64,
                  seed=0, every=0)         # every > 0: a sample grid to TensorBoard every N steps
  # FID / Inception Score / precision-recall (evaluate.py --tasks=fid): the FID Inception
  # weights converted by `python -m jetformer.metrics.convert_inception` (docs/evaluation.md).
  # floor_split: also score as many real images of this split (held out from the reference)
  # against the reference: what a model drawing fresh images of the data would get at this
  # sample size. Reading stops after num_samples images.
  c.fid = dict(inception_path="", num_samples=50_000, reference_split="", reference_path="",
               floor_split="", batch_size=200, k=3)  # reference_split "": dataset.eval_split
  c.final_tasks = ()                   # evaluation tasks main.py runs on the final checkpoint
  c.runlocal = False                   # True: apply `local` below (a few minutes on a laptop CPU)
  c.local = dict(model=dict(depth=4, block_depth=1, emb_dim=64, num_heads=2),
                 batch_size=8, total_steps=5, log_every=1, eval_every=5, ckpt_every=5,
                 eval_batch_size=64, optim=dict(mu_dtype=""))
  return c


def finalize(config, keep=()):
  """Applies `config.local` when `config.runlocal`, except to the dotted keys in `keep`.

  `keep` holds the keys set on the command line, so that an explicit
  `--config.batch_size=...` wins over the shrink.
  """
  if not config.runlocal:
    return config
  with config.unlocked():
    _merge(config, config.local.to_dict(), "", set(keep))
  return config


def _merge(config, overrides, prefix, keep):
  for key, value in overrides.items():
    name = prefix + key
    if isinstance(value, dict):
      _merge(config[key], value, name + ".", keep)
    elif name not in keep:
      config[key] = value


def command_line_keys(argv):
  """Dotted config keys set on the command line (--config.a.b=v), for `finalize`'s `keep`."""
  return {a.split("=")[0].removeprefix("--config.") for a in argv if a.startswith("--config.")}


# The offline demos train on CPUs, which have no bfloat16 products (precision.py).
CPU_DEMO_DTYPE = "float32"

# JetFormer decoder sizes (docs/method.md, section 2.3), picked by the studies' `variant` argument.
DECODERS = {
    "350M": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, head_dim=64),
    "1.3B": dict(width=1536, depth=48, mlp_dim=6144, num_heads=16, head_dim=96),
}


def jetformer_base(*, dataset, image_size, variant="350M", train_split="train",
                   eval_split="validation"):
  """Every key a JetFormer study has (the paper's class-conditional ImageNet 256 values)."""
  if variant not in DECODERS:
    raise ValueError(f"Unknown size {variant!r}: use one of {list(DECODERS)}.")
  c = jet_base(dataset=dataset, image_size=image_size, train_split=train_split,
               eval_split=eval_split)
  c.task = "jetformer"
  del c.label_drop_prob                  # JetFormer: objective.cfg_drop_prob
  # tokenizer: "" = class-conditional (the label is the text), "dataset" = the
  # dataset's own (offline demos), else a sentencepiece .model path.
  c.text = dict(tokenizer="", max_len=0)
  c.model = dict(
      patch_size=16, latent_dim=128, num_mixtures=1024, vocab_size=1000, num_vocab_repeats=16,
      tie_embeddings=True, noncausal_prefix=False, pre_proj="none", pca_path="",
      head_dtype="float32",
      jet=dict(depth=32, block_depth=4 if variant == "350M" else 6, emb_dim=512, num_heads=8,
               scale_factor=2.0, kinds=("channels",), channel_projs=("random",),
               spatial_projs=ALL_SPATIAL, num_classes=0, remat="full", scan=True,
               dtype="bfloat16", attention_impl=_ATTENTION_IMPL, **JET_ABLATIONS),
      # remat "full": with "dots" the 350M study needs 95.3 GiB per v5p chip at batch 2048
      # on 64 chips, over its 95; "full" 40.7 (1.3B: 44.6) at the same estimated MFU (aot.py).
      decoder=dict(DECODERS[variant], num_kv_heads=1, dropout=0.1, remat="full", scan=True,
                   dtype="bfloat16", rope_max_wavelength=10_000.0,
                   attention_impl=_ATTENTION_IMPL))
  c.objective = dict(text_prefix_prob=1.0, text_loss_weight=1.0, loss_on_prefix=False,
                     cfg_drop_prob=0.1, noise_sigma0=64.0, noise_sigma_final=0.0,
                     teacher_noise=0.3,
                     frozen_flow=False)  # True: the adaptor never trains; needs init_from a Jet
  c.caption = dict(num_examples=64, max_len=0, temperature=0.0, top_k=0, batch_size=64,
                   seed=0)               # max_len 0: text.max_len; temperature 0: greedy
  c.batch_size = 2048
  c.num_epochs = 500.0
  c.optim.update(lr=1e-3, weight_decay=1e-4)
  c.eval_batch_size = 256
  c.local = dict(
      model=dict(patch_size=4, latent_dim=16, num_mixtures=8,
                 jet=dict(depth=2, block_depth=1, emb_dim=32, num_heads=2),
                 decoder=dict(width=64, depth=2, mlp_dim=128, num_heads=2, head_dim=32)),
      dataset=dict(image_size=16), batch_size=8, total_steps=4, log_every=1, eval_every=4,
      ckpt_every=4, eval_batch_size=16, optim=dict(mu_dtype=""))
  return c
