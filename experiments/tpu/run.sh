#!/usr/bin/env bash
# Run `taskpgm run CONFIG.yaml` on every worker of a TPU VM or slice at once.
#
# Usage:
#   experiments/tpu/run.sh CONFIG.yaml [key=value ...] --zone ZONE [--name NAME] [--project ID]
#       [--run-dir DIR] [--remote-dir DIR] [--venv DIR] [--env KEY=VALUE ...]
#       [--log-dir LOCAL_DIR] [--workers N] [--shared-wait SECONDS]
#       [--detach | --status | --stop] [--dry-run]
#
# Example (the Llama-2-7B BBH experiment on a v4-32 slice, 16 devices all on the fsdp axis):
#   experiments/tpu/run.sh experiments/configs/llama2_7b_bbh.yaml --zone us-central2-b \
#       --name taskpgm-v4 model.checkpoint=~/models/Llama-2-7b-hf mesh.fsdp=16
#
# which runs, on every worker (gcloud compute tpus tpu-vm ssh taskpgm-v4 --worker=all ...):
#   taskpgm run experiments/configs/llama2_7b_bbh.yaml --run-dir ~/taskpgm-runs/llama2_7b_bbh \
#       model.checkpoint=~/models/Llama-2-7b-hf mesh.fsdp=16
# with TASKPGM_DISTRIBUTED=auto, so that taskpgm_jax.distributed.maybe_initialize() starts
# jax.distributed on the slice. CONFIG is a path in the project; when it exists here it is copied
# to the workers first (local edits need no new setup.sh). A value starting with ~/ is expanded
# on the workers.
#
# Logs: each worker appends to RUN_DIR/logs/worker-N.log; the streamed output of all workers
# (lines prefixed "[worker N]") is also saved here in LOG_DIR (default tpu-logs/NAME).
# Resuming: run the same command again. Finished pipeline stages are skipped and fine-tunes
# resume from their last checkpoint. Ctrl-C stops the streaming, not the run: see --status and
# --stop. The run directory (default ~/taskpgm-runs/<config name>) is per worker unless you give
# a shared one (e.g. --run-dir /mnt/shared/runs/bbh after setup.sh --nfs). A slice with several
# workers needs the shared one (process 0 writes the stage outputs, every process writes its part
# of each checkpoint): before starting, the workers check that they all see the run directory.
#
# Environment (flags win): TPU_NAME, ZONE, PROJECT_ID, RUN_DIR, REMOTE_DIR (~/taskpgm),
# VENV_DIR (~/taskpgm-venv), RUNS_DIR (~/taskpgm-runs), LOG_DIR (tpu-logs/NAME), WORKERS,
# SHARED_WAIT (120).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"

RUN_DIR=${RUN_DIR:-}
LOG_DIR=${LOG_DIR:-}
WORKERS=${WORKERS:-}
SHARED_WAIT=${SHARED_WAIT:-120}
ACTION=run
ENVS=()

usage() {
  header_help
  cat <<'TXT'
Flags:
  CONFIG.yaml            the experiment, e.g. experiments/configs/llama2_7b_bbh.yaml
  key=value              dotted config overrides, passed on to taskpgm run
  --name NAME / --zone ZONE / --project ID    the TPU (TPU_NAME, ZONE, PROJECT_ID)
  --run-dir DIR          run directory on the workers (default ~/taskpgm-runs/<config name>)
  --remote-dir DIR       project directory on the workers, as given to setup.sh (~/taskpgm)
  --venv DIR             virtual environment on the workers, as given to setup.sh (~/taskpgm-venv)
  --env KEY=VALUE        export this variable for the run on every worker (repeatable)
  --log-dir DIR          local directory for the streamed logs (default tpu-logs/NAME)
  --workers N            the TPU's worker count (default: asked from gcloud describe)
  --shared-wait SECONDS  how long the workers wait to see each other in the run directory
                         (default 120; 0 skips the check)
  --detach               start the run in the background and return (see --status, --stop)
  --status               say whether the run is alive on each worker, with its last log lines
  --stop                 stop the run on every worker (SIGTERM to its process group)
  --dry-run              print the commands and the worker script instead of running them
  -h, --help             this text
TXT
}

