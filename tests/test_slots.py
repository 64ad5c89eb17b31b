"""The machine-wide bound on concurrent collects (psprobe/slots.py).

Real processes hold real flocks: the bound, the hand-over when a holder exits
or is killed, and a waiting ``bin/psprobe collect`` that has not imported the
heavy modules yet.  Waits are on /proc/locks and on pipes, never on sleeps.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, write_config

from psprobe import config, slots

HOLDER = """
import sys
from psprobe import slots
s = slots.acquire(sys.argv[1], int(sys.argv[2]), tick=0.2)
print("got", s.index, flush=True)
sys.stdin.readline()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _holder(d: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(d), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())


def _line(p: subprocess.Popen, timeout: float) -> str | None:
    """The next stdout line of ``p``, or None when none comes within ``timeout``."""
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline().strip() if ready else None


def _blocked_waiters(pids: set[int]) -> set[int]:
    """Which of ``pids`` are queued in flock right now (``->`` lines of /proc/locks)."""
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "->" and int(f[5]) in pids:
            out.add(int(f[5]))
    return out


def _wait(what: str, probe, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = probe()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout}s")


def _all_taken(d: Path, n: int) -> bool:
    for k in range(n):
        fd = os.open(d / f"slot.{k}", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        return False
    return True


def test_no_bound_when_zero(tmp_path):
    assert slots.acquire(str(tmp_path / "run"), 0) is None
    assert not (tmp_path / "run").exists()


def test_n_holders_at_most_and_a_freed_slot_goes_to_a_waiter(tmp_path):
    d = tmp_path / "run"
    procs = [_holder(d, 2) for _ in range(4)]
    try:
        got = {}
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            for p in procs:
                if p not in got and (line := _line(p, 0.05)):
                    got[p] = line
        assert sorted(got.values()) == ["got 0", "got 1"]
        waiting = [p for p in procs if p not in got]
        # The other two are parked in flock, not holding anything.
        _wait("two waiters queued in flock",
              lambda: _blocked_waiters({p.pid for p in waiting}) == {p.pid for p in waiting})
        assert _all_taken(d, 2)
        assert all(_line(p, 0) is None for p in waiting)

        # A holder finishing hands its slot on: exactly one waiter gets it.
        first = next(iter(got))
        freed = got.pop(first).split()[1]
        first.communicate("\n", timeout=10)
        line = None
        deadline = time.monotonic() + 20
        while line is None and time.monotonic() < deadline:
            for p in waiting:
                line = _line(p, 0.05)
                if line:
                    got[p] = line
                    waiting.remove(p)
                    break
        assert line == f"got {freed}"
        assert _line(waiting[0], 0.3) is None  # still only two hold a slot

        # A holder killed outright (OOM, SIGKILL) frees its slot too.
        victim = next(iter(got))
        freed = got.pop(victim).split()[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert _line(waiting[0], 20) == f"got {freed}"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_hold_is_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(slots, "_held", None)
    a = slots.hold(str(tmp_path), 3)
    assert a is not None and Path(a.path).parent == tmp_path
    assert slots.hold(str(tmp_path), 3) is a
    a.release()


def test_unusable_directory_costs_the_bound_not_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slots, "_held", None)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert slots.hold(str(blocker / "run"), 2) is None
    assert "running without the [collect] max_concurrent bound" in capsys.readouterr().err


def test_settings_read_like_the_full_configuration(tmp_path):
    assert slots.DEFAULT_CONFIG == config.DEFAULT_PATH
    assert (slots.DEFAULT_RUNTIME_DIR, slots.DEFAULT_MAX) == (
        config.Collect().runtime_dir, config.Collect().max_concurrent)
    main = write_config(tmp_path / "psprobe.conf", {"collect": {"max_concurrent": 3}})
    (tmp_path / "conf.d").mkdir()
    write_config(tmp_path / "conf.d" / "10-run.conf", {"collect": {"runtime_dir": tmp_path / "r"}})
    write_config(tmp_path / "conf.d" / "20-host.conf", {"host ps.example.org": {"max_concurrent": 1}})
    cfg = config.load(str(main))
    assert slots.settings(str(main)) == (cfg.collect.runtime_dir, cfg.collect.max_concurrent) \
        == (str(tmp_path / "r"), 3)


@pytest.mark.parametrize("text", ["[collect]\nmax_concurrent = many\n", "[collect\n",
                                  "[collect]\nruntime_dir = relative\n"])
def test_settings_leave_a_bad_file_to_the_full_load(tmp_path, text):
    p = tmp_path / "psprobe.conf"
    p.write_text(text)
    assert slots.settings(str(p)) is None
    with pytest.raises(config.ConfigError):
        config.load(str(p))


@pytest.mark.parametrize("argv", [
    ["sync"], ["collect"], ["collect", "h", "--dry-run"], ["collect", "--help"],
    ["--unknown", "collect", "h"], ["collect", "a", "b"],
])
def test_early_only_for_a_plain_collect(tmp_path, monkeypatch, argv):
    monkeypatch.setattr(slots, "_held", None)
    conf = write_config(tmp_path / "c.conf", {"collect": {"runtime_dir": tmp_path / "r"}})
    monkeypatch.setenv("PSPROBE_CONFIG", str(conf))
    assert slots.early(argv) is None
    assert not (tmp_path / "r").exists()


def test_early_takes_the_slot_of_the_named_config(tmp_path, monkeypatch):
    monkeypatch.setattr(slots, "_held", None)
    # state_dir: as root, early() becomes its owner (root's own here, never the default's)
    conf = write_config(tmp_path / "c.conf", {"collect": {"runtime_dir": tmp_path / "r",
                                                          "max_concurrent": 2,
                                                          "state_dir": tmp_path / "state"}})
    s = slots.early(["-v", f"--config={conf}", "collect", "ps.example.org"])
    try:
        assert s is not None and s.path in (str(tmp_path / "r" / "slot.0"),
                                            str(tmp_path / "r" / "slot.1"))
        assert slots.hold(str(tmp_path / "r"), 2) is s  # held for the rest of the process
    finally:
        s.release()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_waiting_collect_waits_before_its_imports_then_runs(tmp_path):
    run = tmp_path / "run"
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state", "runtime_dir": run, "max_concurrent": 1},
        "archive": {"timeout": "2s", "retries": 0, "schemes": "http"},
    })
    run.mkdir()
    fd = os.open(run / "slot.0", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # Nothing listens on port 9 of loopback: the run fails fast once it may start.
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "psprobe"), "--config", str(conf),
                          "collect", "127.0.0.1:9"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait("collect queued for the slot", lambda: _blocked_waiters({p.pid}))
        waiting = _rss_kb(p.pid)
        bare = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrusage("
                               "resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True,
                              check=True)
        # Within ~3 MB of a bare interpreter: click, requests and pika are not loaded yet.
        assert waiting < int(bare.stdout) + 3 * 1024, (waiting, bare.stdout)
        os.close(fd)
        fd = -1
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1, err
        assert "collect 127.0.0.1:9: FAILED" in err
    finally:
        if fd >= 0:
            os.close(fd)
        p.kill()
        p.wait(10)


