#!/usr/bin/env bash
# Every GPU check in one run: the GPU-marked tests, then each bench script that exists, each under its own
# time limit so that a missing, failing or slow one does not stop the rest. Prints a summary table at the end.
#
#   bash bench/gpu_check.sh                 # results (JSON, logs) go to $OUT, or ./gpu_results without it
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
#   GPU_CHECK_ONLY="tests attention" bash bench/gpu_check.sh    # a subset: tests or bench script names
#
# Works with the machine's own python3 (jax 0.11, flax, optax, orbax, transformers, torch): packages it lacks
# (pytest, ...) are installed from wheels in ./wheels when that folder exists, without network.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS="${OUT:-gpu_results}"
mkdir -p "$RESULTS"
ONLY="${GPU_CHECK_ONLY:-all}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

if [ -d wheels ]; then
  "$PY" -m pip install -q --no-index --find-links wheels wheels/*.whl >"$RESULTS/pip.log" 2>&1 \
    || echo "note: installing ./wheels failed (see $RESULTS/pip.log)"
fi
"$PY" - <<'EOF'
import jax
print("jax", jax.__version__, "devices:", jax.devices())
EOF

SUMMARY=()
# run NAME LIMIT_S CMD...: runs CMD under a time limit, logs to $RESULTS/NAME.log, records the outcome.
run() {
  local name=$1 limit=$2
  shift 2
  case " $ONLY " in *" all "* | *" $name "*) ;; *) return ;; esac
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  [ "$rc" -ne 0 ] && status="failed (rc $rc)"
  [ "$rc" -eq 124 ] && status="timed out after ${limit}s"
  SUMMARY+=("$(printf '%-12s %-26s %6ss' "$name" "$status" $((SECONDS - t0)))")
}
# run_script NAME FILE LIMIT_S ARGS...: like run, for a bench script that may not exist yet.
run_script() {
  local name=$1 file=$2
  shift 2
  case " $ONLY " in *" all "* | *" $name "*) ;; *) return ;; esac
  if [ ! -f "$file" ]; then
    SUMMARY+=("$(printf '%-12s %-26s' "$name" "missing: $file")")
    return
  fi
  local limit=$1
  shift
  run "$name" "$limit" "$PY" "$file" "$@"
}

if "$PY" -c "import pytest" 2>/dev/null; then
  run tests 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
else
  SUMMARY+=("$(printf '%-12s %-26s' tests "skipped: no pytest")")
fi
run_script attention bench/attention.py 360 --out "$RESULTS/attention.json"
run_script eval_parity bench/eval_parity.py 120 --n 5 --json "$RESULTS/eval_parity.json"
# Every other bench script, with its own defaults.
for f in bench/*.py; do
  name=$(basename "$f" .py)
  case "$name" in attention | eval_parity) continue ;; esac
  run_script "$name" "$f" 120
done

echo
echo "=== GPU check summary (logs and JSON in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}"
