"""Enablement of the per-host timers, written by sync itself, under one parent unit.

Every psprobe timer is wanted by, and ``PartOf=``, ``psprobe-timers.target``
(units/psprobe-timers.target): whether psprobe runs is that one unit's state,
kept by systemd.  ``systemctl enable psprobe@X.timer`` does nothing but make
the symlink ``psprobe-timers.target.wants/psprobe@X.timer ->
/usr/lib/systemd/system/psprobe@.timer``.  Sync writes those symlinks directly
(one directory listing instead of 2 000 ``systemctl is-enabled`` calls, and
testable with a temp dir), then asks systemd once to start the new timers and
once to stop the removed ones: by name when they are a few, with no
``daemon-reload`` (seconds of PID 1 with a fleet loaded); for many (the first
sync) one reload and one start of the target, which starts the timers it
newly wants.  Pause and resume are ``systemctl disable/enable --now`` of the target
(psprobe.control).

Beside each link goes the host's schedule, the drop-in
``psprobe@X.timer.d/10-phase.conf``: ``OnCalendar=`` every ``[collect] interval``
at a phase (seconds into the interval) hashed from the host's name.  A calendar
elapse is computed from the clock and the timer's last trigger, so no
``daemon-reload`` can bring a run forward (an ``OnActiveSec=`` trigger counts
again from every reload), and hashed phases spread 2 000 hosts evenly over the
interval after a sync or a boot as much as in steady state, on systemd 239 too
(no ``FixedRandomDelay=``).
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from psprobe import hostnames, state

log = logging.getLogger("psprobe.units")

# The parent of every psprobe timer, and where its own enablement link goes.
TARGET = "psprobe-timers.target"
WANTS = f"{TARGET}.wants"
PARENT_WANTS = "timers.target.wants"
SYNC_TIMER = "psprobe-sync.timer"
TEMPLATE = "psprobe@.timer"
TEMPLATE_DIR = Path("/usr/lib/systemd/system")
# What a psprobe before the parent unit left: its timer links in timers.target.wants,
# and `psprobe pause` as this marker in the state directory (see migrate()).
LEGACY_MARKER = "paused.json"
_PREFIX, _SUFFIX = "psprobe@", ".timer"
# The schedule drop-in sync writes in psprobe@<instance>.timer.d/.  Drop-ins apply in
# file-name order across the template's and the instance's directories: "10-" comes
# before an operator's own (override.conf of `systemctl edit`, or any name from a
# letter on), so the operator's word on a timer is the last one.
DROPIN = "10-phase.conf"
DEFAULT_INTERVAL = 600  # [collect] interval
# systemctl's text is parsed below: keep it in one language and one zone.
_ENV = {"LC_ALL": "C", "TZ": "UTC", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
# Through the system bus rather than PID 1's private socket (root's systemctl uses that one
# by default): PID 1 sends a client there every signal of every unit it touches, whether
# it asked or not, where the bus forwards them only to subscribers: about 9 000 in one
# reload of 2 000 hosts, and more as their timers start.  Starting those 2 000 through the
# bus took PID 1 0.1-0.2 s less, and the --no-block start returned at once instead of
# after 0.7-0.9 s (bench/fleet_systemd.py; the README's Performance).
_BUS = {"SYSTEMCTL_FORCE_BUS": "1"}
# What systemctl says when the bus cannot carry a call that PID 1's socket can: no D-Bus
# daemon, or a bus policy or polkit that refuses a root without capabilities (the sync's
# sandbox) where the socket only asks for root.
_NOT_THROUGH_BUS = ("Failed to connect to bus", "Access denied", "authentication required")


Systemctl = Callable[..., subprocess.CompletedProcess]


class UnitsError(OSError):
    """systemctl refused a reload/start/stop; the symlinks are already in place.

    An OSError so that callers handling "the system refused" catch it too.
    """


def timer_name(host: str) -> str:
    """``psprobe@<instance>.timer`` of a canonical host."""
    return f"{_PREFIX}{hostnames.unit_instance(host)}{_SUFFIX}"


def phase(host: str, interval: int) -> int:
    """Seconds into every ``interval`` at which ``host`` is collected.

    A hash of the canonical host name: the same on every machine and every sync
    (no machine-id in it, unlike ``FixedRandomDelay=``), and even over the interval.
    """
    digest = hashlib.sha256(host.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % interval


def on_calendar(host: str, interval: int) -> str:
    """The ``OnCalendar=`` value of ``host``: every ``interval`` seconds, at its phase.

    ``interval`` divides an hour (whole minutes) or a day (whole hours), as
    ``[collect] interval`` guarantees, so the repetition never drifts across an
    hour or a day.  In UTC, so that daylight saving time moves nothing.
    """
    if interval < 60 or interval % 60 or not (3600 % interval == 0 or
                                               (interval % 3600 == 0 and 86400 % interval == 0)):
        raise ValueError(f"interval {interval}s divides neither an hour nor a day in whole minutes")
    p = phase(host, interval)
    hh, mm, ss = p // 3600, p // 60 % 60, p % 60
    if interval < 3600:
        minutes = interval // 60
        return f"*-*-* *:{'*' if minutes == 1 else f'{mm:02d}/{minutes}'}:{ss:02d} UTC"
    hours = interval // 3600
    hour = "*" if hours == 1 else f"{hh:02d}" if hours == 24 else f"{hh:02d}/{hours}"
    return f"*-*-* {hour}:{mm:02d}:{ss:02d} UTC"


def _span(seconds: int) -> str:
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds // 60}min"


def dropin_text(host: str, interval: int) -> str:
    """The content of ``host``'s schedule drop-in (see :data:`DROPIN`)."""
    return (
        f"# Written by psprobe sync for {host}: a run every {_span(interval)} ([collect] interval)\n"
        "# at a phase hashed from the host's name. Sync rewrites it when the interval changes\n"
        "# and removes it with the host: set the interval in the configuration.\n"
        "[Timer]\n"
        "# Empty first: drops the template's fallback triggers.\n"
        "OnCalendar=\n"
        f"OnCalendar={on_calendar(host, interval)}\n"
        "RandomizedDelaySec=0\n"
    )


