#!/usr/bin/env bash
# One machine, several GPUs: one process drives all local GPUs through the mesh. See launch/README.md.
#
#   launch/gpu_single_node.sh [--dry-run] [-- extra protoseg_jax.main flags]
#
# Environment (required: WORKDIR)
#   CONFIG      configs/bcss.py
#   GPUS        all (or a list such as 0,1,2,3 -> CUDA_VISIBLE_DEVICES)
#   MESH_DATA -1  MESH_FSDP 1  MESH_TENSOR 1   (config.mesh; product = number of GPUs)
#   DATA_DIR    (config.data.root; unset = the config's)
#   PYTHON      python3
#   MEM_FRACTION  0.9 (XLA_PYTHON_CLIENT_MEM_FRACTION: share of each GPU that JAX preallocates)
#   MAX_RESUMES   3 (reruns after exit code 75 = preempted by SIGTERM after saving: the run resumes)
#
# --dry-run prints the command (a `+ ...` line, pasteable) without running it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

EXTRA_ARGS=()
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) printf 'gpu_single_node.sh: unknown argument %s (extra flags go after --)\n' "$1" >&2; exit 2 ;;
  esac
  shift
done

require WORKDIR
CONFIG="${CONFIG:-configs/bcss.py}"
GPUS="${GPUS:-all}"
MESH_DATA="${MESH_DATA:--1}"
MESH_FSDP="${MESH_FSDP:-1}"
MESH_TENSOR="${MESH_TENSOR:-1}"
PYTHON="${PYTHON:-python3}"
MEM_FRACTION="${MEM_FRACTION:-0.9}"

ENVIRONMENT=(env XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
if [[ "$GPUS" != all ]]; then
  ENVIRONMENT+=(CUDA_VISIBLE_DEVICES="$GPUS")
fi
DATA_FLAGS=()
if [[ -n "${DATA_DIR:-}" ]]; then
  DATA_FLAGS=(--config.data.root="$DATA_DIR")
fi

cd "$REPO_ROOT"
run_resuming "${ENVIRONMENT[@]}" "$PYTHON" -m protoseg_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  "${DATA_FLAGS[@]}" --config.mesh.data="$MESH_DATA" --config.mesh.fsdp="$MESH_FSDP" \
  --config.mesh.tensor="$MESH_TENSOR" --config.sharding.distributed=off "${EXTRA_ARGS[@]}"
