#!/usr/bin/env bash
# Run N JAX processes of one job on this machine, joined by jax.distributed on 127.0.0.1.
#
#   launch/local_multiprocess.sh N [module args...]
#   launch/local_multiprocess.sh 2 --config configs/demo.yaml steps=4
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i, which
# anllm_jax.train reads (distributed.* in the config takes precedence). Environment knobs:
#   PORT           coordinator port (default: a free one)
#   PYTHON         interpreter (default: python)
#   MODULE         module to run (default: anllm_jax.train)
#   LOG_DIR        where process i>0 writes process_i.log (default: a temporary folder); process 0 uses stdout
#   XLA_FLAGS      e.g. --xla_force_host_platform_device_count=2 for several CPU devices per process
# If one process fails, the others are stopped; the exit code is the first failure's.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [args for python -m \$MODULE...]" >&2
  exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-python}
MODULE=${MODULE:-anllm_jax.train}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
declare -A index=()  # pid -> process id, for the processes still running
stop_all() { for p in "${!index[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = 0; i < N; i++)); do
  if [[ $i -eq 0 ]]; then
    JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i "$PYTHON" -m "$MODULE" "$@" &
  else
    JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i "$PYTHON" -m "$MODULE" "$@" \
      >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  index[$!]=$i
done
status=0
while ((${#index[@]} > 0)); do
  code=0
  wait -n -p finished "${!index[@]}" || code=$?
  i=${index[$finished]}
  unset "index[$finished]"
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    if [[ $i -eq 0 ]]; then where="its output is above"; else where="its log: $LOG_DIR/process_$i.log"; fi
    echo "local_multiprocess: process $i failed with exit code $code ($where); stopping the others" >&2
    stop_all
  fi
done
exit $status
