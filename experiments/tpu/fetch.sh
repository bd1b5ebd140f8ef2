#!/usr/bin/env bash
# Copy a run directory (report.md, results.json, figures, logs) back from a TPU worker.
#
# Usage:
#   experiments/tpu/fetch.sh (CONFIG.yaml | --run-dir DIR) --zone ZONE [--name NAME]
#       [--project ID] [--dest LOCAL_DIR] [--worker N] [--all-logs]
#       [--with-checkpoints | --exclude NAME ...] [--dry-run]
#
# Example (after run.sh experiments/configs/llama2_7b_bbh.yaml):
#   experiments/tpu/fetch.sh experiments/configs/llama2_7b_bbh.yaml --zone us-central2-b --name taskpgm-v4
#
# which packs ~/taskpgm-runs/llama2_7b_bbh on worker 0 (without checkpoint directories), then runs
#   gcloud compute tpus tpu-vm scp taskpgm-v4:taskpgm-fetch.tar.gz LOCAL --worker=0 --zone=us-central2-b
# and unpacks it into runs/llama2_7b_bbh. Worker 0 (process 0) writes the report; --all-logs
# also brings every worker's logs/worker-N.log (a per-worker run directory only holds its own).
#
# Environment (flags win): TPU_NAME, ZONE, PROJECT_ID, RUN_DIR, RUNS_DIR (~/taskpgm-runs),
# FETCH_DEST (runs/<run directory name>).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"

RUN_DIR=${RUN_DIR:-}
FETCH_DEST=${FETCH_DEST:-}
WORKER=0
ALL_LOGS=0
EXCLUDES=(ckpt checkpoints checkpoint)

usage() {
  header_help
  cat <<'TXT'
Flags:
  CONFIG.yaml            the config given to run.sh (its name gives the default run directory)
  --run-dir DIR          the run directory on the workers, as given to run.sh
  --name NAME / --zone ZONE / --project ID    the TPU (TPU_NAME, ZONE, PROJECT_ID)
  --dest DIR             local directory to fill (default runs/<run directory name>)
  --worker N             the worker to copy from (default 0)
  --all-logs             also copy logs/ from every worker
  --exclude NAME         leave out files or directories with this name (repeatable; the
                         default leaves out ckpt, checkpoints, checkpoint)
  --with-checkpoints     copy everything, checkpoints included (7B runs: many GB)
  --dry-run              print the commands and the worker script instead of running them
  -h, --help             this text
TXT
}

VALUE_FLAGS=("${TARGET_FLAGS[@]}" --run-dir=RUN_DIR --dest=FETCH_DEST --worker=WORKER)
SWITCHES=(--all-logs=ALL_LOGS=1)
POSITIONAL=config
custom_excludes=0
# The first --exclude replaces the default list.
own_flag() {
  case $1 in
    --exclude)
      need_value "$1" "${2-}"
      if ((custom_excludes == 0)); then EXCLUDES=(); custom_excludes=1; fi
      EXCLUDES+=("$2")
      TAKEN=2
      ;;
    --with-checkpoints) EXCLUDES=(); custom_excludes=1; TAKEN=1 ;;
  esac
}
parse_args "$@"

[[ -n $CONFIG || -n $RUN_DIR ]] || usage_error "give CONFIG.yaml or --run-dir DIR (the run to fetch)"
check_config
[[ $WORKER =~ ^[0-9]+$ ]] || usage_error "--worker '$WORKER' is not a worker index"
if [[ -z $RUN_DIR ]]; then RUN_DIR=$(run_dir_for "$CONFIG"); fi
run_name=$(basename "${RUN_DIR%/}")
FETCH_DEST=${FETCH_DEST:-runs/$run_name}
require_target

excludes=
for name in ${EXCLUDES[@]+"${EXCLUDES[@]}"}; do excludes+=" --exclude=$(printf %q "$name")"; done

# pack WHAT: the worker script that tars RUN_DIR (or only its logs) into ~/taskpgm-fetch.tar.gz.
# shellcheck disable=SC2016  # the $ expressions are for the worker's shell
pack() {
  printf 'set -euo pipefail\nRUN_DIR=%s\n' "$(rpath "$RUN_DIR")"
  printf '[[ -d $RUN_DIR ]] || { echo "no run directory $RUN_DIR on $(hostname)" >&2; exit 2; }\n'
  if [[ $1 == logs ]]; then
    printf 'if [[ -d $RUN_DIR/logs ]]; then tar -C "$RUN_DIR" -czf ~/taskpgm-fetch.tar.gz logs; '
    printf 'else tar -czf ~/taskpgm-fetch.tar.gz -T /dev/null; fi\n'
  else
    printf 'tar -C "$RUN_DIR" -czf ~/taskpgm-fetch.tar.gz%s .\n' "$excludes"
  fi
  printf 'du -h ~/taskpgm-fetch.tar.gz\n'
}

workdir=$(mktemp -d "${TMPDIR:-/tmp}/taskpgm-fetch.XXXXXX")
trap 'rm -rf "$workdir"' EXIT

# fetch_from WORKER WHAT: pack on WORKER, copy here, unpack into FETCH_DEST.
fetch_from() {
  tpu_ssh "$1" "pack-$2" "$(pack "$2")"
  tpu_gcloud scp "$TPU_NAME:taskpgm-fetch.tar.gz" "$workdir/fetch.tar.gz" "--worker=$1"
  if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$FETCH_DEST"
    tar -xzf "$workdir/fetch.tar.gz" -C "$FETCH_DEST"
  fi
}

fetch_from "$WORKER" run
if ((ALL_LOGS)); then
  if [[ $DRY_RUN == 1 ]]; then
    count=1
    tpu_gcloud describe "$TPU_NAME" '--format=value(networkEndpoints[].ipAddress)'
  else
    count=$(worker_count)
  fi
  for ((w = 0; w < count; w++)); do
    if ((w != WORKER)); then fetch_from "$w" logs; fi
  done
fi
if [[ $DRY_RUN != 1 ]]; then
  echo "$PROG: $TPU_NAME:$RUN_DIR -> $FETCH_DEST"
  ls "$FETCH_DEST"
fi
