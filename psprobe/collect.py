"""One pass over one host's archive: archive -> messages -> outlet -> checkpoint.

What a pass reads, and whether the checkpoint follows, is its :class:`Window`;
where the messages go is its outlet (the broker, stdout, or a test's own).  The
process around a pass (lock, checkpoint, outlet, record) is runner.py's.

Fetching runs in up to ``[archive] parallel`` threads, one series per thread at
a time; the main thread alone talks to the broker and moves checkpoints, in the
order each series' messages were produced.  A bounded queue between them keeps
memory at a few pages, whatever the backlog.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psprobe import state
from psprobe.archive import Archive, ArchiveError, Pair, unreachable
from psprobe.checkpoint import Checkpoint
from psprobe.config import Config, ConfigError
from psprobe.exits import Exit
from psprobe.messages import Encoder, Message, meta_for
from psprobe.publish import BrokerError, Outlet
from psprobe.state import StateError

if TYPE_CHECKING:
    import queue

log = logging.getLogger("psprobe.collect")


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: end the run now, and record why.

    A BaseException, so that no ``except Exception`` on the way swallows it.
    """


@dataclass
class Result:
    """What one run did: its history record, summary line and exit status."""

    host: str
    started: float
    ended: float = 0.0
    status: int = Exit.OK
    error: str | None = None
    series: int = 0  # series the archive lists with wanted event types
    fetched: int = 0  # series asked for data
    failed: int = 0  # series whose data could not be read
    points: int = 0
    messages: int = 0
    newest: int | None = None  # newest confirmed point over all series
    requests: int = 0
    points_by_type: dict[str, int] = field(default_factory=dict)
    late: int = 0  # points found behind their series' checkpoint, not sent before
    unroutable: dict[str, int] = field(default_factory=dict)  # routing key -> returned

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def lag(self, now: float | None = None) -> float | None:
        return None if self.newest is None else max(0.0, (now or self.ended) - self.newest)


def read_url_of(cfg: Config, host: str) -> str | None:
    """The read URL sync recorded for this host, if any."""
    try:
        target = state.read_json(state.host_file(cfg.collect.state_dir, host, state.TARGET),
                                 root=cfg.collect.state_dir)
    except ValueError as e:
        log.warning("%s; using the default archive URL", e)
        return None
    url = target.get("read_url") if isinstance(target, dict) else None
    return url if isinstance(url, str) else None


@dataclass(frozen=True)
class Window:
    """What a pass reads, and whether the checkpoint follows it.

    ``Window()``: everything new since the checkpoints (or the first-run
    look-back) up to ``until`` (default: now); the checkpoint moves after each
    confirm.  ``Window(since, until)``: that fixed span of every series, the
    same messages and ids a regular run sent (consumers drop what they have);
    the checkpoint stays.  ``dry``: read as a regular run, move nothing.
    ``event_types``: only these (default ``[collect] event_types``).

    Why "moves" lives here and not in the outlet: it is a fact about the run
    (a backfill's span is not "what is new", a dry run is a rehearsal), and one
    home for it keeps every outlet -- print, broker, a test's -- a plain
    send/flush/close whose confirm only says "delivered".
    """

    since: int | None = None
    until: int | None = None
    dry: bool = False
    event_types: tuple[str, ...] | None = None

    @property
    def fixed(self) -> bool:
        return self.since is not None

    @property
    def moves(self) -> bool:
        return not self.fixed and not self.dry


