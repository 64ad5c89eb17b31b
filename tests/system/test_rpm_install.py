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
import os
import re
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
from test_rpm import build_requires, check_script, make_topdir, rpmbuild, version

from psprobe import hostnames
from psprobe.exits import SYSTEMD, Exit

from .container import Container, MeshHandler, wait_until
from .test_systemd import TIMER_DROPIN, Bus, meshconfig

HOSTS = ["ps-rpm-a.example.sim", "ps-rpm-b.example.sim"]
README = Path(__file__).resolve().parents[2] / "README.md"
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


def posttrans(c: Container, pkg: Path) -> None:
    """%posttrans, when ``pkg`` has one: after every other scriptlet of the transaction, before
    the transaction file triggers (rpm's lib/transaction.c runs them in that order)."""
    if scriptlet(pkg, "POSTTRANS") not in ("", "(none)"):
        run_scriptlet(c, pkg, "POSTTRANS", 0)


def install(c: Container, pkg: Path) -> None:
    """rpm -i on EL9: %pre 1, payload, %post 1, %posttrans, file trigger (reload + restart
    marked)."""
    run_scriptlet(c, pkg, "PREIN", 1)
    host_rpm(c, "-i", "--nodeps", "--noscripts", "--notriggers", str(pkg))
    run_scriptlet(c, pkg, "POSTIN", 1)
    posttrans(c, pkg)
    c.run(["/usr/lib/systemd/systemd-update-helper", "system-reload-restart"], check=True)


def upgrade(c: Container, old: Path, new: Path) -> None:
    """rpm -U on EL9: new %pre 2, new payload, new %post 2, old %preun 1, old %postun 1,
    new %posttrans, then the file triggers."""
    run_scriptlet(c, new, "PREIN", 2)
    host_rpm(c, "-U", "--nodeps", "--noscripts", "--notriggers", str(new))
    run_scriptlet(c, new, "POSTIN", 2)
    run_scriptlet(c, old, "PREUN", 1)
    run_scriptlet(c, old, "POSTUN", 1)
    posttrans(c, new)
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
def topdir(tmp_path_factory) -> Path:
    """An rpmbuild tree with Source0 made from this work tree."""
    for tool in ("rpmbuild", "rpm", "rpmspec", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y rpm)")
    return make_topdir(tmp_path_factory.mktemp("rpm"))


@pytest.fixture(scope="module")
def rpms(topdir: Path) -> Rpms:
    top = topdir
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
    mesh = ThreadingHTTPServer(("127.0.0.1", 0), MeshHandler)
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


# Debian's package for each BuildRequires of the EL9 build; None: nothing to add (Debian's
# python3 is there; the container's systemd stands for the macros).
DEBIAN = {"python3-devel": None, "systemd-rpm-macros": None, "systemd": None}


