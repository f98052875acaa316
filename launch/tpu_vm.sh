#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) lifecycle for protoseg_jax. See launch/README.md.
#
#   launch/tpu_vm.sh [--dry-run] COMMAND [-- extra protoseg_jax.main flags]
#
# COMMAND
#   create         gcloud compute tpus tpu-vm create (on-demand, or spot with SPOT=1)
#   queued         gcloud compute tpus queued-resources create, then poll until ACTIVE
#   install        copy this repository (git archive HEAD) to every worker, pip install it with JAX for TPU,
#                  install gcsfuse, copy the data set from DATA_URI to DATA_DIR on every worker
#   run            mount the bucket at /gcs/<bucket> and run `python3 -m protoseg_jax.main` on all workers
#                  (--worker=all; jax.distributed is initialised on each), workdir on the bucket
#   delete         gcloud compute tpus tpu-vm delete
#   delete-queued  gcloud compute tpus queued-resources delete --force (the queued resource and its VM)
#   all            create (queued + delete-queued with QUEUED=1), install, run, delete
#
# Environment (required: TPU_NAME, ZONE, PROJECT; BUCKET for install / run)
#   ACCELERATOR_TYPE  v4-32            RUNTIME_VERSION  tpu-ubuntu2204-base    SPOT  0
#   QUEUED_ID         <TPU_NAME>-qr    QUEUED           0 (1: `all` goes through a queued resource)
#   CONFIG            configs/bcss.py  RUN_NAME         <TPU_NAME>
#   WORKDIR           /gcs/<bucket>/protoseg_runs/<RUN_NAME>   (the bucket mounted with gcsfuse)
#   DATA_URI          gs://<bucket>/BCSS-WSSS
#   DATA_DIR          /tmp/protoseg_data/<basename of DATA_URI>  (local disk of every worker)
#   MESH_DATA -1  MESH_FSDP 1  MESH_TENSOR 1                   (config.mesh; product = number of chips)
#   JAX_PIP_SPEC      jax[tpu]         POLL_SECONDS     60     DRY_RUN  0 (same as --dry-run)
#   DETACH            0 (1: `run` starts the job with nohup and returns; log in ~/protoseg_run.log per worker)
#
# --dry-run prints the gcloud commands (`+ ...` lines, pasteable) without running them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-2}"
}

COMMAND=''
EXTRA_ARGS=()
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    -*) printf 'tpu_vm.sh: unknown option %s\n' "$1" >&2; usage ;;
    *) if [[ -n "$COMMAND" ]]; then printf 'tpu_vm.sh: one command at a time\n' >&2; usage; fi
       COMMAND=$1 ;;
  esac
  shift
done
[[ -n "$COMMAND" ]] || usage

require TPU_NAME ZONE PROJECT
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
QUEUED_ID="${QUEUED_ID:-${TPU_NAME}-qr}"
CONFIG="${CONFIG:-configs/bcss.py}"
RUN_NAME="${RUN_NAME:-$TPU_NAME}"
MESH_DATA="${MESH_DATA:--1}"
MESH_FSDP="${MESH_FSDP:-1}"
MESH_TENSOR="${MESH_TENSOR:-1}"
JAX_PIP_SPEC="${JAX_PIP_SPEC:-jax[tpu]}"
POLL_SECONDS="${POLL_SECONDS:-60}"
DETACH="${DETACH:-0}"
ARCHIVE="${TMPDIR:-/tmp}/protoseg_jax-${TPU_NAME}.tar.gz"

LOCATION=(--project="$PROJECT" --zone="$ZONE")
SPOT_FLAGS=()
if [[ "$SPOT" == 1 ]]; then SPOT_FLAGS=(--spot); fi

# Joins remote shell steps into one line: `a && b && c`.
join_steps() {
  local out='' step
  for step in "$@"; do
    step="${step//$'\n'/ }"
    out+="${out:+ && }$step"
  done
  printf '%s' "$out"
}

