"""psprobe backfill: re-publish a window from the archive, under the host lock, checkpoint untouched."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from conftest import AMQP_URL, cli_runner, write_config
from esmond_sim import EsmondSim

from psprobe import config, control, history, runner, state
from psprobe.cli import main

STEP = 60


@pytest.fixture
def sim():
    with EsmondSim() as s:
        yield s


def make_world(tmp_path: Path, sim: EsmondSim, bus, *, hours: float, chunk: int = 200):
    """An archive of ``hours`` of points (every STEP s) per series; one regular collect done."""
    now = int(time.time())
    now -= now % STEP
    h = sim.host("localhost")
    h.add_test("throughput", start=now - int(hours * 3600) + STEP, step=STEP,
               count=int(hours * 3600) // STEP)
    host = f"localhost:{sim.port}"
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state", "chunk_points": chunk, "first_run_lookback": "3d"},
        "archive": {"schemes": "http", "retries": 0, "timeout": "5s"},
        "broker": {"url": AMQP_URL, "exchange": bus.exchange},
        "metrics": {"textfile_dir": ""},
    })
    cfg = config.load(str(conf))
    assert runner.collect_host(cfg, host) == 0
    regular = bus.drain()
    return h, host, conf, cfg, regular, now


def points(msgs) -> list[tuple[str, str, int]]:
    return [(m.body["meta"]["org_metadata_key"], m.routing_key, int(ts))
            for m in msgs for ts in m.body["datapoints"]]


def cp_bytes(cfg, host) -> bytes:
    return (state.host_dir(cfg.collect.state_dir, host) / "checkpoint.json").read_bytes()


def cli(conf, *args):
    return cli_runner().invoke(main, ["--config", str(conf), *args])


def test_same_window_same_messages_same_ids_and_the_checkpoint_stays(tmp_path, sim, bus):
    _h, host, conf, cfg, regular, _now = make_world(tmp_path, sim, bus, hours=0.5)
    before = cp_bytes(cfg, host)
    first = min(ts for *_, ts in points(regular))
    r = cli(conf, "backfill", host, "--since", f"@{first}")
    assert r.exit_code == 0, r.output
    again = bus.drain()
    # one slice, one chunk per series: exactly the regular run's messages, ids included
    assert sorted((m.message_id, m.routing_key) for m in again) == \
        sorted((m.message_id, m.routing_key) for m in regular)
    assert [m.body for m in sorted(again, key=lambda m: m.message_id)] == \
        [m.body for m in sorted(regular, key=lambda m: m.message_id)]
    assert all(m.delivery_mode == 2 for m in again)
    assert cp_bytes(cfg, host) == before
    assert "backfill " + host + ": ok" in r.output and f"points={len(points(regular))}" in r.output
    runs = history.load(cfg.collect.state_dir, host)
    assert [r_.get("kind", "collect") for r_ in runs] == ["collect", "backfill"]
    assert runs[-1]["points"] == len(points(regular)) and runs[-1]["since"] == first
    # the next regular run still finds nothing new: the checkpoint did not move back
    assert runner.collect_host(cfg, host) == 0
    assert bus.drain() == []


def test_long_window_in_slices_every_point_once_with_progress_lines(tmp_path, sim, bus):
    h, host, conf, cfg, _regular, now = make_world(tmp_path, sim, bus, hours=60, chunk=100)
    before = cp_bytes(cfg, host)
    since, until = now - 50 * 3600, now - 2 * 3600 - 1
    r = cli(conf, "backfill", host, "--since", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "--until", f"@{until}")
    assert r.exit_code == 0, r.output
    got = points(bus.drain())
    want = [(k, "perfsonar.raw." + et, ts) for k, et in h.pairs() if et in cfg.collect.event_types
            for ts, _ in h.points(k, et, since, until)]
    assert len(got) == len(set(got))  # slice edges overlap nothing
    assert sorted(got) == sorted(want) and len(want) == 5 * 48 * 60
    assert cp_bytes(cfg, host) == before
    n = len(runner.slices(since, until))
    assert n == 48
    assert f"{n}/{n} slices" in r.output  # not a terminal: progress as log lines
    assert "\r" not in r.output


def test_event_type_restricts(tmp_path, sim, bus):
    _h, host, conf, _cfg, _regular, _now = make_world(tmp_path, sim, bus, hours=1)
    r = cli(conf, "backfill", host, "--since", "2h", "--event-type", "throughput",
            "--event-type", "failures")
    assert r.exit_code == 0, r.output
    got = bus.drain()
    assert {m.routing_key for m in got} == {"perfsonar.raw.throughput", "perfsonar.raw.failures"}
    assert len(points(got)) == 2 * 60


def test_a_running_collect_holds_it_off(tmp_path, sim, bus):
    _h, host, conf, cfg, _regular, _now = make_world(tmp_path, sim, bus, hours=1)
    with state.host_lock(cfg.collect.state_dir, host):
        r = cli(conf, "backfill", host, "--since", "2h")
    assert r.exit_code == runner.BUSY == 75
    assert "lock is held" in r.output
    assert bus.drain() == []


def test_stops_at_the_first_failing_slice_and_says_where_to_resume(tmp_path, sim, bus):
    h, host, conf, cfg, _regular, now = make_world(tmp_path, sim, bus, hours=10)
    since, until = now - 9 * 3600, now
    parts = runner.slices(since, until)
    bad = parts[3][0]
    h.fault("status", status=500, body="boom", path=f"time-start={bad}")
    r = cli(conf, "backfill", host, "--since", f"@{since}", "--until", f"@{until}")
    assert r.exit_code == 1, r.output
    assert f"resume with --since @{bad}" in r.output
    got = points(bus.drain())
    assert parts[2][1] - STEP < max(ts for *_, ts in got) <= parts[2][1] < bad
    assert min(ts for *_, ts in got) >= since
    h.clear_faults()
    r = cli(conf, "backfill", host, "--since", f"@{bad}", "--until", f"@{until}")
    assert r.exit_code == 0
    got += points(bus.drain())
    want = [(k, "perfsonar.raw." + et, ts) for k, et in h.pairs() if et in cfg.collect.event_types
            for ts, _ in h.points(k, et, since, until)]
    assert sorted(got) == sorted(want)


def test_slices_cover_the_window_exactly():
    for since, until in [(0, 0), (0, 3599), (0, 3600), (100, 100 + 86400 * 30), (5, 4)]:
        parts = runner.slices(since, until)
        if until < since:
            assert parts == []
            continue
        assert parts[0][0] == since and parts[-1][1] == until and len(parts) <= runner.MAX_SLICES
        assert all(b[0] == a[1] + 1 for a, b in zip(parts, parts[1:]))
        assert all(hi >= lo for lo, hi in parts)


def test_bad_times_are_one_clear_line(tmp_path):
    conf = write_config(tmp_path / "p.conf", {"collect": {"state_dir": tmp_path}})
    r = cli(conf, "backfill", "a.example", "--since", "last tuesday")
    assert r.exit_code == 2 and "not a time" in r.output
    r = cli(conf, "backfill", "a.example", "--since", "1h", "--until", "2h")
    assert r.exit_code == 2 and "--until is before --since" in r.output
    assert control.parse_when("2025-11-20T06:00Z") == control.parse_when("2025-11-20T07:00+01:00") \
        == control.parse_when("2025-11-20 06:00") == 1763618400
    assert control.parse_when("3d", now=1_000_000) == 1_000_000 - 3 * 86400
    assert control.parse_when("@42") == 42


# --- the lock says who holds it: a collect that meets a backfill is recorded as skipped


def _lock_text(cfg, host) -> str:
    return (state.host_dir(cfg.collect.state_dir, host) / "lock").read_text()


def test_a_collect_held_off_by_a_backfill_says_so_and_is_recorded_as_skipped(tmp_path, sim, bus,
                                                                            caplog):
    from psprobe import metrics, status

    _h, host, _conf, cfg, _regular, _now = make_world(tmp_path, sim, bus, hours=1)
    sd = cfg.collect.state_dir
    before = history.load_doc(sd, host)
    with state.host_lock(sd, host, kind="backfill"):
        assert _lock_text(cfg, host) == f"backfill {os.getpid()}\n"
        caplog.clear()
        assert runner.collect_host(cfg, host) == 0
    assert [r.getMessage() for r in caplog.records] == \
        [f"collect {host}: a backfill of this host holds its lock; skipped"]
    assert caplog.records[0].levelno == logging.INFO
    assert bus.drain() == []
    doc = history.load_doc(sd, host)
    skip = doc["runs"][-1]
    assert skip["kind"] == "skipped" and skip["reason"] == "a backfill of this host holds its lock"
    assert history.is_skipped(skip) and not history.is_regular(skip) and not history.is_backfill(skip)
    assert len(doc["runs"]) == len(before["runs"]) + 1
    # Neither a failure nor a success: the totals and the last success stay.
    assert doc["totals"] == before["totals"] and doc["last_success"] == before["last_success"]
    st = status.host_status(cfg, host, now=time.time(), enabled=True, in_meshes=True)
    assert st.health == "ok" and st.failures == 0 and st.result == "ok"
    assert st.last_run == before["runs"][-1]["end"] and st.last_backfill is None
    assert st.skipped_24h == 1
    vals = {name: v for name, _lab, v in metrics.host_values(host, doc)}
    assert vals["psprobe_collect_runs_total"] == 1 and vals["psprobe_collect_failures_total"] == 0


def test_a_collect_held_off_by_a_collect_keeps_todays_line_and_records_nothing(tmp_path, sim, bus,
                                                                             caplog):
    _h, host, _conf, cfg, _regular, _now = make_world(tmp_path, sim, bus, hours=1)
    sd = cfg.collect.state_dir
    before = history.load_doc(sd, host)
    with state.host_lock(sd, host):
        assert _lock_text(cfg, host) == f"collect {os.getpid()}\n"
        caplog.clear()
        assert runner.collect_host(cfg, host) == 0
    assert [r.getMessage() for r in caplog.records] == \
        [f"collect {host}: another collect of this host is running; nothing to do"]
    assert history.load_doc(sd, host) == before


def test_a_running_backfill_marks_the_lock_and_a_collect_meanwhile_is_skipped(tmp_path, sim, bus,
                                                                            caplog):
    _h, host, _conf, cfg, _regular, now = make_world(tmp_path, sim, bus, hours=3)
    seen: list[tuple[str, int]] = []

    def progress(done, total, bf):
        seen.append((_lock_text(cfg, host), runner.collect_host(cfg, host)))

    bf = runner.backfill_host(cfg, host, now - 3 * 3600, now, progress=progress)
    assert bf.status == 0 and bf.points > 0
    assert seen and all(text == f"backfill {os.getpid()}\n" and rc == 0 for text, rc in seen)
    assert sum("a backfill of this host holds its lock; skipped" in r.getMessage()
               for r in caplog.records) == len(seen)
    runs = history.load(cfg.collect.state_dir, host)
    assert [r.get("kind", "collect") for r in runs] == \
        ["collect", *["skipped"] * len(seen), "backfill"]
    # Once the backfill is done, a collect runs again (and the lock says so).
    assert runner.collect_host(cfg, host) == 0
    assert _lock_text(cfg, host) == f"collect {os.getpid()}\n"
    assert history.is_regular(history.load(cfg.collect.state_dir, host)[-1])
