#!/usr/bin/env bash
# Every benchmark at accelerator sizes, plus (with --tests) the single-device correctness tests on
# the accelerator, in one call: for a leased GPU host where minutes count. Each part has its own
# time limit, so one that hangs or fails costs only its own minutes and the rest still report.
#
#   benchmarks/accelerator.sh OUTDIR [--tests]
#
# Writes OUTDIR/<part>.log and OUTDIR/<part>.json (top-level `ratios`, as every benchmark here)
# and prints each part's table. Runs the checkout in place (PYTHONPATH=.), no install.
set -u
out=${1:?usage: benchmarks/accelerator.sh OUTDIR [--tests]}
tests=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log, keep going
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v -E "Writing model shards|it/s\]|^\s*$" "$out/$name.log" | tail -n 25
  echo "=== $name: exit $rc after $((SECONDS - start))s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(),
  '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__,
  torch.cuda.is_available())"; } 2>&1 | tee "$out/env.log"

part divergence 150 "$py" benchmarks/divergence.py --sizes 16x256x4096 32x512x32000 \
  64x512x32000 --scipy-budget 5 --json "$out/divergence.json"
part divergence_tiles 100 "$py" benchmarks/divergence_tiles.py --size 32x1024x32000 \
  --position-blocks 8 32 128 --vocab-chunks 4096 32000 --json "$out/divergence_tiles.json"
# PyTorch shares the GPU with JAX here: stop JAX from taking 75% of its memory up front.
part model 180 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 "$py" benchmarks/model.py \
  --configs small medium --json "$out/model.json"
# Flash attention (cuDNN) on the 0.5B model, asserted against "dot" first; PyTorch already ran.
part model_cudnn 100 "$py" benchmarks/model.py --configs medium --attention cudnn --skip-torch \
  --json "$out/model_cudnn.json"
part adapters 90 "$py" benchmarks/adapters.py --config small --json "$out/adapters.json"
part probe 60 "$py" benchmarks/probe.py --batch-size 32 --seq-len 512 --vocab 32000 \
  --json "$out/probe.json"
if [ "$tests" = "--tests" ]; then
  # The single-device tests on the accelerator (the sharded ones need 8 CPU devices).
  # On an H200 (2026-11-29) the first six files took ~150 s; the last two check the MRF solvers
  # and probe scoring under the GPU's TF32 default, which the CPU cannot.
  part tests 200 env JAX_PLATFORMS=cuda,cpu "$py" -m pytest -q -p no:cacheprovider -rfE \
    --durations=5 tests/divergence tests/hf/test_parity.py tests/models/test_decoder.py \
    tests/models/test_generate.py tests/models/test_attention_impl.py tests/train/test_step.py tests/train/test_adapters.py \
    tests/mrf/test_solve.py tests/eval/test_score.py -k "not shard and not mesh"
fi