def collect(cfg: Config, host: str, outlet: Outlet, cp: Checkpoint,
            window: Window = Window()) -> Result:
    """One pass over ``host``'s archive for ``window``, through ``outlet``.

    With a moving window the checkpoint moves after each confirm, and the copy
    kept for a damaged checkpoint is refreshed at the end.  ``cp`` stays open:
    whoever loaded it closes it (runner's envelope).
    """
    res = Result(host, started=time.time())
    now_i = int(res.started if window.until is None else window.until)
    c, a = cfg.collect, cfg.archive
    move = window.moves
    if move:  # under the host's lock: nobody else is writing these
        cp.sweep()
    arch = Archive(host, a, read_url_of(cfg, host), cp.scheme)
    arch.deadline = time.monotonic() + c.run_deadline
    # The look-back for late points: every late_window / 2, from the last look-back's
    # time - late_window (so a point written up to late_window after its ts is seen
    # by one of them).  A checkpoint with no record of what was sent starts one.
    look = None
    if c.late_window and not window.fixed and cp.swept is not None \
            and res.started - cp.swept >= c.late_window / 2:
        look = int(cp.swept - c.late_window)
    # What was sent is kept from where the next look-back can reach (no more: a
    # backlog of a million points must not be held in memory for it).
    cp.horizon = int(min(cp.swept or res.started, res.started) - c.late_window) \
        if c.late_window else 1 << 62
    if a.verify is False:
        log.warning("%s: TLS certificate verification is OFF ([archive] verify = no)", host)
    try:
        if window.fixed:
            since = window.since
        else:
            lookback = now_i - int(c.first_run_lookback)
            since = min([lookback, *(v + 1 for v in cp.pairs.values()),
                         *((look,) if look is not None else ())])
        pairs = list(arch.pairs(arch.metadata(time_start=since),
                                window.event_types or c.event_types))
        res.series = len(pairs)
        if arch.scheme != cp.scheme and move:
            cp.scheme = arch.scheme
            cp.save()
        if window.fixed:
            todo = [_Todo(p, since) for p in pairs
                    if p.time_updated is None or p.time_updated >= since]
        else:
            todo = _plan(pairs, cp, lookback, now_i, host, look)
        res.fetched = len(todo)
        _run(arch, todo, now_i, cfg, outlet, cp if move else None, res)
        if move and res.status == Exit.OK and c.late_window and (look is not None or cp.swept is None):
            cp.swept = res.started
        if move and cp.swept is not None:
            cp.forget_before(int(cp.swept - c.late_window))
        if move:
            cp.routed |= getattr(outlet, "routed_keys", set())
    except Stopped as e:
        res.status, res.error = Exit.STOPPED, f"stopped by {e} before the run was done"
    except ArchiveError as e:
        res.status, res.error = Exit.ARCHIVE, str(e)
    except BrokerError as e:
        res.status, res.error = Exit.BROKER, str(e)
    except ConfigError as e:  # a broker TLS file found unusable when connecting
        res.status, res.error = Exit.CONFIG, str(e)
    except StateError as e:
        res.status, res.error = Exit.STATE, str(e)
    finally:
        arch.close()
        res.requests = arch.requests
        res.ended = time.time()
    if move and res.status != Exit.STATE:
        try:  # the fallback position if the checkpoint is ever found damaged
            cp.keep_copy()
        except StateError as e:
            res.status, res.error = Exit.STATE, str(e)
    res.newest = cp.newest
    return res


@dataclass
class _Todo:
    """One series to read from ``start``; points at or before ``last`` whose ts is in
    ``sent`` went out before (the look-back), the others are late arrivals."""

    pair: Pair
    start: int
    last: int = -1
    sent: frozenset[int] = frozenset()
    floor: int = 0  # where the record of what is sent starts, for a series new to it


def _plan(pairs: list[Pair], cp: Checkpoint, lookback: int, now: int,
          host: str, look: int | None = None) -> list[_Todo]:
    """The series that can hold new points, each with the first ts to ask.

    ``look``: this run also looks back to that ts for late points, though never
    before what the record of sent points covers.
    """
    todo, future = [], 0
    for p in pairs:
        last = cp.get(p.name)
        t = _Todo(p, lookback if last is None else last + 1, floor=lookback)
        if last is not None:
            t.floor, t.sent = cp.seen(p.name)
            if look is not None and max(look, t.floor) <= last:
                t.start, t.last = max(look, t.floor), last
            else:
                t.sent = frozenset()
        if t.start > now:
            future += 1
            continue
        if p.time_updated is not None and p.time_updated < t.start:
            continue  # nothing written since what we already have
        todo.append(t)
    if future:
        log.warning("%s: %d series have checkpoints in the future: did the clock go back?",
                    host, future)
    return todo


_DONE = object()


def _run(arch: Archive, todo: list[_Todo], now: int, cfg: Config, outlet: Outlet,
         cp: Checkpoint | None, res: Result) -> None:
    if not todo:
        return
    # Here, not at the top: most runs find nothing new and start no fetch thread.
    import queue
    from concurrent.futures import ThreadPoolExecutor

    prefix, chunk = cfg.broker.routing_key_prefix, cfg.collect.chunk_points
    q: queue.Queue = queue.Queue(maxsize=2 * cfg.archive.parallel)
    stop = threading.Event()
    late: dict[str, int] = {}  # series -> late points found (written by its one thread)

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def produce(t: _Todo) -> None:
        pair = t.pair
        if stop.is_set():
            return
        try:
            enc = Encoder(meta_for(pair.record, pair.event_type), prefix + pair.event_type,
                          name=pair.url)
            pages = arch.points(pair, t.start, now)
            if t.last >= t.start:
                pages = _unsent(pages, t, late)
            for msg, stamps in _messages(pages, enc, chunk):
                if stop.is_set():
                    return
                put((t, (msg, stamps)))
            put((t, _DONE))
        except ArchiveError as e:
            put((t, e))
        except Exception as e:  # a bug must not hang the run
            put((t, ArchiveError(f"{pair.url}: {type(e).__name__}: {e}")))

    pool = ThreadPoolExecutor(cfg.archive.parallel, thread_name_prefix="fetch")
    stopped = False
    try:
        for t in todo:
            pool.submit(produce, t)
        _consume(q, todo, arch, cfg, outlet, cp, res)
    except Stopped:
        stopped = True
        raise
    finally:
        stop.set()
        # Stopped from outside: the process ends at once (runner), not after the
        # fetches under way have run into their deadlines.
        pool.shutdown(wait=not stopped, cancel_futures=True)
        res.late = sum(late.values())
        if res.late:
            log.info("%s: %d late point(s) found behind the checkpoints of %d series",
                     res.host, res.late, len(late))


