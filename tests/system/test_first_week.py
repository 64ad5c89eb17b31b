"""An operator's first week under the real systemd: nothing done by habit silently stops
collection, and ``psprobe status`` says what systemd knows.

A container boots systemd with psprobe installed as the package lays it out; a
mesh on loopback names three hosts.  Their timers are made to fire only after
an hour (a drop-in), so every run here is one the test starts, and nothing
fails unless the test makes it.  Then, as an operator would:

- a host's run fails before it can write its run record (its state directory
  unusable): ``systemctl --failed`` lists it, and ``psprobe status`` too;
- the mesh URL is mistyped: sync fails, every timer stays, ``psprobe status``
  exits 1 naming the mesh; fixed, a host that left is removed;
- ``rm -rf /var/lib/psprobe``: the next sync makes it again (psprobe:psprobe
  0770), and where it cannot, the error names the missing directory.

The tests of this module run in order and share one site.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import pytest

from psprobe import hostnames

from .conftest import BASE_CONFIG
from .container import Container, MeshHandler
from .test_systemd import meshconfig

NAMES = ["fw-1.example.sim", "fw-2.example.sim", "fw-3.example.sim"]
TIMER_DROPIN = "/etc/systemd/system/psprobe@.timer.d/zz-first-week.conf"
# Host timers that do not fire during the test: the runs are the test's own.  Named to
# sort after every other drop-in (sync's per-host schedule included): its empty
# assignment drops every trigger set before it.
TIMER_CONF = """\
[Timer]
OnCalendar=
OnActiveSec=1h
OnUnitInactiveSec=1h
RandomizedDelaySec=0
"""
SYNC_DROPIN = "/etc/systemd/system/psprobe-sync.service.d/zz-first-week.conf"
WANTS = "/etc/systemd/system/psprobe-timers.target.wants"


def timer(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.timer"


def service(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.service"


@dataclass
class Site:
    c: Container
    mesh: ThreadingHTTPServer
    archives: dict[str, str]  # mesh address -> read URL
    hosts: dict[str, str]  # mesh address -> psprobe host

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.mesh.server_address[1]}/mesh.json"

    def configure(self, mesh_url: str) -> None:
        self.c.write("/etc/psprobe/psprobe.conf", f"""\
[collect]
state_dir = /var/lib/psprobe

