"""No daemon-reload brings a collection run forward (a real systemd 252).

``OnActiveSec=`` counts again from every ``systemctl daemon-reload``, and
systemd reloads often: every sync that changes something, every rpm or dnf
transaction, every ``systemctl edit``.  With it, each reload brought every
host's run forward to 1-6 minutes after it: an extra cycle of 2 000 runs.

Here a mesh names 20 archive hosts (the simulator, nothing new to send) and
``psprobe-sync.service`` enables them with ``[collect] interval = 1min``.
Once every host has run, the timers' next elapses are recorded, then systemd
is reloaded the ways production reloads it: ``daemon-reload`` (what rpm and
dnf do), ``systemctl edit`` of the template timer and of the service (each
reloads), and a sync that adds a host.  No next elapse may move earlier, and
every host's next run must come one interval after its last one: the start
times are systemd's own ("Starting psprobe@HOST.service" in the journal).
Against the old timer (its triggers at a tenth of their time scale: OnActiveSec=6s,
RandomizedDelaySec=30s, OnUnitInactiveSec=1min) this test fails: all 20 next
elapses moved 25-52 s earlier, and all 20 hosts ran again 9-36 s after the
reloads, 37-38 s after their last run instead of 60.

Ten more hosts run every 2 minutes (``[host NAME] interval``).  A new interval is
the one change a reload applies that can start runs at once (a time of the new
calendar passed since a host's last run): going to 1 minute, half of them are in
that case, and sync must not start more than one host in 20 at once.

The tests of this module run in order and share one world.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import pytest
from esmond_sim import EsmondSim  # tests/ is on sys.path (tests/conftest.py)

from psprobe import units

from .conftest import BASE_CONFIG
from .container import Container, MeshHandler, wait_until
from .test_systemd import meshconfig

HOSTS = 20
INTERVAL = 60
SLOW_HOSTS = 10  # with interval = 2min in a [host NAME] section each
SLOW = 120
# [collect] interval of the test's configuration: a short one, so that a test of two
# runs per host takes two minutes.
INTERVAL_CONF = "interval = 1min"
SLACK = 2  # seconds: AccuracySec=1s, and the journal's view of systemd's start
# systemd's "Starting UNIT..." (SD_MESSAGE_UNIT_STARTING): one per run, stamped by PID 1.
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
EDITOR = "/usr/local/bin/psprobe-test-editor"
LATE = "rl-late.example.sim"
EDITED = ("/etc/systemd/system/psprobe@.timer.d/override.conf",
          "/etc/systemd/system/psprobe@.service.d/override.conf")


@dataclass
class World:
    c: Container
    sim: EsmondSim
    mesh: ThreadingHTTPServer
    hosts: list[str] = field(default_factory=list)  # psprobe host keys (name:port)
    slow: list[str] = field(default_factory=list)  # the SLOW_HOSTS ones
    archives: dict[str, str] = field(default_factory=dict)  # mesh address -> read URL
    synced: float = 0.0  # when the first sync started (epoch seconds)

    def timers(self, hosts: list[str] | None = None) -> list[str]:
        return [units.timer_name(h) for h in (self.hosts if hosts is None else hosts)]

    def services(self, hosts: list[str] | None = None) -> list[str]:
        return [_service(h) for h in (self.hosts if hosts is None else hosts)]

    def configure(self, interval: str, slow: str) -> None:
        """The configuration: ``[collect] interval``, and ``slow`` for the slow hosts."""
        sections = "".join(f"\n[host {h}]\ninterval = {slow}\n" for h in self.slow)
        self.c.write("/etc/psprobe/psprobe.conf", f"""\
[collect]
state_dir = /var/lib/psprobe
{interval}

[mesh]
urls = http://127.0.0.1:{self.mesh.server_address[1]}/mesh.json
timeout = 5s
retries = 0

