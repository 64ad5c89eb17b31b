#!/usr/bin/env python3
"""What the sandbox of psprobe@.service costs per run, directive by directive, under the real systemd.

    sudo python3 bench/sandbox_cost.py                  # about 20 minutes (root: boots a container)
    sudo python3 bench/sandbox_cost.py --runs 12 --only stock,ProtectHome,no-hardening
    sudo python3 bench/sandbox_cost.py --before old@.service --only stock --load 2000
    sudo python3 bench/sandbox_cost.py --unified        # cgroup v2 only inside, as on EL9
    git archive --prefix=old/ HEAD~3 | tar -x -C /tmp   # then psprobe and its unit as they were:
    sudo python3 bench/sandbox_cost.py --tree /tmp/old --unit /tmp/old/units/psprobe@.service --only stock

The test container of tests/system (systemd 252) gets psprobe installed as the package
lays it out (byte-compiled, as the RPM does) and a config naming one simulated archive
(tests/esmond_sim.py on loopback) whose tests ended in the past: after a first run,
every run is idle (one metadata request, no broker connection), the run a fleet makes
most.  ``--load N`` adds N idle timers (and their services) to PID 1, as a fleet's
sync does: PID 1's fork and bookkeeping grow with the units it holds.

Variants: the unit as it is (``stock``); the unit with each directive taken back by a
drop-in (its default restored), and groups of them (``no-seccomp``,
``no-mount-namespace``, ``no-hardening``); ``before``: another unit file (``--before``)
in /etc/systemd/system.  Each variant runs ``--runs`` times, in ``--rounds`` turns
interleaved with the other variants, started by a timer 250 ms after the previous run
ended, as the fleet's timers start them (no systemctl call per run).  Between runs the
host reads the slice's CPU (cgroup v2 ``cpu.stat``: the forked child from its first
instruction, so the sandbox set-up and the program) and the CPU of the container's PID 1
and journald (``/proc/PID/task/*/schedstat``, ns).  (systemd's CPUUsageNSec is of no
use here: it is gone with the unit once a oneshot's unit is unloaded, and missing on a
hybrid hierarchy.)  Then ``/bin/true`` runs under the same sandbox: the sandbox's own
cost, apart from psprobe's.  ``systemd-analyze security`` gives each variant's exposure.
Printed: medians per run, in ms of CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import ROOT, Exchange, idle_archive, machine
from esmond_sim import EsmondSim

from psprobe import hostnames
from tests.system import container as ct

GAP = 0.25  # the bench timer's OnUnitInactiveSec: idle time between two runs
QUIET = 0.05  # no CPU in the slice for this long and no unit cgroup left: between runs
ETC = "/etc/systemd/system"
DROPIN_DIR = f"{ETC}/psprobe@.service.d"
TIMER = "psprobe-bench.timer"
BENCH_DROPIN = "[Unit]\n# runs 250 ms apart, many times a minute\nStartLimitIntervalSec=0\n"
TRUE_DROPIN = "ExecStart=\nExecStart=/bin/true\n"
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")
TICK = os.sysconf("SC_CLK_TCK")

# How a drop-in takes each directive back: the unit's value replaced by systemd's default.
REMOVE: dict[str, str] = {
    "NoNewPrivileges": "NoNewPrivileges=no",
    "CapabilityBoundingSet": "CapabilityBoundingSet=~",
    "ProtectSystem": "ProtectSystem=no",
    "ProtectHome": "ProtectHome=no",
    "PrivateTmp": "PrivateTmp=no",
    "PrivateDevices": "PrivateDevices=no",
    "PrivateUsers": "PrivateUsers=no",
    "ProtectKernelTunables": "ProtectKernelTunables=no",
    "ProtectKernelModules": "ProtectKernelModules=no",
    "ProtectKernelLogs": "ProtectKernelLogs=no",
    "ProtectControlGroups": "ProtectControlGroups=no",
    "ProtectClock": "ProtectClock=no",
    "ProtectHostname": "ProtectHostname=no",
    "ProtectProc": "ProtectProc=default",
    "ProcSubset": "ProcSubset=all",
    "DevicePolicy": "DevicePolicy=auto",
    "RestrictAddressFamilies": "RestrictAddressFamilies=",
    "RestrictNamespaces": "RestrictNamespaces=no",
    "RestrictRealtime": "RestrictRealtime=no",
    "RestrictSUIDSGID": "RestrictSUIDSGID=no",
    "LockPersonality": "LockPersonality=no",
    "MemoryDenyWriteExecute": "MemoryDenyWriteExecute=no",
    "SystemCallArchitectures": "SystemCallArchitectures=",
    "SystemCallFilter": "SystemCallFilter=",
    "ReadWritePaths": "ReadWritePaths=",
    "ReadOnlyPaths": "ReadOnlyPaths=",
    "InaccessiblePaths": "InaccessiblePaths=",
    "TemporaryFileSystem": "TemporaryFileSystem=",
    "BindReadOnlyPaths": "BindReadOnlyPaths=",
    # Not hardening, but per-start work of PID 1 or of the child:
    "StateDirectory": "StateDirectory=\nReadWritePaths=/var/lib/psprobe",
    "RuntimeDirectory": "RuntimeDirectory=\nReadWritePaths=/run/psprobe",
    "IOSchedulingClass": "IOSchedulingClass=\nIOSchedulingPriority=",
    "Nice": "Nice=",
    "MemoryMax": "MemoryMax=infinity",
    "TasksMax": "TasksMax=infinity",
}
SECCOMP = ("SystemCallFilter", "SystemCallArchitectures", "RestrictAddressFamilies",
           "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute", "RestrictRealtime",
           "RestrictSUIDSGID")
MOUNTS = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
          "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
          "ProcSubset", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
          "TemporaryFileSystem", "BindReadOnlyPaths")
HARDENING = (*SECCOMP, *MOUNTS, "NoNewPrivileges", "CapabilityBoundingSet", "PrivateUsers",
             "ProtectClock", "ProtectHostname", "DevicePolicy")
GROUPS = {"no-seccomp": SECCOMP, "no-mount-namespace": MOUNTS, "no-hardening": HARDENING}


@dataclass
class Variant:
    name: str
    dropin: str = ""  # [Service] lines
    unit: str | None = None  # a whole unit file put in /etc/systemd/system (--before)


def unit_keys(text: str) -> set[str]:
    return {line.split("=", 1)[0].strip() for line in text.splitlines()
            if "=" in line and line.strip()[:1] not in ("#", ";", "[")}


def variants(unit_text: str, before: str | None) -> list[Variant]:
    """The unit; ``before`` (another version of it); each directive, then each group, taken back."""
    keys = unit_keys(unit_text)
    out = [Variant("stock")]
    if before is not None:
        out.append(Variant("before", unit=before))
    out += [Variant(k, REMOVE[k]) for k in REMOVE if k in keys]
    # A group takes back StateDirectory's binds too: with no namespace they are plain directories.
    out += [Variant(name, "\n".join(REMOVE[k] for k in group if k in keys))
            for name, group in GROUPS.items()]
    return out


# --- reading CPU from the host


def unified_dir(leader: int) -> Path:
    """Host path of the container's root cgroup in the cgroup v2 hierarchy."""
    with open(f"/proc/{leader}/cgroup") as f:
        path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    top = Path("/sys/fs/cgroup/unified")
    if not (top / "cgroup.procs").exists():
        top = Path("/sys/fs/cgroup")
    return top / path.lstrip("/").removesuffix("init.scope").rstrip("/")