VALUE_FLAGS=("${TARGET_FLAGS[@]}" --run-dir=RUN_DIR --remote-dir=REMOTE_DIR --venv=VENV_DIR
  --log-dir=LOG_DIR --workers=WORKERS --shared-wait=SHARED_WAIT)
SWITCHES=(--detach=ACTION=detach --status=ACTION=status --stop=ACTION=stop)
POSITIONAL="config overrides"
own_flag() {
  if [[ $1 == --env ]]; then
    need_value "$1" "${2-}"
    [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env '$2' is not KEY=VALUE"
    ENVS+=("$2")
    TAKEN=2
  fi
}
parse_args "$@"

if [[ -z $CONFIG && ( $ACTION == run || $ACTION == detach || -z $RUN_DIR ) ]]; then
  usage_error "missing CONFIG.yaml (e.g. experiments/configs/llama2_7b_bbh.yaml)"
fi
check_config
if [[ -z $RUN_DIR ]]; then RUN_DIR=$(run_dir_for "$CONFIG"); fi
if inside "$REMOTE_DIR" "$RUN_DIR"; then
  usage_error "--run-dir '$RUN_DIR' lies inside --remote-dir '$REMOTE_DIR', which setup.sh replaces"
fi
LOG_DIR=${LOG_DIR:-tpu-logs/$TPU_NAME}
if [[ -n $WORKERS && ! $WORKERS =~ ^[1-9][0-9]*$ ]]; then usage_error "--workers '$WORKERS' is not a positive number"; fi
[[ $SHARED_WAIT =~ ^[0-9]+$ ]] || usage_error "--shared-wait '$SHARED_WAIT' is not a number of seconds"
require_target
if [[ -z $WORKERS && ($ACTION == run || $ACTION == detach) ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    tpu_gcloud describe "$TPU_NAME" '--format=value(networkEndpoints[].ipAddress)'
    WORKERS=1
  else
    WORKERS=$(worker_count)
  fi
fi

# A config that exists here is copied to the workers: to its place in the project when it lies
# inside this checkout, else under uploaded-configs/.
upload=
remote_config=$CONFIG
if [[ ($ACTION == run || $ACTION == detach) && -f $CONFIG ]]; then
  root=$(repo_root)
  abs="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
  if [[ $abs == "$root"/* ]]; then
    remote_config=${abs#"$root"/}
  else
    remote_config=uploaded-configs/$(basename "$CONFIG")
  fi
  upload=.taskpgm-upload-$(basename "$CONFIG")
fi

header="set -euo pipefail
ACTION=$ACTION
REMOTE_DIR=$(rpath "$REMOTE_DIR")
VENV=$(rpath "$VENV_DIR")
RUN_DIR=$(rpath "$RUN_DIR")
CONFIG=$(rpath "$remote_config")
UPLOAD=$(printf %q "$upload")
WORKERS=${WORKERS:-1}
SHARED_WAIT=$SHARED_WAIT
TOKEN=$(date -u +%Y%m%dT%H%M%SZ)-$$-$RANDOM
CMD=(taskpgm run \"\$CONFIG\" --run-dir \"\$RUN_DIR\""
for kv in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do header+=" $(quote_override "$kv")"; done
header+=")"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do header+=$'\n'"export ${kv%%=*}=$(printf %q "${kv#*=}")"; done

# The body uses $worker and say from WORKER_PRELUDE, which worker_script puts before it.
read -r -d '' body <<'WORKER' || true
logs=$RUN_DIR/logs
log=$logs/worker-$worker.log
pidfile=$logs/worker-$worker.pid
pid=
alive() {
  [[ -f $pidfile ]] && pid=$(cat "$pidfile") && [[ $pid =~ ^[0-9]+$ ]] &&
    kill -0 "$pid" 2>/dev/null && grep -q taskpgm "/proc/$pid/cmdline" 2>/dev/null
}

case $ACTION in
  status)
    if alive; then say "running (pid $pid) in $RUN_DIR"; else say "not running ($RUN_DIR)"; fi
    if [[ -f $log ]]; then tail -n 5 "$log" | sed "s/^/[worker $worker]   /"; fi
    exit 0
    ;;
  stop)
    if alive; then
      kill -TERM -- "-$pid"
      say "sent SIGTERM to the run (process group $pid)"
    else
      say "no run alive in $RUN_DIR"
    fi
    exit 0
    ;;
esac

if alive; then
  say "a run is still alive in $RUN_DIR (pid $pid): wait for it, or stop it with run.sh --stop" >&2
  exit 3
fi
cd "$REMOTE_DIR"
# (A home directory shared by the workers holds one upload: the first worker moves it.)
if [[ -n $UPLOAD && -f ~/$UPLOAD ]]; then
  mkdir -p "$(dirname "$CONFIG")"
  mv -f ~/"$UPLOAD" "$CONFIG" 2>/dev/null || true
fi
if [[ ! -f $CONFIG ]]; then
  say "no config file $CONFIG (relative to $REMOTE_DIR)" >&2
  exit 2
fi
export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
if ! command -v taskpgm >/dev/null; then
  say "taskpgm is not installed in $VENV: run experiments/tpu/setup.sh first" >&2
  exit 2
fi
# maybe_initialize() lets JAX find the slice's workers (they are listed in the metadata server).
export TASKPGM_DISTRIBUTED=${TASKPGM_DISTRIBUTED:-auto}
mkdir -p "$logs"
# Several workers must share the run directory: each leaves a mark in it for this launch and
# waits until it sees all the others' marks.
if ((WORKERS > 1 && SHARED_WAIT > 0)); then
  seen=$RUN_DIR/.workers
  mkdir -p "$seen"
  find "$seen" -type f ! -name "$TOKEN-*" -delete 2>/dev/null || true
  : >"$seen/$TOKEN-$worker-$(hostname)"
  n=0
  for ((i = 0; i <= SHARED_WAIT; i++)); do
    n=$(find "$seen" -type f -name "$TOKEN-*" | wc -l)
    if ((n >= WORKERS)); then break; fi
    sleep 1
  done
  if ((n < WORKERS)); then
    say "$RUN_DIR is not shared: after ${SHARED_WAIT}s this worker sees $n of $WORKERS workers in it." \
      "Every worker must see the same run directory: pass --run-dir on a shared mount" \
      "(setup.sh --nfs), or run on a single-worker TPU" >&2
    exit 2
  fi
fi
echo "===== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $worker: ${CMD[*]}" >>"$log"
offset=$(wc -c <"$log")
# Its own session: an ssh disconnect leaves the run going, and --stop ends the whole group.
# shellcheck disable=SC2016  # "$@" and $rc belong to the inner bash
setsid nohup bash -c '"$@"; rc=$?; echo "===== exit status $rc"; exit $rc' taskpgm-run \
  "${CMD[@]}" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
if [[ $ACTION == detach ]]; then
  say "started (pid $pid); log $log"
  exit 0
fi
tail -c +$((offset + 1)) -f --pid="$pid" "$log" | sed -u "s/^/[worker $worker] /" &
rc=0
wait "$pid" || rc=$?
wait || true
rm -f "$pidfile"
say "taskpgm run exited with status $rc"
exit "$rc"
WORKER

if [[ -n $upload ]]; then
  tpu_gcloud scp "$CONFIG" "$TPU_NAME:$upload" --worker=all
fi
script=$(worker_script "$header" "$body")
if [[ $DRY_RUN == 1 || $ACTION != run ]]; then
  tpu_ssh all "$ACTION" "$script"
  exit 0
fi
mkdir -p "$LOG_DIR"
stem=$(basename "$CONFIG")
local_log=$LOG_DIR/${stem%.*}-$(date -u +%Y%m%dT%H%M%SZ).log
echo "$PROG: $TPU_NAME: taskpgm run $remote_config (run dir $RUN_DIR); log $local_log"
tpu_ssh all "$ACTION" "$script" 2>&1 | tee -a "$local_log"
