"""A study's train step compiled ahead of time for a TPU slice, on a machine without one.

The step is train.py's own (model, optimizer, state shardings by the study's
rules, donated state), lowered from abstract arguments for the compile-only
devices libtpu describes for a topology such as "v5p:2x2x2", as MaxText's
`train_compile.py` does. `compile_study` reads what the compiled program
needs per device (memory), what the step computes (model FLOPs), XLA's
step-time estimate and the collectives the program issues.

What libtpu 0.0.42.1's compiler reports (tests/test_aot.py checks the first two):
- `Compiled.cost_analysis()` has "flops", "transcendentals", "bytes
  accessed", per-operand "bytes accessed0{}", "utilization0{}", ... and
  "optimal_seconds", all per device: an SPMD program is one device's
  program (8 chips sharing a product's rows report 1/8 of its FLOPs).
- A loop body counts once, whatever its trip count: the layer scans, and
  the loops XLA makes of FSDP's gathered-weight products ("windowed
  einsums" of collective-permutes). So the FLOPs here come from the step
  unrolled (`scan=False`), lowered for one CPU device, as
  `Lowered.cost_analysis` is not implemented for TPU; and the step time from
  the scanned program's estimate, scaled (`step_time`).
- "optimal_seconds" behaves like a roofline, each op at the chip's peak FLOP
  rate or HBM bandwidth (an all-gather costs its HBM bytes, ~2.3 TB/s on
  v5p, not the interconnect's); across slices it comes out negative.
"""

import collections
import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from jetformer import chips, sharding, steps, train

# Topology names' chip kinds and what libtpu's devices call them (chips.py has their figures).
DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
PLACEHOLDER_STEPS = 100_000  # total_steps 0 (from num_epochs): the schedule's length costs nothing
EXAMPLES = ("v5p:2x2x2", "v5p:4x4x4", "v4:2x2x2", "v5e:4x4", "v6e:8x8")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction "%name = SHAPE opcode(operands), ..." whose opcode is a collective or the
# -start of an async one (its -done is not counted again). Operands are "%name": never a match.
_COLLECTIVE = re.compile(r" = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")  # "bf16[32,512]" -> "32,512"


class InputError(ValueError):
  """What the command line asked cannot be compiled: topology, libtpu, mesh or batch."""


def chip(topology):
  kind, sep, _ = topology.partition(":")
  if not sep:
    raise InputError(f"Topology {topology!r} is not CHIP:AxB[xC] (chips per axis; v5p-16 is "
                     f"v5p:2x2x2), e.g. {', '.join(EXAMPLES)}.")
  if kind not in DEVICE_KINDS:
    raise InputError(f"Unknown TPU {kind!r} in {topology!r}: use one of {list(DEVICE_KINDS)}, "
                     f"e.g. {', '.join(EXAMPLES)}.")
  return chips.lookup(DEVICE_KINDS[kind])


def wrap(kind, dims):
  """Which axes wrap around, as on real slices: full v4/v5p cubes, 16-chip v5e/v6e rows."""
  if kind in ("v4", "v5p"):
    return (len(dims) == 3 and all(d % 4 == 0 for d in dims),) * 3
  return tuple(d == 16 for d in dims) + (False,) * (3 - len(dims))


def devices(topology, num_slices=1):
  """The compile-only devices of `num_slices` TPU slices named like "v5p:2x2x2"."""
  kind, _, shape = topology.partition(":")
  chip(topology)
  if not re.fullmatch(r"\d+x\d+(x\d+)?", shape):
    raise InputError(f"Topology {topology!r} is not CHIP:AxB[xC], e.g. {', '.join(EXAMPLES)}.")
  dims = tuple(int(d) for d in shape.split("x"))
  # v4 and v5p pods run a chip's two cores as one device ("megacore"); libtpu's
  # default for v4 would give two devices per chip.
  kwargs = {"chip_config_name": "megacore"} if kind in ("v4", "v5p") else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  # libtpu's lock file keeps a second process off a TPU. No TPU is driven here, and any
  # JAX process with libtpu installed (a test worker) may hold the lock: share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 (loads libtpu)
  try:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        wrap=wrap(kind, dims), **kwargs)
  except RuntimeError as e:
    if "not installed" in str(e):
      raise InputError("libtpu is not installed: pip install -r requirements-aot.txt") from e
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise InputError(f"libtpu rejected topology {topology!r}: {first} "
                     f"(valid names look like {', '.join(EXAMPLES)}).") from e
  return topo.devices


