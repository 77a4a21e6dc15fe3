"""Known accelerators' peak dense bfloat16 rate and memory, by JAX's `device_kind`.

For MFU (benchmarks, aot.py) and fit (aot.py). Vendors' published figures per
JAX device: a TPU chip (v4 and v5p present one device per chip, megacore), a
GPU. Kinds not listed give None, and callers leave the figure out.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float   # dense bfloat16 FLOP/s per device
  hbm_gib: float      # memory per device


# Longest prefix first: "TPU v5 lite" before "TPU v5".
_KNOWN = (
    ("TPU v6 lite", Chip("v6e", 918e12, 32)),
    ("TPU v5 lite", Chip("v5e", 197e12, 16)),
    ("TPU v5", Chip("v5p", 459e12, 95)),
    ("TPU v4", Chip("v4", 275e12, 32)),
    ("NVIDIA H200", Chip("H200", 989e12, 141)),
    ("NVIDIA H100", Chip("H100", 989e12, 80)),
    ("NVIDIA A100", Chip("A100", 312e12, 80)),
    ("NVIDIA L4", Chip("L4", 121e12, 24)),
)


def lookup(device_kind):
  """The Chip whose kind prefixes `device_kind` (e.g. "NVIDIA H200", "TPU v5 lite"), or None."""
  for prefix, chip in _KNOWN:
    if device_kind.startswith(prefix):
      return chip
  return None
