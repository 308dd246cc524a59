#!/usr/bin/env bash
# One device call for the prefill kernel (issue 14).  Steps (first argument, comma-separated):
#   tune  — the launch search with its ceilings (tune_prefill.py); its table is then written into
#           this copy's prefill.py, which the later steps run;
#   tests — the prefill / dispatch / generation GPU tests;
#   bench — the benchmark rows at the kernel's default launch (bench_kernels.py --only prefill,real).
# Logs and CSVs go to $OUT.  OLD=path/to/previous/prefill.py adds the before/after to the search.
#   OUT=/tmp/out bash benchmarks/prefill_device_run.sh tune,tests,bench [extra bench_kernels.py arguments]
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/prefill_out}
mkdir -p "$OUT"
STEPS=${1:-tune,tests,bench}
shift
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/prefill_gpu.log"
if [[ $STEPS == *tune* ]]; then
  timeout ${TUNE_S:-150} python3 -W ignore benchmarks/tune_prefill.py --n 16384 4096 ${OLD:+--old "$OLD"} \
    --out "$OUT" 2>&1 | tee -a "$OUT/prefill_tune.log"
  [[ -f $OUT/prefill_best.json ]] && python3 benchmarks/tune_prefill.py --apply "$OUT/prefill_best.json" 2>&1 \
    | tee -a "$OUT/prefill_tune.log"
fi
if [[ $STEPS == *tests* ]]; then
  timeout ${TESTS_S:-130} python3 -m pytest -q -p no:cacheprovider -n 14 tests/test_kernels.py \
    -k "prefill_gpu or dispatch_gpu or model_generation_gpu" 2>&1 | tee -a "$OUT/prefill_gpu.log"
fi
TUTORIAL_LAUNCH=${TUTORIAL_LAUNCH:-}
[[ -f $OUT/prefill_best.env ]] && source "$OUT/prefill_best.env"
if [[ $STEPS == *bench* ]]; then
  timeout ${BENCH_S:-170} python3 -W ignore benchmarks/bench_kernels.py --only prefill,real --out "$OUT" \
    ${TUTORIAL_LAUNCH:+--tutorial-launch $TUTORIAL_LAUNCH} "$@" 2>&1 | tee "$OUT/prefill_bench.log"
  rm -f "$OUT"/kernels_*.md
fi
