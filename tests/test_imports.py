"""The jetformer package never imports TensorFlow (or clu, which does); the benchmarks need no input stack."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                 for p in (ROOT / "jetformer").rglob("*.py") if p.name != "__init__.py")


def test_no_tensorflow_in_library():
  code = ("import importlib, sys\n"
          f"for m in {MODULES!r}: importlib.import_module(m)\n"
          "bad = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'tensorflow_datasets', 'clu', 'input_pipeline'})\n"
          "assert not bad, bad\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "jetformer.models.jet" in MODULES


def test_benchmarks_import_without_the_input_stack():
  """No TensorFlow, clu, grain, ml-collections or orbax: GPU images lack them (bench/gpu.sh)."""
  code = ("import sys\n"
          "import bench.jet, bench.jetformer, bench.sample\n"
          "bad = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'tensorflow_datasets', 'clu', 'grain', 'ml_collections', 'orbax', "
          "'input_pipeline'})\n"
          "assert not bad, bad\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
