"""``psprobe status``: is each host being collected, since when is it behind, what failed?

Everything comes from the state the collector and sync already keep (no
second source of truth): ``hosts/<host>/{target,checkpoint,history}.json``,
``sync.json``, the timer links in ``[mesh] unit_dir`` and, when systemd runs,
systemd's own view, asked once: each timer's next firing and whether it runs,
and each ``psprobe@`` service's last result.  A run that failed before it
could write its record (state directory unusable, a crash at start) exists
only there, so a host whose unit systemd lists failed is failing here too:
``systemctl --failed`` and ``psprobe status`` agree.  A mesh that failed at
the last sync (``sync.json``) is an alarm as well: while it fails, sync
removes no host.  Reading it costs a few small files per host, nothing is
written, and no lock is taken (a running collect is detected by trying a
shared lock on its lock file, which never blocks it).

A host that pushes its runs to ``psprobe receive`` (``sync.json``'s
``"pushing"``: it has no timer) gets a row with the same columns from
``hosts/<host>/received.json``, receive's tallies (:func:`push_status`): its
TIMER reads ``push``, LAST RUN is its last push (accepted or refused), LAST OK
the last run received, POINTS and MSGS those of the last run received and of
the last 24 h (received.json's hourly counts, so the 24 h are to the hour),
LAG now minus the newest point received.  One that has
been silent for ``[receive] silent_after`` (never pushed: since sync first
listed it) is ``lagging``, one whose last push was refused ``failing``: the
same alarms, counts and exit status as a pulled host's.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psprobe import history, hostnames, metrics, shard, state, units
from psprobe.config import Config

DAY = 86400
# Worst first: the order of the table and of the exit status' concern.
HEALTH_ORDER = ("failing", "lagging", "pending", "no data", "ok", "disabled")
ALARMS = ("failing", "lagging")
COLOURS = {"failing": "red", "lagging": "yellow", "pending": "cyan", "no data": "cyan",
           "ok": "green", "disabled": None}
SERVICES = "psprobe@*.service"
SYSTEMCTL_TIMEOUT = 15.0
# systemd's names of exit statuses (systemd.exec(5), "Process Exit Codes"), as
# `systemctl status` shows them: psprobe's own and those systemd uses when it
# could not start the process at all.
EXIT_NAMES = {
    1: "FAILURE", 2: "INVALIDARGUMENT", 3: "NOTIMPLEMENTED", 4: "NOPERMISSION",
    5: "NOTINSTALLED", 6: "NOTCONFIGURED", 7: "NOTRUNNING", 64: "USAGE", 65: "DATAERR",
    66: "NOINPUT", 67: "NOUSER", 68: "NOHOST", 69: "UNAVAILABLE", 70: "SOFTWARE", 71: "OSERR",
    72: "OSFILE", 73: "CANTCREAT", 74: "IOERR", 75: "TEMPFAIL", 76: "PROTOCOL", 77: "NOPERM",
    78: "CONFIG", 200: "CHDIR", 203: "EXEC", 216: "GROUP", 217: "USER", 226: "NAMESPACE",
    228: "SECCOMP", 233: "RUNTIME_DIRECTORY", 238: "STATE_DIRECTORY",
}  # fmt: skip


@dataclass
class Unit:
    """What systemd says of one host's ``psprobe@`` service: its last run."""

    active: str  # ActiveState: "failed" is what `systemctl --failed` lists
    result: str  # Result: success, exit-code, signal, core-dump, timeout, oom-kill, ...
    code: int | None  # ExecMainCode: 1 exited, 2 killed, 3 dumped
    exit_status: int | None  # ExecMainStatus: the exit status, or the signal
    started: float | None  # ExecMainStartTimestamp (whole seconds)
    exited: float | None  # ExecMainExitTimestamp (whole seconds)

    @property
    def failed(self) -> bool:
        return self.active == "failed"

    def reason(self, now: float) -> str:
        """``systemd: exit status 74/IOERR (last run 12:00 UTC)``."""
        n = self.exit_status
        if self.code in (2, 3) and n:
            try:
                what = f"killed by signal {signal.Signals(n).name[3:]}"
            except ValueError:
                what = f"killed by signal {n}"
            if self.code == 3:
                what += " (core dumped)"
            if self.result == "timeout":
                what = "timed out (TimeoutStartSec), " + what
        elif self.result == "exit-code" and n is not None:
            what = f"exit status {n}" + (f"/{EXIT_NAMES[n]}" if n in EXIT_NAMES else "")
        elif self.result == "timeout":
            what = "timed out (TimeoutStartSec)"
        else:
            what = f"result {self.result or 'unknown'}"
        when = self.exited or self.started
        if when is not None:
            fmt = "%H:%M UTC" if now - when < 20 * 3600 else "%Y-%m-%d %H:%M UTC"
            what += f" (last run {time.strftime(fmt, time.gmtime(when))})"
        return f"systemd: {what}"


