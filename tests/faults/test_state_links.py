"""Links planted in the state directory (and the metrics and slot directories): never followed.

Why: psprobe may run as root, and whoever can write below ``[collect] state_dir`` (the
service user, a careless restore) must not be able to turn a run against the host.  For
each state file and directory a symbolic link is planted -- to a victim outside the state
directory with known content and mtime, and dangling -- and a collect (in-process and as a
subprocess) or a sync runs.  It stops with exit 74 and one line naming the path (files that
psprobe makes anew -- temp files, the metrics file, slot files -- are not followed and the
run goes on), the victim is untouched, nothing appears at the dangling target, and the
other host is collected as usual.  Some of it runs as the service user too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import cli_runner

from faults.conftest import CLI, ROOT, SERVICE_USER, Lab, service_lab
from psprobe import checkpoint, metrics, slots, state

A, B, M = "ps-a.example.org", "ps-b.example.org", "ps-m.example.org"
REFUSED = "refusing to follow a symbolic link"
OLD = 1_000_000_000  # the victims' mtime
USER = SERVICE_USER


# ----------------------------------------------------------------- planting


def snapshot(p: Path) -> dict:
    """Content and mtime of a file, or of a directory and everything under it."""
    if p.is_file():
        return {".": (p.read_bytes(), p.stat().st_mtime_ns)}
    out = {".": (b"<dir>", p.stat().st_mtime_ns)}
    for q in sorted(p.rglob("*")):
        out[str(q.relative_to(p))] = (q.read_bytes() if q.is_file() else b"<dir>",
                                      q.lstat().st_mtime_ns)
    return out


class Plant:
    """A link at ``path``: to a victim outside the state dir, or dangling; undone by restore()."""

    def __init__(self, lab: Lab, path: Path, *, dangling: bool, directory: bool = False,
                 owner: int | None = None) -> None:
        self.path, self.dangling = path, dangling
        tag = uuid.uuid4().hex[:8]
        victims = lab.tmp / "victims"
        victims.mkdir(exist_ok=True)
        self.target = victims / f"{path.name}.{tag}.{'nowhere' if dangling else 'victim'}"
        self.aside = None
        if os.path.lexists(path):
            self.aside = lab.tmp / "aside" / tag
            self.aside.parent.mkdir(exist_ok=True)
            os.rename(path, self.aside)
        if not dangling:
            if directory:
                self.target.mkdir()
                (self.target / "precious").write_text("precious\n")
            else:
                self.target.write_text("precious\n")
            for q in [self.target, *(self.target.rglob("*") if directory else [])]:
                if owner is not None:
                    os.chown(q, owner, -1)
                os.utime(q, (OLD, OLD))
            self.before = snapshot(self.target)
        path.symlink_to(self.target)
        if owner is not None:
            os.chown(path, owner, -1, follow_symlinks=False)

    def check(self) -> None:
        """The victim untouched (content, mtime, entries); nothing made at a dangling target."""
        if self.dangling:
            assert not os.path.lexists(self.target), f"{self.path}: the link was followed"
        else:
            assert snapshot(self.target) == self.before, f"{self.path}: the victim changed"

    def restore(self) -> None:
        if self.path.is_symlink():
            self.path.unlink()
        if self.aside is not None:
            os.rename(self.aside, self.path)


def refused_run(lab: Lab, host: str, path: Path) -> str:
    """In-process collect of ``host``: exit 74, one line, naming ``path``."""
    r = lab.run(host)
    assert r.status == 74, r.lines
    assert len(r.lines) == 1, r.lines
    assert f"error={path}: {REFUSED}" in r.failed_line(host), r.lines
    return r.lines[0]


def refused_cli(lab: Lab, host: str, path: Path) -> str:
    """``psprobe collect HOST`` as a subprocess: exit 74, one line on stderr, naming ``path``."""
    p = lab.cli("collect", host)
    assert p.returncode == 74, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and f"collect {host}: FAILED error={path}: {REFUSED}" in lines[0], \
        p.stderr
    return lines[0]


def _reset_logging() -> None:
    """An in-process CLI run routed the psprobe logger to its stream: give it back."""
    lg = logging.getLogger("psprobe")
    lg.handlers[:] = []
    lg.propagate = True


@pytest.fixture
def two(lab: Lab) -> Lab:
    """Hosts A and B collected once (every state file exists), new points waiting on both."""
    lab.set("collect", runtime_dir=lab.tmp / "run", max_concurrent=2)
    for h in (A, B):
        lab.add_host(h)
        assert lab.run(h).status == 0
        lab.more(h)
    return lab


# ----------------------------------------------------------------- collect's state

HOST_PLACES = [  # (what, path below the state dir, a directory?)
    ("lock", f"hosts/{A}/lock", False),
    ("checkpoint.journal", f"hosts/{A}/checkpoint.journal", False),
    ("checkpoint.json", f"hosts/{A}/checkpoint.json", False),
    ("checkpoint.prev.json", f"hosts/{A}/checkpoint.prev.json", False),
    ("history.json", f"hosts/{A}/history.json", False),
    ("target.json", f"hosts/{A}/target.json", False),
    ("hosts/<host> directory", f"hosts/{A}", True),
    ("hosts directory", "hosts", True),
]


def test_links_at_collect_state_are_refused_with_one_line(two, figures):
    lab = two
    tried = rejected = 0
    for what, rel, directory in HOST_PLACES:
        path = lab.state / rel
        for dangling in (False, True):
            for how in (refused_run, refused_cli):
                tried += 1
                plant = Plant(lab, path, dangling=dangling, directory=directory)
                try:
                    how(lab, A, path)
                    plant.check()
                    if what == "hosts directory":  # every host's state is below it
                        refused_run(lab, B, path)
                    else:
                        assert lab.run(B).status == 0, what
                finally:
                    plant.restore()
                rejected += 1
    # Nothing was touched: A catches up from where it was, nothing lost.
    runs, t = lab.catch_up(A)
    assert runs == 1 and t.lost == 0
    assert lab.run(B).status == 0 and lab.tally(B).lost == 0
    figures.reject("state", "symlinked state files and directories (lock, journal, checkpoint, "
                   "its copy, history, target, hosts/<host>, hosts; to a file and dangling; "
                   "in-process and CLI)", tried, rejected,
                   "exit 74, one line naming the path; the link's target untouched")


def test_a_dry_run_and_a_backfill_refuse_too(two):
    lab = two
    path = lab.state / "hosts" / A / "checkpoint.journal"
    plant = Plant(lab, path, dangling=False)
    try:
        p = lab.cli("collect", A, "--dry-run")
        assert p.returncode == 74, p.stderr
        assert f"error={path}: {REFUSED}" in p.stderr and p.stdout == ""
        p = lab.cli("backfill", A, "--since", "1h")
        assert p.returncode == 74, p.stderr
        assert f"error={path}: {REFUSED}" in p.stderr
        plant.check()
    finally:
        plant.restore()


def test_hard_links_and_odd_files_are_refused(two, figures):
    """A second name for a file written in place, a FIFO or a directory where a file belongs."""
    lab = two
    d = lab.state / "hosts" / A
    victim = lab.tmp / "victim"
    tried = 0
    for name, make, why in [
        ("lock", "hardlink", "has 2 hard links; refusing to write it"),
        ("checkpoint.journal", "hardlink", "has 2 hard links; refusing to write it"),
        ("history.json", "fifo", "not a regular file"),
        ("checkpoint.json", "dir", "not a regular file"),
    ]:
        tried += 1
        victim.write_text("precious\n")
        os.utime(victim, (OLD, OLD))
        before = snapshot(victim)
        aside = lab.tmp / "aside"
        os.rename(d / name, aside)
        if make == "hardlink":
            os.link(victim, d / name)
        elif make == "fifo":
            os.mkfifo(d / name)
        else:
            (d / name).mkdir()
        try:
            r = lab.run(A)
            assert r.status == 74 and len(r.lines) == 1, r.lines
            assert f"error={d / name}: {why}" in r.failed_line(A)
            assert snapshot(victim) == before
        finally:
            if make == "dir":
                (d / name).rmdir()
            else:
                (d / name).unlink()
            os.rename(aside, d / name)
    assert lab.catch_up(A)[1].lost == 0
    figures.reject("state", "hard-linked lock or journal, a FIFO or a directory at a state file",
                   tried, tried, "exit 74, one line naming the path; the other name untouched")


def test_the_state_dir_itself_may_be_a_link(lab):
    """The operator's choice (/var/lib/psprobe -> /data/psprobe): only what is below is checked."""
    real = lab.tmp / "data"
    lab.state.mkdir(parents=True, exist_ok=True)
    os.rename(lab.state, real)
    lab.state.symlink_to(real)
    lab.add_host(A)
    assert lab.run(A).status == 0
    assert lab.tally(A).lost == 0
    assert (real / "hosts" / A / "checkpoint.json").is_file()
    lab.more(A)
    p = lab.cli("collect", A)
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------- what is made anew


