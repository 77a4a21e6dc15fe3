"""Transparent huge pages for the large blocks XLA:CPU allocates at every step.

XLA:CPU allocates a step's temporary buffers afresh at every call, and glibc
returns blocks that large to the kernel when they are freed, so every step
faults its working set in again 4 KiB at a time, each page zeroed by the
kernel: about 430,000 page faults (1.7 GB) per J-64 train step. glibc 2.35
and later can back such blocks with 2 MiB transparent huge pages (the tunable
`glibc.malloc.hugetlb=1`), which cuts the faults 25-fold and makes the Jet
train steps 7-20% faster on the CPU (bench/RESULTS.md). Accelerator hosts lose
nothing by it.

glibc reads its tunables once, when a process starts, so `enable()`
re-executes the running command with the tunable added to `GLIBC_TUNABLES`.
The entry points (main.py, evaluate.py, bench/) call it before importing JAX;
`JETFORMER_HUGEPAGES=0` turns it off.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JETFORMER_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported():
  """Linux with glibc >= 2.35 and transparent huge pages not switched off."""
  libc, version = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc":
    return False
  if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
    return False
  try:
    with open(_THP_MODE) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def enable():
  """Re-executes this process with `TUNABLE` set; returns at once where it is set or unsupported."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables or os.environ.get(OPT_OUT) == "0" or not supported():
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, TUNABLE])))
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps the interpreter's own options and `-m module`.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
