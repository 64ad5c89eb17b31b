#!/usr/bin/env python3
"""Start-up cost: ``psprobe --help`` and a ``collect`` that finds nothing new.

    python3 bench/startup.py        # a few seconds

Each is run 7 times as a child process (bin/psprobe); the median CPU time
(user + system) is printed next to a bare ``python3 -c pass`` of the same
interpreter, so the figures read as "what psprobe adds".  The idle collect is
the second run against a simulated archive (HTTP, real broker): the metadata
walk with ``time-start`` comes back empty, so it is one request and no
publish.  Targets (issue 7): under 150 ms of CPU each.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from _common import PSPROBE, Exchange, idle_archive, machine, run, write_config
from esmond_sim import EsmondSim

REPEAT = 7


def median(argv: list[str]) -> tuple[float, float, float]:
    runs = [run(argv) for _ in range(REPEAT)]
    bad = [c for c in runs if c.status != 0]
    if bad:
        sys.exit(f"{argv}: exit {bad[0].status}: {bad[0].stderr[-1500:]}")
    return (statistics.median(c.cpu for c in runs), statistics.median(c.wall for c in runs),
            statistics.median(c.maxrss_mb for c in runs))


def main() -> int:
    print(machine())
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d, \
            EsmondSim("127.0.0.1", 0) as sim:
        h = idle_archive(sim)
        ex = Exchange("startup")
        try:
            conf = write_config(Path(d) / "psprobe.conf", {
                "collect": {"state_dir": Path(d) / "state", "runtime_dir": Path(d) / "run"},
                "archive": {"schemes": "http"},
                "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "exchange": ex.name},
            })
            collect = [*PSPROBE, "--config", str(conf), "collect", f"127.0.0.1:{sim.port}"]
            first = run(collect)
            if first.status != 0:
                sys.exit(f"first collect failed: {first.stderr[-1500:]}")
            logged = len(h.log)
            rows = [("python3 -c pass", median([sys.executable, "-c", "pass"])),
                    ("psprobe --help", median([*PSPROBE, "--help"])),
                    ("collect, nothing new", median(collect))]
            per_run = (len(h.log) - logged) / REPEAT
            last = run(collect)
        finally:
            ex.close()
    bare = rows[0][1][0]
    print(f"\nmedian of {REPEAT} runs each")
    print(f"  {'':24} {'CPU':>8} {'wall':>8} {'peak RSS':>9} {'CPU - bare':>11}")
    for label, (cpu, wall, rss) in rows:
        print(f"  {label:24} {cpu * 1000:>6.0f}ms {wall * 1000:>6.0f}ms {rss:>7.1f}MB "
              f"{(cpu - bare) * 1000:>9.0f}ms")
    summary = next((x for x in last.stderr.splitlines() if " ok series=" in x), "")
    print(f"  archive requests per idle collect: {per_run:g}; its summary: {summary.removeprefix('<6>')}")
    for label, (cpu, _, _) in rows[1:]:
        print(f"{label}: {cpu * 1000:.0f} ms CPU (target < 150 ms: {'met' if cpu < 0.150 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