@dataclass
class SystemdView:
    """systemd's answer for ``psprobe status``; empty where systemd does not run."""

    next_run: dict[str, float | None] = dataclasses.field(default_factory=dict)
    timers: dict[str, str] = dataclasses.field(default_factory=dict)  # host -> ActiveState
    units: dict[str, Unit] = dataclasses.field(default_factory=dict)  # host -> its service
    target: dict[str, str] = dataclasses.field(default_factory=dict)  # psprobe-timers.target
    error: str | None = None  # why systemd's view is missing (it did not answer)


@dataclass
class HostStatus:
    host: str
    health: str  # one of HEALTH_ORDER
    enabled: bool  # its timer link is in [mesh] unit_dir
    in_meshes: bool  # the last sync named it
    running: bool
    last_run: float | None  # end of the last regular collect
    last_success: float | None
    result: str | None  # "ok", "FAILED" or None (never ran)
    status: int | None  # exit status of the last collect
    error: str | None  # its error line
    points_last: int | None  # None: a push row whose received.json predates these counts
    messages_last: int | None
    points_24h: int | None
    messages_24h: int | None
    newest: int | None  # newest point the broker confirmed
    lag: float | None  # now - newest
    lag_alarm: float
    failures: int  # consecutive failed collects, the last one included
    next_run: float | None  # next timer firing, when systemd says
    last_backfill: float | None = None
    # routing key -> messages of the last collect the broker returned unroutable (a
    # warning, not a failure: the downstream binds only some keys)
    unroutable: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_24h: int = 0  # collects skipped because a backfill held the host's lock
    # "on", "off" (no timer link), "paused" (`psprobe pause`), "stopped" (enabled, but
    # systemd says the timer is not running)
    timer: str = "on"
    unit: Unit | None = None  # systemd's view of its service, when systemd was asked
    # "pull" (a timer reads its archive) or "push" (it pushes to psprobe receive).  For a
    # push row the points and messages are those the receiver accepted (24 h: to the hour),
    # and the alarm is on silence, not lag.
    kind: str = "pull"
    silence: float | None = None  # push: since the last run received (or since listed)
    silent_after: float | None = None  # push: [receive] silent_after
    # push: received.json's tallies, checked (--json leaves out their hourly rows)
    received: dict[str, Any] | None = None


@dataclass
class Overview:
    now: float
    hosts: list[HostStatus]
    paused: bool  # `psprobe pause`: psprobe-timers.target disabled and stopped
    sync: dict[str, Any] | None
    systemd_error: str | None = None
    shard: tuple[int, int] | None = None  # [mesh] shard (K, N): this machine's share

    @property
    def failed_meshes(self) -> list[str]:
        """Meshes that failed at the last sync: while one fails, sync removes no host."""
        got = (self.sync or {}).get("failed_meshes")
        return [u for u in got if isinstance(u, str)] if isinstance(got, list) else []

    @property
    def alarm(self) -> bool:
        return any(h.health in ALARMS for h in self.hosts) or bool(self.failed_meshes)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(HEALTH_ORDER, 0)
        for h in self.hosts:
            out[h.health] += 1
        return out