def test_temp_names_are_made_anew_never_followed(two, monkeypatch, figures):
    lab = two
    d = lab.state / "hosts" / A
    tried = 0
    # The checkpoint's fixed temp name: a killed run's leftover is removed, never written through.
    for dangling in (False, True):
        for how in ("run", "cli"):
            tried += 1
            plant = Plant(lab, d / ".checkpoint.json.tmp", dangling=dangling)
            try:
                if how == "run":
                    assert lab.run(A).status == 0
                else:
                    p = lab.cli("collect", A)
                    assert p.returncode == 0, p.stderr
                plant.check()
                assert not os.path.lexists(plant.path)  # swept
                lab.more(A)
            finally:
                plant.restore()
    # ... and by save() itself when it finds one (no sweep before it).
    for dangling in (False, True):
        tried += 1
        plant = Plant(lab, d / ".checkpoint.json.tmp", dangling=dangling)
        try:
            cp = checkpoint.load(str(lab.state), A)
            cp.save()
            cp.close()
            plant.check()
            assert (d / "checkpoint.json").is_file() and not (d / "checkpoint.json").is_symlink()
        finally:
            plant.restore()
    # Random temp names (history, metrics): one that is taken -- by a link -- is skipped.
    planted = {"history.json": ".history.json.planted.tmp",
               metrics.host_file(A): f".{metrics.host_file(A)}.planted.tmp"}
    real = state._temp_name
    given: list[str] = []

    def temp_name(name: str) -> str:
        if name in planted and planted[name] not in given:
            given.append(planted[name])
            return planted[name]
        return real(name)

    monkeypatch.setattr(state, "_temp_name", temp_name)
    plants = [Plant(lab, d / planted["history.json"], dangling=False),
              Plant(lab, lab.tmp / "metrics" / planted[metrics.host_file(A)], dangling=True)]
    tried += len(plants)
    try:
        lab.more(A)
        r = lab.run(A)
        assert r.status == 0, r.lines
        assert len(given) == 2  # both planted names were offered, and refused by O_EXCL
        for p in plants:
            p.check()
        assert json.loads((d / "history.json").read_text())["runs"][-1]["points"] > 0
        assert (lab.tmp / "metrics" / metrics.host_file(A)).is_file()
    finally:
        for p in plants:
            p.restore()
    assert lab.catch_up(A)[1].lost == 0
    figures.reject("state", "links at temp names (checkpoint's fixed one, history's and "
                   "metrics' random ones)", tried, tried,
                   "not followed: removed, or skipped by O_EXCL; the run goes on")


