#!/usr/bin/env bash
# Set up .venv and run the main job: a simulated fleet on an embedded MQTT broker.
# Extra arguments go to `estdp simulate` (see `estdp simulate --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot
exec .venv/bin/estdp simulate "$@"
