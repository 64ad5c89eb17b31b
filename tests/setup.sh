#!/usr/bin/env bash
# Set up a fresh machine for psprobe's demo and tests: Python virtualenv with
# psprobe installed (editable) and the test extras, and a local RabbitMQ.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=()
    command -v rabbitmq-server >/dev/null || need+=(rabbitmq-server)
    if [ "${PSPROBE_SETUP_FULL:-0}" = 1 ]; then
        command -v rpmbuild >/dev/null || need+=(rpm)
        command -v rpmlint >/dev/null || need+=(rpmlint)
        command -v systemd-nspawn >/dev/null || need+=(systemd-container)
        command -v debootstrap >/dev/null || need+=(debootstrap)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        echo "setup: installing ${need[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import psprobe, pika, requests, click, pytest, aiosmtpd, cryptography' 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
fi
bash tests/broker.sh
