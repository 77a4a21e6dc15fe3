"""hugepages.enable(): one re-execution with the glibc tunable, huge pages asked for large blocks."""

import os
import subprocess
import sys

import pytest

from jetformer import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counts its runs (argv[1]); on a second run with argv[2] == "drop" it loses
# GLIBC_TUNABLES, as glibc does for setuid processes. Then enables and prints
# whether the VMA of a fresh 64 MiB malloc block was madvised for huge pages
# ("hg" in its VmFlags; plain malloc, as numpy madvises by itself) and the
# tunables it runs with.
SCRIPT = """
import ctypes, os, sys
with open(sys.argv[1], "a") as f:
  f.write("run\\n")
if sys.argv[2] == "drop" and os.path.getsize(sys.argv[1]) > 4:
  os.environ.pop("GLIBC_TUNABLES")
from jetformer import hugepages
hugepages.enable()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 * 2**20)
advised = False
with open("/proc/self/smaps") as f:
  for line in f:
    if "-" in line.split()[0] and ":" not in line.split()[0]:
      lo, hi = (int(a, 16) for a in line.split()[0].split("-"))
      inside = lo <= block < hi
    elif line.startswith("VmFlags") and inside:
      advised = " hg" in line
print(int(advised), os.environ.get("GLIBC_TUNABLES", ""))
"""


def run(tmp_path, mode="keep", **env):
  """(runs, madvised, GLIBC_TUNABLES) of SCRIPT under os.environ updated by env."""
  runs = tmp_path / "runs"
  env = {**os.environ, **env}
  env.pop("JETFORMER_HUGEPAGES_REEXECUTED", None)
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(runs), mode], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=60)
  assert out.returncode == 0, out.stderr
  advised, _, tunables = out.stdout.strip().partition(" ")
  return runs.read_text().count("run"), advised == "1", tunables


needs_thp = pytest.mark.skipif(not hugepages.supported(),
                               reason="needs Linux, glibc >= 2.35 and THP in madvise mode")


@needs_thp
def test_reexecutes_once_keeping_other_tunables(tmp_path):
  got = run(tmp_path, GLIBC_TUNABLES="glibc.malloc.tcache_count=7", JETFORMER_HUGEPAGES="1")
  assert got == (2, True, "glibc.malloc.tcache_count=7:" + hugepages.TUNABLE)


@needs_thp
def test_reexecutes_once_even_if_glibc_drops_the_tunable(tmp_path):
  runs, _, tunables = run(tmp_path, "drop", GLIBC_TUNABLES="", JETFORMER_HUGEPAGES="1")
  assert (runs, tunables) == (2, "")


@pytest.mark.parametrize("env", [{"JETFORMER_HUGEPAGES": "0", "GLIBC_TUNABLES": ""},
                                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}])
def test_opt_out_runs_once_without_huge_pages(tmp_path, env):
  runs, advised, tunables = run(tmp_path, **env)
  assert (runs, advised, tunables) == (1, False, env["GLIBC_TUNABLES"])
