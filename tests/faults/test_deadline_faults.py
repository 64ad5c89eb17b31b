"""An archive whose bytes come slowly, or stop: the run still ends within the documented rule.

A socket timeout restarts at every byte, so only the whole-answer deadline (4 x
``[archive] timeout`` per attempt, from connect to last byte) ends a trickle.  Each
case puts a :class:`FaultProxy` between psprobe and host A's archive, changes the
pace of what the archive sends, and checks: the run ends within 3 x the rule
(``attempts x 4 x timeout`` plus the pause between tries), exit 1 with one clear
line, host B untouched, and once the bytes flow again, nothing lost.

At 1 B/s the gap between bytes is the lab's 1 s timeout itself, so which of the
two ends a read would be a race: those cases run with a 2 s timeout, under which
only the deadline can end them.
"""

from __future__ import annotations

import socket

import pytest
import tlsutil
from esmond_sim import EsmondSim
from faultproxy import FaultProxy, elapsed

A, B = "ps-a.example.org", "ps-b.example.org"
TIMEOUT, RETRIES = 1.0, 1  # the lab's [archive] timeout and retries


def rule(timeout: float) -> float:
    """The longest a run failing at its first request may take: every attempt's whole-answer
    deadline (4 x timeout), and the pause between them (0.5 s before the one retry)."""
    return (RETRIES + 1) * 4 * timeout + 0.5


class HeadersPass(FaultProxy):
    """A relay whose pace applies to what the archive sends after an answer's headers.

    The status line and headers of each connection's first answer pass at full
    speed; then the body trickles or freezes (and every later answer with it).
    """

    def __init__(self, target: tuple[str, int], direction: str = "down") -> None:
        assert direction == "down"
        super().__init__(target, direction)
        self._tails: dict[socket.socket, bytes] = {}  # what may start the blank line
        self._bodies: set[socket.socket] = set()  # connections past their headers

    def _forward(self, data: bytes, dst: socket.socket, way: str) -> bool:
        if way == "down" and dst not in self._bodies:
            seen = self._tails.get(dst, b"")
            buf = seen + data
            end = buf.find(b"\r\n\r\n")
            n = len(data) if end < 0 else end + 4 - len(seen)
            if end < 0:
                self._tails[dst] = buf[-3:]
            else:
                self._bodies.add(dst)
            try:
                dst.sendall(data[:n])
            except OSError:
                return False
            data = data[n:]
        return super()._forward(data, dst, way)


def _set_up(lab, sim: EsmondSim, proxy: FaultProxy) -> None:
    """A read through ``proxy``, B directly; both collected once; then A measures more."""
    lab.add_host(A, sim=sim)
    lab.add_host(B)
    lab.set_read_url(A, proxy.url(sim.url(A)))
    for h in (A, B):
        r = lab.run(h)
        assert r.status == 0, r.lines
        assert lab.tally(h).lost == 0
    lab.more(A, 120)


def _faulted_run(lab, timeout: float, words: str) -> str:
    """The faulted run of A: within 3 x the rule (generous: a loaded CI machine), one line."""
    seconds, r = elapsed(lab.run, A, archive={"timeout": f"{timeout:g}s"})
    assert r.status == 1, r.lines
    line = r.failed_line(A)
    assert words in line and "\n" not in line, line
    assert seconds < 3 * rule(timeout), (seconds, rule(timeout), line)
    return line


# name, relay, what the test does to it, [archive] timeout, words in the reason
CASES = [
    ("trickle 100 B/s (whole-answer deadline)", FaultProxy, lambda p: p.trickle(100),
     TIMEOUT, "answer took longer than 4s"),
    ("trickle 1 B/s (whole-answer deadline)", FaultProxy, lambda p: p.trickle(1),
     2.0, "answer took longer than 8s"),
    ("body trickle 1 B/s after prompt headers (whole-answer deadline)", HeadersPass,
     lambda p: p.trickle(1), 2.0, "answer took longer than 8s"),
    ("frozen before the status line", FaultProxy, lambda p: p.freeze(),
     TIMEOUT, "no answer within 1s"),
    ("frozen after the headers", HeadersPass, lambda p: p.freeze(),
     TIMEOUT, "no answer within 1s"),
]


@pytest.mark.parametrize(("name", "relay", "fault", "timeout", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_slow_archive(lab, figures, name, relay, fault, timeout, words):
    assert lab.sections["archive"]["timeout"] == f"{TIMEOUT:g}s"
    assert lab.sections["archive"]["retries"] == RETRIES
    with relay(("127.0.0.1", lab.sim.port), direction="down") as proxy:
        _set_up(lab, lab.sim, proxy)
        fault(proxy)
        line = _faulted_run(lab, timeout, words)
        lab.unaffected(B)
        proxy.thaw()
        runs, t = lab.catch_up(A)
    figures.fault("archive", name, 1, line, t, runs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))


def test_trickled_tls_handshake(lab, figures, pki):
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key))) as tls_sim, \
            FaultProxy(("127.0.0.1", tls_sim.port), direction="down") as proxy:
        lab.set(f"host {A}", schemes="https", verify=pki.ca)
        _set_up(lab, tls_sim, proxy)
        handshakes = tls_sim.stats["tls_handshakes"]
        proxy.trickle(1)  # the server's certificate flight alone: many minutes
        # Python's ssl bounds a handshake as a whole by the socket timeout (the
        # watchdog would end it too, at the deadline: test_archive_http).
        line = _faulted_run(lab, TIMEOUT, "The handshake operation timed out")
        assert tls_sim.stats["tls_handshakes"] == handshakes  # none finished
        lab.unaffected(B)
        proxy.thaw()
        runs, t = lab.catch_up(A)
    figures.fault("archive", "TLS handshake trickle 1 B/s", 1, line, t, runs)
