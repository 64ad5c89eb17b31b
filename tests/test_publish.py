"""The broker outlet against the real RabbitMQ: confirms in publish order, within the window;
unroutable messages counted and dropped (or fatal); every wait bounded by [broker] timeout."""

from __future__ import annotations

import logging
import time
import uuid

import pika
import pytest
from conftest import AMQP_URL, write_config
from faultproxy import FaultProxy, elapsed

from psprobe import config
from psprobe.messages import Encoder
from psprobe.publish import BrokerError, BrokerOutlet, LazyBrokerOutlet, PrintOutlet

ROUTED, OTHER, THIRD = "perfsonar.raw.throughput", "perfsonar.raw.histogram-ttl", "perfsonar.raw.x"


def messages(n: int, key: str = "perfsonar.raw.packet-loss-rate", start: int = 1_700_000_000,
             points: int = 1):
    enc = Encoder({"org_metadata_key": "k1", "event-type": key.rsplit(".", 1)[-1]}, key)
    return [enc.encode([(start + i * points + j, 0.0) for j in range(points)]) for i in range(n)]


def settings(tmp_path, exchange: str, window: int, url: str = AMQP_URL, **broker) -> config.Broker:
    conf = write_config(tmp_path / "p.conf", {"broker": {"url": url, "exchange": exchange,
                                                         "confirm_window": window, **broker}})
    return config.load(str(conf)).broker


@pytest.fixture
def partial():
    """An exchange with one queue bound to ROUTED only: other keys come back unroutable."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ex = f"test.psprobe.partial.{uuid.uuid4().hex[:8]}"
    ch.exchange_declare(ex, exchange_type="topic")
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, ex, routing_key=ROUTED)

    def drain() -> list[str]:
        out = []
        while True:
            method, props, _ = ch.basic_get(q, auto_ack=True)
            if method is None:
                return out
            out.append(props.message_id)

    yield ex, drain
    ch.exchange_delete(ex)
    conn.close()


def interleave(*keys: str) -> list:
    """One message per key given, in that order, all different."""
    return [messages(1, k, start=1_700_000_000 + 10 * i)[0] for i, k in enumerate(keys)]


def send_all(out, msgs, confirmed: list, first: int = 0) -> None:
    """Send ``msgs``; each one's confirm appends its number (from ``first``) to ``confirmed``."""
    for i, m in enumerate(msgs, first):
        out.send(m, lambda i=i: confirmed.append(i))


def test_confirms_come_back_in_publish_order_and_never_lag_a_window(bus, tmp_path):
    out = BrokerOutlet(settings(tmp_path, bus.exchange, 4))
    msgs, confirmed = messages(50), []
    try:
        for i, m in enumerate(msgs):
            out.send(m, lambda m=m: confirmed.append(m.last_ts))
            assert len(confirmed) >= i + 1 - 3  # at most window - 1 left unconfirmed
        out.flush()
    finally:
        out.close()
    assert confirmed == [m.last_ts for m in msgs]
    assert [d.message_id for d in bus.drain()] == [m.message_id for m in msgs]


def test_a_nack_stops_at_the_refused_message_and_confirms_only_those_before(tmp_path):
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ex = "test.psprobe.nack"
    ch.exchange_declare(ex, exchange_type="topic")
    q = ch.queue_declare("", exclusive=True, arguments={"x-max-length": 5,
                                                          "x-overflow": "reject-publish"})
    ch.queue_bind(q.method.queue, ex, routing_key="#")
    out = BrokerOutlet(settings(tmp_path, ex, 8))
    msgs, confirmed = messages(20), []
    try:
        with pytest.raises(BrokerError, match="refused \\(nack\\)"):
            for m in msgs:
                out.send(m, lambda m=m: confirmed.append(m.last_ts))
            out.flush()
    finally:
        out.close()
        ch.exchange_delete(ex)
        conn.close()
    assert confirmed == [m.last_ts for m in msgs[:5]]  # the queue took 5; nothing after moves


# --- unroutable messages


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "returned unroutable" in r.getMessage()]


