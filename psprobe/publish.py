"""Outlets for messages: the broker (confirmed), or standard output for --dry-run.

An outlet has ``send(message, confirmed)``, ``flush()``, ``close()`` and
``unroutable`` (routing key -> messages the broker returned unroutable).
``confirmed()`` is called once the message is safe, in the order the messages
were sent (of one routing key, hence of one series; returned ones held back, see
below, come later): for the broker that means the broker confirmed it (publisher
confirms).  Only then may the caller move a checkpoint.  ``flush`` returns once
every message sent is confirmed.

Messages are published ``mandatory``: one no queue is bound for comes back.
By default (``[broker] unroutable = warn``) that is the downstream's choice, not
a fault: a consumer that binds 5 of the 13 event types gets those, the others
are counted per routing key, warned about once per key and run, and dropped
(their checkpoints move).  A run in which nothing at all was routed still fails
(a wrong exchange, or no binding at all), and moves no checkpoint: until a
routed message is confirmed, the ``confirmed()`` of returned ones are held back.
A key the host knows as never routed (``routed_keys``: keys that did reach a
queue before, so the exchange and its bindings were right) is not held: a run
whose new points are all of unbound types is not an error.
With ``unroutable = fail`` the first returned message stops the run.

The broker outlet keeps up to ``[broker] confirm_window`` messages published
and not yet confirmed, so a run costs a broker round trip per window, not per
message; a run that dies resends at most that many.

Every wait on the broker ends within ``[broker] timeout``, whatever the
heartbeat: connecting (pika's socket and stack timeouts), opening the channel,
each wait for confirms, and closing.  pika's BlockingConnection would otherwise
wait without limit for a broker that froze with the TCP connection up (its
``close()`` waits for Connection.CloseOk; its I/O loop for the socket to drain).
At the deadline the connection is aborted, as pika's own heartbeat check does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
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
        self.unroutable: dict[str, int] = {}  # nothing is routed, so nothing comes back

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
    routing_key: str
    confirmed: Callable[[], None]


class _NoAnswer(Exception):
    """Why this side aborted the connection: the broker let a deadline pass."""


# Returned messages whose confirmed() is held back, waiting for a routed one, are
# at most this many windows (each holds its message): past it, nothing is routed.
HELD_WINDOWS, HELD_MIN = 8, 256


class BrokerOutlet:
    """One AMQP connection and confirming channel for a whole run.

    pika's BlockingChannel waits for each confirm before the next publish; its
    asynchronous channel underneath (``_impl``, there since pika 0.10) takes
    confirms as they come, which is what a window needs.  Its callbacks only
    record what the broker said; the checkpoint callbacks run afterwards, here.

    pika's private names relied on (the same from 1.0 to 1.4): ``_impl`` (the
    asynchronous connection and channel under the blocking ones) and
    ``Connection._terminate_stream``, which aborts the connection and is what
    pika's own heartbeat check calls when the broker stops answering.
    """

    def __init__(self, settings: config.Broker, routed_keys: frozenset[str] = frozenset()) -> None:
        import pika  # imported here: --help and dry runs need not pay for it

        self._pika = pika
        self.settings = settings
        self.where = config.redact_url(settings.url)
        self.window = settings.confirm_window
        self.unroutable: dict[str, int] = {}  # routing key -> messages returned unroutable
        self._sent: deque[_Sent] = deque()
        self._tag = 0  # delivery tags count from 1 on a channel in confirm mode
        self._acked_upto = 0  # every tag up to this one is acked ("multiple" acks)
        self._acked: set[int] = set()  # single acks above it
        self._returned: dict[str, int] = {}  # message id -> returns not yet matched to a confirm
        self._held: list[Callable[[], None]] = []  # confirmed() of returned messages, in order
        self._routed = False  # a message that reached a queue was confirmed
        self._known = routed_keys  # keys that reached a queue in earlier runs
        self.routed_keys: set[str] = set()  # keys that reached a queue in this run
        self._failed: Exception | str | None = None  # a nack, or why the channel closed
        self._waiting = False  # in _wait: pika's callbacks must wake it
        self._blocked = False  # Connection.Blocked (a resource alarm) until Unblocked
        self._broken = False  # the broker let a deadline pass: no polite close
        self.conn = None
        try:
            params = connection_parameters(settings)
        except (ssl.SSLError, OSError) as e:
            # A bad [broker] ca/cert/key is the operator's configuration, not the broker
            # (an OSError here would otherwise pass for a state directory problem).
            raise config.ConfigError(
                f"[broker] ca/cert/key: cannot load: {getattr(e, 'reason', None) or e.strerror or e}"
            ) from None
        try:  # bounded by socket_timeout and stack_timeout
            self.conn = pika.BlockingConnection(params)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        settings, pika = self.settings, self._pika
        try:
            with self._bounded(time.monotonic() + settings.timeout,
                               "answer to channel.open and exchange.declare"):
                self.channel = self.conn.channel()
                if settings.declare_exchange:
                    self.channel.exchange_declare(settings.exchange, exchange_type="topic",
                                                  durable=True)
                else:
                    self.channel.exchange_declare(settings.exchange, passive=True)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        self.props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        # On the connection underneath: known at once, even inside a wait that overruns
        # (BlockingConnection hands its own callbacks out only after the wait).
        self.conn._impl.add_on_connection_blocked_callback(lambda *_: self._set_blocked(True))
        self.conn._impl.add_on_connection_unblocked_callback(lambda *_: self._set_blocked(False))
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
        # The broker sends Basic.Return before the ack of the same message, and
        # both in publish order: the oldest unacked message with this id is it.
        self._returned[props.message_id] = self._returned.get(props.message_id, 0) + 1
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

    # deadlines: pika's blocking calls have none of their own

    @contextlib.contextmanager
    def _bounded(self, deadline: float, what: str) -> Iterator[None]:
        """Abort the connection if the block's pika calls are still waiting at ``deadline``.

        A timer in pika's own I/O loop: it fires inside any of its waits
        (process_data_events waiting for the socket to drain, close waiting for
        CloseOk), and the wait then ends with the ``_NoAnswer`` it was aborted with.
        """
        impl = self.conn._impl
        if impl.is_closed:  # nothing will wait: every call fails at once
            yield
            return
        loop = impl.ioloop
        timer = loop.call_later(max(0.0, deadline - time.monotonic()),
                                lambda: self._abort(self._late(what)))
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # gone with a closed connection's loop
                loop.remove_timeout(timer)

    def _late(self, what: str) -> str:
        if self._blocked:  # pika's blocked_connection_timeout is the same: be first
            return (f"connection blocked by the broker (resource alarm) for over "
                    f"{self.settings.timeout:g}s")
        return f"no {what} within {self.settings.timeout:g}s"

    def _abort(self, why: str) -> None:
        """Drop the connection now, without the AMQP goodbye a frozen broker never answers."""
        self._broken = True
        impl = self.conn._impl
        if not impl.is_closed:
            with contextlib.suppress(Exception):
                impl._terminate_stream(_NoAnswer(why))

    # the outlet

    def send(self, msg: Message, confirmed: Callable[[], None]) -> None:
        props = self.props
        props.message_id = msg.message_id
        try:  # only buffered: pika writes when its I/O loop runs (in _wait)
            self.channel._impl.basic_publish(self.settings.exchange, msg.routing_key, msg.body,
                                             properties=props, mandatory=True)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        self._tag += 1
        self._sent.append(_Sent(self._tag, msg.message_id, msg.routing_key, confirmed))
        if len(self._sent) >= self.window:  # a full window: out it goes, then wait for half
            while len(self._sent) > self.window // 2:
                self._progress()

    def flush(self) -> None:
        while self._sent:
            self._progress()
        if self._held:  # every message so far came back: wrong exchange, or nothing bound
            raise BrokerError(self._nothing_routed(f"all {len(self._held)} message(s) of this run "
                                                   "were"))

    def _progress(self) -> None:
        """Wait until at least one more message is confirmed (or fail)."""
        n = len(self._sent)
        self._wait(lambda: len(self._sent) < n, "confirm")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.settings.timeout
        with self._bounded(deadline, what):
            self._io(0)
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._broken = True
                    raise BrokerError(f"broker {self.where}: {self._late(what)}")
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
            if self._returned.get(head.message_id):
                self._unroutable(head)
            else:
                self._sent.popleft()
                self._acked.discard(head.tag)
                self._routed = True
                self.routed_keys.add(head.routing_key)
                held, self._held = self._held, []
                for f in held:  # a message reached a queue: those returned before it count
                    f()
                head.confirmed()
        if self._failed is not None:
            f = self._failed
            raise BrokerError(f"broker {self.where}: {f if isinstance(f, str) else self._reason(f)}")

    def _unroutable(self, head: _Sent) -> None:
        """``head`` was acked after a Basic.Return: count it, then drop it, hold it or fail."""
        key, x = head.routing_key, self.settings.exchange
        first = key not in self.unroutable
        self.unroutable[key] = self.unroutable.get(key, 0) + 1
        if self.settings.unroutable == "fail":  # it stays first in line: nothing after moves
            raise BrokerError(f"broker {self.where}: a message with routing key {key!r} was "
                              f"returned unroutable by exchange {x!r}: no queue is bound for "
                              "that key ([broker] unroutable = fail)")
        self._sent.popleft()
        self._acked.discard(head.tag)
        self._returned[head.message_id] -= 1
        if first:
            log.warning("broker %s: message(s) with routing key %r returned unroutable by "
                        "exchange %r: no queue is bound for that key; they are dropped "
                        "(set [broker] unroutable = fail to stop instead)", self.where, key, x)
        if self._routed or (self._known and key not in self._known):
            head.confirmed()  # routed this run, or a key this host never got routed
            return
        self._held.append(head.confirmed)
        if len(self._held) >= max(HELD_WINDOWS * self.window, HELD_MIN):
            raise BrokerError(self._nothing_routed(f"the first {len(self._held)} message(s) of "
                                                   "this run were all"))

    def _nothing_routed(self, which: str) -> str:
        keys = sorted(self.unroutable)
        named = ", ".join(map(repr, keys[:4])) + (f" and {len(keys) - 4} more" if len(keys) > 4
                                                   else "")
        return (f"broker {self.where}: {which} returned unroutable by exchange "
                f"{self.settings.exchange!r} (no queue is bound for {named}): nothing was "
                "delivered; check the exchange and its bindings")

    def close(self) -> None:
        """Close within ``[broker] timeout``; abort at once if the broker stopped answering."""
        conn = self.conn
        if conn is None or conn.is_closed:
            return
        try:
            if self._broken or not conn.is_open:
                self._abort("closing")
            else:
                with self._bounded(time.monotonic() + self.settings.timeout,
                                   "answer to connection.close"):
                    conn.close()
        except Exception as e:
            log.debug("closing broker connection: %s", e)
        if not conn.is_closed:
            self._abort("closing")
            # One turn of pika's loop delivers the abort: the socket is closed, and
            # the wait ends at once (it raises why the connection ended).
            with contextlib.suppress(Exception):
                conn.process_data_events(0)

    def _reason(self, e: BaseException) -> str:
        ex = self._pika.exceptions
        x = self.settings.exchange
        if isinstance(e, _NoAnswer):
            return str(e)
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
        if isinstance(e, ex.AMQPHeartbeatTimeout):
            return "connection lost (no heartbeat from the broker)"
        if isinstance(e, (ex.StreamLostError, ex.ConnectionWrongStateError)):
            return "connection lost"
        if isinstance(e, ex.IncompatibleProtocolError):
            return ("cannot connect (the server closed the connection during the AMQP "
                    "handshake: is it an AMQP 0-9-1 broker?)")
        return _connect_failure(e, self.settings.timeout)


class LazyBrokerOutlet:
    """The broker outlet, connected at the first message.

    Most runs of a 10-minute timer find little or nothing new: those cost no
    pika import and no AMQP handshake.  The secrets file is still checked at
    once, so a bad one fails every run, not only runs with data.
    """

    def __init__(self, settings: config.Broker, routed_keys: frozenset[str] = frozenset()) -> None:
        if settings.password_file:
            config.read_secret(settings.password_file, "[broker] password_file")
        self.settings = settings
        self.known = routed_keys
        self.outlet: BrokerOutlet | None = None

    @property
    def routed_keys(self) -> set[str]:
        """Routing keys that reached a queue in this run."""
        return self.outlet.routed_keys if self.outlet is not None else set()

    @property
    def unroutable(self) -> dict[str, int]:
        """Routing key -> messages returned unroutable in this run (empty if never connected)."""
        return self.outlet.unroutable if self.outlet is not None else {}

    def send(self, msg: Message, confirmed: Callable[[], None]) -> None:
        if self.outlet is None:
            self.outlet = BrokerOutlet(self.settings, self.known)
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


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it wraps: pika wraps a failed connect up to three deep."""
    for _ in range(8):
        yield e
        inner = getattr(e, "exception", None)
        if inner is None and getattr(e, "exceptions", None):
            inner = e.exceptions[-1]
        if inner is None and e.args and isinstance(e.args[0], BaseException):
            inner = e.args[0]
        if not isinstance(inner, BaseException):
            return
        e = inner


