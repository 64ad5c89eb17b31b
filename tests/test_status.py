"""psprobe status: on prepared state, and on state left by real collects (simulator + broker)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import AMQP_URL, cli_runner, write_config
from esmond_sim import EsmondSim

from psprobe import checkpoint, config, control, runner, state, status, units
from psprobe.cli import main

OK_HOST, LAG_HOST, DOWN_HOST = "ps-east.example.sim", "ps-west.example.sim", "ps-down.example.sim"


# --- a world made by real collects: one healthy, one lagging (newest point 5 h old), one failing


@dataclass
class World:
    dir: Path
    conf: Path
    cfg: config.Config
    sim: EsmondSim
    t0: int


def write_cfg(d: Path, exchange: str, **extra: dict) -> Path:
    sections: dict[str, dict] = {
        "collect": {"state_dir": d / "state"},
        "archive": {"schemes": "http", "retries": 0, "timeout": "5s"},
        "broker": {"url": AMQP_URL, "exchange": exchange},
        "mesh": {"unit_dir": d / "units"},
        "metrics": {"textfile_dir": d / "prom"},
    }
    for s, kv in extra.items():
        sections.setdefault(s, {}).update(kv)
    d.mkdir(parents=True, exist_ok=True)
    return write_config(d / "psprobe.conf", sections)


def make_world(d: Path, sim: EsmondSim, exchange: str) -> World:
    """Three hosts collected twice; the second run of DOWN_HOST gets HTTP 500."""
    now = int(time.time())
    for h in (OK_HOST, LAG_HOST, DOWN_HOST):
        sim.host(h, prefix=f"/{h}/esmond/perfsonar/archive/")  # one port, told apart by path
    sim.host(OK_HOST).add_test("throughput", start=now - 6 * 3600, step=600, count=36)
    sim.host(OK_HOST).add_test("latencybg", event_types=["packet-loss-rate", "histogram-owdelay"],
                               start=now - 6 * 3600, step=60, count=360)
    sim.host(LAG_HOST).add_test("throughput", start=now - 11 * 3600, step=600, count=36)
    sim.host(DOWN_HOST).add_test("trace", start=now - 3600, step=300, count=12)
    conf = write_cfg(d, exchange)
    (d / "prom").mkdir(exist_ok=True)
    cfg = config.load(str(conf))
    for h in (OK_HOST, LAG_HOST, DOWN_HOST):
        hd = state.host_dir(cfg.collect.state_dir, h)
        hd.mkdir(parents=True)
        state.write_json_atomic(hd / "target.json", {"host": h, "read_url": sim.url(h),
                                                     "meshes": ["static"]})
    units.apply(d / "units", [OK_HOST, LAG_HOST, DOWN_HOST], [], systemctl=None)
    for h in (OK_HOST, LAG_HOST, DOWN_HOST):
        assert runner.collect_host(cfg, h) == 0
    sim.host(DOWN_HOST).fault("status", status=500, body="Internal Server Error")
    ok = sim.host(OK_HOST)
    ok.add_points(ok.records[0].key, "throughput", count=3, step=60)
    assert runner.collect_host(cfg, OK_HOST) == 0
    assert runner.collect_host(cfg, LAG_HOST) == 0
    assert runner.collect_host(cfg, DOWN_HOST) == 1
    return World(d, conf, cfg, sim, now)


@pytest.fixture
def sim():
    with EsmondSim() as s:
        yield s


@pytest.fixture
def world(tmp_path, sim, bus):
    return make_world(tmp_path / "w", sim, bus.exchange)


def cli(conf: Path, *args: str, env: dict | None = None):
    return cli_runner().invoke(main, ["--config", str(conf), *args], env=env)


def test_status_of_real_runs_shows_failing_then_lagging_then_ok_and_exits_1(world, bus):
    r = cli(world.conf, "status")
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["HOST", "STATE", "TIMER", "LAST", "RUN", "LAST", "OK", "POINTS",
                                "MSGS", "LAG", "FAILS", "NEXT"]
    rows = [ln.split() for ln in lines[1:4]]
    assert [r_[0] for r_ in rows] == [DOWN_HOST, LAG_HOST, OK_HOST]
    assert [r_[1] for r_ in rows] == ["FAILING", "LAGGING", "ok"]
    assert "\x1b[" not in r.stdout  # not a terminal: no colour
    # the failing host's error line, and the summary
    assert any(ln.startswith(f"{DOWN_HOST}: ") and "HTTP 500" in ln for ln in lines)
    assert lines[-1].startswith("3 hosts: 1 failing, 1 lagging, 1 ok (lag alarm 2h)")
    # points/messages of the last run and of 24 h match what the broker received
    arrived = bus.drain()
    js = json.loads(cli(world.conf, "status", "--json").stdout)
    by_host = {h["host"]: h for h in js["hosts"]}
    assert sum(h["points_24h"] for h in js["hosts"]) == sum(len(m.body["datapoints"]) for m in arrived)
    assert sum(h["messages_24h"] for h in js["hosts"]) == len(arrived)
    assert f" {by_host[OK_HOST]['points_last']}/{by_host[OK_HOST]['points_24h']} " in lines[3]
    assert by_host[OK_HOST]["points_last"] == 3 and by_host[OK_HOST]["messages_last"] == 1
    assert by_host[LAG_HOST]["points_last"] == 0
    # lag: now minus the newest confirmed point (the checkpoint's)
    cp = checkpoint.load(world.cfg.collect.state_dir, LAG_HOST)
    assert abs(by_host[LAG_HOST]["lag"] - (js["generated"] - max(cp.pairs.values()))) < 1
    assert 5 * 3600 - 700 < by_host[LAG_HOST]["lag"] < 5 * 3600 + 700
    assert by_host[DOWN_HOST]["failures"] == 1 and by_host[DOWN_HOST]["result"] == "FAILED"
    assert by_host[DOWN_HOST]["last_success"] is not None  # its first run was fine
    assert js["alarm"] is True and js["counts"]["failing"] == 1


def test_status_recovers_when_the_archive_does(world):
    world.sim.clear_faults(DOWN_HOST)
    assert runner.collect_host(world.cfg, DOWN_HOST) == 0
    js = json.loads(cli(world.conf, "status", DOWN_HOST, "--json").stdout)
    assert [h["host"] for h in js["hosts"]] == [DOWN_HOST]
    assert js["hosts"][0]["health"] == "ok" and js["hosts"][0]["failures"] == 0
    assert cli(world.conf, "status", DOWN_HOST, OK_HOST).exit_code == 0


# --- prepared state


def prepared(tmp_path: Path, now: float, hosts: dict[str, dict]) -> Path:
    """State written by hand: {host: {"runs": [...], "newest": ts, "enabled": bool}}."""
    conf = write_cfg(tmp_path, "unused", report={"lag_alarm": "1h"})
    cfg = config.load(str(conf))
    for h, spec in hosts.items():
        hd = state.host_dir(cfg.collect.state_dir, h)
        hd.mkdir(parents=True)
        state.write_json_atomic(hd / "history.json", {"version": 1, "runs": spec.get("runs", [])})
        if spec.get("newest") is not None:
            state.write_json_atomic(hd / "checkpoint.json",
                                    {"version": 1, "pairs": {"k/throughput": spec["newest"]}})
    units.apply(tmp_path / "units", [h for h, s in hosts.items() if s.get("enabled", True)], [],
                systemctl=None)
    return conf


def run(end: float, status_: int = 0, points: int = 10, error: str | None = None, **kw) -> dict:
    return {"start": end - 2, "end": end, "status": status_, "points": points, "messages": 1,
            "error": error, "by_type": {"throughput": points}, **kw}


def test_prepared_state_order_alarm_and_columns(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {
        "a-ok.example": {"runs": [run(now - 600)], "newest": int(now - 300)},
        "b-fail2.example": {"runs": [run(now - 1800), run(now - 1200, 1, 0, "first <err>"),
                                     run(now - 600, 3, 0, "broker gone")], "newest": int(now - 700)},
        "c-fail1.example": {"runs": [run(now - 600, 1, 0, "HTTP 500")], "newest": int(now - 900)},
        "d-lag.example": {"runs": [run(now - 600)], "newest": int(now - 3 * 3600)},
        "e-new.example": {},
        "f-off.example": {"runs": [run(now - 9000, 1, 0, "old")], "enabled": False,
                          "newest": int(now - 86400)},
        "g-nodata.example": {"runs": [run(now - 600, points=0)]},
    })
    ov = status.overview(config.load(str(conf)), now=now,
                         next_elapse=lambda hosts: {h: now + 120 for h in hosts})
    assert [(h.host, h.health) for h in ov.hosts] == [
        ("b-fail2.example", "failing"), ("c-fail1.example", "failing"), ("d-lag.example", "lagging"),
        ("e-new.example", "pending"), ("g-nodata.example", "no data"), ("a-ok.example", "ok"),
        ("f-off.example", "disabled")]
    b = ov.hosts[0]
    assert (b.failures, b.status, b.error, b.result) == (2, 3, "broker gone", "FAILED")
    assert b.last_success is None  # history written without totals: no success recorded
    assert ov.alarm
    text = status.render_text(ov)
    assert "b-fail2.example: broker gone" in text and "f-off.example: old" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("a-ok.example"))
    assert "in 2m" in row and " 5m " in row  # next firing, lag
    coloured = status.render_text(ov, colour=True)
    assert "\x1b[31" in coloured and "\x1b[33" in coloured and "\x1b[32" in coloured


def test_no_alarm_exits_0_and_host_filter(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {
        "a.example": {"runs": [run(now - 60)], "newest": int(now - 100)},
        "b.example": {"runs": [run(now - 60, 1, error="x")], "newest": int(now - 100)},
    })
    assert cli(conf, "status", "a.example").exit_code == 0
    r = cli(conf, "status")
    assert r.exit_code == 1
    r = cli(conf, "status", "nosuch.example")
    assert r.exit_code == 2 and "not a host psprobe knows" in r.output
    r = cli(conf, "status", "a.exampl")
    assert r.exit_code == 2 and "did you mean a.example" in r.output


def test_lag_alarm_per_host_override(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 60)], "newest": int(now - 7200)}})
    assert cli(conf, "status").exit_code == 1  # 2 h > lag_alarm 1h
    with open(conf, "a") as f:
        f.write("\n[host a.example]\nreport.lag_alarm = 3h\n")
    assert cli(conf, "status").exit_code == 0


def test_running_collect_and_pause_are_shown(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 60)], "newest": int(now - 100)}})
    cfg = config.load(str(conf))
    with state.host_lock(cfg.collect.state_dir, "a.example"):
        out = cli(conf, "status").stdout
        assert out.splitlines()[1].split()[3] == "running"
    assert "running" not in cli(conf, "status").stdout
    pause(cfg.mesh.unit_dir)
    out = cli(conf, "status").stdout  # no systemd here: the links say it
    assert out.startswith("PAUSED: psprobe-timers.target is disabled and stopped; `psprobe resume`")
    assert [h["timer"] for h in json.loads(cli(conf, "status", "--json").stdout)["hosts"]] == \
        ["paused"]


def pause(unit_dir: str) -> None:
    """What `psprobe pause` leaves: the sync timer enabled under the disabled target."""
    wants = Path(unit_dir) / units.WANTS
    os.symlink(f"/usr/lib/systemd/system/{units.SYNC_TIMER}", wants / units.SYNC_TIMER)


def test_unroutable_messages_of_the_last_run_are_shown_but_no_alarm(tmp_path):
    now = time.time()
    ttl, trace = "perfsonar.raw.histogram-ttl", "perfsonar.raw.packet-trace"
    conf = prepared(tmp_path, now, {
        "a.example": {"runs": [run(now - 600, unroutable={trace: 9}),
                               run(now - 60, unroutable={ttl: 12, trace: 3})],
                      "newest": int(now - 100)},
        "b.example": {"runs": [run(now - 600, unroutable={ttl: 1}), run(now - 60)],
                      "newest": int(now - 100)},  # only the last run counts
        "c.example": {"runs": [run(now - 60, unroutable={ttl: 1}),
                               run(now - 30, kind="backfill", unroutable={trace: 5})],
                      "newest": int(now - 100)},  # the last regular run, not a backfill
        "d.example": {"runs": [run(now - 60, unroutable={ttl: "x", trace: -1, "k": True})],
                      "newest": int(now - 100)},  # damaged values read as none
    })
    r = cli(conf, "status")
    assert r.exit_code == 0, r.output  # a warning, not a failure
    lines = r.stdout.splitlines()
    assert f"a.example: 15 messages unroutable ({ttl}: 12, {trace}: 3)" in lines
    assert f"c.example: 1 message unroutable ({ttl}: 1)" in lines
    assert not any(ln.startswith(("b.example: ", "d.example: ")) for ln in lines)
    assert lines[-1].startswith("4 hosts: 4 ok")
    js = json.loads(cli(conf, "status", "--json").stdout)
    by_host = {h["host"]: h for h in js["hosts"]}
    assert by_host["a.example"]["unroutable"] == {ttl: 12, trace: 3}
    assert by_host["b.example"]["unroutable"] == {} == by_host["d.example"]["unroutable"]
    assert js["alarm"] is False


def test_no_state_at_all(tmp_path):
    conf = write_cfg(tmp_path, "unused")
    r = cli(conf, "status")
    assert r.exit_code == 0 and "0 hosts: none" in r.stdout and "no sync has run" in r.stdout


def test_span_and_status_help_is_cheap():
    assert [status.span(s) for s in (None, 5, 119, 120, 3600, 3660, 7200, 2 * 86400, 2 * 86400 + 3600)] \
        == ["-", "5s", "119s", "2m", "1h", "1h01m", "2h", "2d", "2d01h"]
    import subprocess
    import sys

    code = ("import sys; from psprobe.cli import main\n"
            "try:\n main(['status','--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('psprobe')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, env={**os.environ}).stdout
    assert out.strip().splitlines()[-1] == "['psprobe', 'psprobe.cli', 'psprobe.log']"


# --- systemd's view (one `systemctl show`), paused and stopped timers, failing meshes


def _stamp(ts: float) -> str:
    """A timestamp as systemctl shows it with TZ=UTC and LC_ALL=C."""
    return time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def service_block(host: str, active: str, result: str, status_: int, started: float,
                  code: int = 1) -> str:
    """One `systemctl show` block of a psprobe@ service, in systemd 252's order."""
    return (f"Result={result}\nExecMainStartTimestamp={_stamp(started)}\n"
            f"ExecMainExitTimestamp={_stamp(started + 1)}\nExecMainCode={code}\n"
            f"ExecMainStatus={status_}\nId=psprobe@{units.hostnames.unit_instance(host)}.service\n"
            f"ActiveState={active}\n")


