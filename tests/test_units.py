"""psprobe.units: the enablement symlinks sync writes under psprobe-timers.target, the
schedule drop-ins beside them, its systemctl calls, and the move from an older layout."""

from __future__ import annotations

import collections
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import write_config

from psprobe import config, hostnames, units
from psprobe import sync as msync

TEMPLATES = Path("/usr/lib/systemd/system")
HOSTS = ["a-b.example.org", "ps.example.net:8085", "10.1.2.3"]


def wants(unit_dir: Path) -> Path:
    return unit_dir / units.WANTS


def name(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.timer"


class Systemctl(list):
    """A stand-in for systemctl, passed in where units takes one: records each call
    (the list is the calls), answers ``rc`` with ``stderr``, and ``show`` with ``out``;
    ``list-units`` as systemd would: the target (loaded, ActiveState ``target``) and
    the timers already loaded, named in ``stale``."""

    def __init__(self, rc: int = 0, stderr: str = "", out: str = "",
                 target: str = "active", stale: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.rc, self.stderr, self.out = rc, stderr, out
        self.target, self.stale = target, stale

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        self.append(args)
        out = self.out if args[0] == "show" else ""
        if args[0] == "list-units":  # the loaded ones of the names asked for
            out = "".join(f"{n} loaded {self.target} x description\n" if n == units.TARGET else
                          f"{n} loaded inactive dead description\n"
                          for n in args if n == units.TARGET or n in self.stale)
        return subprocess.CompletedProcess(["systemctl", *args], self.rc, out, self.stderr)


def enable_target(unit_dir: Path) -> None:
    """What `systemctl enable psprobe-sync.timer` (Also=) or `psprobe resume` leaves."""
    d = unit_dir / units.PARENT_WANTS
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(TEMPLATES / units.TARGET, d / units.TARGET)


@pytest.fixture
def calls(tmp_path):
    """systemctl calls recorded instead of made, on an unit_dir where psprobe is not paused."""
    enable_target(tmp_path)
    return Systemctl()


def test_apply_makes_what_systemctl_enable_makes(tmp_path):
    old = os.umask(0o077)
    try:
        units.apply(tmp_path, HOSTS, [], systemctl=None)
    finally:
        os.umask(old)
    w = wants(tmp_path)
    assert (w.stat().st_mode & 0o777) == 0o755
    assert sorted(os.listdir(w)) == sorted(name(h) for h in HOSTS)
    for h in HOSTS:
        assert os.readlink(w / name(h)) == str(TEMPLATES / "psprobe@.timer")
    assert units.enabled_hosts(tmp_path) == set(HOSTS)


def test_instance_round_trips_through_the_link_name(tmp_path):
    units.apply(tmp_path, HOSTS, [], systemctl=None)
    for entry in os.listdir(wants(tmp_path)):
        instance = entry[len("psprobe@") : -len(".timer")]
        assert hostnames.from_instance(instance) in HOSTS


def test_remove_touches_only_psprobe_links_of_removed_hosts(tmp_path):
    w = wants(tmp_path)
    w.mkdir()
    os.symlink("/usr/lib/systemd/system/fstrim.timer", w / "fstrim.timer")
    (tmp_path / "other.service").write_text("[Service]\n")
    units.apply(tmp_path, HOSTS, [], systemctl=None)
    units.apply(tmp_path, [], [HOSTS[0], "never.example.org"], systemctl=None)
    assert units.enabled_hosts(tmp_path) == set(HOSTS[1:])
    assert (w / "fstrim.timer").is_symlink()
    # The removed host's schedule went with its link; the others' stay beside theirs.
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["other.service", units.WANTS, *(f"{name(h)}.d" for h in HOSTS[1:])])
    assert not [e for e in os.listdir(w) if e.endswith(".tmp")]


def loaded(*names: str) -> tuple[str, ...]:
    return ("list-units", "--all", "--plain", "--no-legend", "--full", units.TARGET, *names)


def test_systemctl_runs_once_per_step_and_only_on_change(tmp_path, calls):
    # A few new timers: loaded fresh by the show (none was loaded before), then started by
    # name with their drop-ins (tests/system: no daemon-reload needed); removed ones stopped.
    units.apply(tmp_path, HOSTS[:2], [], template_dir=Path("/t"), systemctl=calls)
    new = sorted(name(h) for h in HOSTS[:2])
    assert calls == [loaded(*new), ("start", "--no-block", *new)]
    calls.clear()
    units.apply(tmp_path, HOSTS[:2], [], template_dir=Path("/t"), systemctl=calls)
    assert calls == []  # nothing changed: no call
    units.apply(tmp_path, HOSTS[1:], [HOSTS[0]], template_dir=Path("/t"), systemctl=calls)
    assert calls == [
        loaded(name(HOSTS[2])),
        ("start", "--no-block", name(HOSTS[2])),
        ("stop", "--no-block", name(HOSTS[0])),
    ]
    assert os.readlink(wants(tmp_path) / name(HOSTS[1])) == "/t/psprobe@.timer"


def test_a_thousand_new_hosts_are_two_systemctl_calls(tmp_path, calls):
    hosts = [f"ps{i:04d}.example.org" for i in range(1000)]
    units.apply(tmp_path, hosts, [], systemctl=calls)
    assert calls == [("daemon-reload",), ("start", "--no-block", units.TARGET)]
    assert units.enabled_hosts(tmp_path) == set(hosts)


def test_a_hundred_in_and_out_of_two_thousand_start_and_stop_by_name(tmp_path, calls):
    """The re-sync of a loaded fleet: no daemon-reload (seconds of PID 1 at this size)."""
    hosts = [f"ps{i:04d}.example.org" for i in range(2100)]
    units.apply(tmp_path, hosts[:2000], [], systemctl=None)
    units.apply(tmp_path, hosts[100:], hosts[:100], systemctl=calls)
    new, gone = [name(h) for h in hosts[2000:]], [name(h) for h in hosts[:100]]
    assert calls == [loaded(*new), ("start", "--no-block", *new), ("stop", "--no-block", *gone)]


def test_a_new_timer_loaded_with_an_older_configuration_is_reloaded(tmp_path):
    # A host removed and back within one boot (its unit still loaded, the drop-in new), or a
    # timer looked at before sync enabled it: loaded already, it may hold an older schedule.
    enable_target(tmp_path)
    new = sorted(name(h) for h in HOSTS[:2])
    stale = Systemctl(stale=(new[1],))
    units.apply(tmp_path, HOSTS[:2], [], systemctl=stale)
    assert stale == [loaded(*new), ("daemon-reload",), ("start", "--no-block", units.TARGET)]


def test_a_stopped_target_is_reloaded_before_it_starts_again(tmp_path):
    # Enabled but stopped (by hand): started by name, the target would start the timers it
    # wanted at the last reload, hosts gone since among them.
    enable_target(tmp_path)
    stopped = Systemctl(target="inactive")
    units.apply(tmp_path, HOSTS[:1], [], systemctl=stopped)
    assert stopped == [loaded(name(HOSTS[0])), ("daemon-reload",),
                       ("start", "--no-block", units.TARGET)]


def test_while_paused_sync_links_but_starts_nothing(tmp_path, caplog):
    sc = Systemctl()
    os.makedirs(wants(tmp_path))
    os.symlink(TEMPLATES / units.SYNC_TIMER, wants(tmp_path) / units.SYNC_TIMER)
    assert units.paused(tmp_path)  # the sync timer enabled under a disabled target
    with caplog.at_level(logging.INFO, logger="psprobe"):
        units.apply(tmp_path, HOSTS[:2], [], systemctl=sc)
    assert sc == []  # `psprobe resume` (systemctl enable: a reload) starts them
    assert "paused" in caplog.text and "start at `psprobe resume`" in caplog.text
    assert units.enabled_hosts(tmp_path) == set(HOSTS[:2])
    units.apply(tmp_path, [], HOSTS[:1], systemctl=sc)  # removal stops, paused or not
    assert sc == [("stop", "--no-block", name(HOSTS[0]))]
    enable_target(tmp_path)
    assert not units.paused(tmp_path)


def test_systemctl_false_never_calls(tmp_path, calls):
    units.apply(tmp_path, HOSTS, [], systemctl=None)
    units.apply(tmp_path, [], HOSTS, systemctl=None)
    assert calls == []
    assert units.enabled_hosts(tmp_path) == set()


def test_link_to_another_target_is_repointed(tmp_path, calls):
    w = wants(tmp_path)
    w.mkdir()
    os.symlink("/old/place/psprobe@.timer", w / name(HOSTS[0]))
    units.apply(tmp_path, [HOSTS[0]], [], systemctl=calls)
    assert os.readlink(w / name(HOSTS[0])) == str(TEMPLATES / "psprobe@.timer")
    assert calls == [loaded(name(HOSTS[0])), ("start", "--no-block", name(HOSTS[0]))]


def test_failed_reload_raises_and_starts_nothing(tmp_path):
    enable_target(tmp_path)
    seen = Systemctl(rc=1, stderr="Access denied")
    with pytest.raises(units.UnitsError, match="daemon-reload: Access denied"):
        units.apply(tmp_path, HOSTS, [], systemctl=seen)
    # an unanswered list-units counts as "may be stale": the reload is the safe way
    assert seen == [loaded(*sorted(name(h) for h in HOSTS)), ("daemon-reload",)]
    assert units.enabled_hosts(tmp_path) == set(HOSTS)  # enablement stays: next boot starts them


class Reloading(Systemctl):
    """A systemctl whose daemon-reload lasts until ``meanwhile`` has run (at most 30 s):
    it returns only if the two overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()
        self.overlapped = None

    def meanwhile(self) -> None:
        self.append(("meanwhile",))
        self.done.set()

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        if args == ("daemon-reload",):
            self.overlapped = self.done.wait(30)
        return super().__call__(*args, **kw)


def test_meanwhile_runs_while_pid1_reloads_and_before_any_timer_starts(tmp_path, calls):
    """A first sync: PID 1 reloads 2 000 timers while sync writes their targets."""
    sc = Reloading()
    hosts = [f"ps{i:04d}.example.org" for i in range(1000)]
    units.apply(tmp_path, hosts, [], systemctl=sc, meanwhile=sc.meanwhile)
    assert sc.overlapped is True
    assert sc == [("meanwhile",), ("daemon-reload",), ("start", "--no-block", units.TARGET)]


def test_meanwhile_runs_before_timers_start_by_name_and_once_without_systemctl(tmp_path, calls):
    sc = Reloading()
    units.apply(tmp_path, HOSTS, [], systemctl=sc, meanwhile=sc.meanwhile)
    new = sorted(name(h) for h in HOSTS)
    assert sc == [loaded(*new), ("meanwhile",), ("start", "--no-block", *new)]
    ran = []
    units.apply(tmp_path / "none", HOSTS, [], systemctl=None, meanwhile=lambda: ran.append(1))
    units.apply(tmp_path / "none", HOSTS, [], systemctl=sc, meanwhile=lambda: ran.append(2))
    assert ran == [1, 2]  # and the second, with nothing to change, made no call
    assert sc[-1] == ("start", "--no-block", *new)


def test_an_error_of_meanwhile_starts_nothing(tmp_path, calls):
    sc = Reloading()

    def fail() -> None:
        sc.meanwhile()
        raise OSError(13, "Permission denied", "/var/lib/psprobe/hosts")

    hosts = [f"ps{i:04d}.example.org" for i in range(1000)]
    with pytest.raises(OSError, match="Permission denied"):
        units.apply(tmp_path, hosts, [], systemctl=sc, meanwhile=fail)
    assert sc == [("meanwhile",), ("daemon-reload",)]  # the reload ended; no start


def test_a_failed_reload_beside_meanwhile_raises_and_starts_nothing(tmp_path, calls):
    seen = Systemctl(rc=1, stderr="Access denied")
    ran = []
    hosts = [f"ps{i:04d}.example.org" for i in range(1000)]
    with pytest.raises(units.UnitsError, match="daemon-reload: Access denied"):
        units.apply(tmp_path, hosts, [], systemctl=seen, meanwhile=lambda: ran.append(1))
    assert seen == [("daemon-reload",)] and ran == [1]


def test_foreign_psprobe_entry_is_ignored_and_logged(tmp_path, caplog):
    w = wants(tmp_path)
    w.mkdir()
    os.symlink("/x", w / "psprobe@.timer")  # the bare template: not a host
    os.symlink("/x", w / "psprobe-sync.timer")
    units.apply(tmp_path, HOSTS[:1], [], systemctl=None)
    with caplog.at_level(logging.WARNING, logger="psprobe"):
        assert units.enabled_hosts(tmp_path) == {HOSTS[0]}
    assert "psprobe@.timer" in caplog.text
    assert "psprobe-sync.timer" not in caplog.text


def test_enabled_hosts_of_a_missing_dir_is_empty(tmp_path):
    assert units.enabled_hosts(tmp_path / "nope") == set()


FAKE_SYSTEMCTL = """#!/bin/sh
echo "${SYSTEMCTL_FORCE_BUS:-socket} $*" >>"$0.calls"
[ -z "$FAKE_SLOW" ] || sleep "$FAKE_SLOW"
if [ "$SYSTEMCTL_FORCE_BUS" = 1 ] && [ -n "$FAKE_NO_BUS" ]; then
    echo "$FAKE_NO_BUS" >&2; exit 1
fi
[ -z "$FAKE_FAIL" ] || { echo "$FAKE_FAIL" >&2; exit 5; }
"""


@pytest.mark.parametrize(("no_bus", "fail", "calls", "rc"), [
    ("", "", ["1 daemon-reload"], 0),  # through the bus
    # No bus, or one that refuses: PID 1's socket.
    ("Failed to connect to bus: No such file or directory", "",
     ["1 daemon-reload", "socket daemon-reload"], 0),
    ("Failed to reload daemon: Access denied", "", ["1 daemon-reload", "socket daemon-reload"], 0),
    ("Failed to reload daemon: Interactive authentication required.", "",
     ["1 daemon-reload", "socket daemon-reload"], 0),
    ("", "Unit x.timer not loaded.", ["1 daemon-reload"], 5),  # any other error: once
])
def test_systemctl_goes_through_the_bus_or_else_pid1s_socket(monkeypatch, tmp_path, no_bus, fail,
                                                            calls, rc):
    fake = tmp_path / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("FAKE_NO_BUS", no_bus)
    monkeypatch.setenv("FAKE_FAIL", fail)
    cp = units.systemctl("daemon-reload")
    assert (cp.returncode, cp.stderr.strip()) == (rc, fail)
    assert (tmp_path / "systemctl.calls").read_text().splitlines() == calls


def test_systemctl_through_the_socket_shares_the_timeout(monkeypatch, tmp_path):
    """The bus refuses after 0.6 s; the socket's answer (0.6 s more) is past the 1 s given."""
    fake = tmp_path / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # sleep
    monkeypatch.setenv("FAKE_NO_BUS", "Failed to reload daemon: Access denied")
    monkeypatch.setenv("FAKE_FAIL", "")
    monkeypatch.setenv("FAKE_SLOW", "0.6")
    cp = units.systemctl("daemon-reload", timeout=1)
    assert cp.returncode == 124
    assert (tmp_path / "systemctl.calls").read_text().splitlines() == [
        "1 daemon-reload", "socket daemon-reload"]


def test_systemctl_missing_answers_127(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    cp = units.systemctl("daemon-reload")
    assert cp.returncode == 127


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3h 12min 21.877061s", 11541.877061),
        ("1w 2d", 9 * 86400.0),
        ("500ms", 0.5),
        ("0", None),
        ("infinity", None),
        ("", None),
        ("3 bananas", None),
    ],
)
def test_timespan(text, seconds):
    got = units._timespan(text)
    assert got == (None if seconds is None else pytest.approx(seconds))


