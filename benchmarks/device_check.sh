#!/usr/bin/env bash
# The device check (issue 20), as the GPU machine runs it once the staged wheels are installed (benchmarks/README.md,
# "Device check"): the image's python3 with nnserve on PYTHONPATH (/tmp/site), figures and logs to $OUT.
# Arguments go to benchmarks/device_check.py (e.g. --device cpu --quick to try it anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/device_check.py "$@"