def timer_block(host: str, active: str = "active", mono: str = "") -> str:
    return (f"NextElapseUSecRealtime=\nNextElapseUSecMonotonic={mono}\nResult=success\n"
            f"Id={units.timer_name(host)}\nActiveState={active}\n")


class FakeSystemctl:
    """Answers `systemctl show` with ``blocks``; records every call."""

    def __init__(self, *blocks: str, rc: int = 0, stderr: str = "") -> None:
        self.out, self.rc, self.stderr = "\n".join(blocks), rc, stderr
        self.calls: list[tuple[tuple[str, ...], dict]] = []

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        self.calls.append((args, kw))
        return subprocess.CompletedProcess(["systemctl", *args], self.rc, self.out, self.stderr)


@pytest.fixture
def under_systemd(monkeypatch):
    """`psprobe status` as on a machine where systemd runs, systemctl answering ``fake``."""
    def use(fake: FakeSystemctl) -> FakeSystemctl:
        monkeypatch.setattr(status, "systemd_runs", lambda unit_dir: True)
        monkeypatch.setattr(units, "systemctl", fake)
        return fake
    return use


def test_a_run_systemd_saw_fail_before_it_wrote_its_record_is_failing(tmp_path, under_systemd):
    """The record says ok, systemd says the last run exited 74 (state unusable): failing."""
    now = time.time()
    conf = prepared(tmp_path, now, {
        "a.example": {"runs": [run(now - 3600)], "newest": int(now - 300)},
        "b.example:8443": {"runs": [run(now - 60)], "newest": int(now - 100)},
        "c.example": {"runs": [run(now - 60)], "newest": int(now - 100)},
    })
    fake = under_systemd(FakeSystemctl(
        timer_block("a.example", mono="1h"), timer_block("b.example:8443"), timer_block("c.example"),
        service_block("a.example", "failed", "exit-code", 74, now - 120),
        service_block("b.example:8443", "inactive", "success", 0, now - 62),
    ))
    r = cli(conf, "status")
    assert r.exit_code == 1, r.output
    # one systemctl for everything, with a timeout: the timers by name, the services by pattern
    assert len(fake.calls) == 1
    args, kw = fake.calls[0]
    assert args[0] == "show" and args[-1] == "psprobe@*.service" and kw.get("timeout")
    assert units.timer_name("b.example:8443") in args
    lines = r.stdout.splitlines()
    assert lines[1].split()[:3] == ["a.example", "FAILING", "on"]
    when = time.strftime("%H:%M", time.gmtime(now - 119))
    assert (f"a.example: systemd: exit status 74/IOERR (last run {when} UTC), no run record written"
            in lines)
    assert lines[-1].startswith("3 hosts: 1 failing, 2 ok")
    js = json.loads(cli(conf, "status", "--json").stdout)
    a = next(h for h in js["hosts"] if h["host"] == "a.example")
    assert (a["health"], a["status"], a["result"], a["failures"]) == ("failing", 74, "FAILED", 1)
    assert a["unit"]["active"] == "failed" and a["unit"]["exit_status"] == 74
    assert abs(a["last_run"] - (now - 119)) < 2  # systemd's run, not the older record
    # the same failure once its record is there: the record's own error is shown
    hd = state.host_dir(config.load(str(conf)).collect.state_dir, "a.example")
    state.write_json_atomic(hd / "history.json", {"version": 1, "runs": [
        run(now - 3600), run(now - 119, 74, 0, "hosts/a.example/checkpoint.json: disk full",
                             start=now - 119.5)]})
    r = cli(conf, "status")
    assert "a.example: hosts/a.example/checkpoint.json: disk full" in r.stdout.splitlines()


