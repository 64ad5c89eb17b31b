"""One collect run for one host: archive -> messages -> outlet -> checkpoint.

Fetching runs in up to ``[archive] parallel`` threads, one series per thread at
a time; the main thread alone talks to the broker and moves checkpoints, in the
order each series' messages were produced.  A bounded queue between them keeps
memory at a few pages, whatever the backlog.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from psprobe import state
from psprobe.archive import Archive, ArchiveError, Pair
from psprobe.checkpoint import Checkpoint, StateError
from psprobe.config import Config, ConfigError
from psprobe.messages import Encoder, Message, meta_for
from psprobe.publish import BrokerError, Outlet

log = logging.getLogger("psprobe.collect")

# Exit statuses, also documented in the README.
OK, ARCHIVE_FAILED, CONFIG_ERROR, BROKER_FAILED, STATE_FAILED = 0, 1, 2, 3, 4


@dataclass
class Result:
    host: str
    started: float
    ended: float = 0.0
    status: int = OK
    error: str | None = None
    series: int = 0  # series the archive lists with wanted event types
    fetched: int = 0  # series asked for data
    failed: int = 0  # series whose data could not be read
    points: int = 0
    messages: int = 0
    newest: int | None = None  # newest confirmed point over all series
    requests: int = 0
    points_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def lag(self, now: float | None = None) -> float | None:
        return None if self.newest is None else max(0.0, (now or self.ended) - self.newest)


def read_url_of(cfg: Config, host: str) -> str | None:
    """The read URL sync recorded for this host, if any."""
    try:
        target = state.read_json(state.host_dir(cfg.collect.state_dir, host) / "target.json")
    except ValueError as e:
        log.warning("%s; using the default archive URL", e)
        return None
    url = target.get("read_url") if isinstance(target, dict) else None
    return url if isinstance(url, str) else None


def collect(cfg: Config, host: str, outlet: Outlet, cp: Checkpoint, *,
            now: float | None = None, dry_run: bool = False,
            backfill: tuple[int, int] | None = None,
            progress: Callable[[Result], None] | None = None) -> Result:
    """Collect everything new on ``host``; the checkpoint moves after each confirm.

    ``backfill=(since, until)`` re-reads that window of every series instead,
    and leaves the checkpoint where it is (the same ids, so consumers can drop
    what they already have).  ``progress`` is called after each message.
    """
    res = Result(host, started=time.time())
    now_i = int(now if now is not None else res.started)
    c, a = cfg.collect, cfg.archive
    move = not dry_run and backfill is None
    if move:  # under the host's lock: nobody else is writing these
        cp.sweep()
    arch = Archive(host, a, read_url_of(cfg, host), cp.scheme)
    if a.verify is False:
        log.warning("%s: TLS certificate verification is OFF ([archive] verify = no)", host)
    try:
        lookback = now_i - int(c.first_run_lookback)
        if backfill:
            since, now_i = backfill
        else:
            since = min([lookback, *(v + 1 for v in cp.pairs.values())])
        pairs = list(arch.pairs(arch.metadata(time_start=since), c.event_types))
        res.series = len(pairs)
        if arch.scheme != cp.scheme and move:
            cp.scheme = arch.scheme
            cp.save()
        if backfill:
            todo = [(p, since) for p in pairs if p.time_updated is None or p.time_updated >= since]
        else:
            todo = _plan(pairs, cp, lookback, now_i, host)
        res.fetched = len(todo)
        _run(arch, todo, now_i, cfg, outlet, cp if move else None, res, progress)
    except ArchiveError as e:
        res.status, res.error = ARCHIVE_FAILED, str(e)
    except BrokerError as e:
        res.status, res.error = BROKER_FAILED, str(e)
    except ConfigError as e:  # a broker TLS file found unusable when connecting
        res.status, res.error = CONFIG_ERROR, str(e)
    except StateError as e:
        res.status, res.error = STATE_FAILED, str(e)
    finally:
        arch.close()
        res.requests = arch.requests
        res.ended = time.time()
    if move and res.status != STATE_FAILED:
        try:  # the fallback position if the checkpoint is ever found damaged
            cp.keep_copy()
        except StateError as e:
            res.status, res.error = STATE_FAILED, str(e)
    cp.close()
    if cp.pairs:
        res.newest = max(cp.pairs.values())
    return res


def _plan(pairs: list[Pair], cp: Checkpoint, lookback: int, now: int,
          host: str) -> list[tuple[Pair, int]]:
    """(series, first ts to ask) for the series that can hold new points."""
    todo, future = [], 0
    for p in pairs:
        last = cp.get(p.name)
        start = lookback if last is None else last + 1
        if start > now:
            future += 1
            continue
        if p.time_updated is not None and p.time_updated < start:
            continue  # nothing written since what we already have
        todo.append((p, start))
    if future:
        log.warning("%s: %d series have checkpoints in the future: did the clock go back?",
                    host, future)
    return todo


_DONE = object()


def _run(arch: Archive, todo: list[tuple[Pair, int]], now: int, cfg: Config, outlet: Outlet,
         cp: Checkpoint | None, res: Result, progress: Callable[[Result], None] | None) -> None:
    if not todo:
        return
    prefix, chunk = cfg.broker.routing_key_prefix, cfg.collect.chunk_points
    q: queue.Queue = queue.Queue(maxsize=2 * cfg.archive.parallel)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def produce(pair: Pair, start: int) -> None:
        if stop.is_set():
            return
        try:
            enc = Encoder(meta_for(pair.record, pair.event_type), prefix + pair.event_type)
            for msg in _messages(arch.points(pair, start, now), enc, chunk):
                if stop.is_set():
                    return
                put((pair, msg))
            put((pair, _DONE))
        except ArchiveError as e:
            put((pair, e))
        except Exception as e:  # a bug must not hang the run
            put((pair, ArchiveError(f"{pair.url}: {type(e).__name__}: {e}")))

    with ThreadPoolExecutor(cfg.archive.parallel, thread_name_prefix="fetch") as pool:
        for pair, start in todo:
            pool.submit(produce, pair, start)
        try:
            _consume(q, len(todo), outlet, cp, res, progress)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def _consume(q: queue.Queue, pending: int, outlet: Outlet, cp: Checkpoint | None, res: Result,
             progress: Callable[[Result], None] | None) -> None:
    first_error = None
    while pending:
        pair, item = q.get()
        if item is _DONE:
            pending -= 1
        elif isinstance(item, ArchiveError):
            pending -= 1
            res.failed += 1
            first_error = first_error or str(item)
            log.error("%s", item)
        else:
            msg: Message = item
            outlet.send(msg, functools.partial(_confirmed, pair, msg, cp, res, progress))
            if cp is not None:  # what that send saw confirmed, on disk in one flush
                cp.sync()
    outlet.flush()
    if cp is not None:
        cp.sync()
    if res.failed:
        res.status = ARCHIVE_FAILED
        res.error = f"{res.failed} of {res.fetched} series could not be read; first: {first_error}"


def _confirmed(pair: Pair, msg: Message, cp: Checkpoint | None, res: Result,
               progress: Callable[[Result], None] | None) -> None:
    """The broker has ``msg`` (and every message before it): now the checkpoint may move."""
    if cp is not None:
        cp.advance(pair.name, msg.last_ts)
    res.points += msg.points
    res.messages += 1
    res.points_by_type[pair.event_type] = res.points_by_type.get(pair.event_type, 0) + msg.points
    if progress:
        progress(res)


def _messages(pages: Iterable[list[tuple[int, Any]]], enc: Encoder, chunk: int):
    """Chunk a series' pages into messages of ``chunk`` points, carrying the rest over.

    A page is encoded whole before its first message is handed on, and the
    page list is cleared: a thread waiting on the queue holds message bytes,
    not decoded values (several times their size), which bounds memory.
    """
    buf: list[tuple[int, Any]] = []
    for page in pages:
        buf.extend(page)
        page.clear()
        ready = []
        while len(buf) >= chunk:
            ready.append(enc.encode(buf[:chunk]))
            del buf[:chunk]
        while ready:
            yield ready.pop(0)
    if buf:
        yield enc.encode(buf)


def summary(res: Result) -> str:
    """The run's one summary line (journal, tests and operators read it)."""
    lag = res.lag()
    return (
        f"collect {res.host}: {'ok' if res.status == OK else 'FAILED'}"
        f" series={res.series} fetched={res.fetched} failed={res.failed}"
        f" points={res.points} messages={res.messages} requests={res.requests}"
        f" duration={res.duration:.2f}s lag={'unknown' if lag is None else f'{lag:.0f}s'}"
        + (f" error={res.error}" if res.error else "")
    )
