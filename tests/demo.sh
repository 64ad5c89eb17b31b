#!/usr/bin/env bash
# The demo command: set up a fresh machine (virtualenv + local RabbitMQ) and run
# psprobe's main job end to end on simulated perfSONAR archives.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
exec .venv/bin/python tests/demo.py "$@"
