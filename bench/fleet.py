#!/usr/bin/env python3
"""Does one collector machine carry 2 000 far-away hosts?  A cycle of collects, measured.

    python3 bench/fleet.py                      # about two minutes
    python3 bench/fleet.py --hosts 96 --parallel 4 --max-concurrent 16

Every host has the far-host profile of bench/latency.py: 50 tests x 10 event
types (500 series) over TLS with 50 ms per answer, and a 10-minute timer cycle
brings 2 points to each of its 250 busy series (latency tests and half the
traceroutes; throughput tests write every 6 hours).  A sample of ``--hosts``
such hosts, each behind its own path on one simulator port, is first
collected once (untimed, no latency), then all fall due at once, as their
timers would after a pause: ``bin/psprobe collect`` per host, bounded by the
real ``[collect] max_concurrent`` slots.  Measured: the wall time of that
cycle, each collect's own CPU and peak RSS (wait4), and the simulator's CPU,
which shares the same cores (so the wall figure is pessimistic).

Printed: hosts per 10-minute cycle the machine sustains, bounded by wall time
(slots x latency) and by CPU (collector CPU per run), against the 2 000 target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import latency
from _common import PSPROBE, Child, Exchange, machine, run, write_config
from esmond_sim import ESMOND_PREFIX, EsmondSim
from tlsutil import make_pki

from psprobe import config

CYCLE = 600  # the host timer's period (psprobe@.timer OnUnitInactiveSec)
TARGET = 2000


def cycle(names: list[str], conf: Path) -> tuple[float, list[Child]]:
    """Start a collect of every host at once; wall time of the whole cycle, and each child."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(names)) as pool:
        kids = list(pool.map(lambda n: run([*PSPROBE, "--config", str(conf), "collect", n]),
                             names))
    bad = [k for k in kids if k.status != 0]
    if bad:
        sys.exit(f"{len(bad)} collect(s) failed, first ({bad[0].status}): {bad[0].stderr[-1500:]}")
    return time.monotonic() - t0, kids


def _duration(stderr: str) -> float:
    """``duration=`` of the run's summary line: its own time, after it got a slot."""
    m = re.search(r" duration=([0-9.]+)s", stderr)
    return float(m.group(1)) if m else float("nan")


def _broker_cpu() -> float:
    """CPU seconds of the local RabbitMQ (beam.smp) so far, or NaN: it shares the cores."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(beam.smp)" in text:
            fields = text.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=48, help="hosts in the sample (48)")
    ap.add_argument("--latency", type=float, default=latency.LATENCY,
                    help="seconds added before each answer (0.05)")
    ap.add_argument("--parallel", type=int, help="[archive] parallel (psprobe's default)")
    ap.add_argument("--max-concurrent", type=int,
                    help="[collect] max_concurrent (psprobe's default)")
    args = ap.parse_args()
    parallel = args.parallel or config.Archive().parallel
    slots = args.max_concurrent or config.Collect().max_concurrent
    print(machine())
    print(f"sample: {args.hosts} hosts x {latency.TESTS * len(latency.EVENT_TYPES)} series, "
          f"{args.latency * 1000:.0f} ms per answer, TLS; [collect] max_concurrent = {slots}, "
          f"[archive] parallel = {parallel}")
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        d = Path(d)
        pki = make_pki(d / "pki")
        now = int(time.time())
        with EsmondSim("127.0.0.1", 0, tls=(str(pki.server_cert), str(pki.server_key))) as sim:
            names = [f"ps{i:04d}.fleet.example.org" for i in range(args.hosts)]
            recs = {n: latency.world(sim, now, n, f"/{n}{ESMOND_PREFIX}", history=3600, room=2)
                    for n in names}
            ex = Exchange("fleet")
            try:
                state = d / "state"
                for n in names:  # what psprobe sync records for each host
                    (state / "hosts" / n).mkdir(parents=True)
                    (state / "hosts" / n / "target.json").write_text(json.dumps(
                        {"host": n, "read_url": sim.url(n), "meshes": ["bench"]}))
                conf = write_config(d / "psprobe.conf", {
                    "collect": {"state_dir": state, "runtime_dir": d / "run",
                                "max_concurrent": slots, "first_run_lookback": "1h"},
                    "archive": {"schemes": "https", "verify": pki.ca, "parallel": parallel},
                    "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F",
                               "exchange": ex.name},
                    "metrics": {"textfile_dir": ""},
                })
                first, _ = cycle(names, conf)
                print(f"first runs (1 h of history, no latency): {first:.1f}s, untimed\n")
                busy = sum(latency.advance(sim, recs[n], False, n, count=2) for n in names)
                sim.set_latency(args.latency)
                broker0, sim0 = _broker_cpu(), resource.getrusage(resource.RUSAGE_SELF)
                requests0 = sim.stats["requests"]
                wall, kids = cycle(names, conf)
                sim1 = resource.getrusage(resource.RUSAGE_SELF)
                broker = _broker_cpu() - broker0
                requests = sim.stats["requests"] - requests0
                # Nothing new now: a few runs one at a time give the cost outside duration=
                # (interpreter, imports, exit) without waiting for a slot.
                idle = [run([*PSPROBE, "--config", str(conf), "collect", n]) for n in names[:7]]
            finally:
                ex.close()
    sim_cpu = (sim1.ru_utime - sim0.ru_utime) + (sim1.ru_stime - sim0.ru_stime)
    cpu = statistics.median(k.cpu for k in kids)
    duration = statistics.median(_duration(k.stderr) for k in kids)
    outside = statistics.median(k.wall - _duration(k.stderr) for k in idle)
    cores = os.cpu_count() or 1
    need = TARGET * cpu / CYCLE
    by_slots = slots * CYCLE / (duration + outside)
    print(f"one cycle: {args.hosts} hosts due at once, {busy // args.hosts} series with new points "
          f"each, {requests} archive requests ({requests / args.hosts:.0f} per host)")
    print(f"  cycle wall time             {wall:7.1f} s   ({args.hosts / wall:.2f} hosts/s)")
    print(f"  one collect, CPU            {cpu:7.3f} s   (median; idle host: "
          f"{statistics.median(k.cpu for k in idle):.3f} s)")
    print(f"  one collect, duration=      {duration:7.2f} s   (median; + {outside:.2f} s start "
          f"and exit outside it)")
    print(f"  one collect, peak RSS       {max(k.maxrss_mb for k in kids):7.1f} MB  (max)")
    print(f"  simulator, RabbitMQ CPU     {sim_cpu:7.1f} s, {broker:.1f} s (on the same cores)\n")
    print(f"measured here: {args.hosts * CYCLE / wall:.0f} hosts per {CYCLE // 60}-minute cycle, "
          "while this machine also served the archives and the broker")
    print(f"the collector alone, per {CYCLE // 60}-minute cycle:")
    print(f"  CPU:   {TARGET} hosts need {need:.2f} of {cores} cores ({100 * need / cores:.0f}%)")
    print(f"  slots: a run holds its slot {duration + outside:.2f} s; {slots} slots serve "
          f"{by_slots:.0f} hosts ({100 * TARGET / by_slots:.0f}% busy at {TARGET})")
    ok = need < cores and by_slots >= TARGET
    print(f"{TARGET} hosts of this profile: {'carried' if ok else 'NOT carried'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