def test_systemd_agrees_with_systemctl_failed_whatever_the_records_say(tmp_path, under_systemd):
    """Every unit systemd lists failed is a failing host (or, without a timer, said so)."""
    now = time.time()
    conf = prepared(tmp_path, now, {
        "ok.example": {"runs": [run(now - 60)], "newest": int(now - 100)},
        "crashed.example": {"runs": [run(now - 40, start=now - 41)], "newest": int(now - 100)},
        "later.example": {"runs": [run(now - 10, start=now - 12)], "newest": int(now - 100)},
        "killed.example": {"runs": [run(now - 4000)], "newest": int(now - 100)},
        "gone.example": {"runs": [run(now - 4000)], "enabled": False, "newest": int(now - 100)},
    })
    under_systemd(FakeSystemctl(
        # exited 1 after writing an ok record (e.g. during the broker's close)
        service_block("crashed.example", "failed", "exit-code", 1, now - 42),
        # a later run by hand was fine, systemd still remembers the failed one
        service_block("later.example", "failed", "exit-code", 69, now - 600),
        service_block("killed.example", "failed", "timeout", 9, now - 1000, code=2),
        service_block("gone.example", "failed", "exit-code", 1, now - 5000),
        # a host psprobe has no state for at all: systemd's word is all there is
        service_block("nostate.example", "failed", "exit-code", 74, now - 30),
    ))
    r = cli(conf, "status")
    assert r.exit_code == 1
    rows = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[1:7]}
    assert rows == {"crashed.example": "FAILING", "later.example": "FAILING",
                    "killed.example": "FAILING", "nostate.example": "disabled",
                    "gone.example": "disabled", "ok.example": "ok"}
    out = r.stdout
    assert "crashed.example: systemd: exit status 1/FAILURE (last run" in out
    assert "after its run record (ok) was written" in out
    assert "later.example: systemd: exit status 69/UNAVAILABLE" in out
    assert "a later run (10s ago) was ok: `systemctl reset-failed psprobe@later.example.service`" in out
    assert "killed.example: systemd: timed out (TimeoutStartSec), killed by signal KILL" in out
    assert "gone.example: no timer, but systemd still lists its last run failed" in out
    assert "nostate.example: no timer, but systemd still lists" in out