def test_a_link_at_the_metrics_file_is_not_written_through(two, figures):
    lab = two
    path = lab.tmp / "metrics" / metrics.host_file(A)
    tried = 0
    for dangling in (False, True):
        for how in ("run", "cli"):
            tried += 1
            plant = Plant(lab, path, dangling=dangling)
            try:
                if how == "run":
                    r = lab.run(A)
                    assert r.status == 0, r.lines
                    warnings = [x for x in r.lines if x.startswith("WARNING")]
                else:
                    p = lab.cli("collect", A)
                    assert p.returncode == 0, p.stderr
                    warnings = [x for x in p.stderr.splitlines() if x.startswith("warning: ")]
                assert len(warnings) == 1 and f"{path}: {REFUSED}; metrics not written" \
                    in warnings[0], warnings
                plant.check()
                assert path.is_symlink()  # left as it was found
                assert lab.run(B).status == 0
                assert (lab.tmp / "metrics" / metrics.host_file(B)).is_file()
                lab.more(A)
            finally:
                plant.restore()
    figures.reject("state", "symlinked metrics file ([metrics] textfile_dir)", tried, tried,
                   "one warning naming it, metrics not written, run ok; target untouched")


def test_links_at_slot_files_are_not_opened(two, figures):
    lab = two
    run_dir = lab.tmp / "run"
    run_dir.mkdir(exist_ok=True)
    tried = 0
    for dangling in (False, True):
        plants = [Plant(lab, run_dir / f"slot.{k}", dangling=dangling) for k in range(2)]
        try:
            with pytest.raises(OSError) as e:
                slots.acquire(str(run_dir), 2)
            assert e.value.strerror == REFUSED and e.value.filename.startswith(f"{run_dir}/slot.")
            tried += 1
            bin_psprobe = [sys.executable, str(ROOT / "bin" / "psprobe")]
            for cmd in (CLI, bin_psprobe):  # bin/psprobe takes the slot before its imports
                tried += 1
                env = {**os.environ, "PYTHONPATH": str(ROOT), "PSPROBE_CONFIG": str(lab.conf)}
                env.pop("JOURNAL_STREAM", None)
                p = subprocess.run([*cmd, "collect", A], capture_output=True, text=True,
                                   timeout=60, env=env, cwd=str(ROOT))
                assert p.returncode == 0, p.stderr
                warnings = [x for x in p.stderr.splitlines() if x.startswith("warning: ")]
                assert warnings and all(f"{run_dir}/slot." in x and f": {REFUSED}); running "
                                        "without the [collect] max_concurrent bound" in x
                                        for x in warnings), p.stderr
                lab.more(A)
            for pl in plants:
                pl.check()
        finally:
            for pl in plants:
                pl.restore()
    assert lab.catch_up(A)[1].lost == 0
    figures.reject("state", "symlinked slot files ([collect] runtime_dir)", tried, tried,
                   "not opened: one warning naming it, the run goes on unbounded")


