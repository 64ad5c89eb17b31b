"""The RPM on a running systemd: install, enable, sync, collect, upgrade, erase.

The container is Debian (no rpm, no EL9 systemd-update-helper), so each rpm
transaction is carried out the way rpm would on EL9, in rpm's order:

- the package's own scriptlets (``rpm -qp --qf %{PREIN}`` ...) run INSIDE the
  running container with rpm's ``$1``;
- the payload is laid down by the host's rpm into the container's root
  (``rpm -i/-U/-e --root ROOT --noscripts --notriggers``), owners and modes as
  the package says;
- ``systemd-update-helper`` (which EL9's %systemd_* scriptlets and systemd's own
  rpm file triggers call) is a small stand-in doing what EL9's does, and the
  file triggers' calls (reload, restart of marked units) are made where rpm makes them.

The tests of this module run in order and share one container.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from esmond_sim import EsmondSim  # tests/ is on sys.path (tests/conftest.py)
from test_rpm import make_topdir, rpmbuild

from psprobe import hostnames

from .container import Container, wait_until
from .test_systemd import TIMER_DROPIN, Bus, _MeshHandler, meshconfig

HOSTS = ["ps-rpm-a.example.sim", "ps-rpm-b.example.sim"]
DBPATH = "/var/lib/rpm"

# What EL9's /usr/lib/systemd/systemd-update-helper (systemd 252) does for the verbs
# used by the %systemd_* scriptlets and systemd's rpm file triggers. Each call is logged.
UPDATE_HELPER = """\
#!/bin/bash
set -eu
echo "$*" >>/run/update-helper.log
verb=$1
shift
case $verb in
    install-system-units) systemctl --no-reload preset "$@" ;;
    remove-system-units)
        if [ -d /run/systemd/system ]; then
            systemctl --no-reload disable --now "$@"
        else
            systemctl --no-reload disable "$@"
        fi ;;
    mark-restart-system-units)
        [ -d /run/systemd/system ] || exit 0
        for unit in "$@"; do systemctl set-property "$unit" Markers=+needs-restart; done ;;
    system-reload-restart) systemctl daemon-reload; systemctl reload-or-restart --marked ;;
    system-reload) systemctl daemon-reload ;;
    *) echo "unknown verb $verb" >&2; exit 3 ;;
