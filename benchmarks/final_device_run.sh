#!/usr/bin/env bash
# One device call after the merge of this session's kernel work: the GPU tests of every kernel, dispatch,
# generation and decode-only test, the end-to-end decode with the fair dense baseline, and the
# decode-only mode's time to first token.  Logs and CSVs go to $OUT.
#   OUT=/tmp/out bash benchmarks/final_device_run.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/final_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/final_gpu.log"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  2>&1 | tee -a "$OUT/final_gpu.log"
timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider -n 14 -m gpu -rs \
  tests/test_kernels.py tests/test_integration.py tests/test_decode_only.py 2>&1 | tail -60 | tee "$OUT/final_gpu_tests.log"
timeout ${TTFT_S:-90} python3 -W ignore benchmarks/ttft.py --out "$OUT" 2>&1 | tee "$OUT/final_ttft.log"
timeout ${E2E_S:-200} python3 -W ignore benchmarks/bench_kernels.py --only e2e --e2e-models llama3-8b smollm2-135m \
  --e2e-steps ${E2E_STEPS:-10} --out "$OUT" 2>&1 | tee "$OUT/final_e2e.log"
ls -la "$OUT"
