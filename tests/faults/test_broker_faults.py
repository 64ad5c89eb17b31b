"""Broker faults: exit 3 with one clear line, the checkpoint never passes what the broker
confirmed, and the next runs deliver every point (duplicates within one chunk)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable

import pytest

from faults.conftest import AMQP_URL, rabbitmqctl, wait_broker

A, B = "ps-a.example.org", "ps-b.example.org"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _after(n: int, action: Callable[[], None]) -> Callable:
    """A progress callback that acts once, right after the ``n``-th confirmed message."""
    done = []

    def progress(res) -> None:
        if res.messages >= n and not done:
            done.append(1)
            action()

    return progress


def _scenario(lab, figures, name: str, words: str, *, inject=None, remove=None,
              progress=None, extra=None) -> None:
    for h in (A, B):
        lab.add_host(h)
        assert lab.run(h).status == 0
    lab.more(A, 120)
    lab.more(B, 120)
    if inject:
        inject()
    try:
        r = lab.run(A, progress=progress, **(extra or {}))
    finally:
        if remove:
            remove()
    assert r.status == 3, r.lines
    line = r.failed_line(A)
    assert words in line, line
    assert "guest:guest" not in line and ":guest@" not in line
    rb = lab.run(B)
    assert rb.status == 0, rb.lines
    assert lab.tally(B).lost == 0
    runs, t = lab.catch_up(A)
    figures.fault("broker", name, r.status, line, t, runs)


def test_broker_down_at_start(lab, figures):
    url = AMQP_URL.replace(":5672/", f":{_closed_port()}/")
    _scenario(lab, figures, "down at start (port closed)", "cannot connect",
              extra={"broker": {"url": url}})


def test_connection_killed_mid_run(lab, figures):
    kill = _after(3, lambda: rabbitmqctl("close_all_connections", "psprobe fault test"))
    _scenario(lab, figures, "connection killed mid-run", "broker", progress=kill)


def test_broker_restarted_mid_run(lab, figures):
    def stop() -> None:
        rabbitmqctl("stop_app")

    def start() -> None:
        rabbitmqctl("start_app")
        wait_broker()

    _scenario(lab, figures, "broker restarted mid-run (stop_app/start_app)", "broker",
              progress=_after(3, stop), remove=start)


def test_exchange_missing(lab, figures):
    _scenario(lab, figures, "exchange missing", "does not exist",
              extra={"broker": {"exchange": f"test.psprobe.missing.{uuid.uuid4().hex[:8]}"}})


def test_access_refused(lab, figures):
    user = f"psprobe-noperm-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", user, "secret-noperm")
    url = AMQP_URL.replace("guest:guest@", f"{user}:secret-noperm@")
    try:
        _scenario(lab, figures, "access refused (user without permissions)", "denied",
                  extra={"broker": {"url": url}})
    finally:
        rabbitmqctl("delete_user", user, check=False)


def test_write_refused(lab, figures):
    user = f"psprobe-readonly-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", user, "secret-readonly")
    rabbitmqctl("set_permissions", "-p", "/", user, "^$", "^$", ".*")
    url = AMQP_URL.replace("guest:guest@", f"{user}:secret-readonly@")
    try:
        _scenario(lab, figures, "access refused (no write permission)", "access refused",
                  extra={"broker": {"url": url}})
    finally:
        rabbitmqctl("delete_user", user, check=False)


def test_returned_unroutable(lab, figures):
    _scenario(lab, figures, "message returned (no queue bound)", "unroutable",
              inject=lab.bus.unbind, remove=lab.bus.bind)


def test_nack(lab, figures):
    """A bound queue that rejects publishes when full: the broker nacks."""
    full = f"test.psprobe.faults.full.{uuid.uuid4().hex[:8]}"

    def inject() -> None:
        ch = lab.bus.channel()
        ch.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        ch.queue_bind(full, lab.bus.exchange, routing_key="#")

    _scenario(lab, figures, "message nacked (queue full, reject-publish)", "nack",
              inject=inject, remove=lambda: lab.bus.channel().queue_delete(full))


@pytest.fixture
def restore_watermark():
    yield
    rabbitmqctl("set_vm_memory_high_watermark", "0.4")


def test_blocked_connection(lab, figures, restore_watermark):
    block = _after(2, lambda: rabbitmqctl("set_vm_memory_high_watermark", "0"))
    _scenario(lab, figures, "connection blocked (memory alarm)", "blocked", progress=block,
              remove=lambda: rabbitmqctl("set_vm_memory_high_watermark", "0.4"))