# --- the schedule: one drop-in per enabled host, a calendar at a phase hashed from its name

SHOW_STATE = ("show", "-p", "Id", "-p", "ActiveState", "-p", "LastTriggerUSec",
        "-p", "InactiveExitTimestamp")
INTERVALS = [60, 120, 180, 240, 300, 360, 600, 720, 900, 1200, 1800, 3600,
             7200, 10800, 14400, 21600, 28800, 43200, 86400]


def _fires(spec: str) -> set[int]:
    """Seconds of the UTC day at which one of our OnCalendar= values fires (its own
    parser for the forms on_calendar writes; systemd itself reads them in the system
    tests: tests/system/test_units_static.py)."""
    m = re.fullmatch(r"\*-\*-\* (\*|\d\d(?:/\d+)?):(\*|\d\d(?:/\d+)?):(\d\d) UTC", spec)
    assert m, spec

    def values(field: str, top: int) -> range:
        if field == "*":
            return range(top)
        start, _, step = field.partition("/")
        return range(int(start), top, int(step)) if step else range(int(start), int(start) + 1)

    return {h * 3600 + mi * 60 + int(m.group(3))
            for h in values(m.group(1), 24) for mi in values(m.group(2), 60)}


@pytest.mark.parametrize("interval", INTERVALS)
def test_calendar_fires_every_interval_at_the_hosts_phase(interval):
    for host in HOSTS:
        p = units.phase(host, interval)
        assert 0 <= p < interval
        assert _fires(units.on_calendar(host, interval)) == set(range(p, 86400, interval))


