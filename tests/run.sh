#!/usr/bin/env bash
# The test command: set up a fresh machine (virtualenv, RabbitMQ, rpm tools,
# systemd container tools) and run lint plus the whole suite, system tests
# included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PSPROBE_SETUP_FULL=1 bash tests/setup.sh
.venv/bin/ruff check .
# A test that cannot run here must say why: -rs prints every skip reason.
# The systemd container must run here, not be skipped.
export PSPROBE_REQUIRE_SYSTEM=1
exec .venv/bin/python -m pytest -q -rs "$@"
