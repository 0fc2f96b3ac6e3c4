#!/usr/bin/env bash
# Set up (first run) and start the embedded hub with two simulated ComfyUI servers on http://127.0.0.1:8000/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python manage.py serve --demo "$@"
