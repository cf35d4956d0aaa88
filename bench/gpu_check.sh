#!/usr/bin/env bash
# Every GPU check in one run: the GPU-marked tests, then each bench script that exists, each under its own
# time limit so that a missing, failing or slow one does not stop the rest. Prints a summary table at the end.
#
#   bash bench/gpu_check.sh                 # results (JSON, logs) go to $OUT, or ./gpu_results without it
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
#   GPU_CHECK_ONLY="tests attention" bash bench/gpu_check.sh    # a subset: tests or bench script names
#   GPU_CHECK_BUDGET_S=560 bash bench/gpu_check.sh              # total time; each step is cut to what is left
#
# Steps run most important first (the attention and training-step targets), so a short budget loses the least.
#
# Works with the machine's own python3 (jax 0.11, flax, optax, orbax, transformers, torch): packages it lacks
# (pytest, ...) are installed from wheels in ./wheels when that folder exists, without network.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS="${OUT:-gpu_results}"
mkdir -p "$RESULTS"
ONLY="${GPU_CHECK_ONLY:-all}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-560}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# Packages brought by scripts/device_bundle.py + device_unpack.sh --install (real SmolLM2 weights, task data).
# shellcheck disable=SC1091
[ -f "${SHIP_DIR:-/root/ship}/env.sh" ] && . "${SHIP_DIR:-/root/ship}/env.sh"
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
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("$(printf '%-16s %-26s' "$name" "skipped: budget spent")")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  [ "$rc" -ne 0 ] && status="failed (rc $rc)"
  [ "$rc" -eq 124 ] && status="timed out after ${limit}s"
  SUMMARY+=("$(printf '%-16s %-26s %6ss' "$name" "$status" $((SECONDS - t0)))")
}
# run_script NAME FILE LIMIT_S ARGS...: like run, for a bench script that may not exist yet.
run_script() {
  local name=$1 file=$2
  shift 2
  case " $ONLY " in *" all "* | *" $name "*) ;; *) return ;; esac
  if [ ! -f "$file" ]; then
    SUMMARY+=("$(printf '%-16s %-26s' "$name" "missing: $file")")
    return
  fi
  local limit=$1
  shift
  run "$name" "$limit" "$PY" "$file" "$@"
}

run_script attention bench/attention.py 180 --lengths 4096,32768,2048,8192,16384 --out "$RESULTS/attention.json"
run_script train_throughput bench/train_throughput.py 150 --models llama3.2-1b --seqs 4096 \
  --cases full:cudnn_causal,ansan:anchor_pallas,ansan:anchor,ansan:cudnn,full:cudnn --out "$RESULTS/train_throughput.json"
run_script inference bench/inference.py 120 --out "$RESULTS/inference.json"
if "$PY" -c "import pytest" 2>/dev/null; then
  # -o addopts="": the project's addopts name pytest-xdist options, which the machine's python may lack.
  run tests 60 env JAX_PLATFORMS=cuda "$PY" -m pytest -q -o addopts="" -m gpu -p no:cacheprovider \
    --continue-on-collection-errors tests
else
  SUMMARY+=("$(printf '%-16s %-26s' tests "skipped: no pytest")")
fi
run_script eval_parity bench/eval_parity.py 40 --n 5 --json "$RESULTS/eval_parity.json"
# Any other bench script, with its own defaults.
for f in bench/*.py; do
  name=$(basename "$f" .py)
  case "$name" in attention | train_throughput | inference | eval_parity) continue ;; esac
  run_script "$name" "$f" 60
done

echo
echo "=== GPU check summary (logs and JSON in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}"
