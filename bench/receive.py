#!/usr/bin/env python3
"""``psprobe receive`` under many pushing clients: results/s with confirms, CPU per result, RSS.

    python3 bench/receive.py                  # 300 hosts, 32 clients, 30 s of load
    python3 bench/receive.py --seconds 60 --clients 64

``psprobe receive`` (bin/psprobe, a child process) listens on loopback in plain
HTTP, spools every run (fsynced) and forwards it to the real broker
(127.0.0.1:5672) with confirms, into a throw-away exchange with a bounded queue.
``--hosts`` testpoints, each with its own bearer token, are pushed by
``--clients`` keep-alive connections (threads in two client processes), each
sending the next run as soon as the last was answered: the real records of
``tests/fixtures/pushed/real/`` (the http archiver's own records) in turn, each run with its own start time
and host (so every message id differs).  The load stops after ``--seconds``;
the clock stops once the broker has confirmed everything spooled (the spool's
committed position reaches its end).

Printed: the machine; runs answered 2xx and refused; results/s and messages/s
with confirms; the receiver's CPU per result (its /proc/PID/stat, over the
load and the drain) and its share of the cores; its peak RSS (VmHWM) and RSS
over time with the spool's backlog beside it; the ratio to the whole OSG/WLCG
mesh (300 hosts, a run a minute each: 5 results/s).  Target: >= 50x, memory flat.
CPU figures share the two cores with the clients and RabbitMQ (printed too).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import AMQP_URL, PSPROBE, ROOT, Sink, machine, write_config

FORMATS = ROOT / "tests" / "fixtures" / "pushed" / "real"  # pScheduler's http archiver's own
MESH_RATE = 300 / 60  # results/s of the OSG/WLCG mesh: 300 hosts, a run a minute each
TARGET = 50
TICK = os.sysconf("SC_CLK_TCK")



def templates() -> list[bytes]:
    """Each real record as JSON bytes, its start time and lead participant left to fill in."""
    out = []
    for path in sorted(FORMATS.glob("*.json")):
        run = json.loads(path.read_text())
        run["schedule"]["start"] = "@START@"
        run["participants"][0] = "@HOST@"
        out.append(json.dumps(run).encode())
    return out


def host_name(i: int) -> str:
    return f"tp{i:03d}.bench.example.org"


def token(i: int) -> str:
    return f"bench-token-{i:03d}-{'x' * 24}"


def post(conn: http.client.HTTPConnection, body: bytes,
         tok: str) -> tuple[str, http.client.HTTPConnection]:
    """Push one run as pScheduler's http archiver does: (the answer's status, or the
    error's name; the connection to use next: a new one after an error)."""
    try:
        conn.request("POST", "/", body, {"Authorization": f"Bearer {tok}",
                                         "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return str(resp.status), conn
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        return type(e).__name__, http.client.HTTPConnection(conn.host, conn.port, timeout=60)


# --- the clients (child processes: their CPU is not the receiver's, and not this process's GIL)


def client(port: int, first: int, threads: int, hosts: int, seconds: float) -> int:
    """Push runs from ``threads`` connections for ``seconds``; print the answers' counts (JSON)."""
    bodies = templates()
    counts: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def push(k: int) -> None:
        mine: dict[str, int] = {}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = 0
        base = 1_700_000_000 + (first + k) * 10_000_000  # each connection its own start times
        while time.monotonic() < stop:
            h = (first + k + n * 97) % hosts
            start = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(base + n))
            body = bodies[n % len(bodies)].replace(b"@START@", start.encode()).replace(
                b"@HOST@", host_name(h).encode())
            key, conn = post(conn, body, token(h))
            mine[key] = mine.get(key, 0) + 1
            n += 1
        conn.close()
        with lock:
            for key, v in mine.items():
                counts[key] = counts.get(key, 0) + v

    ts = [threading.Thread(target=push, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps(counts))
    return 0


# --- measuring the receiver from outside


def cpu_of(pid: int) -> float:
    """User + system seconds of ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def mem_of(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of ``pid`` in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
    return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024


def backlog(spool: Path) -> int:
    """Bytes in the spool after its committed position (read from outside: a bench's view)."""
    segs = sorted((int(p.stem), p.stat().st_size) for p in spool.glob("*.seg"))
    if not segs:
        return 0
    try:
        pos = json.loads((spool / "position.json").read_text())
        seg, off = pos["segment"], pos["offset"]
    except (OSError, ValueError):
        seg, off = segs[0][0], 0
    return sum(size - (off if n == seg else 0) for n, size in segs if n >= seg)


def broker_cpu() -> float | None:
    """CPU seconds of the RabbitMQ VM (beam.smp) so far, when it runs here."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip().startswith("beam"):
                    return cpu_of(int(p.name))
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--hosts", type=int, default=300)
    p.add_argument("--clients", type=int, default=32, help="connections pushing at once")
    p.add_argument("--seconds", type=float, default=30.0, help="of load")
    p.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        port, first, threads, hosts = map(int, a.client[:4])
        return client(port, first, threads, hosts, float(a.client[4]))
    print(machine())
    print(f"load average before: {os.getloadavg()[0]:.2f} (other work on these cores skews the rates)")
    sink = Sink("receive")
    try:
        with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
            return measure(a, Path(d), sink)
    finally:
        sink.close()


def measure(a: argparse.Namespace, tmp: Path, sink: Sink) -> int:
    (tmp / "tokens").write_text("".join(f"{host_name(i)} {token(i)}\n" for i in range(a.hosts)))
    os.chmod(tmp / "tokens", 0o640)
    port = free_port()
    conf = write_config(tmp / "psprobe.conf", {
        "collect": {"state_dir": tmp / "state"},
        "broker": {"url": AMQP_URL, "exchange": sink.name},
        "receive": {"listen": f"127.0.0.1:{port}", "plain_http": "yes", "tokens": tmp / "tokens",
                    "hosts": " ".join(host_name(i) for i in range(a.hosts))},
    })
    (tmp / "state").mkdir()
    spool = tmp / "state" / "spool"
    err = open(tmp / "receive.err", "wb")  # noqa: SIM115 (open for the child's life)
    recv = subprocess.Popen([*PSPROBE, "--config", str(conf), "receive"], stderr=err,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while True:  # up once it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if recv.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"psprobe receive did not start:\n{(tmp / 'receive.err').read_text()}")
                time.sleep(0.1)
        idle_rss = mem_of(recv.pid)[0]
        cpu0, bcpu0, t0 = cpu_of(recv.pid), broker_cpu(), time.monotonic()
        procs = 2
        kids = [subprocess.Popen([sys.executable, __file__, "--client", str(port),
                                  str(k * 1000), str(a.clients // procs + (k < a.clients % procs)),
                                  str(a.hosts), str(a.seconds)], stdout=subprocess.PIPE)
                for k in range(procs)]
        samples = []  # (s since start, RSS MB, spool backlog bytes)
        while any(k.poll() is None for k in kids):
            samples.append((time.monotonic() - t0, mem_of(recv.pid)[0], backlog(spool)))
            time.sleep(1.0)
        load_end = time.monotonic() - t0
        kids_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # the clients, reaped by poll()
        kids_cpu = kids_cpu.ru_utime + kids_cpu.ru_stime
        counts: dict[str, int] = {}
        for k in kids:
            for key, v in json.loads(k.stdout.read()).items():
                counts[key] = counts.get(key, 0) + v
            k.stdout.close()
        while backlog(spool) > 0:  # the forwarder drains what is spooled, with confirms
            samples.append((time.monotonic() - t0, mem_of(recv.pid)[0], backlog(spool)))
            if time.monotonic() - t0 > load_end + 600:
                sys.exit("the spool did not drain within 10 minutes")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        cpu, bcpu = cpu_of(recv.pid) - cpu0, broker_cpu()
        rss, peak = mem_of(recv.pid)
    finally:
        recv.terminate()
        status = recv.wait(60)
        err.close()
    tallies = [json.loads(p.read_text()) for p in (tmp / "state" / "hosts").glob("*/received.json")]
    runs = sum(t["runs"] for t in tallies)
    msgs = sum(t["messages"] for t in tallies)
    confirmed = sum(t["confirmed"] for t in tallies)
    ok = counts.get("200", 0)
    report(a, counts, ok, runs, msgs, confirmed, wall, load_end, cpu, bcpu, bcpu0, kids_cpu,
           idle_rss, rss, peak, samples, status)
    if status != 0 or runs != ok or confirmed != msgs:
        print(f"\nreceive exited {status}; tallies: {runs} runs, {msgs} messages, {confirmed} "
              f"confirmed; stderr tail:\n{(tmp / 'receive.err').read_text()[-2000:]}")
        return 1
    return 0


def report(a, counts, ok, runs, msgs, confirmed, wall, load_end, cpu, bcpu, bcpu0, kids_cpu,
           idle_rss, rss, peak, samples, status) -> None:
    refused = {k: v for k, v in counts.items() if k != "200"}
    print(f"\n{a.hosts} testpoints (own token each), {a.clients} keep-alive clients, "
          f"{a.seconds:g} s of load, {len(templates())} real records in turn")
    print(f"  answered 2xx               {ok:8,d} runs  ({msgs:,} messages; refused: "
          f"{refused or 'none'})")
    print(f"  confirmed by the broker    {confirmed:8,d} messages  (all spooled: "
          f"{'yes' if confirmed == msgs else 'NO'}; drained {wall - load_end:.1f} s after the load)")
    rate = ok / wall
    print(f"  results/s with confirms    {rate:8,.0f}     ({msgs / wall:,.0f} messages/s; "
          f"{ok / load_end:,.0f} results/s answered during the load)")
    print(f"  receiver CPU per result    {cpu / ok * 1000:8.2f} ms   ({cpu:.1f} s CPU in {wall:.1f} s: "
          f"{cpu / wall:.2f} of {os.cpu_count()} cores)")
    others = f"clients {kids_cpu:.1f} s"
    if bcpu is not None and bcpu0 is not None:
        others += f", RabbitMQ {bcpu - bcpu0:.1f} s"
    print(f"  on the same cores          {others}")
    print(f"  receiver RSS               {idle_rss:6.1f} MB idle, {peak:.1f} MB peak (VmHWM), "
          f"{rss:.1f} MB at the end")
    step = max(1, len(samples) // 12)
    print("  RSS over time              " + "  ".join(
        f"{t:.0f}s:{r:.0f}MB/{b / 1e6:.1f}" for t, r, b in samples[::step]) +
        "   (s: RSS / spool backlog MB)")
    load = [r for t, r, _ in samples if t <= load_end]
    if len(load) >= 8:
        q = len(load) // 4
        early, late = sum(load[q:2 * q]) / q, sum(load[-q:]) / q
        grow = (late - early) / early * 100
        print(f"  RSS, 2nd quarter -> last quarter of the load: {early:.1f} -> {late:.1f} MB "
              f"({grow:+.1f}%: {'flat' if abs(grow) < 10 else 'NOT flat'})")
    ratio = rate / MESH_RATE
    print(f"  the OSG/WLCG mesh (300 hosts x 1 run/min = {MESH_RATE:g} results/s): {ratio:.0f}x "
          f"(target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    print(f"  one core's worth: 1 / CPU per result = {ok / cpu:,.0f} results/s "
          f"({ok / cpu / MESH_RATE:.0f}x the mesh; the receiver is one Python process)")
    print(f"  receive exit status {status}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
