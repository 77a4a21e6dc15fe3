"""The device mesh, and the rules that place parameters and batches on it.

Every parameter carries logical axis names (`axes` metadata, e.g.
("layers", "embed", "mlp")); a study's rules map each name to a mesh axis or
to None (replicated). Unknown names, rules naming a missing mesh axis, and
two dimensions of one array on the same mesh axis are errors.
"""

import logging
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

# Names every model in this project uses; a rule for any other name is a typo.
LOGICAL_AXES = ("layers", "embed", "mlp", "heads", "head_dim", "kv_heads", "tokens",
                "patch", "half_patch", "classes", "vocab", "mixtures", "soft_tokens")


def make_mesh(axes: Sequence[tuple[str, int]], devices=None):
  """Mesh over all devices; one axis size may be -1 (takes what is left)."""
  devices = jax.devices() if devices is None else devices
  names, sizes = [a for a, _ in axes], [s for _, s in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ValueError(f"Mesh {dict(axes)} does not fit {len(devices)} devices.")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"Mesh {dict(zip(names, sizes))} needs {np.prod(sizes)} devices, "
                     f"there are {len(devices)}.")
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # TPU slices joined over the data-center network
    return jax.sharding.Mesh(_multislice(sizes, names, devices, slices), names, axis_types=auto)
  return jax.make_mesh(tuple(sizes), tuple(names), devices=devices, axis_types=auto)


def _multislice(sizes, names, devices, slices):
  """Devices [*sizes] with the first axis whose size divides by `slices` spanning them.

  jax.make_mesh places devices by their coordinates within one slice; across
  slices the slow network should carry one axis only, the outermost possible
  (the data axis, in meshes that give it the slices' number).
  """
  axis = next((i for i, s in enumerate(sizes) if s % slices == 0), None)
  if axis is None:
    raise ValueError(f"No axis of mesh {dict(zip(names, sizes))} divides by {slices} slices.")
  dcn = [slices if i == axis else 1 for i in range(len(sizes))]
  return mesh_utils.create_hybrid_device_mesh([s // d for s, d in zip(sizes, dcn)], dcn,
                                              devices)


def check_rules(rules, mesh):
  for name, target in rules:
    if name not in LOGICAL_AXES:
      raise ValueError(f"Sharding rule for unknown logical axis {name!r}; known: {LOGICAL_AXES}.")
    if target is not None and target not in mesh.axis_names:
      raise ValueError(f"Sharding rule {name!r} -> {target!r}: mesh axes are {mesh.axis_names}.")


def spec_for(axes, shape, rules, mesh):
  """PartitionSpec for an array with logical `axes`; indivisible dims stay replicated."""
  rules = dict(rules)
  if len(axes) + 1 == len(shape):  # stacked by nnx.vmap: the leading axis is the layer
    axes = ("layers",) + tuple(axes)
  out, used = [], set()
  for name, size in zip(axes, shape):
    target = rules.get(name) if name else None
    if target is not None and size % mesh.shape[target]:
      logging.info("Replicating a dim of %s (%s=%d) not divisible by mesh axis %s.",
                   shape, name, size, target)
      target = None
    if target is not None and target in used:
      raise ValueError(f"Two dims of an array {axes} map to mesh axis {target!r}.")
    used.add(target)
    out.append(target)
  return P(*out)


def state_shardings(state, rules, mesh):
  """NamedShardings for an nnx.State (or any pytree of Variables / arrays)."""
  check_rules(rules, mesh)

  def one(x):
    if not isinstance(x, nnx.Variable):
      return NamedSharding(mesh, P())
    axes = x.get_metadata().get("axes")
    spec = P() if axes is None else spec_for(axes, x.shape, rules, mesh)
    return x.replace(NamedSharding(mesh, spec))  # same tree structure as `state`
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain_batch(x):
  """x [B, ...] with B sharded over every mesh axis, the layout of the input batch.

  Pins activations to data parallelism where XLA's propagation could take a
  parameter's FSDP layout instead. Acts under `jax.set_mesh` (the compiled
  steps set it); a no-op elsewhere and where B does not divide by the mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, P(mesh.axis_names))


def on_mesh(fn, mesh):
  """fn traced and run under `jax.set_mesh(mesh)`, so that `constrain_batch` sees the mesh.

  A jitted fn keeps its `lower`, under the mesh too: aot.py compiles the
  train step for a TPU slice from abstract arguments.
  """
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return fn.lower(*args)
  if hasattr(fn, "lower"):
    call.lower = lower
  return call


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` placed by `shardings` (same tree), e.g. a restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh):
  """The batch axis over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh):
  return NamedSharding(mesh, P())


def put_batch(x, mesh):
  """A numpy array that every host holds whole [B, ...] -> a global jax.Array sharded over
  the batch; each host places only the rows of its own devices."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def to_host(tree):
  """Global jax.Arrays -> numpy on every host (gathered from all hosts)."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def global_batch(local_batch, mesh):
  """This host's numpy batch -> one global jax.Array per numeric key, sharded over the batch.

  Strings (e.g. eval batches' reference captions) stay on the host: dropped here.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items() if np.asarray(v).dtype.kind in "biuf"}