def dropin_path(unit_dir: Path, host: str) -> Path:
    """``<unit_dir>/psprobe@<instance>.timer.d/10-phase.conf`` of a canonical host."""
    return Path(unit_dir) / f"{timer_name(host)}.d" / DROPIN


def enabled_hosts(unit_dir: Path) -> set[str]:
    """Hosts whose timer is enabled in ``unit_dir``: the set sync compares the meshes with."""
    return set(_enabled(Path(unit_dir), warn=True).values())


def _host_of(name: str) -> str:
    """The host of a ``psprobe@<instance>.timer`` link name; ValueError for any other name."""
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
        raise ValueError("not a psprobe host timer")
    return hostnames.from_instance(name[len(_PREFIX) : -len(_SUFFIX)])


def _enabled(unit_dir: Path, *, warn: bool = False) -> dict[str, str]:
    """Link name -> host of every psprobe host timer symlink in ``unit_dir``.

    The links of an older psprobe in timers.target.wants count too, until
    :func:`migrate` (the package's upgrade, or the next sync) moves them.
    """
    hosts = {}
    for d in (unit_dir / PARENT_WANTS, unit_dir / WANTS):
        try:
            with os.scandir(d) as it:  # the file type comes with the name: no stat
                names = [e.name for e in it if e.is_symlink()]
        except FileNotFoundError:
            continue
        for name in names:
            if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
                continue  # another package's timer, or the sync timer
            try:
                hosts[name] = _host_of(name)
            except ValueError as e:
                if warn:
                    log.warning("ignoring %s in %s: not a psprobe host timer (%s)", name, d, e)
    return hosts


def target_enabled(unit_dir: Path) -> bool:
    """``psprobe-timers.target`` is enabled in ``unit_dir``: psprobe is not paused."""
    return os.path.islink(Path(unit_dir) / PARENT_WANTS / TARGET)


