#!/usr/bin/env python3
"""What a first sync's unit files cost, by the file system they are made on.

    python3 bench/unit_files.py    # PSPROBE_TEST_TMP's disk, then a fresh ext4 with a journal (root)
    python3 bench/unit_files.py --hosts 500 --runs 5

psprobe.units.apply makes, for each of ``--hosts`` new hosts, what a first sync
makes before its daemon-reload: the enablement link in
psprobe-timers.target.wants/, the drop-in directory and its 10-phase.conf
(systemctl=None: no systemd involved).  Measured on the benchmark machine's
own disk (PSPROBE_TEST_TMP, as the system tests' container uses it) and on a
fresh ext4 with a journal loop-mounted from a file on that same disk: each
first as found, then right after 11 000 files were made and removed there
(what removing one test container's root does).  Wall time and this process's
CPU (user + kernel), ``--runs`` times each.

Why: ext4 without a journal skips, for each new inode, every inode freed in
the last minutes, reading its inode-table block (fs/ext4/ialloc.c,
recently_deleted(), checked only without a journal), so there each file can
cost far more right after a large removal.  The fleet benchmark's first sync
made its files 0.4 to 2.3 s on this VM's disk and ~0.1 s on a journalled one;
bench/fleet_systemd.py therefore runs its container on a journalled ext4.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import describe_disk, journalled_ext4, machine

from psprobe import units

CHURN = 11_000  # files in the test container's root, removed when it shuts down


def churn(where: Path, n: int = CHURN) -> None:
    """Make ``n`` empty files under ``where`` and remove them."""
    d = Path(tempfile.mkdtemp(prefix="churn.", dir=where))
    for i in range(n):
        os.close(os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644))
    shutil.rmtree(d)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(where: Path, hosts: list[str]) -> tuple[float, float]:
    """(wall, CPU) of units.apply making ``hosts``' files in a new unit directory."""
    unit_dir = Path(tempfile.mkdtemp(prefix="units.", dir=where))
    try:
        c0, t0 = cpu(), time.monotonic()
        units.apply(unit_dir, hosts, [], systemctl=None)
        return time.monotonic() - t0, cpu() - c0
    finally:
        shutil.rmtree(unit_dir)


def measure(label: str, where: Path, hosts: list[str], runs: int) -> None:
    print(f"\n{label}: {describe_disk(where)}")
    for after in (False, True):
        got = []
        for _ in range(runs):
            if after:
                churn(where)
            got.append(one(where, hosts))
        walls, cpus = [w for w, _ in got], [c for _, c in got]
        what = f"right after {CHURN} files removed" if after else "as found"
        print(f"  {what:36} wall median {statistics.median(walls):.2f}s "
              f"({min(walls):.2f}..{max(walls):.2f}), CPU median {statistics.median(cpus):.2f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=2000, help="new hosts (2000)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each (3)")
    args = ap.parse_args()
    hosts = [f"ps{i:04d}.example.org" for i in range(args.hosts)]
    tmp = Path(os.environ.get("PSPROBE_TEST_TMP", "/var/tmp"))
    print(machine())
    print(f"{args.hosts} hosts' unit files (link, drop-in directory, drop-in) by psprobe.units.apply")
    measure("the machine's disk", tmp, hosts, args.runs)
    with journalled_ext4(tmp) as mnt:
        if mnt is not None:
            measure("a fresh ext4 with a journal on a file of that disk", mnt, hosts, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