# ----------------------------------------------------------------- sync's state


def _mesh(lab: Lab) -> None:
    doc = {"organizations": [{"sites": [{"hosts": [{"addresses": [M], "measurement_archives": [{
        "type": "perfsonarbuoy/bwctl", "read_url": f"https://{M}/esmond/perfsonar/archive/"}]}]}]}],
        "tests": [{"members": {"type": "mesh", "members": [M]}}]}
    (lab.tmp / "mesh.json").write_text(json.dumps(doc))
    lab.set("mesh", urls=lab.tmp / "mesh.json", unit_dir=lab.tmp / "systemd",
            template_dir="/usr/lib/systemd/system")


def _sync_run(lab: Lab) -> tuple[int, list[str]]:
    from psprobe.cli import main

    try:
        r = cli_runner().invoke(main, ["--config", str(lab.conf), "sync", "--no-systemctl"])
    finally:
        _reset_logging()
    return r.exit_code, r.output.splitlines()


def _sync_cli(lab: Lab) -> tuple[int, list[str]]:
    p = lab.cli("sync", "--no-systemctl")
    return p.returncode, p.stderr.splitlines()


def test_links_at_sync_state_are_refused_with_one_line(two, figures):
    lab = two
    _mesh(lab)
    assert _sync_cli(lab)[0] == 0
    meshes = lab.state / "meshes"
    assert len(list(meshes.iterdir())) == 1
    tried = 0
    for path, directory in [(meshes, True), (lab.state / "sync.json", False),
                            (lab.state / "sync.lock", False),
                            (lab.state / "hosts" / M / "target.json", False)]:
        for dangling in (False, True):
            for how in (_sync_run, _sync_cli):
                tried += 1
                plant = Plant(lab, path, dangling=dangling, directory=directory)
                try:
                    status, lines = how(lab)
                    assert status == 74, lines
                    failed = [x for x in lines if "sync: FAILED" in x]
                    assert len(failed) == 1 and f"error={path}: {REFUSED}" in failed[0], lines
                    assert not any("Traceback" in x for x in lines), lines
                    plant.check()
                    assert lab.run(A).status == 0  # collects do not need sync's files
                    lab.more(A)
                finally:
                    plant.restore()
    assert _sync_cli(lab)[0] == 0
    figures.reject("state", "symlinked sync state (meshes, sync.json, sync.lock, a host's "
                   "target.json; "
                   "to a file and dangling; in-process and CLI)", tried, tried,
                   "exit 74, one line naming the path; the link's target untouched")


# ----------------------------------------------------------------- as the service user


def test_as_the_service_user(sim, fbus, figures):
    """The links a service user could plant, met by a run as that user: refused all the same."""
    with service_lab(sim, fbus, (A, B), "psprobe-links.") as (lab, uid, gid, py):
        tmp = lab.tmp

        def as_user(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*py, "-c", CLI[2], *args], capture_output=True, text=True,
                                  timeout=60, env=lab.env(), cwd="/")

        for h in (A, B):
            p = as_user("collect", h)
            assert p.returncode == 0 and "warning: " not in p.stderr, p.stderr
            lab.more(h)
        assert os.stat(tmp / "state" / "hosts" / A / "lock").st_uid == uid  # the user's run
        d = tmp / "state" / "hosts" / A
        tried = 0
        for rel, directory in [("lock", False), ("checkpoint.journal", False),
                               ("history.json", False), (f"hosts/{A}", True)]:
            path = d / rel if not rel.startswith("hosts/") else tmp / "state" / rel
            for dangling in (False, True):
                tried += 1
                # The victim is the user's own: without the check the run could write it.
                plant = Plant(lab, path, dangling=dangling, directory=directory, owner=uid)
                if dangling:
                    os.chown(plant.target.parent, uid, gid)  # a target the user could create
                try:
                    p = as_user("collect", A)
                    assert p.returncode == 74, p.stderr
                    lines = p.stderr.splitlines()
                    assert len(lines) == 1 and f"error={path}: {REFUSED}" in lines[0], p.stderr
                    plant.check()
                    assert as_user("collect", B).returncode == 0
                    lab.more(B)
                finally:
                    plant.restore()
        for h in (A, B):  # all planted links gone: both catch up, nothing lost
            p = as_user("collect", h)
            assert p.returncode == 0, p.stderr
            assert lab.tally(h).lost == 0
        figures.reject("state", f"links planted by the service user ({USER}: lock, journal, "
                       "history, its host directory), the run as that user", tried, tried,
                       "exit 74, one line naming the path; the user's own file untouched")