def test_systemd_not_answering_is_said_not_hidden(tmp_path, under_systemd):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 60)], "newest": int(now - 100)}})
    under_systemd(FakeSystemctl(rc=124, stderr="systemctl: no answer in 15s"))
    r = cli(conf, "status")
    assert r.exit_code == 0
    assert "systemd did not answer (systemctl: no answer in 15s)" in r.stdout
    assert json.loads(cli(conf, "status", "--json").stdout)["systemd_error"]


def test_a_paused_or_stopped_timer_is_shown_as_such(tmp_path, under_systemd):
    now = time.time()
    conf = prepared(tmp_path, now, {
        "a.example": {"runs": [run(now - 60)], "newest": int(now - 100)},
        "b.example": {"runs": [run(now - 60)], "newest": int(now - 100)},
        "off.example": {"runs": [run(now - 60)], "enabled": False, "newest": int(now - 100)},
    })
    under_systemd(FakeSystemctl(timer_block("a.example", mono="1h"),
                                timer_block("b.example", active="inactive", mono="infinity")))
    r = cli(conf, "status")
    timers = {ln.split()[0]: ln.split()[2] for ln in r.stdout.splitlines()[1:4]}
    assert timers == {"a.example": "on", "b.example": "stopped", "off.example": "off"}
    assert "1 host timer(s) not running though enabled (b.example): `psprobe resume` starts them" \
        in r.stdout
    # `psprobe pause`: the target disabled (its link gone), it and every timer stopped
    pause(config.load(str(conf)).mesh.unit_dir)
    under_systemd(FakeSystemctl(timer_block("a.example", active="inactive"),
                                timer_block("b.example", active="inactive"),
                                f"Id={units.TARGET}\nActiveState=inactive\n"))
    r = cli(conf, "status")
    assert r.stdout.startswith("PAUSED: ")
    timers = {ln.split()[0]: ln.split()[2] for ln in r.stdout.splitlines()[2:5]}
    assert timers == {"a.example": "paused", "b.example": "paused", "off.example": "off"}
    assert "not running though enabled" not in r.stdout
    js = json.loads(cli(conf, "status", "--json").stdout)
    assert js["paused"] is True
    assert {h["host"]: h["timer"] for h in js["hosts"]}["a.example"] == "paused"
    # Disabled without --now: the target still runs its timers until the next boot.
    under_systemd(FakeSystemctl(timer_block("a.example"), timer_block("b.example"),
                                f"Id={units.TARGET}\nActiveState=active\n"))
    r = cli(conf, "status")
    assert not r.stdout.startswith("PAUSED") and r.stdout.splitlines()[1].split()[2] == "on"


