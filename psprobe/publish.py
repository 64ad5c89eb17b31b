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
each wait for confirms, and closing.  pika's loop runs only while the outlet
waits, under a deadline of its own; when it passes, the connection's socket is
shut down and pika ends the connection as it ends any lost one.  Only pika's
public asynchronous API is used (``SelectConnection`` on a loop of our own), so
a pika update cannot change the window or the deadlines without failing loudly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
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
    """A published message awaiting the broker's confirm."""

    tag: int  # the channel's delivery tag
    message_id: str
    routing_key: str
    confirmed: Callable[[], None]


# Returned messages whose confirmed() is held back, waiting for a routed one, are
# at most this many windows (each holds its message): past it, nothing is routed.
HELD_WINDOWS, HELD_MIN = 8, 256


class BrokerOutlet:
    """One AMQP connection and confirming channel for a whole run, on pika's public
    asynchronous API: a ``SelectConnection`` on an I/O loop of our own, run only while
    the outlet waits.

    Why not ``BlockingConnection``: its channel waits for each confirm before the
    next publish (no window), and it has no way to abort a connection whose broker
    froze.  Here pika's callbacks only record what the broker said and stop the
    loop once the wait is over; the checkpoint callbacks run afterwards, outside it.

    A deadline that passes shuts the connection's socket down (``shutdown(2)`` on a
    duplicate of the descriptor, as fetch.py's watchdog does for HTTP): pika then
    reads end-of-file and tears the connection down itself, through the same close
    callbacks as any lost connection.  The descriptor is the one pika registers
    with the loop (``add_handler``), which is how this loop knows it.
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
        self._acked_upto = 0  # every tag up to this one is acked
        self._acked: set[int] = set()  # single acks above it, not yet contiguous
        self._refused: float = float("inf")  # the first tag the broker nacked: nothing from it on moves
        self._returned: dict[str, int] = {}  # message id -> returns not yet matched to an ack
        self._held: list[Callable[[], None]] = []  # confirmed() of returned messages, in order
        self._routed = False  # a message that reached a queue was confirmed
        self._known = routed_keys  # keys that reached a queue in earlier runs
        self.routed_keys: set[str] = set()  # keys that reached a queue in this run
        self._failed: Exception | str | None = None  # a nack, a deadline, or why it closed
        self._blocked = False  # Connection.Blocked (a resource alarm) until Unblocked
        self._broken = False  # the broker let a deadline pass: no polite close
        self._gone = False  # pika reported the connection closed
        # the wait under way: stop the loop once done() holds; news = the last confirm
        self._done: Callable[[], bool] | None = None
        self._what = ""
        self._news = 0.0
        self._timer = None
        self._workflow = None  # pika's connection workflow, until it reports
        self.conn = None
        self.channel = None
        try:
            params = connection_parameters(settings)
        except OSError as e:  # ssl.SSLError too
            # A bad [broker] ca/cert/key is the operator's configuration, not the broker
            # (an OSError here would otherwise pass for a state directory problem).
            raise config.ConfigError(
                f"[broker] ca/cert/key: cannot load: {getattr(e, 'reason', None) or e.strerror or e}"
            ) from None
        self._loop = _loop_type()()
        try:
            self._connect(params)
            self._setup()
        except BrokerError:
            self.close()
            raise
        except Exception as e:  # from inside pika's loop: one line all the same
            self.close()
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        except BaseException:
            self.close()
            raise

    def _connect(self, params) -> None:
        """TCP, TLS and the AMQP handshake, each bounded by pika's own timers
        (``socket_timeout``, ``stack_timeout``: ``[broker] timeout``)."""
        result: list = []

        def on_done(conn_or_error) -> None:
            result.append(conn_or_error)
            self._workflow = None
            self._poke()

        self._workflow = self._pika.SelectConnection.create_connection(
            [params], on_done, custom_ioloop=self._loop)
        self._spin(lambda: bool(result), "connection")
        if not result:  # the name lookup hung (_give_up): wait for the abort's report
            self._spin(lambda: bool(result), "connection")
        r = result[0] if result else None
        if not isinstance(r, self._pika.SelectConnection):
            why = self._failed if isinstance(self._failed, str) else self._reason(_reap(r))
            raise BrokerError(f"broker {self.where}: {why}")
        self.conn = r
        r.add_on_close_callback(self._on_conn_close)
        # Known at once, inside a wait that overruns: _late() then says why.
        r.add_on_connection_blocked_callback(lambda *_: self._set_blocked(True))
        r.add_on_connection_unblocked_callback(lambda *_: self._set_blocked(False))

    def _setup(self) -> None:
        """Channel, exchange (declared or checked), confirm mode: pipelined, one wait."""
        settings = self.settings
        selected: list[bool] = []

        def on_open(ch) -> None:
            self.channel = ch
            ch.add_on_close_callback(self._on_close)
            ch.add_on_return_callback(self._on_return)
            if settings.declare_exchange:
                ch.exchange_declare(settings.exchange, exchange_type="topic", durable=True)
            else:
                ch.exchange_declare(settings.exchange, passive=True)
            ch.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_selected)

        def on_selected(_frame) -> None:
            selected.append(True)
            self._poke()

        self.conn.channel(on_open_callback=on_open)
        self._wait(lambda: bool(selected),
                   "answer to channel.open, exchange.declare and confirm.select")
        self.props = self._pika.BasicProperties(delivery_mode=2, content_type="application/json")

    # pika's callbacks: record what the broker said, then let the wait check if it is over

    def _on_confirm(self, frame) -> None:
        m = frame.method
        tag = m.delivery_tag
        if isinstance(m, self._pika.spec.Basic.Nack):
            # "multiple": every tag not yet settled up to this one
            self._refused = min(self._refused, self._acked_upto + 1 if m.multiple else tag)
            self._failed = self._failed or "the broker refused (nack) a message"
        elif m.multiple:
            if tag > self._acked_upto:
                self._acked_upto = tag
                if self._acked:
                    self._acked = {t for t in self._acked if t > tag}
        else:
            self._acked.add(tag)
        while self._acked_upto + 1 in self._acked:
            self._acked_upto += 1
            self._acked.discard(self._acked_upto)
        self._news = time.monotonic()
        self._poke()

    def _on_return(self, _channel, _method, props, _body) -> None:
        # The broker sends Basic.Return before the ack of the same message, and
        # both in publish order: the oldest unacked message with this id is it.
        self._returned[props.message_id] = self._returned.get(props.message_id, 0) + 1

    def _on_close(self, _channel, reason: Exception) -> None:
        self._failed = self._failed or reason
        self._poke()

    def _on_conn_close(self, _conn, reason: Exception) -> None:
        self._gone = True
        self._failed = self._failed or reason
        self._poke()

    def _set_blocked(self, blocked: bool) -> None:
        self._blocked = blocked

    # waits: pika's loop runs only here, each wait bounded by [broker] timeout

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        """Run the loop until ``cond()`` or a failure; hand out what was confirmed, then
        raise if the broker failed us meanwhile."""
        self._spin(lambda: self._failed is not None or cond(), what)
        self._hand_out()

    def _spin(self, done: Callable[[], bool], what: str) -> None:
        """Run pika's I/O loop until ``done()``.

        ``[broker] timeout`` after the start or the last confirm (``no <what>
        within``), the socket is shut down and the wait ends; so a frozen broker
        costs one timeout, whatever the heartbeat, and pika's own waits (the
        socket draining, Connection.CloseOk) end with it.
        """
        if done():
            return
        loop = self._loop
        self._done, self._what, self._news = done, what, time.monotonic()
        self._timer = loop.call_later(self.settings.timeout, self._expire)
        try:
            loop.start()  # until _poke or _give_up stops it
        finally:
            self._done = None
            loop.remove_timeout(self._timer)

    def _poke(self) -> None:
        """From pika's callbacks: the wait is over once its condition holds."""
        if self._done is not None and self._done():
            self._done = None
            self._loop.stop()

    def _expire(self) -> None:
        now = time.monotonic()
        if self._workflow is not None:  # connecting: pika's timers bound each socket it opens
            self._news = now if self._loop.fds else max(self._news, self._loop.quiet)
        left = self._news + self.settings.timeout - now
        if left > 1e-3:
            self._timer = self._loop.call_later(left, self._expire)
            return
        self._give_up()

    def _give_up(self) -> None:
        """A deadline passed: end the wait, and the connection with it."""
        t = self.settings.timeout
        if self._workflow is not None:  # no socket for a timeout: the name lookup hangs
            host = urlsplit(self.settings.url).hostname
            self._failed = self._failed or f"cannot connect (looking up {host} took over {t:g}s)"
            with contextlib.suppress(Exception):  # reports through on_done, aborted
                self._workflow.abort()
        else:
            self._failed = self._failed or self._late(self._what)
            self._broken = True
            self._cut()
        self._done = None
        self._loop.stop()

    def _cut(self) -> None:
        """Shut the connection's socket down: pika reads EOF and closes the connection."""
        for fd in list(self._loop.fds):
            _shutdown(fd)

    def _late(self, what: str) -> str:
        if self._blocked:  # pika's blocked_connection_timeout is the same: be first
            return (f"connection blocked by the broker (resource alarm) for over "
                    f"{self.settings.timeout:g}s")
        return f"no {what} within {self.settings.timeout:g}s"

    def _raise_failed(self) -> None:
        f = self._failed
        if f is not None:
            raise BrokerError(f"broker {self.where}: {f if isinstance(f, str) else self._reason(f)}")

    # the outlet

    def send(self, msg: Message, confirmed: Callable[[], None]) -> None:
        self._raise_failed()
        props = self.props
        props.message_id = msg.message_id
        try:  # only buffered: pika writes when its loop runs (in a wait)
            self.channel.basic_publish(self.settings.exchange, msg.routing_key, msg.body,
                                       properties=props, mandatory=True)
        except Exception as e:
            raise BrokerError(f"broker {self.where}: {self._reason(e)}") from None
        self._tag += 1
        self._sent.append(_Sent(self._tag, msg.message_id, msg.routing_key, confirmed))
        if len(self._sent) >= self.window:  # a full window: out it goes, then wait for half
            half = self.window // 2
            self._wait(lambda: self._tag - self._acked_upto <= half, "confirm")

    def flush(self) -> None:
        if self._sent:
            self._wait(lambda: self._acked_upto >= self._tag, "confirm")
        if self._held:  # every message so far came back: wrong exchange, or nothing bound
            raise BrokerError(self._nothing_routed(f"all {len(self._held)} message(s) of this run "
                                                   "were"))

    def _hand_out(self) -> None:
        """Run the confirmed() of the acked messages at the head, in publish order."""
        while self._sent:
            head = self._sent[0]
            if head.tag > self._acked_upto or head.tag >= self._refused:
                break
            if self._returned.get(head.message_id):
                self._unroutable(head)
            else:
                self._sent.popleft()
                self._routed = True
                self.routed_keys.add(head.routing_key)
                held, self._held = self._held, []
                for f in held:  # a message reached a queue: those returned before it count
                    f()
                head.confirmed()
        self._raise_failed()

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
        """Close within ``[broker] timeout``; at once if the broker stopped answering.

        Never raises: the run's own error, if any, is the one to report.
        """
        loop, conn = self._loop, self.conn
        if loop is None:
            return
        try:
            if conn is not None and not self._gone:
                if not self._broken and conn.is_open:
                    try:
                        conn.close()
                    except Exception as e:
                        log.debug("closing broker connection: %s", e)
                    else:
                        self._spin(lambda: self._gone, "answer to connection.close")
                if not self._gone:  # frozen: pika's teardown needs one more turn, or a cut
                    self._cut()
                    self._spin(lambda: self._gone, "end of the connection")
        except Exception as e:
            log.debug("closing broker connection: %s", e)
        finally:
            self._loop = None
            loop.close()

    def _reason(self, e: BaseException) -> str:
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
        if isinstance(e, ex.AMQPHeartbeatTimeout):
            return "connection lost (no heartbeat from the broker)"
        if isinstance(e, (ex.StreamLostError, ex.ConnectionWrongStateError,
                          ex.ChannelWrongStateError)):
            return "connection lost"
        if isinstance(e, ex.IncompatibleProtocolError):
            return ("cannot connect (the server closed the connection during the AMQP "
                    "handshake: is it an AMQP 0-9-1 broker?)")
        return _connect_failure(e, self.settings.timeout)


