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
MAX_EXPOSURE = {"psprobe@x.service": 1.5, "psprobe-receive.service": 1.5}
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
RECEIVER = UNITS / "psprobe-receive.service"
# Every service but the receiver is a run started by a timer.
ONESHOTS = [p for p in SERVICES if p != RECEIVER]


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
        "psprobe-receive.socket",
        "psprobe-receive.service",
    }


@pytest.mark.parametrize("unit", ONESHOTS, ids=lambda p: p.name)
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


@pytest.mark.parametrize("unit", ["psprobe@x.service", "psprobe-report.service", "psprobe-sync.service",
                                  "psprobe-receive.service"])
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


# --- the push receiver: a socket-activated long-running service (issue 14)

SOCKET = UNITS / "psprobe-receive.socket"
# What EL8's systemd 239 knows of the directives the receiver's units use; the rest are
# newer and 239 ignores them with a log line (the service's comment says why that is
# harmless).  LoadCredential= (247), Type=exec (240) and the like must not creep in.
KNOWN_TO_239 = {
    "Description", "Documentation", "Requires", "After", "Wants", "StartLimitIntervalSec",
    "StartLimitBurst", "Type", "ExecStart", "User", "Group", "Slice", "Restart", "RestartSec",
    "RestartPreventExitStatus", "TimeoutStopSec", "StateDirectory", "StateDirectoryMode",
    "UMask", "ReadWritePaths", "Environment", "MemoryMax", "TasksMax", "LimitNOFILE",
    "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem",
    "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectControlGroups", "RestrictAddressFamilies",
    "RestrictNamespaces", "RestrictRealtime", "LockPersonality", "MemoryDenyWriteExecute",
    "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
    "ListenStream", "BindIPv6Only", "Accept", "WantedBy",
}
IGNORED_BY_239 = {"ProtectKernelLogs", "ProtectHostname", "ProtectClock", "ProtectProc",
                  "ProcSubset", "RestrictSUIDSGID"}


def test_receiver_socket_listens_on_8443_for_both_families():
    d = directives(SOCKET)
    assert d["ListenStream"] == ["8443"] and d["BindIPv6Only"] == ["both"]
    # One service gets the listening socket (no per-connection instances).
    assert d.get("Accept", ["no"]) == ["no"]
    assert d["WantedBy"] == ["sockets.target"]


def test_receiver_is_started_by_its_socket_only_and_restarts_bounded():
    d = directives(RECEIVER)
    # No [Install]: enabling the socket is the one switch; the first push starts it.
    assert "WantedBy" not in d and "[Install]" not in RECEIVER.read_text()
    assert d["Requires"] == ["psprobe-receive.socket"]
    assert "psprobe-receive.socket" in d["After"][0].split()
    assert d["Type"] == ["simple"]  # not exec: 240
    assert d["ExecStart"] == ["/usr/bin/psprobe receive"]
    assert d["Slice"] == ["psprobe.slice"] and d.get("MemoryMax") and d.get("TasksMax")
    assert d["Restart"] == ["on-failure"] and d.get("RestartSec")
    assert d.get("StartLimitIntervalSec") and d.get("StartLimitBurst")
    # A configuration error (78) does not fix itself by restarting.
    assert "78" in d["RestartPreventExitStatus"][0].split()


def test_receiver_runs_unprivileged_in_the_collectors_sandbox():
    d = directives(RECEIVER)
    assert d["User"] == ["psprobe"] and d["Group"] == ["psprobe"]
    # The port is systemd's: no capability at all, not even CAP_NET_BIND_SERVICE.
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert d["StateDirectory"] == ["psprobe"] and d["UMask"] == ["0007"]
    collect = directives(UNITS / "psprobe@.service")
    sandbox = {k for k in collect if k.startswith(("Protect", "Private", "Restrict", "SystemCall"))}
    sandbox |= {"LockPersonality", "MemoryDenyWriteExecute", "ProcSubset"}
    for key in sandbox:
        assert d.get(key) == collect[key], key


@pytest.mark.parametrize("unit", [SOCKET, RECEIVER], ids=lambda p: p.name)
def test_receiver_units_need_nothing_newer_than_el8(unit):
    used = set(directives(unit))
    assert used <= KNOWN_TO_239 | IGNORED_BY_239, used - KNOWN_TO_239 - IGNORED_BY_239
    assert "LoadCredential" not in used  # 247: EL8 would start without the key
