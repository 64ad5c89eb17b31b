"""GETs to one archive origin over keep-alive connections, on the standard library alone.

A far host's run is hundreds of small GETs, so the client's own CPU per
request is most of a run's CPU: measured per small GET on loopback, requests
0.83 ms, urllib3 0.46 ms, ``http.client`` 0.17 ms.  Most runs, though, are one
GET that finds nothing new, 2 000 hosts every interval, and there the imports
are the cost: ``http.client`` loads the ``email`` package and ``ssl`` (together
about 30 ms of CPU, a fifth of such a run under systemd).  So the HTTP/1.1 this
client speaks (a GET, a CONNECT, status line, headers, Content-Length, chunked
or read to the close) is read here, on a socket, and ``ssl`` is loaded only
for an https origin.  What urllib3 added and a collector needs is here too: a
pool of at most ``size`` connections per origin, one TLS context per run,
proxies from the environment, dead keep-alive connections replaced, gzip, and
failures sorted by what the caller can do about them.

A socket timeout restarts at every byte, so a server that answers at one byte
per second would hold a GET for hours.  Each GET therefore has a deadline for
the whole exchange (connect, proxy tunnel, TLS handshake, request, status
line, headers, body): one watchdog thread per process shuts the socket down
when it passes, the blocked read returns, and the GET raises :class:`TooSlow`.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import ssl

HEADERS = {"User-Agent": "psprobe", "Accept": "application/json",
           "Accept-Encoding": "gzip, deflate"}
MAX_LINE = 65536  # status, header and chunk-size lines (http.client's own limits)
MAX_HEADERS = 100
READ = 65536


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
    """An HTTP answer read whole (within the size bound)."""

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
    lock the thread shuts sockets down under: whatever the pool closes, and
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
    import ssl  # here: a run against plain-HTTP archives never loads it (~15 ms of CPU)

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


class _Bad(Exception):
    """What came back is not an HTTP/1.x answer this client can read."""


class _Conn:
    """One keep-alive connection: its socket (TLS or not) and the bytes read ahead."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        """One line with its end (b"" or a partial line at EOF), at most MAX_LINE bytes."""
        buf = self.buf
        while True:
            i = buf.find(b"\n")
            if i >= 0:
                line = bytes(buf[:i + 1])
                del buf[:i + 1]
                return line
            if len(buf) > MAX_LINE:
                raise _Bad("header line too long")
            data = self.sock.recv(READ)
            if not data:
                line = bytes(buf)
                buf.clear()
                return line
            buf += data

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (b"" at EOF): what was read ahead first, then the socket."""
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return self.sock.recv(min(n, READ))

    def head(self) -> tuple[int, str, dict[str, str]]:
        """The status, version and headers (names lower-cased, repeats joined by ", ") of
        the next answer, 1xx answers skipped."""
        while True:
            line = self.readline()
            if not line:
                raise ConnectionAbortedError("Remote end closed connection without response")
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
                raise _Bad(f"not an HTTP answer: {line[:40]!r}")
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                line = self.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line.endswith(b"\n"):
                    raise ConnectionAbortedError("connection closed in the headers")
                name, sep, value = line.decode("latin-1").partition(":")
                if not sep:
                    raise _Bad(f"not a header line: {line[:40]!r}")
                name, value = name.strip().lower(), value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            else:
                raise _Bad(f"more than {MAX_HEADERS} headers")
            if not 100 <= int(code) < 200:
                return int(code), version, headers


