#!/usr/bin/env bash
# Small-scale AnLLM reproduction in one command (after scripts/setup.sh):
#   scripts/reproduce.sh            full run on one GPU (~8 min on an H100), outputs in runs/reproduce
#   scripts/reproduce.sh --smoke    every stage at toy size on CPU, outputs in runs/reproduce-smoke
# Options: --out DIR, --limit N (questions per task), --tasks LIST. See scripts/reproduce.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/reproduce.py "$@"
