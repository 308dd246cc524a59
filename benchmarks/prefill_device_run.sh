#!/usr/bin/env bash
# One device call for the prefill kernel (issue 14): the launch search with its ceilings
# (tune_prefill.py), then the benchmark rows at the chosen launch (bench_kernels.py --only
# prefill,real), then the prefill / dispatch / generation GPU tests.  Logs and CSVs go to $OUT.
#
#   OUT=/tmp/out OLD=path/to/previous/prefill.py bash benchmarks/prefill_device_run.sh [tune,bench,tests]
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/prefill_out}
mkdir -p "$OUT"
STEPS=${1:-tune,bench,tests}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/prefill_tune.log"
if [[ $STEPS == *tune* ]]; then  # the launch search; its table is then written into prefill.py (this copy)
  timeout 150 python3 -W ignore benchmarks/tune_prefill.py --n 16384 4096 ${OLD:+--old "$OLD"} --out "$OUT" 2>&1 \
    | tee -a "$OUT/prefill_tune.log"
  [[ -f $OUT/prefill_best.json ]] && python3 benchmarks/tune_prefill.py --apply "$OUT/prefill_best.json" 2>&1 \
    | tee -a "$OUT/prefill_tune.log"
fi
TUTORIAL_LAUNCH=""
[[ -f $OUT/prefill_best.env ]] && source "$OUT/prefill_best.env"
if [[ $STEPS == *bench* ]]; then  # the kernel's defaults, as the tests below see them
  timeout 170 python3 -W ignore benchmarks/bench_kernels.py --only prefill,real --out "$OUT" \
    ${TUTORIAL_LAUNCH:+--tutorial-launch $TUTORIAL_LAUNCH} 2>&1 | tee "$OUT/prefill_bench.log"
fi
if [[ $STEPS == *tests* ]]; then
  timeout 130 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_kernels.py \
    -k "prefill_gpu or dispatch_gpu or model_generation_gpu" 2>&1 | tee "$OUT/prefill_gpu_tests.log"
fi
