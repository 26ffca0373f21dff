#!/usr/bin/env bash
# Sets up ./.venv and runs the main job: pretrain -> search -> fine-tune -> report on the embedded
# offline default (scikit-learn's handwritten digits). Extra arguments go to `python -m sculpt_jax run`,
# e.g. `./run.sh --model resnet20 --dataset cifar10 --data-dir ~/data/cifar-10-batches-py`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m sculpt_jax run "$@"
