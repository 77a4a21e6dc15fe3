"""aot.py: train steps compiled for TPU slices on this CPU, with libtpu's compile-only devices.

The conftest's 8 fake CPU devices (XLA_FLAGS) do not reach the TPU compiles:
their devices come from the topology.
"""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, imagenet64_jet, jetformer_imagenet256
from jetformer import aot, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_aot(*flags, hide_libtpu=False):
  """aot.py's (return code, stdout, stderr), run as if libtpu were not installed if asked."""
  cmd, env = [sys.executable, str(ROOT / "aot.py")], dict(os.environ)
  if hide_libtpu:  # no module to import, and not the path that importing JAX here set
    cmd[1:] = ["-c", "import runpy, sys; sys.modules['libtpu'] = None; sys.argv[:1] = []; "
               "runpy.run_path('aot.py', run_name='__main__')", "aot.py"]
    env.pop("TPU_LIBRARY_PATH", None)
  out = subprocess.run([*cmd, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  return out.returncode, out.stdout, out.stderr


def paper_jet_flops(batch):
  """Hand count of a Jet train step: dense layers and attention, 3x the forward's products.

  Forward: 2 FLOPs per multiply-add; each param but the position embeddings
  multiplies once per token; attention adds QK^T and AV, 2 * 2 * T^2 * E per
  ViT block. Backward: twice the forward.
  """
  v, tokens, emb = imagenet64_jet.VARIANTS["32x2"], 256, 512
  dense = v["params"] - v["depth"] * tokens * emb                       # minus posemb
  attention = v["depth"] * v["block_depth"] * 4 * tokens ** 2 * emb
  return 3 * (2 * dense * tokens + attention) * batch


@pytest.mark.slow
def test_paper_jet_fits_on_v5p_2x2x2():
  """The paper's ImageNet 64 Jet at batch 1024 on 8 v5p chips: fits; FLOPs as counted by hand."""
  rc, out, err = run_aot("--config=configs/imagenet64_jet.py", "--topology=v5p:2x2x2")
  assert rc == 0, err[-3000:]
  report = json.loads(out.strip().splitlines()[-1])
  assert report["fits"] and report["per_device_gib"] < report["hbm_gib"] == 95
  assert (report["num_devices"], report["batch_size"]) == (8, 1024)
  v = imagenet64_jet.VARIANTS["32x2"]
  assert report["params"] == v["params"]
  six_nd = 6 * v["params"] * 256 * 1024                                 # 3.26e14
  assert 1.0 < report["flops_per_step"] / six_nd < 1.15                # + attention (8%)
  np.testing.assert_allclose(report["flops_per_step"], paper_jet_flops(1024), rtol=0.02)
  assert 0 < report["estimated_mfu"] < 1
  # Data parallel (the study's mesh): the gradients all-reduced, nothing else moved.
  assert report["mesh"] == {"data": 8, "fsdp": 1}
  c = report["collectives"]
  assert c["all-reduce"] > 0 and c["all-gather"] == c["collective-permute"] == 0


def test_xla_cost_is_per_device_and_counts_a_loop_body_once():
  """What jetformer.aot's FLOP and step-time numbers rest on, for libtpu's TPU compiler."""
  mesh = jax.sharding.Mesh(np.array(aot.devices("v5p:2x2x2")), ("d",))
  rows, whole = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
                 for s in (("d",), ()))
  x = jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16, sharding=rows)      # [B, D]
  w = jax.ShapeDtypeStruct((4, 2048, 2048), jnp.bfloat16, sharding=whole)  # [L, D, D]

  def layers(x, w, scan):  # L tanh layers, scanned or unrolled
    step = lambda h, wi: (jnp.tanh(h @ wi), None)
    if scan:
      return jax.lax.scan(step, x, w)[0]
    for wi in w:
      x = step(x, wi)[0]
    return x
  cost = {scan: jax.jit(functools.partial(layers, scan=scan)).lower(x, w).compile().cost_analysis()
          for scan in (False, True)}
  per_layer = 2 * 8192 * 2048 * 2048 / 8                     # a chip's rows of one product
  np.testing.assert_allclose(cost[False]["flops"], 4 * per_layer, rtol=0.01)
  np.testing.assert_allclose(cost[True]["flops"], per_layer, rtol=0.01)   # the body, once
  assert 0 < cost[True]["optimal_seconds"] < cost[False]["optimal_seconds"] / 2


def test_bad_input_is_one_line():
  for flag, message in [("--topology=v5p-16", "is not CHIP:AxB"),
                        ("--topology=v3:4x4", "use one of ['v4', 'v5e', 'v5p', 'v6e']"),
                        ("--topology=v5p:3x3x3", "libtpu rejected topology 'v5p:3x3x3'")]:
    rc, _, err = run_aot("--config=configs/digits_jet.py", flag)
    assert rc == 1 and "aot.py: error: " in err and message in err, err[-2000:]
    assert "Traceback" not in err
  rc, _, err = run_aot("--config=configs/digits_jet.py", "--topology=v5p:2x2x1",
                       hide_libtpu=True)
  assert rc == 1 and "pip install -r requirements-aot.txt" in err, err[-2000:]


