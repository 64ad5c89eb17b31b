"""The receiver's spool: accepted runs, fsynced, waiting in order for the broker's confirm.

``psprobe receive`` answers a push 2xx only once :meth:`Spool.append` has
returned, so an append is durable: its records are written to the open segment
and fdatasync'd before it returns.  Many HTTP threads append at once, and one
fdatasync covers every append that queued while the previous one ran (group
commit: the first waiter becomes the leader and syncs for all, the others wait
on a condition).  A forwarder takes the records in append order, publishes them
with confirms and :meth:`commits <Spool.commit>` what the broker confirmed.

Layout of ``spool/`` (:func:`psprobe.state.spool_dir`)::

    0000000000000001.seg   records, appended; a new segment past segment_bytes
    position.json          {"segment", "offset"}: everything before it is confirmed
    lock                   flock(2) held by the one process that uses the spool

A record is framed so that a torn or damaged one is recognised, and the next
found again, whatever its bytes hold::

    magic b"\\xffPSR" | length u32 | crc32(length, payload) u32 | payload
    payload: at f64 | last_ts i64 | points u32 | len(host), len(routing key),
             len(message id) u16 each | host | routing key | message id | body

(0xff never occurs in UTF-8, so no body or name holds the magic; where other
bytes happen to, the checksum tells.)  Opening recovers: a bad tail of the last
segment is a write a crash (or kill -9) interrupted, whose append never
returned, so it was never acknowledged: truncated, with a warning.  A bad
record elsewhere (disk damage, a hand edit) is skipped with a warning naming
the file and offset; the spool never stops on one.

Bounded: :class:`SpoolFull` when what waits for the broker (bytes from the
committed position on) would pass ``max_bytes``; nothing is written then.  The
disk holds at most one segment more: the consumed head of the first segment,
deleted with it once the whole segment is confirmed.

Nothing is opened through a link: the spool directory is opened with
O_NOFOLLOW below the state directory, and files relative to it (psprobe.state).
Files are 0640 and the directory 0750, owned by whoever runs the receiver.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from psprobe import state
from psprobe.messages import Message

log = logging.getLogger("psprobe.spool")

POSITION = "position.json"
LOCK = "lock"
_SEGMENT = re.compile(r"^(\d{16})\.seg$")

MAGIC = b"\xffPSR"
_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32 of (length, payload)
_FIXED = struct.Struct("<dqIHHH")  # at, last_ts, points, len(host), len(routing key), len(id)
_CHUNK = 1 << 20  # bytes read at once when scanning a segment

Pos = tuple[int, int]  # (segment number, offset): ordered like the records


class SpoolFull(Exception):
    """The spool holds ``max_bytes`` waiting for the broker: answer 503, the pusher retries."""


@dataclass(frozen=True)
class Entry:
    """One spooled message; ``pos`` is just after it (what :meth:`Spool.commit` persists)."""

    host: str
    msg: Message
    pos: tuple[int, int]


def _seg_name(n: int) -> str:
    return f"{n:016d}.seg"


def encode(host: str, msg: Message, at: float) -> bytes:
    """The framed record of one message (see the module doc)."""
    names = [host.encode(), msg.routing_key.encode(), msg.message_id.encode()]
    if max(map(len, names)) > 0xFFFF:
        raise ValueError("host, routing key or message id longer than 65535 bytes")
    payload = b"".join((_FIXED.pack(at, msg.last_ts, msg.points, *map(len, names)), *names,
                        msg.body))
    n = len(payload).to_bytes(4, "little")
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload, zlib.crc32(n))) + payload


def decode(payload: bytes) -> tuple[str, Message, float]:
    """(host, message, append time) of a payload whose checksum held; ValueError if malformed."""
    at, last_ts, points, lh, lr, lm = _FIXED.unpack_from(payload)
    i = _FIXED.size
    if i + lh + lr + lm > len(payload):
        raise ValueError("field lengths past the record")
    host = payload[i:i + lh].decode()
    rk = payload[i + lh:i + lh + lr].decode()
    mid = payload[i + lh + lr:i + lh + lr + lm].decode()
    return host, Message(rk, mid, payload[i + lh + lr + lm:], last_ts, points), at


class _Reader:
    """Records of one segment file, read through a buffer (pread: no shared file offset)."""

    def __init__(self, fd: int, path: Path, seg: int) -> None:
        self.fd, self.path, self.seg = fd, path, seg
        self._base, self._buf = 0, b""

    def read(self, off: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``off`` (fewer at the end of the file)."""
        rel = off - self._base
        if 0 <= rel and rel + n <= len(self._buf):
            return self._buf[rel:rel + n]
        self._buf, self._base = os.pread(self.fd, max(n, _CHUNK), off), off
        return self._buf[:n]

    def payload(self, off: int, end: int) -> bytes | None:
        """The payload of a sound record at ``off`` ending by ``end``; None if there is none."""
        head = self.read(off, _HEAD.size)
        if len(head) < _HEAD.size:
            return None
        magic, n, crc = _HEAD.unpack(head)
        if magic != MAGIC or off + _HEAD.size + n > end or n < _FIXED.size:
            return None
        payload = self.read(off + _HEAD.size, n)
        if len(payload) < n or zlib.crc32(payload, zlib.crc32(head[4:8])) != crc:
            return None
        return payload

    def resync(self, off: int, end: int) -> int:
        """Offset of the next sound record after ``off`` (``end`` if none)."""
        pos = off + 1
        while pos < end:
            chunk = self.read(pos, min(_CHUNK, end - pos))
            i = chunk.find(MAGIC)
            if i < 0:
                pos += max(1, len(chunk) - len(MAGIC) + 1)
                continue
            if self.payload(pos + i, end) is not None:
                return pos + i
            pos += i + 1
        return end

    def records(self, off: int, end: int) -> Iterator[tuple[int, int, tuple | None]]:
        """(offset, next offset, decoded record or None for a damaged span) from ``off`` to ``end``."""
        while off < end:
            payload = self.payload(off, end)
            rec = None
            if payload is not None:
                with contextlib.suppress(ValueError, struct.error):  # UnicodeDecodeError is one
                    rec = decode(payload)
            if rec is None:
                nxt = self.resync(off, end)
                yield off, nxt, None
            else:
                nxt = off + _HEAD.size + len(payload)
                yield off, nxt, rec
            off = nxt


