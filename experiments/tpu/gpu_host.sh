#!/usr/bin/env bash
# Run the same experiment on one GPU host (e.g. 8 x A100/H100), from a checkout on that host.
#
# Usage:
#   experiments/tpu/gpu_host.sh CONFIG.yaml [key=value ...] [--setup] [--run-dir DIR]
#       [--venv DIR] [--python PYTHON] [--jax-spec SPEC] [--gpus N] [--dry-run]
#   experiments/tpu/gpu_host.sh CONFIG.yaml [key=value ...] --print-sbatch NODES [--run-dir DIR]
#
# Example (install once, then run with all 8 GPUs on the fsdp axis):
#   experiments/tpu/gpu_host.sh experiments/configs/llama2_7b_bbh.yaml --setup \
#       model.checkpoint=/data/models/Llama-2-7b-hf mesh.fsdp=8
#
# which runs (after --setup: venv, pip install "jax[cuda12]", pip install -e .):
#   .venv/bin/taskpgm run experiments/configs/llama2_7b_bbh.yaml --run-dir runs/llama2_7b_bbh \
#       model.checkpoint=/data/models/Llama-2-7b-hf mesh.fsdp=8
# in the foreground, output also appended to RUN_DIR/logs/host.log. One process drives all the
# host's GPUs; the mesh product (data * fsdp * tensor) must equal the GPU count. Re-running the
# same command resumes: finished stages are skipped, fine-tunes restart from their checkpoint.
#
# Several GPU nodes with SLURM: one process per node, started by srun; maybe_initialize() sees
# SLURM_NTASKS > 1 and JAX detects the rest. --print-sbatch NODES prints a batch script for that
# (submit it with sbatch); it sets JAX_LOCAL_DEVICE_IDS so each process uses all its node's GPUs,
# and the run directory must be on a filesystem every node sees. The mesh product is then
# NODES * GPUs, e.g. mesh.data=2 mesh.fsdp=8 on two nodes.
#
# Environment (flags win): RUN_DIR (runs/<config name>), GPU_VENV (<repo>/.venv),
# PYTHON (python3.11), JAX_SPEC ("jax[cuda12]>=0.10"), GPUS (8).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"

ROOT=$(repo_root)
RUN_DIR=${RUN_DIR:-}
VENV_DIR=${GPU_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
JAX_SPEC=${JAX_SPEC:-"jax[cuda12]>=0.10"}
GPUS=${GPUS:-8}
SETUP=0
SBATCH_NODES=

usage() {
  header_help
  cat <<'TXT'
Flags:
  CONFIG.yaml            the experiment, e.g. experiments/configs/llama2_7b_bbh.yaml
  key=value              dotted config overrides, passed on to taskpgm run
  --setup                make the venv if missing and install jax[cuda12] and the project first
  --run-dir DIR          run directory (default runs/<config name>)
  --venv DIR             virtual environment (default <repo>/.venv)
  --python PYTHON        interpreter for a new venv (default python3.11; the project needs >= 3.11)
  --jax-spec SPEC        pip requirement for JAX (default "jax[cuda12]>=0.10")
  --gpus N               GPUs per host (default 8; checked against nvidia-smi when present)
  --print-sbatch NODES   print a SLURM batch script for NODES hosts and exit
  --dry-run              print the commands instead of running them
  -h, --help             this text
TXT
}

VALUE_FLAGS=(--run-dir=RUN_DIR --venv=VENV_DIR --python=PYTHON --jax-spec=JAX_SPEC --gpus=GPUS
  --print-sbatch=SBATCH_NODES)
SWITCHES=(--setup=SETUP=1)
POSITIONAL="config overrides"
parse_args "$@"

[[ -n $CONFIG ]] || usage_error "missing CONFIG.yaml (e.g. experiments/configs/llama2_7b_bbh.yaml)"
check_config
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus '$GPUS' is not a positive number"
if [[ -n $SBATCH_NODES && ! $SBATCH_NODES =~ ^[1-9][0-9]*$ ]]; then
  usage_error "--print-sbatch '$SBATCH_NODES' is not a positive number of nodes"
fi
stem=$(basename "$CONFIG")
stem=${stem%.*}
RUN_DIR=${RUN_DIR:-runs/$stem}
device_ids=0
for ((i = 1; i < GPUS; i++)); do device_ids+=",$i"; done
cmd=("$VENV_DIR/bin/taskpgm" run "$CONFIG" --run-dir "$RUN_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})

if [[ -n $SBATCH_NODES ]]; then
  cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=taskpgm-$stem
#SBATCH --nodes=$SBATCH_NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --output=taskpgm-$stem-%j.out
# Submit from the repository root: sbatch THIS_FILE. Re-submit to resume.
set -euo pipefail
# One process per node: let it use all $GPUS GPUs (JAX's SLURM default is one GPU per process).
export JAX_LOCAL_DEVICE_IDS=$device_ids
srun --kill-on-bad-exit=1$(printf ' %q' "${cmd[@]}")
SBATCH
  exit 0
fi

[[ -f $CONFIG ]] || usage_error "no config file '$CONFIG'"

act() {
  show_cmd "$@"
  if [[ $DRY_RUN != 1 ]]; then "$@"; fi
}

if ((SETUP)); then
  if [[ ! -x $VENV_DIR/bin/python ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || [[ $DRY_RUN == 1 ]] ||
      die "$PYTHON not found: install Python >= 3.11 or pass --python"
    act "$PYTHON" -m venv "$VENV_DIR"
  fi
  act "$VENV_DIR/bin/python" -m pip install -q --upgrade pip
  act "$VENV_DIR/bin/python" -m pip install -q "$JAX_SPEC"
  act "$VENV_DIR/bin/python" -m pip install -q -e "$ROOT"
fi
if [[ $DRY_RUN != 1 ]]; then
  [[ -x ${cmd[0]} ]] || die "${cmd[0]} not found: run with --setup first (or pass --venv)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    found=$(nvidia-smi -L | grep -c '^GPU' || true)
    if [[ $found != "$GPUS" ]]; then
      echo "$PROG: note: nvidia-smi lists $found GPUs, --gpus says $GPUS; the config's mesh must match what JAX sees" >&2
    fi
  fi
  mkdir -p "$RUN_DIR/logs"
fi
show_cmd "${cmd[@]}"
if [[ $DRY_RUN == 1 ]]; then exit 0; fi
echo "===== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): ${cmd[*]}" >>"$RUN_DIR/logs/host.log"
"${cmd[@]}" 2>&1 | tee -a "$RUN_DIR/logs/host.log"
