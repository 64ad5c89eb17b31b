#!/usr/bin/env python3
"""Pushed runs through a broker outage and a ``kill -9`` of the receiver: what is lost, what doubles.

    python3 bench/receive_faults.py              # an hour of the mesh, broker down; then a kill
    python3 bench/receive_faults.py --runs 3000  # smaller

``psprobe receive`` (a child process, plain HTTP on loopback) gets its
listening socket the way systemd passes it (``LISTEN_FDS``, fd 3, held here),
and reaches the real broker through tests/faultproxy.py, which can take the
broker "down" (connections dropped, new ones closed at once).  Clients push
like pScheduler's http archiver with a retry policy: a run not answered 2xx
(a refused or broken connection, a 503) is pushed again until it is.  Every
run has its own start time, so every message id differs; the ids expected are
``psprobe.convert.messages`` of the runs pushed, and what reached the queue
is counted by id.

1. Outage: the broker is down while ``--runs`` runs (default 18 000: the
   OSG/WLCG mesh's hour, 300 hosts x a run a minute) are pushed; then it comes
   back.  Printed: runs answered 2xx while it was down, the spool's size, how
   long the forwarder took to drain it once the broker was back.
2. Kill: the same number of runs pushed with the broker up; at half of them
   answered, the receiver is killed (SIGKILL) and started again on the same
   socket (pushes meanwhile wait in its backlog, as under systemd).

For each: messages expected, received, lost (expected ids never received:
must be 0) and duplicates (received more than once: bounded by what was
spooled but not yet confirmed and committed at the kill).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import AMQP_URL, PSPROBE, ROOT, Sink, machine, write_config
from receive import backlog, host_name, post, templates, token

from psprobe import config, convert
from tests.faultproxy import FaultProxy

HOSTS = 300


def runs(n: int) -> list[bytes]:
    """``n`` distinct run records: the real ones in turn, each its own host and start time."""
    bodies = templates()
    base = 1_750_000_000
    out = []
    for i in range(n):
        start = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(base + 60 * i))
        out.append(bodies[i % len(bodies)].replace(b"@START@", start.encode())
                   .replace(b"@HOST@", host_name(i % HOSTS).encode()))
    return out


def expected_ids(bodies: list[bytes]) -> set[str]:
    """The ids the receiver publishes for these runs (its defaults: event types, chunks)."""
    c = config.Config()
    return {m.message_id for b in bodies
            for m in convert.messages(json.loads(b), c.broker.routing_key_prefix,
                                      c.collect.chunk_points, event_types=c.collect.event_types)}



class Receiver:
    """``psprobe receive`` on a socket held here, so a killed one is started again on it."""

    def __init__(self, tmp: Path, broker_url: str, exchange: str) -> None:
        (tmp / "tokens").write_text("".join(f"{host_name(i)} {token(i)}\n" for i in range(HOSTS)))
        os.chmod(tmp / "tokens", 0o640)
        (tmp / "state").mkdir(exist_ok=True)
        self.spool = tmp / "state" / "spool"
        self.conf = write_config(tmp / "psprobe.conf", {
            "collect": {"state_dir": tmp / "state"},
            "broker": {"url": broker_url, "exchange": exchange, "timeout": "5s"},
            "receive": {"plain_http": "yes", "tokens": tmp / "tokens",
                        "hosts": " ".join(host_name(i) for i in range(HOSTS))},
        })
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.err = tmp / "receive.err"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # What systemd does before exec: the socket as fd 3, LISTEN_PID the receiver's own.
        shim = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
                "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])")
        with open(self.err, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", shim, str(self.sock.fileno()), *PSPROBE,
                 "--config", str(self.conf), "receive"],
                stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)}, pass_fds=(self.sock.fileno(),))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(120)

    def wait_drained(self, limit: float) -> float:
        """Seconds until the spool's committed position reached its end."""
        t0 = time.monotonic()
        while backlog(self.spool) > 0:
            if time.monotonic() - t0 > limit:
                sys.exit(f"the spool did not drain within {limit:.0f}s:\n{self.err.read_text()[-2000:]}")
            time.sleep(0.2)
        return time.monotonic() - t0