def test_phase_is_a_stable_hash_of_the_name():
    # Pinned: a change here moves every host of every installation at its next sync.
    assert units.phase("ps.example.org", 600) == 67
    assert units.on_calendar("ps.example.org", 600) == "*-*-* *:01/10:07 UTC"
    assert units.on_calendar("ps.example.org", 60) == "*-*-* *:*:07 UTC"
    assert units.on_calendar("ps.example.org", 3600) == "*-*-* *:11:07 UTC"
    assert units.on_calendar("ps.example.org", 86400) == "*-*-* 23:11:07 UTC"
    assert units.on_calendar("ps.example.org", 7200) == "*-*-* 01/2:11:07 UTC"
    assert [units.phase(h, 600) for h in HOSTS] == [units.phase(h, 600) for h in HOSTS]
    assert len({units.phase(h, 600) for h in HOSTS}) == len(HOSTS)


def test_2000_hosts_spread_evenly_over_the_interval():
    names = [f"ps{i:04d}.scale.example.org" for i in range(2000)]  # bench/scale.py's mesh
    for interval in (600, 300, 3600):
        per_bin = collections.Counter(units.phase(h, interval) * 60 // interval for h in names)
        expected = len(names) / 60  # 33.3 per sixtieth of the interval (10 s of 10 min)
        chi2 = sum((per_bin.get(b, 0) - expected) ** 2 / expected for b in range(60))
        print(f"interval {interval}s: per 1/60 {min(per_bin.values())}..{max(per_bin.values())}, "
              f"chi2 {chi2:.1f} (59 degrees of freedom)")
        assert len(per_bin) == 60
        assert 15 <= min(per_bin.values()) and max(per_bin.values()) <= 55
        assert chi2 < 98  # the 99.9 % quantile for 59 degrees of freedom


@pytest.mark.parametrize("interval", [0, 59, 90, 420, 5400, 172800])
def test_calendar_refuses_an_interval_that_would_drift(interval):
    with pytest.raises(ValueError, match="divides neither"):
        units.on_calendar(HOSTS[0], interval)


def test_each_link_gets_its_dropin_private_to_root(tmp_path):
    old = os.umask(0o007)  # psprobe-sync.service's UMask, with Group=psprobe
    try:
        units.apply(tmp_path, HOSTS, [], systemctl=None)
    finally:
        os.umask(old)
    for h in HOSTS:
        path = units.dropin_path(tmp_path, h)
        assert path == tmp_path / f"{name(h)}.d" / "10-phase.conf"
        text = path.read_text()
        assert text == units.dropin_text(h, 600)
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert lines == ["[Timer]", "OnCalendar=", f"OnCalendar={units.on_calendar(h, 600)}",
                         "RandomizedDelaySec=0"]
        # The psprobe group must never write a unit file: 0644 and 0755, as systemctl writes.
        assert path.stat().st_mode & 0o777 == 0o644
        assert path.parent.stat().st_mode & 0o777 == 0o755
    assert not list(tmp_path.rglob(".*.tmp"))


def test_dropin_written_only_when_its_content_changes(tmp_path, calls):
    units.apply(tmp_path, HOSTS, [], systemctl=calls)
    calls.clear()
    before = {h: units.dropin_path(tmp_path, h).stat() for h in HOSTS}
    units.apply(tmp_path, HOSTS, [], systemctl=calls)
    units.apply(tmp_path, [], [], systemctl=calls)
    assert calls == []  # nothing changed: no reload
    for h in HOSTS:
        st = units.dropin_path(tmp_path, h).stat()
        assert (st.st_ino, st.st_mtime_ns) == (before[h].st_ino, before[h].st_mtime_ns)

    # A new interval for one host: only its drop-in; systemd is asked whether its timer
    # runs and when it last fired (see test_a_new_schedule_never_fires_many_at_once).
    units.apply(tmp_path, [], [], interval=lambda h: 300 if h == HOSTS[1] else 600, systemctl=calls)
    assert calls == [(*SHOW_STATE, name(HOSTS[1])), ("daemon-reload",)]
    assert units.dropin_path(tmp_path, HOSTS[1]).read_text() == units.dropin_text(HOSTS[1], 300)
    for h in (HOSTS[0], HOSTS[2]):
        assert units.dropin_path(tmp_path, h).stat().st_ino == before[h].st_ino


def test_new_timers_start_and_rescheduled_ones_reload_with_the_one_reload(tmp_path, calls):
    units.apply(tmp_path, HOSTS[:2], [], systemctl=calls)
    calls.clear()
    units.apply(tmp_path, HOSTS[1:], [HOSTS[0]], interval=900, systemctl=calls)
    assert calls == [
        (*SHOW_STATE, name(HOSTS[1])),  # running already: reloaded with its new drop-in
        ("daemon-reload",),
        ("start", "--no-block", units.TARGET),
        ("stop", "--no-block", name(HOSTS[0])),
    ]
    for h in HOSTS[1:]:
        assert units.dropin_path(tmp_path, h).read_text() == units.dropin_text(h, 900)


def test_dropin_goes_with_its_host_and_leaves_the_operators_files(tmp_path, calls):
    units.apply(tmp_path, HOSTS, [], systemctl=calls)
    mine = units.dropin_path(tmp_path, HOSTS[0])
    theirs = mine.parent / "override.conf"  # systemctl edit psprobe@HOST.timer
    theirs.write_text("[Timer]\nAccuracySec=1s\n")
    units.apply(tmp_path, [], HOSTS[:2], systemctl=calls)
    assert not mine.exists() and theirs.exists()
    assert not units.dropin_path(tmp_path, HOSTS[1]).parent.exists()
    assert units.dropin_path(tmp_path, HOSTS[2]).exists()


def test_hand_made_links_get_a_dropin_and_hand_removed_ones_lose_it(tmp_path, calls):
    units.apply(tmp_path, HOSTS[:1], [], systemctl=calls)
    w = wants(tmp_path)
    # `systemctl enable psprobe@X.timer` by hand, and `systemctl disable` of a synced one
    os.symlink(TEMPLATES / "psprobe@.timer", w / name(HOSTS[1]))
    (w / name(HOSTS[0])).unlink()
    calls.clear()
    units.apply(tmp_path, [], [], systemctl=calls)
    assert units.dropin_path(tmp_path, HOSTS[1]).read_text() == units.dropin_text(HOSTS[1], 600)
    assert not units.dropin_path(tmp_path, HOSTS[0]).parent.exists()
    # The hand-enabled timer ran on the template's schedule: rescheduled like any.
    assert calls == [(*SHOW_STATE, name(HOSTS[1])), ("daemon-reload",)]
    calls.clear()
    units.apply(tmp_path, [], [], systemctl=calls)
    assert calls == []


def test_template_dropins_are_never_touched(tmp_path, calls):
    tdir = tmp_path / "psprobe@.timer.d"
    tdir.mkdir()
    (tdir / "10-phase.conf").write_text("[Timer]\n")  # the operator's, whatever its name
    (tmp_path / "other@x.timer.d").mkdir()
    (tmp_path / "other@x.timer.d" / "10-phase.conf").write_text("[Timer]\n")
    units.apply(tmp_path, HOSTS, [], systemctl=calls)
    units.apply(tmp_path, [], HOSTS, systemctl=calls)
    assert (tdir / "10-phase.conf").exists()
    assert (tmp_path / "other@x.timer.d" / "10-phase.conf").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["other@x.timer.d", "psprobe@.timer.d",
                                                   units.WANTS, units.PARENT_WANTS])