def _unsent(pages: Iterable[list[tuple[int, Any]]], t: _Todo,
            late: dict[str, int]) -> Iterator[list[tuple[int, Any]]]:
    """The pages without the points already sent (the look-back reads them again)."""
    last, sent = t.last, t.sent
    for page in pages:
        if page[0][0] > last:  # all new: nothing to look up
            yield page
            continue
        keep = [p for p in page if p[0] > last or p[0] not in sent]
        n = sum(1 for p in keep if p[0] <= last)
        if n:
            late[t.pair.name] = late.get(t.pair.name, 0) + n
        page.clear()
        if keep:
            yield keep


def _consume(q: queue.Queue, todo: list[_Todo], arch: Archive, cfg: Config, outlet: Outlet,
             cp: Checkpoint | None, res: Result) -> None:
    import queue  # loaded by _run, its only caller

    first_error = None
    pending, gone, give_up = len(todo), 0, cfg.archive.give_up_after
    deadline = arch.deadline or float("inf")
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            res.status = Exit.ARCHIVE
            res.error = (f"run deadline of {cfg.collect.run_deadline:g}s ([collect] run_deadline) "
                         f"reached; {pending} of {res.fetched} series not read")
            break
        try:
            t, item = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if item is _DONE:
            pending -= 1
            gone = 0
        elif isinstance(item, ArchiveError):
            pending -= 1
            res.failed += 1
            first_error = first_error or str(item)
            log.error("%s", item)
            gone = gone + 1 if unreachable(item) else 0
            if give_up and gone >= give_up and pending:
                res.status = Exit.ARCHIVE
                res.error = (f"archive gone: {gone} series in a row had no connection or no "
                             f"answer; gave up on the other {pending} of {res.fetched} "
                             f"([archive] give_up_after); first: {first_error}")
                break
        else:
            msg, stamps = item
            outlet.send(msg, functools.partial(_confirmed, t, msg, stamps, cp, res))
            if cp is not None:  # what that send saw confirmed, on disk in one flush
                cp.sync()
    outlet.flush()
    if cp is not None:
        cp.sync()
    if res.failed and res.status == Exit.OK:
        res.status = Exit.ARCHIVE
        res.error = f"{res.failed} of {res.fetched} series could not be read; first: {first_error}"


def _confirmed(t: _Todo, msg: Message, stamps: list[int], cp: Checkpoint | None,
               res: Result) -> None:
    """The broker has ``msg`` (and every message before it): now the checkpoint may move."""
    pair = t.pair
    if cp is not None:
        cp.advance(pair.name, msg.last_ts)
        cp.remember(pair.name, t.floor, stamps)
    res.points += msg.points
    res.messages += 1
    res.points_by_type[pair.event_type] = res.points_by_type.get(pair.event_type, 0) + msg.points


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
            part = buf[:chunk]
            ready.append((enc.encode(part), [p[0] for p in part]))
            del buf[:chunk]
        while ready:
            yield ready.pop(0)
    if buf:
        yield enc.encode(buf), [p[0] for p in buf]


def summary(res: Result) -> str:
    """The run's one summary line (journal, tests and operators read it)."""
    lag = res.lag()
    return (
        f"collect {res.host}: {'ok' if res.status == Exit.OK else 'FAILED'}"
        f" series={res.series} fetched={res.fetched} failed={res.failed}"
        f" points={res.points} messages={res.messages} requests={res.requests}"
        f" duration={res.duration:.2f}s lag={'unknown' if lag is None else f'{lag:.0f}s'}"
        + (f" late={res.late}" if res.late else "")
        + (f" unroutable={sum(res.unroutable.values())}" if res.unroutable else "")
        + (f" error={res.error}" if res.error else "")
    )
