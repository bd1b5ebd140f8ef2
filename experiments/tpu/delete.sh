#!/usr/bin/env bash
# Delete a TPU VM or slice (billing stops; its disks, and any per-worker run directories, go too).
#
# Usage:
#   experiments/tpu/delete.sh --zone ZONE [--name NAME] [--project ID] [--yes] [--async] [--dry-run]
#
# Example:
#   experiments/tpu/delete.sh --zone us-central2-b --name taskpgm-v4
#
# which runs:
#   gcloud compute tpus tpu-vm delete taskpgm-v4 --zone=us-central2-b
# gcloud asks for confirmation unless --yes is given. Fetch results first (fetch.sh).
#
# Environment (flags win): TPU_NAME, ZONE, PROJECT_ID.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"

YES=0
ASYNC=0

usage() {
  header_help
  cat <<'TXT'
Flags:
  --name NAME / --zone ZONE / --project ID    the TPU (TPU_NAME, ZONE, PROJECT_ID)
  --yes                  do not ask for confirmation
  --async                return without waiting for the deletion to finish
  --dry-run              print the gcloud command instead of running it
  -h, --help             this text
TXT
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$1" "${2-}"; TPU_NAME=$2; shift 2 ;;
    --zone) need_value "$1" "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" "${2-}"; PROJECT_ID=$2; shift 2 ;;
    --yes) YES=1; shift ;;
    --async) ASYNC=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
require_target

args=(delete "$TPU_NAME")
if ((YES)); then args+=(--quiet); fi
if ((ASYNC)); then args+=(--async); fi
tpu_gcloud "${args[@]}"
