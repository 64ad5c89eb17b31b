"""A burst under a real systemd: 200 host timers due at once, at most max_concurrent collects.

The timers are made to fall due together (a drop-in: 1 s after start, no
random delay), each collect takes about a second holding its slot (the
archive answers after 0.3 s), and the slice is polled from the host: which
processes hold a slot flock (/proc/locks), how many wait, and the resident
memory of all of them.  Figures are printed; the assertions are the bound
itself and memory under the slice's MemoryMax.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest
from esmond_sim import EsmondSim  # tests/ is on sys.path (tests/conftest.py)

from psprobe import hostnames

from .conftest import BASE_CONFIG
from .container import Container, rss_kb

pytestmark = pytest.mark.slow

HOSTS = 200
MAX_CONCURRENT = 6
SLICE_MEMORY_MAX_KB = 2 * 1024 * 1024  # units/psprobe.slice MemoryMax=2G
DROPIN = "/etc/systemd/system/psprobe@.timer.d/zz-burst.conf"
TIMER_DROPIN = """\
[Timer]
OnActiveSec=
OnActiveSec=1s
OnUnitInactiveSec=1h
RandomizedDelaySec=0
AccuracySec=1ms
"""


def _slot_inodes(c: Container) -> set[int]:
    cp = c.run(["sh", "-c", "ls -i /run/psprobe/ | awk '/slot\\./ {print $1}'"], check=True)
    return {int(x) for x in cp.stdout.split()}


def _lock_holders(inodes: set[int]) -> set[int]:
    """PIDs holding (not waiting for) a flock on one of ``inodes``."""
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"; a waiter has "->" before FLOCK
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and int(f[5].split(":")[-1]) in inodes:
            out.add(int(f[4]))
    return out


def _pss_kb(pid: int) -> int:
    """Proportional set size (kB): shared pages (the interpreter, libraries) split among
    their users, so the sum over processes is the memory they really take; 0 once gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


def test_200_timers_due_at_once_run_at_most_max_concurrent(container: Container):
    import pika

    c = container
    exchange = f"test.psprobe.burst.{uuid.uuid4().hex[:10]}"
    conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F"))
    ch = conn.channel()
    ch.exchange_declare(exchange, exchange_type="topic")
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(queue, exchange, routing_key="#")
    sim = EsmondSim("127.0.0.1", 0, default_host="burst").start()
    names = [f"burst-{i}.example.sim" for i in range(HOSTS)]
    hosts = [f"{n}:{sim.port}" for n in names]
    timers = [f"psprobe@{hostnames.unit_instance(h)}.timer" for h in hosts]
    services = [t.replace(".timer", ".service") for t in timers]
    etc_hosts = c.path("/etc/hosts")
    saved_hosts = etc_hosts.read_text() if etc_hosts.exists() else None
    try:
        now = int(time.time())
        sim.host("burst").add_test("throughput", event_types=["throughput", "packet-retransmits"],
                                   start=now - 3600, step=600)
        sim.set_latency(0.3)
        etc_hosts.write_text((saved_hosts or "") + f"127.0.0.1 {' '.join(names)}\n")
        c.write("/etc/psprobe/psprobe.conf", f"""\
[collect]
state_dir = /var/lib/psprobe
max_concurrent = {MAX_CONCURRENT}

[archive]
schemes = http
timeout = 20s
retries = 0

[broker]
url = amqp://guest:guest@127.0.0.1:5672/%2F
exchange = {exchange}
""", mode=0o640, owner="root:psprobe")
        # The slot files exist before the burst, so their inodes are known; none is left
        # from the runs of an earlier test (with max_concurrent 16, test_reload.py's).
        c.run("install -d -m 0750 -o psprobe -g psprobe /run/psprobe && cd /run/psprobe && "
              "rm -f slot.* && "
              f"for k in $(seq 0 {MAX_CONCURRENT - 1}); do install -m 0660 -o psprobe -g psprobe "
              "/dev/null slot.$k; done", check=True)
        inodes = _slot_inodes(c)
        assert len(inodes) == MAX_CONCURRENT
        c.write(DROPIN, TIMER_DROPIN)
        c.systemctl("daemon-reload", check=True)

        t0 = time.monotonic()
        c.systemctl("start", *timers, check=True)
        peak_running = peak_procs = peak_kb = peak_rss_kb = 0
        samples = 0
        done = False
        deadline = t0 + 240
        while not done and time.monotonic() < deadline:
            units = {u: p for u, p in c.slice_pids().items() if u.startswith("psprobe@")}
            pids = {p for ps in units.values() for p in ps}
            holders = _lock_holders(inodes) & pids
            kb = sum(_pss_kb(p) for p in pids)
            peak_rss_kb = max(peak_rss_kb, sum(rss_kb(p) for p in pids))
            peak_running = max(peak_running, len(holders))
            peak_procs = max(peak_procs, len(units))
            peak_kb = max(peak_kb, kb)
            samples += 1
            if samples % 20 == 0 or not units:
                cp = c.systemctl("show", "-p", "ExecMainExitTimestampMonotonic", *services)
                ran = sum(1 for line in cp.stdout.splitlines()
                          if "=" in line and line.split("=", 1)[1] not in ("", "0"))
                done = ran == HOSTS and not units
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        assert done, f"not every collect finished within {deadline - t0:.0f}s"
        cp = c.systemctl("show", "-p", "Result", *services)
        results = [line.split("=", 1)[1] for line in cp.stdout.splitlines() if "=" in line]
        assert results.count("success") == HOSTS, results
        got = 0
        while ch.basic_get(queue, auto_ack=True)[0] is not None:
            got += 1
        print(f"\nburst: {HOSTS} timers due at once, max_concurrent={MAX_CONCURRENT}: "
              f"all done in {elapsed:.1f}s; peak collects holding a slot {peak_running}, "
              f"peak units in the slice {peak_procs} (the rest waiting before their imports), "
              f"peak total memory (PSS) {peak_kb / 1024:.0f} MB "
              f"({peak_kb / max(peak_procs, 1) / 1024:.1f} MB per unit at that peak; "
              f"summed RSS, shared pages counted in every process: {peak_rss_kb / 1024:.0f} MB), "
              f"{samples} samples, {got} messages", file=sys.stderr)
        assert peak_running <= MAX_CONCURRENT
        assert peak_running >= 2  # the burst really ran collects side by side
        assert peak_procs > MAX_CONCURRENT  # and many more were queued than ran
        assert peak_kb < SLICE_MEMORY_MAX_KB
        assert got == 2 * HOSTS  # two series per host, each one chunk
    finally:
        c.systemctl("stop", *timers)
        c.run(["rm", "-f", DROPIN])
        c.systemctl("daemon-reload")
        c.run("systemctl reset-failed 'psprobe@*' || true")
        if saved_hosts is None:
            etc_hosts.unlink(missing_ok=True)
        else:
            etc_hosts.write_text(saved_hosts)
        c.write("/etc/psprobe/psprobe.conf", BASE_CONFIG, mode=0o640, owner="root:psprobe")
        sim.stop()
        try:
            ch.exchange_delete(exchange)
            conn.close()
        except Exception:  # best effort at teardown
            pass
