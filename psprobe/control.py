"""Operator controls: pause/resume every timer, and the journal of one host.

Every psprobe timer (each host's and the sync timer) is ``PartOf=`` and wanted
by ``psprobe-timers.target`` (units/psprobe-timers.target), so pausing is
systemd's own state of that one unit, nothing kept beside it: ``pause``
disables and stops it, which stops every timer at once and keeps them off
across reboots (timers.target no longer wants it); ``force`` also stops the
collects running now (a killed collect resends at most its confirm window).
``resume`` enables and starts it, which starts every timer it wants again.
A sync while paused writes its links but starts nothing.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from psprobe import units

SERVICES = "psprobe@*.service"

Systemctl = Callable[..., subprocess.CompletedProcess]


class ControlError(Exception):
    """systemctl refused; one line."""


def _check(cp: subprocess.CompletedProcess, what: str) -> None:
    if cp.returncode != 0:
        raise ControlError(f"systemctl {what}: {cp.stderr.strip() or f'exit status {cp.returncode}'}")


def pause(*, force: bool = False, systemctl: Systemctl | None = None) -> list[str]:
    """``systemctl disable --now psprobe-timers.target`` (and with ``force`` stop the
    running collects); returns the units it asked systemd to stop."""
    run = units.systemctl if systemctl is None else systemctl
    _check(run("disable", "--now", units.TARGET), "disable")
    stopped = [units.TARGET]
    if force:
        # A pattern matches loaded units only: exactly the collects running now.
        _check(run("stop", SERVICES), "stop")
        stopped.append(SERVICES)
    return stopped


def resume(*, systemctl: Systemctl | None = None) -> list[str]:
    """``systemctl enable --now psprobe-timers.target``; returns the units started."""
    run = units.systemctl if systemctl is None else systemctl
    _check(run("enable", "--now", units.TARGET), "enable")
    return [units.TARGET]


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


# --- the journal of a host that pushes (psprobe receive's lines that name it)

RECEIVE_SERVICE = "psprobe-receive.service"


def host_pattern(host: str) -> str:
    """A regular expression for the host's name as a whole word (the same in PCRE2 and Python):
    ``a.example`` does not match in ``data.example`` nor ``a.example.org``."""
    import re

    from psprobe import hostnames

    name = hostnames.split(host)[0]
    return rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)"


def journal_grep(version: str | None = None) -> bool:
    """Does ``journalctl --grep`` work here?  systemd 237 or later, built with PCRE2
    (``+PCRE2`` in ``journalctl --version``; EL8's 239 and EL9's 252 are)."""
    import re

    if version is None:
        try:
            version = subprocess.run(["journalctl", "--version"], capture_output=True, text=True,
                                     timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
    m = re.match(r"systemd (\d+)", version)
    return bool(m) and int(m.group(1)) >= 237 and "+PCRE2" in version


def receive_journal_command(host: str, extra: tuple[str, ...] | list[str], *,
                            grep: bool) -> list[str]:
    """``journalctl -u psprobe-receive.service --grep=HOST EXTRA...``; without ``grep`` (an
    older journalctl) the lines are filtered by :func:`filter_lines`, hence no pager."""
    if grep:
        return ["journalctl", "-u", RECEIVE_SERVICE, f"--grep={host_pattern(host)}", *extra]
    return ["journalctl", "-u", RECEIVE_SERVICE, "--no-pager", *extra]


def filter_lines(lines, host: str):
    """The lines that name ``host`` (as ``--grep`` would, case-insensitive as its lower-case
    pattern is), for a journalctl that has no ``--grep``."""
    import re

    pattern = re.compile(host_pattern(host), re.IGNORECASE)
    return (line for line in lines if pattern.search(line))