def test_a_failed_mesh_is_an_alarm_naming_it(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 60)], "newest": int(now - 100)}})
    cfg = config.load(str(conf))
    typo = "https://meshconfig.example.org/pub/config/us-atlass"
    state.write_json_atomic(Path(cfg.collect.state_dir) / "sync.json", {
        "last_run": now - 300, "last_success": now - 9000, "hosts": ["a.example"],
        "failed_meshes": [typo], "mesh_errors": {typo: "cannot fetch: HTTPError: 404"},
        "held": ["a.example"], "changes": []})
    r = cli(conf, "status")
    assert r.exit_code == 1, r.output
    assert (f"mesh {typo}: FAILED at the last sync (5m ago): cannot fetch: HTTPError: 404"
            in r.stdout.splitlines())
    assert "while a mesh fails, sync adds hosts but removes none (1 kept that no mesh names now)" \
        in r.stdout
    js = json.loads(cli(conf, "status", "--json").stdout)
    assert js["alarm"] is True and js["failed_meshes"] == [typo]
    assert js["sync"]["mesh_errors"] == {typo: "cannot fetch: HTTPError: 404"}


def test_systemd_view_parses_what_systemctl_shows():
    """The blocks of one `systemctl show`: escaped IPv6 instances, other units ignored."""
    v6 = "[2001:db8::1]:8443"
    fake = FakeSystemctl(
        timer_block("a.example", mono="1h 7min 21.540321s"),
        service_block(v6, "failed", "signal", 15, 1_800_000_000, code=2),
        service_block("a.example", "inactive", "success", 0, 1_800_000_000),
        "Id=psprobe@bad..name.service\nActiveState=failed\n",
        "Id=psprobe-sync.service\nActiveState=failed\n",
    )
    import psprobe.units as u

    real = u.systemctl
    u.systemctl = fake
    try:
        view = status.systemd_view(["a.example"])
    finally:
        u.systemctl = real
    assert view.error is None and view.timers == {"a.example": "active"}
    boot = time.time() - time.monotonic()  # a monotonic elapse time counts from boot
    assert abs(view.next_run["a.example"] - (boot + 3600 + 7 * 60 + 21.540321)) < 1
    assert set(view.units) == {v6, "a.example"}
    assert view.units[v6].failed and view.units[v6].reason(1_800_000_100) == \
        "systemd: killed by signal TERM (last run 08:00 UTC)"
    assert view.units["a.example"].exited == 1_800_000_001