def paused(unit_dir: Path) -> bool:
    """``psprobe pause``: the target is disabled while the sync timer is enabled under it.

    The links say it, as systemd reads them (UnitFileState).  Hosts enabled by
    hand, the sync timer and the target never enabled, are not paused: their
    timers are just stopped.
    """
    return not target_enabled(unit_dir) and os.path.islink(Path(unit_dir) / WANTS / SYNC_TIMER)


def _make_dir(d: Path) -> None:
    if not d.is_dir():
        # What systemctl enable would make, whatever the caller's umask (sync's is 0007
        # and its group psprobe: the service user must never write a unit file).
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # noqa: S103  (a unit directory: systemd's own mode)


def _link(wants: Path, name: str, target: Path) -> bool:
    """Point ``wants/name`` at ``target``; True when that changed anything."""
    try:
        os.symlink(target, os.path.join(wants, name))  # the common case, a new host: one call
        return True
    except FileExistsError:
        pass
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


def _unlink(unit_dir: Path, name: str) -> bool:
    gone = False
    for d in (WANTS, PARENT_WANTS):  # an older psprobe's link too, if not migrated yet
        try:
            (unit_dir / d / name).unlink()
        except FileNotFoundError:
            continue
        gone = True
    return gone


def _read_dropin(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("replacing %s: %s", path, e)
        return None


def _write_dropin(path: Path, text: str) -> None:
    """Make ``path`` hold ``text``: exactly 0644 whatever sync's umask, atomically (by
    psprobe.state's one writer; not fsynced: a drop-in lost in a crash is written again
    by the next sync, and systemd reads it only at the reload that follows)."""
    _make_dir(path.parent)
    state.write_atomic(path, text.encode("utf-8"), 0o644, durable=False)


def _create_dropin(unit_dir: Path, name: str, text: str) -> bool:
    """Write the first drop-in of timer ``name`` in a drop-in directory made here; False
    (nothing done) when that directory exists already.

    The common case of a first sync, 2 000 times: a mkdir and one file, where
    :func:`_write_dropin` reads, writes a temp and renames.  A crash half-way
    leaves a short or missing file that the next sync, reading it, rewrites
    (systemd reads none before sync has written them all: the reload or the
    starts come after).
    """
    d = os.path.join(unit_dir, f"{name}.d")
    try:
        os.mkdir(d, 0o755)
    except FileExistsError:
        return False
    os.chmod(d, 0o755)  # noqa: S103  (whatever sync's umask: systemd's own mode)
    fd = os.open(os.path.join(d, DROPIN),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))  # a few hundred bytes: one write
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    return True


def _remove_dropin(d: Path) -> bool:
    """Remove sync's drop-in from the drop-in directory ``d`` (and ``d`` once empty)."""
    try:
        (d / DROPIN).unlink()
    except FileNotFoundError:
        return False
    with contextlib.suppress(OSError):
        d.rmdir()  # only when empty: the operator's own drop-ins stay, and their directory
    return True


def _sweep_dropins(unit_dir: Path, links: dict[str, str]) -> int:
    """Remove sync's drop-ins whose enablement link is gone (disabled by hand, say)."""
    try:
        entries = os.listdir(unit_dir)
    except FileNotFoundError:
        return 0
    swept = 0
    for entry in entries:
        name = entry[: -len(".d")]
        if (entry.endswith(_SUFFIX + ".d") and entry.startswith(_PREFIX) and name != TEMPLATE
                and name not in links and _remove_dropin(unit_dir / entry)):
            swept += 1
    return swept


# A running timer reloaded with a new calendar fires at once when a time of the new
# calendar passed since its last run (systemd computes the next elapse from there; a
# stopped and restarted one, on 252, from its previous start).  Sync applies a changed
# schedule to a running timer only when its next time is at least this far ahead...
RESCHEDULE_MARGIN = 15
# ...or else to at most this share of the hosts per sync (those then run at once, a
# bounded burst); the others keep their schedule until a later sync.
RESCHEDULE_AT_ONCE = 1 / 20
# New timers started by name, without a daemon-reload: up to this many, or a fifth of the
# loaded ones (see _by_name).
BY_NAME_AT_MOST = 100


