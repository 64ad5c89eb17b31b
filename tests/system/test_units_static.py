"""The unit files: what systemd itself says of them, and the rules they must keep.

``systemd-analyze`` needs a running systemd for ``security`` and the installed
ExecStart binary for ``verify``: both run inside the test container.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from psprobe import units

from .container import REPO

UNITS = REPO / "units"
# systemd-analyze security's overall exposure (0 best, 10 worst).  The collector, which
# runs 2 000 times per 10 minutes, is held to 1.5 (its sandbox trimmed to what protects).
MAX_EXPOSURE = {"psprobe@x.service": 1.5}
DEFAULT_MAX_EXPOSURE = 2.0


def directives(unit: Path) -> dict[str, list[str]]:
    """``Key`` -> values of every ``Key=value`` line (comments and sections skipped)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out.setdefault(key.strip(), []).append(value.strip())
    return out


SERVICES = sorted(UNITS.glob("*.service"))
TIMERS = sorted(UNITS.glob("*.timer"))


def test_the_unit_set_is_complete():
    names = {p.name for p in UNITS.iterdir()}
    assert names == {
        "psprobe@.service",
        "psprobe@.timer",
        "psprobe-sync.service",
        "psprobe-sync.timer",
        "psprobe-report.service",
        "psprobe-report.timer",
        "psprobe-timers.target",
        "psprobe.slice",
    }


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_every_service_is_bounded_and_sliced(unit):
    d = directives(unit)
    assert d["Type"] == ["oneshot"]
    # A oneshot has no start timeout by default: a hung run would block its timer for good.
    assert d.get("TimeoutStartSec"), "oneshot without TimeoutStartSec"
    assert d["Slice"] == ["psprobe.slice"]
    assert d.get("MemoryMax")
    # Deprecated in 252 (a warning on every load); MemoryMax/CPUWeight cover cgroup v1.
    assert "MemoryLimit" not in d and "CPUShares" not in d
    assert d["ExecStart"][0].startswith("/usr/bin/psprobe ")


def test_collect_uses_the_raw_instance():
    # %I unescapes: the "-" of a host name would become "/".
    assert directives(UNITS / "psprobe@.service")["ExecStart"] == ["/usr/bin/psprobe collect %i"]


def test_host_timer_has_no_trigger_a_reload_resets():
    d = directives(UNITS / "psprobe@.timer")
    # OnActiveSec= counts again from every daemon-reload (tests/system/test_reload.py):
    # the schedule is the calendar of the drop-in sync writes (psprobe.units.dropin_text).
    # Without one, only triggers a reload leaves alone: OnBootSec= (past once fired) and
    # OnUnitInactiveSec= (from the end of the last run).
    assert "OnActiveSec" not in d and "OnUnitActiveSec" not in d
    assert d["OnBootSec"] == ["1min"] and d["OnUnitInactiveSec"] == ["10min"]
    assert "OnCalendar" not in d  # the drop-in's own; a template one would fire as well
    assert d.get("RandomizedDelaySec") and d["FixedRandomDelay"] == ["yes"]
    # The default 1min accuracy would coalesce the phases into one wake-up a minute.
    assert d["AccuracySec"] == ["1s"]


INTERVALS = [60, 300, 600, 900, 1800, 3600, 7200, 21600, 86400]


def test_phase_calendars_are_what_systemd_reads(container):
    """systemd's own reading of every form of OnCalendar= sync writes."""
    host = "ps.example.org:8085"
    specs = [units.on_calendar(host, i) for i in INTERVALS]
    cp = container.run(["systemd-analyze", "calendar", "--iterations=3", *specs])
    assert cp.returncode == 0, cp.stderr
    blocks = [b for b in cp.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == len(INTERVALS)
    for interval, spec, block in zip(INTERVALS, specs, blocks):
        lines = dict(line.strip().split(": ", 1) for line in block.splitlines() if ": " in line)
        assert lines["Normalized form"] == spec
        when = [units._timestamp(lines[k]) for k in ("Next elapse", "Iter. #2", "Iter. #3")]
        assert None not in when, block
        # Every interval, at the host's phase (UTC days start at multiples of the interval).
        assert [b - a for a, b in zip(when, when[1:])] == [interval, interval], spec
        assert when[0] % interval == units.phase(host, interval), spec


def test_a_timer_with_its_dropin_has_only_the_calendar(container):
    c = container
    host = "static.example.org"
    udir = c.path("/etc/systemd/system")
    units.apply(udir, [host], [], systemctl=None)
    timer = units.timer_name(host)
    try:
        c.systemctl("daemon-reload", check=True)
        cp = c.run(f"cd /usr/lib/systemd/system && systemd-analyze verify {timer}")
        assert cp.returncode == 0 and (cp.stdout + cp.stderr).strip() == "", cp.stdout + cp.stderr
        cp = c.systemctl("show", "-p", "TimersCalendar", "-p", "TimersMonotonic",
                         "-p", "RandomizedDelayUSec", "-p", "DropInPaths", timer)
        props = dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)
        print(f"{timer}: {props}", file=sys.stderr)
        assert f"OnCalendar={units.on_calendar(host, 600)} ;" in props["TimersCalendar"]
        assert props.get("TimersMonotonic", "") == ""  # not shown at all when empty
        assert props["RandomizedDelayUSec"] == "0"
        assert f"/etc/systemd/system/{timer}.d/10-phase.conf" in props["DropInPaths"]
    finally:
        units.apply(udir, [], [host], systemctl=None)
        c.systemctl("daemon-reload")


