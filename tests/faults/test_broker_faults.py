"""Broker faults: exit 69 with one clear line, the checkpoint never passes what the broker
confirmed, and the next runs deliver every point (duplicates within one chunk).

A broker that only binds some routing keys is not a fault (the downstream's choice):
those messages are counted, warned about and dropped, unless [broker] unroutable = fail.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable

import pytest
from faultproxy import FaultProxy
from ports import free_port as _closed_port  # tests/ is on sys.path

from faults.conftest import AMQP_URL, Tally, rabbitmqctl, wait_broker
from psprobe import checkpoint, config, history, metrics, status

A, B = "ps-a.example.org", "ps-b.example.org"
TIMEOUT = 3  # [broker] timeout in the lab
PREFIX = "perfsonar.raw."
# The lab's hosts have these 4 event types; the real downstream binds some keys only.
BOUND, UNBOUND = ("throughput", "packet-loss-rate"), ("packet-retransmits", "histogram-owdelay")


def _after(n: int, action: Callable[[], None]) -> Callable:
    """A progress callback that acts once, right after the ``n``-th confirmed message."""
    done = []

    def progress(res) -> None:
        if res.messages >= n and not done:
            done.append(1)
            action()

    return progress


def _scenario(lab, figures, name: str, words: str, *, inject=None, remove=None,
              progress=None, extra=None) -> tuple[str, float]:
    """The faulted run of A, then B (untouched), then A's catch-up: (its line, its seconds)."""
    for h in (A, B):
        lab.add_host(h)
        assert lab.run(h).status == 0
    lab.more(A, 120)
    lab.more(B, 120)
    if inject:
        inject()
    try:
        t = time.monotonic()
        r = lab.run(A, progress=progress, **(extra or {}))
        took = time.monotonic() - t
    finally:
        if remove:
            remove()
    assert r.status == 69, r.lines  # EX_UNAVAILABLE
    line = r.failed_line(A)
    assert words in line, line
    assert "guest:guest" not in line and ":guest@" not in line
    rb = lab.run(B)
    assert rb.status == 0, rb.lines
    assert lab.tally(B).lost == 0
    runs, t = lab.catch_up(A)
    figures.fault("broker", name, r.status, line, t, runs)
    return line, took


def _plain(line: str) -> str:
    """The error of a summary line, checked to read as a sentence, not a Python repr."""
    reason = line.split("error=", 1)[1]
    assert not re.search(r"[A-Z][a-z]+(Error|Exception|Timeout|Failed)\b|\(<|'/\(", reason), reason
    return reason


def _bind_only(bus, event_types: tuple[str, ...]) -> tuple[Callable, Callable]:
    """(inject, remove): the queue bound to these routing keys only, like the real downstream."""
    def inject() -> None:
        bus.unbind()
        ch = bus.channel()
        for et in event_types:
            ch.queue_bind(bus.queue, bus.exchange, routing_key=PREFIX + et)

    def remove() -> None:
        ch = bus.channel()
        for et in event_types:
            ch.queue_unbind(bus.queue, bus.exchange, routing_key=PREFIX + et)
        bus.bind()

    return inject, remove


def _missing(lab, host: str) -> dict[str, int]:
    """Event type -> points of ``host`` the archive holds and the broker never delivered."""
    lab.tally(host)  # drains the queue into lab.delivered
    h = lab.hosts[host].hosts[host.lower()]
    got = {(m["meta"]["org_metadata_key"], m["meta"]["event-type"], int(ts))
           for m in lab.delivered for ts in m["datapoints"]}
    out: dict[str, int] = {}
    for key, et in h.pairs():
        n = sum(1 for ts, _ in h.points(key, et) if (key, et, ts) not in got)
        if n:
            out[et] = out.get(et, 0) + n
    return out


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


