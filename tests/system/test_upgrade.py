"""An installation of the previous psprobe, upgraded to this one, under the real systemd.

The previous psprobe (the RPM of ``OLD_COMMIT``, or of the commit in
``PSPROBE_OLD_COMMIT``) linked each host's timer and
the sync timer in ``timers.target.wants`` and kept a pause in
``/var/lib/psprobe/paused.json``.  This one links them in
``psprobe-timers.target.wants``, each timer ``PartOf=psprobe-timers.target``: pause is
``systemctl disable --now`` of that one unit.  The RPMs are built as
tests/test_rpm.py builds them (the old one from ``git archive`` of the commit, with
that commit's spec and macros) and installed as tests/system/test_rpm_install.py does
(rpm's scriptlet order, %posttrans included).

A container of its own (it is rebooted): install the old RPM, turn psprobe on, sync
three hosts, upgrade; then the links have moved, no timer was restarted, pause stops
every timer and survives a reboot, a sync while paused starts nothing, resume starts
them all (after a reboot too), and erase leaves nothing behind.  In a second
container, an installation paused before the upgrade stays paused, reboot included.

The tests of this module run in order and share one container.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from test_rpm import MACROS, make_topdir, rpmbuild

from psprobe import hostnames, units

from . import container as ct
from .container import MeshHandler
from .test_rpm_install import UPDATE_HELPER, erase, host_rpm, install, upgrade
from .test_systemd import meshconfig

# The commit before psprobe-timers.target (issue 13), when no session base is given.
OLD_COMMIT = "b1b647af7d58578aad0bcf05eaa23bcaf7eea5de"
NAMES = ["up-1.example.sim", "up-2.example.sim", "up-3.example.sim"]
LATE = "up-4.example.sim"  # joins the mesh while psprobe is paused
ETC = "/etc/systemd/system"
# Runs do nothing (no archive, no broker needed): the timers are what is tested.
NOOP = f"{ETC}/psprobe@.service.d/zz-upgrade-noop.conf"


def timer(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.timer"


def old_commit() -> str:
    return os.environ.get("PSPROBE_OLD_COMMIT") or OLD_COMMIT


@dataclass
class Rpms:
    old: Path
    new: Path


@pytest.fixture(scope="module")
def rpms(tmp_path_factory) -> Rpms:
    for tool in ("rpmbuild", "rpm", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y rpm)")
    root = ct.REPO
    commit = old_commit()
    top = tmp_path_factory.mktemp("rpm-old") / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(root), "show", f"{commit}:{path}"],
                              capture_output=True, text=True, check=True).stdout

    spec, macros = top / "psprobe.spec", top / "el9.macros"
    spec.write_text(show("psprobe.spec"))
    macros.write_text(show("packaging/el9.macros"))
    version = next(line.split('"')[1] for line in show("psprobe/__init__.py").splitlines()
                   if line.startswith("__version__"))
    # What that commit's packaging/make-tarball.sh packs: git archive of the commit.
    subprocess.run(["git", "-C", str(root), "archive", "--format=tar.gz",
                    f"--prefix=psprobe-{version}/", "-o",
                    str(top / "SOURCES" / f"psprobe-{version}.tar.gz"), commit], check=True)
    p = subprocess.run(["rpmbuild", "--load", str(macros), "--define", f"_topdir {top}",
                        "--nodeps", "--define", "dist .el9", "--without", "check", "-bb",
                        str(spec)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (old,) = (top / "RPMS" / "noarch").glob("psprobe-*.noarch.rpm")
    assert MACROS.is_file()
    new_top = make_topdir(tmp_path_factory.mktemp("rpm-new"))
    p = rpmbuild(new_top, "--define", "dist .el9.1", "--without", "check", "-bb")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (new,) = (new_top / "RPMS" / "noarch").glob("psprobe-*.noarch.rpm")
    return Rpms(old, new)


@dataclass
class Site:
    c: ct.Container
    rpms: Rpms
    mesh: ThreadingHTTPServer
    hosts: dict[str, str]  # mesh address -> psprobe host

    def show(self, unit: str, *props: str) -> dict[str, str]:
        cp = self.c.systemctl("show", unit, *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)

    def state(self, *names: str) -> dict[str, str]:
        return {n: self.show(n, "ActiveState")["ActiveState"] for n in names}

    def timers(self, names=None) -> list[str]:
        return [timer(self.hosts[n]) for n in (NAMES if names is None else names)]

    def links(self, d: str) -> set[str]:
        p = self.c.path(f"{ETC}/{d}")
        return {e.name for e in p.iterdir() if e.is_symlink() and e.name.startswith("psprobe")} \
            if p.is_dir() else set()

    def set_mesh(self, names: list[str]) -> None:
        archives = {n: f"http://{n}:1/esmond/perfsonar/archive/" for n in names}
        self.mesh.doc = meshconfig(archives)  # type: ignore[attr-defined]

    def sync(self) -> None:
        cp = self.c.systemctl("start", "psprobe-sync.service")
        assert cp.returncode == 0, cp.stderr + self.c.journal("psprobe-sync.service", "-n", "30")

    def status(self) -> dict:
        cp = self.c.run("psprobe status --json")
        return json.loads(cp.stdout)


@contextlib.contextmanager
def _site(system_root: Path, rpms: Rpms) -> Iterator[Site]:
    """A container of its own with the mesh of NAMES on loopback; nothing installed yet."""
    mesh = ThreadingHTTPServer(("127.0.0.1", 0), MeshHandler)
    threading.Thread(target=mesh.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with ct.booted(system_root) as c:
            c.write("/usr/lib/systemd/systemd-update-helper", UPDATE_HELPER, mode=0o755)
            c.run(["mkdir", "-p", "/var/lib/rpm"], check=True)
            s = Site(c, rpms, mesh, {n: f"{n}:1" for n in [*NAMES, LATE]})
            s.set_mesh(NAMES)
            yield s
    finally:
        mesh.shutdown()
        mesh.server_close()


def _old_psprobe_on(site: Site) -> None:
    """The old RPM installed, configured and turned on as its README said; one sync done."""
    c = site.c
    install(c, site.rpms.old)
    (sitelib,) = [p for p in host_rpm(c, "-ql", "psprobe").split()
                  if p.endswith("/psprobe") and "/site-packages/" in p]
    # Debian's python3 does not read EL's site-packages: point it there (test only).
    c.write("/usr/lib/python3/dist-packages/el-sitelib.pth", str(Path(sitelib).parent) + "\n")
    c.write("/etc/psprobe/psprobe.conf", f"""\
