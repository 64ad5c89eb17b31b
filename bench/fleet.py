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
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import latency
from _common import PSPROBE, Exchange, machine, run, write_config
from esmond_sim import EsmondSim
from tlsutil import make_pki

from psprobe import config

CYCLE = 600  # the host timer's period (psprobe@.timer OnUnitInactiveSec)
TARGET = 2000


def add_host(sim: EsmondSim, name: str, now: int) -> list:
    h = sim.host(name, f"/{name}/esmond/perfsonar/archive/")
    end = now - now % latency.STEP - 2 * latency.STEP  # room for the cycle's 2 points
    return [h.add_test(latency.KINDS[i % 3], event_types=latency.EVENT_TYPES,
                       start=end - 3600 + latency.STEP, end=end, step=latency.STEP)
            for i in range(latency.TESTS)]


def cycle(names: list[str], conf: Path) -> tuple[float, list]:
    """Start a collect of every host at once; wall time of the whole cycle, and each child."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(names)) as pool:
        kids = list(pool.map(lambda n: run([*PSPROBE, "--config", str(conf), "collect", n]),
                             names))
    bad = [k for k in kids if k.status != 0]
    if bad:
        sys.exit(f"{len(bad)} collect(s) failed, first ({bad[0].status}): {bad[0].stderr[-1500:]}")
    return time.monotonic() - t0, kids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=48, help="hosts in the sample (48)")
    ap.add_argument("--parallel", type=int, help="[archive] parallel (psprobe's default)")
    ap.add_argument("--max-concurrent", type=int,
                    help="[collect] max_concurrent (psprobe's default)")
    args = ap.parse_args()
    parallel = args.parallel or config.Archive().parallel
    slots = args.max_concurrent or config.Collect().max_concurrent
    print(machine())
    print(f"sample: {args.hosts} hosts x {latency.TESTS * len(latency.EVENT_TYPES)} series, "
          f"{latency.LATENCY * 1000:.0f} ms per answer, TLS; [collect] max_concurrent = {slots}, "
          f"[archive] parallel = {parallel}\n")
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        d = Path(d)
        pki = make_pki(d / "pki")
        now = int(time.time())
        with EsmondSim("127.0.0.1", 0, tls=(str(pki.server_cert), str(pki.server_key))) as sim:
            names = [f"ps{i:04d}.fleet.example.org" for i in range(args.hosts)]
            recs = {n: add_host(sim, n, now) for n in names}
            ex = Exchange("fleet")
            try:
                state = d / "state"
                for n in names:  # what psprobe sync records for each host
                    config_dir = state / "hosts" / n
                    config_dir.mkdir(parents=True)
                    (config_dir / "target.json").write_text(
                        f'{{"host": "{n}", "read_url": "{sim.url(n)}", "meshes": ["bench"]}}')
                conf = write_config(d / "psprobe.conf", {
                    "collect": {"state_dir": state, "runtime_dir": d / "run",
                                "max_concurrent": slots, "first_run_lookback": "1h"},
                    "archive": {"schemes": "https", "verify": pki.ca, "parallel": parallel},
                    "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F",
                               "exchange": ex.name},
                    "metrics": {"textfile_dir": ""},
                })
                first, _ = cycle(names, conf)
                print(f"first runs (1 h of history, no latency): {first:.1f}s, untimed")
                busy = 0
                for n in names:
                    for i, rec in enumerate(recs[n]):
                        kind = latency.KINDS[i % 3]
                        if kind == "throughput" or (kind == "trace" and i % 2):
                            continue
                        for et in latency.EVENT_TYPES:
                            sim.hosts[n].add_points(rec.key, et, count=2, step=latency.STEP)
                            busy += 1
                sim.set_latency(latency.LATENCY)
                sim_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                requests0 = sim.stats["requests"]
                wall, kids = cycle(names, conf)
                sim_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                requests = sim.stats["requests"] - requests0
            finally:
                ex.close()
    sim_cpu = (sim_cpu1.ru_utime - sim_cpu0.ru_utime) + (sim_cpu1.ru_stime - sim_cpu0.ru_stime)
    cpu = [k.cpu for k in kids]
    per_run = statistics.median(cpu)
    run_wall = statistics.median(k.wall for k in kids[:slots])  # the first wave waits for no slot
    rss = max(k.maxrss_mb for k in kids)
    cores = os.cpu_count() or 1
    by_wall = args.hosts * CYCLE / wall
    by_cpu = CYCLE * cores / per_run
    need = TARGET * per_run / CYCLE
    print(f"one cycle: {args.hosts} hosts due at once, {busy // args.hosts} series with new points "
          f"each, {requests} archive requests ({requests / args.hosts:.0f} per host)\n")
    print(f"  cycle wall time            {wall:8.1f} s   ({args.hosts / wall:.2f} hosts/s)")
    print(f"  one collect, wall          {run_wall:8.2f} s   (median of the first {slots}, "
          f"no slot wait)")
    print(f"  one collect, CPU           {per_run:8.3f} s   (median; total {sum(cpu):.1f} s)")
    print(f"  one collect, peak RSS      {rss:8.1f} MB  (max); {slots} at once: "
          f"{rss * slots:.0f} MB at most")
    print(f"  simulator CPU (same cores) {sim_cpu:8.1f} s\n")
    print(f"hosts per {CYCLE // 60}-minute cycle, wall-bound ({slots} slots):  {by_wall:7.0f}")
    print(f"hosts per {CYCLE // 60}-minute cycle, CPU-bound ({cores} cores):   {by_cpu:7.0f}")
    print(f"{TARGET} hosts need {need:.2f} of {cores} cores ({100 * need / cores:.0f}%) and "
          f"{TARGET / by_wall * CYCLE:.0f} s of the {CYCLE} s cycle: "
          f"{'carried' if min(by_wall, by_cpu) >= TARGET else 'NOT carried'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