def stacks(config):
  """The config dicts of the model's scanned stacks: the Jet, or JetFormer's adaptor and decoder."""
  if train.is_jetformer(config):
    return {"model.jet": config.model.jet, "model.decoder": config.model.decoder}
  return {"model": config.model}


def abstract_batch(config, mesh):
  """A global train batch as input_pipeline yields it, as ShapeDtypeStructs sharded over B."""
  b, s = config.batch_size, config.dataset.image_size
  shapes = {"image": ((b, s, s, 3), jnp.float32), "label": ((b,), jnp.int32)}  # [-1, 1] pixels
  if train.is_jetformer(config) and config.text.tokenizer:  # a caption per example
    length = config.text.max_len
    shapes.update(text=((b, length), jnp.int32), text_mask=((b, length), jnp.int32))
  batch_sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
          for k, (shape, dtype) in shapes.items()}


def lower_train_step(config, mesh, total_steps, data=None):
  """(lowered train step, abstract sharded state): train.py's step on `mesh`, not run."""
  cfg = train.model_config(config, data)
  tx = train.make_optimizer(config, total_steps)
  graphdef, params, frozen = steps.abstract_model(cfg)
  init = functools.partial(steps.init_state, cfg, tx, config.ema_decay > 0, config.seed)
  abstract_state = jax.eval_shape(init)
  shardings = steps.state_shardings(tx, abstract_state, params, frozen,
                                    config.sharding_rules, mesh)
  state = sharding.abstract(abstract_state, shardings)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=sharding.replicated(mesh))
  step = train.compile_train_step(config, graphdef, tx, shardings, mesh, total_steps)
  return step.lower(state, abstract_batch(config, mesh), key), state


def unrolled(config):
  """A copy of config whose stacks are unrolled and not rematerialised: the model's own FLOPs."""
  config = config.copy_and_resolve_references()
  for part in stacks(config).values():
    part.scan, part.remat = False, "none"
  return config


def model_flops(config, total_steps, data=None):
  """FLOPs of one train step over the global batch: the unrolled step lowered for one CPU.

  Unoptimised HLO, so no recomputation (remat "none") and nothing XLA would
  fuse away: dots count 2 per multiply-add, elementwise ops 1 per element.
  """
  cpu = jax.devices("cpu")[:1]
  mesh = sharding.make_mesh([(name, 1) for name, _ in config.mesh], devices=cpu)
  lowered, _ = lower_train_step(unrolled(config), mesh, total_steps, data)
  return float(lowered.cost_analysis()["flops"])


def collective_ops(hlo_text):
  """[(kind, [dims of each array in its result], op_name)] of an HLO module's collectives.

  An all-gather's result is the gathered array, an async start's a tuple
  holding its operand and result; op_name is JAX's name of the op it came
  from ("jit(train_step)/jvp()/while/body/..." inside a scan). A loop body's
  collectives appear once.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      dims = [tuple(int(d) for d in a.split(",") if d) for a in _ARRAY.findall(m.group(1))]
      name = _OP_NAME.search(line)
      out.append((m.group(2), dims, name.group(1) if name else ""))
  return out


def collectives(hlo_text):
  """{kind: number of instructions} of an HLO module's text (collective_ops)."""
  counts = collections.Counter(kind for kind, _, _ in collective_ops(hlo_text))
  return {kind: counts.get(kind, 0) for kind in COLLECTIVES}


def shard_bytes(tree):
  """Bytes per device of a tree of sharded ShapeDtypeStructs, before any TPU tile padding."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def memory(compiled):
  """Per-device bytes; total as MaxText's train_compile: arguments + outputs + temps - aliased."""
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes,
         "generated_code": m.generated_code_size_in_bytes}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def step_time(cost, flops_per_device):
  """XLA's step-time estimate in seconds, scaled for the loop iterations it did not cost; or None.

  `optimal_seconds` covers the scanned program with each loop body once (the
  layer scans, and the loops XLA makes of FSDP's products, see
  `collectives`). It is scaled by the model's FLOPs over the FLOPs XLA
  counted: the uncounted iterations are taken to run at the rate of the
  counted ops. Across slices XLA:TPU's estimate is negative: None.
  """
  if cost.get("optimal_seconds", 0) <= 0 or not cost.get("flops"):
    return None
  return cost["optimal_seconds"] * max(flops_per_device / cost["flops"], 1.0)