# --- pushing hosts (psprobe receive): rows from received.json beside the pulled ones


def received(sd: str, host: str, **rec) -> None:
    """A received.json as psprobe receive writes it (design: the tallies of one host); without
    ``hours`` and ``last`` as it wrote it before it counted by the hour."""
    doc = {"first_received": None, "last_received": None, "newest_ts": None, "runs": 0, "points": 0,
           "messages": 0, "confirmed": 0, "failed_runs": 0, "last_failure": None, "refused": None}
    doc.update(rec)
    state.host_dir(sd, host).mkdir(parents=True, exist_ok=True)
    state.write_json_atomic(state.host_file(sd, host, state.RECEIVED), doc, root=sd)


def push_world(tmp_path: Path, now: float, silent_after: str = "1h") -> tuple[Path, config.Config]:
    """One pulled host and six pushing ones, each in one state; sync.json lists them."""
    conf = prepared(tmp_path, now, {"pulled.example": {"runs": [run(now - 60)], "newest": int(now - 100)}})
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d/receive.conf").write_text(f"[receive]\nsilent_after = {silent_after}\n")
    cfg = config.load(str(conf))
    sd = cfg.collect.state_dir
    listed = {"p-ok.example": now - 86400, "p-silent.example": now - 86400,
              "p-never.example": now - 7200, "p-new.example": now - 600,
              "p-refused.example": now - 86400, "p-nodata.example": now - 86400}
    state.write_json_atomic(state.sync_file(sd), {
        "last_run": now - 60, "last_success": now - 60, "hosts": ["pulled.example"], "failed_meshes": [],
        "held": [], "changes": [], "pushing": sorted(listed), "pushing_since": listed}, root=sd)
    hour = int(now // 3600 * 3600)
    # hourly rows (start, runs, points, messages, failed_runs, refused): 7.5 days ago (before
    # the report's week), 3 days ago (before status' 24 h), 2 hours ago and this hour
    received(sd, "p-ok.example", first_received=now - 80000, last_received=now - 30, newest_ts=now - 90,
             runs=1200, points=5400, messages=1300, confirmed=1290, failed_runs=7,
             last_failure={"time": now - 4000, "error": "ping: no route to host"},
             last={"time": now - 30, "points": 6, "messages": 2},
             hours=[[hour - 180 * 3600, 100, 400, 100, 0, 0], [hour - 72 * 3600, 900, 4100, 1000, 6, 0],
                    [hour - 2 * 3600, 150, 700, 150, 1, 0], [hour, 50, 200, 50, 0, 0]])
    received(sd, "p-silent.example", first_received=now - 80000, last_received=now - 3 * 3600,
             newest_ts=now - 3 * 3600 - 60, runs=50, points=300, messages=50, confirmed=50)
    received(sd, "p-refused.example", first_received=now - 80000, last_received=now - 900,
             newest_ts=now - 960, runs=9, points=90, messages=9, confirmed=9,
             refused={"count": 5, "last_time": now - 120, "last_reason": "403: wrong token"},
             last={"time": now - 900, "points": 10, "messages": 1},
             hours=[[hour - 200 * 3600, 0, 0, 0, 0, 1], [hour - 100 * 3600, 0, 0, 0, 0, 2],
                    [hour - 3600, 9, 90, 9, 0, 0], [hour, 0, 0, 0, 0, 2]])
    received(sd, "p-nodata.example", first_received=now - 300, last_received=now - 300, runs=1)
    received(sd, "p-gone.example", first_received=now - 9 * 86400, last_received=now - 8 * 86400,
             newest_ts=now - 8 * 86400, runs=3, points=3, messages=3, confirmed=3)  # no longer listed
    return conf, cfg


def test_pushing_hosts_beside_pulled_ones_with_the_same_alarms(tmp_path):
    now = time.time()
    conf, cfg = push_world(tmp_path, now)
    ov = status.overview(cfg, now=now, next_elapse=lambda hosts: {h: now + 120 for h in hosts})
    rows = {h.host: h for h in ov.hosts}
    assert [(h.host, h.health, h.kind) for h in ov.hosts] == [
        ("p-refused.example", "failing", "push"),
        ("p-silent.example", "lagging", "push"),  # 3 h without a push > silent_after 1h
        ("p-never.example", "lagging", "push"),  # listed 2 h ago, nothing ever came
        ("p-new.example", "pending", "push"),  # listed 10 min ago
        ("p-nodata.example", "no data", "push"),
        ("pulled.example", "ok", "pull"),  # lag 100 s, before p-ok's 90 s
        ("p-ok.example", "ok", "push"),
        ("p-gone.example", "disabled", "push"),
    ]
    ok = rows["p-ok.example"]
    assert (ok.timer, ok.last_success, ok.newest, ok.failures) == ("push", now - 30, int(now - 90), 0)
    assert 89 <= ok.lag <= 91 and ok.silence == 30 and ok.silent_after == 3600
    assert ok.received["points"] == 5400 and ok.received["failed_runs"] == 7
    ref = rows["p-refused.example"]
    assert (ref.last_run, ref.last_success, ref.failures, ref.result) == (now - 120, now - 900, 1, "FAILED")
    assert ref.error == "push refused: 403: wrong token (5 refused in all, last 2m ago)"
    assert ov.alarm and ov.counts()["lagging"] == 2 and ov.counts()["failing"] == 1
    text = status.render_text(ov)
    line = next(ln.split() for ln in text.splitlines() if ln.startswith("p-ok.example"))
    # the columns of a pulled host: last run / 24 h (the hours that overlap them)
    assert (ok.points_last, ok.messages_last, ok.points_24h, ok.messages_24h) == (6, 2, 900, 200)
    assert line == ["p-ok.example", "ok", "push", "30s", "ago", "30s", "ago", "6/900", "2/200", "90s",
                    "0", "-"]
    # a received.json of before the hourly counts: no history, not zero
    line = next(ln.split() for ln in text.splitlines() if ln.startswith("p-silent.example"))
    assert line[7:9] == ["-/-", "-/-"]
    # never pushed: nothing
    assert next(ln.split() for ln in text.splitlines() if ln.startswith("p-new.example"))[5:7] == \
        ["0/0", "0/0"]
    assert "p-refused.example: push refused: 403: wrong token" in text
    assert "p-silent.example: nothing received for 3h ([receive] silent_after 1h)" in text
    assert "p-never.example: nothing received in the 2h since sync listed it as pushing" in text
    assert "6 pushing" in text.splitlines()[-1] and "silent alarm 1h" in text.splitlines()[-1]
    # the command: exit 1 (the check), --json with the kind and the tallies
    assert cli(conf, "status").exit_code == 1
    js = json.loads(cli(conf, "status", "--json").stdout)
    by = {h["host"]: h for h in js["hosts"]}
    assert by["p-ok.example"]["kind"] == "push" and by["pulled.example"]["kind"] == "pull"
    assert by["p-ok.example"]["received"]["confirmed"] == 1290
    assert (by["p-ok.example"]["points_24h"], by["p-ok.example"]["messages_last"]) == (900, 2)
    assert by["p-ok.example"]["received"]["last"] == {"time": now - 30, "points": 6, "messages": 2}
    assert "hours" not in by["p-ok.example"]["received"]  # summed above, not 193 rows a host
    assert by["p-silent.example"]["points_24h"] is None
    assert js["sync"]["pushing"] == sorted(h for h in by if h.startswith("p-") and h != "p-gone.example")
    # a host that never pushed is still a host psprobe knows
    r = cli(conf, "status", "p-new.example")
    assert r.exit_code == 0 and r.stdout.splitlines()[1].split()[:3] == ["p-new.example", "pending", "push"]


def test_silent_after_sets_when_a_pushing_host_alarms(tmp_path):
    now = time.time()
    conf, cfg = push_world(tmp_path, now, silent_after="4h")
    rows = {h.host: h.health for h in status.overview(cfg, now=now, next_elapse=lambda h: {}).hosts}
    assert rows["p-silent.example"] == "ok" and rows["p-never.example"] == "pending"
    assert cli(conf, "status", "p-silent.example", "p-ok.example").exit_code == 0
    assert cli(conf, "status", "p-refused.example").exit_code == 1


def test_a_torn_or_foreign_received_json_is_no_crash(tmp_path):
    now = time.time()
    conf, cfg = push_world(tmp_path, now)
    sd = cfg.collect.state_dir
    (state.host_file(sd, "p-ok.example", state.RECEIVED)).write_text('{"runs": 3, "last_rec')
    received(sd, "p-silent.example", runs="many", last_received="yesterday", refused=[1, 2],
             newest_ts=float("nan"), last={"time": "x"},
             hours=[[1, 2], "x", [7200, 1, 2, 3, 4, 5], [3600, -1, 0, 0, 0, 0], [0, True, 0, 0, 0, 0]])
    rows = {h.host: h for h in status.overview(cfg, now=now, next_elapse=lambda h: {}).hosts}
    # unreadable: as if nothing was received (listed a day ago: silent)
    assert rows["p-ok.example"].health == "lagging" and rows["p-ok.example"].received is None
    assert rows["p-silent.example"].received["runs"] == 0
    # the hourly rows that are rows; no "last" without a time
    assert rows["p-silent.example"].received["hours"] == [[7200, 1, 2, 3, 4, 5]]
    assert rows["p-silent.example"].received["last"] is None
    assert rows["p-silent.example"].lag is None and rows["p-silent.example"].health == "lagging"
    assert cli(conf, "status", "--json").exit_code == 1


def test_logs_of_a_pushing_host_are_the_receivers_lines_that_name_it(tmp_path):
    now = time.time()
    conf, _ = push_world(tmp_path, now)
    bindir, rec = tmp_path / "bin", tmp_path / "args"
    bindir.mkdir()
    fake = bindir / "journalctl"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = --version ]; then printf '%s\\n' "$VERSION"; exit 0; fi
