"""Transparent huge pages for the large blocks XLA:CPU allocates at every step.

XLA:CPU allocates a step's temporary buffers afresh at every call, and glibc
returns blocks that large to the kernel when they are freed, so every step
faults its working set in again 4 KiB at a time, each page zeroed by the
kernel: about 430,000 page faults (1.7 GB) per J-64 train step. Where the
kernel gives huge pages only to memory that asks for them (THP mode
`madvise`, the common default), glibc 2.35 and later asks for them for its
large blocks under the tunable `glibc.malloc.hugetlb=1`: the faults drop
25-fold and the bfloat16 Jet train steps run 1.1x faster on the CPU
(bench/RESULTS.md). Not measured on accelerator hosts.

glibc reads its tunables once, when a process starts, so `enable()`
re-executes the running command with the tunable added to `GLIBC_TUNABLES`.
The entry points (main.py, evaluate.py, bench/) call it before their heavy
imports, which would otherwise run twice.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JETFORMER_HUGEPAGES"  # "0": never re-execute
_REEXECUTED = "JETFORMER_HUGEPAGES_REEXECUTED"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported():
  """Linux with glibc >= 2.35 and THP in `madvise` mode (in `always` mode the tunable does nothing)."""
  libc, version = platform.libc_ver()
  if sys.platform != "linux" or libc != "glibc":
    return False
  if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
    return False
  try:
    with open(_THP_MODE) as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


def active():
  """Whether this process runs with the tunable in effect."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "") and supported()


def enable():
  """Re-executes this process once with `TUNABLE` set.

  Returns at once where the user set `glibc.malloc.hugetlb` (to any value) or
  JETFORMER_HUGEPAGES=0, where it is unsupported, after one re-execution
  (glibc drops the tunables of setuid processes), under a debugger, and for a
  script read from stdin.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if ("glibc.malloc.hugetlb" in tunables or os.environ.get(OPT_OUT) == "0"
      or _REEXECUTED in os.environ or sys.gettrace() is not None
      or not sys.executable or sys.argv[0] in ("", "-") or not supported()):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, TUNABLE])),
             **{_REEXECUTED: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  try:  # sys.orig_argv keeps the interpreter's own options and `-m module`.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    return