@pytest.mark.parametrize(("argv", "unit"), [
    (["collect", "h"], (None, False, "h")),
    (["-v", "--config", "/c", "collect", "h"], ("/c", True, "h")),
    (["--config=/c", "--verbose", "collect", "h"], ("/c", True, "h")),
    (["collect", "h", "--dry-run"], None),
    (["collect", "--dry-run", "h"], None),
    (["--version", "collect", "h"], None),
    (["status", "collect"], None),
])
def test_the_units_command_line_is_told_apart(argv, unit):
    assert slots.unit_command(argv) == unit


def test_the_units_collect_runs_without_importing_click(tmp_path):
    """psprobe@.service's `collect HOST` (2 000 runs per interval) skips click: the same run,
    the same summary line and exit status as through the CLI."""
    conf = write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state", "runtime_dir": tmp_path / "run"},
        "archive": {"timeout": "2s", "retries": 0, "schemes": "http"},
    })
    argv = [sys.executable, str(ROOT / "bin" / "psprobe"), "--config", str(conf)]
    env = {**_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    unit = subprocess.run([*argv, "collect", "127.0.0.1:9"], capture_output=True, text=True,
                          env=env, timeout=60)
    typed = subprocess.run([*argv, "collect", "127.0.0.1:9", "--dry-run"], capture_output=True,
                           text=True, env=env, timeout=60)
    imported = [[line.rsplit("|", 1)[-1].strip() for line in cp.stderr.splitlines()
                 if line.startswith("import time:")] for cp in (unit, typed)]
    assert "click" in imported[1]  # the dry run goes through the CLI
    assert "click" not in imported[0] and "psprobe.oneshot" in imported[0]
    for cp in (unit, typed):
        assert cp.returncode == 1, cp.stderr[-2000:]
        assert "collect 127.0.0.1:9: FAILED" in cp.stderr
