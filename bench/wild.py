#!/usr/bin/env python3
"""Faults met in the wild: how long one ``psprobe collect`` takes, its exit, and what is lost.

    python3 bench/wild.py               # about 2.5 minutes
    python3 bench/wild.py late SIGTERM  # only the cases whose name holds one of the words

Each case is built from real parts as ``tests/faults`` builds it: the archive
simulator, a loopback relay that trickles or freezes (``tests/faultproxy.py``),
and the real RabbitMQ on 127.0.0.1:5672 (a durable exchange and queue per case,
deleted at its end).  The measured run is bin/psprobe in a child process; the
runs that set a case up and catch up after it are CLI children too.

Printed per case: the faulted run's wall time and exit status, then, once the
fault is removed and the host has caught up, points lost (0 expected) against
every point the simulator holds, duplicates (bounded by one confirm window of
chunks per fault: 4 x 25 = 100) and the runs it took.  Settings are the fault
lab's (``chunk_points`` 25, ``confirm_window`` 4, ``page_points`` 50, ``parallel``
2, ``[archive] timeout`` 1s, ``retries`` 1, ``[broker] timeout`` 3s) unless a row
names its own.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import PSPROBE, ROOT, Child, machine, run
from esmond_sim import ESMOND_PREFIX, EsmondSim
from faultproxy import FaultProxy
from faults.conftest import AMQP_URL, CHUNK, STEP, WINDOW, FaultBus, Lab, Tally

A = "ps-a.example.org"
PREFIX = "perfsonar.raw."
BOUND = CHUNK * WINDOW  # duplicates allowed per fault: one confirm window of chunks
# The 13 event types psprobe collects by default, spread over four tests as a real host has
# them; and the 5 routing keys the OSG consumers read (ps_owd, ps_packetloss, ps_trace,
# ps_throughput, ps_retransmits).
THIRTEEN = {
    "latencybg": ["packet-loss-rate", "packet-count-sent", "packet-count-lost", "histogram-owdelay",
                  "histogram-ttl", "failures"],
    "throughput": ["throughput", "packet-retransmits", "throughput-subintervals",
                   "packet-retransmits-subintervals", "failures"],
    "trace": ["packet-trace", "failures"],
    "bidir": ["packet-loss-rate-bidir", "packet-count-lost-bidir", "failures"],
}
OSG_KEYS = ("histogram-owdelay", "packet-loss-rate", "packet-trace", "throughput",
            "packet-retransmits")


@dataclass
class Row:
    case: str
    wall: float | None
    exit: str
    lost: int | None
    dups: int | None = None
    runs: str = "-"
    note: str = ""


# ------------------------------------------------------------------ runs and accounting


def collect(lab: Lab, host: str, timeout: float = 180, **extra: dict) -> Child:
    """One ``psprobe collect HOST`` (bin/psprobe, a child) with ``extra`` config for this run."""
    lab.write(**extra)
    try:
        return run([*PSPROBE, "--config", str(lab.conf), "collect", host], timeout=timeout)
    finally:
        lab.write()


def summary(c: Child, host: str) -> str:
    lines = [x for x in c.stderr.splitlines() if f"collect {host}: " in x]
    return lines[-1].split(f"collect {host}: ", 1)[1] if lines else c.stderr.strip()[-200:]


def reason(c: Child, host: str) -> str:
    """The ``error=`` part of the run's summary line, its URLs left out (they are the lab's)."""
    s = summary(c, host)
    s = s.split("error=", 1)[1] if "error=" in s else s
    return re.sub(r"(https?|amqps?)://\S+?: ", "", s)


def must(c: Child, host: str, what: str) -> None:
    if c.status != 0:
        raise RuntimeError(f"{what}: exit {c.status}: {summary(c, host)}")


def catch_up(lab: Lab, host: str, max_runs: int = 5) -> tuple[str, Tally]:
    """Runs with the fault removed until nothing is lost: (runs taken, tally)."""
    for n in range(1, max_runs + 1):
        collect(lab, host)
        t = lab.tally(host)
        if t.lost == 0:
            return str(n), t
    return f">{max_runs}", t


def first_run(lab: Lab, *hosts: str) -> None:
    for h in hosts:
        must(collect(lab, h), h, f"first run of {h}")
        t = lab.tally(h)
        if t.lost:
            raise RuntimeError(f"first run of {h}: {t.lost} points lost")


def one_series(lab: Lab, name: str, event_type: str, points: int) -> tuple[str, int]:
    """A host with one series of ``points``, one a minute, ending 400 minutes before now."""
    h = lab.sim.host(name, f"/{name}{ESMOND_PREFIX}")
    start = int(time.time()) // STEP * STEP - (points + 400) * STEP
    rec = h.add_test("trace", event_types=[event_type], start=start, step=STEP, count=points)
    lab.set_read_url(name, lab.sim.url(name))
    lab.hosts[name] = lab.sim
    return rec.key, start


def shift_lookback(lab: Lab, host: str, seconds: float) -> None:
    """The host's last look-back happened ``seconds`` earlier (time passing, not sleeping)."""
    path = lab.state / "hosts" / host / "checkpoint.json"
    doc = json.loads(path.read_text())
    doc["swept"] -= seconds
    path.write_text(json.dumps(doc))


