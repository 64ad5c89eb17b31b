#!/usr/bin/env python3
"""2 000 hosts: ``psprobe sync`` time and memory, then a sync with 20 hosts changed.

    python3 bench/scale.py          # under a minute

A MeshConfig document (the shape of shared/formats/meshconfig) naming 2 000
archive hosts is read by ``psprobe sync --unit-dir TMP --no-systemctl`` (a
child process): it writes 2 000 timer links and 2 000 target.json files.
Then 20 hosts leave the mesh and 20 new ones join, and a second sync runs;
every link and state file is compared before and after
(inode and mtime) to show that only those hosts were touched.
Targets (issue 7): each sync under 5 s and 100 MB.  Last, the mesh parser
alone reads a 100 000-host MeshConfig and a 100 000-host pSConfig document
(in this process): the time a very large mesh costs before any unit is touched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import PSPROBE, machine, run, write_config

from psprobe import mesh as psmesh
from psprobe import units as psunits

HOSTS = 2000
CHANGED = 20


def meshconfig(names: list[str]) -> dict:
    return {
        "description": "psprobe scale benchmark",
        "organizations": [{"sites": [{"hosts": [
            {"addresses": [n], "measurement_archives": [
                {"read_url": f"https://{n}/esmond/perfsonar/archive/",
                 "write_url": f"https://{n}/esmond/perfsonar/archive/",
                 "type": "perfsonarbuoy/owamp"}]}
            for n in names]}]}],
        "tests": [{"description": "scale", "members": {"type": "mesh", "members": names},
                   "parameters": {"type": "perfsonarbuoy/owamp"}}],
    }


def snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    """path -> (inode, mtime_ns) of every file and link under ``dirs``."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                st = os.lstat(p)
                out[p] = (st.st_ino, st.st_mtime_ns)
    return out


def main() -> int:
    print(machine())
    with tempfile.TemporaryDirectory(prefix="psprobe-bench-") as d:
        d = Path(d)
        names = [f"ps{i:04d}.scale.example.org" for i in range(HOSTS)]
        mesh = d / "mesh.json"
        mesh.write_text(json.dumps(meshconfig(names)))
        units, state = d / "units", d / "state"
        (d / "templates").mkdir()
        (d / "templates" / "psprobe@.timer").write_text("[Timer]\n")
        conf = write_config(d / "psprobe.conf", {
            "collect": {"state_dir": state},
            "mesh": {"urls": f"file://{mesh}", "template_dir": d / "templates"},
        })
        argv = [*PSPROBE, "--config", str(conf), "sync", "--unit-dir", str(units), "--no-systemctl"]
        first = run(argv)
        if first.status != 0:
            sys.exit(f"sync failed ({first.status}): {first.stderr[-2000:]}")
        links = len(psunits.enabled_hosts(units))
        before = snapshot(units, state / "hosts")

        gone, new = names[:CHANGED], [f"new{i:02d}.scale.example.org" for i in range(CHANGED)]
        mesh.write_text(json.dumps(meshconfig(names[CHANGED:] + new)))
        second = run(argv)
        if second.status != 0:
            sys.exit(f"second sync failed ({second.status}): {second.stderr[-2000:]}")
        after = snapshot(units, state / "hosts")
        created = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        rewritten = sorted(p for p in set(after) & set(before) if after[p] != before[p])

        print(f"\n{HOSTS} hosts in one mesh, sync --no-systemctl (links in a temp unit dir)")
        print(f"  {'':28} {'wall':>7} {'CPU':>7} {'peak RSS':>9}")
        for label, c in (("first sync (2000 added)", first),
                         (f"second ({CHANGED} left, {CHANGED} joined)", second)):
            print(f"  {label:28} {c.wall:>6.2f}s {c.cpu:>6.2f}s {c.maxrss_mb:>7.1f}MB")
        print(f"  first sync: {links} timer links written")
        print(f"  second sync touched: {len(created)} files created, {len(removed)} removed, "
              f"{len(rewritten)} rewritten")
        touched_hosts = {_host_of(Path(p)) for p in created + removed + rewritten}
        expected = set(gone) | set(new)
        only = touched_hosts <= expected
        print(f"  hosts whose files changed: {len(touched_hosts)} "
              f"({'only the 40 that left or joined' if only else 'MORE than the changed ones'})")
        worst = max(first.wall, second.wall), max(first.maxrss_mb, second.maxrss_mb)
        print(f"\nslowest sync {worst[0]:.2f} s (target < 5 s: {'met' if worst[0] < 5 else 'NOT met'}),"
              f" peak RSS {worst[1]:.1f} MB (target < 100 MB: {'met' if worst[1] < 100 else 'NOT met'});"
              f" second / first wall: {second.wall / first.wall:.2f}")
    parse_large()
    return 0


def _host_of(p: Path) -> str:
    """The host a changed file belongs to: its timer link, drop-in, or state directory."""
    for part in (p.name, p.parent.name):
        if part.startswith("psprobe@"):
            return part.split("@", 1)[1].split(".timer", 1)[0]
    return p.parent.name


def parse_large(n: int = 100_000) -> None:
    """Mesh discovery alone over one document naming ``n`` hosts, in both formats."""
    hosts = [f"ps-{i}.site{i % 997}.example.org" for i in range(n)]
    meshconfig_doc = {
        "organizations": [{"sites": [{"hosts": [{"addresses": [h]} for h in hosts]}]}],
        "tests": [{"members": {"type": "mesh", "members": hosts},
                   "parameters": {"type": "perfsonarbuoy/owamp"}}],
    }
    psconfig_doc = {
        "addresses": {h: {"address": h} for h in hosts},
        "archives": {"a": {"archiver": "esmond", "data": {
            "url": "https://{% scheduled_by_address %}:8443/esmond/perfsonar/archive/"}}},
        "groups": {"g": {"type": "mesh", "addresses": [{"name": h} for h in hosts]}},
        "tasks": {"t": {"group": "g", "test": "x", "archives": ["a"]}},
    }
    print(f"\nmesh discovery of one {n}-host document (parse, resolve, check every name)")
    for label, doc in (("MeshConfig", meshconfig_doc), ("pSConfig", psconfig_doc)):
        data = json.dumps(doc).encode()
        t0, c0 = time.perf_counter(), time.process_time()
        res = psmesh.discover("https://mesh.example.org/top.json", lambda url, d=data: d)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert len(res.targets) == n, len(res.targets)
        print(f"  {label:10} {wall:>6.2f}s wall {cpu:>6.2f}s CPU  ({n / wall:,.0f} hosts/s)")


if __name__ == "__main__":
    sys.exit(main())