@pytest.mark.parametrize("unit", TIMERS, ids=lambda p: p.name)
def test_every_timer_is_part_of_the_one_parent_but_the_reports(unit):
    """Pause/resume is the parent's state (psprobe.control): every collection and sync timer
    is wanted by it and PartOf= it; the weekly report is not paused with them."""
    d = directives(unit)
    if unit.name == "psprobe-report.timer":
        assert d["WantedBy"] == ["timers.target"] and "PartOf" not in d
        return
    assert d["WantedBy"] == [units.TARGET] and d["PartOf"] == [units.TARGET]
    if unit.name == "psprobe-sync.timer":
        assert d["Also"] == [units.TARGET]  # enabling the sync timer turns psprobe on


def test_the_parent_is_wanted_by_timers_target():
    d = directives(UNITS / units.TARGET)
    assert d["WantedBy"] == ["timers.target"]


def test_verify_is_clean(container):
    names = [p.name for p in sorted(UNITS.iterdir())] + ["psprobe@x.service", "psprobe@x.timer"]
    cp = container.run(f"cd /usr/lib/systemd/system && systemd-analyze verify {' '.join(names)}")
    print(f"systemd-analyze verify: exit {cp.returncode}\n{cp.stdout}{cp.stderr}", file=sys.stderr)
    assert cp.returncode == 0
    assert (cp.stdout + cp.stderr).strip() == ""


EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+) (\w+)")


@pytest.mark.parametrize("unit", ["psprobe@x.service", "psprobe-report.service", "psprobe-sync.service"])
def test_security_exposure_is_ok(container, unit):
    cp = container.run(["systemd-analyze", "security", "--no-pager", unit])
    m = EXPOSURE.search(cp.stdout)
    assert m, cp.stdout + cp.stderr
    print(f"systemd-analyze security {unit}: {m.group(2)} {m.group(3)}", file=sys.stderr)
    assert m.group(1) == unit
    assert float(m.group(2)) <= MAX_EXPOSURE.get(unit, DEFAULT_MAX_EXPOSURE)


# Directives whose protection the collector's other directives already give, left out
# because each sets up mounts or filters at every run (bench/sandbox_cost.py: 17 ms of
# the 43 the sandbox cost; the unit's comment has the figures): directive -> what implies it.
IMPLIED = {
    "ProtectKernelTunables": "no capabilities: /proc/sys and /sys are root's to write",
    "ProtectKernelLogs": "ProcSubset=pid hides /proc/kmsg, PrivateDevices /dev/kmsg, "
                         "and syslog(2) is outside @system-service",
    "ProtectHostname": "sethostname(2) needs CAP_SYS_ADMIN and is outside @system-service",
}


def test_collect_sandbox_leaves_out_only_what_it_implies():
    d = directives(UNITS / "psprobe@.service")
    # The premises of IMPLIED: a user with no capabilities, a /proc of processes only,
    # a /dev of pseudo-devices and an allow-list of system calls.
    assert d["User"] == ["psprobe"] and d["CapabilityBoundingSet"] == [""]
    assert d["NoNewPrivileges"] == ["yes"] and d["AmbientCapabilities"] == [""]
    assert d["ProcSubset"] == ["pid"] and d["PrivateDevices"] == ["yes"]
    assert d["SystemCallFilter"][0] == "@system-service"
    assert not set(IMPLIED) & set(d), "implied by the rest: costs set-up time at every run"
    # Filters for one ABI, not three: 10 ms of seccomp set-up per run saved.
    assert d["SystemCallArchitectures"] == ["native"]