def short(text: str, n: int = 96) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ------------------------------------------------------------------ cases


def trickle(lab: Lab, rate: float) -> list[Row]:
    """The archive's answers reach psprobe at ``rate`` bytes/s; the requests go up at full speed."""
    with FaultProxy(("127.0.0.1", lab.sim.port), direction="down") as proxy:
        lab.add_host(A)
        lab.set_read_url(A, proxy.url(lab.sim.url(A)))
        first_run(lab, A)
        lab.more(A, 120)
        proxy.trickle(rate)
        c = collect(lab, A, archive={"timeout": "5s", "retries": 1})
        proxy.thaw()
        runs, t = catch_up(lab, A)
    return [Row(f"archive answer trickled at {rate:g} B/s (timeout 5s, retries 1)", c.wall,
                str(c.status), t.lost, t.duplicates, runs,
                f"{reason(c, A)} (rule: 2 attempts x 4 x 5s + 0.5s pause = 40.5s)")]


class FreezeAfterConfirms(FaultProxy):
    """A relay to RabbitMQ that freezes itself, both ways, once the broker has confirmed
    ``n`` publishes (a ``basic.ack`` with delivery tag >= n passed down to psprobe).

    Reads only the AMQP 0-9-1 frame headers of what the broker sends (type, channel,
    size, payload, 0xCE): deterministic, where polling the queue would race a fast run.
    """

    def __init__(self, target: tuple[str, int], n: int) -> None:
        super().__init__(target)
        self.n, self.confirmed, self.armed = n, 0, True
        self._bufs: dict[object, bytes] = {}

    def _forward(self, data: bytes, dst, way: str) -> bool:
        ok = super()._forward(data, dst, way)
        if way == "down" and self.armed:
            buf = self._bufs.get(dst, b"") + data
            while len(buf) >= 7:
                kind, _, size = struct.unpack(">BHI", buf[:7])
                if len(buf) < 8 + size:
                    break
                payload = buf[7:7 + size]
                if kind == 1 and payload[:4] == b"\x00\x3c\x00\x50":  # basic.ack (60, 80)
                    self.confirmed = max(self.confirmed, struct.unpack(">Q", payload[4:12])[0])
                buf = buf[8 + size:]
            self._bufs[dst] = buf
            if self.confirmed >= self.n:
                self.armed = False
                self.freeze()
        return ok


