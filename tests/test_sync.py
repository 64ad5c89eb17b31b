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

WANTS = "timers.target.wants"


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


def test_unreachable_mesh_keeps_its_last_good_hosts_until_forget_after(site):
    tmp_path, conf = site
    assert run_sync(conf, "--no-systemctl").returncode == 0
    (tmp_path / "a.json").write_text("{ this is not json")
    p = run_sync(conf, "--no-systemctl")
    assert p.returncode == 1  # said, and visible as a failed sync
    assert "keeping its last good list of 2 hosts" in p.stderr
    assert links(tmp_path) == {f"psprobe@{h}.timer" for h in EXPECTED}
    # the same failure a long time later: the mesh no longer counts
    cfg = config.load(str(conf))
    later = msync.plan(cfg, tmp_path / "systemd", msync.fetcher(cfg),
                       now=cfg.mesh.forget_after + 10 ** 10, save=False)
    assert later.removed == ["ps-a.example.org"]
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
    warnings = [line for line in p.stderr.splitlines() if line.startswith("<4>")]
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
