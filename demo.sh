#!/usr/bin/env bash
# Generate an image from a prompt through a real tritonserver (offline `tiny` model by default):
#   ./demo.sh "a photo of an astronaut riding a horse" [-o out.png] [--model sd15-random] [--seed 7]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec "$VENV/bin/python" -m sd_backend.demo "$@"
