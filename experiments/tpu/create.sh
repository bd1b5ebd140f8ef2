#!/usr/bin/env bash
# Create a Cloud TPU VM (one host) or slice (several workers) and wait until it is READY.
#
# Usage:
#   experiments/tpu/create.sh --zone ZONE [--name NAME] [--project ID]
#       [--accelerator-type TYPE] [--version RUNTIME] [--spot | --preemptible]
#       [--timeout SECONDS] [--dry-run]
#
# Example (a v4-32 slice: 16 chips on 4 workers, as spot capacity):
#   experiments/tpu/create.sh --zone us-central2-b --name taskpgm-v4 --accelerator-type v4-32 --spot
#
# which runs:
#   gcloud compute tpus tpu-vm create taskpgm-v4 --zone=us-central2-b \
#       --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot
#
# Environment (flags win): TPU_NAME (default taskpgm), ZONE, PROJECT_ID (default: gcloud's
# configured project), ACCELERATOR_TYPE (default v4-8), RUNTIME_VERSION (default: by TPU
# generation, see below), TPU_CAPACITY ("spot", "preemptible" or empty), CREATE_TIMEOUT (1800).
# An existing TPU of that name is not created again; the script only waits for it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
TPU_CAPACITY=${TPU_CAPACITY:-}
CREATE_TIMEOUT=${CREATE_TIMEOUT:-1800}

usage() {
  header_help
  cat <<'TXT'
Flags:
  --name NAME               TPU name (TPU_NAME)
  --zone ZONE               zone with quota for the accelerator (ZONE)
  --project ID              Google Cloud project (PROJECT_ID)
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-32, v6e-16 (ACCELERATOR_TYPE)
  --version RUNTIME         TPU software version; default v4 and older: tpu-ubuntu2204-base,
                            v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
  --spot                    spot capacity (cheaper; can be preempted at any time)
  --preemptible             legacy preemptible capacity
  --timeout SECONDS         how long to wait for READY (CREATE_TIMEOUT, default 1800)
  --dry-run                 print the gcloud commands instead of running them
  -h, --help                this text
TXT
}

VALUE_FLAGS=("${TARGET_FLAGS[@]}" --accelerator-type=ACCELERATOR_TYPE --version=RUNTIME_VERSION
  --timeout=CREATE_TIMEOUT)
SWITCHES=(--spot=TPU_CAPACITY=spot --preemptible=TPU_CAPACITY=preemptible)
parse_args "$@"

[[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  usage_error "--accelerator-type '$ACCELERATOR_TYPE' is not like v4-32 or v5litepod-16"
[[ $CREATE_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "--timeout '$CREATE_TIMEOUT' is not a number of seconds"
case $TPU_CAPACITY in
  "" | spot | preemptible) ;;
  *) usage_error "TPU_CAPACITY='$TPU_CAPACITY': expected spot, preemptible or empty" ;;
esac
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime for '$ACCELERATOR_TYPE': pass --version (see 'gcloud compute tpus tpu-vm versions list')" ;;
  esac
fi
require_target

state() {
  tpu_gcloud describe "$TPU_NAME" --format='value(state)' 2>/dev/null
}

if [[ $DRY_RUN != 1 ]] && existing=$(state) && [[ -n $existing ]]; then
  echo "$PROG: TPU '$TPU_NAME' already exists in $ZONE (state $existing); not creating it again"
else
  args=(create "$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  if [[ -n $TPU_CAPACITY ]]; then args+=("--$TPU_CAPACITY"); fi
  echo "$PROG: creating $ACCELERATOR_TYPE '$TPU_NAME' in $ZONE (runtime $RUNTIME_VERSION${TPU_CAPACITY:+, $TPU_CAPACITY})"
  tpu_gcloud "${args[@]}"
fi
if [[ $DRY_RUN == 1 ]]; then
  tpu_gcloud describe "$TPU_NAME" --format='value(state)'
  exit 0
fi

deadline=$((SECONDS + CREATE_TIMEOUT))
while :; do
  current=$(state || true)
  case $current in
    READY)
      echo "$PROG: '$TPU_NAME' is READY"
      tpu_gcloud describe "$TPU_NAME" --format='value(acceleratorType,networkEndpoints[].ipAddress)'
      exit 0
      ;;
    PREEMPTED | TERMINATED | FAILED)
      die "'$TPU_NAME' is $current: delete it (experiments/tpu/delete.sh) and create it again"
      ;;
  esac
  if ((SECONDS >= deadline)); then
    die "'$TPU_NAME' not READY after ${CREATE_TIMEOUT}s (state '${current:-unknown}'); check quota and 'gcloud compute tpus tpu-vm describe $TPU_NAME --zone=$ZONE'"
  fi
  echo "$PROG: '$TPU_NAME' is ${current:-not visible yet}; waiting"
  sleep 15
done
