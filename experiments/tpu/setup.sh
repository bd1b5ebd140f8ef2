#!/usr/bin/env bash
# Copy the project to every worker of a TPU VM or slice and install it there, in a venv.
#
# Usage:
#   experiments/tpu/setup.sh --zone ZONE [--name NAME] [--project ID]
#       [--ref GIT_REF | --tarball FILE.tar.gz | --git-url URL [--ref GIT_REF]]
#       [--remote-dir DIR] [--venv DIR] [--python PYTHON] [--jax-spec SPEC]
#       [--model HF_REPO_ID [--model-dir DIR] [--hf-token-file FILE]]
#       [--nfs SERVER:/EXPORT [--mount DIR]] [--dry-run]
#
# Example (ship the committed HEAD, install, and fetch the base model on every worker):
#   experiments/tpu/setup.sh --zone us-central2-b --name taskpgm-v4 \
#       --model meta-llama/Llama-2-7b-hf --hf-token-file ~/.cache/huggingface/token
#
# which runs, from this checkout:
#   git archive --format=tar.gz -o SRC.tar.gz HEAD
#   gcloud compute tpus tpu-vm scp SRC.tar.gz taskpgm-v4:taskpgm-src.tar.gz --worker=all --zone=us-central2-b
#   gcloud compute tpus tpu-vm ssh taskpgm-v4 --worker=all --zone=us-central2-b --command='...'
# and on each worker: make the venv if missing, unpack the source into REMOTE_DIR (replacing
# the previous copy), pip install "jax[tpu]", then pip install -e REMOTE_DIR.
#
# Idempotent: run it again after new commits (only the source is replaced; the venv, run
# directories and downloaded models stay). `git archive` ships committed files only.
#
# Environment (flags win): TPU_NAME, ZONE, PROJECT_ID, GIT_REF (HEAD), SRC_TARBALL, GIT_URL,
# REMOTE_DIR (~/taskpgm), VENV_DIR (~/taskpgm-venv), PYTHON (python3.11; the project needs
# Python >= 3.11 and the TPU images ship 3.10, so it is apt-installed when missing),
# JAX_SPEC ("jax[tpu]>=0.10"), HF_MODEL, MODEL_DIR (~/models/<repo name>), HF_TOKEN_FILE,
# NFS_SHARE, NFS_MOUNT (/mnt/shared).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"

GIT_REF=${GIT_REF:-}
SRC_TARBALL=${SRC_TARBALL:-}
GIT_URL=${GIT_URL:-}
PYTHON=${PYTHON:-python3.11}
JAX_SPEC=${JAX_SPEC:-"jax[tpu]>=0.10"}
HF_MODEL=${HF_MODEL:-}
MODEL_DIR=${MODEL_DIR:-}
HF_TOKEN_FILE=${HF_TOKEN_FILE:-}
NFS_SHARE=${NFS_SHARE:-}
NFS_MOUNT=${NFS_MOUNT:-/mnt/shared}

usage() {
  header_help
  cat <<'TXT'
Flags:
  --name NAME / --zone ZONE / --project ID    the TPU (TPU_NAME, ZONE, PROJECT_ID)
  --ref GIT_REF          commit, branch or tag to ship with git archive (default HEAD)
  --tarball FILE         ship this .tar.gz of the project instead (its top level holds pyproject.toml)
  --git-url URL          clone URL on each worker instead of copying (checks out --ref if given)
  --remote-dir DIR       project directory on the workers (default ~/taskpgm)
  --venv DIR             virtual environment on the workers (default ~/taskpgm-venv)
  --python PYTHON        interpreter for the venv (default python3.11)
  --jax-spec SPEC        pip requirement for JAX (default "jax[tpu]>=0.10")
  --model REPO_ID        download this Hugging Face checkpoint (config.json, *.safetensors,
                         tokenizer files) to --model-dir on every worker
  --model-dir DIR        where the checkpoint goes (default ~/models/<repo name>); give it as
                         model.checkpoint=DIR to run.sh
  --hf-token-file FILE   copy this Hugging Face token to ~/.cache/huggingface/token on every
                         worker (needed for gated models such as Llama 2)
  --nfs SERVER:/EXPORT   mount this NFS share (e.g. a Filestore instance) on every worker, for a
                         run directory that all workers share
  --mount DIR            mount point for --nfs (default /mnt/shared)
  --dry-run              print the commands and the worker script instead of running them
  -h, --help             this text
TXT
}