def broker_frozen(lab: Lab, heartbeat: int | None) -> list[Row]:
    lab.add_host(A)
    first_run(lab, A)
    lab.more(A, 120)  # 4 series x 120 points: 20 messages
    with FreezeAfterConfirms(("127.0.0.1", 5672), 3) as proxy:
        broker = {"url": proxy.url(AMQP_URL), "timeout": "5s"}
        if heartbeat is not None:
            broker["heartbeat"] = heartbeat
        c = collect(lab, A, broker=broker)
        froze = proxy.frozen
        proxy.thaw()
    runs, t = catch_up(lab, A)  # straight to the broker
    hb = "default (60)" if heartbeat is None else str(heartbeat)
    note = (f"froze once confirm {proxy.confirmed} passed; {reason(c, A)}" if froze
            else f"(the relay never froze) {reason(c, A)}")
    return [Row(f"broker frozen after 3 confirms (timeout 5s, heartbeat {hb})", c.wall,
                str(c.status), t.lost, t.duplicates, runs, note)]


def silent_archive(lab: Lab, give_up_after: int | None) -> list[Row]:
    """Metadata answers; no data request ever does (each waits 60 s): 70 tests x 2 types."""
    lab.add_host(A)
    h = lab.sim.hosts[A]
    start = int(time.time()) // STEP * STEP - 200 * STEP
    for _ in range(68):
        h.add_test("latencybg", event_types=["packet-loss-rate", "histogram-owdelay"],
                   start=start, step=STEP, count=100)
    series = len(h.pairs())
    lab.sim.fault(A, "slow", delay=60.0, path="/base")
    extra: dict = {"archive": {"timeout": "1s", "retries": 1, "parallel": 2}}
    if give_up_after is None:
        label = "give_up_after 3 (default)"
    else:
        extra["archive"]["give_up_after"] = give_up_after
        extra["collect"] = {"run_deadline": "30s"}
        label = f"give_up_after {give_up_after}, run_deadline 30s"
    c = collect(lab, A, **extra)
    lab.sim.clear_faults(A)
    runs, t = catch_up(lab, A)
    return [Row(f"archive silent after metadata, {series} series ({label})", c.wall, str(c.status),
                t.lost, t.duplicates, runs, reason(c, A))]


def late_points(lab: Lab) -> list[Row]:
    lab.set("collect", late_window="12h")
    lab.add_host(A)
    first_run(lab, A)
    h = lab.hosts[A].hosts[A]
    for key, et in h.pairs()[:2]:  # behind their series' checkpoints, between grid points
        last = h.points(key, et)[-1]
        h.add_points(key, et, [(last[0] - 3 * STEP - 17, last[1])])
    lab.more(A, 3)
    must(collect(lab, A), A, "run before the look-back")
    before = lab.tally(A).lost
    shift_lookback(lab, A, 6 * 3600 + 60)
    c = collect(lab, A)
    t = lab.tally(A)
    shift_lookback(lab, A, 6 * 3600 + 60)
    again = collect(lab, A)
    t2 = lab.tally(A)
    return [Row("2 late points, then a look-back run (late_window 12h)", c.wall, str(c.status),
                t2.lost, t2.duplicates, "1",
                f"missing before it: {before}; after it: {t.lost}; it says: "
                f"{_words(summary(c, A), 'late=', 'points=')}; next look-back: "
                f"{_words(summary(again, A), 'points=')}")]


def _words(line: str, *prefixes: str) -> str:
    got = [w for w in line.split() if w.startswith(prefixes)]
    return " ".join(got) or line


def unsorted(lab: Lab) -> list[Row]:
    lab.set("collect", first_run_lookback="7d")
    one_series(lab, A, "throughput", 3000)
    fault = lab.sim.fault(A, "shape", shape="unsorted", path=r"/base\?")
    c = collect(lab, A)
    requests = len(lab.sim.hosts[A].requests(r"/base$"))
    t = lab.tally(A)
    lab.sim.clear_faults()
    lab.more(A, 60)
    runs, t2 = catch_up(lab, A)
    return [Row("unsorted pages (limit before sort), 3 000 points", c.wall, str(c.status),
                t2.lost, t2.duplicates, runs,
                f"{requests} data requests ({3000 // 50 + 1} when sorted), {fault.hits} unsorted "
                f"answers; lost after it: {t.lost}, duplicates {t.duplicates}")]


