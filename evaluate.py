"""Evaluates a checkpoint: python evaluate.py --config=configs/STUDY.py --workdir=DIR [--step=N]
[--tasks=bpd,sample,caption,reconstruct,digits,fid].

Pass the config and the --config.* overrides the run was trained with: they
give the model, the validation data and the seed of its dequantization noise;
--config.sample.* and --config.caption.* set the sampling (e.g.
--config.sample.cfg_weight=2 --config.sample.prompts_file=prompts.txt). The
mesh may differ (e.g. --config.mesh="(('data',1),('fsdp',1))" on one device).
Writes DIR/eval_STEP.json, the tasks' PNG / npz / jsonl files beside it, the
same to TensorBoard in DIR, and prints the numbers. Multi-host: the same
command on every host with main.py's --distributed flags.
"""

import json
import os
import sys

# As in main.py: before TensorFlow is imported, its C++ banners silenced.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from clu import metric_writers
from etils import epath
from ml_collections import config_flags

import input_pipeline
from configs import common
from jetformer import cluster, console, evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate; default the latest.")
_TASKS = flags.DEFINE_list("tasks", ["bpd"], f"Comma-separated, of {sorted(evaluation.TASKS)}.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(console.QuietLibraries())
  cluster.initialize()
  config = common.finalize(_CONFIG.value, keep=common.command_line_keys(sys.argv))
  writer = metric_writers.create_default_writer(_WORKDIR.value,
                                                just_logging=jax.process_index() > 0)
  results = evaluation.evaluate_checkpoint(config, _WORKDIR.value, data=input_pipeline,
                                           step=_STEP.value, tasks=_TASKS.value, writer=writer)
  writer.flush()
  path = epath.Path(_WORKDIR.value) / f"eval_{results['step']}.json"  # epath: gs:// too
  if jax.process_index() == 0:
    path.write_text(json.dumps(results, indent=1))
  numbers = ", ".join(f"{k}={v:.6g}" for k, v in results.items() if k != "step")
  print(f"Step {results['step']}: {numbers} ({path})", flush=True)


if __name__ == "__main__":
  app.run(main)