def read_sync(state_dir: str) -> dict[str, Any] | None:
    try:
        rec = state.read_json(state.sync_file(state_dir))
    except (ValueError, OSError):
        return None
    return rec if isinstance(rec, dict) else None


def known_hosts(cfg: Config, sync: dict[str, Any] | None = None) -> set[str]:
    """Every host with state, an enabled timer, or named by the last sync."""
    found = set(units.enabled_hosts(Path(cfg.mesh.unit_dir)))
    try:
        names = state.listdir(cfg.collect.state_dir, state.HOSTS)
    except OSError:
        names = []
    for n in names:
        try:
            if hostnames.normalise(n) == n:
                found.add(n)
        except hostnames.BadHost:
            continue
    sync = read_sync(cfg.collect.state_dir) if sync is None else sync
    found.update(h for h in (sync or {}).get("hosts", []) if isinstance(h, str))
    found.update(pushing(sync))
    return found


def pushing(sync: dict[str, Any] | None) -> dict[str, float | None]:
    """host -> since when, of the hosts the last sync listed as pushing (``sync.json``)."""
    hosts = (sync or {}).get("pushing")
    since = (sync or {}).get("pushing_since")
    since = since if isinstance(since, dict) else {}
    if not isinstance(hosts, list):
        return {}
    return {h: metrics.timestamp(since.get(h)) for h in hosts if isinstance(h, str)}


def pushes(cfg: Config, host: str) -> bool:
    """``host`` pushes to psprobe receive, or did: a push row of :func:`overview` (the last
    sync lists it as pushing, or it has a received.json and neither a timer nor a mesh)."""
    sync = read_sync(cfg.collect.state_dir)
    if host in pushing(sync):
        return True
    timer = host in units.enabled_hosts(Path(cfg.mesh.unit_dir))
    return not timer and host not in (sync or {}).get("hosts", []) and \
        metrics.read_received(cfg.collect.state_dir, host) is not None


def _newest_confirmed(state_dir: str, host: str) -> int | None:
    """The checkpoint's newest position (journal included: a running collect's too)."""
    from psprobe import checkpoint

    return checkpoint.newest(checkpoint.peek(state_dir, host))


def _same_run(rec: dict[str, Any] | None, unit: Unit) -> str:
    """Is ``rec`` (the last run record) systemd's last run? "this", "later", "none" or "?".

    A record's ``start`` falls between the service's exec and its exit (systemd
    gives whole seconds, hence the second of slack).
    """
    if unit.started is None:
        return "?"
    start = None if rec is None else rec.get("start", rec.get("end"))
    if not isinstance(start, (int, float)) or start < unit.started - 1:
        return "none"
    if start <= (unit.exited or unit.started) + 1:
        return "this"
    return "later"