esac
"""


def timer(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.timer"


def service(host: str) -> str:
    return f"psprobe@{hostnames.unit_instance(host)}.service"


def host_rpm(c: Container, *args: str) -> str:
    """The host's rpm acting on the container's root (its own database there)."""
    cmd = ["rpm", "--root", str(c.root), "--dbpath", DBPATH, *args]
    cp = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert cp.returncode == 0, f"{cmd}: {cp.stdout}{cp.stderr}"
    return cp.stdout


def scriptlet(pkg: Path, tag: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", "--qf", f"%{{{tag}}}", str(pkg)], capture_output=True, text=True, check=True
    ).stdout


def run_scriptlet(c: Container, pkg: Path, tag: str, arg: int) -> None:
    """Run one scriptlet of ``pkg`` inside the running container, as rpm does (sh, $1)."""
    text = scriptlet(pkg, tag)
    cp = c.run(["sh", "-c", text, tag, str(arg)])
    assert cp.returncode == 0, f"%{tag} ({arg}) failed: {cp.stdout}{cp.stderr}"


def install(c: Container, pkg: Path) -> None:
    """rpm -i on EL9: %pre 1, payload, %post 1, file trigger (reload + restart marked)."""
    run_scriptlet(c, pkg, "PREIN", 1)
    host_rpm(c, "-i", "--nodeps", "--noscripts", "--notriggers", str(pkg))
    run_scriptlet(c, pkg, "POSTIN", 1)
    c.run(["/usr/lib/systemd/systemd-update-helper", "system-reload-restart"], check=True)


def upgrade(c: Container, old: Path, new: Path) -> None:
    """rpm -U on EL9: new %pre 2, new payload, new %post 2, old %preun 1, old %postun 1,
    then the file triggers."""
    run_scriptlet(c, new, "PREIN", 2)
    host_rpm(c, "-U", "--nodeps", "--noscripts", "--notriggers", str(new))
    run_scriptlet(c, new, "POSTIN", 2)
    run_scriptlet(c, old, "PREUN", 1)
    run_scriptlet(c, old, "POSTUN", 1)
    c.run(["/usr/lib/systemd/systemd-update-helper", "system-reload-restart"], check=True)


def erase(c: Container, pkg: Path) -> None:
    """rpm -e on EL9: %preun 0, files removed, %postun 0, file trigger (reload)."""
    run_scriptlet(c, pkg, "PREUN", 0)
    host_rpm(c, "-e", "--nodeps", "--noscripts", "--notriggers", "psprobe")
    run_scriptlet(c, pkg, "POSTUN", 0)
    c.run(["/usr/lib/systemd/systemd-update-helper", "system-reload"], check=True)


@dataclass
class Rpms:
    first: Path
    update: Path  # same code, a newer release


@pytest.fixture(scope="module")
def rpms(tmp_path_factory) -> Rpms:
    for tool in ("rpmbuild", "rpm", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y rpm)")
    top = make_topdir(tmp_path_factory.mktemp("rpm"))
    built = []
    for dist in (".el9", ".el9.1"):
        p = rpmbuild(top, "--define", f"dist {dist}", "--without", "check", "-bb")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        built.append(next((top / "RPMS" / "noarch").glob(f"psprobe-*{dist}.noarch.rpm")))
    return Rpms(*built)


@dataclass
class World:
    c: Container
    rpms: Rpms
    sim: EsmondSim
    bus: Bus
    hosts: dict[str, str]  # mesh address -> psprobe host
    mesh_url: str

    def show(self, unit: str, *props: str) -> dict[str, str]:
        cp = self.c.systemctl("show", unit, *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)

    def active_timers(self) -> set[str]:
        cp = self.c.systemctl("list-timers", "--no-legend", "psprobe*")
        return {w for line in cp.stdout.splitlines() for w in line.split() if w.endswith(".timer")}

    def psprobe_links(self) -> set[str]:
        cp = self.c.run("find /etc/systemd/system -type l -name 'psprobe*'")
        return set(cp.stdout.split())


@pytest.fixture(scope="module")
def world(bare_container: Container, rpms: Rpms) -> Iterator[World]:
    c = bare_container
    sim = EsmondSim("127.0.0.1", 0).start()
    mesh = ThreadingHTTPServer(("127.0.0.1", 0), _MeshHandler)
    threading.Thread(target=mesh.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    bus = Bus()
    try:
        now = int(time.time())
        archives = {}
        for name in HOSTS:
            sim.host(name).add_test(
                "throughput", event_types=["throughput"], start=now - 3600, step=600, **{"input-source": name}
            )
            archives[name] = f"http://{name}:{sim.port}/esmond/perfsonar/archive/"
        mesh.doc = meshconfig(archives)  # type: ignore[attr-defined]
        with open(c.path("/etc/hosts"), "a") as f:
            f.write(f"127.0.0.1 {' '.join(HOSTS)}\n")
        c.write("/usr/lib/systemd/systemd-update-helper", UPDATE_HELPER, mode=0o755)
        c.run(["mkdir", "-p", "/var/lib/rpm"], check=True)
        yield World(
            c,
            rpms,
            sim,
            bus,
            {n: f"{n}:{sim.port}" for n in HOSTS},
            f"http://127.0.0.1:{mesh.server_address[1]}/mesh.json",
        )
    finally:
        bus.close()
        mesh.shutdown()
        mesh.server_close()
        sim.stop()


def test_install_creates_the_account_and_leaves_collection_off(world):
    c = world.c
    install(c, world.rpms.first)
    assert c.run(["getent", "passwd", "psprobe"]).stdout.split(":")[5] == "/var/lib/psprobe"
    # Owners and modes on disk are exactly the package's (and nothing is missing).
    assert host_rpm(c, "-V", "--nodeps", "--noscripts", "psprobe") == ""
    st = c.run(["stat", "-c", "%a %U:%G", "/etc/psprobe/broker.secret", "/var/lib/psprobe"])
    assert st.stdout.split("\n")[:2] == ["640 root:psprobe", "770 psprobe:psprobe"]
    # The preset kept everything off.
    for unit in ("psprobe-sync.timer", "psprobe-report.timer"):
        assert world.show(unit, "UnitFileState", "ActiveState") == {
            "UnitFileState": "disabled",
            "ActiveState": "inactive",
        }, unit
    assert world.active_timers() == set()
    log = c.run(["cat", "/run/update-helper.log"]).stdout
    assert "install-system-units psprobe-sync.timer psprobe-report.timer" in log

    # Debian's python3 does not read EL's site-packages: point it there (test only).
    (sitelib,) = [
        p for p in host_rpm(c, "-ql", "psprobe").split() if p.endswith("/psprobe") and "/site-packages/" in p
    ]
    c.write("/usr/lib/python3/dist-packages/el-sitelib.pth", str(Path(sitelib).parent) + "\n")
    assert c.run(["psprobe", "--help"]).returncode == 0


def test_enabling_sync_enables_one_timer_per_host_and_collect_runs_as_psprobe(world):
    c = world.c
    # The operator's part (README): the broker password, the config, enable the sync.
    c.run("printf 'guest\\n' >/etc/psprobe/broker.secret", check=True)
    c.write(
        "/etc/psprobe/psprobe.conf",
        f"""\