[archive]
schemes = http
timeout = 5s
retries = 0
{sections}""", mode=0o640, owner="root:psprobe")

    def set_mesh(self, names: list[str]) -> None:
        self.mesh.doc = meshconfig({n: self.archives[n] for n in names})  # type: ignore[attr-defined]

    def sync(self) -> float:
        """One run of psprobe-sync.service; returns when it started (epoch seconds)."""
        t = time.time()
        cp = self.c.systemctl("start", "psprobe-sync.service")
        assert cp.returncode == 0, cp.stderr + self.c.journal("psprobe-sync.service", "-n", "30")
        return t

    def next_elapse(self, hosts: list[str] | None = None) -> dict[str, float]:
        """Timer -> its next elapse (epoch seconds), once every timer has one: systemd
        shows none while the timer's run goes on."""
        timers = self.timers(hosts)
        return wait_until("every timer's next elapse", lambda: self._next_elapse(timers), 15,
                          interval=0.2)

    def _next_elapse(self, timers: list[str]) -> dict[str, float] | None:
        cp = self.c.systemctl("show", "-p", "Id", "-p", "NextElapseUSecRealtime",
                              "-p", "NextElapseUSecMonotonic", *timers)
        boot = time.time() - time.monotonic()  # the container shares the host's clocks
        out: dict[str, float] = {}
        for block in cp.stdout.split("\n\n"):
            p = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "Id" not in p:
                continue
            real = units._timestamp(p.get("NextElapseUSecRealtime", ""))
            mono = units._timespan(p.get("NextElapseUSecMonotonic", ""))
            when = [t for t in (real, None if mono is None else boot + mono) if t is not None]
            if not when:
                return None
            out[p["Id"]] = min(when)
        return out if set(out) == set(timers) else None

    def starts(self, hosts: list[str] | None = None) -> dict[str, list[float]]:
        """Service -> the start time of each of its runs, from systemd's journal."""
        cp = self.c.run(["journalctl", "-o", "json", "--output-fields=UNIT", "_PID=1",
                         f"MESSAGE_ID={UNIT_STARTING}"])
        mine = set(self.services(hosts))
        out: dict[str, list[float]] = {s: [] for s in mine}
        for line in cp.stdout.splitlines():
            rec = json.loads(line)
            if rec.get("UNIT") in mine:
                out[rec["UNIT"]].append(int(rec["__REALTIME_TIMESTAMP"]) / 1e6)
        return {s: sorted(v) for s, v in out.items()}

    def edit(self, unit: str, text: str) -> None:
        """``systemctl edit UNIT`` as an operator would (it reloads systemd itself).

        The editor writes ``text``; ``script`` gives systemctl the terminal it insists on.
        """
        cp = self.c.run(["env", f"SYSTEMD_EDITOR={EDITOR}", f"PSPROBE_TEST_EDIT={text}",
                         "script", "-qec", f"systemctl edit {unit}", "/dev/null"], input="")
        assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.fixture(scope="module")
