"""big_vision's Jet train step on this machine: python -m bench.ref_big_vision --big_vision_dir=DIR.

A reference for bench/jet.py's speed goal, timed on the same machine rather
than taken from elsewhere: the official implementation's model
(`big_vision/models/proj/jet/jet.py`, couplings rematerialised with
`nothing_saveable` as it ships) imported from a big_vision checkout, which
jetformer does not vendor:

    git clone https://github.com/google-research/big_vision /tmp/big_vision
    python -m bench.ref_big_vision --big_vision_dir=/tmp/big_vision --config=J-64

The step follows big_vision/trainers/proj/jet/train.py's `update_fn`: uniform
dequantization noise, bits/dim, value_and_grad, an optax update (clipping at
1.0, Adam b2 0.95, decoupled weight decay 1e-5, warm-up and cosine decay, the
`FREEZE_ME` coupling masks frozen) and its l2 norms of gradients, parameters
and updates. Timed like bench/jet.py (median of 20 steps after 3 warm-up
steps); prints one JSON line. Run in jetformer's test environment (the
checkout's imports need tensorflow, absl, ml_collections and einops).
"""

import argparse
import functools
import importlib
import json
import os
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import timing
from bench.jet_configs import CONFIGS


def bits_per_dim(z, logdet):  # as the trainer's _bits_per_dim, with a scipy-style log pdf
  nll = jnp.sum(-jax.scipy.stats.norm.logpdf(z) + np.log(127.5), axis=range(1, z.ndim))
  return jnp.mean(nll - logdet) / (np.log(2) * np.prod(z.shape[1:]))


def make_update(model, tx):
  @functools.partial(jax.jit, donate_argnums=0)
  def update(state, images, rng):
    rng_input, rng_model = jax.random.split(rng)
    x = images + jax.random.uniform(rng_input, images.shape, minval=0.0, maxval=1 / 127.5)

    def loss_fn(params):
      z, logdet = model.apply({"params": params}, x, rngs={"dropout": rng_model},
                              method=model.forward)
      return bits_per_dim(z, logdet)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    norm = lambda tree: jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(tree)))
    metrics = {"bpd": loss, "l2_grads": norm(grads), "l2_params": norm(params),
               "l2_updates": norm(updates)}
    return {"params": params, "opt": opt}, metrics
  return update


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--big_vision_dir", required=True, help="a big_vision checkout")
  parser.add_argument("--config", choices=sorted(CONFIGS), default="J-small")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.big_vision_dir, "big_vision/models/proj/jet/jet.py")):
    sys.exit(f"--big_vision_dir={args.big_vision_dir} holds no big_vision/models/proj/jet/jet.py: "
             "pass the root of a checkout of github.com/google-research/big_vision.")
  sys.path.insert(0, args.big_vision_dir)
  jet = importlib.import_module("big_vision.models.proj.jet.jet")

  cfg = CONFIGS[args.config]
  size, batch = cfg["image"], cfg["batch"]
  model = jet.Model(depth=cfg["depth"], block_depth=cfg["block_depth"], emb_dim=cfg["emb_dim"],
                    num_heads=cfg["num_heads"], ps=cfg["ps"],
                    kinds=cfg["kinds"])
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3)) / 127.5 - 1, jnp.float32)
  params = jax.jit(lambda k: model.init(k, images, method=model.forward)["params"])(
      jax.random.key(0))
  frozen = jax.tree_util.tree_map_with_path(
      lambda path, _: "FREEZE_ME" in jax.tree_util.keystr(path), params)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 100, 1000)
  tx = optax.multi_transform(
      {False: optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=1e-5)),
       True: optax.set_to_zero()}, frozen)
  state = {"params": params, "opt": tx.init(params)}

  first_step_s, step_s, _, metrics = timing.time_steps(
      make_update(model, tx), state, images, jax.random.key(1),
      warmup=args.warmup, steps=args.steps)
  print(json.dumps({
      "impl": "big_vision", "config": args.config, "batch": batch,
      "backend": jax.default_backend(), "step_s_median": round(step_s, 4),
      "images_per_s_median": round(batch / step_s, 2), "first_step_s": round(first_step_s, 2),
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "bpd": float(metrics["bpd"])}))


if __name__ == "__main__":
  main()
