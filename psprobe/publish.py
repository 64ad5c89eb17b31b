"""Outlets for messages: the broker (confirmed), or standard output for --dry-run.

An outlet has two methods, ``send(message)`` and ``close()``.  ``send``
returns only once the message is safe: for the broker that means the broker
confirmed it (publisher confirms, ``mandatory`` so an unroutable message is an
error, not a silent drop).  Only then may the caller move a checkpoint.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

from psprobe import config
from psprobe.messages import Message

log = logging.getLogger("psprobe.publish")


class BrokerError(Exception):
    """The broker refused or lost us; one line, never with the password."""


class Outlet(Protocol):
    def send(self, msg: Message) -> None: ...

    def close(self) -> None: ...


class PrintOutlet:
    """``--dry-run``: one JSON line per message on stdout; nothing is confirmed or moved."""

    def __init__(self, settings: config.Broker, stream: IO[bytes]) -> None:
        self.exchange = json.dumps(settings.exchange).encode()
        self.stream = stream

    def send(self, msg: Message) -> None:
        self.stream.write(b'{"exchange":%s,"routing_key":%s,"message_id":"%s","body":%s}\n' % (
            self.exchange, json.dumps(msg.routing_key).encode(), msg.message_id.encode(), msg.body))

    def close(self) -> None:
        self.stream.flush()


class BrokerOutlet:
    """One AMQP connection and confirming channel for a whole run."""

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
            self.channel.confirm_delivery()
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        self.props = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def send(self, msg: Message) -> None:
        props = self.props
        props.message_id = msg.message_id
        try:
            self.channel.basic_publish(self.settings.exchange, msg.routing_key, msg.body,
                                       properties=props, mandatory=True)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None

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
        if isinstance(e, ex.UnroutableError):
            return f"message returned unroutable by exchange {x!r} (no queue bound for its key)"
        if isinstance(e, ex.NackError):
            return "the broker refused (nack) a message"
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

    def send(self, msg: Message) -> None:
        if self.outlet is None:
            self.outlet = BrokerOutlet(self.settings)
        self.outlet.send(msg)

    def close(self) -> None:
        if self.outlet is not None:
            self.outlet.close()


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
