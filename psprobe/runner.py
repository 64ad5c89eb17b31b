"""The run envelope: what every run of one host does around collect.py's pass.

One envelope for the three runs, told apart by their :class:`~psprobe.collect.Window`:

- ``Window()``, the timer's collect: the host's lock (``collect``), the checkpoint
  moves, the run is recorded;
- ``Window(dry=True)``, ``collect --dry-run``: no lock and nothing written, not recorded;
- ``Window(since, until)``, a backfill: the lock (``backfill``), the span read in
  slices, the checkpoint stays, recorded as a backfill.

Each takes the lock, loads the checkpoint, opens the outlet, runs, turns what went
wrong into an exit status, logs the summary line, closes the outlet and records the
run for status, metrics and reports.  The outlet comes from a factory the caller
passes (the broker by default, print for the dry run, a test's own outlet), so a
test observes or breaks a run without patching anything here.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from psprobe import checkpoint, history, metrics, state
from psprobe.checkpoint import Checkpoint
from psprobe.collect import Result, Stopped, Window, collect, summary
from psprobe.config import Config, ConfigError
from psprobe.exits import Exit
from psprobe.publish import BrokerError, Outlet

log = logging.getLogger("psprobe.collect")

# (the host's configuration, its checkpoint) -> where this run's messages go.
OutletFactory = Callable[[Config, Checkpoint], Outlet]


def broker_outlet(cfg: Config, cp: Checkpoint) -> Outlet:
    """A collect's: connected at the first message (most runs find nothing new), told
    which routing keys reached a queue before."""
    from psprobe.publish import LazyBrokerOutlet

    return LazyBrokerOutlet(cfg.broker, frozenset(cp.routed))


def connected_outlet(cfg: Config, cp: Checkpoint) -> Outlet:
    """A backfill's: connected at once, so a broker that is down fails it before a slice."""
    from psprobe.publish import BrokerOutlet

    return BrokerOutlet(cfg.broker)


def print_outlet(cfg: Config, cp: Checkpoint) -> Outlet:
    """The dry run's: one JSON line per message on stdout."""
    from psprobe.publish import PrintOutlet

    return PrintOutlet(cfg.broker, sys.stdout.buffer)


@dataclass
class Backfill(Result):
    """A backfill's result: every slice's totals, and how far it got."""

    since: int = 0
    until: int = 0
    done_until: int | None = None  # end of the last slice fully published


Progress = Callable[[int, int, Backfill], None]


def collect_host(cfg: Config, host: str, *, dry_run: bool = False,
                 outlet: OutletFactory | None = None) -> int:
    """Run one collect of ``host`` (``dry_run``: printed, nothing moved); the exit status."""
    window = Window(dry=dry_run)
    return run(cfg, host, window, outlet or (print_outlet if dry_run else broker_outlet)).status


def backfill_host(cfg: Config, host: str, since: int, until: int, *,
                  event_types: tuple[str, ...] | None = None, progress: Progress | None = None,
                  outlet: OutletFactory | None = None) -> Backfill:
    """Re-publish ``[since, until]`` of ``host`` (same message ids); the checkpoint stays.

    Under the host's lock (a running collect makes it return BUSY at once), through
    one connection.  ``progress(done, total, bf)`` after each slice; stops at the
    first slice that fails.  :func:`log_backfill` logs its line.
    """
    window = Window(since, until, event_types=tuple(event_types) if event_types else None)
    res = run(cfg, host, window, outlet or connected_outlet, progress=progress)
    assert isinstance(res, Backfill)
    return res


def run(cfg: Config, host: str, window: Window, outlet: OutletFactory, *,
        progress: Progress | None = None) -> Result:
    """The envelope: one run of ``host`` for ``window``, its exit status in ``.status``."""
    cfg = cfg.for_host(host)
    sd = cfg.collect.state_dir
    started = time.time()
    res = Result(host, started) if not window.fixed else Backfill(
        host, started, since=int(window.since), until=int(window.until or started))
    try:
        if window.dry:
            return _held(cfg, window, outlet, progress, res)
        state.make_host_dir(sd, host)
        with state.host_lock(sd, host, kind="backfill" if window.fixed else "collect"):
            return _held(cfg, window, outlet, progress, res)
    except state.Busy as e:
        _busy(cfg, window, e, res)
    except (state.StateError, OSError) as e:
        res.status = Exit.STATE
        res.error = str(e) if isinstance(e, state.StateError) else \
            f"{e.filename or sd}: {e.strerror}"
        if not window.fixed:  # a backfill's line is the caller's (log_backfill)
            log.error("collect %s: FAILED error=%s", host, res.error)
    res.ended = time.time()
    return res


