"""psprobe backfill: re-publish a window from the archive, under the host lock, checkpoint untouched.

The tests with the ``bus`` fixture use the real broker (marked ``broker``); the
ones at the end run the same envelope offline, as the RPM's %check does: the
outlet passed in is :class:`Confirming`, which keeps every message and confirms it.
"""

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
from psprobe.collect import Stopped
from psprobe.exits import Exit
from psprobe.publish import BrokerError

STEP = 60


@pytest.fixture
def sim():
    with EsmondSim() as s:
        yield s


def make_world(tmp_path: Path, sim: EsmondSim, bus, *, hours: float, chunk: int = 200):
    """An archive of ``hours`` of points (every STEP s) per series; one regular collect done.

    With ``bus`` None there is no broker: the regular collect goes to a :class:`Confirming`,
    returned in place of the drained messages.
    """
    now = int(time.time())
    now -= now % STEP
    h = sim.host("localhost")
    h.add_test("throughput", start=now - int(hours * 3600) + STEP, step=STEP,
               count=int(hours * 3600) // STEP)
    host = f"localhost:{sim.port}"
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state", "chunk_points": chunk, "first_run_lookback": "3d"},
        "archive": {"schemes": "http", "retries": 0, "timeout": "5s"},
        # offline: never connected, the outlets are given
        "broker": {"url": AMQP_URL, "exchange": bus.exchange} if bus else
                  {"url": "amqp://nobody@127.0.0.1:1/"},
        "metrics": {"textfile_dir": ""},
    })
    cfg = config.load(str(conf))
    if bus is None:
        regular = Confirming()
        assert runner.collect_host(cfg, host, outlet=regular) == Exit.OK
        assert regular.sent and regular.closed == 1
        return h, host, conf, cfg, regular, now
    assert runner.collect_host(cfg, host) == 0
    return h, host, conf, cfg, bus.drain(), now


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
    assert r.exit_code == Exit.BUSY == 75
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


# --- offline: the envelope with an outlet that keeps and confirms (no broker)