def usage_ns(cgroup: Path) -> int:
    with open(cgroup / "cpu.stat") as f:
        return int(f.readline().split()[1]) * 1000  # usage_usec, the first line


def task_ns(pid: int) -> int:
    """CPU of the live threads of ``pid`` so far (schedstat: ns, no tick rounding)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def proc_ticks(pid: int) -> int:
    """utime + stime of ``pid``: every thread, exited ones too (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def in_container(leader: int, comm: str) -> int:
    """Host PID of the process named ``comm`` in the container of ``leader``."""
    ns = os.readlink(f"/proc/{leader}/ns/pid")
    for p in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p}/comm").read_text().strip() == comm and os.readlink(f"/proc/{p}/ns/pid") == ns:
                return int(p)
    raise RuntimeError(f"no {comm} in the container")


@dataclass
class Runs:
    """Per-run CPU (ms) of the unit's cgroup, of PID 1 and of journald."""

    service: list[float] = field(default_factory=list)
    pid1: list[float] = field(default_factory=list)
    journald: list[float] = field(default_factory=list)
    pid1_ticks: int = 0  # over all the runs, exited threads included

    def med(self, name: str) -> float:
        return statistics.median(getattr(self, name)) if getattr(self, name) else float("nan")

    def pid1_mean(self) -> float:
        return self.pid1_ticks * 1000 / TICK / len(self.pid1) if self.pid1 else float("nan")

    def add(self, other: Runs) -> None:
        self.service += other.service
        self.pid1 += other.pid1
        self.journald += other.journald
        self.pid1_ticks += other.pid1_ticks


