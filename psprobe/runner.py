"""What one ``psprobe collect HOST`` does around the pipeline: lock, outlet, record.

collect.py is the pipeline; this module is the process around it: take the
host's lock, open the outlet (broker, or stdout for --dry-run), run, then log
the summary line and record the run for status, metrics and reports.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psprobe import checkpoint, history, metrics, state
from psprobe.collect import BROKER_FAILED, OK, STATE_FAILED, STOPPED, Result, Stopped, collect, summary
from psprobe.config import Config, ConfigError
from psprobe.exits import Exit

log = logging.getLogger("psprobe.collect")


def collect_host(cfg: Config, host: str, *, dry_run: bool = False) -> int:
    """Run one collect of ``host``; returns the exit status."""
    cfg = cfg.for_host(host)
    sd = cfg.collect.state_dir
    if dry_run:
        return _dry_run(cfg, host)
    try:
        state.make_host_dir(sd, host)
        with state.host_lock(sd, host):
            return _locked(cfg, host)
    except state.Busy as e:
        if e.holder != "backfill":
            log.info("collect %s: another collect of this host is running; nothing to do", host)
            return OK
        reason = "a backfill of this host holds its lock"
        log.info("collect %s: %s; skipped", host, reason)
        now = round(time.time(), 3)
        history.record(sd, host, {"kind": "skipped", "reason": reason, "start": now,
                                  "end": now, "status": OK})
        return OK
    except state.StateError as e:
        log.error("collect %s: FAILED error=%s", host, e)
        return STATE_FAILED
    except OSError as e:
        log.error("collect %s: FAILED error=%s: %s", host, e.filename or sd, e.strerror)
        return STATE_FAILED


def _locked(cfg: Config, host: str) -> int:
    from psprobe.publish import BrokerError, LazyBrokerOutlet

    started = time.time()
    cp = checkpoint.load(cfg.collect.state_dir, host)
    try:
        outlet = LazyBrokerOutlet(cfg.broker, frozenset(cp.routed))
    except (BrokerError, ConfigError) as e:
        res = Result(host, started, ended=time.time(), error=str(e),
                     status=Exit.CONFIG if isinstance(e, ConfigError) else BROKER_FAILED)
        if cp.pairs:
            res.newest = max(cp.pairs.values())
        cp.close()
        return _finish(cfg, res)
    try:
        res = collect(cfg, host, outlet, cp)
    except Stopped as e:  # outside collect's own handling (it records what it can)
        res = Result(host, started, ended=time.time(), status=STOPPED, error=f"stopped by {e}")
        if cp.pairs:
            res.newest = max(cp.pairs.values())
    res.unroutable = dict(getattr(outlet, "unroutable", None) or {})
    # The summary first: closing the broker connection can take up to [broker] timeout.
    _log_summary(res)
    outlet.close()
    return _finish(cfg, res, logged=True)


def _dry_run(cfg: Config, host: str) -> int:
    from psprobe.publish import PrintOutlet

    try:
        cp = checkpoint.load(cfg.collect.state_dir, host)
    except state.StateError as e:
        log.error("collect %s: FAILED error=%s", host, e)
        return STATE_FAILED
    outlet = PrintOutlet(cfg.broker, sys.stdout.buffer)
    res = collect(cfg, host, outlet, cp, dry_run=True)
    outlet.close()
    log.log(logging.INFO if res.status == OK else logging.ERROR, "%s (dry run)", summary(res))
    return res.status


def _log_summary(res: Result) -> None:
    log.log(logging.INFO if res.status == OK else logging.ERROR, "%s", summary(res))


def _finish(cfg: Config, res: Result, kind: str = "collect", logged: bool = False) -> int:
    if not logged:
        _log_summary(res)
    run = {
        "start": round(res.started, 3), "end": round(res.ended, 3), "status": res.status,
        "error": res.error, "series": res.series, "fetched": res.fetched, "failed": res.failed,
        "points": res.points, "messages": res.messages, "newest": res.newest,
        "by_type": res.points_by_type,
    }
    if kind != "collect":
        run["kind"] = kind
    if res.late:
        run["late"] = res.late
    if res.unroutable:
        run["unroutable"] = res.unroutable
    doc = history.record(cfg.collect.state_dir, res.host, run)
    metrics.write_host(cfg.metrics.textfile_dir, res.host, doc)
    return res.status


# --- backfill: re-publish a window, in slices, without moving the checkpoint

BUSY = Exit.BUSY  # EX_TEMPFAIL: a collect of the host holds the lock; try again later
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


@dataclass
class Backfill:
    host: str
    since: int
    until: int
    status: int = OK
    error: str | None = None
    points: int = 0
    messages: int = 0
    done_until: int | None = None  # end of the last slice fully published
    by_type: dict[str, int] = field(default_factory=dict)


def backfill_host(cfg: Config, host: str, since: int, until: int, *,
                  event_types: tuple[str, ...] | None = None,
                  progress: Callable[[int, int, Backfill], None] | None = None) -> Backfill:
    """Re-publish ``[since, until]`` of ``host`` (same message ids); the checkpoint stays.

    Runs under the host's lock (a running collect makes it return BUSY at
    once), through one confirming broker connection.  ``progress(done, total,
    bf)`` is called after each slice.  Stops at the first slice that fails.
    """
    from psprobe.publish import BrokerError, BrokerOutlet

    cfg = cfg.for_host(host)
    if event_types:
        cfg = dataclasses.replace(cfg, collect=dataclasses.replace(cfg.collect,
                                                                   event_types=tuple(event_types)))
    bf = Backfill(host, since, until)
    sd = cfg.collect.state_dir
    parts = slices(since, until)
    started = time.time()
    try:
        state.make_host_dir(sd, host)
        with state.host_lock(sd, host, kind="backfill"):
            cp = checkpoint.load(sd, host)
            try:
                outlet = BrokerOutlet(cfg.broker)
            except (BrokerError, ConfigError) as e:
                bf.status, bf.error = (Exit.CONFIG if isinstance(e, ConfigError) else BROKER_FAILED), str(e)
                return bf
            try:
                for n, (lo, hi) in enumerate(parts, 1):
                    res = collect(cfg, host, outlet, cp, backfill=(lo, hi))
                    bf.points += res.points
                    bf.messages += res.messages
                    for et, k in res.points_by_type.items():
                        bf.by_type[et] = bf.by_type.get(et, 0) + k
                    if res.status != OK:
                        bf.status, bf.error = res.status, res.error
                        break
                    bf.done_until = hi
                    if progress:
                        progress(n, len(parts), bf)
            finally:
                outlet.close()
            _record_backfill(cfg, bf, started)
    except state.Busy as e:
        bf.status, bf.error = BUSY, (f"a {e.holder or 'collect'} of this host is running "
                                     "(its lock is held); try again")
    except state.StateError as e:
        bf.status, bf.error = STATE_FAILED, str(e)
    except OSError as e:
        bf.status, bf.error = STATE_FAILED, f"{e.filename or sd}: {e.strerror}"
    return bf


def _record_backfill(cfg: Config, bf: Backfill, started: float) -> None:
    """Into history (kind backfill: the published totals, not status) and metrics."""
    doc = history.record(cfg.collect.state_dir, bf.host, {
        "kind": "backfill", "start": round(started, 3), "end": round(time.time(), 3),
        "status": bf.status, "error": bf.error, "points": bf.points, "messages": bf.messages,
        "by_type": bf.by_type, "since": bf.since, "until": bf.until,
    })
    metrics.write_host(cfg.metrics.textfile_dir, bf.host, doc)