def next_time(host: str, interval: int, after: float) -> int:
    """The first time (epoch seconds) after ``after`` of ``host``'s calendar.

    The calendar is in UTC and ``interval`` divides a day: epoch multiples of it
    are its starts.
    """
    p = phase(host, interval)
    return p + (int((after - p) // interval) + 1) * interval


def _reschedulable(run: Systemctl, pending: dict[str, tuple[str, int]],
                   hosts: int) -> tuple[list[str], list[str]]:
    """Split timers whose schedule changed into (apply now, hold back).

    ``pending``: link name -> (host, new interval); ``hosts``: all enabled.
    One ``systemctl show`` says which timers run and when each last fired.
    """
    cp = run("show", "-p", "Id", "-p", "ActiveState", "-p", "LastTriggerUSec",
             "-p", "InactiveExitTimestamp", *pending)
    props: dict[str, dict[str, str]] = {}
    if cp.returncode == 0:
        for block in cp.stdout.split("\n\n"):
            p = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "Id" in p:
                props[p["Id"]] = p
    now = time.time()
    ok, late = [], []
    for name, (host, interval) in pending.items():
        p = props.get(name)
        if p is not None and p.get("ActiveState") in ("inactive", "failed"):
            ok.append(name)  # not running: a reload arms nothing
            continue
        base = None if p is None else (_timestamp(p.get("LastTriggerUSec", ""))
                                       or _timestamp(p.get("InactiveExitTimestamp", "")))
        if base is not None and next_time(host, interval, base) > now + RESCHEDULE_MARGIN:
            ok.append(name)
        else:
            late.append(name)
    at_once = max(1, int(hosts * RESCHEDULE_AT_ONCE))
    return ok + late[:at_once], late[at_once:]


def systemctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``systemctl ARGS`` (text captured, never raising for its exit code).

    Through the system bus (see :data:`_BUS`); where it cannot carry the call (no D-Bus
    daemon running, or it refuses), through PID 1's socket, within the same ``timeout``.
    A machine without systemctl answers with exit code 127, like a shell would.
    """
    deadline = time.monotonic() + timeout
    cp = _systemctl(args, {**os.environ, **_ENV, **_BUS}, timeout)
    if cp.returncode != 0 and any(m in cp.stderr for m in _NOT_THROUGH_BUS):
        cp = _systemctl(args, {**os.environ, **_ENV}, max(0.0, deadline - time.monotonic()))
    return cp


def _systemctl(args: tuple[str, ...], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    cmd = ["systemctl", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", "systemctl: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"systemctl: no answer in {timeout:g}s")


def _steps(run: Systemctl, steps: list[tuple[str, ...]],
           meanwhile: Callable[[], object] | None = None) -> None:
    """Run each systemctl step; stop after a failed daemon-reload; raise :class:`UnitsError`.

    ``meanwhile`` runs before any start or stop: during a first ``daemon-reload``,
    which starts nothing (PID 1 works on one core, ``meanwhile`` on the other).  Its
    error is raised once the reload ended, and then nothing starts.
    """
    answered: dict[int, subprocess.CompletedProcess] = {}  # step index -> its answer
    if meanwhile is not None and steps[:1] == [("daemon-reload",)]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="psprobe-reload") as pool:
            reloading = pool.submit(run, *steps[0])
            meanwhile()  # on an error, the pool still waits for the reload
        answered[0] = reloading.result()
    elif meanwhile is not None:
        meanwhile()
    errors = []
    for i, step in enumerate(steps):
        cp = answered.get(i) or run(*step)
        if cp.returncode != 0:
            errors.append(f"systemctl {step[0]}: {cp.stderr.strip() or f'exit {cp.returncode}'}")
            if step[0] == "daemon-reload":
                break
    if errors:
        raise UnitsError("; ".join(errors))


def apply(
    unit_dir: Path,
    add: Iterable[str],
    remove: Iterable[str],
    *,
    interval: int | Callable[[str], int] = DEFAULT_INTERVAL,
    template_dir: Path = TEMPLATE_DIR,
    systemctl: Systemctl | None = systemctl,
    meanwhile: Callable[[], object] | None = None,
) -> None:
    """Enable the timers of ``add`` and disable those of ``remove``; keep the schedules.

    Writes only inside ``unit_dir``: the links in ``psprobe-timers.target.wants``,
    and beside every link found there afterwards (sync's, or one made by hand)
    the host's schedule drop-in (:func:`dropin_text`, ``interval`` seconds, or
    ``interval(host)``), written only when its content changes; a drop-in
    whose link is gone is removed.  When something changed, ``systemctl`` (None:
    no call at all, for images and tests) is called: unless psprobe is paused,
    one ``start --no-block`` of the new timers by name (:func:`_by_name`), or
    for many of them one ``daemon-reload`` and one ``start --no-block
    psprobe-timers.target`` (starting the parent starts every timer it newly
    wants, running ones stay as they are); then one ``stop --no-block`` of the
    removed timers.  A changed schedule always reloads.  Paused, the new links
    wait for ``psprobe resume``.  Raises :class:`UnitsError` when systemctl
    fails.  ``meanwhile`` (sync's target.json files) is called once, after the
    unit files are written and before any timer starts (see :func:`_steps`).

    A timer already running whose schedule changes (a new interval, or the
    first drop-in of a timer enabled without one) gets it only when the
    reload will not fire it at once, or within :data:`RESCHEDULE_AT_ONCE`
    of the hosts per call; the others keep theirs until a later call.
    """
    run = systemctl  # the parameter hides the module's function of that name
    unit_dir = Path(unit_dir)
    wants = unit_dir / WANTS
    target = Path(template_dir) / TEMPLATE
    stopped = []
    add = sorted(set(add))
    remove = sorted(set(remove) - set(add))
    if add:
        _make_dir(wants)
    names = [timer_name(host) for host in add]
    made = state.each(lambda name: _link(wants, name, target), names)
    started = [name for name, m in zip(names, made) if m]
    for host in remove:
        name = timer_name(host)
        if _unlink(unit_dir, name):
            stopped.append(name)
    every = interval if callable(interval) else (lambda _host: interval)
    links = _enabled(unit_dir)
    new = set(started)

    def schedule(item: tuple[str, str]) -> tuple[str, int, Path, str] | None:
        """The host's schedule as its drop-in should be, or None when it is so already."""
        name, host = item
        seconds = every(host)
        text = dropin_text(host, seconds)
        if name in new and _create_dropin(unit_dir, name, text):
            return None  # a new host's first schedule: nothing to compare or replace
        path = dropin_path(unit_dir, host)
        return None if _read_dropin(path) == text else (host, seconds, path, text)

    items = sorted(links.items())
    changed = {name: c for (name, _), c in zip(items, state.each(schedule, items)) if c}
    pending = {n: (c[0], c[1]) for n, c in changed.items() if n not in new}
    held: list[str] = []
    rescheduled = list(pending)
    if pending and run is not None:
        rescheduled, held = _reschedulable(run, pending, len(links))
    for name in sorted(new & set(changed)) + rescheduled:
        _write_dropin(changed[name][2], changed[name][3])
    swept = _sweep_dropins(unit_dir, links)
    if started or stopped or rescheduled or swept:
        log.info("timers enabled: %d, disabled: %d, rescheduled: %d; schedules removed: %d",
                 len(started), len(stopped), len(rescheduled), swept)
    if held:
        log.info("schedule of %d host(s) kept until a later sync: applied now, it would run "
                 "them at once", len(held))
    if run is None or not (started or stopped or rescheduled or swept):
        if meanwhile is not None:
            meanwhile()
        return
    go = started if target_enabled(unit_dir) else []
    if started and not go:
        log.info("psprobe is paused (%s disabled): the %d new timer(s) start at `psprobe resume`",
                 TARGET, len(started))
    steps: list[tuple[str, ...]]
    if not rescheduled and _by_name(run, go, len(links) - len(started)):
        # No daemon-reload: with the fleet loaded it costs PID 1 ~0.7 ms per unit (seconds
        # for 2 000 hosts) and changes nothing that is loaded.  A timer not loaded yet is
        # read from disk, drop-in included, when it is started.  The target's list of what
        # it wants refreshes at the next reload (boot, rpm, `psprobe resume`); until then
        # the new timers are still stopped with it (their PartOf=).
        steps = [("start", "--no-block", *go)] if go else []
    else:
        steps = [("daemon-reload",)]
        if go:
            steps.append(("start", "--no-block", TARGET))
    if stopped:
        steps.append(("stop", "--no-block", *stopped))
    _steps(run, steps, meanwhile)


def _by_name(run: Systemctl, names: list[str], loaded: int) -> bool:
    """Whether to start ``names`` by name, without a daemon-reload.

    Only a few against the ``loaded`` timers (by name, a timer costs PID 1 about
    ten times its share of a reload: bench/fleet_systemd.py), only while the
    target runs (started again, it would start what it wanted at the last
    reload), and only when none of them is loaded yet: not loaded, a timer is
    read from disk, drop-in included, when it starts; loaded, it may hold an
    older configuration (a host removed and back within one boot, or a timer
    looked at before it was enabled).  One ``list-units`` of the exact names
    says which are loaded (a ``show`` would load them, at several ms each).
    """
    if not names:
        return True
    if len(names) > max(BY_NAME_AT_MOST, loaded // 5):
        return False
    cp = run("list-units", "--all", "--plain", "--no-legend", "--full", TARGET, *names)
    if cp.returncode != 0:
        return False
    listed = {f[0]: f for f in (line.split() for line in cp.stdout.splitlines()) if len(f) > 2}
    return set(listed) == {TARGET} and listed[TARGET][2] == "active"


def _legacy_links(old: Path) -> list[str]:
    """An older psprobe's timer links in ``old`` (timers.target.wants): symlinks named
    psprobe-sync.timer or psprobe@<host>.timer, nothing else."""
    try:
        names = sorted(os.listdir(old))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name != SYNC_TIMER:
            if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
                continue  # another package's, or the report timer: it stays wanted there
            try:
                _host_of(name)
            except ValueError as e:
                log.warning("leaving %s in %s: not a psprobe host timer (%s)", name, old, e)
                continue
        if os.path.islink(old / name):
            found.append(name)
    return found


def migrate(unit_dir: Path, state_dir: str | Path, *, template_dir: Path = TEMPLATE_DIR,
            systemctl: Systemctl | None = systemctl) -> int:
    """Move an older psprobe's enablement under ``psprobe-timers.target``; idempotent.

    Before the parent unit, psprobe linked psprobe@<host>.timer and
    psprobe-sync.timer in timers.target.wants and kept a pause as
    ``paused.json`` in ``state_dir``.  Each such link is renamed into
    psprobe-timers.target.wants (its timer keeps running); the target is
    enabled first, unless the marker says psprobe was paused: then it stays
    disabled, which is the pause now (it survives a reboot, which the marker
    alone did not).  The marker goes.  When links moved: one ``daemon-reload``
    and, not paused, one ``start --no-block`` of the target, which leaves
    running timers as they are.  Returns how many links moved; a second call
    moves none and calls nothing.  Another package's links, the report timer's
    and names that are no psprobe host timer stay where they are.
    """
    unit_dir = Path(unit_dir)
    old = unit_dir / PARENT_WANTS
    marker = Path(state_dir) / LEGACY_MARKER
    was_paused = os.path.lexists(marker)
    names = _legacy_links(old)
    if names:
        if not was_paused:  # enabled before any link leaves: an interrupted run resumes alike
            _link(old, TARGET, Path(template_dir) / TARGET)
        _make_dir(unit_dir / WANTS)
        for name in names:
            if os.path.lexists(unit_dir / WANTS / name):
                (old / name).unlink()  # a sync of this version already linked it
            else:
                os.rename(old / name, unit_dir / WANTS / name)
        log.info("moved %d timer link(s) from %s to %s%s", len(names), old, unit_dir / WANTS,
                 "; psprobe stays paused (psprobe resume)" if was_paused else "")
    if was_paused:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    if not names or systemctl is None:
        return len(names)
    steps: list[tuple[str, ...]] = [("daemon-reload",)]
    if target_enabled(unit_dir):
        steps.append(("start", "--no-block", TARGET))
    _steps(systemctl, steps)
    return len(names)


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
