#!/usr/bin/env bash
# The accelerator checks the open issues name, as one prepared script for a lent GPU/TPU session
# (device time is minutes: run it at once, with the phase timeouts below leaving time to rerun).
#
#   bash benchmarks/gpu_checks.sh search        # #13: CIFAR-10 search-quality goal run
#   bash benchmarks/gpu_checks.sh accelerator   # #14: benchmarks/accelerator.py, then (#16) latency
#
# Run from the repository root. Results go to $OUT (default runs/gpu): JSON, logs, markdown, and
# the search run's pretrained ResNet-20 as pretrain_r20_c10.tgz (reuse it: PRE=DIR with the
# tarball unpacked under DIR, e.g. `tar xzf pretrain_r20_c10.tgz -C DIR`).
# Environment: WHEELS=DIR installs the wheels in DIR first (packages an accelerator image lacks:
# jraph, rlax, distrax, tfds, grain, ...; see benchmarks/README.md), CIFAR=PATH the CIFAR-10 JPEG
# tarball (default ../shared/data/cifar10-jpeg.tar.gz), QTIME / ATIME / LTIME the seconds each
# phase may run (TTIME: the latency-table check; a phase cut short keeps what it measured: the scripts write JSON as they go),
# EPOCHS the pretraining epochs (40: >= 85% validation is the goal's dense model).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0  # the fine-tunes recompile the same step
PY=${PY:-python3}
nvidia-smi -L 2>/dev/null; date

search() {
  local cifar=${CIFAR:-../shared/data/cifar10-jpeg.tar.gz}
  if [ ! -f ../shared/data/cifar10-jpeg.tar.gz ]; then
    mkdir -p ../shared/data && cp "$cifar" ../shared/data/cifar10-jpeg.tar.gz || exit 1
  fi
  timeout "${QTIME:-450}" $PY benchmarks/search.py --part quality --dataset cifar10-folder \
    --pretrain-epochs "${EPOCHS:-40}" ${PRE:+--pretrained "$PRE"} \
    --seeds 5 --budgets 128 512 --methods ppo random uniform cem anneal magnitude \
    --reward-set-size 2000 --heldout-size 2000 --val-size 5000 \
    --finetune-epochs 2 --finetune-budgets 512 --set pretrain.batch_size=128 pretrain.lr=0.1 \
    --workdir /tmp/gpu_search --json "$OUT/cifar_quality.json" 2>&1 | tee "$OUT/cifar_quality.log"
  echo "search rc=${PIPESTATUS[0]}"; date
  [ -d /tmp/gpu_search/pretrain ] && tar czf "$OUT/pretrain_r20_c10.tgz" -C /tmp/gpu_search pretrain
}

accelerator() {
  timeout "${ATIME:-300}" $PY benchmarks/accelerator.py --json "$OUT/accelerator.json" \
    --md "$OUT/accelerator.md" --repeats "${REP:-5}" 2>&1 | tee "$OUT/accelerator.log"
  echo "accelerator rc=${PIPESTATUS[0]}"; date
  timeout "${LTIME:-200}" $PY benchmarks/latency.py --parts patterns \
    --models resnet56 vgg19 resnet50 --batches 1 256 --repeats 10 \
    --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log"
  echo "latency rc=${PIPESTATUS[0]}"; date
  timeout "${TTIME:-150}" $PY benchmarks/latency.py --parts table --models vgg19 --batches 256 \
    --table-lowerings filters taps --taps-min-width 0 --repeats 5 \
    --json "$OUT/latency_table.json" 2>&1 | tee "$OUT/latency_table.log"
  echo "latency table rc=${PIPESTATUS[0]}"; date
}

case "${1:-}" in
  search) search ;;
  accelerator) accelerator ;;
  all) search; accelerator ;;
  *) echo "usage: bash benchmarks/gpu_checks.sh search|accelerator|all" >&2; exit 2 ;;
esac
ls -la "$OUT"
