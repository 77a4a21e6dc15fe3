"""The Colab notebook, executed headless on CPU at its small size, does what it shows."""

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, subprocess_env

NOTEBOOK = ROOT / "notebooks" / "jetformer_colab.ipynb"


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_trains_samples_captions_and_restores(tmp_path, monkeypatch):
  for name, value in subprocess_env(1).items():   # the kernel inherits this environment
    monkeypatch.setenv(name, value)
  monkeypatch.setenv("JETFORMER_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JETFORMER_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JETFORMER_NOTEBOOK_DATA_DIR", str(tmp_path / "data"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  pictures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pictures) == 3      # the curves, the trained grid, the captioned digits
  summary = json.loads(nb.cells[-1].outputs[-1].text)
  assert summary["last_loss"] < summary["first_loss"], summary
  assert summary["grid_shape"] == [10, 8, 16, 16, 3]
  assert summary["restored_equal"] and summary["step"] == 30
  assert len(summary["captions"]) == 4 and all(isinstance(c, str) for c in summary["captions"])
