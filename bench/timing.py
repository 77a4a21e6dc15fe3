"""What the train-step benchmarks share: the machine's matmul peak, step timing, the JSON line."""

import functools
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jetformer import chips, sharding, steps


def setup(cfg, tx, size, batch, num_classes):
  """(mesh, train state, one random batch of images and labels) on all devices."""
  mesh = sharding.make_mesh([("data", -1)])
  _, params, frozen = steps.abstract_model(cfg)
  init = functools.partial(steps.init_state, cfg, tx, False, 0)
  shardings = steps.state_shardings(tx, jax.eval_shape(init), params, frozen, (), mesh)
  state = jax.jit(init, out_shardings=shardings)()
  rng = np.random.default_rng(0)
  data = sharding.global_batch(
      {"image": rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32) / 127.5 - 1,
       "label": rng.integers(0, max(num_classes, 1), (batch,)).astype(np.int32)}, mesh)
  return mesh, state, data


def matmul_peak(dtype=jnp.float32, repeats=10):
  """Measured FLOP/s of a large square matmul: the machine's practical peak.

  2048 saturates a CPU; an accelerator needs 8192 to hide the launch.
  """
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  # float32 results, as the models' products have (bfloat16 ones take a slow path on XLA:CPU)
  f = jax.jit(lambda x: jnp.matmul(x, a, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def flops(jitted, *args):
  """FLOPs of one call from XLA's cost analysis (scan bodies count once: unroll first).

  XLA:CPU analyses the lowered program; the GPU backend only a compiled one.
  """
  lowered = jitted.lower(*args)
  unwrap = lambda c: c[0] if isinstance(c, (list, tuple)) else c
  cost = unwrap(lowered.cost_analysis()) or unwrap(lowered.compile().cost_analysis())
  return float(cost["flops"])


def time_steps(step, state, data, key, *, warmup, steps):
  """(first-step seconds incl. compile, median step seconds, final state, metrics).

  Also prints the two times to stderr, before the caller's slower FLOP count.

  `step(state, data, key) -> (state, metrics)` is jitted and donates the state.
  """
  t = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  state, metrics = compiled(state, data, key)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, data, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  median = statistics.median(times)
  print(f"median step {median:.4f} s, first step {first:.1f} s", file=sys.stderr)  # before FLOPs
  return first, median, state, metrics


def compare_steps(variants, state, data, key, *, warmup, rounds):
  """{name: median step seconds} of several compiled steps, timed in alternation.

  `variants` maps names to compiled steps of one signature (each donates the
  state). Alternating two steps at a time cancels this VM's drift, which moves
  separate runs by +-10% and more.
  """
  times = {name: [] for name in variants}
  for r in range(warmup + rounds):
    for name, compiled in variants.items():
      for i in range(2):
        t = time.perf_counter()
        state, metrics = compiled(state, data, jax.random.fold_in(key, 2 * r + i))
        jax.block_until_ready(metrics)
        if r >= warmup:
          times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def device_peak_mib():
  """Peak bytes in use on the first device (GPU/TPU), or None where it is not reported (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**20, 1)


def report(*, batch, first_step_s, step_s, flops_per_step, **extra):
  """The benchmarks' JSON line fields (throughput, compile, memory, FLOPs, MFU).

  `mfu` is of the device's published dense bfloat16 peak (jetformer/chips.py;
  None for devices not listed, e.g. CPUs). Beside it, the fractions of the
  measured float32 and bfloat16 matmul rates.
  """
  memory = {  # before the matmul peaks, whose buffers would count on a GPU
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "device_peak_mib": device_peak_mib()}
  peak, peak_bf16 = matmul_peak(), matmul_peak(jnp.bfloat16)
  kind = jax.devices()[0].device_kind
  chip = chips.lookup(kind)
  achieved = flops_per_step / step_s / jax.device_count()  # per device
  return {
      **extra, "devices": jax.device_count(), "backend": jax.default_backend(), "batch": batch,
      "step_s_median": round(step_s, 4),
      "images_per_s_median": round(batch / step_s, 2),
      "first_step_s": round(first_step_s, 2),
      **memory,
      "flops_per_step": flops_per_step,
      "device_kind": kind,
      "mfu": None if chip is None else round(achieved / chip.bf16_flops, 4),
      "matmul_peak_flops": round(peak),
      "matmul_fraction": round(flops_per_step / step_s / peak, 4),
      "matmul_peak_bf16_flops": round(peak_bf16),
      "matmul_fraction_bf16": round(flops_per_step / step_s / peak_bf16, 4),
  }
