"""Per-host checkpoints and the per-host run lock.

A checkpoint maps each series (``<metadata-key>/<event-type>``) to the newest
timestamp the broker has *confirmed*.  It only ever moves forward, and only
after the confirm, so a run killed at any instant resends at most the window of
messages it had published and not yet seen confirmed ([broker] confirm_window).

Per confirmed message that is one line appended to ``checkpoint.journal``; the
lines of each batch of confirms are flushed with one fdatasync.  At the end of
a run the journal is folded into ``checkpoint.json``, written atomically (temp
file, fsync, rename), and emptied.  Loading replays the journal over the
snapshot; a line torn by a crash is ignored, and replaying twice is harmless
because positions only move forward.

At the end of each run a copy goes to ``checkpoint.prev.json``.  If the
checkpoint is later found damaged (disk trouble, a hand edit), the copy is a
position no newer than what the broker confirmed, so resuming from it loses
nothing and resends at most what was confirmed after the copy was taken.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from psprobe import state

VERSION = 1
COPY = "checkpoint.prev.json"
JOURNAL = "checkpoint.journal"

log = logging.getLogger("psprobe.checkpoint")


class StateError(Exception):
    """The state directory cannot be used; one line naming the path."""


@dataclass
class Checkpoint:
    path: Path
    pairs: dict[str, int] = field(default_factory=dict)
    scheme: str | None = None  # the archive scheme that worked last
    _dirfd: int | None = field(default=None, repr=False, compare=False)
    _journal: int | None = field(default=None, repr=False, compare=False)
    _unsynced: bool = field(default=False, repr=False, compare=False)

    def get(self, pair: str) -> int | None:
        return self.pairs.get(pair)

    def advance(self, pair: str, ts: int) -> None:
        """Record a confirmed timestamp (durable at the next :meth:`sync`); never moves backwards.

        A process that dies loses no written line (the page cache keeps it); only a
        machine that loses power can lose the lines since the last sync, and those
        messages are sent again.
        """
        if ts > self.pairs.get(pair, -1):
            self.pairs[pair] = ts
            line = f"{pair} {ts}\n".encode()
            try:
                if self._journal is None:
                    self._journal = os.open(self.path.with_name(JOURNAL), os.O_WRONLY
                                            | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                    self._sync_dir()  # the journal's name must survive a crash too
                os.write(self._journal, line)
            except OSError as e:
                raise StateError(f"{self.path.with_name(JOURNAL)}: cannot write checkpoint: "
                                 f"{e.strerror}") from None
            self._unsynced = True

    def sync(self) -> None:
        """One fdatasync for the lines since the last: a flush per batch of confirms."""
        if self._unsynced and self._journal is not None:
            try:
                os.fdatasync(self._journal)
            except OSError as e:
                raise StateError(f"{self.path.with_name(JOURNAL)}: cannot write checkpoint: "
                                 f"{e.strerror}") from None
            self._unsynced = False

    def _sync_dir(self) -> None:
        if self._dirfd is None:
            self._dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(self._dirfd)

    def save(self, path: Path | None = None) -> None:
        """Temp file, fsync, rename, fsync of the directory: old or new, never torn.

        This runs after every confirmed message, so it is the lean form of
        :func:`psprobe.state.write_json_atomic`: a fixed temp name (safe, the
        host's lock is held) and raw os calls.
        """
        path = path or self.path
        data = json.dumps({"version": VERSION, "scheme": self.scheme, "pairs": self.pairs},
                          separators=(",", ":"), sort_keys=True).encode()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_dir()
            if path == self.path:  # the snapshot now holds what the journal said
                journal = path.with_name(JOURNAL)
                if self._journal is not None:
                    os.ftruncate(self._journal, 0)
                    os.fsync(self._journal)
                elif journal.exists():
                    os.truncate(journal, 0)
        except OSError as e:
            raise StateError(f"{path}: cannot write checkpoint: {e.strerror}") from None

    def close(self) -> None:
        for fd in (self._dirfd, self._journal):
            if fd is not None:
                os.close(fd)
        self._dirfd = self._journal = None

    def sweep(self) -> int:
        """Remove temp files a killed run left (only under the host's lock).

        Only collect's own files: target.json belongs to sync, which does not
        take the host's lock.
        """
        n = 0
        d = self.path.parent
        for p in [*d.glob(".checkpoint*.tmp"), *d.glob(".history.json.*.tmp")]:
            try:
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: cannot remove a stale temp file: %s", p, e.strerror)
        return n

    def keep_copy(self) -> None:
        """End of a run: fold the journal into the file, and copy it aside as the fallback."""
        if self.pairs:
            self.save()
            self.save(self.path.with_name(COPY))


def _parse(path: Path) -> Checkpoint | None:
    """The checkpoint in ``path`` (None if missing); ValueError if damaged."""
    data = state.read_json(path, default=None)
    if data is None:
        return None
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in pairs.items()
    ):
        raise ValueError(f"{path}: checkpoint has the wrong shape")
    scheme = data.get("scheme")
    return Checkpoint(path, dict(pairs), scheme if scheme in ("http", "https") else None)


def load(state_dir: str, host: str) -> Checkpoint:
    """The host's checkpoint; a missing one is empty.

    A damaged one is replaced by the copy of the end of the last run (kept
    as ``checkpoint.json.damaged`` for the operator, with a warning).  With no
    usable copy it is an error: guessing a position could skip data (gaps) or
    resend days of it.
    """
    path = state.host_dir(state_dir, host) / "checkpoint.json"
    return _replay(_snapshot(path))


def _replay(cp: Checkpoint) -> Checkpoint:
    """Apply the journal's confirmed positions (appended since the snapshot) to ``cp``."""
    journal = cp.path.with_name(JOURNAL)
    try:
        raw = journal.read_bytes()
    except FileNotFoundError:
        return cp
    except OSError as e:
        raise StateError(f"{journal}: cannot read checkpoint: {e.strerror}") from None
    for n, line in enumerate(raw.split(b"\n")[:-1], 1):  # the last piece is torn or empty
        try:
            pair, ts_text = line.decode().split(" ")
            ts = int(ts_text)
        except ValueError:
            log.warning("%s: line %d is damaged; replayed the %d before it", journal, n, n - 1)
            break
        if ts > cp.pairs.get(pair, -1):
            cp.pairs[pair] = ts
    return cp


def _snapshot(path: Path) -> Checkpoint:
    """The checkpoint file, or the copy of the end of the last run if it is damaged."""
    try:
        cp = _parse(path)
        return cp if cp is not None else Checkpoint(path)
    except OSError as e:
        raise StateError(f"{path}: cannot read checkpoint: {e.strerror}") from None
    except ValueError as e:
        damage = str(e)
    try:
        copy = _parse(path.with_name(COPY))
    except (OSError, ValueError):
        copy = None
    if copy is None:
        raise StateError(f"{damage}; no usable {COPY} either: move it aside to start from "
                         "[collect] first_run_lookback") from None
    try:
        os.replace(path, path.with_name(path.name + ".damaged"))
    except OSError as e:
        raise StateError(f"{damage}; cannot move it aside: {e.strerror}") from None
    log.warning("%s; resuming from %s (the end of the last run), kept the damaged file as "
                "%s.damaged", damage, COPY, path.name)
    return Checkpoint(path, copy.pairs, copy.scheme)


class Busy(Exception):
    """Another process holds the lock."""


class Lock:
    """An exclusive, non-blocking flock(2) on a file; released when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise StateError(f"{self.path}: cannot open lock: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Busy(str(self.path)) from None
            raise StateError(f"{self.path}: cannot lock: {e.strerror}") from None
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def host_lock(state_dir: str, host: str) -> Lock:
    return Lock(state.host_dir(state_dir, host) / "lock")


def peek(state_dir: str, host: str) -> dict[str, int]:
    """The confirmed positions, read only (for status): no fallback, no renaming."""
    path = state.host_dir(state_dir, host) / "checkpoint.json"
    try:
        cp = _parse(path) or Checkpoint(path)
        return _replay(cp).pairs
    except (OSError, ValueError, StateError):
        return {}