def test_sync_writes_each_hosts_interval_from_the_configuration(tmp_path, calls):
    conf = write_config(tmp_path / "p.conf", {
        "collect": {"state_dir": tmp_path / "state", "interval": "5min"},
        f"host {HOSTS[1]}": {"interval": "1h"},
    })
    cfg = config.load(str(conf))
    plan = msync.Plan({h: {"read_url": f"https://{h}/", "meshes": ["static"]} for h in HOSTS},
                      added=list(HOSTS), removed=[], kept=[])
    msync.apply(cfg, plan, tmp_path / "units", now=time.time(), systemctl=False)
    got = {h: units.dropin_path(tmp_path / "units", h).read_text() for h in HOSTS}
    assert got == {h: units.dropin_text(h, 3600 if h == HOSTS[1] else 300) for h in HOSTS}


@pytest.mark.parametrize("interval", [60, 600, 7200])
def test_next_time_is_the_next_one_of_the_calendar(interval):
    now = time.time()
    for h in HOSTS:
        for after in (now, now - 12345.6, float(int(now))):
            t = units.next_time(h, interval, after)
            assert after < t <= after + interval
            assert t % interval == units.phase(h, interval)


def _stamp(t: float) -> str:
    return time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def test_a_new_schedule_never_fires_many_at_once(tmp_path, caplog):
    """A running timer reloaded with a new calendar fires at once for a time of it passed
    since its last run (tests/system/test_reload.py).  Such timers get the new schedule
    at most 1 in 20 hosts per sync; those whose next time is ahead get it at once."""
    hosts = [f"ps{i:02d}.example.org" for i in range(60)]
    units.apply(tmp_path, hosts, [], systemctl=None)
    now = time.time()
    ahead = [h for h in hosts if units.next_time(h, 300, now - 1) > now + 30][:20]
    behind = [h for h in hosts if h not in ahead][:30]
    stopped = [h for h in hosts if h not in ahead and h not in behind]
    blocks = []
    for h in hosts:
        if h in stopped:
            blocks.append(f"Id={name(h)}\nActiveState=inactive\nLastTriggerUSec=n/a\n"
                          f"InactiveExitTimestamp={_stamp(now - 9000)}\n")
            continue
        last = now - 1 if h in ahead else now - 400  # 400 s ago: a 300 s slot passed since
        blocks.append(f"Id={name(h)}\nActiveState=active\nLastTriggerUSec={_stamp(last)}\n"
                      f"InactiveExitTimestamp={_stamp(now - 9000)}\n")
    seen = Systemctl(out="\n".join(blocks))
    with caplog.at_level(logging.INFO, logger="psprobe"):
        units.apply(tmp_path, [], [], interval=300, systemctl=seen)
    assert [a[0] for a in seen] == ["show", "daemon-reload"]
    new = {h for h in hosts if units.dropin_path(tmp_path, h).read_text() == units.dropin_text(h, 300)}
    assert set(ahead) | set(stopped) <= new
    assert len(new & set(behind)) == 3  # 60 hosts / 20: the bounded burst of this sync
    for h in set(behind) - new:
        assert units.dropin_path(tmp_path, h).read_text() == units.dropin_text(h, 600)
    assert "schedule of 27 host(s) kept until a later sync" in caplog.text
    # The next sync, the same answers: 3 more; never more at once.
    seen.clear()
    units.apply(tmp_path, [], [], interval=300, systemctl=seen)
    assert len({h for h in behind
                if units.dropin_path(tmp_path, h).read_text() == units.dropin_text(h, 300)}) == 6


