"""The broker outlet against the real RabbitMQ: confirms in publish order, within the window."""

from __future__ import annotations

import pika
import pytest
from conftest import AMQP_URL, write_config

from psprobe import config
from psprobe.messages import Encoder
from psprobe.publish import BrokerError, BrokerOutlet


def messages(n: int):
    enc = Encoder({"org_metadata_key": "k1", "event-type": "packet-loss-rate"},
                  "perfsonar.raw.packet-loss-rate")
    return [enc.encode([(1_700_000_000 + i, 0.0)]) for i in range(n)]


def settings(tmp_path, exchange: str, window: int) -> config.Broker:
    conf = write_config(tmp_path / "p.conf", {"broker": {"url": AMQP_URL, "exchange": exchange,
                                                         "confirm_window": window}})
    return config.load(str(conf)).broker


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
