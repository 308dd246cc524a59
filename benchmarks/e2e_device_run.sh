#!/usr/bin/env bash
# One device call: the GPU tests of the kernels, dispatch, graph decode and decode-only mode; with TUNE=1
# the decode plans timed over 32 cold layers (tune_decode_layers.py $TUNE_ARGS; with USE_BEST=1 the
# end-to-end runs use the fastest configuration it found, through --plan-json); then the end-to-end decode
# (bench_kernels.py --only e2e) with one process per model and batch sizes (E2E_SPECS), so that a
# failure at one shape leaves the other shapes' rows; with E2E_PROFILE=1 each shape also writes a per-kernel
# profile of every side's replayed steps.  Logs, CSVs and profiles are written under a work folder and
# packed into one file, $OUT/e2e_results.tgz (the device tool brings back few files).
#   OUT=/tmp/out bash benchmarks/e2e_device_run.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/e2e_out}
OUT=$(mktemp -d)
mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.log"
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TESTS_S:-220} python3 -m pytest -q -p no:cacheprovider -n 14 -m gpu -rs \
    tests/test_kernels.py tests/test_integration.py tests/test_decode_only.py 2>&1 | tail -60 > "$OUT/gpu_tests.log"
  tail -3 "$OUT/gpu_tests.log"
fi
if [ "${TUNE:-0}" = 1 ]; then  # decode plans over 32 cold layers (tune_decode_layers.py), Triton's cache filled first
  for i in 0 1 2 3 4 5 6 7; do
    timeout ${COMPILE_S:-150} python3 -W ignore benchmarks/tune_decode_layers.py $TUNE_ARGS --compile-only --part $i --parts 8 \
      > "$OUT/compile_$i.log" 2>&1 &
  done
  wait
  timeout ${TUNE_S:-200} python3 -W ignore benchmarks/tune_decode_layers.py $TUNE_ARGS --out "$OUT" --run "${RUN:-}" \
    --best-json "$OUT/best_layers.json" 2>&1 \
    | tee "$OUT/tune_layers.log" | grep -E "^\[|plan"
fi
PROFILE=$([ "${E2E_PROFILE:-0}" = 1 ] && echo --e2e-profile)
PLAN=$([ "${USE_BEST:-0}" = 1 ] && [ -s "$OUT/best_layers.json" ] && echo --plan-json "$OUT/best_layers.json")
for spec in ${E2E_SPECS:-llama3-8b:1 llama3-8b:8 llama3-8b:32 smollm2-135m:1,8}; do
  model=${spec%%:*}; bs=${spec#*:}; tag=${model}_b${bs//,/_}
  timeout ${E2E_S:-120} python3 -W ignore benchmarks/bench_kernels.py --only e2e --e2e-models "$model" \
    --e2e-b ${bs//,/ } --e2e-steps ${E2E_STEPS:-10} $PROFILE $PLAN --out "$OUT/$tag" > "$OUT/e2e_$tag.log" 2>&1
  grep -E "x[0-9.]+ \(byte limit|Error|error" "$OUT/e2e_$tag.log" | tail -8
done
tar czf "$FINAL/e2e_results.tgz" -C "$OUT" .
tar tzf "$FINAL/e2e_results.tgz" | head -40
