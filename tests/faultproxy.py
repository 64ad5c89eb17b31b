"""A TCP relay on loopback that passes, trickles or freezes what flows through it.

Why: a socket timeout restarts at every byte, so a server that sends its answer at
1 byte/s, or a broker whose connection freezes mid-run, is a fault only a real
socket shows.  The relay sits between psprobe and a real part (the simulator,
RabbitMQ) and changes the pace of the bytes, never their content.

    with FaultProxy(("127.0.0.1", sim.port)) as p:
        p.trickle(100)          # every later byte, both ways, at 100 bytes/s
        p.freeze()              # nothing passes any more; connections stay open
        p.thaw()                # back to passing everything
        p.cut()                 # the target is down: connections dropped, new ones closed

Every wait inside is bounded by the relay's own close: ``close()`` (or leaving
the ``with``) ends every connection and thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FaultProxy:
    """Relay ``127.0.0.1:<port>`` to ``target``; the mode applies to every connection."""

    def __init__(self, target: tuple[str, int], direction: str = "both") -> None:
        self.target = target
        self.direction = direction  # which way the mode applies: "down" (to us), "up", "both"
        self.rate = 0.0  # bytes per second when trickling; 0 passes at full speed
        self.frozen = False
        self.down = False  # cut(): every connection is closed as soon as it is accepted
        self.connections = 0
        self._cv = threading.Condition()
        self._closed = False
        self._socks: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    # --- what the test changes

    def trickle(self, bytes_per_second: float) -> None:
        with self._cv:
            self.rate, self.frozen = float(bytes_per_second), False
            self._cv.notify_all()

    def freeze(self) -> None:
        with self._cv:
            self.frozen = True
            self._cv.notify_all()

    def thaw(self) -> None:
        with self._cv:
            self.rate, self.frozen, self.down = 0.0, False, False
            self._cv.notify_all()

    def cut(self) -> None:
        """The target goes down: open connections are reset, new ones closed at once."""
        with self._cv:
            self.down = True
            socks, self._socks = self._socks, []
            self._cv.notify_all()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def url(self, url: str) -> str:
        """``url`` with the target's host:port replaced by the relay's."""
        return url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    # --- the relay

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            if self.down:
                a.close()
                continue
            try:
                b = socket.create_connection(self.target, timeout=10)
                b.settimeout(None)
            except OSError:
                a.close()
                continue
            with self._cv:
                if self._closed:
                    a.close()
                    b.close()
                    return
                self._socks += [a, b]
                self.connections += 1
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(a, b, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(b, a, "down"), daemon=True).start()

    def _applies(self, way: str) -> bool:
        return self.direction in ("both", way)

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if not self._forward(data, dst, way):
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _forward(self, data: bytes, dst: socket.socket, way: str) -> bool:
        """Send ``data`` at the current pace; False once the relay is closed."""
        i = 0
        while i < len(data):
            with self._cv:
                while self.frozen and self._applies(way) and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return False
                rate = self.rate if self._applies(way) else 0.0
            n = len(data) - i if rate <= 0 else 1
            try:
                dst.sendall(data[i:i + n])
            except OSError:
                return False
            i += n
            if rate > 0:
                with self._cv:  # woken early by close, thaw or a new pace
                    self._cv.wait(1.0 / rate)
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            socks, self._socks = self._socks, []
            self._cv.notify_all()
        # Wakes the accept() under way: close() alone leaves it blocked, still listening.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def elapsed(fn, *args, **kwargs) -> tuple[float, object]:
    """``(seconds, result)`` of one call: for asserting an upper bound, never a sleep."""
    t = time.monotonic()
    out = fn(*args, **kwargs)
    return time.monotonic() - t, out
