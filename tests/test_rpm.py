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


def test_receiver_tokens_are_never_world_readable_and_none_ships(files):
    tokens = files["/etc/psprobe/tokens"]
    assert stat.S_IMODE(tokens.mode) == 0o640 and (tokens.user, tokens.group) == ("root", "psprobe")
    assert set(tokens.flags) >= {"c", "n"}, "an upgrade must never replace the tokens"
    # An example only: no push is accepted until the operator adds a token.
    lines = (ROOT / "packaging" / "psprobe.tokens").read_text().splitlines()
    assert all(not ln.strip() or ln.startswith("#") for ln in lines)


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
    assert (f"{HELPER} install-system-units psprobe-sync.timer psprobe-timers.target "
            "psprobe-report.timer psprobe-receive.socket") in scripts
    assert (f"{HELPER} remove-system-units psprobe-sync.timer psprobe-sync.service "
            "psprobe-timers.target psprobe-report.timer psprobe-report.service "
            "psprobe-receive.socket psprobe-receive.service") in scripts
    assert f"{HELPER} mark-restart-system-units psprobe-sync.timer psprobe-report.timer" \
        in scripts
    # The receiver restarts into new code; its socket stays open meanwhile.
    assert f"{HELPER} mark-restart-system-units psprobe-receive.service" in scripts
    postun = qf(built.rpm, "%{POSTUN}")
    assert "psprobe@" not in postun, "per-host timers must not restart"
    # Nor their parent: a restart of psprobe-timers.target restarts every timer PartOf= it.
    marks = [ln for ln in postun.splitlines() if "mark-restart-system-units" in ln]
    assert marks and not [ln for ln in marks if "psprobe-timers.target" in ln], postun
    # An older psprobe's links move under the parent, after the old package's scriptlets.
    assert "/usr/bin/psprobe migrate-units" in qf(built.rpm, "%{POSTTRANS}")


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
mkdir timers.target.wants psprobe-timers.target.wants multi-user.target.wants psprobe@.timer.d
for t in 'psprobe@a-b.example.org.timer' 'psprobe@ps.example.net:8085.timer' \
         'psprobe@\x5b--1\x5d.timer' psprobe-sync.timer; do
    ln -s "/usr/lib/systemd/system/$t" "psprobe-timers.target.wants/$t"
done
for t in psprobe-timers.target other.timer; do
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
    "psprobe-timers.target.wants/psprobe@a-b.example.org.timer",
    "psprobe-timers.target.wants/psprobe@ps.example.net:8085.timer",
    r"psprobe-timers.target.wants/psprobe@\x5b--1\x5d.timer",
    "psprobe-timers.target.wants/psprobe-sync.timer",
    "timers.target.wants/psprobe-timers.target",
}


def test_erase_stops_and_unlinks_every_per_host_timer(built):
    left, calls = run_scriptlet(qf(built.rpm, "%{PREUN}"), 0)
    # Sync goes first, so it cannot re-enable a host while the others are removed.
    # Then their parent, which stops every host timer with it (PartOf=).
    assert calls[0] == ("systemd-update-helper remove-system-units psprobe-sync.timer "
                        "psprobe-sync.service psprobe-timers.target psprobe-report.timer "
                        "psprobe-report.service psprobe-receive.socket psprobe-receive.service")
    assert "systemctl stop psprobe@*.timer psprobe@*.service psprobe.slice" in calls
    assert "systemctl reset-failed psprobe@* psprobe-*" in calls
    # One directory held sync's links: it is gone. (The target's own link in
    # timers.target.wants is systemctl disable's, which the recorder here does not do.)
    assert not {p for p in left if p.startswith("psprobe-timers.target.wants")}, left
    # What is not sync's is left alone: other units, the operator's drop-in.
    assert {"timers.target.wants/other.timer", "psprobe@.timer.d/interval.conf"} <= left