def test_without_systemd_every_schedule_is_written(tmp_path, calls):
    units.apply(tmp_path, HOSTS, [], systemctl=None)
    units.apply(tmp_path, [], [], interval=60, systemctl=None)
    assert calls == []
    assert all(units.dropin_path(tmp_path, h).read_text() == units.dropin_text(h, 60) for h in HOSTS)


# --- the move from an older psprobe: links in timers.target.wants, pause in paused.json


def legacy(unit_dir: Path, hosts=HOSTS, *, sync: bool = True) -> Path:
    """What a psprobe before psprobe-timers.target left in ``unit_dir``, with another
    package's timer, the report timer (it stays wanted by timers.target) and hostile names."""
    old = unit_dir / units.PARENT_WANTS
    old.mkdir(parents=True)
    for h in hosts:
        os.symlink(TEMPLATES / "psprobe@.timer", old / name(h))
    if sync:
        os.symlink(TEMPLATES / units.SYNC_TIMER, old / units.SYNC_TIMER)
    for other in ("fstrim.timer", "psprobe-report.timer", "psprobe@.timer", "psprobe@-rf.timer",
                  "psprobe@a b.timer", r"psprobe@x\x2f..\x2fetc.timer"):
        os.symlink(f"/usr/lib/systemd/system/{other}", old / other)
    (old / "psprobe@plain.example.org.timer").write_text("not a link\n")
    return old


