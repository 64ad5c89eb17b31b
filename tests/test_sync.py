"""psprobe sync: meshes -> host set -> target records and timer links (no systemd needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_config

from psprobe import config, state
from psprobe import sync as msync

WANTS = "psprobe-timers.target.wants"


def meshconfig(*hosts: str) -> str:
    return json.dumps({"organizations": [{"sites": [{"hosts": [
        {"addresses": [h], "measurement_archives": [{
            "type": "perfsonarbuoy/bwctl", "read_url": f"https://{h}/esmond/perfsonar/archive/"}]}
        for h in hosts]}]}], "tests": [{"members": {"type": "mesh", "members": list(hosts)}}]})


@pytest.fixture
def site(tmp_path):
    """A config with two local meshes, a static host and an exclusion."""
    (tmp_path / "a.json").write_text(meshconfig("ps-a.example.org", "ps-b.example.org:8443"))
    (tmp_path / "b.json").write_text(meshconfig("ps-b.example.org:8443", "ps-gone.example.org"))
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state"},
        "mesh": {"urls": f"{tmp_path}/a.json, {tmp_path}/b.json",
                 "hosts": "PS-Static.Example.org., https://ps-url.example.org:9443/custom/archive/",
                 "exclude": "ps-gone.example.org", "unit_dir": tmp_path / "systemd",
                 "template_dir": "/usr/lib/systemd/system"},
    })
    return tmp_path, conf


def run_sync(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psprobe", "--config", str(conf), "sync", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def links(tmp_path: Path) -> set[str]:
    d = tmp_path / "systemd" / WANTS
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


EXPECTED = {"ps-a.example.org", "ps-b.example.org:8443", "ps-static.example.org",
            "ps-url.example.org:9443"}


def test_dry_run_prints_the_plan_and_changes_nothing(site):
    tmp_path, conf = site
    p = run_sync(conf, "--dry-run")
    assert p.returncode == 0, p.stderr
    added = {line.split()[1] for line in p.stdout.splitlines() if line.startswith("add ")}
    assert added == EXPECTED
    assert "4 hosts: 4 to add, 0 to remove, 0 kept" in p.stdout
    assert not (tmp_path / "state").exists() and not (tmp_path / "systemd").exists()


def test_sync_writes_targets_and_links_then_removes_a_host_that_left(site):
    tmp_path, conf = site
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in EXPECTED}
    link = tmp_path / "systemd" / WANTS / "psprobe@ps-a.example.org.timer"
    assert os.readlink(link) == "/usr/lib/systemd/system/psprobe@.timer"
    t = state.read_json(tmp_path / "state/hosts/ps-b.example.org:8443/target.json")
    assert t == {"host": "ps-b.example.org:8443", "meshes": sorted([f"{tmp_path}/a.json",
                 f"{tmp_path}/b.json"]), "read_url": "https://ps-b.example.org:8443/esmond/perfsonar/archive/"}
    custom = state.read_json(tmp_path / "state/hosts/ps-url.example.org:9443/target.json")
    assert custom["read_url"] == "https://ps-url.example.org:9443/custom/archive/"
    # ps-a leaves its mesh: its link goes, the others stay, its state (checkpoints) stays
    (tmp_path / "a.json").write_text(meshconfig("ps-b.example.org:8443"))
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in EXPECTED - {"ps-a.example.org"}}
    assert "sync: removed ps-a.example.org" in p.stderr
    assert (tmp_path / "state/hosts/ps-a.example.org").is_dir()
    rec = state.read_json(tmp_path / "state/sync.json")
    assert rec["changes"][-1]["removed"] == ["ps-a.example.org"]


def test_unreachable_mesh_keeps_its_last_good_hosts_and_removes_none_after_forget_after(site):
    tmp_path, conf = site
    assert run_sync(conf, "--no-systemctl").returncode == 0
    (tmp_path / "a.json").write_text("{ this is not json")
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1  # said, and visible as a failed sync
    assert "keeping its last good list of 2 hosts" in p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in EXPECTED}
    # the same failure a long time later: the list no longer counts (ps-a is no longer a
    # target), but nothing is removed while the mesh fails
    cfg = config.load(str(conf))
    later = msync.plan(cfg, tmp_path / "systemd", msync.fetcher(cfg),
                       now=cfg.mesh.forget_after + 10 ** 10, save=False)
    assert "ps-a.example.org" not in later.targets
    assert later.removed == [] and later.held == ["ps-a.example.org"]
    assert f"{tmp_path}/a.json" in later.failed


def test_unreachable_mesh_without_history_disables_nothing(site):
    tmp_path, conf = site
    assert run_sync(conf, "--no-systemctl").returncode == 0
    for f in (tmp_path / "state" / "meshes").iterdir():
        f.unlink()
    (tmp_path / "b.json").unlink()
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1 and "no earlier good list" in p.stderr
    # ps-b is still named by mesh a; nothing of mesh b's is switched off by its absence...
    assert "psprobe@ps-b.example.org:8443.timer" in links(tmp_path)


def test_hostile_names_are_rejected_and_nothing_is_written_outside_the_unit_dir(tmp_path):
    bad = ["../../etc/passwd", "a/b.example.org", "x;reboot", "ps one.example.org", "ps\nfake",
           "user@ps.example.org", "ps\\x2d1.example.org", "ps.еxample.org", "-ps.example.org",
           "a" * 64 + ".example.org"]
    doc = json.loads(meshconfig("good.example.org"))
    doc["tests"][0]["members"]["members"] += bad  # members without an archive of their own
    (tmp_path / "m.json").write_text(json.dumps(doc))
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state"},
        "mesh": {"urls": f"{tmp_path}/m.json", "unit_dir": tmp_path / "systemd"}})
    before = {p for p in tmp_path.rglob("*")}
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert links(tmp_path) == {"psprobe@good.example.org.timer"}
    new = {p for p in tmp_path.rglob("*")} - before
    allowed = (tmp_path / "systemd", tmp_path / "state")
    assert all(any(n == a or a in n.parents for a in allowed) for n in new)
    assert {p.name for p in (tmp_path / "state" / "hosts").iterdir()} == {"good.example.org"}
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) >= len(bad)
    assert all(str(tmp_path / "m.json") in w for w in warnings[: len(bad)])


def test_real_meshconfig_document_from_shared_formats(tmp_path):
    doc = ROOT / "tests/fixtures/formats/meshconfig/perfsonar_dev_testbed__meshconfig.json"
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state"},
        "mesh": {"urls": str(doc), "unit_dir": tmp_path / "systemd"}})
    p = run_sync(conf, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].split()[:2] == ["add", "perfsonar-testbed-ma.grnoc.iu.edu"]


def cli_status(conf: Path, *args: str):
    from conftest import cli_runner

    from psprobe.cli import main

    return cli_runner().invoke(main, ["--config", str(conf), "status", *args])


THREE = ("ps-1.example.org", "ps-2.example.org", "ps-3.example.org:8085")


def test_a_mistyped_mesh_url_disables_no_host_until_every_mesh_answers(tmp_path):
    """The reproduction: a mesh URL that never answered (no last good list) disabled all 3."""
    (tmp_path / "mesh.json").write_text(meshconfig(*THREE))
    good = str(tmp_path / "mesh.json")
    typo = str(tmp_path / "mesh.jsn")

    def configure(url: str) -> Path:
        return write_config(tmp_path / "psprobe.conf", {
            "collect": {"state_dir": tmp_path / "state"},
            "mesh": {"urls": url, "unit_dir": tmp_path / "systemd"},
            "metrics": {"textfile_dir": ""}})

    conf = configure(good)
    assert run_sync(conf, "--no-systemctl").returncode == 0
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in THREE}
    conf = configure(typo)
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in THREE}  # 0 removed
    assert f"3 host(s) would be removed but mesh {typo} failed: keeping them" in p.stderr
    assert "removed=0 kept=0 held=3 failed_meshes=1" in p.stderr
    rec = state.read_json(tmp_path / "state/sync.json")
    assert rec["failed_meshes"] == [typo] and rec["held"] == sorted(THREE)
    assert rec["mesh_errors"][typo].startswith("cannot read")
    assert rec["hosts"] == sorted(THREE)
    # psprobe status: exit 1, naming the mesh (text and --json)
    r = cli_status(conf)
    assert r.exit_code == 1, r.output
    assert any(ln.startswith(f"mesh {typo}: FAILED at the last sync") for ln in r.stdout.splitlines())
    js = json.loads(cli_status(conf, "--json").stdout)
    assert js["alarm"] is True and js["failed_meshes"] == [typo]
    # sync --dry-run says it too
    p = run_sync(conf, "--dry-run")
    assert p.returncode == 1
    assert f"FAILED mesh {typo}: cannot read" in p.stdout
    assert {ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("hold ")} == set(THREE)
    assert p.stdout.splitlines()[-1].endswith(f"3 held: nothing is removed while mesh {typo} fails")
    # the URL fixed, and the mesh answers without ps-2: now it is removed
    (tmp_path / "mesh.json").write_text(meshconfig(THREE[0], THREE[2]))
    conf = configure(good)
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in (THREE[0], THREE[2])}
    assert f"sync: removed {THREE[1]}" in p.stderr
    assert cli_status(conf).exit_code == 0
    assert state.read_json(tmp_path / "state/sync.json")["failed_meshes"] == []


def test_while_a_mesh_fails_only_an_explicit_exclude_removes_a_host(site):
    tmp_path, conf = site
    assert run_sync(conf, "--no-systemctl").returncode == 0
    (tmp_path / "b.json").write_text("garbage")  # mesh b fails, with its last good list
    (tmp_path / "a.json").write_text(meshconfig("ps-a.example.org"))  # ps-b leaves mesh a
    text = conf.read_text().replace("exclude = ps-gone.example.org",
                                    "exclude = ps-gone.example.org, ps-url.example.org:9443")
    conf.write_text(text)
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1
    # ps-b is still named by mesh b's last good list: kept; ps-url is excluded: removed
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in EXPECTED - {"ps-url.example.org:9443"}}
    assert "sync: removed ps-url.example.org:9443" in p.stderr


def test_the_default_metrics_dir_missing_is_silent_a_set_one_warns(tmp_path):
    """Without node_exporter the default [metrics] textfile_dir does not exist: no warning
    every run (18 of 30 warning lines in a week's journal); a directory the operator set is."""
    import logging

    from psprobe import metrics

    default = config.Metrics().textfile_dir
    if os.path.isdir(default):
        pytest.skip("node_exporter's directory exists here")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("psprobe").addHandler(handler)
    try:
        assert not metrics.write_sync(default, {"hosts": []})
        assert [r.levelno for r in records if "textfile_dir" in r.getMessage()] == [logging.DEBUG]
        records.clear()
        assert not metrics.write_sync(str(tmp_path / "prom-set-by-operator"), {"hosts": []})
        assert [r.levelno for r in records if "textfile_dir" in r.getMessage()] == [logging.WARNING]
    finally:
        logging.getLogger("psprobe").removeHandler(handler)


def test_a_sync_with_the_real_default_metrics_dir_warns_nothing(tmp_path):
    if os.path.isdir(config.Metrics().textfile_dir):
        pytest.skip("node_exporter's directory exists here")
    (tmp_path / "m.json").write_text(meshconfig("ps-a.example.org"))
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state"},
        "mesh": {"urls": f"{tmp_path}/m.json", "unit_dir": tmp_path / "systemd"}})
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert "textfile_dir" not in p.stderr, p.stderr