def _framing(status: int, version: str, headers: dict[str, str]) -> tuple[int | None, bool, bool]:
    """How the body ends: (Content-Length or None, chunked, the connection closes after)."""
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None, True, close
    if status in (204, 304):
        return 0, False, close
    length = headers.get("content-length")
    if length is None:
        return None, False, True  # until the server closes
    values = {v.strip() for v in length.split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise _Bad(f"bad Content-Length {length[:40]!r}")
    return int(values.pop()), False, close


def _body(conn: _Conn, length: int | None, chunked: bool) -> Iterator[bytes]:
    """The body's pieces as they come; :class:`_Bad` for a cut or malformed one."""
    if chunked:
        while True:
            line = conn.readline()
            size = line.split(b";", 1)[0].strip()
            try:
                left = int(size, 16)
            except ValueError:
                raise _Bad("connection closed in a chunk" if not line.endswith(b"\n")
                           else f"bad chunk size {line[:40]!r}") from None
            if left == 0:
                while conn.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            yield from _exactly(conn, left)
            if conn.readline() not in (b"\r\n", b"\n"):
                raise _Bad("chunk not followed by CRLF")
    elif length is None:
        while True:
            data = conn.read(READ)
            if not data:
                return
            yield data
    else:
        yield from _exactly(conn, length)


def _exactly(conn: _Conn, n: int) -> Iterator[bytes]:
    got = 0
    while got < n:
        data = conn.read(n - got)
        if not data:
            raise _Bad(f"IncompleteRead({got} bytes read, {n - got} more expected)")
        got += len(data)
        yield data


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
        authority = f"[{self.host}]" if ":" in self.host else self.host
        if u.port and u.port != (443 if self.https else 80):
            authority += f":{u.port}"
        headers = {"Host": authority, **HEADERS}
        self._tunnel = b""
        if proxy:
            p = urlsplit(proxy)
            self._via = (p.hostname or "", p.port or (443 if p.scheme == "https" else 80))
            auth = {}
            if p.username is not None:
                import base64

                cred = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
                auth = {"Proxy-Authorization": "Basic " + base64.b64encode(cred).decode()}
            if self.https:  # CONNECT, then TLS to the origin inside the tunnel
                target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
                self._tunnel = _request("CONNECT", target, {"Host": target, **auth})
            else:  # a plain proxy takes the absolute URL
                headers.update(auth)
        self._headers = headers
        self._prefix = origin if proxy and not self.https else ""
        self._idle: list[_Conn] = []
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
            status, version, headers = self._send(conn, target)
            body, close = self._read(conn, status, version, headers, limit, deadline)
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
        if close:
            conn.close()
        else:
            self._give(conn)
        return Answer(status, body)

    def _keep_session(self, conn: _Conn) -> None:
        """Keep a session worth resuming (TLS 1.3 sends its ticket after the handshake)."""
        session = getattr(conn.sock, "session", None)
        if session is not None and (session.has_ticket or session.id):
            with self._lock:
                self.session = self.session or session

    # --- connections

    def _take(self, w: _Watch) -> _Conn:
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
        try:
            _WATCHDOG.arm(w, conn.sock)
        except OSError as e:  # no descriptor left for the dup
            conn.close()
            raise ConnectFailed(_words(e)) from None
        return conn

    def _give(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def _open(self, w: _Watch) -> _Conn:
        """A new connection, watched by ``w`` from the end of the TCP connect on (the
        proxy's CONNECT and the TLS handshake included)."""
        sock = None
        try:
            sock = _connect(self._via or (self.host, self.port), self.timeout, w)
            conn = _Conn(sock)
            if self._tunnel:
                conn.send(self._tunnel)
                status, _, _ = conn.head()
                if status != 200 or conn.buf:
                    raise OSError(f"Tunnel connection failed: {status}")
            if self.https:
                assert self.context is not None
                conn.sock = sock = self.context.wrap_socket(
                    sock, server_hostname=self.host, session=self.session)
            return conn
        except BaseException as e:
            fired = _WATCHDOG.disarm(w)
            if sock is not None:
                sock.close()
            if not isinstance(e, Exception):
                raise
            if fired or isinstance(e, TooSlow):
                raise TooSlow("too slow") from None
            if _tls_error(e):
                raise TLSFailed(_words(e)) from None
            if isinstance(e, (OSError, _Bad)):  # refused, unreachable, DNS, timeout, proxy said no
                raise ConnectFailed(_words(e)) from None
            raise

    # --- one exchange

    def _send(self, conn: _Conn, target: str) -> tuple[int, str, dict[str, str]]:
        try:
            conn.send(_request("GET", self._prefix + target, self._headers))
            return conn.head()
        except (socket.timeout, TimeoutError):
            raise TimedOut(f"no answer within {self.timeout:g}s") from None
        except Exception as e:
            if _tls_error(e):  # e.g. TLS 1.3's late alerts
                raise TLSFailed(_words(e)) from None
            if isinstance(e, (OSError, _Bad)):  # reset, closed, not HTTP
                raise ConnectFailed(_words(e)) from None
            raise

    def _read(self, conn: _Conn, status: int, version: str, headers: dict[str, str],
              limit: int, deadline: float) -> tuple[bytes, bool]:
        """The body, decoded, and whether the connection closes after it."""
        parts, size = [], 0
        try:
            length, chunked, close = _framing(status, version, headers)
            enc = headers.get("content-encoding", "").strip().lower()
            inflate = zlib.decompressobj(47) if enc in ("gzip", "deflate", "x-gzip") else None
            if length is not None and inflate is None and length > limit:
                raise TooLarge("too large")
            for chunk in _body(conn, length, chunked):
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
        except (OSError, _Bad, zlib.error) as e:  # cut, reset, bad gzip
            raise Broken(_words(e)) from None
        return b"".join(parts), close


def _request(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _connect(address: tuple[str, int], timeout: float, w: _Watch) -> socket.socket:
    """TCP to ``address``, armed on the watchdog before anything is sent.  The connect
    itself waits at most what is left before the deadline (then the per-read timeout)."""
    left = w.deadline - time.monotonic()
    if left <= 0:
        raise TooSlow("too slow")
    capped = left < timeout
    host, port = address
    try:
        # bytes: a str host goes through the idna codec, an import of its own (~1.5 ms)
        sock = socket.create_connection((host.encode() if host.isascii() else host, port),
                                        left if capped else timeout)
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


def _tls_error(e: BaseException) -> bool:
    """A TLS failure (no ssl loaded: none can have happened)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(e, (ssl.SSLError, ssl.CertificateError))


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


def _dropped(conn: _Conn) -> bool:
    """An idle keep-alive connection the server closed (readable means EOF or junk)."""
    if conn.buf or getattr(conn.sock, "pending", lambda: 0)():
        return True
    try:
        return bool(select.select([conn.sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _words(e: BaseException) -> str:
    """The exception's own words, for :func:`psprobe.archive._reason` to trim."""
    return str(e) or type(e).__name__
