"""GETs to one archive origin over keep-alive connections, on the standard library alone.

A far host's run is hundreds of small GETs, so the client's own CPU per
request is most of a run's CPU: measured per small GET on loopback, requests
0.83 ms, urllib3 0.46 ms, ``http.client`` 0.17 ms, which also needs no import
beyond what Python has.  What urllib3 added and a collector needs is
here: a pool of at most ``size`` connections per origin, one TLS context per
run, proxies from the environment, dead keep-alive connections replaced, gzip,
and failures sorted by what the caller can do about them.

A socket timeout restarts at every byte, so a server that answers at one byte
per second would hold a GET for hours.  Each GET therefore has a deadline for
the whole exchange (connect, proxy tunnel, TLS handshake, request, status
line, headers, body): one watchdog thread per process shuts the socket down
when it passes, the blocked read returns, and the GET raises :class:`TooSlow`.
"""

from __future__ import annotations

import base64
import heapq
import http.client
import itertools
import os
import select
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

HEADERS = {"User-Agent": "psprobe", "Accept": "application/json",
           "Accept-Encoding": "gzip, deflate"}


class FetchError(Exception):
    """A GET failed; ``reason`` is a few words (the caller adds the URL)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(FetchError):
    """No connection, or it closed before an answer: the next scheme may work."""


class TLSFailed(ConnectFailed):
    """TLS handshake or verification failed."""


class TimedOut(FetchError):
    """The server accepted the request but did not answer in time."""


class Broken(FetchError):
    """The answer was cut short, undecodable or too slow as a whole."""


class TooLarge(FetchError):
    """The answer was larger than the caller allows."""


class TooSlow(Broken):
    """The answer as a whole took longer than the caller allows."""


@dataclass
class Answer:
    status: int
    body: bytes


class _Watch:
    """One GET's deadline, and a duplicate of its socket's descriptor while it is armed."""

    __slots__ = ("deadline", "done", "fd", "fired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fd = -1  # our own dup: nobody else can close it, so its number is never reused
        self.fired = False  # the watchdog shut the socket down: the GET was too slow
        self.done = False  # disarmed


class _Watchdog:
    """Shuts down the socket of every armed GET whose deadline passed.

    One thread per process, started at the first GET and asleep until the
    earliest deadline.  Arming is a dup and a heap push, and wakes the thread
    only when the new deadline is earlier than the one it sleeps until, which a
    run's GETs (each ``now + 4 * timeout``) almost never are: a run of hundreds
    of GETs wakes it about once per deadline period.  Disarmed entries stay in
    the heap until the thread next wakes and drops them.

    The armed descriptor is a duplicate, closed only by :meth:`disarm` under the
    lock the thread shuts sockets down under: whatever http.client closes, and
    whoever opens a socket next, the thread never touches a descriptor that is
    not the GET's own.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._wake_at = float("inf")  # when the thread wakes next (inf: when told)
        self._thread: threading.Thread | None = None

    def arm(self, w: _Watch, sock: socket.socket) -> None:
        fd = os.dup(sock.fileno())
        with self._cv:
            if w.fd >= 0:  # armed again (a new connection for the same GET)
                os.close(w.fd)
            w.fd, w.done = fd, False
            heapq.heappush(self._heap, (w.deadline, next(self._seq), w))
            if w.deadline < self._wake_at:
                self._wake_at = w.deadline
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="fetch-watchdog",
                                                    daemon=True)
                    self._thread.start()
                else:
                    self._cv.notify()

    def disarm(self, w: _Watch) -> bool:
        """Stop watching (idempotent); True if the deadline passed and the socket was shut."""
        with self._cv:
            if w.fd >= 0:
                os.close(w.fd)
                w.fd = -1
            w.done = True
            return w.fired

    def _run(self) -> None:
        heap = self._heap
        with self._cv:
            while True:
                now = time.monotonic()
                if heap and heap[0][0] <= now:
                    # Due: shut what is still armed, and drop every disarmed entry from
                    # the top, so the next sleep lasts until a GET in flight is due.
                    while heap and (heap[0][2].done or heap[0][0] <= now):
                        w = heapq.heappop(heap)[2]
                        if not w.done and w.fd >= 0 and not w.fired:
                            w.fired = True
                            _shutdown(w.fd)
                # Woken early (an earlier deadline was armed), or sleeping on: until the
                # top's deadline, even if that entry is disarmed, so that arms with later
                # deadlines, in the meantime, need not wake the thread.
                self._wake_at = heap[0][0] if heap else float("inf")
                self._cv.wait(self._wake_at - now if heap else None)

    def _after_fork(self) -> None:
        """The child has no watchdog thread (and no GET in flight): start afresh."""
        self.__init__()