# --- pushing hosts (psprobe receive): no timer, listed in sync.json

RECEIVER = "https://collector.example.org:8443/psprobe"


def psconfig(toolkits: list[str], testpoints: list[str], url: str = RECEIVER) -> str:
    """Toolkits archive locally (read back), testpoints push to ``url`` (a host archive)."""
    names = toolkits + testpoints
    return json.dumps({
        "addresses": {h: {"address": h, "host": h} for h in names},
        "hosts": {h: {"archives": ["push"]} for h in testpoints},
        "archives": {"push": {"archiver": "http", "data": {"schema": 2, "_url": url, "op": "put"}}},
        "groups": {"g": {"type": "mesh", "addresses": [{"name": h} for h in names]}},
        "tasks": {"t": {"group": "g", "test": "x"}},
    })


@pytest.fixture
def pushsite(tmp_path):
    """One pSConfig mesh (2 toolkits, 2 testpoints) and a host of [receive] hosts."""
    (tmp_path / "p.json").write_text(psconfig(["tk-1.example.org", "tk-2.example.org"],
                                              ["tp-1.example.org", "tp-2.example.org"]))
    (tmp_path / "m.json").write_text(meshconfig("ps-m.example.org"))
    (tmp_path / "prom").mkdir()
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state"},
        "mesh": {"urls": f"{tmp_path}/p.json, {tmp_path}/m.json", "unit_dir": tmp_path / "systemd"},
        # written another way than in the mesh: compared normalised
        "receive": {"url": "HTTPS://Collector.Example.org:8443/psprobe/", "hosts": "Extra.Example.org"},
        "metrics": {"textfile_dir": tmp_path / "prom"},
    })
    return tmp_path, conf