def test_unroutable_are_counted_per_key_warned_once_and_confirmed_in_order(partial, tmp_path,
                                                                           caplog):
    ex, drain = partial
    keys = [ROUTED, OTHER, ROUTED, OTHER, OTHER, THIRD, ROUTED, OTHER, ROUTED, THIRD] * 3
    msgs, confirmed = interleave(*keys), []
    out = BrokerOutlet(settings(tmp_path, ex, 4))
    try:
        with caplog.at_level(logging.WARNING, logger="psprobe"):
            send_all(out, msgs, confirmed)
            out.flush()
    finally:
        out.close()
    assert confirmed == list(range(len(msgs)))  # returned ones too, all in publish order
    assert out.unroutable == {OTHER: 12, THIRD: 6}
    warned = warnings_of(caplog)
    assert len(warned) == 2 and all(f"exchange {ex!r}" in w for w in warned)
    assert any(repr(OTHER) in w for w in warned) and any(repr(THIRD) in w for w in warned)
    assert "[broker] unroutable = fail" in warned[0] and "guest:guest" not in warned[0]
    assert drain() == [m.message_id for m, k in zip(msgs, keys) if k == ROUTED]


def test_returned_before_the_first_routed_are_held_then_released_in_order(partial, tmp_path):
    """A window that starts with returned messages: their confirms wait for a routed one."""
    ex, _ = partial
    msgs, confirmed = interleave(OTHER, OTHER, THIRD, OTHER, ROUTED, OTHER, ROUTED, THIRD), []
    out = BrokerOutlet(settings(tmp_path, ex, 2))
    try:
        send_all(out, msgs[:4], confirmed)
        assert confirmed == []  # acked by the broker, but all returned: held
        assert sum(out.unroutable.values()) >= 3  # counted as their acks came
        send_all(out, msgs[4:], confirmed, 4)
        out.flush()
    finally:
        out.close()
    assert confirmed == list(range(8))
    assert out.unroutable == {OTHER: 4, THIRD: 2}


def test_unroutable_fail_stops_at_the_returned_message(partial, tmp_path):
    ex, _ = partial
    msgs, confirmed = interleave(ROUTED, ROUTED, OTHER, ROUTED, ROUTED), []
    out = BrokerOutlet(settings(tmp_path, ex, 8, unroutable="fail"))
    try:
        with pytest.raises(BrokerError, match=r"routing key 'perfsonar.raw.histogram-ttl' was "
                                              r"returned unroutable by exchange .*unroutable = fail"):
            send_all(out, msgs, confirmed)
            out.flush()
    finally:
        out.close()
    assert confirmed == [0, 1]  # nothing from the returned one on
    assert out.unroutable == {OTHER: 1}


def test_a_run_where_every_message_is_returned_fails_at_flush_and_moves_nothing(partial, tmp_path,
                                                                                caplog):
    ex, drain = partial
    msgs, confirmed = interleave(OTHER, THIRD, OTHER, OTHER, THIRD, OTHER, OTHER), []
    out = LazyBrokerOutlet(settings(tmp_path, ex, 4))
    assert out.unroutable == {}  # never connected
    try:
        send_all(out, msgs, confirmed)
        with pytest.raises(BrokerError) as e:
            out.flush()
    finally:
        out.close()
    assert confirmed == []
    assert out.unroutable == {OTHER: 5, THIRD: 2}
    text = str(e.value)
    assert "all 7 message(s) of this run were returned unroutable by exchange" in text
    assert repr(OTHER) in text and repr(THIRD) in text and "\n" not in text
    assert drain() == []


