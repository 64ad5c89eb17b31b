"""Process and disk faults: SIGKILL anywhere, read-only or full state, a damaged checkpoint,
two collects of one host, the clock going back.  Nothing is ever lost."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import types

import pytest

from faults.conftest import CLI, ROOT

A, B = "ps-a.example.org", "ps-b.example.org"
KILLS = 50


def _wait(cond, what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def _requests(lab, host: str) -> int:
    return len(lab.hosts[host].hosts[host].log)


def test_sigkill_at_random_points(lab, figures):
    """Runs killed after a random number of archive answers or checkpoint writes."""
    rng = random.Random(6)
    lab.add_host(A, room=30 * KILLS + 60)
    lab.sim.set_latency(0.003)
    cpfile = lab.state / "hosts" / A / "checkpoint.json"
    env_cmd = [*CLI, "collect", A]
    killed = 0
    for _ in range(KILLS):
        lab.more(A, 30)
        before = _requests(lab, A)
        mtime = cpfile.stat().st_mtime_ns if cpfile.exists() else 0
        p = subprocess.Popen(env_cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env(lab))
        if rng.random() < 0.5:  # after the k-th answer of the archive
            want = before + rng.randint(1, 5)
            _wait(lambda p=p, want=want: _requests(lab, A) >= want or p.poll() is not None,
                  "requests")
        else:  # after a checkpoint write (a confirmed message)
            _wait(lambda p=p, mtime=mtime: (cpfile.exists() and cpfile.stat().st_mtime_ns != mtime)
                  or p.poll() is not None, "checkpoint")
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait(30)
    lab.sim.set_latency(0)
    runs, t = lab.catch_up(A)
    leftovers = [x.name for x in cpfile.parent.iterdir() if x.name.endswith(".tmp")]
    assert len(leftovers) <= 1, leftovers  # at most the one a kill interrupted last
    assert killed >= KILLS // 2
    figures.fault("process", f"SIGKILL at random points ({killed} of {KILLS} runs killed)",
                  -9, "killed (no line: SIGKILL)", t, runs, faults=killed)


def _env(lab) -> dict:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PSPROBE_CONFIG": str(lab.conf)}
    env.pop("JOURNAL_STREAM", None)
    return env


def _two_hosts(lab) -> None:
    for h in (A, B):
        lab.add_host(h)
        assert lab.run(h).status == 0
    lab.more(A, 120)
    lab.more(B, 120)


def _one_line(proc: subprocess.CompletedProcess, host: str) -> str:
    lines = [x for x in proc.stderr.splitlines() if f"collect {host}: FAILED" in x]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_state_dir_read_only(lab, figures):
    _two_hosts(lab)
    sd = str(lab.state)
    wrap = ["unshare", "-m", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', sd]
    proc = lab.cli("collect", A, wrap=wrap)
    assert proc.returncode == 74, proc.stderr  # EX_IOERR
    line = _one_line(proc, A)
    assert "Read-only file system" in line
    assert lab.run(B).status == 0 and lab.tally(B).lost == 0
    runs, t = lab.catch_up(A)
    figures.fault("disk", "state dir read-only (ro bind mount)", proc.returncode, line, t, runs)


def test_checkpoint_write_refused(lab, figures):
    """The host directory turns immutable mid-life: the first checkpoint write fails."""
    _two_hosts(lab)
    d = lab.state / "hosts" / A
    subprocess.run(["chattr", "+i", str(d)], check=True)
    try:
        r = lab.run(A)
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    assert r.status == 74, r.lines
    line = r.failed_line(A)
    assert "cannot write checkpoint: Operation not permitted" in line
    assert lab.run(B).status == 0 and lab.tally(B).lost == 0
    runs, t = lab.catch_up(A)
    figures.fault("disk", "checkpoint write refused (chattr +i)", r.status, line, t, runs)


def test_state_disk_full(lab, figures):
    _two_hosts(lab)
    h = str(lab.state / "hosts" / A)
    script = ('set -e; H="$0"; cp -a "$H" "$H.save"; mount -t tmpfs -o size=64k tmpfs "$H"; '
              'cp -a "$H.save/." "$H/"; rm -rf "$H.save"; '
              'head -c 1M /dev/zero > "$H/ballast" 2>/dev/null || true; exec "$@"')
    proc = lab.cli("collect", A, wrap=["unshare", "-m", "sh", "-c", script, h])
    assert proc.returncode == 74, proc.stderr
    line = _one_line(proc, A)
    assert "No space left on device" in line
    assert lab.run(B).status == 0 and lab.tally(B).lost == 0
    runs, t = lab.catch_up(A)
    figures.fault("disk", "state disk full (64 KiB tmpfs)", proc.returncode, line, t, runs)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape"])
def test_damaged_checkpoint_resumes_from_last_runs_copy(lab, figures, damage):
    _two_hosts(lab)
    cpfile = lab.state / "hosts" / A / "checkpoint.json"
    raw = cpfile.read_bytes()
    cpfile.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00\xff" * 40,
                        "wrong shape": b'{"pairs": [1, 2]}'}[damage])
    r = lab.run(A)
    assert r.status == 0, r.lines
    warn = [x for x in r.lines if "resuming from checkpoint.prev.json" in x]
    assert len(warn) == 1 and warn[0].startswith("WARNING"), r.lines
    assert (cpfile.parent / "checkpoint.json.damaged").exists()
    t = lab.tally(A)
    figures.fault("disk", f"checkpoint {damage} (copy of last run used)", 0, warn[0], t, 1)


def test_damaged_checkpoint_without_copy_stops_with_one_line(lab, figures):
    _two_hosts(lab)
    d = lab.state / "hosts" / A
    (d / "checkpoint.json").write_text('{"version": 1, "pairs": {"x": "soon"}}')
    (d / "checkpoint.prev.json").write_text("{")
    r = lab.run(A)
    assert r.status == 74
    line = r.failed_line(A)
    assert "move it aside" in line
    assert lab.run(B).status == 0 and lab.tally(B).lost == 0
    (d / "checkpoint.json").rename(d / "checkpoint.json.aside")  # what the line says to do
    runs, t = lab.catch_up(A)
    # The whole lookback again (what was already sent: 480 points): the operator's choice.
    figures.fault("disk", "checkpoint and its copy damaged (operator moves it aside)", r.status, line,
                  t, runs, bound=480)


def test_two_collects_of_one_host(lab, figures):
    _two_hosts(lab)
    lab.set("archive", timeout="30s")
    h = lab.sim.hosts[A]
    fault = lab.sim.fault(A, "stall", path="/base", times=1)
    first = subprocess.Popen([*CLI, "collect", A], cwd=str(ROOT), env=_env(lab),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: fault.hits >= 1, "the first run to be inside the archive")
    second = lab.run(A)
    assert second.status == 0
    assert any("another collect of this host is running" in x for x in second.lines)
    assert len(second.lines) == 1, second.lines
    fault.release()
    _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert h.requests("/base")
    runs, t = lab.catch_up(A)
    figures.fault("process", "two collects of one host at once", 0,
                  "second: another collect of this host is running; nothing to do", t, runs)


def test_clock_going_backwards(lab, figures, monkeypatch):
    from psprobe import collect as pcollect

    _two_hosts(lab)
    real = time.time
    monkeypatch.setattr(pcollect, "time", types.SimpleNamespace(
        time=lambda: real() - 86400, monotonic=time.monotonic))
    r = lab.run(A)
    assert r.status == 0, r.lines
    warn = [x for x in r.lines if "did the clock go back" in x]
    assert len(warn) == 1, r.lines
    cp = json.loads((lab.state / "hosts" / A / "checkpoint.json").read_text())
    monkeypatch.undo()
    runs, t = lab.catch_up(A)
    assert cp["pairs"]
    figures.fault("process", "clock 1 day back between runs", 0, warn[0], t, runs)