printf '%s\\n' "$@" > {rec}
echo 'receive: listening on [::]:8443 (TLS); 0 message(s) in the spool'
echo 'receive: refused 401 from p-ok.example (10.0.0.1): no bearer token'
echo 'receive: refused 403 from p-ok.example.org (10.0.0.2): unknown host p-ok.example.org'
""")
    fake.chmod(0o755)
    path = f"{bindir}:{os.environ['PATH']}"
    el8 = "systemd 239 (239-78.el8)\n+PAM +AUDIT +SELINUX -APPARMOR +PCRE2 default-hierarchy=legacy"
    assert control.journal_grep(el8)
    r = cli(conf, "logs", "p-ok.example", "-n", "5", env={"PATH": path, "VERSION": el8})
    assert r.exit_code == 0, r.output
    assert rec.read_text().splitlines() == ["-u", "psprobe-receive.service",
                                            f"--grep={control.host_pattern('p-ok.example')}", "-n", "5"]
    # no --grep (systemd before 237, or without PCRE2): the same lines, filtered here
    for old in ("systemd 219\n+PAM +AUDIT -PCRE2", "systemd 236\n+PCRE2"):
        assert not control.journal_grep(old)
        r = cli(conf, "logs", "p-ok.example", "-n", "5", env={"PATH": path, "VERSION": old})
        assert r.exit_code == 0
        assert rec.read_text().splitlines() == ["-u", "psprobe-receive.service", "--no-pager", "-n", "5"]
        assert r.stdout.splitlines() == ["receive: refused 401 from p-ok.example (10.0.0.1): no bearer token"]
    # a pulled host: its collects' unit, as before
    r = cli(conf, "logs", "pulled.example", env={"PATH": path, "VERSION": el8})
    assert rec.read_text().splitlines() == ["-u", "psprobe@pulled.example.service"]
