"""The user's view under a real systemd (issue 3's proof).

A container boots systemd; psprobe and its units are installed as the package
lays them out.  A mesh (served here, on loopback) names archive hosts served by
the esmond simulator, one of them with nothing listening.  Then, as an operator
would: ``systemctl enable --now psprobe-sync.timer``, and look with
``systemctl list-timers``, ``journalctl`` and ``systemctl status``.

The tests of this module run in order and share one world (the sync's result).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import pytest
from esmond_sim import EsmondSim  # tests/ is on sys.path (tests/conftest.py)
from ports import free_port as closed_port  # tests/ is on sys.path

from psprobe import hostnames, units

from .container import Container, MeshHandler, wait_until

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=0"
GOOD = ["ps-east.example.sim", "perfsonar2.example.sim", "ps-west-1.example.sim"]
DOWN = "ps-down.example.sim"  # its archive port has nothing listening
LEFT = GOOD[1]  # the host the mesh drops in the last test

# For the test, host timers fire 1-3 s after sync starts them, not 1-6 min:
# the override an operator would write (see the comment in psprobe@.timer).
TIMER_DROPIN = """\
[Timer]
OnActiveSec=
OnActiveSec=1s
OnUnitInactiveSec=10min
RandomizedDelaySec=2s
"""


def timer(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.timer"


def service(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.service"


# --- a mesh on loopback, changeable between syncs


def meshconfig(archives: dict[str, str]) -> dict:
    """A MeshConfig document (shape of shared/formats/meshconfig) naming ``archives``."""
    return {
        "description": "psprobe system test mesh",
        "organizations": [
            {
                "sites": [
                    {
                        "hosts": [
                            {
                                "addresses": [name],
                                "measurement_archives": [
                                    {"read_url": url, "write_url": url, "type": "perfsonarbuoy/owamp"}
                                ],
                            }
                            for name, url in archives.items()
                        ]
                    }
                ]
            }
        ],
        "tests": [
            {
                "description": "system test",
                "members": {"type": "mesh", "members": list(archives)},
                "parameters": {"type": "perfsonarbuoy/owamp"},
            }
        ],
    }


# --- what arrives at the broker


class Bus:
    """A fresh exchange with a queue bound to everything; ``take`` drains it."""

    def __init__(self) -> None:
        import pika

        self.exchange = f"test.psprobe.system.{uuid.uuid4().hex[:10]}"
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        self.ch = self.conn.channel()
        self.ch.exchange_declare(self.exchange, exchange_type="topic")
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, self.exchange, routing_key="#")
        self.bodies: list[dict] = []
        self.got: list[tuple[str, str, dict]] = []  # (routing key, message id, body)

    def take(self) -> list[dict]:
        """Every body that arrived so far (what is queued is fetched first)."""
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.bodies
            self.bodies.append(json.loads(body))
            self.got.append((method.routing_key, props.message_id, self.bodies[-1]))

    def messages(self) -> list[tuple[str, str, dict]]:
        """The same as (routing key, message id, body)."""
        self.take()
        return self.got

    def points_by_source(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.take():
            src = b["meta"]["input_source"]
            out[src] = out.get(src, 0) + len(b["datapoints"])
        return out

    def close(self) -> None:
        try:
            self.ch.exchange_delete(self.exchange)
            self.conn.close()
        except Exception:  # best effort at teardown
            pass


@dataclass
class World:
    c: Container
    sim: EsmondSim
    mesh: ThreadingHTTPServer
    bus: Bus
    archives: dict[str, str] = field(default_factory=dict)  # mesh address -> read URL
    hosts: dict[str, str] = field(default_factory=dict)  # mesh address -> psprobe host

    def show(self, unit: str, *props: str) -> dict[str, str]:
        cp = self.c.systemctl("show", unit, *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)

    def listed_timers(self) -> set[str]:
        """The host timers ``systemctl list-timers`` shows (the active ones)."""
        cp = self.c.systemctl("list-timers", "--no-legend", "psprobe@*")
        return {w for line in cp.stdout.splitlines() for w in line.split() if w.endswith(".timer")}

    def sync(self) -> None:
        """One run of psprobe-sync.service, as its timer starts it."""
        cp = self.c.systemctl("start", "psprobe-sync.service")
        assert cp.returncode == 0, cp.stderr + self.c.journal("psprobe-sync.service", "-n", "30")


@pytest.fixture(scope="module")
def world(container: Container) -> Iterator[World]:
    sim = EsmondSim("127.0.0.1", 0).start()
    mesh = ThreadingHTTPServer(("127.0.0.1", 0), MeshHandler)
    threading.Thread(target=mesh.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    bus = Bus()
    w = World(container, sim, mesh, bus)
    try:
        now = int(time.time())
        for name in GOOD:
            sim.host(name).add_test(
                "throughput",
                event_types=["throughput", "packet-retransmits"],  # both collected by default
                start=now - 3 * 3600,
                step=600,
                **{"input-source": name},
            )
            w.archives[name] = f"http://{name}:{sim.port}/esmond/perfsonar/archive/"
            w.hosts[name] = f"{name}:{sim.port}"
        w.archives[DOWN] = f"http://{DOWN}:{closed_port()}/esmond/perfsonar/archive/"
        w.hosts[DOWN] = w.archives[DOWN].split("/")[2]
        mesh.doc = meshconfig(w.archives)  # type: ignore[attr-defined]

        c = container
        with open(c.path("/etc/hosts"), "a") as f:
            f.write(f"127.0.0.1 {' '.join([*GOOD, DOWN])}\n")
        c.write("/etc/psprobe/broker.secret", "guest\n", mode=0o640, owner="root:psprobe")
        c.write(
            "/etc/psprobe/psprobe.conf",
            f"""\