def _no_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_drain(lab: Lab) -> tuple[int, int]:
    """(points in what reached the queue, bodies that are not strict JSON in strict UTF-8);
    the messages also go to ``lab.delivered`` for :meth:`Lab.tally`."""
    ch = lab.bus.channel()
    points = bad = 0
    for _ in range(100_000):
        method, props, body = ch.basic_get(lab.bus.queue, auto_ack=True)
        if method is None:
            break
        try:
            msg = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
        except ValueError:
            bad += 1
            msg = json.loads(body)
        msg["_id"] = props.message_id
        lab.delivered.append(msg)
        points += len(msg["datapoints"])
    return points, bad


def surrogate(lab: Lab) -> list[Row]:
    key, start = one_series(lab, A, "failures", 300)
    ts = start + 150 * STEP
    lab.sim.add_points(A, key, "failures", [(ts, {"error": "udp \udfff"})])
    c = collect(lab, A)
    sent, bad = strict_drain(lab)
    t = lab.tally(A, expect={(key, "failures", ts): {"error": "udp \\udfff"}})
    warned = [x for x in c.stderr.splitlines() if "surrogate" in x]
    return [Row("lone surrogate in one failures value, 300 points", c.wall, str(c.status),
                t.lost, t.duplicates, "-",
                f"points sent {sent} of 300, {bad} bodies not strict UTF-8 JSON; "
                f"{len(warned)} warning(s)")]


def five_keys(lab: Lab) -> list[Row]:
    h = lab.sim.host(A, f"/{A}{ESMOND_PREFIX}")
    start = int(time.time()) // STEP * STEP - 520 * STEP
    for template, ets in THIRTEEN.items():
        h.add_test("latencybg" if template == "bidir" else template, event_types=ets,
                   start=start, step=STEP, count=120)
    lab.set_read_url(A, lab.sim.url(A))
    lab.hosts[A] = lab.sim
    keys = {et for _, et in h.pairs()}
    ch = lab.bus.channel()
    lab.bus.unbind()
    for et in OSG_KEYS:
        ch.queue_bind(lab.bus.queue, lab.bus.exchange, routing_key=PREFIX + et)
    c = collect(lab, A)
    lab.tally(A)  # drains the queue into lab.delivered
    got: dict[tuple[str, str, int], int] = {}
    for m in lab.delivered:
        meta = m["meta"]
        for ts in m["datapoints"]:
            k = (meta["org_metadata_key"], meta["event-type"], int(ts))
            got[k] = got.get(k, 0) + 1
    want = {(k, et, ts) for k, et in h.pairs() if et in OSG_KEYS for ts, _ in h.points(k, et)}
    lost = len(want - set(got))
    dups = sum(n - 1 for k, n in got.items() if k in want)
    stray = sum(n for k, n in got.items() if k not in want)
    return [Row(f"{len(OSG_KEYS)} of {len(keys)} routing keys bound (unroutable = warn)", c.wall,
                str(c.status), lost, dups, "-",
                f"bound keys: {len(want) - lost} of {len(want)} points delivered; "
                f"{stray} points of unbound keys arrived; {_words(summary(c, A), 'unroutable=')}")]