def _shutdown(fd: int) -> None:
    """``shutdown(SHUT_RDWR)`` on a descriptor: a read blocked on its socket returns at once."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected any more
        pass
    finally:
        s.detach()


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._after_fork)


def tls_context(verify: bool | str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """One context for a run's connections: ``verify`` True (system CAs), False, or a CA
    file or directory.  Raises OSError / ssl.SSLError for unusable files."""
    path = verify if isinstance(verify, str) else None
    ctx = ssl.create_default_context(
        cafile=path if path and not os.path.isdir(path) else None,
        capath=path if path and os.path.isdir(path) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


class Pool:
    """Keep-alive connections to one origin (``scheme://host:port``), at most ``size`` idle.

    Thread-safe: each GET takes an idle connection or opens one, and gives it
    back only when its answer was read to the end.
    """

    def __init__(self, origin: str, size: int, timeout: float,
                 context: ssl.SSLContext | None = None, proxy: str = "") -> None:
        u = urlsplit(origin)
        self.origin, self.https = origin, u.scheme == "https"
        self.host, self.port = u.hostname or "", u.port or (443 if self.https else 80)
        self.size, self.timeout, self.context, self.proxy = size, timeout, context, proxy
        self._via: tuple[str, int] | None = None
        self._proxy_headers: dict[str, str] = {}
        if proxy:
            p = urlsplit(proxy)
            self._via = (p.hostname or "", p.port or (443 if p.scheme == "https" else 80))
            if p.username is not None:
                cred = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
                self._proxy_headers = {
                    "Proxy-Authorization": "Basic " + base64.b64encode(cred).decode()}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        # The first connection's TLS session, resumed by the others: one full handshake
        # (certificate checks, key exchange) per run, however many connections.
        self.session: ssl.SSLSession | None = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def get(self, target: str, limit: int, deadline: float) -> Answer:
        """GET ``target`` (path and query); the body is at most ``limit`` bytes, decoded.

        The whole exchange, from connecting to the last byte, ends by ``deadline``
        (a :func:`time.monotonic` value), or the GET raises :class:`TooSlow`.
        """
        w = _Watch(deadline)
        conn = None
        try:
            conn = self._take(w)
            r = self._send(conn, target)
            body = self._read(r, limit, deadline)
        except BaseException as e:
            fired = _WATCHDOG.disarm(w)  # before the close: the descriptor is still ours
            if conn is not None:
                conn.close()
            if fired and isinstance(e, Exception):
                raise TooSlow("too slow") from None
            raise
        if _WATCHDOG.disarm(w):  # shut down at the deadline: the body may be cut short
            conn.close()
            raise TooSlow("too slow")
        if self.https and self.session is None:
            self._keep_session(conn)
        if r.will_close:
            conn.close()
        else:
            self._give(conn)
        return Answer(r.status, body)

    def _keep_session(self, conn: http.client.HTTPConnection) -> None:
        """Keep a session worth resuming (TLS 1.3 sends its ticket after the handshake)."""
        session = getattr(conn.sock, "session", None)
        if session is not None and (session.has_ticket or session.id):
            with self._lock:
                self.session = self.session or session

    # --- connections

    def _take(self, w: _Watch) -> http.client.HTTPConnection:
        """An idle connection or a new one, its socket watched by ``w`` from here on."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not _dropped(conn):
                    break
                conn.close()
            else:
                conn = None
        if conn is None:
            return self._open(w)
        conn._watch = w  # type: ignore[attr-defined]  # should http.client reconnect
        try:
            _WATCHDOG.arm(w, conn.sock)  # type: ignore[arg-type]
        except OSError as e:  # no descriptor left for the dup
            conn.close()
            raise ConnectFailed(_words(e)) from None
        return conn

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def _open(self, w: _Watch) -> http.client.HTTPConnection:
        """A new connection, watched by ``w`` from the end of the TCP connect on."""
        host, port = self._via or (self.host, self.port)
        if self.https:
            conn: http.client.HTTPConnection = _ResumingHTTPS(
                host, port, timeout=self.timeout, context=self.context, pool=self, watch=w)
            if self._via:
                conn.set_tunnel(self.host, self.port, headers=self._proxy_headers)
        else:
            conn = _Watched(host, port, timeout=self.timeout, watch=w)
        try:
            conn.connect()
        except BaseException as e:
            fired = _WATCHDOG.disarm(w)
            conn.close()
            if not isinstance(e, Exception):
                raise
            if fired or isinstance(e, TooSlow):
                raise TooSlow("too slow") from None
            if isinstance(e, (ssl.SSLError, ssl.CertificateError)):
                raise TLSFailed(_words(e)) from None
            if isinstance(e, OSError):  # refused, unreachable, DNS, connect timeout, proxy said no
                raise ConnectFailed(_words(e)) from None
            raise
        return conn

    # --- one exchange

    def _send(self, conn: http.client.HTTPConnection, target: str) -> http.client.HTTPResponse:
        headers = HEADERS
        if self._via and not self.https:  # a plain proxy takes the absolute URL
            target = self.origin + target
            headers = {**HEADERS, **self._proxy_headers}
        try:
            conn.request("GET", target, headers=headers)
            return conn.getresponse()
        except (ssl.SSLError, ssl.CertificateError) as e:  # e.g. TLS 1.3's late alerts
            raise TLSFailed(_words(e)) from None
        except (socket.timeout, TimeoutError):
            raise TimedOut(f"no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as e:  # reset, closed, not HTTP
            raise ConnectFailed(_words(e)) from None

    def _read(self, r: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
        enc = (r.getheader("Content-Encoding") or "").strip().lower()
        inflate = zlib.decompressobj(47) if enc in ("gzip", "deflate", "x-gzip") else None
        parts, size, raw = [], 0, 0
        try:
            while True:
                chunk = r.read(65536)
                if not chunk:
                    break
                raw += len(chunk)
                if inflate is not None:
                    chunk = inflate.decompress(chunk, limit + 1 - size)
                    if inflate.unconsumed_tail:
                        raise TooLarge("too large")
                size += len(chunk)
                if size > limit:
                    raise TooLarge("too large")
                if time.monotonic() > deadline:
                    raise TooSlow("too slow")
                parts.append(chunk)
        except (socket.timeout, TimeoutError):
            raise TimedOut(f"no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException, zlib.error) as e:  # cut, reset, bad gzip
            raise Broken(_words(e)) from None
        if r.length:  # EOF before Content-Length: http.client's read(n) does not say so
            raise Broken(repr(http.client.IncompleteRead(b"", r.length)).replace(
                "0 bytes read", f"{raw} bytes read"))
        return b"".join(parts)


class _Watched(http.client.HTTPConnection):
    """HTTPConnection whose new socket is armed on the watchdog before anything is sent.

    The TCP connect itself waits at most what is left before the deadline; the
    proxy's CONNECT and the TLS handshake that follow are under the watchdog.
    """

    def __init__(self, *args: Any, watch: _Watch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch = watch
        self._create_connection = self._connect_watched

    def _connect_watched(self, address: tuple[str, int], timeout: Any,
                         source_address: Any = None) -> socket.socket:
        w = self._watch
        left = w.deadline - time.monotonic()
        if left <= 0:
            raise TooSlow("too slow")
        capped = isinstance(timeout, (int, float)) and left < timeout
        try:
            sock = socket.create_connection(address, left if capped else timeout,
                                            source_address)
        except socket.timeout:
            if capped:
                raise TooSlow("too slow") from None
            raise
        if capped:
            sock.settimeout(timeout)  # back to the per-read timeout
        try:
            _WATCHDOG.arm(w, sock)
        except BaseException:
            sock.close()
            raise
        return sock


class _ResumingHTTPS(_Watched, http.client.HTTPSConnection):
    """HTTPSConnection whose handshake offers the pool's TLS session for resumption.

    http.client has no way to pass ``session=``; this is its ``connect`` with it.
    A server that declines simply does a full handshake.
    """

    def __init__(self, *args: Any, pool: Pool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = pool

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP, and the proxy's CONNECT tunnel
        host = self._tunnel_host or self.host
        self.sock = self._context.wrap_socket(self.sock, server_hostname=host,
                                              session=self._pool.session)


def proxy_for(url: str) -> str:
    """The proxy URL for ``url`` from $https_proxy / $http_proxy / $all_proxy and $no_proxy, or ""."""
    if not any(k.lower().endswith("_proxy") for k in os.environ):
        return ""  # the usual case: urllib.request is not even imported
    from urllib.request import getproxies, proxy_bypass

    u = urlsplit(url)
    proxies = getproxies()
    proxy = proxies.get(u.scheme) or proxies.get("all") or ""
    if proxy and proxy_bypass(u.hostname or ""):
        return ""
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    return proxy


def no_userinfo(url: str) -> str:
    """A proxy URL fit for a log line: no user name or password."""
    u = urlsplit(url)
    return u._replace(netloc=u.netloc.rpartition("@")[2]).geturl()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection the server closed (readable means EOF or junk)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _words(e: BaseException) -> str:
    """The exception's own words, for :func:`psprobe.archive._reason` to trim."""
    if isinstance(e, http.client.IncompleteRead):
        return repr(e)
    if isinstance(e, http.client.RemoteDisconnected):
        return "Remote end closed connection without response"
    return str(e) or type(e).__name__
