"""JetFormer train-step throughput: python -m bench.jetformer --config=JF-small.

Times the full class-conditional update (RGB noise, dequantization, Jet
adaptor, factoring out, decoder with dropout, GMM and text heads, both losses,
backward, clip, Adam) on random images and labels, on whatever devices JAX
sees. Prints one JSON line at the end. Needs no TensorFlow.
"""

import argparse
import functools
import json

import jax

from bench import timing
from jetformer import objectives, optim, steps
from jetformer.models import gemma
from jetformer.models import jet as jet_lib
from jetformer.models import jetformer as jf

# JF-small: 32x32 images, patch 4 (64 tokens of 48 dims, 32 modelled, 16 factored out).
CONFIGS = {
    "JF-small": dict(
        image=32, batch=16, patch_size=4, latent_dim=32, num_mixtures=64, vocab_size=1000,
        num_vocab_repeats=16,
        jet=dict(depth=4, block_depth=1, emb_dim=128, num_heads=4, kinds=("channels",)),
        decoder=dict(width=256, depth=4, mlp_dim=1024, num_heads=4, num_kv_heads=1,
                     head_dim=64, dropout=0.1)),
    # The paper's 350M class-conditional ImageNet 256 model (configs/jetformer_imagenet256.py):
    # 256 tokens of 768 dims, 128 modelled; a batch that fills one GPU.
    "JF-350M": dict(
        image=256, batch=64, patch_size=16, latent_dim=128, num_mixtures=1024, vocab_size=1000,
        num_vocab_repeats=16,
        jet=dict(depth=32, block_depth=4, emb_dim=512, num_heads=8, kinds=("channels",)),
        decoder=dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, num_kv_heads=1,
                     head_dim=64, dropout=0.1)),
}


def model_config(spec, remat, scan, **policy):
  """JetFormerConfig of a setting; `policy`: dtype and attention_impl of both stacks."""
  spec = dict(spec)
  size, p = spec.pop("image"), spec["patch_size"]
  spec.pop("batch")
  jet = jet_lib.JetConfig(image_shape=(size // p, size // p, p * p * 3), ps=1, remat=remat,
                          scan=scan, **policy, **spec.pop("jet"))
  dec = gemma.DecoderConfig(remat=remat, scan=scan, **policy, **spec.pop("decoder"))
  return jf.JetFormerConfig(image_shape=(size, size, 3), jet=jet, decoder=dec, **spec)


def train_step(cfg, tx, **kw):
  graphdef, _, _ = steps.abstract_model(cfg)
  objective = objectives.JetFormerObjective(noise_sigma0=64.0)
  return jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=0.0,
                                   objective=objective, total_steps=1000), **kw)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", choices=sorted(CONFIGS), default="JF-small")
  parser.add_argument("--remat", choices=sorted(gemma.REMAT_POLICIES), default="dots")
  parser.add_argument("--batch", type=int, default=0, help="override the batch size")
  parser.add_argument("--dtype", default="bfloat16", help="matmul algorithm (precision.py)")
  parser.add_argument("--attention_impl", default=None, choices=["xla", "cudnn"],
                      help="jax.nn.dot_product_attention's implementation (default: XLA)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  spec = CONFIGS[args.config]
  batch, size = args.batch or spec["batch"], spec["image"]
  policy = dict(dtype=args.dtype, attention_impl=args.attention_impl)
  cfg = model_config(spec, args.remat, scan=True, **policy)

  tx = optim.make(lr=1e-3, total_steps=1000, weight_decay=1e-4)
  _, state, data = timing.setup(cfg, tx, size, batch, spec["vocab_size"])
  key = jax.random.key(0)
  first_step_s, step_s, state, metrics = timing.time_steps(
      train_step(cfg, tx, donate_argnums=0), state, data, key,
      warmup=args.warmup, steps=args.steps)
  # Cost analysis counts a scan body once: take it on the unrolled model.
  unrolled = model_config(spec, args.remat, scan=False, **policy)
  flops = timing.flops(train_step(unrolled, tx), state, data, key)
  result = timing.report(config=args.config, remat=args.remat, batch=batch, **policy,
                         first_step_s=first_step_s, step_s=step_s, flops_per_step=flops)
  print(json.dumps({**result, "loss": float(metrics["loss"])}))


if __name__ == "__main__":
  main()