[collect]
state_dir = /var/lib/psprobe

[mesh]
urls = http://127.0.0.1:{site.mesh.server_address[1]}/mesh.json
timeout = 5s
retries = 0
""", mode=0o640, owner="root:psprobe")
    c.write(NOOP, "[Service]\nExecStart=\nExecStart=/bin/true\n")
    c.systemctl("daemon-reload", check=True)
    c.systemctl("enable", "--now", "psprobe-sync.timer", check=True)
    site.sync()


@pytest.fixture(scope="module")
def site(system_root: Path, rpms: Rpms) -> Iterator[Site]:
    with _site(system_root, rpms) as s:
        yield s


@pytest.fixture(scope="module")
def paused_site(system_root: Path, rpms: Rpms) -> Iterator[Site]:
    with _site(system_root, rpms) as s:
        yield s


def test_the_old_psprobe_links_its_timers_in_timers_target_wants(site):
    _old_psprobe_on(site)
    assert site.links("timers.target.wants") == {"psprobe-sync.timer", *site.timers()}
    assert site.links("psprobe-timers.target.wants") == set()
    assert set(site.state(*site.timers(), "psprobe-sync.timer").values()) == {"active"}


def test_upgrade_moves_the_links_under_the_parent_and_restarts_no_host_timer(site):
    c = site.c
    props = ("ActiveState", "ActiveEnterTimestampMonotonic")
    before = {t: site.show(t, *props) for t in site.timers()}
    upgrade(c, site.rpms.old, site.rpms.new)

    assert site.links("timers.target.wants") == {units.TARGET}
    assert site.links("psprobe-timers.target.wants") == {"psprobe-sync.timer", *site.timers()}
    # Still running, never restarted (same activation time), and each now PartOf the parent.
    assert {t: site.show(t, *props) for t in site.timers()} == before
    for t in [*site.timers(), "psprobe-sync.timer"]:
        got = site.show(t, "PartOf", "UnitFileState")
        assert got == {"PartOf": units.TARGET, "UnitFileState": "enabled"}, t
    assert site.show(units.TARGET, "ActiveState", "UnitFileState") == {
        "ActiveState": "active", "UnitFileState": "enabled"}
    assert site.show("psprobe-sync.timer", "ActiveState") == {"ActiveState": "active"}
    assert site.status()["paused"] is False
    # Done once: the command the package ran finds nothing more to move.
    cp = c.run("psprobe migrate-units")
    assert cp.returncode == 0 and "now under" not in cp.stderr, cp.stderr


def test_pause_stops_every_timer_and_a_reboot_brings_none_back(site):
    c = site.c
    cp = c.run("psprobe pause")
    assert cp.returncode == 0, cp.stderr
    everything = [*site.timers(), "psprobe-sync.timer", units.TARGET]
    assert set(site.state(*everything).values()) == {"inactive"}
    assert site.show(units.TARGET, "UnitFileState") == {"UnitFileState": "disabled"}
    # The pause is systemd's own state: the links stay, nothing is written beside them.
    assert site.links("psprobe-timers.target.wants") == {"psprobe-sync.timer", *site.timers()}
    assert not c.path("/var/lib/psprobe/paused.json").exists()
    st = site.status()
    assert site.status()["paused"] is True
    assert c.run("psprobe status").stdout.startswith("PAUSED: ")

    assert c.reboot() in ("running", "degraded")
    assert set(site.state(*everything).values()) == {"inactive"}
    st = site.status()
    assert st["paused"] is True
    assert {h["timer"] for h in st["hosts"] if h["enabled"]} == {"paused"}


def test_a_sync_while_paused_enables_a_new_host_but_starts_nothing(site):
    site.set_mesh([*NAMES, LATE])
    site.sync()  # by hand: the sync timer is stopped
    late = timer(site.hosts[LATE])
    assert late in site.links("psprobe-timers.target.wants")
    assert set(site.state(*site.timers([*NAMES, LATE]), "psprobe-sync.timer").values()) \
        == {"inactive"}


def test_resume_starts_every_timer_and_so_does_the_next_boot(site):
    c = site.c
    cp = c.run("psprobe resume")
    assert cp.returncode == 0, cp.stderr
    everything = [*site.timers([*NAMES, LATE]), "psprobe-sync.timer", units.TARGET]
    assert set(site.state(*everything).values()) == {"active"}
    assert site.status()["paused"] is False
    assert c.reboot() in ("running", "degraded")
    assert set(site.state(*everything).values()) == {"active"}


def test_erase_leaves_no_link_and_no_timer(site):
    c = site.c
    erase(c, site.rpms.new)
    assert not c.path(f"{ETC}/psprobe-timers.target.wants").exists()
    cp = c.run(f"find {ETC} -type l -name 'psprobe*'")
    assert cp.stdout == "", cp.stdout
    cp = c.systemctl("list-timers", "--all", "--no-legend", "psprobe*")
    assert cp.stdout.strip() == "", cp.stdout
    c.run(["rm", "-rf", NOOP.rsplit("/", 1)[0]])


def test_an_installation_paused_before_the_upgrade_stays_paused_across_a_reboot(paused_site):
    """The old pause (paused.json, timers stopped) becomes the disabled target."""
    site, c = paused_site, paused_site.c
    _old_psprobe_on(site)
    assert c.run("psprobe pause").returncode == 0  # the old one: a marker, the timers stopped
    assert c.path("/var/lib/psprobe/paused.json").is_file()
    everything = [*site.timers(), "psprobe-sync.timer", units.TARGET]
    assert set(site.state(*everything).values()) == {"inactive"}

    upgrade(c, site.rpms.old, site.rpms.new)
    assert site.links("timers.target.wants") == set()  # the target is not enabled
    assert site.links("psprobe-timers.target.wants") == {"psprobe-sync.timer", *site.timers()}
    assert not c.path("/var/lib/psprobe/paused.json").exists()
    # Nothing started: not the host timers, not the sync timer the upgrade marked for restart.
    assert set(site.state(*everything).values()) == {"inactive"}
    assert site.status()["paused"] is True
    assert c.reboot() in ("running", "degraded")
    assert set(site.state(*everything).values()) == {"inactive"}
    assert c.run("psprobe resume").returncode == 0
    assert set(site.state(*everything).values()) == {"active"}