def host_status(cfg: Config, host: str, *, now: float, enabled: bool, in_meshes: bool,
                next_run: float | None = None, unit: Unit | None = None) -> HostStatus:
    """One host's row; ``unit`` is systemd's view of its service (None: not asked)."""
    sd = cfg.collect.state_dir
    runs = history.load_doc(sd, host)
    regular = [r for r in runs["runs"] if history.is_regular(r)]
    last = regular[-1] if regular else None
    failures = 0
    for r in reversed(regular):
        if not r.get("status"):
            break
        failures += 1
    day = [r for r in runs["runs"] if r.get("end", 0) >= now - DAY]
    newest = _newest_confirmed(sd, host)
    if newest is None:  # no readable checkpoint: what the last runs recorded of it
        newest = history.newest(regular)
    lag = None if newest is None else max(0.0, now - newest)
    alarm = cfg.for_host(host).report.lag_alarm
    last_run = last.get("end") if last else None
    result = None if last is None else ("FAILED" if last.get("status") else "ok")
    code = None if last is None else last.get("status")
    error = last.get("error") if last else None
    sd_failed = unit is not None and unit.failed
    if sd_failed:
        # systemd's last run failed.  Its record, when it wrote one, says why; otherwise
        # systemd's reason is all there is (and the run counts as one more failure).
        seen = _same_run(last, unit)
        why = unit.reason(now)
        if seen == "this" and last is not None and not last.get("status"):
            error = f"{why}, after its run record (ok) was written"
            result, code = "FAILED", unit.exit_status
        elif seen == "none":
            error = f"{why}, no run record written"
            result, code = "FAILED", unit.exit_status
            failures += 1
            if unit.exited is not None:
                last_run = max(last_run or 0, unit.exited)
        elif seen == "later" and last is not None and not last.get("status"):
            error = (f"{why}; a later run ({ago(last.get('end'), now)}) was ok: "
                     f"`systemctl reset-failed psprobe@{hostnames.unit_instance(host)}.service` "
                     "clears systemd's record")
        elif seen == "?" and not (last is not None and last.get("status")):
            error, result, code = why, "FAILED", unit.exit_status
        failures = max(failures, 1)
    if not enabled:
        health = "disabled"
    elif (last is not None and last.get("status")) or sd_failed:
        health = "failing"
    elif lag is not None and lag > alarm:
        health = "lagging"
    elif last is None:
        health = "pending"
    elif lag is None:
        health = "no data"
    else:
        health = "ok"
    backfills = [r.get("end") for r in runs["runs"] if history.is_backfill(r)]
    return HostStatus(
        host=host, health=health, enabled=enabled, in_meshes=in_meshes,
        running=state.host_busy(sd, host),
        last_run=last_run, last_success=runs["last_success"],
        result=result, status=code, error=error,
        points_last=int(last.get("points") or 0) if last else 0,
        messages_last=int(last.get("messages") or 0) if last else 0,
        points_24h=sum(int(r.get("points") or 0) for r in day),
        messages_24h=sum(int(r.get("messages") or 0) for r in day),
        newest=newest, lag=lag, lag_alarm=alarm, failures=failures, next_run=next_run,
        last_backfill=backfills[-1] if backfills else None,
        unroutable=metrics.unroutable(last) if last else {},
        skipped_24h=sum(1 for r in day if history.is_skipped(r)),
        timer="on" if enabled else "off", unit=unit,
    )


