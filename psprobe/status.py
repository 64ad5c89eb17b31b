"""``psprobe status``: is each host being collected, since when is it behind, what failed?

Everything comes from the state the collector and sync already keep (no
second source of truth): ``hosts/<host>/{target,checkpoint,history}.json``,
``sync.json``, the timer links in ``[mesh] unit_dir`` and, when systemd runs,
the next firing of each timer.  Reading it costs a few small files per host,
nothing is written, and no lock is taken (a running collect is detected by
trying a shared lock on its lock file, which never blocks it).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psprobe import history, hostnames, metrics, state, units
from psprobe.config import Config

DAY = 86400
# Worst first: the order of the table and of the exit status' concern.
HEALTH_ORDER = ("failing", "lagging", "pending", "no data", "ok", "disabled")
ALARMS = ("failing", "lagging")
COLOURS = {"failing": "red", "lagging": "yellow", "pending": "cyan", "no data": "cyan",
           "ok": "green", "disabled": None}


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
    points_last: int
    messages_last: int
    points_24h: int
    messages_24h: int
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


@dataclass
class Overview:
    now: float
    hosts: list[HostStatus]
    paused: dict[str, Any] | None
    sync: dict[str, Any] | None

    @property
    def alarm(self) -> bool:
        return any(h.health in ALARMS for h in self.hosts)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(HEALTH_ORDER, 0)
        for h in self.hosts:
            out[h.health] += 1
        return out


def read_sync(state_dir: str) -> dict[str, Any] | None:
    try:
        rec = state.read_json(Path(state_dir) / "sync.json")
    except (ValueError, OSError):
        return None
    return rec if isinstance(rec, dict) else None


def known_hosts(cfg: Config, sync: dict[str, Any] | None = None) -> set[str]:
    """Every host with state, an enabled timer, or named by the last sync."""
    found = set(units.enabled_hosts(Path(cfg.mesh.unit_dir)))
    try:
        names = state.listdir(cfg.collect.state_dir, "hosts")
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
    return found


def _running(state_dir: str, host: str) -> bool:
    """True when a collect or backfill holds the host's lock (a shared try-lock, never waits)."""
    try:
        d = state.host_dir_fd(state_dir, host)
        try:
            fd = state.open_file(d, "lock", os.O_RDONLY, path=state.host_dir(state_dir, host) / "lock")
        finally:
            os.close(d)
    except (OSError, state.StateError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def _newest_confirmed(state_dir: str, host: str) -> int | None:
    from psprobe import checkpoint

    pairs = checkpoint.peek(state_dir, host)
    return max(pairs.values()) if pairs else None


def host_status(cfg: Config, host: str, *, now: float, enabled: bool, in_meshes: bool,
                next_run: float | None = None) -> HostStatus:
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
    if newest is None:
        newest = next((r["newest"] for r in reversed(regular) if r.get("newest") is not None), None)
    lag = None if newest is None else max(0.0, now - newest)
    alarm = cfg.for_host(host).report.lag_alarm
    if not enabled:
        health = "disabled"
    elif last is not None and last.get("status"):
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
        running=_running(sd, host),
        last_run=last.get("end") if last else None, last_success=runs["last_success"],
        result=None if last is None else ("FAILED" if last.get("status") else "ok"),
        status=None if last is None else last.get("status"),
        error=last.get("error") if last else None,
        points_last=int(last.get("points") or 0) if last else 0,
        messages_last=int(last.get("messages") or 0) if last else 0,
        points_24h=sum(int(r.get("points") or 0) for r in day),
        messages_24h=sum(int(r.get("messages") or 0) for r in day),
        newest=newest, lag=lag, lag_alarm=alarm, failures=failures, next_run=next_run,
        last_backfill=backfills[-1] if backfills else None,
        unroutable=metrics.unroutable(last) if last else {},
        skipped_24h=sum(1 for r in day if history.is_skipped(r)),
    )


def _sort_key(h: HostStatus) -> tuple:
    return (HEALTH_ORDER.index(h.health), -h.failures, -(h.lag if h.lag is not None else -1),
            h.host)


