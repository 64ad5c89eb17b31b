"""collect against the esmond simulator and a real RabbitMQ broker: what arrives, exactly."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AMQP_URL, ROOT, write_config
from esmond_sim import EsmondSim

from psprobe import checkpoint, config, runner, state
from psprobe.exits import Exit

META_KEYS = {"source", "destination", "input_source", "input_destination", "measurement_agent",
             "tool_name", "subject_type", "org_metadata_key", "event-type", "summaries", "ts_start"}


@pytest.fixture
def sim():
    with EsmondSim() as s:
        yield s


def make_cfg(tmp_path: Path, bus, **sections) -> config.Config:
    base = {
        "collect": {"state_dir": tmp_path / "state"},
        "archive": {"schemes": "http", "retries": 0, "timeout": "5s"},
        "broker": {"url": AMQP_URL, "exchange": bus.exchange if bus else "none"},
    }
    for s, kv in sections.items():
        base.setdefault(s, {}).update(kv)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return config.load(str(write_config(tmp_path / "psprobe.conf", base)))


def held(sim_host, since: int, until: int) -> set[tuple[str, str, int]]:
    """Every (key, event type, ts) the archive holds in [since, until]."""
    return {(k, et, ts) for k, et in sim_host.pairs() for ts, _ in sim_host.points(k, et, since, until)}


def arrived(msgs) -> list[tuple[str, str, int]]:
    return [(m.body["meta"]["org_metadata_key"], m.body["meta"]["event-type"], int(ts))
            for m in msgs for ts in m.body["datapoints"]]


def test_first_run_publishes_every_point_in_the_lookback_with_the_legacy_body(sim, bus, tmp_path, caplog):
    h = sim.host("localhost")
    h.add_test("throughput", step=300)
    h.add_test("latencybg", step=60)
    h.add_test("trace", step=600)
    host = f"localhost:{sim.port}"
    cfg = make_cfg(tmp_path, bus, collect={"chunk_points": 50})
    t0 = int(time.time())
    assert runner.collect_host(cfg, host) == Exit.OK
    msgs = bus.drain()
    got = arrived(msgs)
    want = held(h, t0 - 12 * 3600, int(time.time()))
    assert len(got) == len(set(got))  # no duplicates on a clean run
    assert set(got) == {p for p in want if p[1] in cfg.collect.event_types}
    for m in msgs:
        assert m.delivery_mode == 2 and m.content_type == "application/json"
        assert m.routing_key == "perfsonar.raw." + m.body["meta"]["event-type"]
        assert m.body["version"] == 2
        assert META_KEYS <= set(m.body["meta"])
        assert m.body["meta"]["summaries"] == 0
        assert 1 <= len(m.body["datapoints"]) <= 50
        assert m.body["meta"]["ts_start"] == min(int(t) for t in m.body["datapoints"])
        assert len(m.message_id) == 32
    # values pass through exactly as the archive has them
    m = next(m for m in msgs if m.body["meta"]["event-type"] == "packet-trace")
    key, (ts, val) = m.body["meta"]["org_metadata_key"], next(iter(m.body["datapoints"].items()))
    assert dict(h.points(key, "packet-trace"))[int(ts)] == val
    # the checkpoint of each series is its newest published point
    cp = checkpoint.load(cfg.collect.state_dir, host)
    newest: dict[str, int] = {}
    for k, et, ts in got:
        newest[f"{k}/{et}"] = max(ts, newest.get(f"{k}/{et}", 0))
    assert cp.pairs == newest
    assert cp.scheme == "http"
    # one summary line, with a syslog priority in the journal form
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("collect ")]
    assert len(lines) == 1 and f"points={len(got)}" in lines[0] and " ok " in lines[0]


def test_second_run_sends_only_new_points_and_skips_unchanged_series(sim, bus, tmp_path):
    h = sim.host("localhost")
    a = h.add_test("throughput", event_types=["throughput"], step=600)
    h.add_test("throughput", event_types=["throughput"], step=600)
    host = f"localhost:{sim.port}"
    cfg = make_cfg(tmp_path, bus)
    assert runner.collect_host(cfg, host) == Exit.OK
    bus.drain()
    before = len(h.requests())
    new = h.add_points(a.key, "throughput", count=3, step=1)
    assert runner.collect_host(cfg, host) == Exit.OK
    msgs = bus.drain()
    assert arrived(msgs) == [(a.key, "throughput", ts) for ts, _ in new]
    reqs = h.requests()[before:]
    data = [r for r in reqs if r.path.endswith("/base")]
    assert [r.path for r in data] == [f"/esmond/perfsonar/archive/{a.key}/throughput/base"]
    assert len(reqs) == 2  # one metadata page, one data query


def test_message_ids_are_deterministic(sim, bus, tmp_path):
    h = sim.host("localhost")
    h.add_test("latencybg", step=120)
    host = f"localhost:{sim.port}"
    end = int(time.time())
    cfg1 = make_cfg(tmp_path / "a", bus)
    cfg2 = make_cfg(tmp_path / "b", bus)
    from psprobe.collect import Window, collect
    from psprobe.publish import BrokerOutlet

    ids = []
    for cfg in (cfg1, cfg2):
        state.host_dir(cfg.collect.state_dir, host).mkdir(parents=True)
        out = BrokerOutlet(cfg.broker)
        cp = checkpoint.load(cfg.collect.state_dir, host)
        collect(cfg, host, out, cp, Window(until=end))
        cp.close()
        out.close()
        ids.append(sorted(m.message_id for m in bus.drain()))
    assert ids[0] and ids[0] == ids[1]


def test_metadata_paging_past_1500_records_loses_none(sim, bus, tmp_path):
    h = sim.host("localhost")
    now = int(time.time())
    for _ in range(3100):
        h.add_test("throughput", event_types=["throughput"], start=now - 100, end=now - 100, step=60)
    cfg = make_cfg(tmp_path, bus)
    assert runner.collect_host(cfg, f"localhost:{sim.port}") == Exit.OK
    got = arrived(bus.drain())
    assert len(got) == 3100 == len(set(got))


def test_100000_new_points_in_one_series_all_arrive(sim, bus, tmp_path):
    h = sim.host("localhost")
    now = int(time.time())
    rec = h.add_test("throughput", event_types=["packet-count-sent"], start=now - 200_000,
                     count=100_000, step=2)
    cfg = make_cfg(tmp_path, bus, collect={"first_run_lookback": "3d"})
    assert runner.collect_host(cfg, f"localhost:{sim.port}") == Exit.OK
    got = arrived(bus.drain())
    assert len(got) == 100_000 == len(set(got))
    assert checkpoint.load(cfg.collect.state_dir, f"localhost:{sim.port}").pairs == {
        f"{rec.key}/packet-count-sent": now - 200_000 + 2 * 99_999}


def test_read_url_from_sync_with_another_path_and_an_ipv6_host(bus, tmp_path):
    with EsmondSim(bind="::1") as sim:
        h = sim.host(f"[::1]:{sim.port}", prefix="/archive/ps/")
        h.add_test("throughput", event_types=["throughput"], step=600)
        host = f"[::1]:{sim.port}"
        cfg = make_cfg(tmp_path, bus)
        d = state.host_dir(cfg.collect.state_dir, host)
        d.mkdir(parents=True)
        state.write_json_atomic(d / "target.json", {
            "host": host, "read_url": f"http://[::1]:{sim.port}/archive/ps/", "meshes": ["x"]})
        assert runner.collect_host(cfg, host) == Exit.OK
        assert len(arrived(bus.drain())) == 72  # 12 h of 10-minute points
        assert all(r.path.startswith("/archive/ps/") for r in h.requests())


def test_https_with_client_certificate_and_fallback_to_http(bus, tmp_path):
    from tlsutil import make_pki

    pki = make_pki(tmp_path / "pki")
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key)), client_ca=str(pki.ca)) as sim:
        sim.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
        host = f"localhost:{sim.port}"
        ok = make_cfg(tmp_path, bus, archive={"schemes": "https", "verify": pki.ca,
                                               "cert": pki.client_cert, "key": pki.client_key})
        assert runner.collect_host(ok, host) == Exit.OK
        assert len(arrived(bus.drain())) == 72
        assert checkpoint.load(ok.collect.state_dir, host).scheme == "https"
        nocert = make_cfg(tmp_path / "n", bus, archive={"schemes": "https", "verify": pki.ca})
        assert runner.collect_host(nocert, host) == Exit.ARCHIVE
        assert bus.drain() == []
    with EsmondSim() as plain:  # https refused (plain HTTP server): falls back, remembers http
        plain.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
        host = f"localhost:{plain.port}"
        cfg = make_cfg(tmp_path / "f", bus, archive={"schemes": "https, http"})
        assert runner.collect_host(cfg, host) == Exit.OK
        assert checkpoint.load(cfg.collect.state_dir, host).scheme == "http"


def test_a_second_collect_of_the_same_host_exits_0_at_once(sim, bus, tmp_path, caplog):
    sim.host("localhost").add_test("throughput", step=600)
    host = f"localhost:{sim.port}"
    cfg = make_cfg(tmp_path, bus)
    state.host_dir(cfg.collect.state_dir, host).mkdir(parents=True)
    with state.host_lock(cfg.collect.state_dir, host):
        assert runner.collect_host(cfg, host) == Exit.OK
    assert bus.drain() == []
    assert any("another collect of this host is running" in r.getMessage() for r in caplog.records)
    assert sim.host("localhost").requests() == []


def test_dry_run_prints_json_lines_and_moves_nothing(sim, tmp_path):
    sim.host("localhost").add_test("throughput", event_types=["throughput", "failures"], step=600)
    cfg = write_config(tmp_path / "p.conf", {
        "collect": {"state_dir": tmp_path / "state"}, "archive": {"schemes": "http"},
        "broker": {"url": "amqp://nobody:s3cret@127.0.0.1:1/"}})
    p = subprocess.run([sys.executable, "-m", "psprobe", "--config", str(cfg), "collect", "--dry-run",
                        f"localhost:{sim.port}"], capture_output=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines and all(x["exchange"] == "osg.ps.raw" for x in lines)
    assert {x["routing_key"] for x in lines} == {"perfsonar.raw.throughput", "perfsonar.raw.failures"}
    assert all(x["body"]["version"] == 2 for x in lines)
    assert not (tmp_path / "state").exists()
    assert b"s3cret" not in p.stdout + p.stderr
    assert p.stderr.decode().startswith("collect ")  # a pipe, not the journal: no <6>


def test_broker_down_fails_with_one_line_and_keeps_the_checkpoint(sim, tmp_path, caplog):
    sim.host("localhost").add_test("throughput", step=600)
    host = f"localhost:{sim.port}"
    cfg = make_cfg(tmp_path, None, broker={"url": "amqp://guest:guest@127.0.0.1:1/"})
    assert runner.collect_host(cfg, host) == Exit.BROKER
    assert checkpoint.load(cfg.collect.state_dir, host).pairs == {}
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.startswith("psprobe")]
    assert len(errors) == 1 and "FAILED" in errors[0]
    assert "cannot connect (Connection refused)" in errors[0]


def test_run_killed_midway_leaves_no_gap(sim, bus, tmp_path):
    """SIGKILL while publishing: the next run resends at most the window of messages in flight."""
    h = sim.host("localhost")
    now = int(time.time())
    h.add_test("throughput", event_types=["packet-count-sent"], start=now - 20_000, count=10_000,
               step=2)
    h.latency = 0.02  # a page every ~20 ms: the run lasts long enough to be killed mid-way
    host = f"localhost:{sim.port}"
    conf = write_config(tmp_path / "p.conf", {
        "collect": {"state_dir": tmp_path / "state", "chunk_points": 50},
        "archive": {"schemes": "http", "page_points": 100, "parallel": 1},
        "broker": {"url": AMQP_URL, "exchange": bus.exchange, "confirm_window": 3}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "psprobe", "--config", str(conf), "collect", host]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    got: list = []
    deadline = time.monotonic() + 30
    while len(got) < 20 * 50 and time.monotonic() < deadline:  # wait for 20 messages to arrive
        got += arrived(bus.drain())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(got) < 10_000, "the run was not killed mid-way"
    got += arrived(bus.drain())
    cp = checkpoint.load(str(tmp_path / "state"), host).pairs
    assert max(ts for *_, ts in got) - next(iter(cp.values())) <= 3 * 2 * 50  # <= 3 chunks ahead
    h.latency = 0
    assert subprocess.run(cmd, env=env, stderr=subprocess.DEVNULL, timeout=120).returncode == 0
    got += arrived(bus.drain())
    assert set(got) == held(h, now - 20_000, now)
    assert len(got) - len(set(got)) <= 3 * 50  # duplicates: at most the 3 chunks in flight