def test_some_routing_keys_unbound_are_counted_and_dropped(lab, figures):
    """The real consumer binds 5 of the 13 event types: the run is fine, the rest is dropped."""
    lab.add_host(A)
    assert lab.run(A).status == 0
    assert _missing(lab, A) == {}
    lab.more(A, 120)
    inject, remove = _bind_only(lab.bus, BOUND)
    inject()
    try:
        r = lab.run(A)
    finally:
        remove()
    assert r.status == 0, r.lines
    warned = [x for x in r.lines if x.startswith("WARNING") and "returned unroutable" in x]
    assert len(warned) == len(UNBOUND), r.lines  # one per routing key and run
    for et in UNBOUND:
        assert any(f"routing key {PREFIX + et!r}" in w for w in warned), warned
    assert "unroutable = fail" in warned[0] and ":guest@" not in warned[0]
    # every point of the bound keys arrived; the others were dropped, and stay dropped
    assert _missing(lab, A) == dict.fromkeys(UNBOUND, 120)
    sd = str(lab.state)
    h = lab.hosts[A].hosts[A]
    newest = {h.points(k, et)[-1][0] for k, et in h.pairs()}
    cp = checkpoint.peek(sd, A)
    assert len(cp) == 4 and set(cp.values()) == newest  # every series' checkpoint moved
    # 120 points in chunks of 25: 5 messages per series, one series per key
    counts = {PREFIX + et: 5 for et in UNBOUND}
    assert history.load(sd, A)[-1].get("unroutable") == counts
    ov = status.overview(config.load(str(lab.conf)), [A], next_elapse=lambda hosts: {})
    assert ov.hosts[0].unroutable == counts and not ov.alarm
    assert f"{A}: 10 messages unroutable (" in status.render_text(ov)
    prom = (lab.tmp / "metrics" / metrics.host_file(A)).read_text()
    key = PREFIX + UNBOUND[0]
    assert f'psprobe_collect_unroutable_messages{{host="{A}",routing_key="{key}"}} 5' in prom
    again = lab.run(A)
    assert again.status == 0 and "returned unroutable" not in "\n".join(again.lines)
    assert _missing(lab, A) == dict.fromkeys(UNBOUND, 120)
    t = lab.tally(A)
    dropped = 120 * len(UNBOUND)
    figures.fault("broker", f"{len(UNBOUND)} of 4 routing keys unbound ([broker] unroutable = warn)",
                  r.status, f"handled: {dropped} points of {len(UNBOUND)} unbound keys dropped, "
                  "one warning per key", Tally(t.expected - dropped, t.delivered, 0, t.duplicates),
                  0)


def test_returned_unroutable(lab, figures):
    """No queue bound at all (or the wrong exchange): nothing was delivered, a failure."""
    line, _ = _scenario(lab, figures, "no queue bound at all (every message returned)",
                        "unroutable", inject=lab.bus.unbind, remove=lab.bus.bind)
    assert "nothing was delivered" in _plain(line)


def test_unroutable_fail(lab, figures):
    inject, remove = _bind_only(lab.bus, BOUND)
    line, _ = _scenario(lab, figures, "routing keys unbound, [broker] unroutable = fail",
                        "unroutable = fail", inject=inject, remove=remove,
                        extra={"broker": {"unroutable": "fail"}})
    assert "returned unroutable" in _plain(line)


@pytest.mark.parametrize("heartbeat", [None, 0], ids=["heartbeat-default", "heartbeat-0"])
def test_broker_frozen_mid_run(lab, figures, heartbeat):
    """TCP up, nothing passes any more: pika alone would wait for the heartbeat, or forever."""
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        broker = {"url": proxy.url(AMQP_URL)}
        if heartbeat is not None:
            broker["heartbeat"] = heartbeat
        name = f"broker frozen mid-run (heartbeat {'default' if heartbeat is None else heartbeat})"
        line, took = _scenario(lab, figures, name, f"no confirm within {TIMEOUT}s",
                               progress=_after(3, proxy.freeze), remove=proxy.thaw,
                               extra={"broker": broker})
    assert took < 3 * TIMEOUT + 5, took
    _plain(line)


def test_broker_frozen_at_handshake(lab, figures):
    with FaultProxy(("127.0.0.1", 5672)) as proxy:
        line, took = _scenario(lab, figures, "broker frozen before the run (TCP accepted, silent)",
                               f"no answer to the AMQP handshake within {TIMEOUT}s",
                               inject=proxy.freeze, remove=proxy.thaw,
                               extra={"broker": {"url": proxy.url(AMQP_URL)}})
    assert took < 3 * TIMEOUT + 5, took
    assert _plain(line).endswith(f": no answer to the AMQP handshake within {TIMEOUT}s")


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
