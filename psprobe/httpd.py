"""The small HTTP/1.1 server under ``psprobe receive``: sockets, TLS, requests under a deadline.

Why not ``http.server``: a pusher must never hold a thread longer than
``[receive] request_timeout``, however slowly its bytes come, and
``http.server`` only times each ``recv``.  Here each request has one deadline,
checked on every read of the TLS handshake, the head and the body; a body over
the limit is refused from its ``Content-Length`` before it is read, or as soon
as a chunked one passes it.  What a request means (who pushes, what is done
with the body) is the handler's (:class:`Handler`); this module only frames
requests and answers.  Standard library only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

from psprobe import hostnames
from psprobe.config import ConfigError, Receive

# The lines of the receive service, whichever module writes them (one name to filter on).
log = logging.getLogger("psprobe.receive")

MAX_CONNECTIONS = 1024  # open connections at once; more wait in the listen backlog
MAX_LINE = 8192  # request line, header line, chunk-size line
MAX_HEADERS = 100
READ = 1 << 16


class Deadline(Exception):
    """The request's time is up (or the idle connection's)."""


class Gone(Exception):
    """The client closed the connection or broke it."""


@dataclass(eq=False)
class Refused(Exception):
    """An answer other than 2xx: status, one line of why, and who (when known)."""

    status: int
    reason: str
    host: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    read_all: bool = False  # the body was read: the connection may stay open

    def __str__(self) -> str:
        return self.reason


# --- sockets and TLS


def systemd_sockets(env: dict[str, str] | None = None) -> list[socket.socket] | None:
    """The listening sockets systemd passed (``LISTEN_FDS`` from fd 3), or None.

    Only when ``LISTEN_PID`` is this process (sd_listen_fds(3)): a child of a
    socket-activated process inherits the variables, not the sockets.  The
    variables are then removed, so our own children never take them for theirs.
    """
    env = os.environ if env is None else env
    pid, n = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not (pid.isdigit() and n.isdigit()) or int(pid) != os.getpid() or int(n) < 1:
        return None
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(k, None)
    socks = []
    for fd in range(3, 3 + int(n)):
        s = socket.socket(fileno=fd)
        s.set_inheritable(False)
        if s.type != socket.SOCK_STREAM or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"fd {fd} from systemd is not a listening stream socket "
                              "(psprobe-receive.socket must say ListenStream=)")
        socks.append(s)
    return socks


def bind(listen: tuple[str, int]) -> socket.socket:
    """A listening socket on ``[receive] listen``; all addresses (IPv6 and IPv4) when none is given."""
    host, port = listen
    if not host and socket.has_dualstack_ipv6():
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                    backlog=128)
    info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)
    family, _, _, _, addr = info[0]
    return socket.create_server(addr, family=family, backlog=128)


def sockname(s: socket.socket) -> str:
    addr = s.getsockname()
    return f"[{addr[0]}]:{addr[1]}" if s.family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"


def tls_context(r: Receive) -> ssl.SSLContext | None:
    """The server's TLS context (None with ``plain_http``); ConfigError names an unusable file."""
    if r.plain_http:
        return None
    for key, path in (("certificate", r.certificate), ("key", r.key)):
        if not path:
            raise ConfigError(f"[receive] {key}: not set (or set plain_http = yes behind a TLS proxy)")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{path}: [receive] {key}: cannot read: {e.strerror}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(r.certificate, r.key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{r.certificate}: [receive] certificate and key: cannot load "
                          f"({getattr(e, 'reason', None) or e}): not PEM, or the key does not "
                          "fit the certificate") from None
    if r.client_ca:
        try:
            ctx.load_verify_locations(r.client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"{r.client_ca}: [receive] client_ca: cannot load "
                              f"({getattr(e, 'reason', None) or e.strerror or e})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def cert_names(cert: dict | None) -> list[str]:
    """The host names a verified client certificate gives: SAN DNS names, else its CN (RFC 6125)."""
    if not cert:
        return []
    names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    out = []
    for n in names:
        with contextlib.suppress(hostnames.BadHost):
            out.append(hostnames.normalise(n))
    return out


# --- one connection


class _Reader(io.RawIOBase):
    """Socket reads bounded by a deadline: each recv may wait only what is left of it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Deadline
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(b)
        except socket.timeout:  # TimeoutError from 3.10 on
            raise Deadline from None
        except (ConnectionError, ssl.SSLError) as e:
            raise Gone(str(e)) from None


class Headers(dict):
    """Header name (lower case) -> its values, in order; read by :meth:`Conn.headers`."""

    def get_all(self, name: str) -> list[str]:
        return self.get(name.lower(), [])

    def first(self, name: str) -> str:
        v = self.get(name.lower())
        return v[0] if v else ""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: Headers
    keep_alive: bool


class Conn:
    """One client connection: its socket, buffered reader, peer, certificate names."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        self.raw = _Reader(sock)
        self.rfile = io.BufferedReader(self.raw, READ)
        self.names: list[str] = []
        self.idle = True  # waiting for a request: closed at once at a stop

    def send(self, data: bytes) -> None:
        """Write within what is left of the deadline (a small answer: the socket buffer takes it)."""
        self.sock.settimeout(max(self.raw.deadline - time.monotonic(), 0.05))
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise Gone(str(e)) from None

    def handshake(self, ctx: ssl.SSLContext, deadline: float) -> None:
        """TLS handshake under the deadline (non-blocking steps: a trickled handshake ends too)."""
        tls = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        self.raw.sock = tls
        tls.setblocking(False)
        with selectors.DefaultSelector() as sel:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    ev = selectors.EVENT_READ
                except ssl.SSLWantWriteError:
                    ev = selectors.EVENT_WRITE
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Deadline
                sel.register(tls, ev)
                ready = sel.select(left)
                sel.unregister(tls)
                if not ready:
                    raise Deadline
        tls.setblocking(True)
        self.names = cert_names(tls.getpeercert())

    def readline(self) -> bytes:
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise Refused(431, f"a line of the request is longer than {MAX_LINE} bytes")
        if not line.endswith(b"\n"):
            raise Gone("closed in the middle of the request")
        return line

    def headers(self) -> Headers:
        """The header fields up to the empty line: at most MAX_HEADERS lines of MAX_LINE bytes."""
        out = Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.readline()
            if line in (b"\r\n", b"\n"):
                return out
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip() or line[:1] in b" \t":
                raise Refused(400, f"not a header field: {line[:60]!r}")
            out.setdefault(name.lower(), []).append(value.strip())
        raise Refused(431, f"more than {MAX_HEADERS} header fields")

    def head(self) -> Request:
        line = self.readline().decode("latin-1").rstrip("\r\n")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise Refused(400, f"not an HTTP request line: {line[:80]!r}")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise Refused(505, f"HTTP version {version[:20]!r} is not supported")
        headers = self.headers()
        conn_hdr = ",".join(headers.get_all("Connection")).lower()
        keep = version == "HTTP/1.1" and "close" not in conn_hdr
        return Request(method, target, version, headers, keep)

    def proceed(self, req: Request) -> None:
        """``100 Continue`` when the client waits for it: call once the request may send its body."""
        if req.headers.first("Expect").lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.rfile.read(min(n - len(out), 1 << 20))
            if not b:
                raise Gone("closed in the middle of the body")
            out += b
        return bytes(out)

    def body(self, length: int | None, max_body: int, host: str | None = None) -> bytes:
        """The body: ``length`` bytes, or chunked (None), refused once it passes ``max_body``."""
        if length is not None:
            return self.read_exact(length)
        out, total = bytearray(), 0
        while True:
            line = self.readline()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise Refused(400, f"bad chunk size line {line[:40]!r}", host) from None
            if size == 0:
                while self.readline() not in (b"\r\n", b"\n"):  # trailers, ignored
                    pass
                return bytes(out)
            total += size
            if total > max_body:
                raise Refused(413, f"chunked body passed [receive] max_body ({max_body} bytes)",
                              host)
            out += self.read_exact(size)
            if self.read_exact(2) != b"\r\n":
                raise Refused(400, "a chunk does not end with CRLF", host)

    def answer(self, status: int, body: bytes, headers: dict[str, str], close: bool) -> None:
        phrase = HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers.items()),
                 f"Content-Length: {len(body)}", f"Connection: {'close' if close else 'keep-alive'}"]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            # Our answer first, then the end: the client may still be sending a body we refused.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)


