#!/usr/bin/env bash
# Run the job on every worker of a TPU VM (single- or multi-slice): jax.distributed detects the TPU pod
# environment, so each worker just runs the same command.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config configs/anllm-ac-llama2-7b.yaml load_parameters_path=gs://...
#
# The repository must be at the same path on every worker (REPO_DIR, default: this checkout's absolute path;
# copy it with `gcloud compute tpus tpu-vm scp --recurse --worker=all`), with its .venv (VENV, default
# $REPO_DIR/.venv). For multi-slice jobs set mesh.dcn_data (or dcn_fsdp) to the number of slices.
# output_dir and the data path must be visible to every worker (a GCS bucket mounted with gcsfuse, or NFS).
set -euo pipefail
TPU_NAME=${1:-}; ZONE=${2:-}
if [[ $# -ge 3 && $3 == "--" ]]; then
  PROJECT_ARGS=(); shift 3
elif [[ $# -ge 4 && $4 == "--" ]]; then
  PROJECT_ARGS=(--project "$3"); shift 4
else
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- [train args...]" >&2
  exit 2
fi
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
VENV=${VENV:-$REPO_DIR/.venv}
# Each worker's shell parses --command once more: %q quotes every word so that spaces, quotes and $ arrive as given.
COMMAND="cd $(printf '%q' "$REPO_DIR") &&$(printf ' %q' "$VENV/bin/python" -m anllm_jax.train "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command "$COMMAND"