def sigterm(lab: Lab) -> list[Row]:
    lab.add_host(A)
    first_run(lab, A)
    lab.more(A, 120)
    h = lab.hosts[A].hosts[A]
    seen = len(h.log)
    fault = lab.sim.fault(A, "stall", path="/base")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    t0 = time.monotonic()
    proc = subprocess.Popen([*PSPROBE, "--config", str(lab.conf), "collect", A], env=env,
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 30
        while not any("/base" in q.path for q in h.log[seen:]):  # a data request is under way
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("no data request within 30 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        wall = time.monotonic() - t0
    finally:
        fault.release()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    code = proc.returncode
    shown = f"{signal.Signals(-code).name}" if code < 0 else str(code)
    runs = json.loads((lab.state / "hosts" / A / "history.json").read_text())["runs"]
    last = runs[-1]
    line = [x for x in err.splitlines() if f"collect {A}: FAILED" in x and "error=" in x]
    recorded = (f"history.json: status {last.get('status')}, error={last.get('error')}"
                if last.get("status") else "history.json: no failed run recorded")
    recorded += "; summary line on stderr" if line else "; no FAILED summary line on stderr"
    lab.sim.clear_faults(A)
    catch, t = catch_up(lab, A)
    return [Row("SIGTERM mid-run (a data request under way)", wall, shown, t.lost, t.duplicates,
                catch, recorded)]


# (case number, name for the command line, what builds and measures it)
CASES: list[tuple[int, str, Callable[[Lab], list[Row]]]] = [
    (1, "trickle 100 B/s", lambda lab: trickle(lab, 100)),
    (2, "trickle 1 B/s", lambda lab: trickle(lab, 1)),
    (3, "broker frozen, heartbeat default", lambda lab: broker_frozen(lab, None)),
    (3, "broker frozen, heartbeat 0", lambda lab: broker_frozen(lab, 0)),
    (4, "silent archive, give_up_after 3", lambda lab: silent_archive(lab, None)),
    (4, "silent archive, give_up_after 0", lambda lab: silent_archive(lab, 0)),
    (5, "late points", late_points),
    (6, "unsorted pages", unsorted),
    (7, "lone surrogate", surrogate),
    (8, "5 of 13 keys bound", five_keys),
    (9, "SIGTERM", sigterm),
]


def one_case(name: str, fn: Callable[[Lab], list[Row]]) -> list[Row]:
    """``fn`` in a fresh lab: its own simulator, state, exchange and queue (deleted after)."""
    with tempfile.TemporaryDirectory(prefix="psprobe-wild-") as d, EsmondSim() as sim:
        bus = FaultBus()
        try:
            lab = Lab(Path(d), sim, bus)
            lab.set("collect", max_concurrent=0)
            return fn(lab)
        except Exception as e:  # one broken case must not hide the others
            traceback.print_exc(file=sys.stderr)
            return [Row(name, None, "ERROR", None, note=f"{type(e).__name__}: {e}")]
        finally:
            bus.close()


def main() -> int:
    print(machine())
    print(f"lab: chunk_points {CHUNK}, confirm_window {WINDOW} (duplicates bound {BOUND} per "
          "fault), page_points 50, parallel 2, [archive] timeout 1s retries 1, [broker] timeout "
          "3s, unless the case says otherwise; RabbitMQ on 127.0.0.1:5672\n")
    print("wall, exit: the faulted run of bin/psprobe collect; lost, dups: every point the "
          "simulator holds, once the fault is removed\nand the host has caught up (runs: the "
          "runs that took); below each row, what the run said or what was counted\n")
    head = f"{'case':<79} {'wall':>7} {'exit':>7} {'lost':>5} {'dups':>5} {'runs':>4}"
    print(head)
    print("-" * len(head))
    t0 = time.monotonic()
    rows: list[Row] = []
    only = sys.argv[1:]  # words: only the cases whose name holds one of them
    done: set[int] = set()
    for number, name, fn in CASES:
        if only and not any(w in name for w in only):
            continue
        done.add(number)
        for r in one_case(name, fn):
            r.case = f"{number}  {r.case}"
            rows.append(r)
            wall = f"{r.wall:.2f}s" if r.wall is not None else "-"
            lost = "-" if r.lost is None else str(r.lost)
            dups = "-" if r.dups is None else str(r.dups)
            print(f"{short(r.case, 79):<79} {wall:>7} {r.exit:>7} {lost:>5} {dups:>5} "
                  f"{r.runs:>4}\n    {short(r.note, 180)}", flush=True)
    lost = sum(r.lost or 0 for r in rows)
    errors = sum(1 for r in rows if r.lost is None)
    print(f"\ncases: {len(done)} ({len(rows)} rows); points lost: {lost}"
          + (f"; cases that could not be measured: {errors}" if errors else "")
          + f"; worst duplicates: {max((r.dups or 0 for r in rows), default=0)} (bound {BOUND})"
          + f"; benchmark took {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