def test_upgrade_keeps_per_host_timers_running_and_enabled(built):
    left, calls = run_scriptlet(qf(built.rpm, "%{PREUN}"), 1)
    assert calls == []
    assert left >= ALL_LINKS
    left, calls = run_scriptlet(qf(built.rpm, "%{POSTUN}"), 1)
    assert calls == ["systemd-update-helper mark-restart-system-units psprobe-sync.timer "
                     "psprobe-report.timer",
                     "systemd-update-helper mark-restart-system-units psprobe-receive.service"]
    assert left >= ALL_LINKS


def test_install_applies_the_preset_only_on_first_install(built):
    _, calls = run_scriptlet(qf(built.rpm, "%{POSTIN}"), 1)
    assert calls == ["systemd-update-helper install-system-units psprobe-sync.timer "
                     "psprobe-timers.target psprobe-report.timer psprobe-receive.socket"]
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
    found = set()
    for d in ("timers.target.wants", "psprobe-timers.target.wants", "sockets.target.wants"):
        wants = root / "etc/systemd/system" / d
        found |= {p.name for p in wants.iterdir()} if wants.is_dir() else set()
    return found


def test_preset_leaves_collection_off(built, tmp_path):
    """`systemctl preset` (what %post runs on EL9) enables nothing; without the preset
    file the same command would enable the timers, so the file is what keeps them off."""
    if shutil.which("systemctl") is None or shutil.which("rpm2cpio") is None:
        pytest.skip("needs systemctl and rpm2cpio")
    timers = ["psprobe-sync.timer", "psprobe-timers.target", "psprobe-report.timer",
              "psprobe-receive.socket"]
    root = extract(built.rpm, tmp_path / "root")
    run("systemctl", f"--root={root}", "preset", *timers)
    assert enabled(root) == set()

    bare = extract(built.rpm, tmp_path / "bare")
    (bare / "usr/lib/systemd/system-preset/50-psprobe.preset").unlink()
    run("systemctl", f"--root={bare}", "preset", *timers)
    assert enabled(bare) == set(timers)


# --- packaging/make-tarball.sh never packs less than the operator thinks ------------------