PUSHING = ["extra.example.org", "tp-1.example.org", "tp-2.example.org"]
PULLED = {"tk-1.example.org", "tk-2.example.org", "ps-m.example.org"}


def test_pushing_hosts_get_no_timer_and_are_listed_in_sync_json(pushsite):
    tmp_path, conf = pushsite
    p = run_sync(conf, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert [ln.split() for ln in p.stdout.splitlines() if ln.startswith("push ")] == \
        [["push", h] for h in PUSHING]
    assert {ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("add ")} == PULLED
    assert "3 hosts: 3 to add, 0 to remove, 0 kept, 3 pushing; 0 mesh(es) failed" in p.stdout
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert "pushing=3" in p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in PULLED}
    assert not (tmp_path / "state/hosts/tp-1.example.org").exists()  # no target.json either
    rec = state.read_json(tmp_path / "state/sync.json")
    assert rec["pushing"] == PUSHING and rec["hosts"] == sorted(PULLED)
    first = rec["pushing_since"]
    assert sorted(first) == PUSHING
    # metrics: a file per pushing host (none received yet: when it was listed), and the count
    prom = (tmp_path / "prom/psprobe_push_tp-1.example.org.prom").read_text().splitlines()
    listed = [ln for ln in prom if ln.startswith("psprobe_receive_listed_timestamp_seconds{")]
    assert listed[0].split()[0] == \
        'psprobe_receive_listed_timestamp_seconds{host="tp-1.example.org",kind="push"}'
    assert float(listed[0].split()[-1]) == first["tp-1.example.org"]
    assert not any(ln.startswith("psprobe_collect_last_success") for ln in prom)  # nothing received
    assert "psprobe_sync_pushing_hosts 3" in (tmp_path / "prom/psprobe_sync.prom").read_text()
    # a second sync keeps when each was first listed
    assert run_sync(conf, "--no-systemctl").returncode == 0
    assert state.read_json(tmp_path / "state/sync.json")["pushing_since"] == first


