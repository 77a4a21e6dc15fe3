"""The fixed splits of Jet's couplings, as index arrays into a flat [N*D] token grid.

The reference applies every split as a dense permutation-matrix product at
highest precision (`[N, D] x [D, D]` for channels, `[N, N] x [N, D]` for
space). Both splits are permutations of the N*D numbers of an example
followed by a reshape, so one gather with a stored int32 index does the
same work exactly and costs no FLOPs, and channel and spatial couplings share
one code path inside the scan (no `lax.cond`).

A split yields `x1, x2` of shape [N, D/2] each:
- channels: x1[t] = x[t, p[:D/2]], x2[t] = x[t, p[D/2:]] for a random p;
- spatial: the tokens idx1 (then idx2) of the pattern, each half [N/2, D]
  reshaped to [N, D/2] (token n's channels fill rows 2n and 2n+1).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

SPATIAL_PATTERNS = ("checkerboard", "vstripes", "hstripes")


def schedule(depth, kinds, channel_projs, spatial_projs):
  """[(kind, proj)] for each coupling, cycling the three tuples like the reference."""
  kinds_it = itertools.cycle(kinds)
  cc, sc = itertools.cycle(channel_projs), itertools.cycle(spatial_projs)
  out = []
  for _ in range(depth):
    kind = next(kinds_it)
    if kind == "channels":
      out.append((kind, next(cc)))
    elif kind == "spatial":
      out.append((kind, next(sc)))
    else:
      raise ValueError(f"Unknown coupling kind {kind!r}: use 'channels' or 'spatial'.")
  return out


def spatial_halves(pattern, nh, nw):
  """Token indices (idx1, idx2) of the two halves of an [nh, nw] grid."""
  n = nh * nw
  base = pattern.removesuffix("-inv")
  if base == "vstripes":
    idx1, idx2 = np.arange(n)[::2], np.arange(1, n)[::2]
  elif base == "hstripes":
    rows = np.arange(n) // nw
    idx1, idx2 = np.nonzero(rows % 2 == 0)[0], np.nonzero(rows % 2 == 1)[0]
  elif base == "checkerboard":
    vals = (np.arange(n).reshape(nh, nw) + np.arange(nh)[:, None]).reshape(-1)
    idx1, idx2 = np.nonzero(vals % 2 == 0)[0], np.nonzero(vals % 2 == 1)[0]
  else:
    raise ValueError(f"Unknown spatial pattern {pattern!r}: use one of "
                     f"{SPATIAL_PATTERNS} or their '-inv' variants.")
  if len(idx1) != n // 2 or len(idx2) != n // 2:
    raise ValueError(f"Pattern {pattern!r} does not halve a {nh}x{nw} token grid.")
  return (idx2, idx1) if pattern.endswith("-inv") else (idx1, idx2)


def channel_flat(p, n):
  """Flat gather index for a channel split by permutation p of D channels."""
  d = len(p)
  t = jnp.arange(n)[:, None] * d                    # [N, 1]
  return jnp.concatenate([(t + p[None, :d // 2]).reshape(-1),
                          (t + p[None, d // 2:]).reshape(-1)])


def spatial_flat(idx1, idx2, d):
  """Flat gather index for a spatial split into token halves idx1, idx2."""
  order = np.concatenate([idx1, idx2])              # [N]
  return (order[:, None] * d + np.arange(d)[None, :]).reshape(-1)


def flat_permutations(key, sched, nh, nw, d):
  """[depth, N*D] int32 gather indices; channel permutations drawn from `key` (traceable)."""
  n, perms = nh * nw, []
  for i, (kind, proj) in enumerate(sched):
    if kind == "channels":
      if proj != "random":
        raise ValueError(f"Unknown channel projection {proj!r}: only 'random'.")
      perms.append(channel_flat(jax.random.permutation(jax.random.fold_in(key, i), d), n))
    else:
      perms.append(jnp.asarray(spatial_flat(*spatial_halves(proj, nh, nw), d)))
  return jnp.stack(perms).astype(jnp.int32)