def _connect_failure(e: BaseException, timeout: float) -> str:
    """One plain sentence for a failed connection (pika's own texts are reprs)."""
    import pika
    from pika.adapters.utils import connection_workflow as cw

    chain = list(_causes(e))
    root = chain[-1]
    tcp = any(isinstance(c, cw.AMQPConnectorSocketConnectError) for c in chain)
    if isinstance(root, (socket.timeout, TimeoutError)) or (
            tcp and isinstance(root, cw.AMQPConnectorStackTimeout)):
        return f"cannot connect (no answer within {timeout:g}s)"
    if isinstance(root, cw.AMQPConnectorStackTimeout):
        if any(isinstance(c, cw.AMQPConnectorTransportSetupError) for c in chain) \
                or "transport" in str(root):
            return f"no answer to the TLS handshake within {timeout:g}s"
        return f"no answer to the AMQP handshake within {timeout:g}s"
    if isinstance(root, ssl.SSLError):
        why = getattr(root, "verify_message", None) or re.sub(
            r"^\[[^]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", root.strerror or str(root))
        return f"TLS failed: {why or root.reason}"
    if isinstance(root, OSError) and root.strerror:
        return f"cannot connect ({root.strerror})"
    if isinstance(e, (OSError, pika.exceptions.AMQPConnectionError, cw.AMQPConnectorException)):
        return f"cannot connect ({_text(root)})"
    return _text(root)


def _text(e: BaseException) -> str:
    return (str(e) or type(e).__name__).replace("\n", " ")[:200]