def test_check_passes_with_only_the_build_requires(bare_container, topdir):
    """%check as a clean EL9 build host runs it: the source tarball, a build user that is not
    root (mock's), and a Python with the BuildRequires only. The container's python3 has
    Debian's minbase plus python3-pika, -requests and -click (prepare.sh), all three
    BuildRequires; the rest of them is installed here by their Debian names."""
    c = bare_container
    wanted = []
    for name in sorted(build_requires("9")):
        if name in DEBIAN:
            if DEBIAN[name]:
                wanted.append(DEBIAN[name])
        else:
            assert name.startswith("python3-"), f"BuildRequires {name}: add its Debian name to DEBIAN"
            wanted.append(name)
    cp = c.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
               f"--no-install-recommends {' '.join(wanted)}", timeout=600)
    if cp.returncode != 0:
        why = f"apt-get install {' '.join(wanted)} in the container failed: {cp.stderr[-500:]}"
        if os.environ.get("PSPROBE_REQUIRE_SYSTEM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    # mock's chroot has an /etc/hosts naming localhost; the bare container has none.
    c.run("grep -qw localhost /etc/hosts 2>/dev/null || echo '127.0.0.1 localhost' >>/etc/hosts",
          check=True)
    (tarball,) = (topdir / "SOURCES").glob("psprobe-*.tar.gz")
    shutil.copy(tarball, c.path("/srv/psprobe.tar.gz"))
    c.run("id builder || useradd -m builder; rm -rf /builddir; install -d -o builder /builddir",
          check=True)
    c.run(["tar", "-xzf", "/srv/psprobe.tar.gz", "-C", "/builddir"], user="builder", check=True)
    script = check_script("9")
    assert "/usr/bin/python3 -m pytest" in script, script  # %{python3}: EL9's and Debian's alike
    cp = c.run(["sh", "-ec", f"cd /builddir/psprobe-{version()}\n{script}"], user="builder",
               timeout=900)
    tail = cp.stdout[-8000:] + cp.stderr[-2000:]
    print(tail.strip().splitlines()[-1], file=sys.stderr)
    assert cp.returncode == 0, tail
    assert re.search(r"\d+ passed", cp.stdout) and " error" not in cp.stdout.splitlines()[-1], tail


def test_install_creates_the_account_and_leaves_collection_off(world):
    c = world.c
    install(c, world.rpms.first)
    assert c.run(["getent", "passwd", "psprobe"]).stdout.split(":")[5] == "/var/lib/psprobe"
    # Owners and modes on disk are exactly the package's (and nothing is missing).
    assert host_rpm(c, "-V", "--nodeps", "--noscripts", "psprobe") == ""
    st = c.run(["stat", "-c", "%a %U:%G", "/etc/psprobe/broker.secret", "/var/lib/psprobe"])
    assert st.stdout.split("\n")[:2] == ["640 root:psprobe", "770 psprobe:psprobe"]
    # The preset kept everything off.
    for unit in ("psprobe-sync.timer", "psprobe-timers.target", "psprobe-report.timer"):
        assert world.show(unit, "UnitFileState", "ActiveState") == {
            "UnitFileState": "disabled",
            "ActiveState": "inactive",
        }, unit
    assert world.active_timers() == set()
    log = c.run(["cat", "/run/update-helper.log"]).stdout
    assert "install-system-units psprobe-sync.timer psprobe-timers.target psprobe-report.timer" \
        in log

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


def test_a_host_run_by_hand_as_root_then_by_its_timer(world):
    """README "Test one host by hand": root's run becomes psprobe, so the timer's next run works
    (before: root-owned checkpoint and history, and every timer run failed with exit 4)."""
    c = world.c
    h = world.hosts[HOSTS[0]]
    world.sim.host(HOSTS[0]).add_test("throughput", event_types=["throughput"],
                                       start=int(time.time()) - 1800, step=300,
                                       **{"input-source": HOSTS[0], "input-destination": "b"})
    cp = c.run(["psprobe", "collect", "--dry-run", h])
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr.splitlines()[0] == "running as psprobe, the owner of /var/lib/psprobe", cp.stderr
    assert cp.stdout.strip(), "the dry run printed no message"
    cp = c.run(["psprobe", "collect", h])
    assert cp.returncode == 0, cp.stderr
    lines = cp.stderr.splitlines()
    assert lines[0] == "running as psprobe, the owner of /var/lib/psprobe", cp.stderr
    assert any(f"collect {h}: ok " in x and " points=0 " not in x for x in lines), cp.stderr
    assert not any(re.match(r"<\d>", x) for x in lines), "a pipe is not the journal: no <N>"
    d = f"/var/lib/psprobe/hosts/{h}"
    # target.json is sync's (root, group psprobe); everything else the collects', and psprobe's
    cp = c.run(f"find {d} /run/psprobe -mindepth 1 ! -user psprobe ! -path {d}/target.json "
               "-printf '%u:%g %p\\n'")
    assert cp.stdout == "", cp.stdout
    cp = c.run(["stat", "-c", "%n %U:%G", *(f"{d}/{f}" for f in (
        "lock", "checkpoint.json", "checkpoint.prev.json", "history.json"))], check=True)
    assert {line.split()[1] for line in cp.stdout.splitlines()} == {"psprobe:psprobe"}, cp.stdout
    st = world.show(service(h), "InvocationID")
    assert c.systemctl("start", service(h)).returncode == 0, c.journal(service(h), "-n", "20")
    after = world.show(service(h), "Result", "ExecMainStatus", "InvocationID")
    assert after["InvocationID"] != st["InvocationID"]
    assert (after["Result"], after["ExecMainStatus"]) == ("success", "0")


def test_a_failed_run_reads_well_in_systemctl_status(world):
    """The journal line a failed run leaves names its status (69/UNAVAILABLE, not
    3/NOTIMPLEMENTED), and psprobe's own lines carry their priority there."""
    c = world.c
    cp = c.run(["systemd-analyze", "exit-status", *(str(int(e)) for e in Exit if e != Exit.STOPPED)])
    assert cp.returncode == 0, cp.stderr
    names = {int(v): n for n, v, _ in (line.split() for line in cp.stdout.splitlines()[1:])}
    assert {e: f"{int(e)}/{names[int(e)]}" for e in Exit if e != Exit.STOPPED} == {
        e: v for e, v in SYSTEMD.items() if e != Exit.STOPPED}

    h = world.hosts[HOSTS[1]]
    c.write("/etc/psprobe/conf.d/50-broker-down.conf",
            "[broker]\nurl = amqp://guest@127.0.0.1:1/%2F\ntimeout = 2s\n")
    world.sim.host(HOSTS[1]).add_test("throughput", event_types=["throughput"],
                                       start=int(time.time()) - 1800, step=300,
                                       **{"input-source": HOSTS[1], "input-destination": "c"})
    try:
        assert c.systemctl("start", service(h)).returncode != 0
        st = world.show(service(h), "Result", "ExecMainStatus")
        assert st == {"Result": "exit-code", "ExecMainStatus": str(int(Exit.BROKER))}
        text = c.systemctl("status", "--no-pager", "-n", "20", service(h)).stdout
        assert "code=exited, status=69/UNAVAILABLE" in text, text
        errors = c.journal(service(h), "-p", "err", "-n", "20")
        assert f"collect {h}: FAILED" in errors and "<3>" not in errors, errors
    finally:
        c.run(["rm", "-f", "/etc/psprobe/conf.d/50-broker-down.conf"], check=True)
        c.systemctl("reset-failed", service(h))
    assert c.systemctl("start", service(h)).returncode == 0, c.journal(service(h), "-n", "20")


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
    # What README "Remove" says stays in /etc: the changed files as .rpmsave, the password too.
    left = c.run("cd /etc/psprobe && find . -mindepth 1 -printf '%P %u:%g %m\\n' | sort").stdout
    assert left.splitlines() == ["broker.secret.rpmsave root:psprobe 640",
                                 "psprobe.conf.rpmsave root:root 644"], left
    assert c.run(["cat", "/etc/psprobe/broker.secret.rpmsave"]).stdout == "guest\n"
    remove = README.read_text().split("### Remove", 1)[1].split("\n### ", 1)[0]
    (cmd,) = re.findall(r"^```sh\n(.*?)^```", remove, re.M | re.S)
    assert "broker.secret.rpmsave" in cmd
    c.run(cmd, check=True)  # the README's command, as the operator runs it
    assert c.run(["ls", "/etc/psprobe"]).stdout.split() == ["psprobe.conf.rpmsave"]
    print(json.dumps(c.run(["cat", "/run/update-helper.log"]).stdout.splitlines()), file=sys.stderr)