VALUE_FLAGS=("${TARGET_FLAGS[@]}" --ref=GIT_REF --tarball=SRC_TARBALL --git-url=GIT_URL
  --remote-dir=REMOTE_DIR --venv=VENV_DIR --python=PYTHON --jax-spec=JAX_SPEC --model=HF_MODEL
  --model-dir=MODEL_DIR --hf-token-file=HF_TOKEN_FILE --nfs=NFS_SHARE --mount=NFS_MOUNT)
parse_args "$@"

if [[ -n $SRC_TARBALL && -n $GIT_URL ]]; then usage_error "give --tarball or --git-url, not both"; fi
if [[ -n $SRC_TARBALL && -n $GIT_REF ]]; then usage_error "--ref does not apply to --tarball"; fi
if [[ -n $SRC_TARBALL && ! -f $SRC_TARBALL ]]; then usage_error "--tarball '$SRC_TARBALL' is not a file"; fi
if [[ -n $HF_TOKEN_FILE && ! -f $HF_TOKEN_FILE ]]; then usage_error "--hf-token-file '$HF_TOKEN_FILE' is not a file"; fi
if [[ -n $MODEL_DIR && -z $HF_MODEL ]]; then usage_error "--model-dir needs --model"; fi
if [[ -n $HF_MODEL && ! $HF_MODEL =~ ^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$ ]]; then
  usage_error "--model '$HF_MODEL' is not a Hugging Face repo id like meta-llama/Llama-2-7b-hf"
fi
if [[ -n $NFS_SHARE && ! $NFS_SHARE =~ ^[^:/]+:/ ]]; then usage_error "--nfs '$NFS_SHARE' is not SERVER:/EXPORT"; fi
[[ $PYTHON =~ ^python3\.[0-9]+$ ]] || usage_error "--python '$PYTHON': give e.g. python3.11 (the name apt installs)"
# shellcheck disable=SC2088  # expanded on the worker
if [[ -n $HF_MODEL && -z $MODEL_DIR ]]; then MODEL_DIR="~/models/${HF_MODEL##*/}"; fi
check_remote_dir
require_target

