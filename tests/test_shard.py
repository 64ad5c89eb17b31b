"""``[mesh] shard = K/N``: N machines with one configuration split the hosts, with no coordinator.

Broker-free: the hash alone, then whole ``psprobe sync`` runs of several "machines"
(a state directory and a unit directory each) over one 2 000-host mesh.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest
from conftest import cli_runner, write_config
from test_sync import meshconfig

from psprobe import config, shard, state, units
from psprobe import sync as msync
from psprobe.cli import main
from psprobe.messages import Encoder

# 2 000 archive hosts as two real meshes name them: 1 200 in a MeshConfig document (every
# tenth on port 8443), 1 000 in a pSConfig one (an esmond archive per scheduling address),
# 200 of them in both.
NAMES = [f"ps-{i}.site{i % 97}.example.org" + (":8443" if i % 10 == 7 else "") for i in range(2000)]
MESHCONFIG, PSCONFIG = NAMES[:1200], NAMES[1000:]


def psconfig(hosts: list[str]) -> str:
    """The shape of shared/formats/pSConfig (as bench/scale.py builds it)."""
    return json.dumps({
        "addresses": {h: {"address": h} for h in hosts},
        "archives": {"esmond": {"archiver": "esmond", "data": {
            "url": "https://{% scheduled_by_address %}/esmond/perfsonar/archive/"}}},
        "groups": {"mesh": {"type": "mesh", "addresses": [{"name": h} for h in hosts]}},
        "tests": {"owamp": {"type": "latencybg", "spec": {"source": "{% address[0] %}",
                                                          "dest": "{% address[1] %}"}}},
        "tasks": {"latency": {"group": "mesh", "test": "owamp", "archives": ["esmond"]}},
    })


@pytest.fixture
def fleet(tmp_path):
    """The two meshes, and a way to configure machine ``m`` as shard ``k/n``."""
    (tmp_path / "mc.json").write_text(meshconfig(*MESHCONFIG))
    (tmp_path / "psc.json").write_text(psconfig(PSCONFIG))

    def machine(m: int, value: str) -> Path:
        d = tmp_path / f"machine{m}"
        d.mkdir(exist_ok=True)
        return write_config(d / "psprobe.conf", {
            "collect": {"state_dir": d / "state"},
            "mesh": {"urls": f"{tmp_path}/mc.json, {tmp_path}/psc.json",
                     "unit_dir": d / "systemd", "shard": value},
            "metrics": {"textfile_dir": ""}})

    return tmp_path, machine


def sync(conf: Path, *args: str):
    unit_dir = conf.parent / "systemd"
    return cli_runner().invoke(main, ["--config", str(conf), "sync", "--unit-dir", str(unit_dir),
                                      *args])


def enabled(tmp_path: Path, m: int) -> set[str]:
    return units.enabled_hosts(tmp_path / f"machine{m}" / "systemd")


# --- the hash


def test_2000_hosts_split_evenly_over_3_shards():
    counts = collections.Counter(shard.assign(NAMES, 3).values())
    assert sorted(counts) == [1, 2, 3]
    assert all(abs(c - 2000 / 3) < 0.06 * 2000 / 3 for c in counts.values()), counts


def test_going_from_3_to_4_moves_a_quarter_all_to_the_new_shard_and_back_only_those():
    three, four = shard.assign(NAMES, 3), shard.assign(NAMES, 4)
    moved = [h for h in NAMES if three[h] != four[h]]
    assert 0.20 < len(moved) / len(NAMES) < 0.30, len(moved)
    assert {four[h] for h in moved} == {4}
    # 4 -> 3: exactly shard 4's hosts move, each back where it was
    assert moved == [h for h in NAMES if four[h] == 4]
    # modulo would have moved most of them (why rendezvous: psprobe.shard)
    assert sum(hash_mod(h, 3) != hash_mod(h, 4) for h in NAMES) > 0.6 * len(NAMES)


def hash_mod(host: str, n: int) -> int:
    return shard.weight(host, 0) % n


def test_the_shard_is_a_function_of_the_name_and_n_only():
    assert shard.owner("ps-1.example.org", 5) == shard.owner("ps-1.example.org", 5)
    assert [shard.owner(h, 1) for h in NAMES[:50]] == [1] * 50
    split = shard.Split.of(shard.assign(NAMES, 3), 2, 3)
    assert shard.Split.from_record(json.loads(json.dumps(split.record()))) == split
    assert shard.Split.from_record({"k": 4, "n": 3, "counts": [1, 2, 3]}) is None
    assert shard.Split.from_record(None) is None


@pytest.mark.parametrize("value", ["0/3", "4/3", "a/b", "3", "1/0", "2/3/4", "-1/3", "1/1001"])
def test_a_bad_shard_is_one_config_error_line_and_exit_78(tmp_path, value):
    conf = write_config(tmp_path / "p.conf", {"mesh": {"shard": value}})
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value) == (f"{conf}: [mesh] shard: must be K/N with 1 <= K <= N <= 1000 "
                            f"(like 2/3), or none: {value!r}")
    r = sync(conf, "--dry-run")
    assert r.exit_code == 78 and "[mesh] shard: must be K/N" in r.stderr


# --- machines


def test_three_machines_enable_every_host_of_a_2000_host_mesh_exactly_once_and_after_a_4th(fleet):
    tmp_path, machine = fleet
    confs = {m: machine(m, f"{m}/3") for m in (1, 2, 3)}
    r = sync(confs[2], "--dry-run")
    assert r.exit_code == 0, r.output
    head, *lines = r.stdout.splitlines()
    counts = collections.Counter(shard.assign(NAMES, 3).values())
    assert head == (f"shard 2/3: {counts[2]} of 2000 hosts here "
                    f"(1: {counts[1]}, 2: {counts[2]}, 3: {counts[3]})")
    assert {ln.split()[1] for ln in lines if ln.startswith("add ")} == \
        {h for h in NAMES if shard.owner(h, 3) == 2}
    for conf in confs.values():
        r = sync(conf, "--no-systemctl")
        assert r.exit_code == 0, r.output
    on = {m: enabled(tmp_path, m) for m in (1, 2, 3)}
    assert_each_once(on, NAMES)
    for m in on:  # each machine records (target.json) its own hosts only
        assert set(state.listdir(tmp_path / f"machine{m}/state", state.HOSTS)) == on[m]
        assert state.read_json(tmp_path / f"machine{m}/state/sync.json")["shard"] == \
            {"k": m, "n": 3, "counts": [counts[1], counts[2], counts[3]]}

    # A fourth machine; the three others change N to 4 and sync after it.
    confs = {m: machine(m, f"{m}/4") for m in (1, 2, 3, 4)}
    assert sync(confs[4], "--no-systemctl").exit_code == 0
    new = enabled(tmp_path, 4)
    assert new == {h for h in NAMES if shard.owner(h, 4) == 4}
    assert 0.20 < len(new) / len(NAMES) < 0.30
    for m in (1, 2, 3):
        r = sync(confs[m], "--no-systemctl")
        assert r.exit_code == 0, r.output
        last = state.read_json(tmp_path / f"machine{m}/state/sync.json")["changes"][-1]
        assert last["added"] == [] and set(last["removed"]) == on[m] & new  # only moves to 4
    assert_each_once({m: enabled(tmp_path, m) for m in (1, 2, 3, 4)}, NAMES)


def assert_each_once(on: dict[int, set[str]], hosts: list[str]) -> None:
    seen = collections.Counter(h for got in on.values() for h in got)
    assert set(seen) == set(hosts)
    assert [h for h, c in seen.items() if c != 1] == []


def test_a_failed_mesh_holds_the_hosts_that_moved_to_another_shard(fleet):
    tmp_path, machine = fleet
    conf = machine(1, "1/3")
    assert sync(conf, "--no-systemctl").exit_code == 0
    before = enabled(tmp_path, 1)
    conf = machine(1, "1/4")
    (tmp_path / "psc.json").write_text("{ broken")  # fails; its last good list still counts
    r = sync(conf, "--dry-run")
    assert r.exit_code == 1
    moved = {h for h in before if shard.owner(h, 4) == 4}
    held = {ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("hold ")}
    assert held == moved and moved
    assert all("(shard 4 collects it now, kept while a mesh fails)" in ln
               for ln in r.stdout.splitlines() if ln.startswith("hold "))
    assert sync(conf, "--no-systemctl").exit_code == 1
    assert enabled(tmp_path, 1) == before  # nothing removed while a mesh fails
    (tmp_path / "psc.json").write_text(psconfig(PSCONFIG))
    r = sync(conf, "--dry-run")
    assert {ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("remove ")} == moved
    assert sync(conf, "--no-systemctl").exit_code == 0
    assert enabled(tmp_path, 1) == before - moved


def test_status_and_report_say_which_shard_only_when_sharded(fleet):
    _, machine = fleet
    conf = machine(3, "3/3")
    cfg = config.load(str(conf))
    p = msync.plan(cfg, Path(cfg.mesh.unit_dir), msync.fetcher(cfg), now=0, save=False)
    line = f"{p.split.line()} at the last sync"
    status = cli_runner().invoke(main, ["--config", str(conf), "status"])
    assert status.stdout.splitlines()[0] == "shard 3/3 ([mesh] shard), not applied yet: no sync has run"
    assert sync(conf, "--no-systemctl").exit_code == 0
    status = cli_runner().invoke(main, ["--config", str(conf), "status"])
    assert status.stdout.splitlines()[0] == line
    js = json.loads(cli_runner().invoke(main, ["--config", str(conf), "status", "--json"]).stdout)
    assert js["shard"]["k"] == 3 and js["shard"]["n"] == 3 and js["shard"]["line"] == line
    report = cli_runner().invoke(main, ["--config", str(conf), "report"])
    assert report.exit_code == 0, report.output
    assert report.stdout.splitlines()[1] == f"This machine is {line}"
    # the same machine unsharded: no shard line, no key
    conf = machine(3, "none")
    assert "shard" not in cli_runner().invoke(main, ["--config", str(conf), "status"]).stdout.splitlines()[0]
    js = json.loads(cli_runner().invoke(main, ["--config", str(conf), "status", "--json"]).stdout)
    assert "shard" not in js
    report = cli_runner().invoke(main, ["--config", str(conf), "report"])
    assert "This machine is" not in report.stdout


def test_a_moved_hosts_resent_points_keep_their_point_key_not_their_message_id():
    """What the README's sharding section says consumers deduplicate on.

    The old machine sent a series a few points per run; the new one, starting from
    first_run_lookback, sends the same points in chunks of chunk_points.  The bodies
    differ, so the message ids do; each point's (org_metadata_key, event-type, ts) does not.
    """
    meta = {"source": "10.0.0.1", "destination": "10.0.0.2", "org_metadata_key": "abc",
            "event-type": "packet-loss-rate", "summaries": 0}
    points = [(1_700_000_000 + 60 * i, 0.0) for i in range(720)]  # 12 h, a point a minute
    enc = Encoder(meta, "perfsonar.raw.packet-loss-rate")
    old = [enc.encode(points[i:i + 10]) for i in range(0, len(points), 10)]  # a 10-min run each
    new = [enc.encode(points[i:i + 200]) for i in range(0, len(points), 200)]  # chunk_points
    assert {m.message_id for m in old}.isdisjoint(m.message_id for m in new)

    def keys(msgs):
        out = []
        for m in msgs:
            body = json.loads(m.body)
            out += [(body["meta"]["org_metadata_key"], body["meta"]["event-type"], int(ts))
                    for ts in body["datapoints"]]
        return out

    assert keys(old) == keys(new) and len(set(keys(new))) == len(points)
    # the same chunk sent again (a crash before its confirm) is the same message id
    assert enc.encode(points[:200]).message_id == new[0].message_id


def test_a_host_that_comes_back_starts_afresh_not_from_its_stale_checkpoint(tmp_path):
    """Shard K collected the host, then N changed and another shard took it, then it came
    back: its positions on K are stale (the other machine sent everything since), so the
    first collect back on K reads the first-run look-back, not everything since it left."""
    from esmond_sim import EsmondSim
    from test_backfill import Confirming

    from psprobe import checkpoint, config, runner, state

    step = 60
    now = int(time.time()) // step * step
    with EsmondSim() as sim:
        sim.host("localhost").add_test("throughput", start=now - 3 * 86400, step=step,
                                       count=3 * 86400 // step)
        host = f"localhost:{sim.port}"
        conf = write_config(tmp_path / "psprobe.conf", {
            "collect": {"state_dir": tmp_path / "state", "first_run_lookback": "1h"},
            "archive": {"schemes": "http", "retries": 0, "timeout": "5s"},
            "metrics": {"textfile_dir": ""}})
        cfg = config.load(str(conf))
        sd = cfg.collect.state_dir
        assert runner.collect_host(cfg, host, outlet=Confirming()) == 0
        # Its checkpoint from two days ago, when it left for another shard...
        cp = checkpoint.load(sd, host)
        for pair in list(cp.pairs):
            cp.pairs[pair] = now - 2 * 86400
        cp.save()
        cp.close()
        # ... and what sync wrote when it removed the host for that reason.
        state.write_json_atomic(state.host_file(sd, host, state.MOVED),
                                {"time": now - 2 * 86400, "shard": 2}, root=sd)
        back = Confirming()
        assert runner.collect_host(cfg, host, outlet=back) == 0
    oldest = min(ts for *_, ts in back.points())
    assert oldest >= now - 3600 - step  # the look-back, not two days of resent points
    assert not state.host_file(sd, host, state.MOVED).exists()
    assert checkpoint.peek(sd, host) and min(checkpoint.peek(sd, host).values()) >= now - step


def test_sync_marks_only_the_hosts_another_shard_took(fleet):
    tmp_path, machine = fleet
    one = machine(1, "")
    assert sync(one, "--no-systemctl").exit_code == 0
    assert sync(machine(1, "1/2"), "--no-systemctl").exit_code == 0
    sd = tmp_path / "machine1" / "state"
    kept = enabled(tmp_path, 1)
    moved = {h for h in NAMES if shard.owner(h, 2) != 1}
    assert moved and kept.isdisjoint(moved) and kept | moved == set(NAMES)
    marked = {h for h in NAMES if state.host_file(sd, h, state.MOVED).exists()}
    assert marked == moved
