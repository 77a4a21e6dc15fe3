"""Runs one of the Jet paper's ablation studies: python sweep.py --study=STUDY
--config=configs/BASE.py --workdir=DIR [--dry_run] [--config.key=value ...].

Each variant of the study is a few overrides of the base config; it trains with
main.py in DIR/<variant>/ (one after another; a variant that stopped resumes,
a finished one is not rerun), with any --config.* flags given here passed to
every variant. Then DIR/STUDY.md gets a table (final validation bpd,
parameters, steps/s) and DIR/STUDY.png the validation bpd against step, one
line per variant. --dry_run prints one main.py command per variant (for a
cluster) and runs nothing.

Paper scale: --config=configs/imagenet64_jet.py. The offline mini-sweeps of the
README run on configs/photo_patches_jet.py with --short (the overrides of SHORT).
"""

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np

# As in main.py: TensorBoard's event reader imports TensorFlow, whose C++ banners
# say nothing here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

C4S1 = '("channels","channels","channels","channels","spatial")'  # the paper's default

# study -> {variant: {config key: value}}; values are written as main.py parses them.
STUDIES = {
    # Figure 2 (right): depth of the ViT in every coupling.
    "vit_depth_sweep": {f"depth{d}": {"model.block_depth": d} for d in range(1, 7)},
    # Figure 2 (left): the conditioning network.
    "backbone_sweep": {"vit": {"model.backbone": "vit"}, "cnn": {"model.backbone": "cnn"}},
    # Figure 4: channel against spatial couplings, and the spatial patterns.
    "coupling_type_sweep": {
        "channels_only": {"model.kinds": '("channels",)'},
        "spatial_only": {"model.kinds": '("spatial",)'},
        "channels1_spatial1": {"model.kinds": '("channels","spatial")'},
        "channels4_spatial1": {"model.kinds": C4S1},
        "channels4_spatial1_checkerboard": {
            "model.kinds": C4S1,
            "model.spatial_projs": '("checkerboard","checkerboard-inv")'},
    },
    # Table 2: how a coupling splits its input.
    "masking_pairing_sweep": {"pairing": {"model.split": "pairing"},
                              "masking": {"model.split": "masking"}},
    # Table 2: Glow's ActNorm and invertible dense layers, each on or off.
    "norm_dense_sweep": {
        f"actnorm_{a}_dense_{d}": {"model.actnorm": a, "model.invertible_dense": d}
        for a in (False, True) for d in (False, True)},
}

# The offline mini-sweeps: photo_patches_jet shortened so that a study of up to six
# variants runs in about 20 minutes on 2 CPU cores.
SHORT = {"total_steps": 300, "batch_size": 32, "eval_every": 100, "log_every": 50,
         "ckpt_every": 300, "model.depth": 8, "model.emb_dim": 64, "model.num_heads": 2,
         "compare_png": False}


def flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def command(config, workdir, overrides, extra):
  return [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}",
          *flags(overrides), *extra]


FINISHED = "Validation bits/dim"  # main.py's last line, printed only when training ended


def run_variant(cmd, workdir):
  """Runs main.py unless the variant finished (log in workdir/log.txt); its status."""
  log, recorded = workdir / "log.txt", workdir / "cmd.txt"
  line = shlex.join(cmd[1:])
  if recorded.exists() and recorded.read_text().strip() != line:
    sys.exit(f"sweep.py: error: {workdir} holds a run of another command ({recorded}); "
             "use another --workdir or delete it.")
  if log.exists() and FINISHED in log.read_text():
    print(f"{workdir.name}: finished before, not rerun", flush=True)
    return "done"
  workdir.mkdir(parents=True, exist_ok=True)
  recorded.write_text(line + "\n")
  print(f"{workdir.name}: {line}", flush=True)
  with log.open("a") as f:
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT,
                         cwd=pathlib.Path(__file__).resolve().parent)
  if rc:
    print(f"{workdir.name}: failed (exit {rc}), see {log}", flush=True)
    return "failed"
  if FINISHED not in log.read_text():  # e.g. preempted: saved, exited 0, not done
    print(f"{workdir.name}: stopped before the end; rerun to resume it", flush=True)
    return "incomplete"
  return "done"


