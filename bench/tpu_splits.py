"""Jet's coupling splits on a TPU, as gathers or as permutation products, by XLA's cost model.

  python -m bench.tpu_splits [--topology=v5p:2x2x1] [--batch=128]

jetformer splits a coupling's input with one gather by a flat index
(`jet.permute`, `permutations.py`); the reference multiplies by a
permutation matrix at highest precision: [N, D] x [D, D] per token for a
channel split, [N, N] x [N, D] for a spatial one. TPU gathers can be slow,
so both forms are compiled here for one chip of the topology, forward and
backward (split, an affine map of one half, merge, a loss), at the paper
Jet's shapes (imagenet64_jet: 256 tokens of 48 values) and a per-chip
batch, and XLA's estimate of each is printed. Needs libtpu
(requirements-aot.txt); no TPU and no TensorFlow. One JSON line per form.
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology, run nothing

import jax
import jax.numpy as jnp
import numpy as np

from jetformer import aot
from jetformer.models import jet, permutations

N, D = 256, 48  # imagenet64_jet: 16x16 tokens of 4x4x3 values
HIGHEST = jax.lax.Precision.HIGHEST


def coupling_like(split, merge):
  """A loss through split -> (x2 + b) * s -> merge: what a coupling does around its DNN."""
  def loss(x, s, b):  # x [B, N, D]; s, b [N, D/2]
    x1, x2 = split(x)
    return jnp.sum(merge(x1, (x2 + b) * s) * x)
  return jax.grad(loss, argnums=(0, 1, 2))


def gather_form(perm):
  inv = np.argsort(perm)

  def split(x):
    b = x.shape[0]
    flat = jet.permute(x.reshape(b, N * D), perm)
    return (h.reshape(b, N, D // 2) for h in jnp.split(flat, 2, axis=1))

  def merge(x1, x2):
    b = x1.shape[0]
    flat = jnp.concatenate([x1.reshape(b, -1), x2.reshape(b, -1)], axis=1)
    return jet.permute(flat, inv).reshape(b, N, D)
  return coupling_like(split, merge)


def channel_product_form(p):
  proj = jnp.eye(D)[:, p]  # x @ proj == x[..., p]

  def split(x):
    return jnp.split(jnp.einsum("bnd,de->bne", x, proj, precision=HIGHEST), 2, axis=-1)

  def merge(x1, x2):
    return jnp.einsum("bne,de->bnd", jnp.concatenate([x1, x2], -1), proj, precision=HIGHEST)
  return coupling_like(split, merge)


def spatial_product_form(idx1, idx2):
  proj = jnp.eye(N)[np.concatenate([idx1, idx2])]  # proj @ x == x[order]

  def split(x):
    b = x.shape[0]
    y = jnp.einsum("mn,bnd->bmd", proj, x, precision=HIGHEST)
    return (h.reshape(b, N, D // 2) for h in jnp.split(y, 2, axis=1))

  def merge(x1, x2):
    b = x1.shape[0]
    y = jnp.concatenate([x1.reshape(b, N // 2, D), x2.reshape(b, N // 2, D)], axis=1)
    return jnp.einsum("mn,bmd->bnd", proj, y, precision=HIGHEST)
  return coupling_like(split, merge)


def estimate(fn, device, batch):
  sh = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh)
          for s in ((batch, N, D), (N, D // 2), (N, D // 2))]
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return {k: cost.get(k) for k in ("optimal_seconds", "flops", "bytes accessed")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--batch", type=int, default=128, help="per chip (imagenet64_jet on 8)")
  args = parser.parse_args()
  device = aot.devices(args.topology)[0]
  p = np.random.default_rng(0).permutation(D)
  idx1, idx2 = permutations.spatial_halves("checkerboard", 16, 16)
  forms = {
      ("channels", "gather"): gather_form(np.asarray(permutations.channel_flat(p, N))),
      ("channels", "product"): channel_product_form(p),
      ("spatial", "gather"): gather_form(permutations.spatial_flat(idx1, idx2, D)),
      ("spatial", "product"): spatial_product_form(idx1, idx2),
  }
  for (kind, form), fn in forms.items():
    est = estimate(fn, device, args.batch)
    print(json.dumps({"bench": "tpu_splits", "topology": args.topology, "device_kind":
                      device.device_kind, "batch": args.batch, "kind": kind, "form": form,
                      "estimated_us": est["optimal_seconds"] * 1e6, "flops": est["flops"],
                      "bytes_accessed": est["bytes accessed"]}), flush=True)


if __name__ == "__main__":
  main()
