#!/usr/bin/env bash
# One device call: tune_decode_layers.py (Triton's cache filled by 8 compile-only processes first), then
# the end-to-end decode with the best plan it found (bench_kernels.py --plan-json), one process per
# model and batch size.  Everything is packed into $OUT/tune_layers.tgz.
#   OUT=/tmp/out bash benchmarks/tune_layers_device_run.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/tune_out}
W=$(mktemp -d)
mkdir -p "$FINAL"
t0=$(date +%s)
for i in 0 1 2 3 4 5 6 7; do
  timeout ${COMPILE_S:-150} python3 -W ignore benchmarks/tune_decode_layers.py --compile-only --part $i --parts 8 \
    > "$W/compile_$i.log" 2>&1 &
done
wait
echo "compiled in $(( $(date +%s) - t0 )) s"
timeout ${TUNE_S:-200} python3 -W ignore benchmarks/tune_decode_layers.py --out "$W" --run "${RUN:-16}" \
  --best-json "$W/best_layers.json" 2>&1 | tee "$W/tune_layers.log" | grep -E "^\[|plan|best|   "
echo "tuned at $(( $(date +%s) - t0 )) s"
if [ -s "$W/best_layers.json" ]; then
  for spec in ${E2E_SPECS:-llama3-8b:1 llama3-8b:8 smollm2-135m:1}; do
    model=${spec%%:*}; bs=${spec#*:}; tag=${model}_b${bs//,/_}
    timeout ${E2E_S:-100} python3 -W ignore benchmarks/bench_kernels.py --only e2e --e2e-models "$model" \
      --e2e-b ${bs//,/ } --e2e-steps 10 --plan-json "$W/best_layers.json" --out "$W/$tag" > "$W/e2e_$tag.log" 2>&1
    grep -E "x[0-9.]+ \(byte limit|Error|error" "$W/e2e_$tag.log" | tail -4
  done
fi
echo "done at $(( $(date +%s) - t0 )) s"
tar czf "$FINAL/tune_layers.tgz" -C "$W" .