class Spool:
    """Append-only segments under ``path`` (``state.spool_dir(state_dir)``) and a read position.

    Appends come from any number of threads; take/commit/rewind from one
    consumer (the forwarder).  The directory is locked (flock) for the life of
    the object: a second process on the same spool gets state.StateError.
    """

    def __init__(self, path: str | Path, max_bytes: int, segment_bytes: int = 16 << 20) -> None:
        self.path, self.max_bytes, self.segment_bytes = Path(path), max_bytes, segment_bytes
        self.syncs = 0  # fdatasyncs of appends (group commit: fewer than appends under load)
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)  # a group commit finished
        self._ready = threading.Condition(self._lock)  # something to take, or closed
        self._dfd = self._open_dir()
        self._lockfd: int | None = None
        try:
            self._lockfd = state.open_file(self._dfd, LOCK, os.O_RDWR | os.O_CREAT, 0o640,
                                           path=self.path / LOCK)
            if not state.flock(self._lockfd):
                raise state.StateError(f"{self.path}: in use by another process")
            self._recover()
        except BaseException:
            self._close_fds()
            raise

    # --- opening

    def _open_dir(self) -> int:
        """The spool directory (0750, made if missing), never through a link (LinkError)."""
        parent = state.open_dir(self.path.parent, create=True)  # the state dir may be a link
        made = False
        try:
            with contextlib.suppress(FileExistsError):  # or a link: refused just below
                os.mkdir(self.path.name, 0o750, dir_fd=parent)
                made = True
        finally:
            os.close(parent)
        fd = state.open_dir(self.path.parent, self.path.name)
        if made:
            os.fchmod(fd, 0o750)  # whatever the umask
        return fd

    def _recover(self) -> None:
        """Read the position, drop consumed segments, check the rest, truncate a torn tail."""
        segs = []
        for name in os.listdir(self._dfd):
            m = _SEGMENT.match(name)
            if m:
                segs.append(int(m.group(1)))
            elif state.is_temp(name, POSITION):  # a commit killed mid-write
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self._dfd)
        segs.sort()
        pos = self._read_position(segs)
        for n in [s for s in segs if s < pos[0]]:  # confirmed; a crash came before their unlink
            self._unlink(n)
        segs = [s for s in segs if s >= pos[0]]
        if pos[0] not in segs:  # that segment was consumed and deleted
            pos = (segs[0], 0) if segs else (pos[0], 0)
        self._sizes: dict[int, int] = {}
        self._warned: set[Pos] = set()  # damaged records warned of (segment, offset)
        count = 0
        for n in segs:
            last = n == segs[-1]
            flags = os.O_RDWR | os.O_APPEND if last else os.O_RDONLY  # appends go on in the last
            fd = state.open_file(self._dfd, _seg_name(n), flags, path=self.path / _seg_name(n))
            try:
                size = os.fstat(fd).st_size
                start = pos[1] if n == pos[0] else 0
                if start > size:
                    log.warning("%s: the committed position %d is past its end (%d bytes); "
                                "resuming at its end", self.path / _seg_name(n), start, size)
                    pos = (n, size)
                    start = size
                rd = _Reader(fd, self.path / _seg_name(n), n)
                found, size = self._check(rd, start, size, last)
                count += found
                if last:
                    os.fdatasync(fd)  # what a killed process left in the page cache is forwarded
                    self._wfd: int | None = fd
                    fd = -1
            finally:
                if fd >= 0:
                    os.close(fd)
            self._sizes[n] = size
        if not segs:
            self._wfd = None
        self._wseg = segs[-1] if segs else pos[0]
        self._wend = self._sizes.get(self._wseg, 0)
        self._durable: Pos = (self._wseg, self._wend)  # records before it are fsynced
        self._committed: Pos = pos
        self._cursor: Pos = pos  # next take() reads from here
        self._written_n = self._durable_n = count  # records after the committed position
        self._committed_n = self._taken_n = 0
        # Ends of the records taken since the last commit, kept across a rewind: a confirm
        # that arrives for one after it still commits (and counts) it.
        self._taken: collections.deque[Pos] = collections.deque()
        self._syncing = False
        self._roll_next = False  # a failed fdatasync: continue in a fresh segment
        self._failed_upto: Pos = (0, 0)  # appends up to here saw their fdatasync fail
        self._oldest: float | None = None
        self._oldest_known = False
        self._closed = False
        self._rfd: tuple[int, _Reader] | None = None  # the consumer's open segment

    def _read_position(self, segs: list[int]) -> Pos:
        path = self.path / POSITION
        try:
            raw = state.read_json_at(self._dfd, POSITION, None, path=path)
            if raw is None:
                return (segs[0] if segs else 0, 0)
            pos = (int(raw["segment"]), int(raw["offset"]))
            if pos[0] < 0 or pos[1] < 0:
                raise ValueError("negative")
            return pos
        except (ValueError, KeyError, TypeError) as e:
            # Starting over resends what was confirmed (ids let consumers drop it); never loses.
            log.warning("%s: unreadable (%s); sending the spool again from its first segment",
                        path, str(e).splitlines()[0])
            return (segs[0] if segs else 0, 0)

    def _check(self, rd: _Reader, start: int, size: int, last: bool) -> tuple[int, int]:
        """(sound records from ``start``, size): warns of damage, truncates a torn last tail."""
        count = 0
        for off, nxt, rec in rd.records(start, size):
            if rec is not None:
                count += 1
            elif last and nxt == size:
                log.warning("%s: %d bytes at offset %d are a write that a crash interrupted "
                            "(never acknowledged); truncated", rd.path, size - off, off)
                os.ftruncate(rd.fd, off)
                os.fsync(rd.fd)
                return count, off
            else:
                self._warned.add((rd.seg, off))
                log.warning("%s: damaged record at offset %d; skipped %d bytes to the next sound "
                            "one", rd.path, off, nxt - off)
        return count, size

    # --- appending

    def append(self, host: str, msgs: Sequence[Message]) -> None:
        """Write ``msgs`` and fdatasync them (shared with concurrent appends) before returning.

        SpoolFull (nothing written) when what waits would pass max_bytes;
        OSError when the disk refuses (nothing acknowledged: answer 503).
        """
        if not msgs:
            return
        at = time.time()
        data = b"".join(encode(host, m, at) for m in msgs)
        with self._lock:
            if self._closed:
                raise state.StateError(f"{self.path}: spool closed")
            waiting = self._waiting()
            if waiting + len(data) > self.max_bytes:
                raise SpoolFull(f"{self.path}: {waiting} bytes wait for the broker; "
                                f"{len(data)} more would pass the limit of {self.max_bytes}")
            while self._wfd is None or self._roll_next or (
                    self._wend and self._wend + len(data) > self.segment_bytes):
                if self._syncing:  # its fd must stay open until it returns
                    self._synced.wait()
                    if self._closed:
                        raise state.StateError(f"{self.path}: spool closed")
                    continue
                self._roll()
            start = self._wend
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._wfd, view):]
            except OSError as e:
                try:
                    os.ftruncate(self._wfd, start)  # what a reader would take for damage
                except OSError:
                    self._roll_next = True
                raise OSError(e.errno, e.strerror, str(self.path / _seg_name(self._wseg))) from None
            if self._written_n == self._committed_n:  # the oldest now
                self._oldest, self._oldest_known = at, True
            self._wend += len(data)
            self._sizes[self._wseg] = self._wend
            self._written_n += len(msgs)
            self._commit_group((self._wseg, self._wend))

    def _commit_group(self, mine: Pos) -> None:
        """Return once ``mine`` is fsynced: lead one fdatasync for all written so far, or wait."""
        while self._durable < mine:
            if self._closed:
                raise state.StateError(f"{self.path}: spool closed")
            if mine <= self._failed_upto:
                raise OSError(f"{self.path / _seg_name(mine[0])}: fdatasync failed")
            if self._syncing:
                self._synced.wait()
                continue
            target, target_n, fd = (self._wseg, self._wend), self._written_n, self._wfd
            self._syncing = True
            self._lock.release()
            err = None
            try:
                os.fdatasync(fd)
            except OSError as e:
                err = e
            finally:
                self._lock.acquire()
                self._syncing = False
                self.syncs += 1
                self._synced.notify_all()
            if err is not None:
                # Linux may drop the failed pages and report success next time: nothing
                # in this range is acknowledged, and the next append opens a fresh segment.
                self._failed_upto, self._roll_next = target, True
                raise OSError(err.errno, err.strerror, str(self.path / _seg_name(target[0])))
            self._advance(target, target_n)

    def _advance(self, durable: Pos, n: int) -> None:
        if durable > self._durable:
            self._durable, self._durable_n = durable, n
            self._ready.notify_all()

    def _roll(self) -> None:
        """Seal the open segment (fdatasync) and start the next: created, then the directory fsynced."""
        if self._wfd is not None:
            os.fdatasync(self._wfd)
            self._advance((self._wseg, self._wend), self._written_n)
            os.close(self._wfd)
            self._wfd = None
        n = self._wseg + 1
        path = self.path / _seg_name(n)
        fd = state.open_file(self._dfd, _seg_name(n), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                             | os.O_EXCL, 0o640, path=path)
        try:
            os.fchmod(fd, 0o640)
            os.fsync(self._dfd)  # the new name must survive a crash with what it will hold
        except OSError:
            os.close(fd)
            raise
        self._wfd, self._wseg, self._wend, self._roll_next = fd, n, 0, False
        self._sizes[n] = 0

    def _waiting(self) -> int:
        """Bytes from the committed position on (what max_bytes bounds)."""
        seg, off = self._committed
        return sum(s for n, s in self._sizes.items() if n >= seg) - (
            off if seg in self._sizes else 0)

    # --- the consumer

    def take(self, limit: int) -> list[Entry]:
        """Up to ``limit`` fsynced entries after the last taken, in append order."""
        out: list[Entry] = []
        caught_up = None  # durable count when the cursor reached the durable end
        while len(out) < limit:
            with self._lock:
                durable, durable_n = self._durable, self._durable_n
                seg, off = self._cursor
                if (seg, off) >= durable:
                    caught_up = durable_n
                    break
                size = durable[1] if seg == durable[0] else self._sizes.get(seg)
                if size is None or off >= size:  # a finished (or deleted) segment: the next one
                    self._cursor = (min(n for n in self._sizes if n > seg), 0)
                    continue
            rd = self._reader(seg)
            for start, nxt, rec in rd.records(off, size):
                if rec is None:
                    if (seg, start) in self._warned:  # at opening
                        continue
                    self._warned.add((seg, start))
                    log.warning("%s: damaged record at offset %d; skipped %d bytes to the next "
                                "sound one", rd.path, start, nxt - start)
                else:
                    host, msg, _ = rec
                    out.append(Entry(host, msg, (seg, nxt)))
                    if not self._taken or (seg, nxt) > self._taken[-1]:  # else taken again
                        self._taken.append((seg, nxt))
                self._cursor = (seg, nxt)
                if len(out) >= limit:
                    break
        with self._lock:
            # In step with the count even where damage found since opening was skipped.
            self._taken_n = caught_up if caught_up is not None else min(
                self._taken_n + len(out), self._durable_n)
        return out

    def _reader(self, seg: int) -> _Reader:
        if self._rfd is not None and self._rfd[0] == seg:
            rd = self._rfd[1]
            rd._buf = b""  # bytes read past the durable end last time may since have changed
            return rd
        self._close_reader()
        path = self.path / _seg_name(seg)
        rd = _Reader(state.open_file(self._dfd, _seg_name(seg), os.O_RDONLY, path=path), path, seg)
        self._rfd = (seg, rd)
        return rd

    def _close_reader(self) -> None:
        if self._rfd is not None:
            os.close(self._rfd[1].fd)
            self._rfd = None

    def commit(self, entry: Entry) -> None:
        """The broker confirmed everything up to ``entry``: persist that, drop consumed segments.

        A crash before this returns resends what came after the last commit
        (ids let consumers drop the duplicates).  After a rewind, an entry
        taken before it may still be committed: take() then goes on after it.
        """
        pos = tuple(entry.pos)
        if pos <= self._committed:
            return
        if not self._taken or pos > self._taken[-1]:
            raise ValueError(f"{self.path}: commit of {pos}, which was not taken")
        state.write_at(self._dfd, POSITION, state.dumps({"segment": pos[0], "offset": pos[1]}),
                       0o640, path=self.path / POSITION)
        done = 0
        while self._taken and self._taken[0] <= pos:
            self._taken.popleft()
            done += 1
        with self._lock:
            self._committed = pos
            self._committed_n += done
            if self._cursor < pos:
                self._cursor, self._taken_n = pos, self._committed_n
            self._oldest_known = False
            gone = [n for n in self._sizes if n < pos[0] or (
                n == pos[0] < self._wseg and pos[1] >= self._sizes[n])]
            for n in gone:
                del self._sizes[n]
                if self._rfd is not None and self._rfd[0] == n:
                    self._close_reader()
                self._unlink(n)

    def _unlink(self, n: int) -> None:
        try:
            os.unlink(_seg_name(n), dir_fd=self._dfd)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot delete a consumed segment: %s", self.path / _seg_name(n),
                        e.strerror)

    def rewind(self) -> None:
        """The forwarder lost its broker: the next take() starts again after the last commit."""
        with self._lock:
            self._cursor = self._committed
            self._taken_n = self._committed_n
            if self._durable_n > self._taken_n:
                self._ready.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until there is something to take (True), or ``timeout`` passes or close() (False)."""
        with self._lock:
            self._ready.wait_for(lambda: self._durable_n > self._taken_n or self._closed, timeout)
            return self._durable_n > self._taken_n

    # --- for status and metrics

    def pending(self) -> int:
        """Messages spooled (fsynced) and not yet confirmed by the broker."""
        with self._lock:
            return self._durable_n - self._committed_n

    def size(self) -> int:
        """Bytes of the segments on disk."""
        with self._lock:
            return sum(self._sizes.values())

    def oldest(self) -> float | None:
        """When the oldest message not yet confirmed was appended (epoch s); None when none."""
        with self._lock:
            if self._durable_n == self._committed_n:
                return None
            if not self._oldest_known:
                self._oldest, self._oldest_known = self._first_time(), True
            return self._oldest

    def _first_time(self) -> float | None:
        """Append time of the first sound record after the committed position (lock held)."""
        for seg in sorted(n for n in self._sizes if n >= self._committed[0]):
            off = self._committed[1] if seg == self._committed[0] else 0
            try:
                fd = state.open_file(self._dfd, _seg_name(seg), os.O_RDONLY,
                                     path=self.path / _seg_name(seg))
            except OSError:
                continue
            try:
                for _, _, rec in _Reader(fd, self.path / _seg_name(seg), seg).records(
                        off, self._sizes[seg]):
                    if rec is not None:
                        return rec[2]
            finally:
                os.close(fd)
        return None

    def close(self) -> None:
        """Release the files and the lock; a waiting consumer wakes (wait() returns False)."""
        with self._lock:
            while self._syncing:
                self._synced.wait()
            self._closed = True
            self._ready.notify_all()
            self._close_fds()

    def _close_fds(self) -> None:
        if getattr(self, "_rfd", None) is not None:
            self._close_reader()
        for name in ("_wfd", "_lockfd", "_dfd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
