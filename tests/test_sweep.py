"""sweep.py: a study's commands, its runs through main.py, the table and the plot; and the
ablations' overrides training the photo_patches demo end to end."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

STUDIES = {"vit_depth_sweep": 6, "backbone_sweep": 2, "coupling_type_sweep": 5,
           "masking_pairing_sweep": 2, "norm_dense_sweep": 4}  # variants each


def sweep_cmd(study, workdir, *flags):
  return [sys.executable, "sweep.py", f"--study={study}", "--config=configs/photo_patches_jet.py",
          f"--workdir={workdir}", *flags]


def test_dry_run_prints_one_main_command_per_variant(tmp_path):
  for study, count in STUDIES.items():
    out = subprocess.run(sweep_cmd(study, tmp_path, "--dry_run", "--short"), cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == count, study
    workdirs = set()
    for line in lines:
      argv = shlex.split(line)
      assert argv[:3] == ["python", "main.py", "--config=configs/photo_patches_jet.py"]  # as given
      assert "--config.total_steps=300" in argv
      workdirs.add(next(a for a in argv if a.startswith(f"--workdir={tmp_path}/")))
    assert len(workdirs) == count
  assert not any(tmp_path.iterdir())  # nothing ran


def test_unknown_argument_is_one_line(tmp_path):
  out = subprocess.run(sweep_cmd("backbone_sweep", tmp_path, "--steps=3"), cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 2 and "only --config.KEY=VALUE overrides" in out.stderr


@pytest.mark.slow
def test_sweep_runs_variants_writes_table_and_plot_and_skips_finished_ones(tmp_path):
  flags = ("--config.runlocal=True", f"--config.dataset.data_dir={tmp_path / 'data'}")
  run = lambda: subprocess.run(sweep_cmd("masking_pairing_sweep", tmp_path / "sw", *flags),
                               cwd=ROOT, env=subprocess_env(1), capture_output=True,
                               text=True, timeout=900)
  out = run()
  assert out.returncode == 0, out.stderr[-3000:]
  table = (tmp_path / "sw" / "masking_pairing_sweep.md").read_text()
  rows = re.findall(r"^\| (pairing|masking) \| .* \| done \| ([\d.]+) \(step 20\) \| "
                    r"([\d,]+) \| ([\d.]+) \|$", table, re.M)
  assert [r[0] for r in rows] == ["pairing", "masking"], table
  assert all(2 < float(r[1]) < 9 for r in rows)
  assert rows[0][2] != rows[1][2]  # masking's networks read and predict all D values
  assert (tmp_path / "sw" / "masking_pairing_sweep.png").stat().st_size > 10_000
  again = run()
  assert again.returncode == 0 and again.stdout.count("finished before, not rerun") == 2


@pytest.mark.slow
def test_cnn_actnorm_invertible_dense_train_the_demo_through_main(tmp_path):
  cmd = [sys.executable, "main.py", "--config=configs/photo_patches_jet.py",
         f"--workdir={tmp_path / 'run'}", "--config.runlocal=True",
         f"--config.dataset.data_dir={tmp_path / 'data'}", "--config.model.backbone=cnn",
         "--config.model.actnorm=True", "--config.model.invertible_dense=True"]
  run = lambda *flags: subprocess.run([*cmd, *flags], cwd=ROOT, env=subprocess_env(2),
                                      capture_output=True, text=True, timeout=600)
  out = run()
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stdout + out.stderr
  assert "ActNorm layers initialised from the first training batch" in log
  train = [float(v) for v in re.findall(r"train_bpd=([\d.]+)", log)]
  assert train[-1] < train[0] - 0.3, train
  assert re.search(r"Validation bits/dim: Jet [\d.]+", log)
  # Resumed, the ActNorms keep their trained values: no second data init.
  out = run("--config.total_steps=24")
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stdout + out.stderr
  assert "starting at step 20 of 24" in log and "ActNorm layers initialised" not in log
