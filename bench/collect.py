#!/usr/bin/env python3
"""Collect throughput against its floor, and memory for a million-point backlog.

    python3 bench/collect.py            # 100 000 points, then 1 000 000 (a few minutes)
    python3 bench/collect.py --points 70000 --no-million

1. ``psprobe collect`` (bin/psprobe, a child process) of one simulated host
   into the real broker (127.0.0.1:5672), publisher confirms and a fsync'd
   checkpoint after every confirmed message, as in production.
2. The floor: the very requests that collect made (replayed from the
   simulator's log) fetched over one keep-alive connection with the collector's
   own HTTP client (``psprobe.fetch``), decoded, and encoded
   into the same message bodies with ``psprobe.messages.Encoder``; not
   published, no checkpoint.  Also a child process.
Both print points/s, CPU seconds per 10 000 points and peak RSS; then the ratio.
Targets (issue 2): CPU per point <= 1.3x the floor; peak RSS < 60 MB at 1 000 000 points.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import PSPROBE, Exchange, machine, run, write_config
from esmond_sim import EsmondSim

# The simulator's default host (its standalone server's templates): latency,
# throughput and traceroute tests, each with every event type psprobe collects
# by default -- small values (loss rates, counts), middling ones (histograms)
# and big ones (subintervals, traceroute paths), as a real host serves them.
TEMPLATES = ("latencybg", "throughput", "trace")
STEP = 10


def _collected(template: str) -> list[str]:
    from esmond_sim import TEMPLATES as T

    from psprobe.config import Collect

    wanted = set(Collect().event_types)
    return [e[0] for e in T[template]["event-types"] if e[0] in wanted]


def build(sim: EsmondSim, name: str, points: int, now: int) -> tuple[int, int]:
    """Tests on ``name`` holding about ``points`` points in all; (series, points)."""
    h = sim.host(name)
    per_test = [len(_collected(t)) for t in TEMPLATES]
    tests = max(3, round(points / 5000 / (sum(per_test) / len(per_test))))
    series = sum(per_test[i % len(TEMPLATES)] for i in range(tests))
    per = points // series
    for i in range(tests):
        t = TEMPLATES[i % len(TEMPLATES)]
        h.add_test(t, event_types=_collected(t), start=now - per * STEP, step=STEP, count=per)
    return series, h.total_points()


def floor_child(base: str, log_file: str, chunk: int) -> int:
    """The floor, in its own process: replay the requests, decode, encode; publish nothing."""
    import json
    import time

    from psprobe.fetch import Pool
    from psprobe.messages import Encoder, meta_for

    reqs = json.loads(Path(log_file).read_text())
    pool = Pool(base, 1, 60)
    encoders: dict[str, Encoder] = {}
    records: dict[str, dict] = {}
    points = 0
    for path, query in reqs:
        body = pool.get(f"{path}?{query}", 1 << 30, time.monotonic() + 600).body
        page = json.loads(body)
        parts = path.rstrip("/").split("/")
        if parts[-1] != "base":  # the metadata walk
            for rec in page:
                records[rec["metadata-key"]] = rec
            continue
        key, et = parts[-3], parts[-2]
        enc = encoders.get(f"{key}/{et}")
        if enc is None:
            enc = encoders[f"{key}/{et}"] = Encoder(meta_for(records[key], et),
                                                   "perfsonar.raw." + et)
        pts = [(p["ts"], p["val"]) for p in page]
        for k in range(0, len(pts), chunk):
            enc.encode(pts[k:k + chunk])
        points += len(pts)
    print(points)
    return 0


def measure(points: int, tmp: Path) -> dict[str, float]:
    now = int(time.time())
    with EsmondSim("127.0.0.1", 0) as sim:
        name = "127.0.0.1"
        series, total = build(sim, name, points, now)
        host = f"127.0.0.1:{sim.port}"
        ex = Exchange("collect")
        try:
            conf = write_config(tmp / f"psprobe-{points}.conf", {
                "collect": {"state_dir": tmp / f"state-{points}", "first_run_lookback": "30d",
                            "max_concurrent": 0},
                "archive": {"schemes": "http", "timeout": "60s"},
                "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "exchange": ex.name},
            })
            c = run([*PSPROBE, "--config", str(conf), "collect", host])
            if c.status != 0:
                sys.exit(f"collect failed ({c.status}): {c.stderr[-2000:]}")
            summary = next(line for line in c.stderr.splitlines() if f"collect {host}: ok" in line)
            got = int(summary.split(" points=")[1].split()[0])
            if got != total:
                sys.exit(f"collect published {got} of {total} points: {summary}")
            reqs = [(r.path, r.query) for r in sim.hosts[name].requests()]
        finally:
            ex.close()
        import json

        log_file = tmp / f"requests-{points}.json"
        log_file.write_text(json.dumps(reqs))
        f = run([sys.executable, __file__, "--floor-child", f"http://{host}", str(log_file), "200"])
        if f.status != 0 or int(f.stdout.split()[0]) != total:
            sys.exit(f"floor failed ({f.status}): {f.stdout[-200:]} {f.stderr[-2000:]}")
    row = {"points": total, "series": series, "requests": len(reqs),
           "collect_wall": c.wall, "collect_cpu": c.cpu, "collect_rss": c.maxrss_mb,
           "floor_wall": f.wall, "floor_cpu": f.cpu, "floor_rss": f.maxrss_mb}
    return row


def report(r: dict[str, float]) -> None:
    n = r["points"]
    print(f"\n{n:,} points in {r['series']} series, {r['requests']} archive requests, "
          f"chunks of 200 points ({n // 200:,}+ messages)")
    print(f"  {'':8} {'points/s':>10} {'CPU s/10k pts':>14} {'peak RSS':>9} {'wall':>7}")
    for who in ("collect", "floor"):
        print(f"  {who:8} {n / r[who + '_wall']:>10,.0f} {r[who + '_cpu'] / n * 10000:>14.3f} "
              f"{r[who + '_rss']:>7.1f}MB {r[who + '_wall']:>6.1f}s")
    ratio = r["collect_cpu"] / r["floor_cpu"]
    print(f"  CPU per point, collect / floor: {ratio:.2f}x  (target <= 1.30x: "
          f"{'met' if ratio <= 1.3 else 'NOT met'})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--no-million", action="store_true", help="skip the 1 000 000-point run")
    p.add_argument("--floor-child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.floor_child:
        return floor_child(a.floor_child[0], a.floor_child[1], int(a.floor_child[2]))
    print(machine())
    ok = True
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        report(measure(a.points, Path(d)))
        if not a.no_million:
            r = measure(1_000_000, Path(d))
            report(r)
            ok = r["collect_rss"] < 60
            print(f"  peak RSS of collect with a 1 000 000-point backlog: {r['collect_rss']:.1f} MB "
                  f"(target < 60 MB: {'met' if ok else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