def world(container: Container) -> Iterator[World]:
    c = container
    sim = EsmondSim("127.0.0.1", 0, default_host="reload.example.sim").start()
    sim.host("reload.example.sim")  # no tests: a run reads the metadata, sends nothing
    mesh = ThreadingHTTPServer(("127.0.0.1", 0), MeshHandler)
    threading.Thread(target=mesh.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    w = World(c, sim, mesh)
    names = [f"rl-{i:02d}.example.sim" for i in range(HOSTS + 1)]  # the last one joins later
    names.append(LATE)  # and this one at the end
    slow = [f"rl-slow-{i:02d}.example.sim" for i in range(SLOW_HOSTS)]
    for n in names + slow:
        w.archives[n] = f"http://{n}:{sim.port}/esmond/perfsonar/archive/"
    etc_hosts = c.path("/etc/hosts")
    saved_hosts = etc_hosts.read_text() if etc_hosts.exists() else None
    try:
        etc_hosts.write_text((saved_hosts or "") + f"127.0.0.1 {' '.join(names + slow)}\n")
        c.write(EDITOR, '#!/bin/sh\nprintf "%s\\n" "$PSPROBE_TEST_EDIT" >"$1"\n', mode=0o755)
        w.hosts = [f"{n}:{sim.port}" for n in names[:HOSTS]]
        w.slow = [f"{n}:{sim.port}" for n in slow]
        w.configure(INTERVAL_CONF, "2min")
        w.set_mesh(names[:HOSTS] + slow)
        # psprobe on, without its sync timer (the test runs each sync): the parent enabled.
        c.systemctl("enable", units.TARGET, check=True)
        w.synced = w.sync()  # the hosts' timers start: each first run at its phase
        yield w
    finally:
        c.systemctl("disable", units.TARGET)
        c.run("systemctl stop 'psprobe@*.timer' 'psprobe@*.service'")
        # Whatever a failed test left enabled: sync's links and drop-ins of these hosts.
        units.apply(c.path("/etc/systemd/system"), [],
                    [f"{n}:{sim.port}" for n in names + slow], systemctl=None)
        c.run(["rm", "-f", EDITOR, *EDITED])
        c.run("rmdir /etc/systemd/system/psprobe@.service.d /etc/systemd/system/psprobe@.timer.d"
              " 2>/dev/null; systemctl daemon-reload; systemctl reset-failed 'psprobe@*'")
        if saved_hosts is None:
            etc_hosts.unlink(missing_ok=True)
        else:
            etc_hosts.write_text(saved_hosts)
        c.write("/etc/psprobe/psprobe.conf", BASE_CONFIG, mode=0o640, owner="root:psprobe")
        mesh.shutdown()
        mesh.server_close()
        sim.stop()


def _service(host: str) -> str:
    return units.timer_name(host).removesuffix(".timer") + ".service"


def _at_phase(when: float, phase: int, interval: int) -> bool:
    """``when`` (a run's start) is at ``phase`` of ``interval`` (or up to SLACK late)."""
    return -0.5 <= (when - phase + 0.5) % interval - 0.5 <= SLACK


def test_sync_gives_each_host_a_calendar_at_its_phase(world):
    c = world.c
    t0 = world.synced
    for h, t in zip(world.hosts, world.timers()):
        dropin = c.path(f"/etc/systemd/system/{t}.d/10-phase.conf")
        assert dropin.read_text() == units.dropin_text(h, INTERVAL)
    for h, t in zip(world.slow, world.timers(world.slow)):  # [host NAME] interval = 2min
        dropin = c.path(f"/etc/systemd/system/{t}.d/10-phase.conf")
        assert dropin.read_text() == units.dropin_text(h, SLOW)
    shown = c.systemctl("show", "-p", "TimersCalendar", "-p", "TimersMonotonic",
                        "-p", "RandomizedDelayUSec", "-p", "ActiveState", world.timers()[0]).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    # Only the calendar: the drop-in's empty OnCalendar= dropped the template's fallbacks.
    assert units.on_calendar(world.hosts[0], INTERVAL).split()[1] in props["TimersCalendar"]
    assert props.get("TimersMonotonic", "") == ""  # not shown at all when empty
    assert props["RandomizedDelayUSec"] == "0"
    assert props["ActiveState"] == "active"
    nxt = world.next_elapse()
    now = time.time()
    for h, t in zip(world.hosts, world.timers()):
        when = nxt[t]
        assert t0 - 1 < when <= now + INTERVAL + SLACK, (t, when - t0)
        assert round(when) % INTERVAL == units.phase(h, INTERVAL), t


def test_reloads_never_bring_a_run_forward(world):
    c = world.c
    services = world.services()

    def all_ran_once() -> dict[str, list[float]] | None:
        s = world.starts()
        return s if all(s[x] for x in services) else None

    wait_until("every host's first run", all_ran_once, INTERVAL + 30, interval=1)
    before = world.next_elapse()
    reloaded = time.time()

    # What reloads systemd in production.
    for _ in range(3):
        c.systemctl("daemon-reload", check=True)  # rpm -U / dnf file triggers
    world.edit("psprobe@.timer", "[Timer]\nAccuracySec=1s")
    world.edit("psprobe@.service", "[Service]\nEnvironment=PSPROBE_TEST_RELOAD=1")
    assert all(c.path(p).exists() for p in EDITED)
    joined = f"rl-{HOSTS:02d}.example.sim"
    world.set_mesh(sorted(world.archives))  # a host joins: sync reloads and starts its timer
    world.sync()
    assert units.timer_name(f"{joined}:{world.sim.port}") in c.systemctl(
        "list-timers", "--no-legend", "psprobe@*").stdout
    last_reload = time.time()
    after = world.next_elapse()

    def all_ran_since() -> dict[str, list[float]] | None:
        s = world.starts()
        return s if all(s[x] and s[x][-1] > last_reload for x in services) else None

    starts = wait_until("every host's run after the reloads", all_ran_since, INTERVAL + 30,
                        interval=1)
    moved = {t: before[t] - after[t] for t in world.timers() if after[t] < before[t] - 0.5}
    gaps = {s: [b - a for a, b in zip(v, v[1:])] for s, v in starts.items()}
    early = {s: min(g) for s, g in gaps.items() if g and min(g) < INTERVAL - SLACK}
    again = sorted(min(x for x in starts[s] if x > reloaded) - reloaded for s in early)
    print(f"\n{HOSTS} hosts, interval {INTERVAL}s, reloads from +0 to +{last_reload - reloaded:.0f}s:"
          f" next elapse moved earlier for {len(moved)}"
          f" (by {sorted(round(x) for x in moved.values())} s);"
          f" {len(early)} hosts ran again before their interval was up"
          f" (shortest gaps {sorted(round(g) for g in early.values())} s; those runs"
          f" {[round(x) for x in again]} s after the first reload);"
          f" all gaps {min(min(g) for g in gaps.values() if g):.1f}"
          f"..{max(max(g) for g in gaps.values() if g):.1f} s", file=sys.stderr)
    assert moved == {}, "a reload brought a timer's next elapse forward"
    assert early == {}, "a host ran again before its interval was up"
    # And no reload delayed a run either: every gap is the interval.
    assert all(g <= INTERVAL + SLACK for v in gaps.values() for g in v), gaps


def test_an_interval_change_moves_every_host_to_its_new_phase_without_a_burst(world):
    """A running timer reloaded with a new calendar fires at once for a time of it that
    passed since its last run: sync gives a host its new schedule when its next time
    is ahead, or to at most 1 host in 20 per sync; later syncs do the rest."""
    c = world.c
    fast = [*world.hosts, f"rl-{HOSTS:02d}.example.sim:{world.sim.port}"]  # 1min -> 2min
    everyone = fast + world.slow  # and the slow ones 2min -> 1min
    new = {**dict.fromkeys(fast, SLOW), **dict.fromkeys(world.slow, INTERVAL)}
    at_once = max(1, len(everyone) // 20)
    # Every slow host has run (its last run is what a reload counts from).
    wait_until("every slow host's first run",
               lambda: all(world.starts(world.slow).values()), SLOW + 30, interval=1)
    world.configure("interval = 2min", "1min")

    def moved() -> list[str]:
        return [h for h in everyone if c.path(f"/etc/systemd/system/{units.timer_name(h)}.d"
                                              "/10-phase.conf").read_text() == units.dropin_text(h, new[h])]

    syncs = []
    while len(moved()) < len(everyone) and len(syncs) < 20:
        t0 = world.sync()
        syncs.append((t0, time.time(), len(moved())))
    assert len(moved()) == len(everyone), f"not every host moved to its new interval in {syncs}"
    # Each run from a sync's start to the next one's (the last: to its end): at its host's
    # time, old or new, or one of the few that sync's reload fired at once.
    starts = world.starts(everyone)
    ends = [t0 for t0, _, _ in syncs[1:]] + [syncs[-1][1] + SLACK]
    fired = [[(h, round(x - t0, 1)) for h in everyone for x in starts[_service(h)]
              if t0 <= x < end
              and not any(_at_phase(x, units.phase(h, i), i) for i in (INTERVAL, SLOW))]
             for (t0, _, _), end in zip(syncs, ends)]
    print(f"\nnew intervals: {len(syncs)} sync(s), hosts on their new one after each "
          f"(of {len(everyone)}): {[n for _, _, n in syncs]}; runs each fired at once: "
          f"{[len(f) for f in fired]}", file=sys.stderr)
    assert all(len(f) <= at_once for f in fired), fired
    nxt = world.next_elapse(everyone)
    now = time.time()
    for h in everyone:
        when = nxt[units.timer_name(h)]
        assert syncs[-1][0] < when <= now + new[h] + SLACK
        assert round(when) % new[h] == units.phase(h, new[h])


def test_a_host_that_leaves_loses_its_dropin(world):
    c = world.c
    gone = world.hosts[0]
    world.set_mesh([n for n in sorted(world.archives) if not gone.startswith(n + ":")])
    world.sync()
    t = units.timer_name(gone)
    assert not c.path(f"/etc/systemd/system/{t}.d").exists()
    assert not c.path(f"/etc/systemd/system/{units.WANTS}/{t}").exists()
    assert c.systemctl("show", "-p", "ActiveState", t).stdout.strip() == "ActiveState=inactive"
    assert c.path(f"/etc/systemd/system/{world.timers()[1]}.d/10-phase.conf").exists()


def _reloads(c: Container) -> int:
    """daemon-reloads PID 1 did so far (its "Reloading..." line for each)."""
    out = c.run(["journalctl", "-o", "cat", "_PID=1"]).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Reloading") and
               not line.startswith("Reloading requested"))


def _on_its_calendar(world: World, host: str) -> None:
    t = units.timer_name(host)
    shown = world.c.systemctl("show", "-p", "TimersCalendar", "-p", "ActiveState", t).stdout
    props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert props["ActiveState"] == "active", props
    assert units.on_calendar(host, SLOW).split()[1] in props["TimersCalendar"], props
    when = world.next_elapse([host])[t]
    assert round(when) % SLOW == units.phase(host, SLOW), t


def test_a_host_that_joins_starts_by_name_with_its_calendar_and_no_reload(world):
    """A re-sync of a loaded fleet: its new timers start by name, read from disk with
    their drop-in when first loaded; a daemon-reload would cost PID 1 seconds at 2 000."""
    c = world.c
    before = _reloads(c)
    late = f"{LATE}:{world.sim.port}"
    world.set_mesh([n for n in sorted(world.archives)
                    if not world.hosts[0].startswith(n + ":")])  # still without the one that left
    world.sync()
    assert _reloads(c) == before, "the sync reloaded systemd"
    _on_its_calendar(world, late)  # [collect] interval = 2min since the interval test
    assert units.TARGET in c.systemctl("show", "-p", "PartOf", units.timer_name(late)).stdout


def test_a_host_back_within_the_boot_gets_its_calendar_through_a_reload(world):
    """The host that left is still loaded (the target wanted it at the last reload) and its
    drop-in is new: systemd says NeedDaemonReload, and sync reloads before it starts."""
    c = world.c
    back = world.hosts[0]
    before = _reloads(c)
    world.set_mesh(sorted(world.archives))
    world.sync()
    assert _reloads(c) == before + 1
    _on_its_calendar(world, back)


def test_pause_and_resume_take_the_timers_started_by_name_along(world):
    """A timer started by name is not in the target's list until the next reload, but its
    PartOf= stops it with the target; `psprobe resume` reloads (systemctl enable), so a
    host removed without a reload does not come back with it."""
    c = world.c
    late, gone = f"{LATE}:{world.sim.port}", world.hosts[1]
    world.set_mesh([n for n in sorted(world.archives) if not gone.startswith(n + ":")])
    before = _reloads(c)
    world.sync()
    assert _reloads(c) == before  # only a removal: stopped by name
    timers = [units.timer_name(h) for h in (late, gone)]

    def active() -> dict[str, str]:
        out = c.systemctl("show", "-p", "Id", "-p", "ActiveState", *timers).stdout
        blocks = [dict(x.split("=", 1) for x in b.splitlines() if "=" in x) for b in out.split("\n\n")]
        return {b["Id"]: b["ActiveState"] for b in blocks if "Id" in b}

    assert active() == {timers[0]: "active", timers[1]: "inactive"}
    assert c.run(["psprobe", "pause"]).returncode == 0
    assert active() == {timers[0]: "inactive", timers[1]: "inactive"}
    assert c.run(["psprobe", "resume"]).returncode == 0
    assert active() == {timers[0]: "active", timers[1]: "inactive"}
    _on_its_calendar(world, late)


def test_without_a_dbus_daemon_sync_still_reaches_systemd(world):
    """sync's systemctl calls go through the system bus (PID 1 then sends their signals to
    subscribers only, not to the caller); with no D-Bus daemon, through PID 1's socket."""
    c = world.c
    gone = world.hosts[2]
    left = [n for n in sorted(world.archives)
            if not any(h.startswith(n + ":") for h in (world.hosts[1], gone))]
    try:
        c.systemctl("stop", "dbus.socket", "dbus.service", check=True)
        assert "Failed to connect to bus" in c.run(
            ["env", "SYSTEMCTL_FORCE_BUS=1", "systemctl", "is-system-running"]).stderr
        world.set_mesh(left)
        world.sync()
        out = c.systemctl("show", "-p", "ActiveState", units.timer_name(gone),
                          units.timer_name(world.hosts[3])).stdout
        assert out.split() == ["ActiveState=inactive", "ActiveState=active"]
    finally:
        c.systemctl("start", "dbus.socket", "dbus.service")
