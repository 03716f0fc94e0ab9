#!/usr/bin/env bash
# Run the saga-worker demo: bash scripts/demo.sh [demo args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q -e .
exec .venv/bin/saga-worker demo "$@"