def test_a_study_that_does_not_fit_names_the_knobs():
  """(A real one takes minutes: XLA's compile works hard to fit a program that cannot.)"""
  gib = 2**30
  report = dict(study="jetformer_imagenet256:1.3B", topology="v5e:4x4", num_slices=1,
                num_devices=16, num_hosts=4, device_kind="TPU v5 lite", mesh={"fsdp": 16},
                batch_size=2048, params=2e9, compile_s=60.0, hbm_gib=16, fits=False,
                state_gib_per_device=0.9,
                memory=dict(arguments=gib, outputs=gib, temporaries=40 * gib, aliased=gib,
                            generated_code=0, total=41 * gib),
                flops_per_step=1e16, flops_per_device=6e14, peak_tflops=197,
                xla_cost={"optimal_seconds": -20.0}, estimated_step_s=None, estimated_mfu=None,
                collectives=dict.fromkeys(aot.COLLECTIVES, 0))
  lines = aot.describe(report, jetformer_imagenet256.get_config("1.3B"))
  assert "DOES NOT FIT" in lines[2] and "XLA's estimate: none" in lines[4]
  for knob in ("--config.model.jet.remat=full", "--config.model.decoder.remat=full",
               "--config.batch_size=1024", "--topology", "--config.mesh"):
    assert knob in lines[-1]


def test_mesh_across_slices():
  """Two v5p slices: the data axis spans them when it can, else the next axis that can."""
  two = aot.devices("v5p:2x2x1", num_slices=2)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", -1)], devices=two)
  assert [{d.slice_index for d in row} for row in mesh.devices] == [{0}, {1}]
  mesh = sharding.make_mesh([("data", 1), ("fsdp", -1)], devices=two)
  assert [d.slice_index for d in mesh.devices[0]] == [0] * 4 + [1] * 4


def small_jetformer():
  """A small JetFormer with the paper's 256 image tokens; weights of 1024-wide layers.

  Batch 56 on 8 chips, 7 per chip: every activation has a dim divisible by 7
  (B, B/8, or B times tokens, flattened), no weight has (tested below).
  """
  config = jetformer_imagenet256.get_config()
  config.runlocal = True
  config = common.finalize(config)
  with config.unlocked():
    config.batch_size, config.dataset.image_size = 56, 64          # 16x16 patches of 4x4
    config.model.decoder.update(width=1024, depth=2, mlp_dim=4096, num_heads=8, head_dim=128)
    config.model.jet.update(depth=2, emb_dim=512, num_heads=4)
  return config


def test_small_jetformer_is_fsdp_on_two_hosts():
  """8 v5p chips on 2 hosts hold 1/8 of the train state each, and move weights, not activations.

  Activations are told apart by the factor 7 of the batch in their element
  count, whatever XLA reshapes them to. In the layer scans no collective
  moves one: weights are gathered (all-gather, or collective-permutes of
  the loops XLA makes of a gathered weight's products) and gradients
  reduced. Outside them the 16-token class prefix is resharded (its
  embedding lookup and the tied text logits), never the 256 image tokens.
  """
  config = small_jetformer()
  mesh = sharding.make_mesh(config.mesh, devices=aot.devices("v5p:2x2x2"))
  assert len({d.process_index for d in mesh.devices.flat}) == 2
  lowered, state = aot.lower_train_step(config, mesh, total_steps=100)
  compiled = lowered.compile()

  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))   # 639 MB
  per_chip = aot.shard_bytes(state)
  batch = aot.shard_bytes(aot.abstract_batch(config, mesh))
  assert per_chip < 1.01 * whole / mesh.size              # all but a few tiny leaves sharded
  mem = aot.memory(compiled)
  assert per_chip + batch <= mem["arguments"] < 1.05 * (per_chip + batch)  # + tile padding
  assert mem["aliased"] >= 0.95 * per_chip                # the donated state is reused

  assert all(x.size % 7 for x in jax.tree.leaves(state["params"]))  # the test's premise
  ops = aot.collective_ops(compiled.as_text())
  in_scans = [op for op in ops if "/while/" in op[2]]
  assert {kind for kind, _, _ in in_scans} >= {"all-gather", "all-reduce"}
  moved = [(kind, dims, name) for kind, arrays, name in ops for dims in arrays
           if math.prod(dims) % 7 == 0]
  assert not [op for op in moved if "/while/" in op[2]], moved
  prefix = config.batch_size * 16 * 1024                  # B x class tokens x width
  assert moved and all(math.prod(dims) <= prefix for _, dims, _ in moved), moved