def compile_study(config, topology, num_slices=1, data=None):
  """(report, compiled): config's train step compiled for the slice(s), and what aot.py prints."""
  tpu = chip(topology)
  slice_devices = devices(topology, num_slices)
  if chips.lookup(slice_devices[0].device_kind) != tpu:  # the figures are per chip kind
    raise InputError(f"{topology!r} has {slice_devices[0].device_kind} chips, not {tpu.name}.")
  try:
    mesh = sharding.make_mesh(config.mesh, devices=slice_devices)
  except ValueError as e:
    raise InputError(f"{e} Change --config.mesh or the topology.") from e
  if config.batch_size % mesh.size:
    raise InputError(f"batch_size={config.batch_size} does not divide by {mesh.size} chips.")
  total_steps = config.total_steps or PLACEHOLDER_STEPS
  start = time.perf_counter()
  lowered, state = lower_train_step(config, mesh, total_steps, data)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = model_flops(config, total_steps, data)
  cost, mem = compiled.cost_analysis(), memory(compiled)
  step_s = step_time(cost, flops / mesh.size)
  hbm = tpu.hbm_gib * 2**30
  return {
      "topology": topology, "num_slices": num_slices, "num_devices": mesh.size,
      "num_hosts": len({d.process_index for d in mesh.devices.flat}),
      "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape),
      "batch_size": config.batch_size, "params": sum(x.size for x in jax.tree.leaves(
          state["params"])), "compile_s": compile_s, "memory": mem,
      "state_gib_per_device": shard_bytes(state) / 2**30,
      "per_device_gib": mem["total"] / 2**30, "hbm_gib": tpu.hbm_gib,
      "fits": mem["total"] <= hbm, "flops_per_step": flops,
      "flops_per_device": flops / mesh.size,
      "xla_cost": {k: v for k, v in cost.items() if "{" not in k},  # not per operand
      "estimated_step_s": step_s,
      "estimated_mfu": step_s and flops / (step_s * mesh.size * tpu.bf16_flops),
      "peak_tflops": tpu.bf16_flops / 1e12,
      "collectives": collectives(compiled.as_text())}, compiled


def describe(report, config):
  """The report as lines to read; a study that does not fit names the knobs to try."""
  r, m = report, {k: v / 2**30 for k, v in report["memory"].items()}
  per_chip = r["batch_size"] // r["num_devices"]
  slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
  lines = [
      f"{r['study']} on {r['topology']}{slices}: {r['num_devices']} chips "
      f"({r['device_kind']}, {r['num_hosts']} hosts), mesh {r['mesh']}, batch "
      f"{r['batch_size']} ({per_chip} per chip), {r['params'] / 1e6:.1f}M params; "
      f"lowered and compiled in {r['compile_s']:.0f} s",
      f"memory per chip (GiB): arguments {m['arguments']:.2f} (the train state's shards "
      f"{r['state_gib_per_device']:.2f} before tile padding), outputs {m['outputs']:.2f}, "
      f"temporaries {m['temporaries']:.2f}, aliased {m['aliased']:.2f} (donated state), "
      f"generated code {m['generated_code']:.2f}",
      f"  total {m['total']:.2f} of {r['hbm_gib']} GiB HBM ({m['total'] / r['hbm_gib']:.0%}): "
      + ("fits" if r["fits"] else "DOES NOT FIT")
      + (" (the runtime needs some HBM too)" if r["fits"] and m["total"] > 0.95 * r["hbm_gib"]
         else ""),
      f"model FLOPs per step {r['flops_per_step']:.4g} ({r['flops_per_device']:.4g} per chip; "
      "the unrolled step without remat)",
      estimate_line(r),
      "collectives (HLO instructions): " + ", ".join(f"{k} {v}"
                                                    for k, v in r["collectives"].items())]
  if not r["fits"]:
    remat = " ".join(f"--config.{name}.remat=full" for name in stacks(config))
    lines.append(f"{r['study']} does not fit on {r['topology']}: try {remat}, a smaller "
                 f"per-chip batch (--config.batch_size={r['batch_size'] // 2}), a bigger "
                 "slice or several (--topology, --num_slices), or another --config.mesh.")
  return lines


def estimate_line(r):
  cost = r["xla_cost"]
  if r["estimated_step_s"] is None:
    return f"XLA's estimate: none (optimal_seconds {cost.get('optimal_seconds')})"
  return (f"XLA's estimate: {cost['optimal_seconds'] * 1e3:.1f} ms for the {cost['flops']:.3g} "
          f"FLOPs per chip it costs (loop bodies once); scaled to all: "
          f"{r['estimated_step_s']:.4g} s per step, MFU {r['estimated_mfu']:.1%} of "
          f"{r['peak_tflops']} TFLOP/s per chip")