NOT_OURS = ["fstrim.timer", "psprobe-report.timer", "psprobe@.timer", "psprobe@-rf.timer",
            "psprobe@a b.timer", r"psprobe@x\x2f..\x2fetc.timer", "psprobe@plain.example.org.timer"]


def test_migrate_moves_the_links_under_the_enabled_target_once(tmp_path, caplog):
    udir, sd = tmp_path / "units", tmp_path / "state"
    old = legacy(udir)
    # Before the move the old links count as enabled: a sync's plan sees them.
    assert units.enabled_hosts(udir) == set(HOSTS)
    sc = Systemctl()
    with caplog.at_level(logging.WARNING, logger="psprobe"):
        assert units.migrate(udir, sd, systemctl=sc) == len(HOSTS) + 1
    assert sc == [("daemon-reload",), ("start", "--no-block", units.TARGET)]
    assert sorted(os.listdir(wants(udir))) == sorted([units.SYNC_TIMER, *map(name, HOSTS)])
    for n in os.listdir(wants(udir)):  # renamed: each still points where it pointed
        assert os.readlink(wants(udir) / n) == str(TEMPLATES / ("psprobe@.timer" if "@" in n else n))
    assert os.readlink(old / units.TARGET) == str(TEMPLATES / units.TARGET)
    assert units.target_enabled(udir) and not units.paused(udir)
    # Another package's links, the report timer's, and whatever is no host timer stay.
    assert sorted(os.listdir(old)) == sorted([*NOT_OURS, units.TARGET])
    assert "psprobe@-rf.timer" in caplog.text
    assert units.enabled_hosts(udir) == set(HOSTS)
    # Idempotent: nothing left to move, nothing to call.
    sc.clear()
    assert units.migrate(udir, sd, systemctl=sc) == 0
    assert sc == []
    assert sorted(os.listdir(old)) == sorted([*NOT_OURS, units.TARGET])


