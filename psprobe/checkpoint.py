"""Per-host checkpoints: where each series of a host's archive was confirmed up to.

A checkpoint maps each series (``<metadata-key>/<event-type>``) to the newest
timestamp the broker has *confirmed*.  It only ever moves forward, and only
after the confirm, so a run killed at any instant resends at most the window of
messages it had published and not yet seen confirmed ([broker] confirm_window).

Per confirmed message that is one line appended to ``checkpoint.journal``
(:meth:`Checkpoint.advance`); the lines of each batch of confirms are flushed
with one fdatasync (:meth:`Checkpoint.sync`).  Only at the end of a run (and
when the archive's scheme changes) is the journal folded into
``checkpoint.json``, written atomically (:meth:`Checkpoint.save`), and
emptied.  Loading replays the journal over the snapshot; a line torn by a
crash is ignored, and replaying twice is harmless because positions only
move forward.

At the end of each run a copy goes to ``checkpoint.prev.json``.  If the
checkpoint is later found damaged (disk trouble, a hand edit), the copy is a
position no newer than what the broker confirmed, so resuming from it loses
nothing and resends at most what was confirmed after the copy was taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from psprobe import state

VERSION = 1

log = logging.getLogger("psprobe.checkpoint")


def _failed(path: object, what: str, e: OSError) -> state.StateError:
    """The one line for an OSError on ``path``; a refused path (a link...) says so itself."""
    return e if isinstance(e, state.Refused) else state.StateError(f"{path}: {what}: {e.strerror}")


@dataclass
class Checkpoint:
    """A host's confirmed positions, as loaded; moved only by what the broker confirmed."""

    path: Path
    pairs: dict[str, int] = field(default_factory=dict)
    scheme: str | None = None  # the archive scheme that worked last
    # What was sent lately, for the look-back of late points ([collect] late_window):
    # per pair, the first ts from which the list is complete, then the sent ts.
    recent: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    swept: float | None = None  # wall time of the last complete look-back
    routed: set[str] = field(default_factory=set)  # routing keys that ever reached a queue
    horizon: int = field(default=0, repr=False, compare=False)  # remember() keeps ts >= it
    _dirfd: int | None = field(default=None, repr=False, compare=False)
    _journal: int | None = field(default=None, repr=False, compare=False)
    _unsynced: bool = field(default=False, repr=False, compare=False)
    _root: str | None = field(default=None, repr=False, compare=False)  # the state dir
    # The file's bytes as loaded, when they were the whole state (no journal line after)
    _stored: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def journal(self) -> Path:
        return self.path.with_name(state.JOURNAL)

    def _dir(self) -> int:
        """The host directory's fd: opened once, never through a link below the state dir."""
        if self._dirfd is None:
            self._dirfd = state.dir_fd(self.path, self._root)
        return self._dirfd

    @property
    def newest(self) -> int | None:
        return newest(self.pairs)

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
                    self._journal = state.open_file(
                        self._dir(), state.JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640,
                        path=self.journal)
                    self._sync_dir()  # the journal's name must survive a crash too
                os.write(self._journal, line)
            except OSError as e:
                raise _failed(self.journal, "cannot write checkpoint", e) from None
            self._unsynced = True

    def seen(self, pair: str) -> tuple[int, frozenset[int]]:
        """(first ts the record is complete from, timestamps sent since) for ``pair``.

        A pair with no record yet (a new install, an upgrade) is complete from just
        after its checkpoint: nothing behind it is known to have been sent.
        """
        floor, stamps = self.recent.get(pair, (self.pairs.get(pair, -1) + 1, []))
        return floor, frozenset(stamps)

    def remember(self, pair: str, floor: int, stamps: list[int]) -> None:
        """Confirmed timestamps of ``pair``; ``floor`` opens the record of a new pair."""
        if stamps[-1] < self.horizon:
            return
        if stamps[0] < self.horizon:
            stamps = [t for t in stamps if t >= self.horizon]
        rec = self.recent.get(pair)
        if rec is None:
            self.recent[pair] = (floor, list(stamps))
        else:
            rec[1].extend(stamps)

    def forget_before(self, horizon: int) -> None:
        """Keep only what the next look-back can reach: ts >= ``horizon``."""
        for pair, (floor, stamps) in list(self.recent.items()):
            kept = sorted({t for t in stamps if t >= horizon})
            if not kept and self.pairs.get(pair, -1) < horizon:
                del self.recent[pair]  # idle series: its record starts again at its checkpoint
            else:
                self.recent[pair] = (max(floor, horizon), kept)

    def sync(self) -> None:
        """One fdatasync for the lines since the last: a flush per batch of confirms."""
        if self._unsynced and self._journal is not None:
            try:
                os.fdatasync(self._journal)
            except OSError as e:
                raise _failed(self.journal, "cannot write checkpoint", e) from None
            self._unsynced = False

    def _sync_dir(self) -> None:
        os.fsync(self._dir())

    def save(self, path: Path | None = None) -> None:
        """Write the positions (by :func:`psprobe.state.write_at`, durably): old or new, never torn.

        Then the journal is emptied: the snapshot holds what it said.  Runs
        when the archive's scheme changes and at the end of a run
        (:meth:`keep_copy`), not per confirm (that is :meth:`advance`).  The
        temp name is fixed (``.checkpoint.json.tmp``; a leftover is removed
        first, never followed): the host's lock is held, so no other writer
        can be using it, and a run killed any number of times leaves one.
        """
        path = path or self.path
        try:
            d = self._dir()
            state.write_at(d, path.name, self._dumps(), 0o640, path=path, fixed_temp=True)
            if path == self.path:  # the snapshot now holds what the journal said
                if self._journal is not None:
                    os.ftruncate(self._journal, 0)
                    os.fsync(self._journal)
                else:
                    try:
                        jfd = state.open_file(d, state.JOURNAL, os.O_WRONLY, path=self.journal)
                    except FileNotFoundError:
                        return
                    try:
                        os.ftruncate(jfd, 0)
                    finally:
                        os.close(jfd)
        except OSError as e:
            raise _failed(path, "cannot write checkpoint", e) from None

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
        try:
            d = self._dir()
            names = os.listdir(d)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise _failed(self.path.parent, "cannot read", e) from None
        for name in sorted(names):
            if not any(state.is_temp(name, of) for of in (state.CHECKPOINT, state.COPY, state.HISTORY)):
                continue
            try:
                os.unlink(name, dir_fd=d)  # a link is removed itself, never followed
                n += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: cannot remove a stale temp file: %s", self.path.parent / name,
                            e.strerror)
        return n

    def _dumps(self) -> bytes:
        doc = {"version": VERSION, "scheme": self.scheme, "pairs": self.pairs}
        if self.routed:
            doc["routed"] = sorted(self.routed)
        if self.swept is not None:
            doc["swept"] = round(self.swept, 3)
            doc["recent"] = {p: _deltas(f, ts) for p, (f, ts) in self.recent.items()}
        return state.dumps(doc)

    def keep_copy(self) -> None:
        """End of a run: fold the journal into the file, and copy it aside as the fallback.

        Most runs find nothing new: when the file and its copy already hold every
        byte, neither is written again (two fsyncs per host and interval saved).
        """
        if not self.pairs:
            return
        copy = self.path.with_name(state.COPY)
        if self._journal is None and self._stored is not None and self._dumps() == self._stored:
            try:
                if state.read_at(self._dir(), copy.name, path=copy) == self._stored:
                    return
            except OSError:
                pass  # unreadable: written again below
        self.save()
        self.save(copy)