def watch(slice_dir: Path, pids: tuple[int, int], runs: int, timeout: float) -> Runs:
    """Sample between runs (the slice idle for QUIET, no unit cgroup in it); the first run is
    a warm-up.  One sample per gap: the timer leaves GAP between runs, far above QUIET."""
    samples: list[tuple[int, int, int, int]] = []
    last, changed, busy = -1, time.monotonic(), False
    deadline = time.monotonic() + timeout
    while len(samples) < runs + 1:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{len(samples)} of {runs + 1} runs seen in {timeout:g}s")
        try:
            u = usage_ns(slice_dir)
            kids = any(e.is_dir() for e in os.scandir(slice_dir))
        except FileNotFoundError:  # the slice not made yet
            u, kids = last, False
        if u != last:
            last, changed, busy = u, now, True
        elif busy and not kids and now - changed >= QUIET:
            samples.append((u, task_ns(pids[0]), task_ns(pids[1]), proc_ticks(pids[0])))
            busy = False
        time.sleep(0.002)
    out = Runs(pid1_ticks=samples[-1][3] - samples[0][3])
    for a, b in zip(samples, samples[1:]):
        out.service.append((b[0] - a[0]) / 1e6)
        out.pid1.append((b[1] - a[1]) / 1e6)
        out.journald.append((b[2] - a[2]) / 1e6)
    return out


# --- the container


@dataclass
class Bench:
    c: ct.Container
    unit: str  # psprobe@HOST.service
    slice_dir: Path
    pids: tuple[int, int]  # host PIDs of the container's PID 1 and journald

    def use(self, v: Variant, true: bool = False) -> None:
        c = self.c
        override = c.path(f"{ETC}/psprobe@.service")
        if v.unit is None:
            override.unlink(missing_ok=True)
        else:
            c.write(f"{ETC}/psprobe@.service", v.unit)
        c.write(f"{DROPIN_DIR}/50-variant.conf", f"[Service]\n{v.dropin}\n" + (TRUE_DROPIN if true else ""))
        c.systemctl("daemon-reload", check=True)

    def measure(self, runs: int) -> Runs:
        """``runs`` timer-started runs of the unit as it is set up now."""
        c = self.c
        cursor = c.run(["journalctl", "-n0", "--show-cursor", "-q"]).stdout.split("cursor: ")[-1].strip()
        c.systemctl("start", TIMER, check=True)
        try:
            got = watch(self.slice_dir, self.pids, runs, timeout=runs * 20 + 60)
        finally:
            c.systemctl("stop", TIMER)
        ct.wait_until(f"{self.unit} done", lambda: c.systemctl("is-active", self.unit).stdout.strip()
                      in ("inactive", "failed"), 60)
        log = c.run(["journalctl", "-q", "-o", "cat", "-u", self.unit, f"--after-cursor={cursor}"]).stdout
        done = log.count("Deactivated successfully")
        if "Failed with result" in log or done not in (runs + 1, runs + 2):
            tail = "\n".join(log.splitlines()[-15:])
            raise RuntimeError(f"{self.unit}: {done} runs done for {runs + 1} seen; the journal:\n{tail}")
        return got

    def exposure(self) -> float:
        out = self.c.run(["systemd-analyze", "security", "--no-pager", "psprobe@x.service"]).stdout
        m = EXPOSURE.search(out)
        return float(m.group(1)) if m else float("nan")

    def bare(self, argv: list[str], runs: int) -> float:
        """Median CPU (ms) of ``argv`` run as psprobe inside the container, outside systemd."""
        wrapper = ("import os,sys\npid=os.fork()\nif pid==0: os.execv(sys.argv[1], sys.argv[1:])\n"
                   "_,st,ru=os.wait4(pid,0)\nprint(os.waitstatus_to_exitcode(st), ru.ru_utime+ru.ru_stime)")
        cpu = []
        for _ in range(runs):
            cp = self.c.run(["python3", "-c", wrapper, *argv], user="psprobe")
            status, t = cp.stdout.split()
            if status != "0":
                raise RuntimeError(f"bare {argv}: exit {status}: {cp.stderr[-800:]}")
            cpu.append(float(t) * 1000)
        return statistics.median(cpu)


