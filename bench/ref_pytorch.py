"""The PyTorch port's Jet train step on this machine: python -m bench.ref_pytorch --config=J-64.

A reference for bench/jet.py's speed goal, timed on the same machine rather
than taken from elsewhere. Runs the port from PyPI in its own environment
(it is not a dependency of jetformer):

    python3.11 -m venv /tmp/ref && /tmp/ref/bin/pip install jet-pytorch==0.0.2 torch einops
    /tmp/ref/bin/python -m bench.ref_pytorch --config=J-small [--bf16=1] [--compile=1]

The step follows the port's `jet_pytorch/train.py` with one accumulation step:
uniform dequantization noise, forward, bits/dim, backward, gradient clipping
at 1.0, AdamW (b2 0.95, weight decay 1e-5) and a warm-up cosine LambdaLR
schedule like the port's. The port's
train.py compiles the model and autocasts to bfloat16 on CUDA only, so on a
CPU its own setting is `--compile=1 --bf16=0`; `--bf16=1` autocasts on the CPU
(what its CUDA setting would be here). Prints one JSON line like bench/jet.py.
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
from jet_pytorch.jet import Jet  # only the model: jet_pytorch.util needs hub and vision extras

from bench.jet_configs import CONFIGS


def make_step(model, forward, size, batch, bf16):
  """One update on a fixed random batch; returns its bits/dim."""
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=1e-5)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / 1000)))
  images = torch.randint(0, 256, (batch, 3, size, size)).float() / 255  # [B, C, H, W]
  dims = 3 * size * size
  normal = torch.distributions.Normal(0.0, 1.0)

  def step():
    x = images * 2 - 1
    x = (x + torch.empty(x.shape).uniform_(0.0, 1 / 127.5)).permute(0, 2, 3, 1)  # [B, H, W, C]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      z, logdet = forward(x)                                      # [B, N, D], [B, 1]
      nll = torch.sum(-normal.log_prob(z) + math.log(127.5), dim=tuple(range(1, z.dim())))
      bpd = (nll[:, None] - logdet).mean() / (math.log(2) * dims)
    bpd.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    return bpd.item()
  return step


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", choices=sorted(CONFIGS), default="J-small")
  parser.add_argument("--bf16", type=int, default=0, help="1: autocast to bfloat16 on the CPU")
  parser.add_argument("--compile", type=int, default=0, help="1: torch.compile (the port's train.py)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  cfg = CONFIGS[args.config]
  size = cfg["image"]
  torch.manual_seed(0)
  ps = cfg["ps"]
  model = Jet(patch_size=ps, patch_dim=3 * ps * ps, n_patches=(size // ps) ** 2,
              img_dims=(size, size), coupling_layers=cfg["depth"], block_depth=cfg["block_depth"],
              block_width=cfg["emb_dim"], num_heads=cfg["num_heads"],
              coupling_types=cfg["kinds"],
              spatial_coupling_projs=("checkerboard", "checkerboard-inv"))
  forward = torch.compile(model) if args.compile else model
  step = make_step(model, forward, size, cfg["batch"], bool(args.bf16))

  t = time.perf_counter()
  bpd = step()
  first = time.perf_counter() - t
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    bpd = step()
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  print(json.dumps({
      "impl": "jet-pytorch", "config": args.config, "bf16": args.bf16, "compile": args.compile,
      "threads": torch.get_num_threads(), "batch": cfg["batch"],
      "step_s_median": round(step_s, 4), "images_per_s_median": round(cfg["batch"] / step_s, 2),
      "first_step_s": round(first, 2),
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "bpd": bpd}))


if __name__ == "__main__":
  main()
