"""pause / resume (systemctl recorded: systemd itself is tests/system's), and logs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import cli_runner
from test_status import prepared, run

from psprobe import config, control, hostnames, units
from psprobe.cli import main


class Systemctl:
    """Records systemctl calls; ``answers`` maps the verb to a return code."""

    def __init__(self, **answers: int) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.answers = answers

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        self.calls.append(args)
        rc = self.answers.get(args[0].replace("-", "_"), 0)
        return subprocess.CompletedProcess(["systemctl", *args], rc, "", "boom" if rc else "")


def world(tmp_path: Path):
    conf = prepared(tmp_path, 1000.0, {"a.example": {"runs": [run(900)]},
                                       "b.example:8443": {"runs": [run(900)]},
                                       "off.example": {"enabled": False}})
    return conf, config.load(str(conf))


def test_pause_and_resume_are_the_parent_units_state(tmp_path):
    """One unit: every timer is PartOf= psprobe-timers.target, nothing is kept beside it."""
    _, cfg = world(tmp_path)
    sc = Systemctl()
    assert control.pause(systemctl=sc) == [units.TARGET]
    assert sc.calls == [("disable", "--now", "psprobe-timers.target")]
    sc = Systemctl()
    control.pause(force=True, systemctl=sc)
    assert sc.calls == [("disable", "--now", "psprobe-timers.target"), ("stop", "psprobe@*.service")]
    sc = Systemctl()
    assert control.resume(systemctl=sc) == [units.TARGET]
    assert sc.calls == [("enable", "--now", "psprobe-timers.target")]
    assert not list(Path(cfg.collect.state_dir).rglob("paused*"))  # nothing kept beside it


def test_systemctl_refusal_is_an_error_line(tmp_path, monkeypatch):
    conf, _ = world(tmp_path)
    monkeypatch.setattr(units, "systemctl", Systemctl(disable=1))
    r = cli_runner().invoke(main, ["--config", str(conf), "pause"])
    assert r.exit_code == 1 and "pause: systemctl disable: boom" in r.output
    monkeypatch.setattr(units, "systemctl", Systemctl())
    r = cli_runner().invoke(main, ["--config", str(conf), "pause", "-f"])
    assert r.exit_code == 0 and "with the sync timer and 2 host timers and the running" in r.output
    r = cli_runner().invoke(main, ["--config", str(conf), "resume"])
    assert r.exit_code == 0 and "resumed: psprobe-timers.target enabled and started" in r.output


def test_a_timer_started_collect_is_not_held_back_by_anything_of_psprobe(tmp_path):
    """No marker, no INVOCATION_ID check: while paused systemd starts no run at all, and
    a run started by hand or by a unit is a run (here: no broker, so it fails)."""
    conf, _ = world(tmp_path)
    r = cli_runner().invoke(main, ["--config", str(conf), "collect", "a.example"],
                            env={"INVOCATION_ID": "0123abcd"})
    assert "paused" not in r.output and r.exit_code != 0


def test_migrate_units_moves_an_old_pause_into_the_parents_state(tmp_path):
    """What the package's %posttrans runs; here no systemd reads the unit dir: files only."""
    conf, cfg = world(tmp_path)
    udir, sd = Path(cfg.mesh.unit_dir), Path(cfg.collect.state_dir)
    # The older layout: every link in timers.target.wants, the pause a marker file.
    os.rename(udir / units.WANTS, udir / units.PARENT_WANTS)
    os.symlink("/usr/lib/systemd/system/psprobe-sync.timer",
               udir / units.PARENT_WANTS / units.SYNC_TIMER)
    (sd / "paused.json").write_text('{"time": 1, "by": "op", "force": false}')
    r = cli_runner().invoke(main, ["--config", str(conf), "migrate-units"])
    assert r.exit_code == 0 and "3 timer link(s) now under psprobe-timers.target" in r.output
    assert sorted(os.listdir(udir / units.WANTS)) == sorted(
        [units.SYNC_TIMER, units.timer_name("a.example"), units.timer_name("b.example:8443")])
    assert os.listdir(udir / units.PARENT_WANTS) == [] and not (sd / "paused.json").exists()
    r = cli_runner().invoke(main, ["--config", str(conf), "status"])
    assert r.stdout.startswith("PAUSED: psprobe-timers.target is disabled")
    r = cli_runner().invoke(main, ["--config", str(conf), "migrate-units"])
    assert r.exit_code == 0 and "now under" not in r.output


def test_logs_validates_the_host_and_runs_journalctl(tmp_path):
    conf, _ = world(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    rec = tmp_path / "args"
    fake = bindir / "journalctl"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {rec}\nexit 3\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "b.example:8443", "-f", "--since",
                                  "today", "-p", "warning"], env=env)
    assert r.exit_code == 3
    unit = f"psprobe@{hostnames.unit_instance('b.example:8443')}.service"
    assert rec.read_text().splitlines() == ["-u", unit, "-f", "--since", "today", "-p", "warning"]
    rec.unlink()
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "c.example"], env=env)
    assert r.exit_code == 2 and "not a host psprobe knows" in r.output and not rec.exists()
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "../etc"], env=env)
    assert r.exit_code == 2 and not rec.exists()
    # a host only the last sync named (no state yet) is known too
    (Path(config.load(str(conf)).collect.state_dir) / "sync.json").write_text(
        json.dumps({"hosts": ["new.example"]}))
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "new.example"], env=env)
    assert r.exit_code == 3


def test_every_operator_command_has_help():
    for cmd in ("status", "logs", "pause", "resume", "backfill", "report"):
        r = cli_runner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage: main " + cmd in r.output.replace("psprobe", "main")


def test_logs_finds_the_one_host_of_that_name_whatever_its_port(tmp_path):
    conf, _ = world(tmp_path)  # knows b.example:8443
    bindir = tmp_path / "bin"
    bindir.mkdir()
    rec = tmp_path / "args"
    fake = bindir / "journalctl"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {rec}\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "B.example", "-n", "5"], env=env)
    assert r.exit_code == 0, r.output
    unit = f"psprobe@{hostnames.unit_instance('b.example:8443')}.service"
    assert rec.read_text().splitlines() == ["-u", unit, "-n", "5"]
    # two ports of one name: which one is not guessed
    rec.unlink()
    units.apply(Path(config.load(str(conf)).mesh.unit_dir), ["b.example:9443"], [], systemctl=None)
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "b.example"], env=env)
    assert r.exit_code == 2 and not rec.exists()
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert "b.example: 2 known hosts have that name: b.example:8443, b.example:9443" in lines[0]
    # the full name still works, and so does a host without a port
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "b.example:9443"], env=env)
    assert r.exit_code == 0 and rec.read_text().splitlines()[1] == "psprobe@b.example:9443.service"
    r = cli_runner().invoke(main, ["--config", str(conf), "logs", "a.example"], env=env)
    assert r.exit_code == 0 and rec.read_text().splitlines()[1] == "psprobe@a.example.service"
