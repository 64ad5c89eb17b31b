"""Whole-run faults: late points behind a checkpoint, an archive that answers nothing
after its metadata, an archive gone mid-run, a run stopped from outside.

Each ends with one clear line and, once the fault is gone, 0 points lost.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

from faultproxy import elapsed

from faults.conftest import CLI, ROOT, STEP, service_lab
from psprobe import history

A, B = "ps-a.example.org", "ps-b.example.org"
LATE = {"collect": {"late_window": "12h"}}  # the lab's points are hours old


def _shift_lookback(lab, host: str, seconds: float) -> None:
    """The host's last look-back happened ``seconds`` earlier (time passing, not sleeping)."""
    path = lab.state / "hosts" / host / "checkpoint.json"
    doc = json.loads(path.read_text())
    doc["swept"] -= seconds
    path.write_text(json.dumps(doc))


def _late_points(lab, host: str) -> list[tuple[str, str, int]]:
    """Two points written now with timestamps behind their series' checkpoints."""
    h = lab.hosts[host].hosts[host]
    out = []
    for key, et in h.pairs()[:2]:
        last = h.points(key, et)[-1][0]
        ts = last - 3 * STEP - 17  # between two grid points, well behind the checkpoint
        h.add_points(key, et, [(ts, h.points(key, et)[-1][1])])
        out.append((key, et, ts))
    return out


def test_late_points_are_sent_once_and_the_steady_state_sends_no_duplicates(lab, figures):
    lab.set("collect", **LATE["collect"])
    lab.add_host(A)
    assert lab.run(A).status == 0
    assert lab.tally(A).lost == 0
    late = _late_points(lab, A)
    lab.more(A, 3)
    r = lab.run(A)  # not yet a look-back: the new points only
    assert r.status == 0, r.lines
    t = lab.tally(A)
    assert (t.lost, t.duplicates) == (len(late), 0)
    _shift_lookback(lab, A, 6 * 3600 + 60)  # half the late window later
    r = lab.run(A)
    assert r.status == 0, r.lines
    (line,) = [x for x in r.lines if f"collect {A}: ok" in x]
    assert f"late={len(late)}" in line and "points=2 " in line, line
    t = lab.tally(A)
    assert (t.lost, t.duplicates) == (0, 0), t
    run = history.load(str(lab.state), A)[-1]
    assert run["late"] == len(late)
    # The next look-back finds them sent: nothing goes out twice.
    _shift_lookback(lab, A, 6 * 3600 + 60)
    r = lab.run(A)
    assert r.status == 0 and any("points=0 " in x for x in r.lines), r.lines
    t = lab.tally(A)
    assert (t.lost, t.duplicates) == (0, 0), t
    figures.fault("data", f"late points behind the checkpoint ({len(late)})", 0,
                  "handled: sent by the next look-back ([collect] late_window)", t, 1)


def test_late_points_after_an_upgrade_resend_nothing_already_sent(lab):
    """A checkpoint from before the look-back existed: its record starts at the checkpoint."""
    lab.set("collect", **LATE["collect"])
    lab.add_host(A)
    assert lab.run(A).status == 0
    path = lab.state / "hosts" / A / "checkpoint.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({k: doc[k] for k in ("version", "scheme", "pairs")}))
    assert lab.run(A).status == 0  # starts the record
    _shift_lookback(lab, A, 6 * 3600 + 60)
    assert lab.run(A).status == 0
    t = lab.tally(A)
    assert (t.lost, t.duplicates) == (0, 0), t


def _many(lab, host: str, tests: int) -> None:
    """``host`` with ``tests`` more tests (2 series each) behind the lab's four series."""
    h = lab.hosts[host].hosts[host]
    start = int(time.time()) // STEP * STEP - 200 * STEP
    for _ in range(tests):
        h.add_test("latencybg", event_types=["packet-loss-rate", "histogram-owdelay"],
                   start=start, step=STEP, count=100)


def test_run_deadline_ends_a_run_whose_archive_answers_nothing(lab, figures):
    lab.add_host(A)
    lab.add_host(B)
    _many(lab, A, 20)  # 44 series
    lab.sim.fault(A, "slow", delay=60.0, path="/base")
    extra = {"collect": {"run_deadline": "10s"}, "archive": {"give_up_after": 0}}
    took, r = elapsed(lab.run, A, **extra)
    # Without a deadline: 44 series / 2 parallel x 2 tries x 1 s + backoff = about 55 s.
    assert took < 10 + 4 * 1 + 3, (took, r.lines)
    assert r.status == 1
    line = r.failed_line(A)
    assert "run deadline of 10s" in line and "series not read" in line, line
    lab.sim.clear_faults(A)
    assert lab.run(B).status == 0
    assert lab.tally(B).lost == 0
    runs, t = lab.catch_up(A)
    figures.fault("archive", f"no data answer at all, 44 series (run_deadline 10s: {took:.0f}s)",
                  r.status, line, t, runs)