@functools.cache
def _loop_type() -> type:
    """pika's own I/O loop, which also keeps the descriptors pika registers with it.

    ``custom_ioloop`` and the loop's ``add_handler``/``remove_handler`` are pika's
    public interface for bringing a loop of one's own (``AbstractSelectorIOLoop``):
    every socket the connection opens is registered and unregistered there,
    before pika closes it, so ``fds`` holds only live sockets of this connection.
    """
    from pika.adapters.select_connection import IOLoop

    class Loop(IOLoop):
        def __init__(self) -> None:
            super().__init__()
            self.fds: set[int] = set()
            self.quiet = time.monotonic()  # since when no descriptor is registered

        def add_handler(self, fd, handler, events) -> None:
            super().add_handler(fd, handler, events)
            self.fds.add(fd)

        def remove_handler(self, fd) -> None:
            super().remove_handler(fd)
            self.fds.discard(fd)
            if not self.fds:
                self.quiet = time.monotonic()

    return Loop


def _shutdown(fd: int) -> None:
    """``shutdown(SHUT_RDWR)`` through a duplicate of ``fd``: pika's own socket stays its to close."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    with contextlib.suppress(OSError), s:
        s.shutdown(socket.SHUT_RDWR)


def _reap(error: BaseException | None) -> BaseException:
    """The error of the last connection attempt, as BlockingConnection reports it."""
    import pika
    from pika.adapters.utils import connection_workflow as cw

    if isinstance(error, cw.AMQPConnectionWorkflowFailed):
        error = error.exceptions[-1]
        if isinstance(error, cw.AMQPConnectorSocketConnectError):
            return pika.exceptions.AMQPConnectionError(error)
        if isinstance(error, cw.AMQPConnectorPhaseErrorBase):
            return error.exception
    return error if error is not None else ConnectionError("no connection")


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
        import ssl

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
    import ssl  # loaded by pika already

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