def _parse(path: Path, dfd: int) -> Checkpoint | None:
    """The checkpoint in ``path`` (None if missing), read in ``dfd``; ValueError if damaged."""
    raw = state.read_at(dfd, path.name, path=path)
    if raw is None:
        return None
    data = state.loads(raw, path=path)
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in pairs.items()
    ):
        raise ValueError(f"{path}: checkpoint has the wrong shape")
    scheme = data.get("scheme")
    cp = Checkpoint(path, dict(pairs), scheme if scheme in ("http", "https") else None)
    routed = data.get("routed")
    if isinstance(routed, list):
        cp.routed = {k for k in routed if isinstance(k, str)}
    swept, recent = data.get("swept"), data.get("recent")
    if isinstance(swept, (int, float)) and not isinstance(swept, bool) and isinstance(recent, dict):
        cp.swept = float(swept)
        for p, d in recent.items():
            if isinstance(d, list) and d and all(type(x) is int for x in d):
                cp.recent[p] = _undeltas(d)
    cp._stored = raw
    return cp


def _deltas(floor: int, stamps: list[int]) -> list[int]:
    """``[floor, first - floor, second - first, ...]``: a few digits a point, not ten."""
    out, prev = [floor], floor
    for t in stamps:
        out.append(t - prev)
        prev = t
    return out


def _undeltas(d: list[int]) -> tuple[int, list[int]]:
    floor, prev, out = d[0], d[0], []
    for x in d[1:]:
        prev += x
        out.append(prev)
    return floor, out


