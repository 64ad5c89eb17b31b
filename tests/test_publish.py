"""The broker outlet against the real RabbitMQ: confirms in publish order, within the window;
unroutable messages counted and dropped (or fatal); every wait bounded by [broker] timeout."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid

import pika
import pytest
import tlsutil
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


class AckTap(FaultProxy):
    """A relay that also reads the broker's confirms on their way to psprobe.

    ``confirms``: (acked, delivery tag, multiple) of every Basic.Ack and Basic.Nack
    frame, in the order the broker sent them.  Frames are read, never changed.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.confirms: list[tuple[bool, int, bool]] = []
        self._buf = b""  # one connection: what is left of its last frame

    def _forward(self, data: bytes, dst, way: str) -> bool:
        if way == "down":
            self._buf += data
            while len(self._buf) >= 7:  # type, channel, size; payload; frame end
                kind, _, size = struct.unpack(">BHI", self._buf[:7])
                if len(self._buf) < 8 + size:
                    break
                payload, self._buf = self._buf[7:7 + size], self._buf[8 + size:]
                method = payload[:4]  # class 60 (basic): method 80 (ack), 120 (nack)
                if kind == 1 and method in (b"\x00\x3c\x00\x50", b"\x00\x3c\x00\x78"):
                    tag, bits = struct.unpack(">QB", payload[4:13])
                    self.confirms.append((method[3] == 0x50, tag, bool(bits & 1)))
        return super()._forward(data, dst, way)


def covers(confirms: list[tuple[bool, int, bool]], tag: int, acked: bool = True) -> bool:
    """Among ``confirms``, the broker acked (or nacked) delivery tag ``tag``, alone or in a
    multiple one."""
    return any(ok == acked and (t == tag or (multiple and t > tag))
               for ok, t, multiple in list(confirms))


@pytest.mark.broker
def test_multiple_acks_release_their_whole_range_and_nothing_before_the_broker_acks(bus,
                                                                                   tmp_path):
    """RabbitMQ acks a burst with one "multiple" ack: every message it covers is confirmed,
    in publish order, and none before the broker's ack for it went by."""
    msgs, early = messages(400), []
    with AckTap(("127.0.0.1", 5672)) as tap:
        out = BrokerOutlet(settings(tmp_path, bus.exchange, 32, url=tap.url(AMQP_URL)))
        confirmed: list[int] = []

        def on(i: int) -> None:
            confirmed.append(i)
            if not covers(tap.confirms, i + 1):  # delivery tags count from 1
                early.append(i)

        try:
            for i, m in enumerate(msgs):
                out.send(m, lambda i=i: on(i))
                assert len(confirmed) >= i + 1 - 31
            out.flush()
        finally:
            out.close()
    assert any(multiple for _, _, multiple in tap.confirms), "no multiple ack: nothing tested"
    assert all(ok for ok, _, _ in tap.confirms)
    assert confirmed == list(range(400)) and early == []
    assert [d.message_id for d in bus.drain()] == [m.message_id for m in msgs]


@pytest.mark.broker
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


@pytest.mark.broker
def test_a_nack_mid_window_holds_back_the_acked_messages_after_it(tmp_path):
    """One key's queue is full (reject-publish), the other's is not.  The broker acks the
    messages after the refused one before or after its nack, singly or in a multiple ack
    that spans the refused tag (the order varies from run to run): none of them, and not
    the refused one, is confirmed."""
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ex = f"test.psprobe.nackmid.{uuid.uuid4().hex[:8]}"
    ch.exchange_declare(ex, exchange_type="topic")
    full = ch.queue_declare("", exclusive=True, arguments={"x-max-length": 0,
                                                           "x-overflow": "reject-publish"})
    ch.queue_bind(full.method.queue, ex, routing_key=OTHER)
    ch.queue_bind(ch.queue_declare("", exclusive=True).method.queue, ex, routing_key=ROUTED)
    confirmed: list[int] = []
    try:
        with AckTap(("127.0.0.1", 5672)) as tap:
            out = BrokerOutlet(settings(tmp_path, ex, 32, url=tap.url(AMQP_URL)))
            try:
                with pytest.raises(BrokerError, match="refused \\(nack\\)"):
                    send_all(out, interleave(ROUTED, ROUTED, OTHER, *[ROUTED] * 20), confirmed)
                    out.flush()
            finally:
                out.close()
    finally:
        ch.exchange_delete(ex)
        conn.close()
    assert covers(tap.confirms, 3, acked=False)  # delivery tag 3: the third message
    # Never the refused one or any after it; at least those acked before the nack came.
    before = tap.confirms[:next(i for i, (ok, _, _) in enumerate(tap.confirms) if not ok)]
    least = 2 if covers(before, 2) else 1 if covers(before, 1) else 0
    assert confirmed in [[0, 1][:n] for n in range(least, 3)], (confirmed, tap.confirms)


