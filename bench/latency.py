#!/usr/bin/env python3
"""A far-away host: 50 ms per answer, TLS, 50 tests x 10 event types.

    python3 bench/latency.py            # about a minute

``psprobe collect`` (bin/psprobe) against one simulated archive over HTTPS
with 50 ms added before every answer, publishing to the real broker:

* first run: 12 h of history (first_run_lookback), every series;
* steady state: the next run, 5 minutes later.  Which series have new points
  follows a real host's cadence: latency tests write every minute, traceroute
  every 10 minutes (so half of them in a 5-minute window), throughput every
  6 hours (none).  "all new" is the worst case: every series has new points.

Each with ``[archive] parallel`` = 1, 4 and the default (8).  Printed: wall time,
HTTP requests (metadata / data), data requests per series that can hold new
points (1.00 = no wasted request), TLS handshakes (full + resumed) and connections.
Targets (issue 7): steady state under 3 s; 1 TLS handshake per run at parallel 1.

Last, the steady run with the broker 20 ms away (a loopback relay that holds
every chunk 10 ms each way), confirms awaited one by one and in the default
window: a run pays a broker round trip per window, not per message.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _common import PSPROBE, DelayProxy, Exchange, machine, run, write_config
from esmond_sim import ESMOND_PREFIX, EsmondSim
from tlsutil import make_pki

from psprobe import config

DEFAULT = config.Archive().parallel

LATENCY = 0.050
TESTS = 50
EVENT_TYPES = ["packet-loss-rate", "packet-count-sent", "packet-count-lost", "histogram-owdelay",
               "histogram-ttl", "packet-trace", "throughput", "packet-retransmits", "failures",
               "packet-loss-rate-bidir"]  # ten that psprobe collects by default
KINDS = ("latencybg", "trace", "throughput")  # cycled over the tests
STEP = 300
BROKER_RTT = 0.020  # a broker at another site


def world(sim: EsmondSim, now: int, name: str = "127.0.0.1", prefix: str = ESMOND_PREFIX,
          history: int = 12 * 3600, room: int = 1) -> list:
    """The far host ``name``: TESTS tests with ``history`` seconds of points, ending ``room``
    steps before now (what :func:`advance` adds later)."""
    h = sim.host(name, prefix)
    end = now - now % STEP - room * STEP
    return [h.add_test(KINDS[i % 3], event_types=EVENT_TYPES, start=end - history + STEP,
                       end=end, step=STEP) for i in range(TESTS)]


def advance(sim: EsmondSim, recs: list, everything: bool, name: str = "127.0.0.1",
            count: int = 1) -> int:
    """``count`` steps (5 minutes each) of new data; returns how many series got some."""
    h = sim.hosts[name]
    n = 0
    for i, rec in enumerate(recs):
        kind = KINDS[i % 3]
        if not everything and (kind == "throughput" or (kind == "trace" and i % 2)):
            continue
        for et in EVENT_TYPES:
            h.add_points(rec.key, et, count=count, step=STEP)
            n += 1
    return n


def collect(sim: EsmondSim, conf: Path) -> dict:
    h = sim.hosts["127.0.0.1"]
    before = dict(sim.stats)
    logged = len(h.log)
    c = run([*PSPROBE, "--config", str(conf), "collect", f"127.0.0.1:{sim.port}"])
    if c.status != 0:
        sys.exit(f"collect failed ({c.status}): {c.stderr[-2000:]}")
    reqs = h.log[logged:]
    meta = sum(1 for r in reqs if not r.path.endswith("/base"))
    return {"wall": c.wall, "cpu": c.cpu, "meta": meta, "data": len(reqs) - meta,
            **{k: sim.stats[k] - before[k]
               for k in ("tls_handshakes", "tls_resumed", "connections")}}


def _tls(r: dict) -> str:
    return f"{r['tls_handshakes'] - r['tls_resumed']}+{r['tls_resumed']}"


def main() -> int:
    print(machine())
    print(f"one archive: {TESTS} tests x {len(EVENT_TYPES)} event types = "
          f"{TESTS * len(EVENT_TYPES)} series, {LATENCY * 1000:.0f} ms per answer, TLS\n")
    print(f"{'run':<24} {'parallel':>8} {'wall':>7} {'CPU':>6} {'requests':>13} "
          f"{'data/new':>9} {'TLS full+resumed':>16} {'conns':>5}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        pki = make_pki(Path(d) / "pki")
        for parallel in sorted({1, 4, DEFAULT}):
            for everything in (False, True):
                now = int(time.time())
                with EsmondSim("127.0.0.1", 0, tls=(str(pki.server_cert),
                                                   str(pki.server_key))) as sim:
                    recs = world(sim, now)
                    sim.set_latency(LATENCY)
                    ex = Exchange("latency")
                    try:
                        conf = write_config(Path(d) / f"c-{parallel}-{everything}.conf", {
                            "collect": {"state_dir": Path(d) / f"s-{parallel}-{everything}",
                                        "max_concurrent": 0},
                            "archive": {"schemes": "https", "verify": pki.ca,
                                        "parallel": parallel},
                            "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F",
                                       "exchange": ex.name},
                        })
                        rows = []
                        if not everything:
                            rows.append(("first run (12 h)", collect(sim, conf), len(recs) * 10))
                        else:
                            collect(sim, conf)  # the first run, already shown
                        new = advance(sim, recs, everything)
                        label = "steady, all new" if everything else "steady (5 min)"
                        rows.append((label, collect(sim, conf), new))
                    finally:
                        ex.close()
                for label, r, new in rows:
                    results[(label, parallel)] = r
                    print(f"{label:<24} {parallel:>8} {r['wall']:>6.2f}s {r['cpu']:>5.2f}s "
                          f"{r['meta']:>4} + {r['data']:>4}  {r['data'] / max(new, 1):>8.2f} "
                          f"{_tls(r):>16} {r['connections']:>5}")
    s1, sd = results[("steady (5 min)", 1)], results[("steady (5 min)", DEFAULT)]
    print(f"\nsteady state at the default parallel {DEFAULT}: {sd['wall']:.2f} s "
          f"(target < 3 s: {'met' if sd['wall'] < 3 else 'NOT met'}); "
          f"parallel {DEFAULT} / parallel 1 wall: {sd['wall'] / s1['wall']:.2f}")
    print(f"TLS handshakes per run at parallel 1: {s1['tls_handshakes']} "
          f"(target 1: {'met' if s1['tls_handshakes'] == 1 else 'NOT met'}); full handshakes "
          f"at parallel {DEFAULT}: {sd['tls_handshakes'] - sd['tls_resumed']} (the other "
          f"connections resume its session)")
    far_broker()
    look_back()
    return 0


def look_back() -> None:
    """The cost of [collect] late_window: the steady run, then the same run as a look-back.

    Once per late_window / 2 a run re-reads each series from the last look-back's
    time - late_window and sends only what it had not sent; here the last look-back
    is moved late_window / 2 into the past (time passing), so the second run is one.
    """
    import json

    window = config.Collect().late_window
    print(f"\nthe steady run, then a look-back run ([collect] late_window = {window / 3600:g} h, "
          f"every {window / 7200:g} h), parallel {DEFAULT}")
    print(f"{'run':<24} {'wall':>7} {'CPU':>6} {'requests':>13} {'messages':>9}")
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        pki = make_pki(Path(d) / "pki")
        with EsmondSim("127.0.0.1", 0, tls=(str(pki.server_cert),
                                           str(pki.server_key))) as sim:
            recs = world(sim, int(time.time()), room=2)
            sim.set_latency(LATENCY)
            ex = Exchange("latency")
            state = Path(d) / "look"
            try:
                conf = write_config(Path(d) / "look.conf", {
                    "collect": {"state_dir": state, "max_concurrent": 0},
                    "archive": {"schemes": "https", "verify": pki.ca},
                    "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F",
                               "exchange": ex.name},
                })
                collect(sim, conf)
                rows, seen = [], ex.count()
                advance(sim, recs, False)
                rows.append(("steady (5 min)", collect(sim, conf), ex.count() - seen))
                seen = ex.count()
                cpf = next(state.glob("hosts/*/checkpoint.json"))
                doc = json.loads(cpf.read_text())
                doc["swept"] -= window / 2
                cpf.write_text(json.dumps(doc))
                advance(sim, recs, False)
                rows.append(("steady + look-back", collect(sim, conf), ex.count() - seen))
                size = cpf.stat().st_size
            finally:
                ex.close()
    for label, r, sent in rows:
        print(f"{label:<24} {r['wall']:>6.2f}s {r['cpu']:>5.2f}s {r['meta']:>4} + {r['data']:>4}"
              f"  {sent:>8}")
    (_, a, _), (_, b, _) = rows
    print(f"look-back / steady: wall {b['wall'] / a['wall']:.2f}x, CPU {b['cpu'] / a['cpu']:.2f}x "
          f"(once per {window / 7200:g} h); checkpoint.json with what was sent: {size / 1024:.0f} KiB")


def far_broker() -> None:
    """The steady run again with the broker BROKER_RTT away: confirms one by one, or a window."""
    print(f"\nthe same steady run, broker {BROKER_RTT * 1000:.0f} ms away (round trip), "
          f"parallel {DEFAULT}")
    print(f"{'[broker] confirm_window':<24} {'wall':>7} {'CPU':>6}")
    window = config.Broker().confirm_window
    walls = {}
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d, \
            DelayProxy(("127.0.0.1", 5672), BROKER_RTT / 2) as far:
        pki = make_pki(Path(d) / "pki")
        for w in (1, window):
            with EsmondSim("127.0.0.1", 0, tls=(str(pki.server_cert),
                                               str(pki.server_key))) as sim:
                recs = world(sim, int(time.time()))
                sim.set_latency(LATENCY)
                ex = Exchange("latency")
                try:
                    conf = write_config(Path(d) / f"far-{w}.conf", {
                        "collect": {"state_dir": Path(d) / f"far-{w}", "max_concurrent": 0},
                        "archive": {"schemes": "https", "verify": pki.ca},
                        "broker": {"url": far.url("amqp://guest:guest@127.0.0.1:5672/%2F"),
                                   "exchange": ex.name, "confirm_window": w},
                    })
                    collect(sim, conf)
                    advance(sim, recs, False)
                    r = collect(sim, conf)
                finally:
                    ex.close()
            walls[w] = r["wall"]
            label = f"{w}{' (default)' if w == window else ' (one by one)'}"
            print(f"{label:<24} {r['wall']:>6.2f}s {r['cpu']:>5.2f}s")
    print(f"window {window} / one by one, wall: {walls[window] / walls[1]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