def load(state_dir: str, host: str) -> Checkpoint:
    """The host's checkpoint; a missing one is empty.

    A damaged one is replaced by the copy of the end of the last run (kept
    as ``checkpoint.json.damaged`` for the operator, with a warning).  With no
    usable copy it is an error: guessing a position could skip data (gaps) or
    resend days of it.  A link where a state file of the host belongs
    (:data:`psprobe.state.HOST_FILES`) stops the run here, before it touches
    anything (:func:`psprobe.state.check_host_files`: one line naming it).
    """
    path = state.host_file(state_dir, host, state.CHECKPOINT)
    try:
        dfd = state.host_dir_fd(state_dir, host)
    except FileNotFoundError:
        return Checkpoint(path, _root=str(state_dir))  # nothing yet (a first dry run)
    except OSError as e:
        raise _failed(e.filename, "cannot read checkpoint", e) from None
    try:
        state.check_host_files(dfd, path.parent)
        cp = _snapshot(path, dfd)
        cp._dirfd, cp._root = dfd, str(state_dir)
        return _replay(cp)
    except BaseException:
        os.close(dfd)
        raise


def retire_if_moved(state_dir: str, host: str) -> bool:
    """Forget the host's positions when sync found another shard collecting it.

    Called under the host's lock before a collect loads its checkpoint.  While
    the host was collected elsewhere its positions here went stale: resuming
    from them would resend everything that machine sent since (as far back as
    the archive keeps).  Starting afresh costs one first-run look-back instead,
    the same as on the machine the host moved to.  True when it retired them.
    """
    try:
        rec = state.read_json(state.host_file(state_dir, host, state.MOVED), root=state_dir)
    except ValueError:
        rec = {}  # unreadable: still a marker
    if rec is None:
        return False
    dfd = state.host_dir_fd(state_dir, host)
    try:
        for name in (state.CHECKPOINT, state.JOURNAL, state.COPY, state.MOVED):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)  # a link is removed itself, never followed
        os.fsync(dfd)
    except OSError as e:
        raise _failed(state.host_dir(state_dir, host), "cannot retire a moved host's checkpoint",
                      e) from None
    finally:
        os.close(dfd)
    since = rec.get("time") if isinstance(rec, dict) else None
    log.warning("%s: collected by shard %s since %s, so its checkpoint here was stale: "
                "starting again from [collect] first_run_lookback", host,
                rec.get("shard", "?") if isinstance(rec, dict) else "?",
                time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(since)) if isinstance(since, (int, float))
                else "an unknown time")
    return True


def _replay(cp: Checkpoint) -> Checkpoint:
    """Apply the journal's confirmed positions (appended since the snapshot) to ``cp``."""
    journal = cp.journal
    try:
        raw = state.read_at(cp._dir(), state.JOURNAL, path=journal)
    except OSError as e:
        raise _failed(journal, "cannot read checkpoint", e) from None
    if not raw:
        return cp
    cp._stored = None  # the journal says more: the file is written at the end of the run
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


def _snapshot(path: Path, dfd: int) -> Checkpoint:
    """The checkpoint file, or the copy of the end of the last run if it is damaged."""
    try:
        cp = _parse(path, dfd)
        return cp if cp is not None else Checkpoint(path)
    except OSError as e:
        raise _failed(path, "cannot read checkpoint", e) from None
    except ValueError as e:
        damage = str(e)
    try:
        copy = _parse(path.with_name(state.COPY), dfd)
    except (OSError, ValueError):
        copy = None
    if copy is None:
        raise state.StateError(f"{damage}; no usable {state.COPY} either: move it aside to start "
                               "from [collect] first_run_lookback") from None
    try:
        state.replace_at(dfd, path.name, state.DAMAGED, path=path.with_name(state.DAMAGED))
    except OSError as e:
        if isinstance(e, state.Refused):
            raise
        raise state.StateError(f"{damage}; cannot move it aside: {e.strerror}") from None
    log.warning("%s; resuming from %s (the end of the last run), kept the damaged file as %s",
                damage, state.COPY, state.DAMAGED)
    return Checkpoint(path, copy.pairs, copy.scheme, copy.recent, copy.swept, copy.routed)


def peek(state_dir: str, host: str) -> dict[str, int]:
    """The confirmed positions, read only (for status): no fallback, no renaming."""
    path = state.host_file(state_dir, host, state.CHECKPOINT)
    try:
        dfd = state.host_dir_fd(state_dir, host)
    except OSError:
        return {}
    try:
        cp = _parse(path, dfd) or Checkpoint(path)
        cp._dirfd = dfd
        return _replay(cp).pairs
    except (OSError, ValueError, state.StateError):
        return {}
    finally:
        os.close(dfd)


def newest(pairs: dict[str, int]) -> int | None:
    """The newest confirmed point over all series: what a host's lag is measured from."""
    return max(pairs.values(), default=None)