def test_an_archive_gone_mid_run_is_given_up_early(lab, figures):
    lab.add_host(A)
    _many(lab, A, 20)
    lab.sim.fault(A, "slow", delay=60.0, path="/base")
    took, r = elapsed(lab.run, A)
    # give_up_after 3: about 3 series' tries (2 x 1 s each, 2 at a time), not 44.
    assert took < 15, (took, r.lines)
    assert r.status == 1
    line = r.failed_line(A)
    assert "archive gone: 3 series in a row" in line, line
    lab.sim.clear_faults(A)
    runs, t = lab.catch_up(A)
    figures.fault("archive", f"archive gone after its metadata, 44 series (given up: {took:.0f}s)",
                  r.status, line, t, runs)


def _stopped_mid_run(lab, h, cmd: list[str], env: dict, cwd: str) -> tuple[int, str]:
    """Run ``cmd`` (a collect of ``h``), SIGTERM it while a data request hangs: (status, stderr)."""
    seen = len(h.log)
    fault = lab.sim.fault(h.name, "stall", path="/base")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 30
        while not any("/base" in q.path for q in h.log[seen:]):  # a data request is under way
            assert time.monotonic() < end and proc.poll() is None, proc.communicate()
            time.sleep(0.01)  # polling with a deadline, not synchronisation by sleep
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        fault.release()
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_a_run_stopped_by_sigterm_records_why(lab, figures):
    lab.add_host(A)
    assert lab.run(A).status == 0
    lab.more(A, 120)
    h = lab.hosts[A].hosts[A]
    env = {"PYTHONPATH": str(ROOT), "PSPROBE_CONFIG": str(lab.conf), "PATH": "/usr/bin:/bin"}
    rc, err = _stopped_mid_run(lab, h, [*CLI, "collect", A], env, str(ROOT))
    assert rc == -signal.SIGTERM, err
    (line,) = [x for x in err.splitlines() if f"collect {A}: FAILED" in x]
    assert "error=stopped by SIGTERM" in line, err
    run = history.load(str(lab.state), A)[-1]
    assert run["status"] == 143 and "SIGTERM" in run["error"]
    st = subprocess.run([*CLI, "status", "--json", A], env=env, cwd=str(ROOT),
                        capture_output=True, text=True, timeout=60)
    (row,) = json.loads(st.stdout)["hosts"]
    assert row["result"] == "FAILED" and "stopped by SIGTERM" in row["error"], row
    lab.sim.clear_faults(A)
    runs, t = lab.catch_up(A)
    figures.fault("process", "stopped by SIGTERM mid-run (systemctl stop, TimeoutStartSec)",
                  143, line, t, runs)


def test_look_back_and_a_stopped_run_as_the_service_user(sim, fbus, figures):
    """As the user the units run as: the look-back's state and a SIGTERM record are its own."""
    with service_lab(sim, fbus, (A,), "psprobe-run.", **LATE["collect"]) as (lab, uid, _, py):
        env = lab.env()
        cmd = [*py, "-c", CLI[2], "collect", A]

        def run() -> subprocess.CompletedProcess:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                                  cwd="/")

        assert run().returncode == 0
        late = _late_points(lab, A)
        _shift_lookback(lab, A, 6 * 3600 + 60)
        r = run()
        assert r.returncode == 0 and f"late={len(late)}" in r.stderr, r.stderr
        t = lab.tally(A)
        assert (t.lost, t.duplicates) == (0, 0), t
        lab.more(A, 120)
        h = lab.hosts[A].hosts[A]
        rc, err = _stopped_mid_run(lab, h, cmd, env, "/")
        assert rc == -signal.SIGTERM and "error=stopped by SIGTERM" in err, err
        assert history.load(str(lab.state), A)[-1]["status"] == 143
        lab.sim.clear_faults(A)
        r = run()
        assert r.returncode == 0, r.stderr
        t = lab.tally(A)
        assert t.lost == 0, t
        owners = {q.stat().st_uid for q in (lab.state / "hosts" / A).iterdir()}
        assert owners == {uid}, owners
