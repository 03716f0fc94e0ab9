#!/usr/bin/env bash
# Run the saga-worker demo: bash scripts/demo.sh [demo args]
# Installs the package as a user would (no extras) into .venv, then runs `saga-worker demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
.venv/bin/pip install -q -e .
exec .venv/bin/saga-worker demo "$@"
