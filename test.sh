#!/usr/bin/env bash
# Sets up ./.venv and runs the lint and the whole test suite (the README's test command; CI runs it).
# Extra arguments go to pytest, e.g. `./test.sh tests/test_masking.py -x`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check sculpt_jax experiments tests benchmarks
.venv/bin/python -m pytest -q "$@"