def test_a_host_that_starts_pushing_loses_its_timer_but_not_while_a_mesh_fails(pushsite):
    tmp_path, conf = pushsite
    assert run_sync(conf, "--no-systemctl").returncode == 0
    # tk-1 becomes a testpoint, and the MeshConfig mesh fails (no last good list any more)
    (tmp_path / "p.json").write_text(psconfig(["tk-2.example.org"],
                                              ["tk-1.example.org", "tp-1.example.org", "tp-2.example.org"]))
    (tmp_path / "m.json").write_text("garbage")
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1
    assert "psprobe@tk-1.example.org.timer" in links(tmp_path)  # held, like a host that left
    rec = state.read_json(tmp_path / "state/sync.json")
    assert "tk-1.example.org" in rec["held"] and "tk-1.example.org" in rec["pushing"]
    # every mesh answers again: its timer goes, said why
    (tmp_path / "m.json").write_text(meshconfig("ps-m.example.org"))
    p = run_sync(conf, "--dry-run")
    assert "remove tk-1.example.org  (it pushes here now)" in p.stdout
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 0, p.stderr
    assert "sync: removed tk-1.example.org (it pushes here now)" in p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in PULLED - {"tk-1.example.org"}}
    assert state.read_json(tmp_path / "state/sync.json")["pushing"] == sorted([*PUSHING, "tk-1.example.org"])


