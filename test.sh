#!/usr/bin/env bash
# Run the test suite (CPU, offline): unit tests, kernel tests under TRITON_INTERPRET,
# and end-to-end tests against a real tritonserver process with the tiny model.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec "$VENV/bin/python" -m pytest "$@"
