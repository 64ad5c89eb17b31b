"""The RPM itself: built from this working tree, linted, and inspected as rpm sees it.

The package is built the way tests/../psprobe.spec says (Source0 from
packaging/make-tarball.sh, here in --worktree mode so uncommitted work is packaged),
with packaging/el9.macros standing in for the EL9 systemd/python macros Debian's rpm
lacks. The scriptlets are then RUN (in a private mount namespace, with systemctl and
EL9's systemd-update-helper replaced by recorders) to show what install, upgrade and
erase do to /etc/systemd/system.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.rpm

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "psprobe.spec"
MACROS = ROOT / "packaging" / "el9.macros"
RPMLINTRC = ROOT / "packaging" / "psprobe.rpmlintrc"
HELPER = "/usr/lib/systemd/systemd-update-helper"
UNITDIR = "/usr/lib/systemd/system"


def run(*cmd: str | Path, **kw) -> subprocess.CompletedProcess:
    """Run a command, text in/out; raise with its output when it fails."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def version() -> str:
    text = (ROOT / "psprobe" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


@dataclass
class Built:
    rpm: Path
    srpm: Path
    topdir: Path


def rpmbuild(topdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """rpmbuild with the EL9 macros; --nodeps: Debian's rpm database knows no BuildRequires."""
    return subprocess.run(
        ["rpmbuild", "--load", str(MACROS), "--define", f"_topdir {topdir}", "--nodeps",
         *extra, str(SPEC)],
        capture_output=True, text=True, cwd=ROOT,
    )


def make_topdir(base: Path) -> Path:
    top = base / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    out = run(ROOT / "packaging" / "make-tarball.sh", "--worktree", top / "SOURCES").stdout
    tarball = Path(out.strip().splitlines()[-1])
    assert tarball.name == f"psprobe-{version()}.tar.gz"
    return top


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    for tool in ("rpmbuild", "rpm", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y rpm rpmlint)")
    top = make_topdir(tmp_path_factory.mktemp("rpm"))
    p = rpmbuild(top, "--without", "check", "-ba")
    assert p.returncode == 0, f"rpmbuild failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    (rpm,) = (top / "RPMS" / "noarch").glob("psprobe-*.noarch.rpm")
    (srpm,) = (top / "SRPMS").glob("psprobe-*.src.rpm")
    return Built(rpm, srpm, top)


def qf(pkg: Path, fmt: str) -> str:
    return run("rpm", "-qp", "--qf", fmt, pkg).stdout


@dataclass
class Entry:
    mode: int
    user: str
    group: str
    flags: str


@pytest.fixture(scope="module")
def files(built) -> dict[str, Entry]:
    out = qf(built.rpm, "[%{FILEMODES} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags}"
                        " %{FILENAMES}\n]")
    entries = {}
    for line in out.splitlines():
        mode, user, group, rest = line.split(" ", 3)
        # fflags is empty for a plain file: "<flags> <path>" or " <path>".
        flags, _, path = rest.rpartition(" ")
        entries[path] = Entry(int(mode), user, group, flags.strip())
    return entries


def test_spec_version_is_the_package_version():
    spec_version = re.search(r"^Version:\s*(\S+)$", SPEC.read_text(), re.M).group(1)
    assert spec_version == version()


def test_rpmlint_has_no_error_and_no_unexplained_warning(built):
    if shutil.which("rpmlint") is None:
        pytest.skip("rpmlint is not installed (apt-get install -y rpmlint)")
    p = subprocess.run(["rpmlint", "-r", str(RPMLINTRC), str(built.rpm), str(built.srpm),
                        str(SPEC)], capture_output=True, text=True)
    print(p.stdout)
    assert " 0 errors, 0 warnings" in p.stdout, p.stdout + p.stderr
    assert p.returncode == 0


def test_payload_has_code_launcher_units_and_configuration(built, files):
    sitelib = [p for p in files if p.endswith("/site-packages/psprobe")]
    assert len(sitelib) == 1, sitelib
    for module in (ROOT / "psprobe").glob("*.py"):
        assert f"{sitelib[0]}/{module.name}" in files, module.name
        stem = module.stem
        assert any(re.search(rf"/__pycache__/{stem}\.cpython-\d+\.pyc$", p) for p in files)

    launcher = files["/usr/bin/psprobe"]
    assert stat.S_IMODE(launcher.mode) == 0o755 and launcher.user == "root"

    units = sorted(p.name for p in (ROOT / "units").iterdir())
    assert units, "units/ is empty"
    for name in units:
        entry = files[f"{UNITDIR}/{name}"]
        assert stat.S_IMODE(entry.mode) == 0o644, name
    assert "/usr/lib/systemd/system-preset/50-psprobe.preset" in files
    assert "/usr/lib/sysusers.d/psprobe.conf" in files

    conf = files["/etc/psprobe/psprobe.conf"]
    assert set(conf.flags) >= {"c", "n"}, "psprobe.conf must be %config(noreplace)"
    assert stat.S_ISDIR(files["/etc/psprobe/conf.d"].mode)
    configs = run("rpm", "-qp", "--configfiles", built.rpm).stdout.split()
    assert "/etc/psprobe/psprobe.conf" in configs
    assert "/etc/psprobe/broker.secret" in configs


def test_broker_secret_is_never_world_readable(files):
    secret = files["/etc/psprobe/broker.secret"]
    assert stat.S_ISREG(secret.mode)
    assert secret.mode & 0o007 == 0, oct(secret.mode)
    assert secret.mode & 0o022 == 0, "only root may change the secret"
    assert (secret.user, secret.group) == ("root", "psprobe")
    assert set(secret.flags) >= {"c", "n"}, "an upgrade must never replace the password"


def test_state_dir_agrees_with_the_units(files):
    """systemd chmods StateDirectory= at each start: a different packaged mode drifts (rpm -V)."""
    modes = set()
    for unit in (ROOT / "units").glob("*.service"):
        text = unit.read_text()
        if re.search(r"^StateDirectory=psprobe\s*$", text, re.M):
            m = re.search(r"^StateDirectoryMode=(\d+)\s*$", text, re.M)
            modes.add(int(m.group(1), 8) if m else 0o755)
    assert len(modes) == 1, f"units disagree on the state directory mode: {modes}"
    state = files["/var/lib/psprobe"]
    assert stat.S_ISDIR(state.mode)
    assert stat.S_IMODE(state.mode) == modes.pop()
    assert (state.user, state.group) == ("psprobe", "psprobe")


def test_units_documentation_is_in_the_package(files):
    for unit in (ROOT / "units").iterdir():
        for doc in re.findall(r"^Documentation=.*?file:(\S+)", unit.read_text(), re.M):
            assert doc in files, f"{unit.name} points at {doc}, which the package lacks"


def test_account_is_the_same_in_pre_and_sysusers(built):
    pre = qf(built.rpm, "%{PREIN}")
    sysusers = (ROOT / "packaging" / "psprobe.sysusers").read_text()
    assert re.search(r"^u psprobe - .* /var/lib/psprobe /sbin/nologin$", sysusers, re.M)
    assert "groupadd -r psprobe" in pre
    assert re.search(r"useradd -r -g psprobe -d /var/lib/psprobe -s /sbin/nologin", pre)


def test_requires_el_runtime_packages(built):
    requires = run("rpm", "-qpR", built.rpm).stdout.split("\n")
    names = {r.split()[0] for r in requires if r.strip()}
    assert {"python3-requests", "python3-pika", "python3-click", "shadow-utils",
            "systemd"} <= names
    prereq = qf(built.rpm, "[%{REQUIREFLAGS:deptype} %{REQUIRENAME}\n]")
    for phase in ("post", "preun", "postun"):
        assert f"{phase} systemd" in prereq


def test_scriptlets_carry_the_el9_systemd_macros(built):
    scripts = run("rpm", "-qp", "--scripts", built.rpm).stdout
    assert "%" not in scripts.replace("%%", ""), "an unexpanded macro is left:\n" + scripts
    assert f"{HELPER} install-system-units psprobe-sync.timer psprobe-report.timer" in scripts
    assert (f"{HELPER} remove-system-units psprobe-sync.timer psprobe-sync.service "
            "psprobe-report.timer psprobe-report.service") in scripts
    assert f"{HELPER} mark-restart-system-units psprobe-sync.timer psprobe-report.timer" \
        in scripts
    assert "psprobe@" not in qf(built.rpm, "%{POSTUN}"), "per-host timers must not restart"


# --- running the scriptlets -------------------------------------------------------------

SANDBOX = r"""
set -eu
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system /run/fakebin
mount -t tmpfs tmpfs /etc/systemd/system
mount -t tmpfs tmpfs /usr/lib/systemd
for f in /usr/lib/systemd/systemd-update-helper /run/fakebin/systemctl; do
    printf '#!/bin/sh\necho "%s $*" >>/run/calls\n' "${f##*/}" >"$f"
    chmod 755 "$f"
done
: >/run/calls
cd /etc/systemd/system
mkdir timers.target.wants multi-user.target.wants psprobe@.timer.d
for t in 'psprobe@a-b.example.org.timer' 'psprobe@ps.example.net:8085.timer' \
         'psprobe@\x5b--1\x5d.timer' psprobe-sync.timer other.timer; do
    ln -s "/usr/lib/systemd/system/$t" "timers.target.wants/$t"
done
ln -s /usr/lib/systemd/system/other.service 'multi-user.target.wants/psprobe@x.service'
echo '[Timer]' >psprobe@.timer.d/interval.conf
PATH=/run/fakebin:$PATH sh -c "$SCRIPT" scriptlet "$ARG" >/dev/null
echo "== tree"
find /etc/systemd/system -mindepth 1 | sort
echo "== calls"
cat /run/calls
"""


def run_scriptlet(script: str, arg: int) -> tuple[set[str], list[str]]:
    """Run a scriptlet as rpm would ($1 = arg) on a fake /etc/systemd/system of a
    running systemd; return what is left there and the systemctl/helper calls made."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("running scriptlets in a private mount namespace needs root and unshare")
    env = dict(os.environ, SCRIPT=script, ARG=str(arg))
    out = run("unshare", "--mount", "--propagation", "private", "sh", "-c", SANDBOX,
              env=env).stdout
    tree, calls = out.split("== calls\n")
    left = {p.removeprefix("/etc/systemd/system/") for p in tree.split("\n")[1:] if p}
    return left, [c for c in calls.split("\n") if c]


ALL_LINKS = {
    "timers.target.wants/psprobe@a-b.example.org.timer",
    "timers.target.wants/psprobe@ps.example.net:8085.timer",
    r"timers.target.wants/psprobe@\x5b--1\x5d.timer",
}


def test_erase_stops_and_unlinks_every_per_host_timer(built):
    left, calls = run_scriptlet(qf(built.rpm, "%{PREUN}"), 0)
    # Sync goes first, so it cannot re-enable a host while the others are removed.
    assert calls[0] == ("systemd-update-helper remove-system-units psprobe-sync.timer "
                        "psprobe-sync.service psprobe-report.timer psprobe-report.service")
    assert "systemctl stop psprobe@*.timer psprobe@*.service psprobe.slice" in calls
    assert "systemctl reset-failed psprobe@* psprobe-*" in calls
    assert not {p for p in left if "psprobe@" in p and "wants/" in p}, left
    # What is not sync's is left alone: other units, the operator's drop-in.
    assert {"timers.target.wants/other.timer", "psprobe@.timer.d/interval.conf"} <= left


def test_upgrade_keeps_per_host_timers_running_and_enabled(built):
    left, calls = run_scriptlet(qf(built.rpm, "%{PREUN}"), 1)
    assert calls == []
    assert left >= ALL_LINKS
    left, calls = run_scriptlet(qf(built.rpm, "%{POSTUN}"), 1)
    assert calls == ["systemd-update-helper mark-restart-system-units psprobe-sync.timer "
                     "psprobe-report.timer"]
    assert left >= ALL_LINKS


def test_install_applies_the_preset_only_on_first_install(built):
    _, calls = run_scriptlet(qf(built.rpm, "%{POSTIN}"), 1)
    assert calls == ["systemd-update-helper install-system-units psprobe-sync.timer "
                     "psprobe-report.timer"]
    _, calls = run_scriptlet(qf(built.rpm, "%{POSTIN}"), 2)
    assert calls == []
    _, calls = run_scriptlet(qf(built.rpm, "%{POSTUN}"), 0)
    assert calls == []


def extract(pkg: Path, dest: Path) -> Path:
    dest.mkdir()
    cpio = subprocess.run(f"rpm2cpio '{pkg}' | cpio -idm --quiet", shell=True, cwd=dest,
                          capture_output=True, text=True)
    assert cpio.returncode == 0, cpio.stderr
    return dest


def enabled(root: Path) -> set[str]:
    wants = root / "etc/systemd/system/timers.target.wants"
    return {p.name for p in wants.iterdir()} if wants.is_dir() else set()


def test_preset_leaves_collection_off(built, tmp_path):
    """`systemctl preset` (what %post runs on EL9) enables nothing; without the preset
    file the same command would enable the timers, so the file is what keeps them off."""
    if shutil.which("systemctl") is None or shutil.which("rpm2cpio") is None:
        pytest.skip("needs systemctl and rpm2cpio")
    timers = ["psprobe-sync.timer", "psprobe-report.timer"]
    root = extract(built.rpm, tmp_path / "root")
    run("systemctl", f"--root={root}", "preset", *timers)
    assert enabled(root) == set()

    bare = extract(built.rpm, tmp_path / "bare")
    (bare / "usr/lib/systemd/system-preset/50-psprobe.preset").unlink()
    run("systemctl", f"--root={bare}", "preset", *timers)
    assert enabled(bare) == set(timers)


def test_check_section_runs_the_unit_tests(tmp_path):
    """%check works here when this interpreter has the test dependencies."""
    if shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild is not installed")
    probe = subprocess.run([sys.executable, "-c", "import pytest, pika, requests, click"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{sys.executable} lacks pytest/pika/requests/click for %check")
    top = make_topdir(tmp_path)
    p = rpmbuild(top, "--define", f"__python3 {sys.executable}", "--with", "check", "-bi")
    assert p.returncode == 0, f"%check failed:\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    assert re.search(r"\d+ passed", p.stdout), p.stdout[-3000:]
