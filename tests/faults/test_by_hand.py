"""An operator runs a host by hand, as root: collection must not stop for it.

Why: ``psprobe collect HOST`` (or ``backfill``) as root used to leave ``lock``,
``checkpoint.json``, ``checkpoint.prev.json`` and the history root-owned 0640,
and every later timer run of that host (user psprobe) failed with exit 74
(then 4) until someone ran ``chown -R``.  Started as root, both now become the
owner of ``[collect] state_dir`` before touching any state or run slot
(bin/psprobe: before its imports; the CLI otherwise), and say so.  Here the
service user is ``psprobe-test`` (tests/faults/conftest.py).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from faults.conftest import CLI, ROOT, Lab, service_lab

A, B = "ps-a.example.org", "ps-b.example.org"


@pytest.fixture
def owned(sim, fbus):
    """A lab whose state, metrics and run directories belong to the service user."""
    with service_lab(sim, fbus, (A, B), "psprobe-byhand.") as (lab, uid, gid, py):
        os.chmod(lab.state, 0o770)
        yield lab, uid, gid, py


def as_root(lab: Lab, py: list[str], *args: str, launcher: bool = False,
            wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as root, with the interpreter the user can run too (after the drop it
    still imports: the venv's own Python may sit where the user cannot read)."""
    plain = py[py.index("env"):]
    code = [str(ROOT / "bin" / "psprobe")] if launcher else ["-c", CLI[2]]
    return subprocess.run([*(wrap or []), *plain, *code, *args], capture_output=True, text=True,
                          timeout=120, env=lab.env(), cwd="/")


def as_user(lab: Lab, py: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*py, "-c", CLI[2], *args], capture_output=True, text=True, timeout=120,
                          env=lab.env(), cwd="/")


def not_owned(lab: Lab, uid: int, gid: int) -> list[str]:
    """Every file or directory under state, metrics and run not the user's (owner and group)."""
    bad = []
    for top in ("state", "metrics", "run"):
        for p in [lab.tmp / top, *(lab.tmp / top).rglob("*")]:
            st = os.lstat(p)
            if (st.st_uid, st.st_gid) != (uid, gid):
                bad.append(f"{p.relative_to(lab.tmp)} {st.st_uid}:{st.st_gid}")
    return bad


def test_collect_and_backfill_as_root_leave_the_state_to_its_owner(owned):
    lab, uid, gid, py = owned
    said = f"running as psprobe-test, the owner of {lab.tmp / 'state'}"
    # by bin/psprobe (drops before the slot and the imports), by the CLI, then a backfill
    runs = [as_root(lab, py, "collect", A, launcher=True), as_root(lab, py, "collect", B),
            as_root(lab, py, "backfill", A, "--since", "2d")]
    for p in runs:
        assert p.returncode == 0, p.stderr
        assert p.stderr.splitlines()[0] == said, p.stderr
        assert "warning:" not in p.stderr, p.stderr  # the slot was usable: taken as the user
    made = {p.name for p in (lab.tmp / "state" / "hosts" / A).iterdir()}
    assert {"lock", "checkpoint.json", "checkpoint.prev.json", "history.json"} <= made, made
    assert any((lab.tmp / "run").iterdir()) and any((lab.tmp / "metrics").iterdir())
    assert not_owned(lab, uid, gid) == []
    delivered = lab.tally(A).delivered + lab.tally(B).delivered
    assert delivered and lab.tally(A).lost == 0 and lab.tally(B).lost == 0
    # What the timer then runs, as the service user: fine (it was exit 4 before, every run).
    for h in (A, B):
        lab.more(h)
        p = as_user(lab, py, "collect", h)
        assert p.returncode == 0, p.stderr
        assert lab.tally(h).lost == 0


def test_a_drop_that_is_refused_stops_the_run_with_one_line(owned):
    """Root without CAP_SETUID (a unit's empty bounding set): going on as root would leave
    the very files the owner's runs cannot use, so it stops, exit 74."""
    lab, uid, gid, py = owned
    before = not_owned(lab, uid, gid)
    for launcher in (True, False):
        p = as_root(lab, py, "collect", A, launcher=launcher,
                    wrap=["setpriv", "--bounding-set=-all", "--inh-caps=-all"])
        assert p.returncode == 74, p.stderr
        assert p.stderr.splitlines() == [
            f"error: cannot run as psprobe-test, the owner of {lab.tmp / 'state'}: Operation not "
            "permitted; run as that user, or give it the state directory"], p.stderr
    assert not_owned(lab, uid, gid) == before == []


def test_a_state_dir_root_owns_keeps_root(lab):
    """A development box: nothing to drop to, nothing said."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab.add_host(A)
    p = lab.cli("collect", A)
    assert p.returncode == 0, p.stderr
    assert "running as" not in p.stderr
    assert os.stat(lab.state / "hosts" / A / "checkpoint.json").st_uid == 0


def test_early_leaves_a_host_own_state_dir_to_the_cli(tmp_path, monkeypatch):
    """bin/psprobe reads [collect] alone: when a [host NAME] section moves state_dir, the
    owner to become is the CLI's to find (after its imports), so it takes no slot early."""
    from psprobe import slots

    if os.geteuid() != 0:
        pytest.skip("the early drop is root's")
    monkeypatch.setattr(slots, "_held", None)
    conf = tmp_path / "c.conf"
    conf.write_text(f"[collect]\nruntime_dir = {tmp_path / 'r'}\nstate_dir = {tmp_path}\n\n"
                    f"[host {A}]\ncollect.state_dir = {tmp_path / 'other'}\n")
    assert slots.early([f"--config={conf}", "collect", A]) is None
    assert not (tmp_path / "r").exists() and os.geteuid() == 0
    conf.write_text(f"[collect]\nruntime_dir = {tmp_path / 'r'}\nstate_dir = {tmp_path}\n")
    s = slots.early([f"--config={conf}", "collect", A])  # root's own state dir: stays root
    try:
        assert s is not None and os.geteuid() == 0
    finally:
        s.release()
