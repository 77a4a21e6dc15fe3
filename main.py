"""Trains a study: python main.py --config=configs/STUDY.py --workdir=DIR [--config.key=value].

Running the same command again resumes from the latest checkpoint in DIR.
Multi-host (TPU pods, several GPU hosts): every host runs the same command
with --distributed.
"""

import os
import sys

# Before clu imports TensorFlow, whose C++ banners (oneDNN, CPU features) say
# nothing to a user: TensorFlow only decodes images here. Set either variable to
# see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from clu import metric_writers, periodic_actions
from ml_collections import config_flags

import input_pipeline
from configs import common
from jetformer import checkpoint, cluster, console, evaluation, preemption, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(console.QuietLibraries())
  cluster.initialize()
  logging.info("Process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  config = common.finalize(_CONFIG.value, keep=common.command_line_keys(sys.argv))
  try:
    checkpoint.check_writable(_WORKDIR.value)  # before clu's writer, whose error is TensorFlow's
    writer = metric_writers.create_default_writer(_WORKDIR.value,
                                                  just_logging=jax.process_index() > 0)
    results = train.train_and_evaluate(
        config, _WORKDIR.value, data=input_pipeline, writer=writer,
        progress=lambda n: periodic_actions.ReportProgress(num_train_steps=n, writer=writer))
  except (checkpoint.MismatchError, checkpoint.UnwritableError, train.ConfigError,
          FloatingPointError) as e:
    sys.exit(f"main.py: error: {e}")  # each message says what to do
  except preemption.Preempted as e:
    print(f"Preempted: checkpoint saved at step {e.step} in {_WORKDIR.value}; "
          "the same command resumes from it.", flush=True)
    return
  print(summary(results), flush=True)
  if config.final_tasks:  # e.g. the digits demos: sample grid and classifier scores
    final = evaluation.evaluate_checkpoint(config, _WORKDIR.value, data=input_pipeline,
                                           tasks=config.final_tasks, writer=writer)
    writer.flush()
    print("Final: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "step"),
          flush=True)


def summary(results):
  if "val_bpd" not in results:  # JetFormer
    return "Validation: " + ", ".join(f"{k.removeprefix('val_')} {v:.4f}"
                                      for k, v in results.items() if k.startswith("val_"))
  text = f"Validation bits/dim: Jet {results['val_bpd']:.3f}"
  if "val_png_bpd" in results:
    text += (f", PNG {results['val_png_bpd']:.3f}, lossless WebP {results['val_webp_bpd']:.3f}"
             " on the same images")
  return text


if __name__ == "__main__":
  app.run(main)