[collect]
state_dir = /var/lib/psprobe

[mesh]
urls = http://127.0.0.1:{mesh.server_address[1]}/mesh.json
timeout = 5s
retries = 0

[archive]
timeout = 5s
retries = 0

[broker]
url = amqp://guest@127.0.0.1:5672/%2F
password_file = /etc/psprobe/broker.secret
exchange = {bus.exchange}
""",
            mode=0o640,
            owner="root:psprobe",
        )
        c.write("/etc/systemd/system/psprobe@.timer.d/test.conf", TIMER_DROPIN)
        c.systemctl("daemon-reload", check=True)
        yield w
    finally:
        container.systemctl("disable", "--now", "psprobe-sync.timer")
        container.run("systemctl stop 'psprobe@*.timer' 'psprobe@*.service'")
        container.run("rm -rf /etc/systemd/system/psprobe@.timer.d && systemctl daemon-reload")
        bus.close()
        mesh.shutdown()
        mesh.server_close()
        sim.stop()


def test_timers_started_together_fall_due_spread_out(container):
    """200 host timers started at once (one sync, or a boot): first runs spread over the interval.

    Sync's part is done as sync does it (psprobe.units.apply: links and phase drop-ins),
    then the one reload and start.  Each timer falls due at its host's phase.
    """
    c = container
    hosts = [f"burst-{i}.example.org" for i in range(200)]
    names = [units.timer_name(h) for h in hosts]
    udir = c.path("/etc/systemd/system")
    # A timer that falls due while the test looks runs nothing (and leaves no state).
    noop = "/etc/systemd/system/psprobe@.service.d/zz-spread-noop.conf"
    c.write(noop, "[Service]\nExecStart=\nExecStart=/bin/true\n")
    units.apply(udir, hosts, [], systemctl=None)
    try:
        c.systemctl("daemon-reload", check=True)
        t0 = time.time()
        c.systemctl("start", *names, check=True)

        def next_elapses() -> dict[str, float] | None:
            # None while a timer that just fell due runs (systemd shows no next elapse then)
            cp = c.systemctl("show", "-pId", "-pNextElapseUSecRealtime", *names)
            got = {
                p["Id"]: units._timestamp(p.get("NextElapseUSecRealtime", ""))
                for p in (dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                          for block in cp.stdout.split("\n\n"))
                if "Id" in p
            }
            return got if len(got) == len(names) and None not in got.values() else None

        due = wait_until("every timer's next elapse", next_elapses, 15, interval=0.2)
    finally:
        c.systemctl("stop", *names)
        units.apply(udir, [], hosts, systemctl=None)
        c.run(["rm", "-f", noop])
        c.run("rmdir /etc/systemd/system/psprobe@.service.d 2>/dev/null; systemctl daemon-reload;"
              " systemctl reset-failed 'psprobe@burst-*' 2>/dev/null")
    for h, name in zip(hosts, names):
        # Each at its phase: systemd's next elapse is the host's second of the 10 minutes.
        assert round(due[name]) % 600 == units.phase(h, 600), name
    # (One that fell due at once is due again 10 minutes later: counted where it was.)
    offsets = sorted((d - t0) % 600 for d in due.values())
    assert offsets[-1] <= 600
    assert offsets[-1] - offsets[0] > 500
    per_10s: dict[int, int] = {}
    for o in offsets:
        per_10s[int(o // 10)] = per_10s.get(int(o // 10), 0) + 1
    print(
        f"200 timers: first runs due {offsets[0]:.0f}..{offsets[-1]:.0f} s after start,"
        f" at most {max(per_10s.values())} in one 10 s window",
        file=sys.stderr,
    )
    assert max(per_10s.values()) <= 12  # about 3.3 expected per 10 s window


def test_enabling_the_sync_timer_enables_one_timer_per_mesh_host(world):
    c = world.c
    assert world.listed_timers() == set()
    c.systemctl("enable", "--now", "psprobe-sync.timer", check=True)
    sync_timer = world.show("psprobe-sync.timer", "ActiveState", "UnitFileState")
    assert sync_timer == {"ActiveState": "active", "UnitFileState": "enabled"}
    # Also= enabled the parent of every psprobe timer; --now started the sync timer only
    # (the target is started by the first sync, which runs at once on a machine up for
    # longer than OnBootSec: inactive or already active here, depending on that).
    assert world.show(units.TARGET, "UnitFileState") == {"UnitFileState": "enabled"}
    # Its first elapse (2 min after boot) brought forward: start what it starts.
    world.sync()
    expected = {timer(h) for h in world.hosts.values()}
    assert world.listed_timers() == expected
    wants = c.path(f"/etc/systemd/system/{units.WANTS}")
    assert {p.name for p in wants.iterdir()} == expected | {"psprobe-sync.timer"}
    for t in expected:
        assert world.show(t, "ActiveState", "PartOf") == {"ActiveState": "active",
                                                           "PartOf": units.TARGET}
    # The sync started the target, which started the timers it wants.
    assert world.show(units.TARGET, "ActiveState")["ActiveState"] == "active"
    assert "sync: ok hosts=4 added=4 removed=0" in c.journal("psprobe-sync.service")


def _ran(world: World, host: str) -> bool:
    return world.show(service(host), "ExecMainExitTimestampMonotonic")[
        "ExecMainExitTimestampMonotonic"
    ] not in ("", "0")


def test_a_firing_timer_runs_collect_and_the_points_arrive(world):
    good = [world.hosts[n] for n in GOOD]
    wait_until("every host timer fired", lambda: all(_ran(world, h) for h in world.hosts.values()), 60)
    for h in good:
        st = world.show(service(h), "Result", "ExecMainStatus", "User")
        assert st == {"Result": "success", "ExecMainStatus": "0", "User": "psprobe"}, h

    def arrived() -> dict[str, int] | None:
        got = world.bus.points_by_source()
        return got if set(got) == set(GOOD) else None

    got = wait_until("points of every good host at the broker", arrived, 30)
    # Every point each archive holds (3 h of them, inside the first-run lookback), once.
    assert got == {name: world.sim.hosts[name].total_points() for name in GOOD}


def test_journal_shows_each_runs_summary(world):
    for name in GOOD:
        host = world.hosts[name]
        text = world.c.journal(service(host))
        assert f"collect {host}: ok series=" in text, text


def test_state_is_written_by_the_service_user(world):
    host = world.hosts[GOOD[0]]
    cp = world.c.run(["stat", "-c", "%U:%G %a", f"/var/lib/psprobe/hosts/{host}/checkpoint.json"])
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split()[0] == "psprobe:psprobe"


def test_a_down_archive_fails_its_own_unit_only(world):
    down = world.hosts[DOWN]
    st = world.show(service(down), "ActiveState", "Result", "ExecMainStatus")
    assert st == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "1"}
    cp = world.c.systemctl("status", "--no-pager", "-n", "20", service(down))
    assert cp.returncode == 3  # LSB "not running" for a failed unit
    assert "Active: failed" in cp.stdout
    assert f"collect {down}: FAILED" in cp.stdout
    # Its timer keeps going (the next run retries), and nobody else is affected.
    assert world.show(timer(down), "ActiveState")["ActiveState"] == "active"
    for name in GOOD:
        assert world.show(service(world.hosts[name]), "Result")["Result"] == "success"
    failed = world.c.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert [line.split()[0] for line in failed.splitlines() if line.strip()] == [service(down)]


def test_a_host_that_leaves_the_mesh_loses_its_timer_at_the_next_sync(world):
    gone = world.hosts[LEFT]
    del world.archives[LEFT]
    world.mesh.doc = meshconfig(world.archives)  # type: ignore[attr-defined]
    world.sync()
    expected = {timer(h) for n, h in world.hosts.items() if n != LEFT}
    assert world.listed_timers() == expected
    assert not world.c.path(f"/etc/systemd/system/{units.WANTS}/{timer(gone)}").exists()
    assert world.show(timer(gone), "ActiveState")["ActiveState"] == "inactive"
    assert f"sync: removed {gone}" in world.c.journal("psprobe-sync.service")


def test_pause_resume_and_status_under_systemd(world):
    """The operator's tools against the real systemd: timers stop and come back, NEXT is systemd's.

    Pause is systemd's state of one unit (tests/system/test_upgrade.py: across a reboot too).
    """
    c = world.c
    running = world.listed_timers()
    assert running
    assert c.run("psprobe pause").returncode == 0
    assert world.listed_timers() == set()
    assert world.show("psprobe-sync.timer", "ActiveState")["ActiveState"] == "inactive"
    assert world.show(units.TARGET, "ActiveState", "UnitFileState") == {
        "ActiveState": "inactive", "UnitFileState": "disabled"}
    st = json.loads(c.run("psprobe status --json").stdout)
    assert st["paused"] is True
    assert c.run("psprobe resume").returncode == 0
    assert world.listed_timers() == running
    assert world.show("psprobe-sync.timer", "ActiveState")["ActiveState"] == "active"
    st = json.loads(c.run("psprobe status --json").stdout)
    assert st["paused"] is False
    nxt = {h["host"]: h["next_run"] for h in st["hosts"] if h["enabled"]}
    assert nxt and all(isinstance(v, (int, float)) for v in nxt.values()), nxt


def test_an_ipv6_archive_runs_under_its_escaped_unit_name(world):
    """psprobe@\\x5b::1\\x5d:PORT.service: %i carries the escaped brackets, collect reads them."""
    with EsmondSim("::1", 0) as sim6:
        host = f"[::1]:{sim6.port}"
        sim6.host(host).add_test("throughput", event_types=["throughput"], step=600,
                                 **{"input-source": "v6.example.org"})
        unit = service(host)
        assert "\\x5b" in unit
        cp = world.c.systemctl("start", unit)
        assert cp.returncode == 0, cp.stderr + world.c.journal(unit, "-n", "20")
        st = world.show(unit, "Result", "ExecMainStatus")
        assert st == {"Result": "success", "ExecMainStatus": "0"}
        assert f"collect {host}: ok" in world.c.journal(unit)
        wait_until("the IPv6 host's points in the broker",
                   lambda: world.bus.points_by_source().get("v6.example.org"), 30)
