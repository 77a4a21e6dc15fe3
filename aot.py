"""Compiles a study's train step for a TPU slice on a machine without one (needs libtpu).

  python aot.py --config=configs/imagenet64_jet.py --topology=v5p:2x2x2
  python aot.py --config=configs/jetformer_imagenet256.py:1.3B --topology=v5p:4x4x4

The step is the one main.py would run there: the config's mesh, sharding
rules and batch, the state donated. Prints the memory each chip needs
against its HBM, the model FLOPs per step, XLA's step-time estimate and the
MFU it implies, and the collectives; the last line is the same as JSON.
Topologies: v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB (chips per axis);
--num_slices joins several over the data-center network.
"""

import json
import os
import sys

# The compile targets the topology, not this machine: no TPU runtime to start (jetformer.aot
# shares libtpu's lock). The hostnames spare the stderr libtpu's search for a TPU VM.
for _key, _value in {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1",
                     "TPU_WORKER_HOSTNAMES": "localhost"}.items():
  os.environ.setdefault(_key, _value)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import common  # noqa: E402
from jetformer import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:2x2x2, v5e:4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network.")
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "Also write the compiled HLO's text there.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  config = common.finalize(_CONFIG.value, keep=common.command_line_keys(sys.argv))
  data = None
  if config.get("text", {}).get("tokenizer"):  # the vocabulary size comes from the tokenizer
    import input_pipeline as data  # noqa: PLC0415 (TensorFlow: text studies only)
  try:
    report, compiled = aot.compile_study(config, _TOPOLOGY.value, _NUM_SLICES.value, data)
  except aot.InputError as e:  # a bad topology, mesh or batch: a line, not a traceback
    sys.exit(f"aot.py: error: {e}")
  if _HLO_OUT.value:
    with open(_HLO_OUT.value, "w") as f:
      f.write(compiled.as_text())
  report["study"] = study_name(flags.FLAGS["config"])
  for line in aot.describe(report, config):
    print(line)
  print(json.dumps(report), flush=True)


def study_name(flag):
  """configs/jetformer_imagenet256.py:1.3B -> jetformer_imagenet256:1.3B."""
  path = config_flags.get_config_filename(flag)
  arg = flag.serialize().partition(".py")[2]  # ":1.3B" or ""
  return os.path.basename(path).partition(":")[0].removesuffix(".py") + arg


if __name__ == "__main__":
  app.run(main)
