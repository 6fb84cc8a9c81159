#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test   or   scripts/setup.sh "test,gpu"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install --quiet --editable "$spec"
