"""psprobe.units: the enablement symlinks sync writes, and its systemctl calls."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from psprobe import hostnames, units

TEMPLATES = Path("/usr/lib/systemd/system")
HOSTS = ["a-b.example.org", "ps.example.net:8085", "10.1.2.3"]


def wants(unit_dir: Path) -> Path:
    return unit_dir / units.TIMER_WANTS


def name(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.timer"


@pytest.fixture
def calls(monkeypatch):
    """Record systemctl invocations instead of running them."""
    seen: list[tuple[str, ...]] = []

    def fake(*args: str) -> subprocess.CompletedProcess:
        seen.append(args)
        return subprocess.CompletedProcess(["systemctl", *args], 0, "", "")

    monkeypatch.setattr(units, "systemctl", fake)
    return seen


def test_apply_makes_what_systemctl_enable_makes(tmp_path):
    old = os.umask(0o077)
    try:
        units.apply(tmp_path, HOSTS, [], systemctl=False)
    finally:
        os.umask(old)
    w = wants(tmp_path)
    assert (w.stat().st_mode & 0o777) == 0o755
    assert sorted(os.listdir(w)) == sorted(name(h) for h in HOSTS)
    for h in HOSTS:
        assert os.readlink(w / name(h)) == str(TEMPLATES / "psprobe@.timer")
    assert units.enabled_hosts(tmp_path) == set(HOSTS)


def test_instance_round_trips_through_the_link_name(tmp_path):
    units.apply(tmp_path, HOSTS, [], systemctl=False)
    for entry in os.listdir(wants(tmp_path)):
        instance = entry[len("psprobe@") : -len(".timer")]
        assert hostnames.from_instance(instance) in HOSTS


def test_remove_touches_only_psprobe_links_of_removed_hosts(tmp_path):
    w = wants(tmp_path)
    w.mkdir()
    os.symlink("/usr/lib/systemd/system/fstrim.timer", w / "fstrim.timer")
    (tmp_path / "other.service").write_text("[Service]\n")
    units.apply(tmp_path, HOSTS, [], systemctl=False)
    units.apply(tmp_path, [], [HOSTS[0], "never.example.org"], systemctl=False)
    assert units.enabled_hosts(tmp_path) == set(HOSTS[1:])
    assert (w / "fstrim.timer").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["other.service", units.TIMER_WANTS]
    assert not [e for e in os.listdir(w) if e.endswith(".tmp")]


def test_systemctl_runs_once_per_step_and_only_on_change(tmp_path, calls):
    units.apply(tmp_path, HOSTS[:2], [], template_dir=Path("/t"))
    assert calls == [
        ("daemon-reload",),
        ("start", "--no-block", *sorted(name(h) for h in HOSTS[:2])),
    ]
    calls.clear()
    units.apply(tmp_path, HOSTS[:2], [], template_dir=Path("/t"))
    assert calls == []  # nothing changed: no reload
    units.apply(tmp_path, HOSTS[1:], [HOSTS[0]], template_dir=Path("/t"))
    assert calls == [
        ("daemon-reload",),
        ("start", "--no-block", name(HOSTS[2])),
        ("stop", "--no-block", name(HOSTS[0])),
    ]
    assert os.readlink(wants(tmp_path) / name(HOSTS[1])) == "/t/psprobe@.timer"


def test_systemctl_false_never_calls(tmp_path, calls):
    units.apply(tmp_path, HOSTS, [], systemctl=False)
    units.apply(tmp_path, [], HOSTS, systemctl=False)
    assert calls == []
    assert units.enabled_hosts(tmp_path) == set()


def test_link_to_another_target_is_repointed(tmp_path, calls):
    w = wants(tmp_path)
    w.mkdir()
    os.symlink("/old/place/psprobe@.timer", w / name(HOSTS[0]))
    units.apply(tmp_path, [HOSTS[0]], [])
    assert os.readlink(w / name(HOSTS[0])) == str(TEMPLATES / "psprobe@.timer")
    assert calls[0] == ("daemon-reload",)


def test_failed_reload_raises_and_starts_nothing(tmp_path, monkeypatch):
    seen = []

    def fake(*args):
        seen.append(args)
        return subprocess.CompletedProcess(args, 1, "", "Access denied")

    monkeypatch.setattr(units, "systemctl", fake)
    with pytest.raises(units.UnitsError, match="daemon-reload: Access denied"):
        units.apply(tmp_path, HOSTS, [])
    assert seen == [("daemon-reload",)]
    assert units.enabled_hosts(tmp_path) == set(HOSTS)  # enablement stays: next boot starts them


def test_foreign_psprobe_entry_is_ignored_and_logged(tmp_path, caplog):
    w = wants(tmp_path)
    w.mkdir()
    os.symlink("/x", w / "psprobe@.timer")  # the bare template: not a host
    os.symlink("/x", w / "psprobe-sync.timer")
    units.apply(tmp_path, HOSTS[:1], [], systemctl=False)
    with caplog.at_level(logging.WARNING, logger="psprobe"):
        assert units.enabled_hosts(tmp_path) == {HOSTS[0]}
    assert "psprobe@.timer" in caplog.text
    assert "psprobe-sync.timer" not in caplog.text


def test_enabled_hosts_of_a_missing_dir_is_empty(tmp_path):
    assert units.enabled_hosts(tmp_path / "nope") == set()


def test_systemctl_missing_answers_127(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    cp = units.systemctl("daemon-reload")
    assert cp.returncode == 127
    assert units.next_elapse(HOSTS) == dict.fromkeys(HOSTS)


# What systemd 252 printed for `systemctl show -p Id -p NextElapseUSecRealtime
# -p NextElapseUSecMonotonic` of a monotonic timer, a calendar one and an unknown one.
SHOW = """NextElapseUSecRealtime=
NextElapseUSecMonotonic=3h 12min 21.877061s
Id={0}

NextElapseUSecRealtime=Mon 2026-11-30 07:28:20 UTC
NextElapseUSecMonotonic=0
Id={1}

NextElapseUSecRealtime=
NextElapseUSecMonotonic=infinity
Id={2}
"""


def test_next_elapse_parses_both_clocks(monkeypatch):
    out = SHOW.format(*(name(h) for h in HOSTS))
    monkeypatch.setattr(units, "systemctl", lambda *a: subprocess.CompletedProcess(a, 0, out, ""))
    got = units.next_elapse(HOSTS)
    boot = time.time() - time.monotonic()
    assert got[HOSTS[0]] == pytest.approx(boot + 3 * 3600 + 12 * 60 + 21.877061, abs=1)
    assert got[HOSTS[1]] == 1796023700.0  # 2026-11-30 07:28:20 UTC
    assert got[HOSTS[2]] is None


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
