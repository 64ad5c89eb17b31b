"""Operator controls: pause/resume every timer, and the journal of one host.

``pause`` stops psprobe-sync.timer and every host timer (``force``: running
collects too; a killed collect resends at most its confirm window) and leaves a
marker, ``paused.json`` in the state directory.  Timers come back at the
next boot (timers.target wants them), so a collect or sync started by systemd
while the marker is there does nothing and says so.  ``resume`` removes the
marker and starts what sync would have running: the sync timer when it is
enabled, and the timer of every host whose link sync wrote.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psprobe import state

log = logging.getLogger("psprobe.control")

MARKER = "paused.json"
SYNC_TIMER = "psprobe-sync.timer"
SERVICES = "psprobe@*.service"

Systemctl = Callable[..., subprocess.CompletedProcess]


class ControlError(Exception):
    """systemctl refused; one line."""


def paused(state_dir: str) -> dict[str, Any] | None:
    """The pause marker (``{"time", "by", "force"}``), or None when not paused."""
    try:
        rec = state.read_json(Path(state_dir) / MARKER)
    except (ValueError, OSError):
        return {"time": 0, "by": "?"}  # unreadable marker: still a marker
    return rec if isinstance(rec, dict) else None


def under_systemd() -> bool:
    """Started by a unit (systemd sets INVOCATION_ID): the runs a pause must hold back."""
    return bool(os.environ.get("INVOCATION_ID"))


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _check(cp: subprocess.CompletedProcess, what: str) -> None:
    if cp.returncode != 0:
        raise ControlError(f"systemctl {what}: {cp.stderr.strip() or f'exit status {cp.returncode}'}")


def pause(state_dir: str, unit_dir: str, *, force: bool = False,
          systemctl: Systemctl | None = None, now: float | None = None) -> list[str]:
    """Write the marker, then stop the timers (and with ``force`` running collects).

    Returns the units it asked systemd to stop.  The marker goes first, so a
    timer firing in between already finds it.
    """
    from psprobe import units

    run = systemctl or units.systemctl
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    state.write_json_atomic(Path(state_dir) / MARKER, {
        "time": time.time() if now is None else now, "by": _who(), "force": force})
    stop = [SYNC_TIMER, *sorted(units.timer_name(h) for h in units.enabled_hosts(Path(unit_dir)))]
    _check(run("stop", "--no-block", *stop), "stop")
    if force:
        # A pattern matches loaded units only: exactly the collects running now.
        _check(run("stop", SERVICES), "stop")
        stop.append(SERVICES)
    return stop


def resume(state_dir: str, unit_dir: str, *, systemctl: Systemctl | None = None) -> list[str]:
    """Remove the marker and start the timers sync keeps; returns the units started."""
    from psprobe import units

    run = systemctl or units.systemctl
    with contextlib.suppress(FileNotFoundError):
        (Path(state_dir) / MARKER).unlink()
    start = sorted(units.timer_name(h) for h in units.enabled_hosts(Path(unit_dir)))
    if run("is-enabled", "--quiet", SYNC_TIMER).returncode == 0:
        start.insert(0, SYNC_TIMER)
    if start:
        _check(run("start", "--no-block", *start), "start")
    return start


def journalctl_command(host: str, extra: tuple[str, ...] | list[str]) -> list[str]:
    """``journalctl -u psprobe@<instance>.service EXTRA...`` for a canonical host."""
    from psprobe import hostnames

    return ["journalctl", "-u", f"psprobe@{hostnames.unit_instance(host)}.service", *extra]


def parse_when(text: str, now: float | None = None) -> int:
    """A time on the command line: ISO 8601 (UTC unless it names a zone), ``@EPOCH``,
    or an age like ``3d`` / ``12h`` / ``90m`` meaning that long before now."""
    import datetime as dt

    from psprobe.config import parse_duration

    now = time.time() if now is None else now
    t = text.strip()
    if t.startswith("@") and t[1:].isdigit():
        return int(t[1:])
    try:
        return int(now - parse_duration(t))
    except ValueError:
        pass
    try:
        d = dt.datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
    except ValueError:
        raise ValueError(f"not a time (ISO 8601 like 2025-11-20T06:00Z, @EPOCH, or an age "
                         f"like 3d or 12h): {text!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp())
