#!/usr/bin/env bash
# The GPU smoke check (bench/gpu_smoke.py): one table of what a GPU node can do for LeTI.
#   bash bench/gpu_smoke.sh          on a CUDA GPU, about 10 minutes on one H100
#   bash bench/gpu_smoke.sh --cpu    the same checks on a tiny model, anywhere (CI runs this)
# Uses the project's environment (.venv, `make setup`) where there is one, else the python3 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
    export PATH="$PWD/.venv/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
exec python bench/gpu_smoke.py "$@"