# --- unroutable messages


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "returned unroutable" in r.getMessage()]


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


# --- the connection ends under the outlet


@pytest.fixture
def own_user():
    """A broker user of this test's own: its connections are this test's, and no one else's."""
    user, pw = f"psprobe-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    def ctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                              timeout=120, check=True).stdout

    ctl("add_user", user, pw)
    ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield user, AMQP_URL.replace("guest:guest@", f"{user}:{pw}@"), ctl
    ctl("delete_user", user)


@pytest.mark.broker
def test_a_connection_the_broker_closes_stops_the_run_at_what_was_confirmed(bus, tmp_path,
                                                                            own_user):
    user, url, ctl = own_user
    out = BrokerOutlet(settings(tmp_path, bus.exchange, 4, url=url))
    confirmed: list[int] = []
    try:
        send_all(out, messages(10), confirmed)
        before = len(confirmed)
        pids = [line.split("\t")[0] for line in ctl("list_connections", "pid", "user").splitlines()
                if line.split("\t")[-1] == user]
        assert len(pids) == 1, pids
        ctl("close_connection", pids[0], "psprobe test")
        with pytest.raises(BrokerError, match=r": connection closed by broker: 320 "
                                              r"CONNECTION_FORCED - psprobe test$"):
            send_all(out, messages(50, start=1_800_000_000), confirmed, 10)
            out.flush()
    finally:
        out.close()
    assert out.conn.is_closed
    assert before >= 7 and confirmed == list(range(len(confirmed)))  # a prefix, in order
    assert len(bus.drain()) >= len(confirmed)


@pytest.mark.broker
def test_the_loop_knows_the_connection_socket(bus, tmp_path):
    """What every deadline relies on: pika registers its socket with the loop we give it
    (``custom_ioloop``, ``add_handler``), and unregisters it before closing it.  A pika
    that stops doing so fails here by name, not as a hang elsewhere."""
    out = BrokerOutlet(settings(tmp_path, bus.exchange, 4))
    loop = out._loop
    try:
        assert isinstance(loop, pika.adapters.select_connection.IOLoop)
        assert len(loop.fds) == 1
        fd = next(iter(loop.fds))
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.getpeername()[1] == 5672
    finally:
        out.close()
    assert loop.fds == set() and out.conn.is_closed


# --- TLS: the broker's TLS listener is a loopback front here (the lab's broker has none)


class TlsFront:
    """``amqps`` on loopback in front of a plain AMQP port, client certificate required."""

    def __init__(self, target: tuple[str, int], pki: tlsutil.Pki) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        ctx.load_verify_locations(str(pki.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.target, self.handshakes = target, 0
        self.loop = asyncio.new_event_loop()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return AMQP_URL.replace("amqp://", "amqps://").replace("127.0.0.1:5672",
                                                               f"localhost:{self.port}")

    async def _serve(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        self._tasks.add(asyncio.current_task())
        r2, w2 = await asyncio.open_connection(*self.target)
        self._writers += [w1, w2]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            except OSError:  # the other side shut down or reset: end both
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for w in self._writers:  # each pipe then reads its end and returns
                w.close()
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> TlsFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.broker
def test_tls_with_a_client_certificate_publishes_and_a_freeze_still_ends_within_the_timeout(
        bus, tmp_path, pki, proxy):
    """amqps end to end (server verified against [broker] ca, client certificate and key);
    then the broker freezes behind TLS: the shut-down socket ends the TLS stream too."""
    with TlsFront(("127.0.0.1", proxy.port), pki) as front:
        s = settings(tmp_path, bus.exchange, 8, url=front.url(), ca=pki.ca, cert=pki.client_cert,
                     key=pki.client_key, timeout="1s")
        out = BrokerOutlet(s)
        msgs, confirmed = messages(20, ROUTED), []
        send_all(out, msgs[:10], confirmed)
        out.flush()
        assert confirmed == list(range(10)) and front.handshakes == 1
        proxy.freeze()
        with pytest.raises(BrokerError, match=r"no confirm within 1s$"):
            send_all(out, msgs[10:], confirmed, 10)
            out.flush()
        out.close()  # the cut socket: pika has read its end, so the connection is closed
    assert out.conn.is_closed and confirmed == list(range(10))
    assert len(bus.drain()) >= 10


def test_a_client_key_that_does_not_fit_its_certificate_is_a_config_error(tmp_path, pki):
    s = settings(tmp_path, "unused", 4, url="amqps://127.0.0.1:5671/%2F", ca=pki.ca,
                 cert=pki.client_cert, key=pki.wrong_client_key)
    with pytest.raises(config.ConfigError, match=r"^\[broker\] ca/cert/key: cannot load: "):
        BrokerOutlet(s)
