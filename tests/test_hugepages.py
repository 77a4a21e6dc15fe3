"""hugepages.enable(): one re-execution with the glibc tunable, huge pages behind large blocks."""

import os
import subprocess
import sys

import pytest

from jetformer import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counts its runs, enables, then reports the huge pages behind a freshly
# malloc'd and written 64 MiB block (plain malloc: numpy would madvise itself)
# and its tunables.
SCRIPT = """
import os, sys
with open(sys.argv[1], "a") as f:
  f.write("run\\n")
from jetformer import hugepages
hugepages.enable()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 * 2**20)
ctypes.memset(block, 1, 64 * 2**20)
with open("/proc/self/smaps_rollup") as f:
  huge = [int(l.split()[1]) for l in f if l.startswith("AnonHugePages")][0]
print(huge, os.environ.get("GLIBC_TUNABLES", ""))
"""


def run(tmp_path, **env):
  runs = tmp_path / "runs"
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(runs)], cwd=ROOT, check=True,
                       capture_output=True, text=True, env={**os.environ, **env})
  huge_kib, _, tunables = out.stdout.strip().partition(" ")
  return runs.read_text().count("run"), tunables, int(huge_kib)


@pytest.mark.skipif(not hugepages.supported(), reason="needs Linux, glibc >= 2.35 and THP")
def test_reexecutes_once_keeping_other_tunables(tmp_path):
  runs, tunables, huge_kib = run(tmp_path, GLIBC_TUNABLES="glibc.malloc.tcache_count=7",
                                 **{hugepages.OPT_OUT: "1"})
  assert runs == 2
  assert tunables == "glibc.malloc.tcache_count=7:" + hugepages.TUNABLE
  assert huge_kib >= 32 * 1024  # most of the 64 MiB block sits on 2 MiB pages


def test_opt_out_runs_once_unchanged(tmp_path):
  runs, tunables, huge_kib = run(tmp_path, **{hugepages.OPT_OUT: "0", "GLIBC_TUNABLES": ""})
  assert (runs, tunables) == (1, "")
  if hugepages.supported() and "[madvise]" in open(hugepages._THP_MODE).read():
    assert huge_kib < 8 * 1024  # only what asks for huge pages gets them