def push_status(cfg: Config, host: str, *, now: float, listed: bool, since: float | None,
                rec: dict[str, Any] | None = None) -> HostStatus:
    """The row of a host that pushes to ``psprobe receive``, from its ``received.json``.

    ``listed``: the last sync lists it as pushing (else it used to push: "disabled");
    ``since``: when sync first listed it, the start of its silence if it never pushed.
    ``rec`` is :func:`psprobe.metrics.read_received`'s (read here when None).
    """
    rec = metrics.read_received(cfg.collect.state_dir, host) if rec is None else rec
    r = rec or {}
    last_ok, newest = r.get("last_received"), r.get("newest_ts")
    refused = r.get("refused") or {}
    refused_at = refused.get("last_time")
    # The last word from the host: a refusal after its last accepted run is a failed push.
    failed = refused_at is not None and (last_ok is None or refused_at > last_ok)
    last_try = max((t for t in (last_ok, refused_at) if t is not None), default=None)
    quiet_from = last_ok if last_ok is not None else since
    silence = None if quiet_from is None else max(0.0, now - quiet_from)
    after = cfg.receive.silent_after
    if not listed:
        health = "disabled"
    elif failed:
        health = "failing"
    elif silence is not None and silence > after:
        health = "lagging"  # silent: the alarm of a lagging pulled host
    elif last_ok is None:
        health = "pending"
    elif newest is None:
        health = "no data"
    else:
        health = "ok"
    error = None
    if failed:
        n = refused.get("count") or 1
        error = (f"push refused: {refused.get('last_reason') or 'no reason recorded'} "
                 f"({n} refused in all, last {ago(refused_at, now)})")
    elif health == "lagging":
        error = (f"nothing received for {span(silence)} ([receive] silent_after {span(after)})"
                 if last_ok is not None else
                 f"nothing received in the {span(silence)} since sync listed it as pushing "
                 f"([receive] silent_after {span(after)})")
    # Points and messages: of the last run received, and of the hours that overlap the last
    # 24 h; unknown (None) in a received.json written before receive counted them.
    counts: list[int | None] = [0, 0, 0, 0]
    day = metrics.received_between(rec, now - DAY)
    if day is not None:
        last = r.get("last") or {}
        counts = [last.get("points", 0), last.get("messages", 0), day["points"], day["messages"]]
    elif rec is not None:
        counts = [None] * 4
    return HostStatus(
        host=host, health=health, enabled=False, in_meshes=listed, running=False,
        last_run=last_try, last_success=last_ok,
        result=None if last_try is None else "FAILED" if failed else "ok", status=None,
        error=error, points_last=counts[0], messages_last=counts[1], points_24h=counts[2],
        messages_24h=counts[3],
        newest=None if newest is None else int(newest),
        lag=None if newest is None else max(0.0, now - newest),
        lag_alarm=cfg.for_host(host).report.lag_alarm, failures=1 if failed else 0,
        next_run=None, timer="push", kind="push", silence=silence, silent_after=after,
        received=rec)


def _sort_key(h: HostStatus) -> tuple:
    return (HEALTH_ORDER.index(h.health), -h.failures, -(h.lag if h.lag is not None else -1),
            h.host)


# Where systemd looks for units an administrator or a package installs: a sync into any
# other directory (an image being built, a test) has no units systemd could tell about.
UNIT_PATHS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
              "/usr/lib/systemd/system", "/lib/systemd/system")


def systemd_runs(unit_dir: str) -> bool:
    """systemd is running (sd_booted(3)'s test) and reads the units sync writes."""
    return os.path.isdir("/run/systemd/system") and \
        os.path.realpath(unit_dir) in {os.path.realpath(p) for p in UNIT_PATHS}


_TIMER_PROPS = ("NextElapseUSecRealtime", "NextElapseUSecMonotonic")
_SERVICE_PROPS = ("Result", "ExecMainCode", "ExecMainStatus", "ExecMainStartTimestamp",
                  "ExecMainExitTimestamp")


