"""Jet train-step throughput: python -m bench.jet --config=J-small [--remat=full].

Times the full update (dequantize, flow, bits/dim, backward, clip, Adam) on
random images, on whatever devices JAX sees. Prints one JSON line at the end.
`--compare=FIELD=VALUE` instead times the step as given and with one JetConfig
field changed (e.g. `--compare=remat=full`, `--compare=dtype=float32`) in
alternation, and prints the two rates. Needs no TensorFlow.
"""

import argparse
import dataclasses
import functools
import json

import jax

from bench import timing
from jetformer import objectives, optim, steps
from bench.jet_configs import CONFIGS
from jetformer.models import jet as jet_lib


def jitted_step(cfg, tx, **jit_kwargs):
  """The Jet train step of bench/jet.py (no EMA, no label dropout), jitted."""
  graphdef, _, _ = steps.abstract_model(cfg)
  return jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx, ema_decay=0.0,
                                   objective=objectives.JetObjective(0.0)), **jit_kwargs)


def step_flops(cfg, tx, state, data, key):
  """FLOPs of one step from XLA's cost analysis of the *unrolled* model.

  The analysis counts a scan's body once, not once per coupling, so it is
  taken on the same step with the couplings unrolled (same params tree).
  """
  step = jitted_step(dataclasses.replace(cfg, scan=False), tx)
  return timing.flops(step, state, data, key)


def compare(variants, tx, state, data, key, batch, rounds):
  """Prints images/s of several variants of the step, timed in alternation.

  `variants` maps names to JetConfigs that give the same params tree.
  """
  compiled = {name: jitted_step(cfg, tx, donate_argnums=0).lower(state, data, key).compile()
              for name, cfg in variants.items()}
  medians = timing.compare_steps(compiled, state, data, key, warmup=1, rounds=rounds)
  print(json.dumps({f"images_per_s_median_{name}": round(batch / t, 2)
                    for name, t in medians.items()}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", choices=sorted(CONFIGS), default="J-small")
  parser.add_argument("--remat", choices=sorted(jet_lib.REMAT_POLICIES), default="dots")
  parser.add_argument("--scan", type=int, default=1, help="0: unroll the couplings")
  parser.add_argument("--batch", type=int, default=0, help="override the batch size")
  parser.add_argument("--dtype", default="bfloat16",
                      help="matmul operands of the conditioning networks (precision.py)")
  parser.add_argument("--attention_impl", default=None, choices=["xla", "cudnn"],
                      help="jax.nn.dot_product_attention's implementation (default: XLA)")
  parser.add_argument("--mu_dtype", default="", help="Adam first-moment dtype (paper: bfloat16)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--compare", default="",
                      help="FIELD=VALUE: A/B of one JetConfig field, --steps per variant")
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  spec = dict(CONFIGS[args.config])
  size, batch = spec.pop("image"), spec.pop("batch")
  batch = args.batch or batch
  cfg = jet_lib.JetConfig(image_shape=(size, size, 3), remat=args.remat, scan=bool(args.scan),
                          dtype=args.dtype, attention_impl=args.attention_impl, **spec)

  tx = optim.make(lr=3e-4, total_steps=1000, mu_dtype=args.mu_dtype, weight_decay=1e-5)
  _, state, data = timing.setup(cfg, tx, size, batch, num_classes=0)
  if args.compare:
    field, value = args.compare.split("=", 1)
    variants = {f"{field}_{getattr(cfg, field)}": cfg,
                f"{field}_{value}": dataclasses.replace(cfg, **{field: value})}
    return compare(variants, tx, state, data, jax.random.key(0), batch, args.steps // 2)
  step = jitted_step(cfg, tx, donate_argnums=0)
  key = jax.random.key(0)

  first_step_s, step_s, state, metrics = timing.time_steps(
      step, state, data, key, warmup=args.warmup, steps=args.steps)
  result = timing.report(config=args.config, remat=args.remat, dtype=args.dtype,
                         attention_impl=args.attention_impl, batch=batch,
                         first_step_s=first_step_s, step_s=step_s,
                         flops_per_step=step_flops(cfg, tx, state, data, key))
  print(json.dumps({**result, "bpd": float(metrics["bpd"])}))


if __name__ == "__main__":
  main()
