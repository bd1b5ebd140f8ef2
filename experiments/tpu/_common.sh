# shellcheck shell=bash
# Helpers shared by the experiments/tpu scripts. Sourced, never run on its own.
#
# Written for bash 3.2 as well (the macOS default): no associative arrays, no mapfile, and empty
# arrays are expanded as ${a[@]+"${a[@]}"} so that `set -u` does not trip over them.

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Where things live; every one can be set in the environment or with the script's flags.
TPU_NAME=${TPU_NAME:-taskpgm}
ZONE=${ZONE:-}
PROJECT_ID=${PROJECT_ID:-}
# Paths on the workers. A leading ~/ is expanded on the worker, not here.
REMOTE_DIR=${REMOTE_DIR:-"~/taskpgm"}
VENV_DIR=${VENV_DIR:-"~/taskpgm-venv"}
RUNS_DIR=${RUNS_DIR:-"~/taskpgm-runs"}
DRY_RUN=${DRY_RUN:-0}

die() {
  echo "$PROG: $*" >&2
  exit 1
}

usage_error() {
  echo "$PROG: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# need_value FLAG NEXT_ARG: a flag's value must be present and must not be another flag.
need_value() {
  if [[ $# -lt 2 || -z $2 || $2 == --* ]]; then
    usage_error "$1 needs a value"
  fi
}

# --- The command line ---------------------------------------------------------------------------
# A script lists what it takes, then calls parse_args "$@":
#   VALUE_FLAGS  flags with a value, as --flag=VARIABLE; TARGET_FLAGS are --name, --zone, --project
#   SWITCHES     flags without one, as --flag=VARIABLE=VALUE
#   POSITIONAL   the other arguments: "" none; "config" one CONFIG.yaml; "config overrides" a
#                CONFIG.yaml and then key=value overrides (collected in OVERRIDES)
#   own_flag     a function for the flags that need more than that: it sets TAKEN to the number
#                of arguments it used (it gets them all), or leaves it 0
# Every script takes -h/--help (its usage function) and --dry-run. Arguments are taken in order,
# so the first bad one is the one reported.
# shellcheck disable=SC2034  # for the scripts' VALUE_FLAGS
TARGET_FLAGS=(--name=TPU_NAME --zone=ZONE --project=PROJECT_ID)
VALUE_FLAGS=()
SWITCHES=()
POSITIONAL=
CONFIG=
OVERRIDES=()
TAKEN=0

# own_flag ARGS...: the script's flags that need more (the default: none).
own_flag() {
  :
}

parse_args() {
  while (($#)); do
    take_argument "$@"
    shift "$TAKEN"
  done
}

# take_argument ARGS...: takes the first argument (and a flag's value) and sets TAKEN.
take_argument() {
  local spec rest
  TAKEN=0
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; TAKEN=1; return 0 ;;
  esac
  for spec in ${VALUE_FLAGS[@]+"${VALUE_FLAGS[@]}"}; do
    if [[ $1 == "${spec%%=*}" ]]; then
      need_value "$1" "${2-}"
      printf -v "${spec#*=}" '%s' "$2"
      TAKEN=2
      return 0
    fi
  done
  for spec in ${SWITCHES[@]+"${SWITCHES[@]}"}; do
    if [[ $1 == "${spec%%=*}" ]]; then
      rest=${spec#*=}
      printf -v "${rest%%=*}" '%s' "${rest#*=}"
      TAKEN=1
      return 0
    fi
  done
  own_flag "$@"
  if ((TAKEN == 0)); then take_operand "$1"; fi
}

# take_operand ARG: an argument that is no flag of the script: CONFIG.yaml or an override.
take_operand() {
  [[ -n $POSITIONAL ]] || usage_error "unknown argument '$1'"
  [[ $1 != -* ]] || usage_error "unknown flag '$1'"
  if [[ $POSITIONAL == "config overrides" && $1 == *=* ]]; then
    [[ -n $CONFIG ]] || usage_error "'$1' comes before CONFIG.yaml: give the config file first"
    check_override "$1"
    OVERRIDES+=("$1")
  elif [[ -z $CONFIG ]]; then
    CONFIG=$1
  elif [[ $POSITIONAL == config ]]; then
    usage_error "unexpected argument '$1'"
  else
    usage_error "unexpected argument '$1' (one CONFIG.yaml; overrides are key=value)"
  fi
  TAKEN=1
}

# check_config: CONFIG, when given, must name a .yaml file.
check_config() {
  if [[ -n $CONFIG && ! $CONFIG =~ \.ya?ml$ ]]; then
    usage_error "CONFIG '$CONFIG' is not a .yaml file"
  fi
}

# Checks the TPU name and zone before anything talks to Google Cloud.
require_target() {
  [[ -n $ZONE ]] || usage_error "no zone: pass --zone ZONE or set ZONE (e.g. us-central2-b for v4)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage_error "--zone '$ZONE' does not look like a zone (e.g. us-central2-b)"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "--name '$TPU_NAME': lower-case letters, digits and '-', starting with a letter"
  if [[ -n $PROJECT_ID && ! $PROJECT_ID =~ ^[a-z][-a-z0-9:.]{4,61}[a-z0-9]$ ]]; then
    usage_error "--project '$PROJECT_ID' does not look like a project id"
  fi
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}

# rpath PATH: PATH as shell text for a worker; a leading ~/ becomes "$HOME"/ expanded there.
# shellcheck disable=SC2016,SC2088  # the quoting and the tilde are meant for the worker
rpath() {
  local p=$1
  if [[ $p == "~" ]]; then
    printf '"$HOME"'
  elif [[ $p == "~/"* ]]; then
    printf '"$HOME"/%q' "${p#\~/}"
  else
    printf '%q' "$p"
  fi
}

# quote_override KEY=VALUE: one shell word for a worker; a value starting with ~/ is expanded there.
quote_override() {
  local key=${1%%=*} value=${1#*=}
  printf '%q=%s' "$key" "$(rpath "$value")"
}

# check_override KEY=VALUE: a dotted config key, '=', a value (possibly empty).
check_override() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*= ]] ||
    usage_error "'$1' is not a key=value override (e.g. single_task.steps=200 or mesh.fsdp=16)"
}

# tpu_gcloud SUBCOMMAND ARGS...: `gcloud compute tpus tpu-vm` with the zone and project added.
tpu_gcloud() {
  local cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$ZONE")
  if [[ -n $PROJECT_ID ]]; then cmd+=("--project=$PROJECT_ID"); fi
  if [[ $DRY_RUN == 1 ]]; then
    show_cmd "${cmd[@]}"
    return 0
  fi
  "${cmd[@]}"
}

# show_cmd COMMAND...: the command as a shell line after '+', as a dry run shows it.
show_cmd() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

# The start of every worker script's body: the worker's index, from the metadata server (else its
# hostname), and say MESSAGE, which prefixes it with "[worker N]".
read -r -d '' WORKER_PRELUDE <<'WORKER' || true
worker=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
  hostname)
say() { echo "[worker $worker] $*"; }
WORKER

# worker_script HEADER BODY: the script a worker runs: HEADER (the values), WORKER_PRELUDE, BODY.
worker_script() {
  printf '%s\n%s\n%s' "$1" "$WORKER_PRELUDE" "$2"
}

# tpu_ssh WORKER LABEL SCRIPT: run SCRIPT with bash on WORKER ("all" or an index).
# A dry run prints the script between marker lines instead.
tpu_ssh() {
  local worker=$1 label=$2 script=$3
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ gcloud compute tpus tpu-vm ssh %q --worker=%s --zone=%s%s --command=<%s script>\n' \
      "$TPU_NAME" "$worker" "$ZONE" "${PROJECT_ID:+ --project=$PROJECT_ID}" "$label"
    printf -- '----- %s script -----\n%s\n----- end %s script -----\n' "$label" "$script" "$label"
    return 0
  fi
  tpu_gcloud ssh "$TPU_NAME" "--worker=$worker" "--command=bash -c $(printf '%q' "$script")"
}

# The repository this checkout of the scripts belongs to.
repo_root() {
  git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/../.." && pwd)
}

# run_dir_for CONFIG: the default run directory on the workers, one per config file.
run_dir_for() {
  local stem
  stem=$(basename "$1")
  stem=${stem%.yaml}
  stem=${stem%.yml}
  printf '%s/%s' "${RUNS_DIR%/}" "$stem"
}

# The calling script's header comment (line 2 up to the first line that is not a comment).
header_help() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  echo
}

# check_remote_dir: setup.sh replaces REMOTE_DIR wholesale, so it must be a dedicated directory
# (not ~, /, a top-level directory such as /opt, or a home directory such as /home/me).
check_remote_dir() {
  local d=${REMOTE_DIR%/}
  local rest=${d#\~/}
  if [[ $d == "~" || -z $d || $rest == *..* || $rest == . ||
    $d =~ ^/[^/]*$ || $d =~ ^/home/[^/]+$ || $d =~ ^/(usr|etc|var|bin|lib|boot)(/|$) ]]; then
    usage_error "--remote-dir '$REMOTE_DIR' is replaced on every setup: give a dedicated directory such as ~/taskpgm"
  fi
}

# inside PARENT CHILD: whether CHILD (a path as typed, ~ allowed) lies in or at PARENT.
inside() {
  local parent=${1%/} child=${2%/}
  [[ $child == "$parent" || $child == "$parent"/* ]]
}

# worker_count: how many workers the TPU has (one network endpoint each), asked from gcloud.
worker_count() {
  local endpoints
  endpoints=$(tpu_gcloud describe "$TPU_NAME" '--format=value(networkEndpoints[].ipAddress)') ||
    die "cannot describe TPU '$TPU_NAME' in $ZONE (does it exist? see create.sh)"
  # shellcheck disable=SC2020  # both separators become newlines
  printf '%s\n' "$endpoints" | tr ';,' '\n\n' | grep -c . || true
}