def test_a_host_that_got_routed_before_is_not_failed_by_a_run_of_unbound_keys_only(partial,
                                                                                  tmp_path):
    """Keys routed in earlier runs prove the exchange and its bindings: a run whose new points
    are all of unbound types moves its checkpoints; one whose known key comes back does not."""
    ex, drain = partial
    msgs, confirmed = interleave(OTHER, THIRD, OTHER), []
    out = LazyBrokerOutlet(settings(tmp_path, ex, 4), routed_keys=frozenset({ROUTED}))
    try:
        send_all(out, msgs, confirmed)
        out.flush()
    finally:
        out.close()
    assert confirmed == [0, 1, 2] and out.unroutable == {OTHER: 2, THIRD: 1}
    assert out.routed_keys == set() and drain() == []
    # A key that reached a queue before and now comes back: its binding went away.
    msgs, confirmed = interleave(OTHER, THIRD), []
    out = LazyBrokerOutlet(settings(tmp_path, ex, 4), routed_keys=frozenset({OTHER}))
    try:
        send_all(out, msgs, confirmed)
        with pytest.raises(BrokerError, match="returned unroutable"):
            out.flush()
    finally:
        out.close()
    assert confirmed == [1]  # THIRD was never routed for this host; OTHER is held back


def test_held_confirms_are_bounded(partial, tmp_path):
    """Held confirms keep their messages alive: past 8 windows (256 at least) the run stops."""
    ex, _ = partial
    msgs, confirmed = messages(300, OTHER), []
    out = BrokerOutlet(settings(tmp_path, ex, 2))
    try:
        with pytest.raises(BrokerError, match="the first 256 message"):
            send_all(out, msgs, confirmed)
            out.flush()
    finally:
        out.close()
    assert confirmed == []


def test_print_outlet_has_no_unroutable(tmp_path):
    import io

    out = PrintOutlet(settings(tmp_path, "x", 4), io.BytesIO())
    assert out.unroutable == {}


# --- a broker that stops answering: every wait ends within [broker] timeout


@pytest.fixture
def proxy():
    with FaultProxy(("127.0.0.1", 5672)) as p:
        yield p


@pytest.mark.parametrize("heartbeat", [60, 0])
def test_frozen_broker_mid_run_fails_within_the_timeout(bus, tmp_path, proxy, heartbeat):
    """Frozen after connecting, with 20 MB in flight (the socket stops taking writes)."""
    s = settings(tmp_path, bus.exchange, 1000, url=proxy.url(AMQP_URL), timeout="1s",
                 heartbeat=heartbeat)
    out = BrokerOutlet(s)
    msgs, confirmed = messages(2, ROUTED), []
    send_all(out, msgs, confirmed)
    out.flush()
    proxy.freeze()
    big = messages(320, ROUTED, start=1_800_000_000, points=4000)  # ~64 KB each
    t = time.monotonic()
    with pytest.raises(BrokerError, match=r"no confirm within 1s$"):
        send_all(out, big, confirmed, 2)
        out.flush()
    took, _ = elapsed(out.close)
    assert time.monotonic() - t < 1 + 2  # the timeout, plus room for a loaded machine
    assert took < 0.5
    assert out.conn.is_closed and confirmed == [0, 1]


def test_close_of_a_frozen_healthy_connection_is_bounded(bus, tmp_path, proxy):
    out = BrokerOutlet(settings(tmp_path, bus.exchange, 4, url=proxy.url(AMQP_URL),
                                timeout="1s", heartbeat=0))
    proxy.freeze()  # nothing failed yet: close tries the polite way, then gives up
    took, _ = elapsed(out.close)
    assert 0.9 < took < 1 + 2
    assert out.conn.is_closed


def test_frozen_at_the_handshake_is_one_plain_sentence(tmp_path, proxy):
    proxy.freeze()
    s = settings(tmp_path, "unused", 4, url=proxy.url(AMQP_URL), timeout="1s")
    t = time.monotonic()
    with pytest.raises(BrokerError) as e:
        BrokerOutlet(s)
    assert time.monotonic() - t < 1 + 2
    assert str(e.value) == (f"broker {config.redact_url(s.url)}: no answer to the AMQP "
                            "handshake within 1s")


def test_connect_failures_are_plain(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = AMQP_URL.replace(":5672/", f":{port}/")
    with pytest.raises(BrokerError, match=r": cannot connect \(Connection refused\)$"):
        BrokerOutlet(settings(tmp_path, "unused", 4, url=url))
    url = AMQP_URL.replace("127.0.0.1:5672", "nosuch.invalid:5672")
    with pytest.raises(BrokerError, match=r": cannot connect \([^()]+\)$"):
        BrokerOutlet(settings(tmp_path, "unused", 4, url=url))
