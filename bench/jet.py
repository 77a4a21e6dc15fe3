"""Jet train-step throughput: python bench/jet.py --config=J-small [--remat=dots].

Times the full update (dequantize, flow, bits/dim, backward, clip, Adam) on
random images, on whatever devices JAX sees. Prints one JSON line at the end.
Needs no TensorFlow.
"""

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jetformer import optim, sharding, steps  # noqa: E402
from jetformer.models import jet as jet_lib  # noqa: E402

CONFIGS = {
    "J-small": dict(image=32, batch=32, ps=4, depth=8, block_depth=2, emb_dim=256, num_heads=4),
    "J-64": dict(image=64, batch=16, ps=4, depth=16, block_depth=2, emb_dim=256, num_heads=4),
}


def matmul_peak(n=2048, dtype=jnp.float32, repeats=10):
  """Measured FLOP/s of a large square matmul: the machine's practical peak."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def step_flops(cfg, tx, state, data, key):
  """FLOPs of one step from XLA's cost analysis of the *unrolled* model.

  The analysis counts a scan's body once, not once per coupling, so it is
  taken on the same step with the couplings unrolled (same params tree).
  """
  unrolled = dataclasses.replace(cfg, scan=False)
  graphdef, _, _ = steps.abstract_model(unrolled)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=0.0,
                                   label_drop_prob=0.0))
  cost = step.lower(state, data, key).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", choices=sorted(CONFIGS), default="J-small")
  parser.add_argument("--remat", choices=sorted(jet_lib.REMAT_POLICIES), default="dots")
  parser.add_argument("--scan", type=int, default=1, help="0: unroll the couplings")
  parser.add_argument("--batch", type=int, default=0, help="override the batch size")
  parser.add_argument("--mu_dtype", default="", help="Adam first-moment dtype (paper: bfloat16)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  spec = dict(CONFIGS[args.config])
  size, batch = spec.pop("image"), spec.pop("batch")
  batch = args.batch or batch
  cfg = jet_lib.JetConfig(image_shape=(size, size, 3), kinds=("channels", "channels", "spatial"),
                          remat=args.remat, scan=bool(args.scan), **spec)

  mesh = sharding.make_mesh([("data", -1)])
  tx = optim.make(lr=3e-4, total_steps=1000, mu_dtype=args.mu_dtype, weight_decay=1e-5)
  graphdef, params, frozen = steps.abstract_model(cfg)
  init = functools.partial(steps.init_state, cfg, tx, False, 0)
  shardings = steps.state_shardings(tx, jax.eval_shape(init), params, frozen, (), mesh)
  state = jax.jit(init, out_shardings=shardings)()
  rng = np.random.default_rng(0)
  data = sharding.global_batch(
      {"image": rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32) / 127.5 - 1,
       "label": np.zeros((batch,), np.int32)}, mesh)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=0.0,
                                   label_drop_prob=0.0), donate_argnums=0)
  key = jax.random.key(0)

  t = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  state, metrics = compiled(state, data, key)
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t
  flops = step_flops(cfg, tx, state, data, key)

  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, data, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  peak = matmul_peak()
  print(json.dumps({
      "config": args.config, "remat": args.remat, "devices": jax.device_count(),
      "backend": jax.default_backend(), "batch": batch,
      "step_s_median": round(step_s, 4),
      "images_per_s_median": round(batch / step_s, 2),
      "first_step_s": round(first_step_s, 2),
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "flops_per_step": flops,
      "matmul_peak_flops": round(peak),
      "matmul_fraction": round(flops / step_s / peak, 4),
      "bpd": float(metrics["bpd"]),
  }))


if __name__ == "__main__":
  main()