[mesh]
urls = {mesh_url}
timeout = 5s
retries = 0
""", mode=0o640, owner="root:psprobe")

    def listed_timers(self) -> set[str]:
        """The host timers ``systemctl list-timers`` shows (the running ones)."""
        cp = self.c.systemctl("list-timers", "--no-legend", "psprobe@*")
        return {w for line in cp.stdout.splitlines() for w in line.split() if w.endswith(".timer")}

    def failed_units(self) -> set[str]:
        cp = self.c.systemctl("list-units", "--failed", "--plain", "--no-legend", "psprobe@*")
        return {line.split()[0] for line in cp.stdout.splitlines() if line.strip()}

    def sync(self):
        return self.c.systemctl("start", "psprobe-sync.service")


def _clean(c: Container) -> None:
    """No psprobe timer, failure, drop-in or state left (the container is shared)."""
    c.systemctl("disable", "--now", "psprobe-sync.timer")
    c.run("systemctl stop 'psprobe@*.timer' 'psprobe@*.service'")
    c.run(f"rm -f {WANTS}/psprobe@* {TIMER_DROPIN} {SYNC_DROPIN}")
    # sync's per-host schedule drop-ins (psprobe@<host>.timer.d/), never the template's
    c.run("rm -rf /etc/systemd/system/psprobe@?*.timer.d")
    c.systemctl("daemon-reload", check=True)
    c.run("systemctl reset-failed")
    c.run("rm -rf /var/lib/psprobe && install -d -m 0770 -o psprobe -g psprobe /var/lib/psprobe",
          check=True)


@pytest.fixture(scope="module")
def site(container: Container) -> Iterator[Site]:
    c = container
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]  # nothing listens: no run of these hosts is started by a timer
    s.close()
    mesh = ThreadingHTTPServer(("127.0.0.1", 0), MeshHandler)
    threading.Thread(target=mesh.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    archives = {n: f"http://{n}:{closed}/esmond/perfsonar/archive/" for n in NAMES}
    mesh.doc = meshconfig(archives)  # type: ignore[attr-defined]
    mesh.path = "/mesh.json"  # type: ignore[attr-defined]  (a typo in the URL is a 404)
    site = Site(c, mesh, archives, {n: f"{n}:{closed}" for n in NAMES})
    _clean(c)
    try:
        c.write(TIMER_DROPIN, TIMER_CONF)
        c.systemctl("daemon-reload", check=True)
        site.configure(site.url)
        c.systemctl("enable", "--now", "psprobe-sync.timer", check=True)
        cp = site.sync()
        assert cp.returncode == 0, cp.stderr + c.journal("psprobe-sync.service", "-n", "20")
        assert site.listed_timers() == {timer(h) for h in site.hosts.values()}
        yield site
    finally:
        _clean(c)
        c.write("/etc/psprobe/psprobe.conf", BASE_CONFIG, mode=0o640, owner="root:psprobe")
        mesh.shutdown()
        mesh.server_close()


def test_status_sees_a_run_that_failed_before_it_wrote_its_record(site):
    """Before: systemd listed psprobe@H.service failed while `psprobe status` said
    "pending" and exited 0 (no run record: nothing failed, as far as it read)."""
    c = site.c
    host = site.hosts[NAMES[0]]
    # The host's state directory unusable by the service user: collect stops before any record.
    c.run(["chmod", "000", f"/var/lib/psprobe/hosts/{host}"], check=True)
    try:
        assert c.systemctl("start", service(host)).returncode != 0
    finally:
        c.run(["chmod", "0770", f"/var/lib/psprobe/hosts/{host}"], check=True)
    assert not c.path(f"/var/lib/psprobe/hosts/{host}/history.json").exists()
    assert site.failed_units() == {service(host)}
    st = c.run("psprobe status")
    assert st.returncode == 1, st.stdout + st.stderr
    rows = {ln.split()[0]: ln.split()[1] for ln in st.stdout.splitlines()[1:4]}
    assert rows[host] == "FAILING", st.stdout
    assert re.search(rf"^{re.escape(host)}: systemd: exit status \d+/[A-Z_]+ "
                     r"\(last run \d\d:\d\d UTC\), no run record written$", st.stdout, re.M), st.stdout
    # systemctl --failed and psprobe status agree
    js = json.loads(c.run("psprobe status --json").stdout)
    assert {service(h["host"]) for h in js["hosts"] if h["health"] == "failing"} == site.failed_units()
    c.systemctl("reset-failed", service(host))
    st = c.run("psprobe status")
    assert st.returncode == 0, st.stdout


def test_a_mistyped_mesh_url_keeps_every_timer_and_status_names_the_mesh(site):
    """Before: the typo'd mesh (no last good list) disabled all 3 timers and status exited 0."""
    c = site.c
    before = site.listed_timers()
    assert len(before) == 3
    typo = site.url.replace("/mesh.json", "/mesh.jsno")
    site.configure(typo)
    cp = site.sync()
    assert cp.returncode != 0  # sync exits 1: a mesh failed
    assert site.listed_timers() == before
    journal = c.journal("psprobe-sync.service")
    assert f"3 host(s) would be removed but mesh {typo} failed: keeping them" in journal
    st = c.run("psprobe status")
    assert st.returncode == 1, st.stdout + st.stderr
    assert re.search(rf"^mesh {re.escape(typo)}: FAILED at the last sync .*404", st.stdout, re.M), \
        st.stdout
    js = json.loads(c.run("psprobe status --json").stdout)
    assert js["alarm"] is True and js["failed_meshes"] == [typo]
    dry = c.run("psprobe sync --dry-run")
    assert dry.returncode == 1 and f"FAILED mesh {typo}:" in dry.stdout
    # the URL fixed, the mesh now without fw-3: removal resumes, with every mesh answering
    gone = site.hosts[NAMES[2]]
    site.mesh.doc = meshconfig({n: site.archives[n] for n in NAMES[:2]})  # type: ignore[attr-defined]
    site.configure(site.url)
    cp = site.sync()
    assert cp.returncode == 0, cp.stderr + c.journal("psprobe-sync.service", "-n", "20")
    assert site.listed_timers() == before - {timer(gone)}
    assert f"sync: removed {gone}" in c.journal("psprobe-sync.service")
    c.systemctl("reset-failed", "psprobe-sync.service")
    assert c.run("psprobe status").returncode == 0


def test_a_removed_state_directory_is_made_again_by_the_next_sync(site):
    """Before: `sync: FAILED error=[Errno 30] Read-only file system: '/var/lib/psprobe'`."""
    c = site.c
    timers = site.listed_timers()
    c.run("rm -rf /var/lib/psprobe", check=True)
    cp = site.sync()
    assert cp.returncode == 0, cp.stderr + c.journal("psprobe-sync.service", "-n", "20")
    st = c.run(["stat", "-c", "%U:%G %a", "/var/lib/psprobe"], check=True)
    assert st.stdout.split() == ["psprobe:psprobe", "770"]
    assert c.path("/var/lib/psprobe/sync.json").is_file()
    host = site.hosts[NAMES[0]]
    assert c.path(f"/var/lib/psprobe/hosts/{host}/target.json").is_file()
    # usable by the collector: the service user writes into it
    c.run(["touch", f"/var/lib/psprobe/hosts/{host}/probe"], user="psprobe", check=True)
    assert site.listed_timers() == timers
    # and no warning about node_exporter's directory, which this machine does not have
    assert not c.path("/var/lib/prometheus/node-exporter").exists()
    assert "textfile_dir" not in c.journal("psprobe-sync.service", "-p", "warning")
    # Where it cannot be made (the unit's ExecStartPre= taken away by a drop-in), the
    # error names the missing directory, not just "Read-only file system".
    c.write(SYNC_DROPIN, "[Service]\nExecStartPre=\n")
    c.systemctl("daemon-reload", check=True)
    try:
        c.run("rm -rf /var/lib/psprobe", check=True)
        assert site.sync().returncode != 0
        journal = c.journal("psprobe-sync.service", "-n", "20")
        assert ("sync: FAILED error=state directory /var/lib/psprobe does not exist and cannot "
                "be created here (Read-only file system)") in journal, journal
    finally:
        c.run(f"rm -f {SYNC_DROPIN}")
        c.systemctl("daemon-reload", check=True)
        c.systemctl("reset-failed", "psprobe-sync.service")
    assert site.sync().returncode == 0
    assert c.path("/var/lib/psprobe/sync.json").is_file()
