"""Per-host checkpoints and the per-host run lock.

A checkpoint maps each series (``<metadata-key>/<event-type>``) to the newest
timestamp the broker has *confirmed*.  It only ever moves forward, and it is
rewritten atomically after every confirmed message, so a run killed at any
instant resends at most the one message that was in flight.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from psprobe import state

VERSION = 1


class StateError(Exception):
    """The state directory cannot be used; one line naming the path."""


@dataclass
class Checkpoint:
    path: Path
    pairs: dict[str, int] = field(default_factory=dict)
    scheme: str | None = None  # the archive scheme that worked last

    def get(self, pair: str) -> int | None:
        return self.pairs.get(pair)

    def advance(self, pair: str, ts: int) -> None:
        """Record a confirmed timestamp; never moves backwards."""
        if ts > self.pairs.get(pair, -1):
            self.pairs[pair] = ts
            self.save()

    def save(self) -> None:
        try:
            state.write_json_atomic(self.path, {"version": VERSION, "scheme": self.scheme,
                                                "pairs": self.pairs})
        except OSError as e:
            raise StateError(f"{self.path}: cannot write checkpoint: {e.strerror}") from None


def load(state_dir: str, host: str) -> Checkpoint:
    """The host's checkpoint; a missing one is empty, a damaged one is an error.

    A damaged checkpoint is left in place, untouched, for the operator: guessing
    a position could skip data (gaps) or resend days of it.
    """
    path = state.host_dir(state_dir, host) / "checkpoint.json"
    try:
        data = state.read_json(path, default=None)
    except ValueError as e:
        raise StateError(f"{e}; move it aside to start from [collect] first_run_lookback") from None
    except OSError as e:
        raise StateError(f"{path}: cannot read checkpoint: {e.strerror}") from None
    if data is None:
        return Checkpoint(path)
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in pairs.items()
    ):
        raise StateError(f"{path}: checkpoint has the wrong shape; move it aside to start over")
    scheme = data.get("scheme")
    return Checkpoint(path, dict(pairs), scheme if scheme in ("http", "https") else None)


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
