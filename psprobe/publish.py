"""Outlets for messages: the broker (confirmed), or standard output for --dry-run.

An outlet has ``send(message, confirmed)``, ``flush()`` and ``close()``.
``confirmed()`` is called once the message is safe, in the order the messages
were sent: for the broker that means the broker confirmed it (publisher
confirms, ``mandatory`` so an unroutable message is an error, not a silent
drop).  Only then may the caller move a checkpoint.  ``flush`` returns once
every message sent is confirmed.

The broker outlet keeps up to ``[broker] confirm_window`` messages published
and not yet confirmed, so a run costs a broker round trip per window, not per
message; a run that dies resends at most that many.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

from psprobe import config
from psprobe.messages import Message

log = logging.getLogger("psprobe.publish")


class BrokerError(Exception):
    """The broker refused or lost us; one line, never with the password."""


class Outlet(Protocol):
    def send(self, msg: Message, confirmed: Callable[[], None]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class PrintOutlet:
    """``--dry-run``: one JSON line per message on stdout; nothing is confirmed or moved."""

    def __init__(self, settings: config.Broker, stream: IO[bytes]) -> None:
        self.exchange = json.dumps(settings.exchange).encode()
        self.stream = stream

    def send(self, msg: Message, confirmed: Callable[[], None]) -> None:
        self.stream.write(b'{"exchange":%s,"routing_key":%s,"message_id":"%s","body":%s}\n' % (
            self.exchange, json.dumps(msg.routing_key).encode(), msg.message_id.encode(), msg.body))
        confirmed()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


@dataclass
class _Sent:
    tag: int  # the channel's delivery tag
    message_id: str
    confirmed: Callable[[], None]


class BrokerOutlet:
    """One AMQP connection and confirming channel for a whole run.

    pika's BlockingChannel waits for each confirm before the next publish; its
    asynchronous channel underneath (``_impl``, there since pika 0.10) takes
    confirms as they come, which is what a window needs.  Its callbacks only
    record what the broker said; the checkpoint callbacks run afterwards, here.
    """

    def __init__(self, settings: config.Broker) -> None:
        import pika  # imported here: --help and dry runs need not pay for it

        self._pika = pika
        self.settings = settings
        self.where = config.redact_url(settings.url)
        try:
            params = connection_parameters(settings)
        except (ssl.SSLError, OSError) as e:
            # A bad [broker] ca/cert/key is the operator's configuration, not the broker
            # (an OSError here would otherwise pass for a state directory problem).
            raise config.ConfigError(
                f"[broker] ca/cert/key: cannot load: {getattr(e, 'reason', None) or e.strerror or e}"
            ) from None
        try:
            self.conn = pika.BlockingConnection(params)
            self.channel = self.conn.channel()
            if settings.declare_exchange:
                self.channel.exchange_declare(settings.exchange, exchange_type="topic",
                                              durable=True)
            else:
                self.channel.exchange_declare(settings.exchange, passive=True)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        self.props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        self.window = settings.confirm_window
        self._sent: deque[_Sent] = deque()
        self._tag = 0  # delivery tags count from 1 on a channel in confirm mode
        self._acked_upto = 0  # every tag up to this one is acked ("multiple" acks)
        self._acked: set[int] = set()  # single acks above it
        self._returned: set[str] = set()  # message ids the broker returned unroutable
        self._failed: Exception | str | None = None  # a nack, or why the channel closed
        self._waiting = False  # in _wait: pika's callbacks must wake it
        self._blocked = False  # Connection.Blocked (a resource alarm) until Unblocked
        self.conn.add_on_connection_blocked_callback(lambda *_: self._set_blocked(True))
        self.conn.add_on_connection_unblocked_callback(lambda *_: self._set_blocked(False))
        ch = self.channel._impl
        ch.add_on_return_callback(self._on_return)
        ch.add_on_close_callback(self._on_close)
        selected: list[bool] = []

        def on_selected(_frame) -> None:
            selected.append(True)
            self._wake()

        ch.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_selected)
        self._wait(lambda: bool(selected), "answer to confirm.select")

    # pika's callbacks: record, then wake process_data_events (which would otherwise
    # wait out its time limit: it only returns early for BlockingChannel's own events)

    def _on_confirm(self, frame) -> None:
        m = frame.method
        if isinstance(m, self._pika.spec.Basic.Nack):
            self._failed = self._failed or "the broker refused (nack) a message"
        elif m.multiple:
            self._acked_upto = max(self._acked_upto, m.delivery_tag)
        else:
            self._acked.add(m.delivery_tag)
        self._wake()

    def _on_return(self, _channel, _method, props, _body) -> None:
        self._returned.add(props.message_id)
        self._wake()

    def _on_close(self, _channel, reason: Exception) -> None:
        self._failed = self._failed or reason
        self._wake()

    def _set_blocked(self, blocked: bool) -> None:
        self._blocked = blocked

    def _wake(self) -> None:
        if not self._waiting:
            return
        # closing: process_data_events returns (and says why) anyway
        with contextlib.suppress(self._pika.exceptions.ConnectionWrongStateError):
            self.conn.add_callback_threadsafe(_nothing)

    # the outlet

    def send(self, msg: Message, confirmed: Callable[[], None]) -> None:
        props = self.props
        props.message_id = msg.message_id
        try:
            self.channel._impl.basic_publish(self.settings.exchange, msg.routing_key, msg.body,
                                             properties=props, mandatory=True)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        self._tag += 1
        self._sent.append(_Sent(self._tag, msg.message_id, confirmed))
        if len(self._sent) >= self.window:  # a full window: out it goes, then wait for half
            while len(self._sent) > self.window // 2:
                self._progress()

    def flush(self) -> None:
        while self._sent:
            self._progress()

    def _progress(self) -> None:
        """Wait until at least one more message is confirmed (or fail)."""
        n = len(self._sent)
        self._wait(lambda: len(self._sent) < n, "confirm")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.settings.timeout
        self._io(0)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                if self._blocked:  # pika's blocked_connection_timeout is the same: be first
                    raise BrokerError(f"broker {self.where}: connection blocked by the broker "
                                      f"(resource alarm) for over {self.settings.timeout:g}s")
                raise BrokerError(f"broker {self.where}: no {what} within "
                                  f"{self.settings.timeout:g}s")
            self._waiting = True
            try:
                self._io(min(left, 1.0))
            finally:
                self._waiting = False

    def _io(self, seconds: float) -> None:
        """Let pika read and write for up to ``seconds``; then hand out the confirms."""
        try:
            self.conn.process_data_events(time_limit=seconds)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        while self._sent:
            head = self._sent[0]
            if head.tag > self._acked_upto and head.tag not in self._acked:
                break
            if head.message_id in self._returned:
                raise BrokerError(f"broker {self.where}: message returned unroutable by exchange "
                                  f"{self.settings.exchange!r} (no queue bound for its key)")
            self._sent.popleft()
            self._acked.discard(head.tag)
            head.confirmed()
        if self._failed is not None:
            f = self._failed
            raise BrokerError(f"broker {self.where}: {f if isinstance(f, str) else self._reason(f)}")

    def close(self) -> None:
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception as e:
            log.debug("closing broker connection: %s", e)

    def _reason(self, e: Exception) -> str:
        ex = self._pika.exceptions
        x = self.settings.exchange
        if isinstance(e, ex.ChannelClosedByBroker):
            if e.reply_code == 404:
                return f"exchange {x!r} does not exist (create it, or set [broker] declare_exchange)"
            if e.reply_code == 403:
                return f"access refused to exchange {x!r}: {e.reply_text}"
            return f"channel closed: {e.reply_code} {e.reply_text}"
        if isinstance(e, ex.ProbableAuthenticationError):
            return "authentication failed (user/password or certificate)"
        if isinstance(e, ex.ProbableAccessDeniedError):
            return "access denied to the virtual host"
        if isinstance(e, ex.ConnectionBlockedTimeout):
            return f"connection blocked by the broker (resource alarm) for over {self.settings.timeout:g}s"
        if isinstance(e, ex.ConnectionClosedByBroker):
            return f"connection closed by broker: {e.reply_code} {e.reply_text}"
        if isinstance(e, (ex.StreamLostError, ex.ConnectionWrongStateError)):
            return "connection lost"
        if isinstance(e, ex.AMQPConnectionError):
            return f"cannot connect ({_root_cause(e)})"
        return f"{type(e).__name__}: {e}".replace("\n", " ")


class LazyBrokerOutlet:
    """The broker outlet, connected at the first message.

    Most runs of a 10-minute timer find little or nothing new: those cost no
    pika import and no AMQP handshake.  The secrets file is still checked at
    once, so a bad one fails every run, not only runs with data.
    """

    def __init__(self, settings: config.Broker) -> None:
        if settings.password_file:
            config.read_secret(settings.password_file, "[broker] password_file")
        self.settings = settings
        self.outlet: BrokerOutlet | None = None

    def send(self, msg: Message, confirmed: Callable[[], None]) -> None:
        if self.outlet is None:
            self.outlet = BrokerOutlet(self.settings)
        self.outlet.send(msg, confirmed)

    def flush(self) -> None:
        if self.outlet is not None:
            self.outlet.flush()

    def close(self) -> None:
        if self.outlet is not None:
            self.outlet.close()


def _nothing() -> None:
    pass


def connection_parameters(settings: config.Broker):
    """pika parameters from ``[broker]``: URL, password file, TLS, EXTERNAL auth."""
    import pika

    u = urlsplit(settings.url)
    tls = u.scheme == "amqps"
    password = unquote(u.password) if u.password is not None else None
    if settings.password_file:
        # An empty file (as packaged) means no password of its own.
        password = config.read_secret(settings.password_file, "[broker] password_file") or password
    vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
    ssl_options = None
    if tls:
        ctx = ssl.create_default_context(cafile=settings.ca or None)
        if settings.cert:
            ctx.load_cert_chain(settings.cert, settings.key or None)
        ssl_options = pika.SSLOptions(ctx, server_hostname=u.hostname)
    if settings.cert and not password:
        credentials = pika.credentials.ExternalCredentials()
    else:
        credentials = pika.PlainCredentials(unquote(u.username or "guest"),
                                            password if password is not None else "guest")
    return pika.ConnectionParameters(
        host=u.hostname, port=u.port or (5671 if tls else 5672), virtual_host=vhost,
        credentials=credentials, ssl_options=ssl_options, heartbeat=settings.heartbeat,
        blocked_connection_timeout=settings.timeout, socket_timeout=settings.timeout,
        stack_timeout=settings.timeout, connection_attempts=1,
        client_properties={"connection_name": "psprobe"},
    )


def _root_cause(e: BaseException) -> str:
    """pika wraps a refused socket three deep; dig out the words that say what happened."""
    for _ in range(6):
        inner = getattr(e, "exception", None)
        if inner is None and getattr(e, "exceptions", None):
            inner = e.exceptions[-1]
        if inner is None and e.args and isinstance(e.args[0], BaseException):
            inner = e.args[0]
        if inner is None:
            break
        e = inner
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.replace("\n", " ")[:200]