def systemd_running() -> bool:
    """sd_booted(3): the test systemd itself uses."""
    return os.path.isdir("/run/systemd/system")


def overview(cfg: Config, only: Iterable[str] | None = None, *, now: float | None = None,
             next_elapse: Callable[[Iterable[str]], dict[str, float | None]] | None = None
             ) -> Overview:
    """Status of ``only`` (default: every known host), worst first.

    ``next_elapse`` maps hosts to their next timer firing; by default systemd
    is asked (once, for all hosts) when it is running.
    """
    from psprobe import control

    now = time.time() if now is None else now
    sync = read_sync(cfg.collect.state_dir)
    enabled = units.enabled_hosts(Path(cfg.mesh.unit_dir))
    hosts = sorted(known_hosts(cfg, sync) if only is None else set(only))
    wanted = set((sync or {}).get("hosts", []))
    if next_elapse is None and systemd_running():
        next_elapse = units.next_elapse
    nexts = next_elapse([h for h in hosts if h in enabled]) if next_elapse else {}
    rows = [host_status(cfg, h, now=now, enabled=h in enabled, in_meshes=h in wanted,
                        next_run=nexts.get(h)) for h in hosts]
    rows.sort(key=_sort_key)
    return Overview(now, rows, control.paused(cfg.collect.state_dir), sync)


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
    return (
        h.host,
        h.health.upper() if h.health in ALARMS else h.health,
        "on" if h.enabled else "off",
        "running" if h.running else ago(h.last_run, now),
        ago(h.last_success, now),
        f"{h.points_last}/{h.points_24h}",
        f"{h.messages_last}/{h.messages_24h}",
        span(h.lag),
        str(h.failures),
        until(h.next_run, now),
    )


def render_text(ov: Overview, colour: bool = False) -> str:
    """The table (worst first), the error line of each failing host, one summary line."""
    import click

    rows = [_cells(h, ov.now) for h in ov.hosts]
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = []
    if ov.paused:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(ov.paused.get("time", 0)))
        lines.append(f"PAUSED since {since} ({ago(ov.paused.get('time'), ov.now)}); "
                     "`psprobe resume` brings the timers back")
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
    dropped = [h for h in ov.hosts if h.unroutable]
    if dropped:
        lines.append("")
        lines += [unroutable_line(h) for h in dropped]
    c = ov.counts()
    parts = [f"{c[k]} {k}" for k in HEALTH_ORDER if c[k]]
    alarm = {span(h.lag_alarm) for h in ov.hosts} or {"-"}
    summary = f"{len(ov.hosts)} hosts: {', '.join(parts) or 'none'} (lag alarm {'/'.join(sorted(alarm))})"
    if ov.sync:
        summary += (f"; last sync {ago(ov.sync.get('last_run'), ov.now)}: "
                    f"{len(ov.sync.get('hosts', []))} hosts, "
                    f"{len(ov.sync.get('failed_meshes', []))} mesh(es) failed")
    else:
        summary += "; no sync has run"
    lines += ["", summary]
    return "\n".join(lines)


def unroutable_line(h: HostStatus) -> str:
    """``ps.x: 12 messages unroutable (perfsonar.raw.histogram-ttl: 12)``, most first."""
    keys = sorted(h.unroutable.items(), key=lambda kv: (-kv[1], kv[0]))
    n = sum(h.unroutable.values())
    return (f"{h.host}: {n} message{'s' if n != 1 else ''} unroutable ("
            + ", ".join(f"{k}: {v}" for k, v in keys) + ")")


def to_json(ov: Overview) -> dict[str, Any]:
    return {
        "generated": ov.now,
        "alarm": ov.alarm,
        "paused": ov.paused,
        "counts": ov.counts(),
        "sync": None if ov.sync is None else {k: ov.sync.get(k) for k in
                                              ("last_run", "last_success", "hosts", "failed_meshes")},
        "hosts": [dataclasses.asdict(h) for h in ov.hosts],
    }
