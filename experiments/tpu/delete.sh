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

VALUE_FLAGS=("${TARGET_FLAGS[@]}")
SWITCHES=(--yes=YES=1 --async=ASYNC=1)
parse_args "$@"
require_target

args=(delete "$TPU_NAME")
if ((YES)); then args+=(--quiet); fi
if ((ASYNC)); then args+=(--async); fi
tpu_gcloud "${args[@]}"
