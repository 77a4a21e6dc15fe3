"""The jetformer package never imports TensorFlow (or clu, which does); the benchmarks need no input stack."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                 for p in (ROOT / "jetformer").rglob("*.py") if p.name != "__init__.py")
TENSORFLOW = {"tensorflow", "tensorflow_datasets", "clu", "input_pipeline"}


def assert_imports_none_of(modules, banned):
  """Imports `modules` in a fresh interpreter; none of the `banned` packages may come along."""
  code = ("import importlib, sys\n"
          f"for m in {sorted(modules)!r}: importlib.import_module(m)\n"
          f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & {set(banned)!r})\n"
          "assert not bad, bad\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]


def test_no_tensorflow_in_library():
  assert "jetformer.models.jet" in MODULES
  assert_imports_none_of(MODULES, TENSORFLOW)


def test_benchmarks_import_without_the_input_stack():
  """No TensorFlow, clu, grain, ml-collections or orbax: GPU images lack them (bench/gpu.sh)."""
  assert_imports_none_of(["bench.jet", "bench.jetformer", "bench.sample"],
                         TENSORFLOW | {"grain", "ml_collections", "orbax"})
