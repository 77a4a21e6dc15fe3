#!/bin/bash
# The train-step benchmarks on one GPU, as recorded in bench/RESULTS.md:
#   bash bench/gpu.sh OUTDIR
# Needs jax with CUDA, flax, optax and einops; no TensorFlow. Appends each
# run's timing line and JSON line (with MFU against the GPU's bf16 peak) to
# OUTDIR/bench.txt. The paper-shaped settings run with XLA's attention and
# with cuDNN's fused kernels.
set -u
out=${1:?usage: bash bench/gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # -m MODULE ARGS...
  echo "== $*" | tee -a "$out/bench.txt"
  timeout 240 python3 "$@" 2>&1 | grep -E '^(median step|\{|.*Error)' | tee -a "$out/bench.txt"
}
run -m bench.jet --config=J-64 --batch=256
for impl in xla cudnn; do
  run -m bench.jet --config=J-paper --attention_impl=$impl
  run -m bench.jetformer --config=JF-350M --attention_impl=$impl
done