def systemd_view(timer_hosts: Iterable[str]) -> SystemdView:
    """systemd's view in ONE ``systemctl show`` (with a timeout): the timers of
    ``timer_hosts`` by name, their parent ``psprobe-timers.target`` (whether it
    runs; not since when: stopped, it is unloaded at once and its timestamps
    with it), and every ``psprobe@*.service`` by pattern.

    Why a pattern on ``show``, not ``list-units --all --failed``: a pattern
    matches the units systemd has loaded, and a failed unit is never unloaded
    (garbage-collected) until ``reset-failed``, so the pattern sees every unit
    ``systemctl --failed`` lists, plus their exit status and time, which
    list-units does not give.  Services that ran fine may have been unloaded
    (no timer holds them): for them the run records speak.  ``show`` takes
    patterns and these properties on systemd 239 (EL8) as on 252; timestamps
    come in the form ``units._timestamp`` reads (TZ=UTC, LC_ALL=C).
    """
    names = {units.timer_name(h): h for h in timer_hosts}
    props = ("Id", "ActiveState", *_TIMER_PROPS, *_SERVICE_PROPS)
    cp = units.systemctl("show", *(f"--property={p}" for p in props), *names, units.TARGET,
                         SERVICES, timeout=SYSTEMCTL_TIMEOUT)
    view = SystemdView(next_run=dict.fromkeys(names.values()))
    if cp.returncode != 0:
        view.error = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
        return view
    boot = time.time() - time.monotonic()  # monotonic elapse times count from boot
    for block in cp.stdout.split("\n\n"):
        pr = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        uid = pr.get("Id", "")
        if uid in names:
            host = names[uid]
            real = units._timestamp(pr.get("NextElapseUSecRealtime", ""))
            mono = units._timespan(pr.get("NextElapseUSecMonotonic", ""))
            when = [t for t in (real, None if mono is None else boot + mono) if t is not None]
            view.next_run[host] = min(when) if when else None
            view.timers[host] = pr.get("ActiveState", "")
        elif uid == units.TARGET:
            view.target = pr
        elif uid.startswith("psprobe@") and uid.endswith(".service"):
            try:
                host = hostnames.from_instance(uid[len("psprobe@"):-len(".service")])
            except ValueError:
                continue
            view.units[host] = Unit(
                active=pr.get("ActiveState", ""), result=pr.get("Result", ""),
                code=_int(pr.get("ExecMainCode")), exit_status=_int(pr.get("ExecMainStatus")),
                started=units._timestamp(pr.get("ExecMainStartTimestamp", "")),
                exited=units._timestamp(pr.get("ExecMainExitTimestamp", "")))
    return view


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def overview(cfg: Config, only: Iterable[str] | None = None, *, now: float | None = None,
             next_elapse: Callable[[Iterable[str]], dict[str, float | None]] | None = None,
             systemd: Callable[[Iterable[str]], SystemdView] | None = None) -> Overview:
    """Status of ``only`` (default: every known host), worst first.

    ``systemd`` gives systemd's view (:func:`systemd_view`, asked once for all
    hosts, by default when systemd is running); ``next_elapse`` (tests) only
    the next timer firings.
    """
    now = time.time() if now is None else now
    sync = read_sync(cfg.collect.state_dir)
    enabled = units.enabled_hosts(Path(cfg.mesh.unit_dir))
    hosts = sorted(known_hosts(cfg, sync) if only is None else set(only))
    wanted = set((sync or {}).get("hosts", []))
    pushed = pushing(sync)
    if systemd is None and next_elapse is None and systemd_runs(cfg.mesh.unit_dir):
        systemd = systemd_view
    timed = [h for h in hosts if h in enabled]
    if systemd is not None:
        view = systemd(timed)
    else:
        view = SystemdView(next_run=next_elapse(timed) if next_elapse else {})
    if only is None:
        # A failed unit of a host psprobe has no state for (a run that died before
        # making its directory) is shown too: systemctl --failed lists it.
        hosts = sorted(set(hosts) | {h for h, u in view.units.items() if u.failed})
    # The target's links say paused (systemd reads the same); a target disabled but still
    # active (disable without --now) runs its timers until the next boot: not paused yet.
    paused = units.paused(Path(cfg.mesh.unit_dir)) and view.target.get("ActiveState") != "active"
    rows = []
    for h in hosts:
        if h not in enabled and h not in wanted:
            # A host that pushes, or did (its received.json, no timer): a push row.
            rec = metrics.read_received(cfg.collect.state_dir, h)
            if h in pushed or rec is not None:
                rows.append(push_status(cfg, h, now=now, listed=h in pushed, since=pushed.get(h),
                                        rec=rec))
                continue
        row = host_status(cfg, h, now=now, enabled=h in enabled, in_meshes=h in wanted,
                          next_run=view.next_run.get(h), unit=view.units.get(h))
        if row.enabled and paused:
            row.timer = "paused"
        elif row.enabled and view.timers.get(h, "active") != "active":
            row.timer = "failed" if view.timers[h] == "failed" else "stopped"
        rows.append(row)
    rows.sort(key=_sort_key)
    return Overview(now, rows, paused, sync, view.error, cfg.mesh.shard)


