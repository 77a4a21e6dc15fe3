#!/bin/bash
# The Jet train-step benchmarks on one GPU, as recorded in bench/RESULTS.md:
#   bash bench/gpu.sh OUTDIR
# Needs jax with CUDA, flax, optax and einops; no TensorFlow. Appends each
# run's timing line and JSON line to OUTDIR/jet.txt.
#
# The FLOP count compiles the step with its couplings unrolled, which on the
# GPU takes over a minute for J-64 (the timing line comes before it). The
# recorded runs had an 80 s limit, so all FLOPs but J-small's at batch 32
# came from the CPU's count.
set -u
out=${1:?usage: bash bench/gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JETFORMER_HUGEPAGES=0  # huge pages: an XLA:CPU fix only
for a in "--config=J-small" "--config=J-64" "--config=J-64 --batch=256" \
         "--config=J-small --batch=512"; do
  echo "== $a" | tee -a "$out/jet.txt"
  timeout 200 python3 bench/jet.py $a 2>&1 | grep -E '^(median step|\{)' | tee -a "$out/jet.txt"
done