# --- the source: a tarball made here, a given tarball, or a clone on the workers ---------------
workdir=$(mktemp -d "${TMPDIR:-/tmp}/taskpgm-setup.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
if [[ -z $GIT_URL ]]; then
  if [[ -z $SRC_TARBALL ]]; then
    root=$(repo_root)
    ref=${GIT_REF:-HEAD}
    git -C "$root" rev-parse --verify --quiet "$ref^{commit}" >/dev/null ||
      usage_error "--ref '$ref' is not a commit in $root"
    if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
      echo "$PROG: note: uncommitted changes in $root are not shipped (git archive $ref)" >&2
    fi
    SRC_TARBALL=$workdir/taskpgm-src.tar.gz
    git -C "$root" archive --format=tar.gz -o "$SRC_TARBALL" "$ref"
    echo "$PROG: shipping $ref ($(git -C "$root" rev-parse --short "$ref^{commit}")) from $root"
  fi
  tpu_gcloud scp "$SRC_TARBALL" "$TPU_NAME:taskpgm-src.tar.gz" --worker=all
fi
if [[ -n $HF_TOKEN_FILE ]]; then
  tpu_gcloud scp "$HF_TOKEN_FILE" "$TPU_NAME:.taskpgm-hf-token" --worker=all
fi

# --- the worker script: values first (quoted here), then a fixed body -------------------------
header="set -euo pipefail
REMOTE_DIR=$(rpath "$REMOTE_DIR")
VENV=$(rpath "$VENV_DIR")
PYTHON=$(printf %q "$PYTHON")
JAX_SPEC=$(printf %q "$JAX_SPEC")
GIT_URL=$(printf %q "$GIT_URL")
GIT_REF=$(printf %q "$GIT_REF")
HF_MODEL=$(printf %q "$HF_MODEL")
MODEL_DIR=$(rpath "${MODEL_DIR:-}")
HF_TOKEN=$([[ -n $HF_TOKEN_FILE ]] && echo 1 || echo 0)
NFS_SHARE=$(printf %q "$NFS_SHARE")
NFS_MOUNT=$(rpath "$NFS_MOUNT")"

# The body uses $worker and say from WORKER_PRELUDE, which worker_script puts before it.
read -r -d '' body <<'WORKER' || true
apt_install() {
  sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [[ -n $NFS_SHARE ]]; then
  if ! mountpoint -q "$NFS_MOUNT"; then
    command -v mount.nfs >/dev/null || apt_install nfs-common
    sudo mkdir -p "$NFS_MOUNT"
    sudo mount -t nfs -o rw,hard,timeo=600 "$NFS_SHARE" "$NFS_MOUNT"
  fi
  say "NFS $NFS_SHARE on $NFS_MOUNT"
fi

if ! command -v "$PYTHON" >/dev/null; then
  say "installing $PYTHON with apt"
  apt_install "$PYTHON" "$PYTHON-venv"
fi
if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

# Replace the source tree as a whole (never half-old, half-new), keeping anything outside it.
new="$REMOTE_DIR.new"
rm -rf "$new"
if [[ -n $GIT_URL ]]; then
  git clone -q "$GIT_URL" "$new"
  if [[ -n $GIT_REF ]]; then git -C "$new" checkout -q "$GIT_REF"; fi
else
  mkdir -p "$new"
  tar -xzf ~/taskpgm-src.tar.gz -C "$new"
  # A tarball with one top-level directory (e.g. from GitHub) is unwrapped.
  if [[ ! -f $new/pyproject.toml ]] && (($(find "$new" -mindepth 1 -maxdepth 1 | wc -l) == 1)); then
    inner=$(basename "$(find "$new" -mindepth 1 -maxdepth 1)")
    mv "$new" "$new.wrap" && mv "$new.wrap/$inner" "$new" && rmdir "$new.wrap"
  fi
fi
[[ -f $new/pyproject.toml ]] || { say "no pyproject.toml in the shipped source"; exit 1; }
rm -rf "$REMOTE_DIR"
mv "$new" "$REMOTE_DIR"

"$VENV/bin/pip" install -q "$JAX_SPEC"
"$VENV/bin/pip" install -q -e "$REMOTE_DIR"
# Imports only: touching the TPU here would start the runtime on one worker alone.
"$VENV/bin/python" -c 'import jax, taskpgm_jax.distributed; print("jax", jax.__version__)'
say "installed $REMOTE_DIR into $VENV"

if [[ $HF_TOKEN == 1 ]]; then
  mkdir -p ~/.cache/huggingface
  chmod 600 ~/.taskpgm-hf-token
  mv ~/.taskpgm-hf-token ~/.cache/huggingface/token
fi
if [[ -n $HF_MODEL && -n $NFS_SHARE && $MODEL_DIR == "$NFS_MOUNT"/* && $worker != 0 ]]; then
  say "model $HF_MODEL: worker 0 downloads it to the shared $MODEL_DIR"
elif [[ -n $HF_MODEL ]]; then
  "$VENV/bin/python" - "$HF_MODEL" "$MODEL_DIR" <<'PY'
import sys

from huggingface_hub import snapshot_download

repo, target = sys.argv[1], sys.argv[2]
patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
print(snapshot_download(repo, local_dir=target, allow_patterns=patterns))
PY
  say "model $HF_MODEL in $MODEL_DIR"
fi
WORKER

tpu_ssh all setup "$(worker_script "$header" "$body")"
echo "$PROG: done; next: experiments/tpu/run.sh CONFIG.yaml --zone $ZONE --name $TPU_NAME"