def test_a_failing_mesh_keeps_its_pushing_hosts_listed(pushsite):
    """receive refuses a host sync.json does not list: a mesh that fails must not drop them."""
    tmp_path, conf = pushsite
    assert run_sync(conf, "--no-systemctl").returncode == 0
    (tmp_path / "p.json").write_text("{ not json")
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1
    assert state.read_json(tmp_path / "state/sync.json")["pushing"] == PUSHING  # its last good list
    # long past [mesh] forget_after the list no longer counts, but the last sync's stay listed
    cfg = config.load(str(conf))
    later = msync.plan(cfg, tmp_path / "systemd", msync.fetcher(cfg),
                       now=cfg.mesh.forget_after + 10 ** 10, save=False)
    assert later.pushing == PUSHING and later.failed
    # the mesh answers without tp-2: no longer listed, its metrics file goes
    (tmp_path / "p.json").write_text(psconfig(["tk-1.example.org", "tk-2.example.org"], ["tp-1.example.org"]))
    assert run_sync(conf, "--no-systemctl").returncode == 0
    rec = state.read_json(tmp_path / "state/sync.json")
    assert rec["pushing"] == ["extra.example.org", "tp-1.example.org"]
    assert sorted(rec["pushing_since"]) == rec["pushing"]
    assert not (tmp_path / "prom/psprobe_push_tp-2.example.org.prom").exists()
    assert (tmp_path / "prom/psprobe_push_tp-1.example.org.prom").exists()


def test_pushing_hosts_are_not_sharded_and_exclude_applies_to_meshes_not_receive_hosts(pushsite):
    tmp_path, conf = pushsite
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d/shard.conf").write_text(
        "[mesh]\nshard = 2/2\nexclude = tp-2.example.org, extra.example.org\n")
    cfg = config.load(str(conf))
    p = msync.plan(cfg, tmp_path / "systemd", msync.fetcher(cfg), now=1e9, save=False)
    # every shard lists every pushing host; [receive] hosts is the operator's word too
    assert p.pushing == ["extra.example.org", "tp-1.example.org"]
    assert sum(p.split.counts) == len(PULLED)  # only pulled hosts are split
    assert not set(p.targets) & set(p.pushing)


def test_without_receive_url_an_http_archive_pushes_nowhere(tmp_path):
    (tmp_path / "p.json").write_text(psconfig(["tk-1.example.org"], ["tp-1.example.org"]))
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state"},
        "mesh": {"urls": f"{tmp_path}/p.json", "unit_dir": tmp_path / "systemd"}})
    p = run_sync(conf, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "push " not in p.stdout and "0 pushing" in p.stdout
    assert "cannot be read back" in p.stderr  # as before: an http archive gives no host