bucket_settings() {
  require BUCKET
  BUCKET_NAME="${BUCKET#gs://}"
  BUCKET_NAME="${BUCKET_NAME%/}"
  MOUNT="/gcs/$BUCKET_NAME"
  WORKDIR="${WORKDIR:-$MOUNT/protoseg_runs/$RUN_NAME}"
  DATA_URI="${DATA_URI:-gs://$BUCKET_NAME/BCSS-WSSS}"
  DATA_DIR="${DATA_DIR:-/tmp/protoseg_data/$(basename "$DATA_URI")}"
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

do_create() {
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${SPOT_FLAGS[@]}"
}

do_queued() {
  run gcloud compute tpus queued-resources create "$QUEUED_ID" --node-id="$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${SPOT_FLAGS[@]}"
  local describe=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${LOCATION[@]}"
                  --format='value(state.state)')
  note "poll every ${POLL_SECONDS}s until the state is ACTIVE:"
  show "${describe[@]}"
  [[ "$DRY_RUN" == 1 ]] && return 0
  local state
  while true; do
    state="$("${describe[@]}")"
    case "$state" in
      ACTIVE) note "$QUEUED_ID is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED) printf 'tpu_vm.sh: queued resource %s is %s\n' "$QUEUED_ID" "$state" >&2; exit 1 ;;
      *) note "$QUEUED_ID is ${state:-not visible yet}; waiting ${POLL_SECONDS}s"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

do_install() {
  bucket_settings
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$ARCHIVE" HEAD
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:protoseg_jax.tar.gz" "${LOCATION[@]}" --worker=all
  local keyring=/usr/share/keyrings/cloud.google.asc
  local apt_repo='https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main'
  local apt_line="deb [signed-by=$keyring] $apt_repo"
  local apt_list=/etc/apt/sources.list.d/gcsfuse.list
  local steps=(
    "rm -rf ~/protoseg_jax"
    "mkdir -p ~/protoseg_jax"
    "tar -xzf ~/protoseg_jax.tar.gz -C ~/protoseg_jax"
    "python3 -m pip install -U $(quote "$JAX_PIP_SPEC")"
    "python3 -m pip install -e ~/protoseg_jax"
    "{ command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee $keyring >/dev/null && echo \"$apt_line\" | sudo tee $apt_list >/dev/null \
&& sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; }"
    "mkdir -p $(quote "$(dirname "$DATA_DIR")")"
    "gcloud storage cp -r $(quote "$DATA_URI") $(quote "$(dirname "$DATA_DIR")")/"
  )
  on_all_workers "$(join_steps "${steps[@]}")"
}

do_run() {
  bucket_settings
  local main_args=(python3 -m protoseg_jax.main --config="$CONFIG" --workdir="$WORKDIR"
                   --config.data.root="$DATA_DIR" --config.mesh.data="$MESH_DATA"
                   --config.mesh.fsdp="$MESH_FSDP" --config.mesh.tensor="$MESH_TENSOR"
                   --config.sharding.distributed=on "${EXTRA_ARGS[@]}")
  local mount
  local at
  at="$(quote "$MOUNT")"
  mount="{ mountpoint -q $at || { sudo mkdir -p $at && sudo chown \"\$USER\" $at"
  mount+=" && gcsfuse --implicit-dirs $(quote "$BUCKET_NAME") $at; }; }"
  local script
  # Every worker reruns the same command while it exits 75 (a preemption notice reaches all hosts: each saves
  # its shards of the checkpoint, then exits 75), at most MAX_RESUMES times.
  script="$(join_steps "$mount" "cd ~/protoseg_jax" "$(resuming_loop "$(join_quoted "${main_args[@]}")")")"
  if [[ "$DETACH" == 1 ]]; then
    # Keeps running when the ssh session ends; output in ~/protoseg_run.log on every worker.
    script="nohup bash -c $(quote "$script") > ~/protoseg_run.log 2>&1 &"
  fi
  on_all_workers "$script"
}

do_delete() {
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
}

do_delete_queued() {
  run gcloud compute tpus queued-resources delete "$QUEUED_ID" "${LOCATION[@]}" --force --quiet
}

case "$COMMAND" in
  create) do_create ;;
  queued) do_queued ;;
  install) do_install ;;
  run) do_run ;;
  delete) do_delete ;;
  delete-queued) do_delete_queued ;;
  all)
    if [[ "$QUEUED" == 1 ]]; then do_queued; else do_create; fi
    do_install
    do_run
    if [[ "$QUEUED" == 1 ]]; then do_delete_queued; else do_delete; fi
    ;;
  *) printf 'tpu_vm.sh: unknown command %s\n' "$COMMAND" >&2; usage ;;
esac