def scalars(workdir, tag):
  """[(step, value)] of a TensorBoard scalar in the variant's event files."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  acc = ea.EventAccumulator(str(workdir), size_guidance={ea.TENSORS: 0})
  acc.Reload()
  if tag not in acc.Tags()["tensors"]:
    return []
  points = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
  return sorted(points.items())  # a resumed run logs some steps twice: the last wins


def summary(dir_, variant):
  workdir = dir_ / variant
  log = workdir / "log.txt"
  params = re.search(r"\(([\d,]+) parameters\)", log.read_text() if log.exists() else "")
  speed = [v for _, v in scalars(workdir, "steps_per_sec")]
  speed = speed[1:] or speed  # the first report's interval holds the compilation
  return {"val_bpd": scalars(workdir, "val_bpd"),
          "params": int(params.group(1).replace(",", "")) if params else None,
          "steps_per_sec": float(np.median(speed)) if speed else None}


def write_table(path, study, variants, results, cmd):
  lines = [f"# {study}", "", f"    {cmd}", "",
           "| variant | overrides | status | final validation bpd | parameters | steps/s |",
           "| --- | --- | --- | --- | --- | --- |"]
  for name, overrides in variants.items():
    r = results[name]
    bpd = f"{r['val_bpd'][-1][1]:.4f} (step {r['val_bpd'][-1][0]})" if r["val_bpd"] else "-"
    params = f"{r['params']:,}" if r["params"] else "-"
    speed = f"{r['steps_per_sec']:.2f}" if r["steps_per_sec"] else "-"
    lines.append(f"| {name} | `{' '.join(flags(overrides))}` | {r['status']} | {bpd} | "
                 f"{params} | {speed} |")
  path.write_text("\n".join(lines) + "\n")


def write_plot(path, study, results):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    if r["val_bpd"]:
      ax.plot(*zip(*r["val_bpd"]), marker="o", label=name)
  ax.set(xlabel="step", ylabel="validation bits/dim", title=study)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--study", required=True, choices=sorted(STUDIES))
  parser.add_argument("--config", required=True,
                      help="the base study, e.g. configs/imagenet64_jet.py")
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument("--short", action="store_true",
                      help="the offline mini-sweeps' shortening (SHORT), before other overrides")
  args, extra = parser.parse_known_args()
  if bad := [a for a in extra if not a.startswith("--config.")]:
    parser.error(f"unknown arguments {bad}: only --config.KEY=VALUE overrides pass to main.py")
  extra = (flags(SHORT) if args.short else []) + extra
  variants = STUDIES[args.study]
  if args.dry_run:  # the paths as given: for a cluster's own checkout
    for name, overrides in variants.items():
      print(shlex.join(["python", *command(args.config, args.workdir / name, overrides,
                                           extra)[1:]]))
    return
  # main.py runs in the repository: paths given relative to here must still hold there.
  config_file, colon, variant_arg = args.config.partition(":")
  config = str(pathlib.Path(config_file).resolve()) + colon + variant_arg
  workdir = args.workdir.resolve()
  commands = {name: command(config, workdir / name, overrides, extra)
              for name, overrides in variants.items()}
  status = {name: run_variant(cmd, workdir / name) for name, cmd in commands.items()}
  results = {name: {**summary(workdir, name), "status": status[name]} for name in variants}
  this = shlex.join(["python", "sweep.py", *sys.argv[1:]])
  write_table(workdir / f"{args.study}.md", args.study, variants, results, this)
  write_plot(workdir / f"{args.study}.png", args.study, results)
  print((workdir / f"{args.study}.md").read_text(), flush=True)
  if any(s != "done" for s in status.values()):
    sys.exit("sweep.py: error: not every variant finished (the table's status column); "
             "rerun the same command to resume them.")


if __name__ == "__main__":
  main()
