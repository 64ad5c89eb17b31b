"""Enablement of the per-host timers, written by sync itself.

``systemctl enable psprobe@X.timer`` does nothing but make the symlink
``timers.target.wants/psprobe@X.timer -> /usr/lib/systemd/system/psprobe@.timer``.
Sync writes those symlinks directly (one directory listing instead of 2 000
``systemctl is-enabled`` calls, and testable with a temp dir), then asks systemd
once to reload and to start/stop only the timers that changed.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from psprobe import hostnames

log = logging.getLogger("psprobe.units")

TIMER_WANTS = "timers.target.wants"
TEMPLATE = "psprobe@.timer"
_PREFIX, _SUFFIX = "psprobe@", ".timer"
# systemctl's text is parsed below: keep it in one language and one zone.
_ENV = {"LC_ALL": "C", "TZ": "UTC", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


class UnitsError(OSError):
    """systemctl refused a reload/start/stop; the symlinks are already in place.

    An OSError so that callers handling "the system refused" catch it too.
    """


def timer_name(host: str) -> str:
    """``psprobe@<instance>.timer`` of a canonical host."""
    return f"{_PREFIX}{hostnames.unit_instance(host)}{_SUFFIX}"


def enabled_hosts(unit_dir: Path) -> set[str]:
    """Hosts whose timer is enabled in ``unit_dir``: the set sync compares the meshes with."""
    wants = Path(unit_dir) / TIMER_WANTS
    try:
        names = os.listdir(wants)
    except FileNotFoundError:
        return set()
    hosts = set()
    for name in names:
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
            continue  # another package's timer
        instance = name[len(_PREFIX) : -len(_SUFFIX)]
        try:
            hosts.add(hostnames.from_instance(instance))
        except ValueError as e:
            log.warning("ignoring %s in %s: not a psprobe host timer (%s)", name, wants, e)
    return hosts


def _make_wants(wants: Path) -> None:
    if not wants.is_dir():
        wants.mkdir(parents=True, exist_ok=True)
        # What systemctl enable would make, whatever the caller's umask.
        os.chmod(wants, 0o755)  # noqa: S103  (a unit directory: systemd's own mode)


def _link(wants: Path, name: str, target: Path) -> bool:
    """Point ``wants/name`` at ``target``; True when that changed anything."""
    path = wants / name
    try:
        if os.readlink(path) == str(target):
            return False
    except FileNotFoundError:
        pass
    except OSError:  # a plain file where the link belongs: replaced below
        log.warning("replacing %s, which is not a symlink", path)
    tmp = wants / f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return True


def _unlink(wants: Path, name: str) -> bool:
    try:
        (wants / name).unlink()
    except FileNotFoundError:
        return False
    return True


def apply(
    unit_dir: Path,
    add: Iterable[str],
    remove: Iterable[str],
    *,
    template_dir: Path = Path("/usr/lib/systemd/system"),
    systemctl: bool = True,
) -> None:
    """Enable the timers of ``add`` and disable those of ``remove``.

    Writes only inside ``unit_dir/timers.target.wants``.  When something
    changed and ``systemctl`` is true: one ``daemon-reload``, then one
    ``start --no-block`` of the new timers and one ``stop --no-block`` of the
    removed ones.  Raises :class:`UnitsError` when systemctl fails.
    """
    wants = Path(unit_dir) / TIMER_WANTS
    target = Path(template_dir) / TEMPLATE
    started = []
    stopped = []
    add = sorted(set(add))
    remove = sorted(set(remove) - set(add))
    if add:
        _make_wants(wants)
    for host in add:
        name = timer_name(host)
        if _link(wants, name, target):
            started.append(name)
    for host in remove:
        name = timer_name(host)
        if _unlink(wants, name):
            stopped.append(name)
    if started or stopped:
        log.info("timers enabled: %d, disabled: %d", len(started), len(stopped))
    if not systemctl or not (started or stopped):
        return
    errors = []
    steps = [("daemon-reload",)]
    if started:
        steps.append(("start", "--no-block", *started))
    if stopped:
        steps.append(("stop", "--no-block", *stopped))
    for step in steps:
        cp = _run(*step)
        if cp.returncode != 0:
            errors.append(f"systemctl {step[0]}: {cp.stderr.strip() or f'exit {cp.returncode}'}")
            if step[0] == "daemon-reload":
                break
    if errors:
        raise UnitsError("; ".join(errors))


def _run(*args: str) -> subprocess.CompletedProcess:
    # apply()'s keyword argument hides the function's name; tests monkeypatch it.
    return systemctl(*args)


def systemctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``systemctl ARGS`` (text captured, never raising for its exit code).

    A machine without systemctl answers with exit code 127, like a shell would.
    """
    cmd = ["systemctl", *args]
    env = {**os.environ, **_ENV}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", "systemctl: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"systemctl: no answer in {timeout:g}s")


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0,
    "min": 60.0, "m": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0,
    "w": 7 * 86400.0, "month": 2629800.0, "y": 31557600.0,
}  # fmt: skip
_SPAN_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")


def _timespan(text: str) -> float | None:
    """Seconds of a systemd timespan (``1h 2min 3.5s``); None for 0/empty/infinity."""
    text = text.strip()
    if not text or text in ("0", "infinity", "n/a"):
        return None
    total, end = 0.0, 0
    for m in _SPAN_RE.finditer(text):
        if m.group(2) not in _SPAN_UNITS or text[end : m.start()].strip():
            return None
        total += float(m.group(1)) * _SPAN_UNITS[m.group(2)]
        end = m.end()
    return total if end and not text[end:].strip() and total > 0 else None


def _timestamp(text: str) -> float | None:
    """Epoch seconds of systemctl's ``Sun 2025-11-23 10:00:00 UTC`` (or ``@EPOCH``)."""
    text = text.strip()
    if not text or text in ("0", "n/a"):
        return None
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            return None
    parts = text.split()
    if len(parts) >= 3 and parts[-1] == "UTC":
        try:
            return float(calendar.timegm(time.strptime(" ".join(parts[-3:-1]), "%Y-%m-%d %H:%M:%S")))
        except ValueError:
            return None
    return None


def next_elapse(hosts: Iterable[str]) -> dict[str, float | None]:
    """When each host's timer fires next (epoch seconds), None when unknown.

    Best effort, for ``psprobe status``: one ``systemctl show`` for all hosts;
    every host maps to None where systemd is not running.
    """
    hosts = list(hosts)
    result: dict[str, float | None] = dict.fromkeys(hosts)
    if not hosts:
        return result
    names = {timer_name(h): h for h in hosts}
    cp = systemctl(
        "show", "-p", "Id", "-p", "NextElapseUSecRealtime", "-p", "NextElapseUSecMonotonic",
        *names,
    )  # fmt: skip
    if cp.returncode != 0:
        return result
    # Monotonic elapse times count from boot (CLOCK_MONOTONIC, like time.monotonic()).
    boot = time.time() - time.monotonic()
    for block in cp.stdout.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        host = names.get(props.get("Id", ""))
        if host is None:
            continue
        real = _timestamp(props.get("NextElapseUSecRealtime", ""))
        mono = _timespan(props.get("NextElapseUSecMonotonic", ""))
        when = [t for t in (real, None if mono is None else boot + mono) if t is not None]
        result[host] = min(when) if when else None
    return result