class Confirming:
    """A broker that keeps every message and confirms it at once; ``fail_at``: the n-th
    send (from 1) raises BrokerError, as a lost connection does."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.sent: list = []
        self.fail_at = fail_at
        self.opened = self.closed = 0

    def __call__(self, cfg, cp) -> Confirming:  # the envelope's outlet factory
        self.opened += 1
        return self

    def send(self, msg, confirmed) -> None:
        if self.fail_at is not None and len(self.sent) + 1 >= self.fail_at:
            raise BrokerError("connection lost (test)")
        self.sent.append(msg)
        confirmed()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed += 1

    def points(self) -> list[tuple[str, str, int]]:
        import json

        return [(json.loads(m.body)["meta"]["org_metadata_key"], m.routing_key, int(ts))
                for m in self.sent for ts in json.loads(m.body)["datapoints"]]


def offline_world(tmp_path: Path, sim: EsmondSim, *, hours: float, chunk: int = 200):
    """As :func:`make_world`, with no broker."""
    h, host, _conf, cfg, regular, now = make_world(tmp_path, sim, None, hours=hours, chunk=chunk)
    return h, host, cfg, regular, now


def want(h, cfg, since: int, until: int) -> list[tuple[str, str, int]]:
    return sorted((k, "perfsonar.raw." + et, ts) for k, et in h.pairs()
                  if et in cfg.collect.event_types for ts, _ in h.points(k, et, since, until))


def test_offline_same_messages_and_ids_as_the_regular_run_and_the_checkpoint_stays(tmp_path, sim):
    _h, host, cfg, regular, _now = offline_world(tmp_path, sim, hours=0.5)
    before = cp_bytes(cfg, host)
    first = min(ts for *_, ts in regular.points())
    out, calls = Confirming(), []
    bf = runner.backfill_host(cfg, host, first, int(time.time()), outlet=out,
                              progress=lambda done, total, b: calls.append((done, total, b.done_until)))
    assert bf.status == Exit.OK and bf.error is None
    # one slice, one chunk per series: the regular run's messages, ids and bodies included
    assert sorted((m.message_id, m.routing_key, m.body) for m in out.sent) == \
        sorted((m.message_id, m.routing_key, m.body) for m in regular.sent)
    assert bf.points == len(regular.points()) and bf.messages == len(regular.sent)
    assert calls == [(1, 1, bf.until)] and bf.done_until == bf.until
    assert out.opened == out.closed == 1
    assert cp_bytes(cfg, host) == before
    runs = history.load(cfg.collect.state_dir, host)
    assert [r.get("kind", "collect") for r in runs] == ["collect", "backfill"]
    assert runs[-1]["points"] == bf.points and runs[-1]["since"] == first and runs[-1]["status"] == 0
    assert runner.backfill_line(bf).startswith(f"backfill {host}: ok since=")
    # the next regular run finds nothing new: the checkpoint did not move back
    again = Confirming()
    assert runner.collect_host(cfg, host, outlet=again) == Exit.OK and again.sent == []


def test_offline_slices_every_point_once_progress_per_slice_under_the_backfill_lock(tmp_path, sim):
    h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=60, chunk=100)
    before = cp_bytes(cfg, host)
    since, until = now - 50 * 3600, now - 2 * 3600 - 1
    parts = runner.slices(since, until)
    assert len(parts) == runner.MAX_SLICES == 48
    out, calls = Confirming(), []

    def progress(done, total, b) -> None:
        lock = (state.host_dir(cfg.collect.state_dir, host) / "lock").read_text()
        calls.append((done, total, b.done_until, b.points, lock))

    bf = runner.backfill_host(cfg, host, since, until, outlet=out, progress=progress)
    assert bf.status == Exit.OK
    got = out.points()
    assert len(got) == len(set(got))  # slice edges overlap nothing
    assert sorted(got) == want(h, cfg, since, until) and len(got) == 5 * 48 * 60
    assert [c[:3] for c in calls] == [(n, 48, hi) for n, (_lo, hi) in enumerate(parts, 1)]
    assert [c[3] for c in calls] == sorted(c[3] for c in calls) and calls[-1][3] == len(got)
    assert {c[4] for c in calls} == {f"backfill {os.getpid()}\n"}
    assert sum(bf.points_by_type.values()) == bf.points == len(got)
    assert cp_bytes(cfg, host) == before


def test_offline_event_types_restrict(tmp_path, sim):
    _h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=1)
    out = Confirming()
    bf = runner.backfill_host(cfg, host, now - 7200, now, event_types=("throughput", "failures"),
                              outlet=out)
    assert bf.status == Exit.OK
    assert {m.routing_key for m in out.sent} == {"perfsonar.raw.throughput", "perfsonar.raw.failures"}
    assert set(bf.points_by_type) == {"throughput", "failures"} and bf.points == 2 * 60


def test_offline_stops_at_the_first_failing_slice_with_done_until(tmp_path, sim):
    h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=10)
    before = cp_bytes(cfg, host)
    since, until = now - 9 * 3600, now
    parts = runner.slices(since, until)
    bad = parts[3][0]
    h.fault("status", status=500, body="boom", path=f"time-start={bad}")
    out, calls = Confirming(), []
    bf = runner.backfill_host(cfg, host, since, until, outlet=out,
                              progress=lambda done, total, b: calls.append(done))
    assert bf.status == Exit.ARCHIVE and "HTTP 500" in bf.error
    assert bf.done_until == parts[2][1] and calls == [1, 2, 3]
    assert sorted(out.points()) == want(h, cfg, since, parts[2][1])
    assert f"error={bf.error}; resume with --since @{bad}" in runner.backfill_line(bf)
    assert out.closed == 1 and cp_bytes(cfg, host) == before
    last = history.load(cfg.collect.state_dir, host)[-1]
    assert last["kind"] == "backfill" and last["status"] == Exit.ARCHIVE
    # resumed where the line says: the rest, and together every point once
    h.clear_faults()
    rest = Confirming()
    assert runner.backfill_host(cfg, host, bad, until, outlet=rest).status == Exit.OK
    assert sorted(out.points() + rest.points()) == want(h, cfg, since, until)


def test_offline_a_broker_lost_mid_way_stops_it_too(tmp_path, sim):
    _h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=10, chunk=60)
    parts = runner.slices(now - 9 * 3600, now)  # an hour each: 5 series, one message each
    out = Confirming(fail_at=12)  # the 2nd message of the 3rd slice
    bf = runner.backfill_host(cfg, host, now - 9 * 3600, now, outlet=out)
    assert bf.status == Exit.BROKER and "connection lost (test)" in bf.error
    assert bf.messages == len(out.sent) == 11
    assert bf.done_until == parts[1][1]
    assert f"resume with --since @{parts[2][0]}" in runner.backfill_line(bf)


def test_offline_busy_while_a_collect_holds_the_lock(tmp_path, sim):
    _h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=1)
    before = history.load_doc(cfg.collect.state_dir, host)
    out = Confirming()
    with state.host_lock(cfg.collect.state_dir, host):
        bf = runner.backfill_host(cfg, host, now - 3600, now, outlet=out)
    assert bf.status == Exit.BUSY
    assert bf.error == "a collect of this host is running (its lock is held); try again"
    assert out.opened == 0 and out.sent == []
    line = runner.backfill_line(bf)
    assert line.endswith(f"error={bf.error}") and "resume" not in line
    assert history.load_doc(cfg.collect.state_dir, host) == before  # nothing ran: nothing recorded


def test_offline_an_outlet_that_cannot_open_is_a_failed_backfill(tmp_path, sim):
    _h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=1)
    before = cp_bytes(cfg, host)

    def refused(cfg, cp):
        raise BrokerError("cannot connect (test)")

    bf = runner.backfill_host(cfg, host, now - 3600, now, outlet=refused)
    assert bf.status == Exit.BROKER and bf.error == "cannot connect (test)"
    assert bf.points == 0 and bf.done_until is None
    assert f"resume with --since @{now - 3600}" in runner.backfill_line(bf)
    assert cp_bytes(cfg, host) == before


def test_offline_stopped_between_slices_is_recorded_as_143(tmp_path, sim):
    """SIGTERM arrives as Stopped (cli._stop_on_signals); the envelope records why."""
    _h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=10)
    out = Confirming()

    def stop(done, total, b):
        if done == 2:
            raise Stopped("SIGTERM")

    bf = runner.backfill_host(cfg, host, now - 9 * 3600, now, outlet=out, progress=stop)
    assert bf.status == Exit.STOPPED == 143 and bf.error == "stopped by SIGTERM"
    assert bf.done_until == runner.slices(now - 9 * 3600, now)[1][1]
    assert out.closed == 1
    last = history.load(cfg.collect.state_dir, host)[-1]
    assert last["kind"] == "backfill" and last["status"] == 143 and last["error"] == bf.error


def test_offline_a_collect_meets_the_backfill_and_is_skipped(tmp_path, sim):
    _h, host, cfg, _regular, now = offline_world(tmp_path, sim, hours=3)
    seen = []

    def progress(done, total, b):
        other = Confirming()
        seen.append((runner.collect_host(cfg, host, outlet=other), other.opened))

    bf = runner.backfill_host(cfg, host, now - 3 * 3600, now, outlet=Confirming(), progress=progress)
    assert bf.status == Exit.OK and seen and set(seen) == {(Exit.OK, 0)}
    kinds = [r.get("kind", "collect") for r in history.load(cfg.collect.state_dir, host)]
    assert kinds == ["collect", *["skipped"] * len(seen), "backfill"]