def push_all(port: int, bodies: list[bytes], threads: int,
             on_ack: threading.Event | None = None, at: int = 0) -> dict[str, int]:
    """Push every body until it is answered 2xx (as pScheduler's retry policy would);
    answers by status.  ``on_ack`` is set once ``at`` runs were answered 2xx."""
    import http.client

    counts: dict[str, int] = {}
    lock = threading.Lock()
    acked = [0]
    todo = list(range(len(bodies)))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if not todo:
                    break
                i = todo.pop()
            h = i % HOSTS
            while True:
                key, conn = post(conn, bodies[i], token(h))
                with lock:
                    counts[key] = counts.get(key, 0) + 1
                    if key == "200":
                        acked[0] += 1
                        if on_ack is not None and acked[0] >= at:
                            on_ack.set()
                if key == "200":
                    break
                time.sleep(0.05)  # a retry policy's wait (not a synchronisation)
        conn.close()

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts


def verdict(seen: dict[str, int], want: set[str]) -> str:
    lost = len(want - set(seen))
    dups = sum(n - 1 for n in seen.values())
    return (f"messages expected {len(want):,}, received {sum(seen.values()):,}: "
            f"lost {lost}, duplicates {dups}{'' if lost == 0 else '  <-- LOST'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=18_000,
                    help="runs pushed in each (18000: an hour of the mesh)")
    ap.add_argument("--clients", type=int, default=16)
    a = ap.parse_args()
    print(machine())
    bodies = runs(a.runs)
    want = expected_ids(bodies)
    host, port = AMQP_URL.split("@", 1)[1].split("/", 1)[0].split(":")
    bad = 0

    print(f"\n1. broker outage: {a.runs:,} runs pushed by {a.clients} clients while the broker is down")
    q = Sink("receive-faults", max_length=None)
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d, \
            FaultProxy((host, int(port))) as proxy:
        r = Receiver(Path(d), proxy.url(AMQP_URL), q.name)
        proxy.cut()
        r.start()
        t0 = time.monotonic()
        counts = push_all(r.port, bodies, a.clients)
        pushed = time.monotonic() - t0
        size = sum(p.stat().st_size for p in r.spool.glob("*.seg"))
        print(f"  answers while down: {counts}; in {pushed:.1f}s ({a.runs / pushed:,.0f} runs/s)")
        print(f"  spool: {size / 1e6:.1f} MB waiting, nothing confirmed "
              f"(backlog {backlog(r.spool) / 1e6:.1f} MB)")
        proxy.thaw()
        drained = r.wait_drained(1800)
        print(f"  broker back: spool drained in {drained:.1f}s (including the forwarder's "
              "back-off, up to 60s, before it tries again)")
        status = r.stop()
        seen = q.drain()
        print(f"  {verdict(seen, want)}; receive exited {status}")
        bad += len(want - set(seen)) > 0
    q.close()

    print(f"\n2. kill -9: {a.runs:,} runs pushed, the receiver killed at {a.runs // 2:,} answered, "
          "started again on its socket")
    q = Sink("receive-faults", max_length=None)
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        r = Receiver(Path(d), AMQP_URL, q.name)
        r.start()
        half = threading.Event()
        result: dict[str, int] = {}
        pusher = threading.Thread(target=lambda: result.update(
            push_all(r.port, bodies, a.clients, half, a.runs // 2)))
        pusher.start()
        half.wait()
        pending = backlog(r.spool)
        r.kill()
        t_kill = time.monotonic()
        r.start()
        pusher.join()
        drained = r.wait_drained(600)
        print(f"  answers: {result}; at the kill {pending / 1e3:.0f} kB spooled and not yet committed")
        print(f"  restarted; everything confirmed {drained:.1f}s after the last push "
              f"({time.monotonic() - t_kill:.1f}s after the kill)")
        status = r.stop()
        seen = q.drain()
        print(f"  {verdict(seen, want)}; receive exited {status}")
        bad += len(want - set(seen)) > 0
    q.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