def load(c: ct.Container, n: int) -> None:
    """``n`` timers that never fire, with their services, loaded and started in PID 1."""
    c.write(f"{ETC}/bench-load@.service", "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    c.write(f"{ETC}/bench-load@.timer", "[Timer]\nOnCalendar=2099-01-01\n")
    c.systemctl("daemon-reload", check=True)
    names = [f"bench-load@{i}.timer" for i in range(n)]
    for i in range(0, n, 500):
        c.systemctl("start", *names[i:i + 500], check=True)


def setup(c: ct.Container, tree: Path, unit_text: str, port: int, exchange: str,
          compiled: bool) -> Bench:
    ct.install_psprobe(c, "", repo=tree)
    c.write("/usr/lib/systemd/system/psprobe@.service", unit_text)
    if compiled:  # as the RPM does (%py_byte_compile); the units forbid writing a cache
        c.run(["python3", "-m", "compileall", "-q", f"/{ct.SITE}/psprobe"], check=True)
    c.write("/etc/psprobe/psprobe.conf", "\n".join([
        "[collect]", "state_dir = /var/lib/psprobe", "",
        "[archive]", "schemes = http", "",
        "[broker]", "url = amqp://guest:guest@127.0.0.1:5672/%2F", f"exchange = {exchange}", ""]),
        mode=0o640, owner="root:psprobe")
    unit = f"psprobe@{hostnames.unit_instance(f'127.0.0.1:{port}')}.service"
    c.write(f"{DROPIN_DIR}/10-bench.conf", BENCH_DROPIN)
    c.write(f"{ETC}/{TIMER}", f"[Timer]\nUnit={unit}\nOnActiveSec=1ms\n"
            f"OnUnitInactiveSec={int(GAP * 1000)}ms\nAccuracySec=1ms\n")
    c.systemctl("daemon-reload", check=True)
    first = c.systemctl("start", unit)  # everything the archive has: the runs after are idle
    if first.returncode != 0:
        raise RuntimeError(f"first collect failed: {c.journal(unit, '-n', '30')}")
    return Bench(c, unit, unified_dir(c.leader) / "psprobe.slice",
                 (c.leader, in_container(c.leader, "systemd-journal")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="measured runs of psprobe per variant (30)")
    ap.add_argument("--rounds", type=int, default=3, help="turns the runs are split in (3)")
    ap.add_argument("--unit", type=Path, default=ROOT / "units" / "psprobe@.service",
                    help="the unit file measured (default: units/psprobe@.service)")
    ap.add_argument("--tree", type=Path, default=ROOT,
                    help="the source tree psprobe is installed from (default: this one)")
    ap.add_argument("--before", type=Path, help="another version of the unit, measured as 'before'")
    ap.add_argument("--only", help="comma-separated variants (default: all)")
    ap.add_argument("--load", type=int, default=0, metavar="N", help="N idle timers in PID 1 (0)")
    ap.add_argument("--no-true", action="store_true", help="skip the /bin/true runs")
    ap.add_argument("--unified", action="store_true",
                    help="boot the container with cgroup v2 only (default: as the host gives it)")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave psprobe without .pyc, as tests/system installs it")
    args = ap.parse_args()
    reason = ct.unavailable_reason()
    if reason:
        sys.exit(f"sandbox_cost: {reason}")
    unit_text = args.unit.read_text()
    todo = variants(unit_text, args.before.read_text() if args.before else None)
    if args.only:
        want = args.only.split(",")
        todo = [v for v in todo if v.name in want]
    if args.unified:
        os.environ["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
    print(machine())
    base = ct.prepare_root()
    per = -(-args.runs // args.rounds)
    with EsmondSim("127.0.0.1", 0) as sim, ct.booted(base) as c:
        idle_archive(sim)
        ex = Exchange("sandbox")
        try:
            b = setup(c, args.tree, unit_text, sim.port, ex.name, not args.no_compile)
            if args.load:
                load(c, args.load)
            cgv = ("v2 only" if args.unified else
                   "hybrid" if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() else "the host's")
            ver = c.run(["systemctl", "--version"]).stdout.split("\n")[0]
            units = c.run("systemctl list-units --all --no-legend | wc -l").stdout.strip()
            print(f"{ver}; cgroups {cgv}; {units} units loaded; psprobe from {args.tree}; unit {args.unit}"
                  + (f", before {args.before}" if args.before else "")
                  + f"; {per * args.rounds} runs per variant in {args.rounds} rounds")
            print(f"bare, in the container as psprobe (median of 7): collect "
                  f"{b.bare(['/usr/bin/psprobe', 'collect', b.unit[8:-8]], 7):.0f} ms,"
                  f" /bin/true {b.bare(['/bin/true'], 7):.1f} ms\n", flush=True)
            got = {v.name: (Runs(), Runs()) for v in todo}
            expo: dict[str, float] = {}
            for rnd in range(args.rounds):
                for v in todo:
                    b.use(v)
                    expo.setdefault(v.name, b.exposure())
                    got[v.name][0].add(b.measure(per))
                    if not args.no_true:
                        b.use(v, true=True)
                        got[v.name][1].add(b.measure(max(4, per // 2)))
                print(f"round {rnd + 1} of {args.rounds} done", file=sys.stderr, flush=True)
            summary = [x for x in c.journal(b.unit).splitlines() if " ok series=" in x]
        finally:
            ex.close()
    print(f"{'variant':24} {'expo':>4} {'service':>7} {'PID 1':>5} {'mean':>5} {'jrnld':>5}"
          f" {'total':>6} {'Δtotal':>6}  {'true':>5} {'PID 1':>5} {'Δtrue':>6}")
    ref = None
    for v in todo:
        r, t = got[v.name]
        total = r.med("service") + r.med("pid1")
        ttotal = t.med("service") + t.med("pid1")
        ref = ref or (total, ttotal)
        print(f"{v.name:24} {expo[v.name]:4.1f} {r.med('service'):7.1f} {r.med('pid1'):5.1f}"
              f" {r.pid1_mean():5.1f} {r.med('journald'):5.1f} {total:6.1f} {total - ref[0]:+6.1f}"
              f"  {t.med('service'):5.1f} {t.med('pid1'):5.1f} {ttotal - ref[1]:+6.1f}")
    print("\nms of CPU per run, medians.  service: the unit's cgroup (sandbox set-up + program);"
          "\nPID 1: the container's systemd (mean: all its threads, from /proc/PID/stat, ticks);"
          "\njrnld: journald; total = service + PID 1, Δ against the first row; true: /bin/true"
          "\nunder the same sandbox (service, PID 1, Δ of their total).  expo: systemd-analyze security."
          f"\nThe last collect's summary: {summary[-1] if summary else '?'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
