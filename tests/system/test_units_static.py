"""The unit files: what systemd itself says of them, and the rules they must keep.

``systemd-analyze`` needs a running systemd for ``security`` and the installed
ExecStart binary for ``verify``: both run inside the test container.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from .container import REPO

UNITS = REPO / "units"
MAX_EXPOSURE = 2.0


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


def test_host_timer_spreads_and_repeats_after_the_run():
    d = directives(UNITS / "psprobe@.timer")
    assert d.get("OnUnitInactiveSec") and d.get("OnActiveSec")
    assert d.get("RandomizedDelaySec")
    # The default 1min accuracy would coalesce the spread starts again.
    assert d["AccuracySec"] == ["1s"]
    assert d["WantedBy"] == ["timers.target"]


@pytest.mark.parametrize("unit", TIMERS, ids=lambda p: p.name)
def test_every_timer_is_wanted_by_timers_target(unit):
    assert directives(unit)["WantedBy"] == ["timers.target"]


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
    assert float(m.group(2)) <= MAX_EXPOSURE