def content_length(req: Request, max_body: int) -> int | None:
    """The Content-Length (None: chunked); 411, 413, 400, 501 as the framing deserves."""
    te = req.headers.get_all("Transfer-Encoding")
    cl = req.headers.get_all("Content-Length")
    if te:
        if cl:
            raise Refused(400, "both Transfer-Encoding and Content-Length")
        if [t.strip().lower() for t in ",".join(te).split(",")] != ["chunked"]:
            raise Refused(501, f"transfer coding {','.join(te)[:40]!r} is not supported")
        return None
    if not cl:
        raise Refused(411, "Content-Length (or chunked transfer coding) required")
    values = {v.strip() for v in ",".join(cl).split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise Refused(400, f"bad Content-Length {','.join(cl)[:40]!r}")
    n = int(values.pop())
    if n > max_body:
        raise Refused(413, f"body of {n} bytes is over [receive] max_body ({max_body})")
    return n


# --- the server


class Handler(Protocol):
    """What a request means: the answer to one, and the one log line of a refusal."""

    def handle(self, conn: Conn, req: Request) -> tuple[int, bytes, str]:
        """(status, JSON body, who) of a request that succeeded; raises Refused otherwise."""

    def refused(self, peer: str, host: str | None, status: int, reason: str) -> None:
        """Note a refusal (status 0: the connection, e.g. its TLS handshake), before the answer."""


class Server:
    """Accepts until ``stop``; one thread per connection (at most MAX_CONNECTIONS), keep-alive."""

    def __init__(self, handler: Handler, ctx: ssl.SSLContext | None, timeout: float,
                 stop: threading.Event) -> None:
        self.handler, self.ctx, self.timeout, self.stop = handler, ctx, timeout, stop
        self._conns: dict[int, Conn] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._threads: set[threading.Thread] = set()

    def accept_loop(self, socks: list[socket.socket]) -> None:
        wake_r, wake_w = socket.socketpair()

        def wake() -> None:  # a stop (a signal, a test) ends the select below at once
            self.stop.wait()
            wake_w.send(b"x")

        waker = threading.Thread(target=wake, name="receive-waker", daemon=True)
        waker.start()
        try:
            with selectors.DefaultSelector() as sel:
                for s in socks:
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                sel.register(wake_r, selectors.EVENT_READ)
                while not self.stop.is_set():
                    for key, _ in sel.select():
                        if key.fileobj is wake_r:
                            continue
                        self._accept(key.fileobj)
        finally:
            self.stop.set()  # whatever ended the loop ends the server
            waker.join()
            wake_r.close()
            wake_w.close()

    def _accept(self, lsock: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            # Full: leave it in the backlog until a connection ends (woken by the next select).
            while not self._slots.acquire(timeout=1.0):
                if self.stop.is_set():
                    return
        try:
            sock, addr = lsock.accept()
        except (BlockingIOError, InterruptedError):
            self._slots.release()
            return
        except OSError as e:
            self._slots.release()
            log.warning("accept: %s", e.strerror or e)
            return
        sock.setblocking(True)
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        if peer.startswith("::ffff:") and "." in peer:  # IPv4 on a dual-stack socket
            peer = peer[7:]
        t = threading.Thread(target=self._connection, args=(sock, peer), daemon=True,
                             name=f"receive-{peer}")
        with self._lock:
            self._threads.add(t)
        t.start()

    def _connection(self, sock: socket.socket, peer: str) -> None:
        conn = Conn(sock, peer)
        with self._lock:
            self._conns[id(conn)] = conn
        try:
            start = time.monotonic()
            if self.ctx is not None:
                try:
                    conn.handshake(self.ctx, start + self.timeout)
                except (Deadline, ssl.SSLError, OSError) as e:
                    why = "no TLS handshake within the deadline" if isinstance(e, Deadline) else \
                        f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
                    self.handler.refused(peer, None, 0, why)
                    return
            first = True
            while not self.stop.is_set():
                if not self._one(conn, start if first else None):
                    break
                first = False
        except Exception as e:  # a bug: one line, the connection ends, the server goes on
            log.error("receive: connection from %s: %s: %s", peer, type(e).__name__, e,
                      exc_info=True)
        finally:
            with self._lock:
                self._conns.pop(id(conn), None)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                conn.sock.close()
            self._slots.release()

    def close_idle(self) -> None:
        """At a stop: end the connections that wait for a request (their recv returns at once)."""
        with self._lock:
            idle = [c for c in self._conns.values() if c.idle]
        for c in idle:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)

    def join(self, deadline: float) -> int:
        """Wait for the connection threads until ``deadline``; how many are still running."""
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return 0
            left = deadline - time.monotonic()
            if left <= 0:
                return len(threads)
            threads[0].join(left)

    def _one(self, conn: Conn, started: float | None) -> bool:
        """Serve one request; False when the connection is to close."""
        conn.idle = True
        conn.raw.deadline = (started or time.monotonic()) + self.timeout  # idle wait: the same bound
        try:
            if not conn.rfile.peek(1):
                return False
        except (Deadline, Gone):
            return False  # an idle keep-alive connection ends quietly
        conn.idle = False
        if started is None:
            conn.raw.deadline = time.monotonic() + self.timeout
        host = None
        try:
            req = conn.head()
            status, body, host = self.handler.handle(conn, req)
            keep = req.keep_alive and not self.stop.is_set()
            conn.answer(status, body, {"Content-Type": "application/json"}, close=not keep)
            return keep
        except Refused as e:
            host = e.host or host
            self.handler.refused(conn.peer, host, e.status, e.reason)
            headers = {"Content-Type": "text/plain; charset=utf-8", **e.headers}
            keep = e.read_all and not self.stop.is_set()
            with contextlib.suppress(Gone, Deadline):
                conn.answer(e.status, (e.reason + "\n").encode(), headers, close=not keep)
            return keep
        except Deadline:
            self.handler.refused(conn.peer, host, 408,
                                 f"the request did not arrive within {self.timeout:g}s")
            with contextlib.suppress(Gone, Deadline):
                conn.answer(408, b"request timeout\n", {"Content-Type": "text/plain"}, close=True)
            return False
        except Gone as e:
            log.info("receive: %s closed the connection in the middle of a request (%s)",
                     conn.peer, e)
            return False