def test_migrate_keeps_a_pause_as_the_disabled_target_and_drops_the_marker(tmp_path):
    udir, sd = tmp_path / "units", tmp_path / "state"
    legacy(udir)
    sd.mkdir()
    (sd / "paused.json").write_text('{"time": 1, "by": "op", "force": false}')
    sc = Systemctl()
    assert units.migrate(udir, sd, systemctl=sc) == len(HOSTS) + 1
    assert sc == [("daemon-reload",)]  # nothing started: still paused
    assert not (sd / "paused.json").exists()
    assert not units.target_enabled(udir) and units.paused(udir)
    assert units.enabled_hosts(udir) == set(HOSTS)
    assert units.migrate(udir, sd, systemctl=sc) == 0 and sc == [("daemon-reload",)]


def test_migrate_resumes_an_interrupted_move_and_leaves_a_fresh_install_alone(tmp_path):
    udir, sd = tmp_path / "units", tmp_path / "state"
    old = legacy(udir, sync=False)
    # Interrupted after the target was enabled and one link moved; another linked anew by
    # a sync of this version meanwhile (both places: the new one stays).
    enable_target(udir)
    wants(udir).mkdir()
    os.rename(old / name(HOSTS[0]), wants(udir) / name(HOSTS[0]))
    os.symlink(TEMPLATES / "psprobe@.timer", wants(udir) / name(HOSTS[1]))
    assert units.migrate(udir, sd, systemctl=None) == 2
    assert sorted(os.listdir(wants(udir))) == sorted(map(name, HOSTS))
    assert not any(n.startswith("psprobe@") and n in map(name, HOSTS) for n in os.listdir(old))
    # No sync timer link: psprobe was never turned on by it, and nothing says paused.
    assert not units.paused(udir)
    fresh = tmp_path / "fresh"
    assert units.migrate(fresh, sd, systemctl=Systemctl()) == 0
    assert not fresh.exists()


