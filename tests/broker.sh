#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672 (guest/guest on loopback).
# Installs and starts Debian's rabbitmq-server when none answers; used by the
# demo and by the test command, so a fresh machine needs nothing else.
set -euo pipefail

answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if answers; then
    exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "broker.sh: no broker on 127.0.0.1:5672 and cannot install one (need root and apt-get)" >&2
        exit 1
    fi
    echo "broker.sh: installing rabbitmq-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "broker.sh: starting rabbitmq-server" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
# Poll (bounded) until the broker itself answers a ping.
for _ in $(seq 1 120); do
    answers && rabbitmq-diagnostics -q ping >/dev/null 2>&1 && exit 0
    sleep 1
done
echo "broker.sh: rabbitmq-server did not come up on 127.0.0.1:5672" >&2
exit 1
