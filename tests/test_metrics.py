"""Prometheus textfile metrics: format, atomic replacement, monotonic counters, off/missing dir."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from test_status import DOWN_HOST, LAG_HOST, OK_HOST, make_world, sim, write_cfg  # noqa: F401

from psprobe import config, history, metrics, runner, state, sync, units

LABEL = r'"((?:[^"\\]|\\.)*)"'  # a label value, escapes included
SAMPLE = re.compile(rf'^([a-z_]+)(\{{host="([^"]+)"((?:,[a-z_]+={LABEL})*)\}})? (?P<v>-?[0-9.e+]+)$')


def parse(text: str) -> dict[tuple, float]:
    """Samples of a file, checking the exposition format line by line on the way.

    Keyed (name, host), or (name, host, other label values...) for more labels.
    """
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter") and name not in typed
            assert (kind == "counter") == name.endswith("_total")
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, line
        assert m.group(1) in typed  # TYPE comes before the samples
        more = tuple(re.findall("=" + LABEL, m.group(4) or ""))
        out[(m.group(1), m.group(3), *more)] = float(m.group("v"))
    assert text.endswith("\n")
    return out


def test_real_collects_write_one_file_per_host(tmp_path, sim, bus):  # noqa: F811
    w = make_world(tmp_path / "w", sim, bus.exchange)
    prom = tmp_path / "w" / "prom"
    assert sorted(p.name for p in prom.iterdir()) == [  # nothing else left behind (no temp files)
        f"psprobe_host_{h}.prom" for h in sorted((DOWN_HOST, OK_HOST, LAG_HOST))]
    arrived = bus.drain()
    got = {h: parse((prom / f"psprobe_host_{h}.prom").read_text()) for h in (OK_HOST, LAG_HOST, DOWN_HOST)}
    assert sum(g[("psprobe_collect_points_published_total", h)] for h, g in got.items()) == \
        sum(len(m.body["datapoints"]) for m in arrived)
    assert sum(g[("psprobe_collect_messages_published_total", h)] for h, g in got.items()) == len(arrived)
    d = got[DOWN_HOST]
    assert d[("psprobe_collect_failures_total", DOWN_HOST)] == 1
    assert d[("psprobe_collect_runs_total", DOWN_HOST)] == 2
    assert d[("psprobe_collect_last_status", DOWN_HOST)] == 1
    assert d[("psprobe_collect_last_success_timestamp_seconds", DOWN_HOST)] < \
        d[("psprobe_collect_last_run_timestamp_seconds", DOWN_HOST)]
    lag = got[LAG_HOST][("psprobe_collect_lag_seconds", LAG_HOST)]
    assert 5 * 3600 - 700 < lag < 5 * 3600 + 700
    cp = state.read_json(state.host_dir(w.cfg.collect.state_dir, LAG_HOST) / "checkpoint.json")
    assert got[LAG_HOST][("psprobe_collect_newest_point_timestamp_seconds", LAG_HOST)] == \
        max(cp["pairs"].values())
    assert 0 <= got[OK_HOST][("psprobe_collect_duration_seconds", OK_HOST)] < 10
    assert got[OK_HOST][("psprobe_collect_failures_total", OK_HOST)] == 0


def test_counters_never_drop_when_old_runs_are_pruned(tmp_path):
    conf = write_cfg(tmp_path, "unused")
    (tmp_path / "prom").mkdir()
    cfg = config.load(str(conf))
    sd, h = cfg.collect.state_dir, "a.example"
    state.host_dir(sd, h).mkdir(parents=True)
    t = int(time.time()) - 20 * 86400
    seen = []
    for k in range(6):  # runs 4 days apart: each record prunes the older ones
        t += 4 * 86400
        doc = history.record(sd, h, {"start": t - 1, "end": t, "status": k % 2, "points": 100,
                                     "messages": 2, "newest": int(t - 50)})
        metrics.write_host(str(tmp_path / "prom"), h, doc)
        seen.append(parse((tmp_path / "prom" / metrics.host_file(h)).read_text()))
    assert len(history.load(sd, h)) == 3  # 8 days kept
    pts = [s[("psprobe_collect_points_published_total", h)] for s in seen]
    assert pts == [100, 200, 300, 400, 500, 600]
    assert [s[("psprobe_collect_failures_total", h)] for s in seen] == [0, 1, 1, 2, 2, 3]
    assert seen[-1][("psprobe_collect_lag_seconds", h)] == 50


def test_backfill_counts_as_published_not_as_a_run(tmp_path):
    sd = str(tmp_path)
    state.host_dir(sd, "a.example").mkdir(parents=True)
    history.record(sd, "a.example", {"end": 10, "status": 0, "points": 5, "messages": 1})
    doc = history.record(sd, "a.example", {"kind": "backfill", "end": 20, "status": 0, "points": 7,
                                           "messages": 3})
    vals = dict(((n, ), v) for n, _, v in metrics.host_values("a.example", doc))
    assert vals[("psprobe_collect_points_published_total",)] == 12
    assert vals[("psprobe_collect_runs_total",)] == 1
    assert vals[("psprobe_collect_last_run_timestamp_seconds",)] == 10


def test_off_when_empty_and_missing_dir_is_only_a_warning(tmp_path, sim, bus, caplog):  # noqa: F811
    now = int(time.time())
    h = "localhost"
    sim.host(h).add_test("throughput", start=now - 600, step=60, count=10)
    host = f"localhost:{sim.port}"
    conf = write_cfg(tmp_path / "a", bus.exchange, metrics={"textfile_dir": tmp_path / "missing"})
    with caplog.at_level(logging.WARNING, logger="psprobe"):
        assert runner.collect_host(config.load(str(conf)), host) == 0
    assert "textfile_dir" in caplog.text and "does not exist" in caplog.text
    assert not (tmp_path / "missing").exists()
    assert len(bus.drain()) == 5
    conf = write_cfg(tmp_path / "b", bus.exchange, metrics={"textfile_dir": ""})
    before = set(Path(tmp_path).rglob("*.prom"))
    assert runner.collect_host(config.load(str(conf)), host) == 0
    assert set(Path(tmp_path).rglob("*.prom")) == before == set()


def test_a_reader_never_sees_a_partial_file(tmp_path, monkeypatch):
    d = tmp_path / "prom"
    d.mkdir()
    prom = d / metrics.SYNC_FILE
    assert metrics.write_sync(str(d), {"hosts": ["a"], "last_run": 1})
    old = prom.read_text()
    seen = []
    real_replace = state.replace_at

    def replace(dir_fd, src, dst, **kw):  # at the rename: the new text is whole, elsewhere
        seen.append((prom.read_text(), src, (d / src).read_text()))
        real_replace(dir_fd, src, dst, **kw)

    monkeypatch.setattr(state, "replace_at", replace)
    assert metrics.write_sync(str(d), {"hosts": ["a", "b"], "last_run": 2})
    new = prom.read_text()
    assert "psprobe_sync_hosts 2" in new and "psprobe_sync_hosts 1" in old
    assert seen == [(old, seen[0][1], new)]
    assert not seen[0][1].endswith(".prom")  # node_exporter ignores the temporary file
    assert [p.name for p in d.iterdir()] == [metrics.SYNC_FILE]


def test_sync_writes_its_metrics_and_drops_removed_hosts(tmp_path):
    prom = tmp_path / "prom"
    prom.mkdir()
    mesh_file = tmp_path / "mesh.json"
    conf = write_cfg(tmp_path, "unused", mesh={"hosts": "a.example b.example"})
    cfg = config.load(str(conf))
    udir = Path(cfg.mesh.unit_dir)
    p = sync.plan(cfg, udir, sync.fetcher(cfg), now=1000.0)
    sync.apply(cfg, p, udir, now=1000.0, systemctl=False)
    for h in ("a.example", "b.example"):
        metrics.write_host(str(prom), h, history.record(cfg.collect.state_dir, h, {"end": 1, "status": 0}))
    got = parse((prom / "psprobe_sync.prom").read_text())
    assert got[("psprobe_sync_hosts", None)] == 2
    assert got[("psprobe_sync_last_success_timestamp_seconds", None)] == 1000
    assert got[("psprobe_sync_failed_meshes", None)] == 0
    conf = write_cfg(tmp_path, "unused", mesh={"hosts": "a.example", "urls": str(mesh_file)})
    cfg = config.load(str(conf))
    p = sync.plan(cfg, udir, sync.fetcher(cfg), now=2000.0)  # the mesh file is missing: failed
    sync.apply(cfg, p, udir, now=2000.0, systemctl=False)
    got = parse((prom / "psprobe_sync.prom").read_text())
    # b.example left, but nothing is removed while a mesh fails: it is held
    assert got[("psprobe_sync_hosts", None)] == 2
    assert got[("psprobe_sync_failed_meshes", None)] == 1
    assert got[("psprobe_sync_last_run_timestamp_seconds", None)] == 2000
    assert got[("psprobe_sync_last_success_timestamp_seconds", None)] == 1000
    assert (prom / "psprobe_host_b.example.prom").exists()
    assert units.enabled_hosts(udir) == {"a.example", "b.example"}
    mesh_file.write_text('{"organizations": []}')  # the mesh answers: b.example goes
    p = sync.plan(cfg, udir, sync.fetcher(cfg), now=3000.0)
    sync.apply(cfg, p, udir, now=3000.0, systemctl=False)
    got = parse((prom / "psprobe_sync.prom").read_text())
    assert got[("psprobe_sync_hosts", None)] == 1
    assert got[("psprobe_sync_failed_meshes", None)] == 0
    assert got[("psprobe_sync_last_success_timestamp_seconds", None)] == 3000
    assert sorted(x.name for x in prom.iterdir()) == ["psprobe_host_a.example.prom", "psprobe_sync.prom"]
    assert units.enabled_hosts(udir) == {"a.example"}


def test_unroutable_messages_of_the_last_regular_run_by_routing_key(tmp_path):
    sd, h = str(tmp_path), "a.example"
    state.host_dir(sd, h).mkdir(parents=True)
    ttl, trace = "perfsonar.raw.histogram-ttl", 'perfsonar.raw."odd"'
    history.record(sd, h, {"end": 10, "status": 0, "unroutable": {"perfsonar.raw.old": 4}})
    doc = history.record(sd, h, {"end": 20, "status": 0, "unroutable": {ttl: 12, trace: 3}})
    metrics.write_host(str(tmp_path), h, doc)
    text = (tmp_path / metrics.host_file(h)).read_text()
    assert f'psprobe_collect_unroutable_messages{{host="{h}",routing_key="{ttl}"}} 12' in text
    assert 'routing_key="perfsonar.raw.\\"odd\\""} 3' in text  # label value escaped
    assert "perfsonar.raw.old" not in text  # only the last run
    assert "# TYPE psprobe_collect_unroutable_messages gauge" in text
    assert parse(text)[("psprobe_collect_unroutable_messages", h, ttl)] == 12
    doc = history.record(sd, h, {"kind": "backfill", "end": 30, "status": 0,
                                 "unroutable": {ttl: 99}})
    names = [(n, lab.get("routing_key"), v) for n, lab, v in metrics.host_values(h, doc)
             if n == "psprobe_collect_unroutable_messages"]
    assert sorted(names) == [("psprobe_collect_unroutable_messages", trace, 3),
                             ("psprobe_collect_unroutable_messages", ttl, 12)]
    doc = history.record(sd, h, {"end": 40, "status": 0})  # none: no sample at all
    assert "unroutable" not in metrics.render(metrics.HOST_METRICS, metrics.host_values(h, doc))


def test_a_pushing_host_has_the_same_metric_names_with_kind_push(tmp_path):
    from test_status import received

    sd, prom, h = str(tmp_path / "state"), tmp_path / "prom", "tp.example"
    prom.mkdir()
    received(sd, h, first_received=900.0, last_received=1000.5, newest_ts=940, runs=12, points=80,
             messages=14, confirmed=13, failed_runs=2, last_failure={"time": 990, "error": "x"},
             refused={"count": 3, "last_time": 1100, "last_reason": "401: no token"})
    assert metrics.write_received(str(prom), h, metrics.read_received(sd, h), listed=500)
    text = (prom / "psprobe_push_tp.example.prom").read_text()
    got = parse(text)
    key = (h, "push")
    assert got[("psprobe_collect_last_run_timestamp_seconds", *key)] == 1100  # the refused push
    assert got[("psprobe_collect_last_success_timestamp_seconds", *key)] == 1000.5
    assert got[("psprobe_collect_newest_point_timestamp_seconds", *key)] == 940
    assert got[("psprobe_collect_lag_seconds", *key)] == 60.5
    assert got[("psprobe_collect_points_published_total", *key)] == 80
    assert got[("psprobe_collect_messages_published_total", *key)] == 13  # confirmed ones
    assert got[("psprobe_collect_runs_total", *key)] == 12
    assert got[("psprobe_collect_failures_total", *key)] == 3
    assert got[("psprobe_receive_failed_runs_total", *key)] == 2
    assert got[("psprobe_receive_listed_timestamp_seconds", *key)] == 500
    # node_exporter merges the files: a name has one HELP and TYPE in all of them
    state.host_dir(sd, "a.example").mkdir(parents=True)
    metrics.write_host(str(prom), "a.example", history.record(sd, "a.example", {"end": 1, "status": 0}))
    helps: dict[tuple, str] = {}
    for f in prom.iterdir():
        for ln in f.read_text().splitlines():
            if ln.startswith("# "):
                assert helps.setdefault(tuple(ln.split()[1:3]), ln) == ln  # ("HELP", name)
    # nothing received yet: only the counters (0) and when sync listed it
    assert not metrics.write_received("", h, None)  # metrics off
    metrics.write_received(str(prom), "new.example", None, listed=700)
    got = parse((prom / "psprobe_push_new.example.prom").read_text())
    assert got[("psprobe_receive_listed_timestamp_seconds", "new.example", "push")] == 700
    assert not any(k[0].endswith("timestamp_seconds") and "listed" not in k[0] for k in got)
    metrics.remove_received(str(prom), ["new.example", "never.example"])
    assert not (prom / "psprobe_push_new.example.prom").exists()
