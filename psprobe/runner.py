"""What one ``psprobe collect HOST`` does around the pipeline: lock, outlet, record.

collect.py is the pipeline; this module is the process around it: take the
host's lock, open the outlet (broker, or stdout for --dry-run), run, then log
the summary line and record the run for status, metrics and reports.
"""

from __future__ import annotations

import logging
import sys
import time

from psprobe import checkpoint, history, state
from psprobe.collect import BROKER_FAILED, OK, STATE_FAILED, Result, collect, summary
from psprobe.config import Config, ConfigError

log = logging.getLogger("psprobe.collect")


def collect_host(cfg: Config, host: str, *, dry_run: bool = False) -> int:
    """Run one collect of ``host``; returns the exit status."""
    cfg = cfg.for_host(host)
    sd = cfg.collect.state_dir
    if dry_run:
        return _dry_run(cfg, host)
    try:
        state.host_dir(sd, host).mkdir(parents=True, exist_ok=True)
        with checkpoint.host_lock(sd, host):
            return _locked(cfg, host)
    except checkpoint.Busy:
        log.info("collect %s: another collect of this host is running; nothing to do", host)
        return OK
    except checkpoint.StateError as e:
        log.error("collect %s: FAILED error=%s", host, e)
        return STATE_FAILED
    except OSError as e:
        log.error("collect %s: FAILED error=%s: %s", host, e.filename or sd, e.strerror)
        return STATE_FAILED


def _locked(cfg: Config, host: str) -> int:
    from psprobe.publish import BrokerError, BrokerOutlet

    started = time.time()
    cp = checkpoint.load(cfg.collect.state_dir, host)
    try:
        outlet = BrokerOutlet(cfg.broker)
    except (BrokerError, ConfigError) as e:
        res = Result(host, started, ended=time.time(), status=BROKER_FAILED, error=str(e))
        if isinstance(e, ConfigError):
            res.status = 2
        if cp.pairs:
            res.newest = max(cp.pairs.values())
        return _finish(cfg, res)
    try:
        res = collect(cfg, host, outlet, cp)
    finally:
        outlet.close()
    return _finish(cfg, res)


def _dry_run(cfg: Config, host: str) -> int:
    from psprobe.publish import PrintOutlet

    try:
        cp = checkpoint.load(cfg.collect.state_dir, host)
    except checkpoint.StateError as e:
        log.error("collect %s: FAILED error=%s", host, e)
        return STATE_FAILED
    outlet = PrintOutlet(cfg.broker, sys.stdout.buffer)
    res = collect(cfg, host, outlet, cp, dry_run=True)
    outlet.close()
    log.log(logging.INFO if res.status == OK else logging.ERROR, "%s (dry run)", summary(res))
    return res.status


def _finish(cfg: Config, res: Result) -> int:
    log.log(logging.INFO if res.status == OK else logging.ERROR, "%s", summary(res))
    history.record(cfg.collect.state_dir, res.host, {
        "start": round(res.started, 3), "end": round(res.ended, 3), "status": res.status,
        "error": res.error, "series": res.series, "fetched": res.fetched, "failed": res.failed,
        "points": res.points, "messages": res.messages, "newest": res.newest,
        "by_type": res.points_by_type,
    })
    return res.status