def _clone(tmp_path: Path) -> Path:
    """A clone of this repository whose committed make-tarball.sh is the one being tested."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "clone"
    run("git", "clone", "-q", ROOT, clone)
    shutil.copy2(ROOT / "packaging" / "make-tarball.sh", clone / "packaging" / "make-tarball.sh")
    git = ["git", "-C", clone, "-c", "user.name=test", "-c", "user.email=test@localhost"]
    if run("git", "-C", clone, "status", "--porcelain").stdout:
        run(*git, "commit", "-q", "-am", "the make-tarball.sh under test")
    return clone


def _tarball(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(clone / "packaging" / "make-tarball.sh"), *args], capture_output=True,
                          text=True, cwd=clone)


def _spec_in(tarball: Path) -> str:
    import tarfile

    with tarfile.open(tarball) as t:
        return t.extractfile(f"psprobe-{version()}/psprobe.spec").read().decode()


def test_make_tarball_refuses_a_dirty_tree_and_says_what_it_leaves_out(tmp_path):
    clone = _clone(tmp_path)
    out = tmp_path / "out"
    p = _tarball(clone, str(out))
    assert p.returncode == 0 and p.stderr == "", p.stderr  # clean: quiet
    tarball = Path(p.stdout.strip())
    assert "Release:        1%{?dist}" in _spec_in(tarball)
    tarball.unlink()

    spec = clone / "psprobe.spec"
    spec.write_text(spec.read_text().replace("Release:        1%{?dist}", "Release:        2%{?dist}"))
    (clone / "notes.txt").write_text("untracked\n")
    p = _tarball(clone, str(out))
    assert p.returncode == 1, p.stderr
    assert "UNCOMMITTED CHANGES" in p.stderr and "psprobe.spec" in p.stderr and "refusing" in p.stderr
    assert p.stdout == "" and not tarball.exists()

    p = _tarball(clone, "--allow-dirty", str(out))  # HEAD anyway, told loudly what is not in it
    assert p.returncode == 0, p.stderr
    assert "WARNING: packaging HEAD without those changes" in p.stderr and "psprobe.spec" in p.stderr
    assert "untracked files are not in the tarball" in p.stderr and "notes.txt" in p.stderr
    assert "Release:        1%{?dist}" in _spec_in(Path(p.stdout.strip()))

    p = _tarball(clone, "--worktree", str(out))  # what is on disk, the bumped Release with it
    assert p.returncode == 0, p.stderr
    assert "Release:        2%{?dist}" in _spec_in(Path(p.stdout.strip()))


def test_make_tarball_in_the_work_tree_does_not_pack_its_last_tarball(tmp_path):
    """With no OUTDIR the tarball lands in the current directory, often the work tree."""
    import tarfile

    clone = _clone(tmp_path)
    p = _tarball(clone)
    assert p.returncode == 0, p.stderr
    first = Path(p.stdout.strip())
    assert first.parent == clone
    p = _tarball(clone)  # the first tarball is untracked: not a reason to refuse, not packed
    assert p.returncode == 0 and "psprobe-" not in p.stderr, p.stderr
    p = _tarball(clone, "--worktree")
    assert p.returncode == 0, p.stderr
    with tarfile.open(p.stdout.strip()) as t:
        assert not [n for n in t.getnames() if n.endswith(".tar.gz")]


# --- %check needs nothing but the BuildRequires ------------------------------------------

# What a BuildRequires stands for when the spec is built for rhel 8 and rhel 9.
EL_RELEASES = ("8", "9")


def spec_for(rhel: str) -> str:
    """The spec as rpmbuild reads it for EL ``rhel`` (conditionals evaluated, macros expanded)."""
    return run("rpmspec", "--load", MACROS, "--define", f"rhel {rhel}", "-P", SPEC).stdout


def build_requires(rhel: str) -> set[str]:
    out = run("rpmspec", "--load", MACROS, "--define", f"rhel {rhel}", "-q", "--buildrequires",
              SPEC).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def check_script(rhel: str) -> str:
    """The body of %check (empty when the spec has none)."""
    m = re.search(r"^%check\n(.*?)^%(?:pre|post|files|changelog)\b", spec_for(rhel), re.M | re.S)
    return m.group(1) if m else ""


def third_party_imports(path: Path) -> set[str]:
    """Top-level names ``path`` imports that are neither the standard library nor this tree's."""
    import ast

    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {
        p.name for p in (ROOT / "tests").iterdir() if p.is_dir()} | {"psprobe", "tests"}
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


@pytest.mark.parametrize("rhel", EL_RELEASES)
def test_check_imports_only_what_is_build_required(rhel):
    """Every module a test file %check collects imports (pytest imports them all, -m only
    deselects afterwards) is a BuildRequires of that EL; a file that needs more is left out
    with --ignore. Static: tests/system/test_rpm_install.py runs %check on the BuildRequires."""
    if not hasattr(sys, "stdlib_module_names"):
        pytest.skip("needs Python 3.10's sys.stdlib_module_names")
    if shutil.which("rpmspec") is None:
        pytest.skip("rpmspec is not installed (apt-get install -y rpm)")
    script = check_script(rhel)
    assert "pytest" in script, script
    ignored = {ROOT / p for p in re.findall(r"--ignore=(\S+)", script)}
    have = build_requires(rhel)
    missing = {}
    for f in sorted((ROOT / "tests").rglob("*.py")):
        if f in ignored or any(d in f.parents for d in ignored):
            continue
        for name in third_party_imports(f):
            if f"python3-{name.lower()}" not in have:
                missing.setdefault(f"python3-{name.lower()}", []).append(str(f.relative_to(ROOT)))
    assert missing == {}, f"EL{rhel}: not in BuildRequires: {missing}"


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