# --- rendering


def span(seconds: float | None) -> str:
    """A duration as an operator reads it: 45s, 12m, 3h05m, 2d04h."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 2 * DAY:
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s % 3600 // 60 else f"{s // 3600}h"
    return f"{s // DAY}d{s % DAY // 3600:02d}h" if s % DAY // 3600 else f"{s // DAY}d"


def ago(ts: float | None, now: float) -> str:
    return "never" if ts is None else f"{span(now - ts)} ago"


def until(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return f"in {span(ts - now)}" if ts >= now else "due"


HEADER = ("HOST", "STATE", "TIMER", "LAST RUN", "LAST OK", "POINTS", "MSGS", "LAG", "FAILS",
          "NEXT")


def _cells(h: HostStatus, now: float) -> tuple[str, ...]:
    def n(v: int | None) -> str:
        return "-" if v is None else str(v)

    push = h.kind == "push"
    return (
        h.host,
        h.health.upper() if h.health in ALARMS else h.health,
        h.timer,
        "running" if h.running else ago(h.last_run, now),
        ago(h.last_success, now),
        f"{n(h.points_last)}/{n(h.points_24h)}",
        f"{n(h.messages_last)}/{n(h.messages_24h)}",
        span(h.lag),
        str(h.failures),
        "-" if push else until(h.next_run, now),
    )


def render_text(ov: Overview, colour: bool = False) -> str:
    """The table (worst first), the error line of each failing host, one summary line."""
    import click

    rows = [_cells(h, ov.now) for h in ov.hosts]
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [shard_line(ov)] if ov.shard else []
    if ov.paused:
        lines.append(f"PAUSED: {units.TARGET} is disabled and stopped; `psprobe resume` brings "
                     "the timers back")
    lines.append("  ".join(c.ljust(w) for c, w in zip(HEADER, widths)).rstrip())
    for h, r in zip(ov.hosts, rows):
        cells = [c.ljust(w) for c, w in zip(r, widths)]
        if colour and COLOURS[h.health]:
            cells[1] = click.style(cells[1], fg=COLOURS[h.health], bold=h.health in ALARMS)
        lines.append("  ".join(cells).rstrip())
    failing = [h for h in ov.hosts if h.health == "failing"]
    if failing:
        lines.append("")
        lines += [f"{h.host}: {h.error or f'exit status {h.status}'}" for h in failing]
    # Not collected, so no alarm; but systemctl --failed still lists them.
    stale = [h for h in ov.hosts if h.health == "disabled" and h.unit and h.unit.failed]
    if stale:
        lines.append("")
        lines += [f"{h.host}: no timer, but systemd still lists its last run failed "
                  f"({h.unit.reason(ov.now)}); `systemctl reset-failed "
                  f"psprobe@{hostnames.unit_instance(h.host)}.service` clears it" for h in stale]
    silent = [h for h in ov.hosts if h.kind == "push" and h.health == "lagging"]
    if silent:
        lines.append("")
        lines += [f"{h.host}: {h.error}" for h in silent]
    stopped = [h.host for h in ov.hosts if h.timer in ("stopped", "failed")]
    if stopped:
        lines += ["", f"{len(stopped)} host timer(s) not running though enabled "
                      f"({', '.join(stopped[:3])}{', ...' if len(stopped) > 3 else ''}): "
                      "`psprobe resume` starts them"]
    dropped = [h for h in ov.hosts if h.unroutable]
    if dropped:
        lines.append("")
        lines += [unroutable_line(h) for h in dropped]
    meshes = mesh_lines(ov)
    if meshes:
        lines.append("")
        lines += meshes
    if ov.systemd_error:
        lines += ["", f"systemd did not answer ({ov.systemd_error}): TIMER, NEXT and the "
                      "failures only systemd saw are missing"]
    c = ov.counts()
    parts = [f"{c[k]} {k}" for k in HEALTH_ORDER if c[k]]
    alarm = {span(h.lag_alarm) for h in ov.hosts if h.kind == "pull"} or {"-"}
    push = [h for h in ov.hosts if h.kind == "push" and h.in_meshes]
    summary = f"{len(ov.hosts)} hosts: {', '.join(parts) or 'none'} (lag alarm {'/'.join(sorted(alarm))}"
    if push:
        summary += f"; {len(push)} pushing, silent alarm {span(push[0].silent_after)}"
    summary += ")"
    if ov.sync:
        summary += (f"; last sync {ago(ov.sync.get('last_run'), ov.now)}: "
                    f"{len(ov.sync.get('hosts', []))} hosts, "
                    f"{len(ov.sync.get('failed_meshes', []))} mesh(es) failed")
    else:
        summary += "; no sync has run"
    lines += ["", summary]
    return "\n".join(lines)


def shard_line(ov: Overview) -> str:
    """Which shard this machine is, and the split the last sync made (psprobe.shard)."""
    k, n = ov.shard or (1, 1)
    split = shard.Split.from_record((ov.sync or {}).get("shard"))
    if split and (split.k, split.n) == (k, n):
        return f"{split.line()} at the last sync"
    last = "no sync has run" if ov.sync is None else \
        f"the last sync ran as shard {split.k}/{split.n}" if split else "the last sync took every host"
    return f"shard {k}/{n} ([mesh] shard), not applied yet: {last}"


def mesh_lines(ov: Overview) -> list[str]:
    """One line per mesh that failed at the last sync, and what that holds back."""
    sync = ov.sync or {}
    errors = sync.get("mesh_errors") if isinstance(sync.get("mesh_errors"), dict) else {}
    held = sync.get("held") if isinstance(sync.get("held"), list) else []
    out = [f"mesh {u}: FAILED at the last sync ({ago(sync.get('last_run'), ov.now)})"
           + (f": {errors[u]}" if isinstance(errors.get(u), str) else "")
           for u in ov.failed_meshes]
    if out:
        out.append("while a mesh fails, sync adds hosts but removes none"
                   + (f" ({len(held)} kept that no mesh names now)" if held else ""))
    return out


def unroutable_line(h: HostStatus) -> str:
    """``ps.x: 12 messages unroutable (perfsonar.raw.histogram-ttl: 12)``, most first."""
    keys = sorted(h.unroutable.items(), key=lambda kv: (-kv[1], kv[0]))
    n = sum(h.unroutable.values())
    return (f"{h.host}: {n} message{'s' if n != 1 else ''} unroutable ("
            + ", ".join(f"{k}: {v}" for k, v in keys) + ")")


def _host_json(h: HostStatus) -> dict[str, Any]:
    d = dataclasses.asdict(h)
    if d.get("received"):  # its hourly rows are in points_24h/messages_24h: not 193 rows per host
        d["received"].pop("hours", None)
    return d


def to_json(ov: Overview) -> dict[str, Any]:
    d: dict[str, Any] = {
        "generated": ov.now,
        "alarm": ov.alarm,
        "paused": ov.paused,
        "counts": ov.counts(),
        "sync": None if ov.sync is None else {k: ov.sync.get(k) for k in
                                              ("last_run", "last_success", "hosts", "failed_meshes",
                                               "mesh_errors", "held", "pushing")},
        "failed_meshes": ov.failed_meshes,
        "systemd_error": ov.systemd_error,
        "hosts": [_host_json(h) for h in ov.hosts],
    }
    if ov.shard:  # only a sharded machine says so: this shard, and the last sync's split
        d["shard"] = {"k": ov.shard[0], "n": ov.shard[1], "line": shard_line(ov),
                      "last_sync": (ov.sync or {}).get("shard")}
    return d