def _held(cfg: Config, window: Window, make_outlet: OutletFactory, progress: Progress | None,
          res: Result) -> Result:
    """Checkpoint -> outlet -> pass(es) -> summary -> close -> record (the lock is held)."""
    if not window.dry and not window.fixed:
        checkpoint.retire_if_moved(cfg.collect.state_dir, res.host)
    cp = checkpoint.load(cfg.collect.state_dir, res.host)
    outlet = None
    try:
        outlet = make_outlet(cfg, cp)
        if isinstance(res, Backfill):
            _slices(cfg, outlet, cp, res, window, progress)
        else:
            res = collect(cfg, res.host, outlet, cp, window)
    except (BrokerError, ConfigError) as e:  # opening the outlet
        res.status, res.error = Exit.CONFIG if isinstance(e, ConfigError) else Exit.BROKER, str(e)
    except Stopped as e:  # outside collect's own handling (it records what it can)
        res.status, res.error = Exit.STOPPED, f"stopped by {e}"
    finally:
        cp.close()
    res.ended = res.ended or time.time()
    if res.newest is None:
        res.newest = cp.newest
    res.unroutable = dict(getattr(outlet, "unroutable", None) or {})
    if not window.fixed:
        # The summary first: closing the broker connection can take up to [broker] timeout.
        log.log(logging.INFO if res.status == Exit.OK else logging.ERROR, "%s%s", summary(res),
                " (dry run)" if window.dry else "")
    if outlet is not None:
        outlet.close()
    if not window.dry:
        _record(cfg, res)
    return res


def _busy(cfg: Config, window: Window, e: state.Busy, res: Result) -> None:
    """Another run holds the host's lock: a backfill says so (BUSY); a collect has nothing
    to do, and one that met a backfill is recorded as skipped (status knows why)."""
    host = res.host
    if window.fixed:
        res.status, res.error = Exit.BUSY, (f"a {e.holder or 'collect'} of this host is running "
                                            "(its lock is held); try again")
    elif e.holder != "backfill":
        log.info("collect %s: another collect of this host is running; nothing to do", host)
    else:
        reason = "a backfill of this host holds its lock"
        log.info("collect %s: %s; skipped", host, reason)
        now = round(time.time(), 3)
        history.record(cfg.collect.state_dir, host, {"kind": "skipped", "reason": reason,
                                                     "start": now, "end": now, "status": Exit.OK})


def _record(cfg: Config, res: Result) -> None:
    """Into the host's history (a backfill as kind backfill: totals, not status) and metrics."""
    run = {"start": round(res.started, 3), "end": round(res.ended, 3), "status": res.status,
           "error": res.error, "points": res.points, "messages": res.messages,
           "by_type": res.points_by_type}
    if isinstance(res, Backfill):
        run.update(kind="backfill", since=res.since, until=res.until)
    else:
        run.update(series=res.series, fetched=res.fetched, failed=res.failed, newest=res.newest)
    if res.late:
        run["late"] = res.late
    if res.unroutable:
        run["unroutable"] = res.unroutable
    doc = history.record(cfg.collect.state_dir, res.host, run)
    metrics.write_host(cfg.metrics.textfile_dir, res.host, doc)


# --- backfill: a fixed span, in slices, without moving the checkpoint

MAX_SLICES, MIN_SLICE = 48, 3600


def slices(since: int, until: int) -> list[tuple[int, int]]:
    """``[since, until]`` cut into at most MAX_SLICES inclusive, non-overlapping windows.

    Why slices: each is one pass over the archive with a known place in the
    whole, which gives the progress bar a length and an interrupted backfill a
    point to resume from.
    """
    if until < since:
        return []
    width = max(MIN_SLICE, -(-(until - since + 1) // MAX_SLICES))
    return [(s, min(s + width - 1, until)) for s in range(since, until + 1, width)]


def _slices(cfg: Config, outlet: Outlet, cp: Checkpoint, bf: Backfill, window: Window,
            progress: Progress | None) -> None:
    """One pass per slice into ``bf``; stops at the first slice that fails."""
    parts = slices(bf.since, bf.until)
    for n, (lo, hi) in enumerate(parts, 1):
        res = collect(cfg, bf.host, outlet, cp, Window(lo, hi, event_types=window.event_types))
        bf.points += res.points
        bf.messages += res.messages
        bf.requests += res.requests
        for et, k in res.points_by_type.items():
            bf.points_by_type[et] = bf.points_by_type.get(et, 0) + k
        if res.status != Exit.OK:
            bf.status, bf.error = res.status, res.error
            return
        bf.done_until = hi
        if progress:
            progress(n, len(parts), bf)


def backfill_line(bf: Backfill) -> str:
    """The backfill's one line: its span and totals, and where to resume a failed one."""
    def iso(t: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    line = (f"backfill {bf.host}: {'ok' if bf.status == Exit.OK else 'FAILED'} "
            f"since={iso(bf.since)} until={iso(bf.until)} points={bf.points} "
            f"messages={bf.messages} duration={bf.duration:.2f}s")
    if bf.status == Exit.BUSY:
        line += f" error={bf.error}"
    elif bf.status != Exit.OK:
        resume_at = bf.done_until + 1 if bf.done_until is not None else bf.since
        line += f" error={bf.error}; resume with --since @{resume_at}"
    return line


def log_backfill(bf: Backfill) -> None:
    """Log :func:`backfill_line` (after the caller's progress bar has drawn its last)."""
    log.log(logging.INFO if bf.status == Exit.OK else logging.ERROR, "%s", backfill_line(bf))