[collect]
state_dir = /var/lib/psprobe

[mesh]
urls = {world.mesh_url}
timeout = 5s
retries = 0

[archive]
timeout = 5s
retries = 0

[broker]
url = amqp://guest@127.0.0.1:5672/%2F
password_file = /etc/psprobe/broker.secret
exchange = {world.bus.exchange}
""",
    )
    c.write("/etc/systemd/system/psprobe@.timer.d/test.conf", TIMER_DROPIN)
    c.systemctl("daemon-reload", check=True)
    c.systemctl("enable", "--now", "psprobe-sync.timer", check=True)
    # The timer's first elapse brought forward.
    cp = c.systemctl("start", "psprobe-sync.service")
    assert cp.returncode == 0, c.journal("psprobe-sync.service", "-n", "30")

    expected = {timer(h) for h in world.hosts.values()}
    assert world.active_timers() == expected | {"psprobe-sync.timer"}

    def ran() -> bool:
        return all(
            world.show(service(h), "Result", "ExecMainExitTimestampMonotonic").get(
                "ExecMainExitTimestampMonotonic", "0"
            )
            not in ("", "0")
            for h in world.hosts.values()
        )

    wait_until("every host's collect ran", ran, 60)
    for h in world.hosts.values():
        assert world.show(service(h), "Result", "User") == {"Result": "success", "User": "psprobe"}, h
        cp = c.run(["stat", "-c", "%U", f"/var/lib/psprobe/hosts/{h}/checkpoint.json"])
        assert cp.stdout.strip() == "psprobe", cp.stderr

    def arrived() -> set[str] | None:
        got = {b["meta"]["input_source"] for b in world.bus.take()}
        return got if got == set(HOSTS) else None

    wait_until("points at the broker", arrived, 30)


def test_upgrade_keeps_timers_running_state_and_secret(world):
    c = world.c
    hosts = list(world.hosts.values())
    props = ("ActiveState", "UnitFileState", "ActiveEnterTimestampMonotonic")
    before = {timer(h): world.show(timer(h), *props) for h in hosts}
    checkpoint = f"/var/lib/psprobe/hosts/{hosts[0]}/checkpoint.json"
    state_before = c.run(["cat", checkpoint], check=True).stdout
    sync_before = world.show("psprobe-sync.timer", *props)

    upgrade(c, world.rpms.first, world.rpms.update)

    assert host_rpm(c, "-q", "psprobe").strip() == world.rpms.update.name.removesuffix(".rpm")
    # Per-host timers: still enabled, never restarted (same activation time).
    assert {timer(h): world.show(timer(h), *props) for h in hosts} == before
    # The sync timer was restarted (a changed schedule applies) and stays enabled.
    sync_after = world.show("psprobe-sync.timer", *props)
    assert sync_after["ActiveState"] == "active" and sync_after["UnitFileState"] == "enabled"
    assert sync_after["ActiveEnterTimestampMonotonic"] != sync_before["ActiveEnterTimestampMonotonic"]
    # A marked timer that was not running is not started by the upgrade.
    assert world.show("psprobe-report.timer", "ActiveState") == {"ActiveState": "inactive"}
    assert c.run(["cat", checkpoint], check=True).stdout == state_before
    assert c.run(["cat", "/etc/psprobe/broker.secret"]).stdout == "guest\n"
    assert "password_file" in c.run(["cat", "/etc/psprobe/psprobe.conf"]).stdout


def test_erase_leaves_no_psprobe_unit_enabled_or_running(world):
    c = world.c
    assert world.psprobe_links()  # sync's enablement is there before
    erase(c, world.rpms.update)

    assert world.psprobe_links() == set(), "dangling enablement symlinks"
    assert world.active_timers() == set()
    cp = c.systemctl("list-units", "--all", "--plain", "--no-legend", "psprobe*")
    running = [line for line in cp.stdout.splitlines() if " active " in f" {line} "]
    assert running == [], cp.stdout
    assert c.systemctl("list-unit-files", "--no-legend", "psprobe*").stdout.strip() == ""
    assert host_rpm(c, "-qa").strip() == ""
    # State is the operator's to delete: checkpoints survive an erase.
    assert c.run(["test", "-d", "/var/lib/psprobe/hosts"]).returncode == 0
    print(json.dumps(c.run(["cat", "/run/update-helper.log"]).stdout.splitlines()), file=sys.stderr)
