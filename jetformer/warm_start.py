"""`config.init_from`: a new run's weights from another run's checkpoint.

Only weights are read (params, the couplings' frozen permutations, and the
EMA where both runs keep one), never the optimizer state or the input
position: the new run starts at step 0. A Jet study's checkpoint goes into a
JetFormer's adaptor (`params["jet"]`, `frozen["jet"]`), the rest of the
JetFormer staying as initialised; the Jet must have the adaptor's shapes
(its `ps` the JetFormer's `patch_size`, the same depth, widths and kinds, no
classes). With `objective.frozen_flow` that is the paper's frozen-flow
ablation.
"""

import jax
import jax.numpy as jnp
from etils import epath

from jetformer import checkpoint, sharding


def source(path):
  """(manager, step) of `path`: a workdir (its latest checkpoint) or WORKDIR/checkpoints/N."""
  p = epath.Path(path)
  workdir, step = (p.parent.parent, int(p.name)) if p.name.isdigit() else (p, None)
  mgr = checkpoint.reader(workdir)
  step = mgr.latest_step() if step is None else step
  if step is None or step not in mgr.all_steps():
    raise checkpoint.MismatchError(
        f"init_from={path}: no checkpoint there; give a workdir with checkpoints/ or "
        "WORKDIR/checkpoints/STEP.")
  return mgr, step


def load(path, state, shardings):
  """`state` with its weights replaced by those saved at `path` (see the module doc)."""
  mgr, step = source(path)
  saved = checkpoint.saved_shapes(mgr, step)
  into_adaptor = "jet" in state["params"] and not any(k.startswith("params/jet/") for k in saved)
  place = (lambda tree: tree["jet"]) if into_adaptor else (lambda tree: tree)
  # An adaptor's EMA starts as its params (a frozen flow's never moves), not as the Jet's EMA.
  names = ["params", "frozen"] + (["ema"] if "ema" in state and not into_adaptor and any(
      k.startswith("ema/") for k in saved) else [])
  target = {n: sharding.abstract(place(state[n]), place(shardings[n])) for n in names}
  checkpoint.check_matches(mgr, step, target, what=f"init_from={path}", partial=True,
                           saved=saved)
  _, weights = checkpoint.restore(mgr, target, step=step, partial=True)
  if "ema" in state and "ema" not in weights:  # a copy: the step donates each buffer once
    weights["ema"] = jax.tree.map(jnp.copy, weights["params"])
  new = dict(state)
  for n, tree in weights.items():
    new[n] = dict(state[n], jet=tree) if into_adaptor else tree
  return new
