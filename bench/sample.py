"""JetFormer image-sampling throughput: python -m bench.sample --config=JF-small --cfg=3.

Samples `--batch` class-conditional images with the JF-small model of
bench/jetformer.py (random weights; a random GMM head so that the conditional
and unconditional mixtures differ): prefill, N decode steps of the decoder and
the GMM head, guided or plain drawing, N(0, 1) factored dims, the flow
inverse. Modes: `cache` (KV cache), `recompute` (the whole prefix every step)
and `rejection` (KV cache, every guided dim by rejection sampling). `--image=64`
gives 256 tokens. Prints one JSON line at the end. Needs no TensorFlow.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import jetformer as train_bench
from jetformer import sampling, sharding, steps


def random_model(cfg):
  """The model with its zero-initialised GMM head replaced by a random one."""
  model = steps.build(cfg, nnx.Rngs(0))
  kernel = model.head.proj.kernel
  kernel[...] = 0.02 * jax.random.normal(jax.random.key(1), kernel.shape)
  return model


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", choices=sorted(train_bench.CONFIGS), default="JF-small")
  parser.add_argument("--cfg", type=float, default=3.0, help="guidance weight; 0: none")
  parser.add_argument("--mode", choices=("cache", "recompute", "rejection"), default="cache")
  parser.add_argument("--image", type=int, default=0, help="image size (32: 64 tokens)")
  parser.add_argument("--batch", type=int, default=0, help="override the batch size")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  spec = dict(train_bench.CONFIGS[args.config])
  spec["image"] = args.image or spec["image"]
  batch = args.batch or spec["batch"]
  cfg = train_bench.model_config(spec, "none", scan=True)
  opts = sampling.ImageOptions(cfg_weight=args.cfg, t_scale=0.94,
                               use_cache=args.mode != "recompute",
                               rejection_only=args.mode == "rejection")
  mesh = sharding.make_mesh([("data", -1)])
  graphdef, state = nnx.split(random_model(cfg))
  state = jax.device_put(state, sharding.replicated(mesh))
  labels = jnp.asarray(np.arange(batch) % cfg.vocab_size, jnp.int32)
  text, mask = sampling.class_prompt(cfg, labels)
  text, mask = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in (text, mask))

  @jax.jit
  def sample(state, key, text, mask):
    return sampling.sample_images(nnx.merge(graphdef, state), key, text, mask, opts)

  t = time.perf_counter()
  compiled = sample.lower(state, jax.random.key(0), text, mask).compile()
  images = jax.block_until_ready(compiled(state, jax.random.key(0), text, mask))
  first = time.perf_counter() - t
  times = []
  for i in range(args.repeats):
    t = time.perf_counter()
    images = jax.block_until_ready(compiled(state, jax.random.key(i + 1), text, mask))
    times.append(time.perf_counter() - t)
  seconds = statistics.median(times)
  n = cfg.num_tokens
  print(json.dumps({
      "config": args.config, "mode": args.mode, "cfg": args.cfg, "devices": jax.device_count(),
      "backend": jax.default_backend(), "batch": batch, "image_tokens": n,
      "sample_s_median": round(seconds, 4), "first_call_s": round(first, 2),
      "tokens_per_s": round(batch * n / seconds, 1),
      "images_per_s": round(batch / seconds, 2),
      "finite": bool(np.isfinite(np.asarray(images)).all())}))


if __name__ == "__main__":
  main()