def test_sync_migrates_first_and_then_plans_on_the_new_links(tmp_path):
    udir = tmp_path / "units"
    legacy(udir, HOSTS[:2])
    conf = write_config(tmp_path / "p.conf", {"collect": {"state_dir": tmp_path / "state"},
                                              "mesh": {"unit_dir": udir}})
    cfg = config.load(str(conf))
    enabled = units.enabled_hosts(udir)
    plan = msync.Plan({h: {"read_url": f"https://{h}/", "meshes": ["static"]} for h in HOSTS[1:]},
                      added=sorted(set(HOSTS[1:]) - enabled), removed=sorted(enabled - set(HOSTS[1:])),
                      kept=sorted(enabled & set(HOSTS[1:])))
    assert plan.added == [HOSTS[2]] and plan.removed == [HOSTS[0]]
    sc = Systemctl()
    msync.apply(cfg, plan, udir, now=time.time(), systemctl=sc)
    assert sc == [("daemon-reload",), ("start", "--no-block", units.TARGET),  # the move
                  (*SHOW_STATE, name(HOSTS[1])),  # kept, running, its first drop-in
                  ("daemon-reload",), ("start", "--no-block", units.TARGET),
                  ("stop", "--no-block", name(HOSTS[0]))]
    assert units.enabled_hosts(udir) == set(HOSTS[1:])
    assert sorted(os.listdir(wants(udir))) == sorted([units.SYNC_TIMER, *map(name, HOSTS[1:])])
    assert name(HOSTS[0]) not in os.listdir(udir / units.PARENT_WANTS)
