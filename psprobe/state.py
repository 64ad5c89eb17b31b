"""Where psprobe keeps its state, and the one way it opens, writes, reads and locks it.

Everything lives under ``state_dir`` (``/var/lib/psprobe``), and every name
below it is spelled here, nowhere else (the constants and path functions
below)::

    hosts/<host>/target.json      written by sync: read URL and the meshes naming it
    hosts/<host>/checkpoint.json  written by collect: newest confirmed ts per pair
    hosts/<host>/checkpoint.journal  confirmed positions appended during a run
    hosts/<host>/checkpoint.prev.json  collect's copy of the end of its last run
    hosts/<host>/checkpoint.json.damaged  a damaged checkpoint, moved aside for the operator
    hosts/<host>/history.json     written by collect: rolling record of runs
    hosts/<host>/lock             flock(2) held for a run; holds "<kind> <pid>"
    hosts/<host>/moved.json       written by sync when another shard took the host: the
                                  checkpoint here is stale; its next collect starts afresh
    hosts/<host>/.<file>.*tmp     a write in progress (:func:`write_at`); collect sweeps its own
    meshes/<digest>.json          last good host list of each mesh URL (:func:`mesh_cache`)
    hosts/<host>/received.json    written by receive: a pushing host's tallies
    spool/                        written by receive: pushed runs' messages until the broker
                                  confirms them (psprobe.spool: NNNN.seg, position.json, lock)
    sync.json                     sync's own record (last run, host set, changes)
    sync.lock                     flock(2) held by a sync

``<host>`` is always a name that passed :func:`psprobe.hostnames.normalise`, so it
can never climb out of ``hosts/``; :func:`host_dir` checks that again.

Links.  psprobe often runs as root, and whoever can write below ``state_dir``
must not be able to turn a run against the host: a symbolic link planted at a
state file would otherwise have it truncated, appended to or created.  So
nothing below ``state_dir`` is ever opened, created, truncated or replaced
through a link: every directory on the way (``hosts``, ``hosts/<host>``,
``meshes``) is opened with ``O_DIRECTORY | O_NOFOLLOW``, one component at a
time relative to the one above (a link swapped in between two checks is not
followed either), files are opened relative to that directory's fd with
``O_NOFOLLOW``, must be regular files, and are written in place only when
they have no second hard link.  A link found there is refused with
:class:`LinkError`, one line naming the path (collect and sync exit 4).
``state_dir`` itself may be a link (the operator's choice, e.g.
``/var/lib/psprobe -> /data/psprobe``): only what is below it is checked.
The same holds for an operator's directory given without ``root`` (e.g.
``[metrics] textfile_dir``, ``[collect] runtime_dir``'s slot files): the
directory is taken as it is, the file in it is never written through a link.

Cheap to import: psprobe.slots uses :func:`open_file` and :func:`flock` in a
process that waits for its run slot before any heavy import, so json and
hashlib are imported where used and typing not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see above)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

# --- the layout (see above): the one place these names are spelled
HOSTS = "hosts"
MESHES = "meshes"
TARGET = "target.json"
CHECKPOINT = "checkpoint.json"
JOURNAL = "checkpoint.journal"
COPY = "checkpoint.prev.json"
DAMAGED = "checkpoint.json.damaged"
HISTORY = "history.json"
LOCK = "lock"
SYNC = "sync.json"
SYNC_LOCK = "sync.lock"
MOVED = "moved.json"
RECEIVED = "received.json"  # a pushing host's tallies (psprobe receive)
SPOOL = "spool"  # runs received, fsynced, waiting for the broker (psprobe.spool)

# The files of a host directory, and those written in place (not by rename).
HOST_FILES = (LOCK, CHECKPOINT, JOURNAL, COPY, HISTORY, TARGET, MOVED, RECEIVED)
IN_PLACE = (LOCK, JOURNAL)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class StateError(Exception):
    """The state directory cannot be used; one line naming the path."""


class Refused(StateError, OSError):
    """A state path psprobe will not use as it is found; ``str()`` is one line naming it.

    Also an OSError (``filename`` the path, ``strerror`` why), so code that
    treats an unusable file as a warning (metrics, a status read) handles it
    as well.
    """

    def __init__(self, path: str | Path, why: str, code: int = errno.EPERM) -> None:
        OSError.__init__(self, code, why, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class LinkError(Refused):
    """A symbolic link where a state file or directory belongs: never followed."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "refusing to follow a symbolic link", errno.ELOOP)


def host_dir(state_dir: str | Path, host: str) -> Path:
    """Directory of one host; refuses anything that is not a single path component."""
    if not host or host in (".", "..") or "/" in host or "\0" in host:
        raise ValueError(f"unsafe host name for a state path: {host!r}")
    return Path(state_dir) / HOSTS / host


def host_file(state_dir: str | Path, host: str, name: str) -> Path:
    """``hosts/<host>/<name>``; ``name`` is one of :data:`HOST_FILES`."""
    return host_dir(state_dir, host) / name


def sync_file(state_dir: str | Path) -> Path:
    """Sync's own record."""
    return Path(state_dir) / SYNC


def spool_dir(state_dir: str | Path) -> Path:
    """Where ``psprobe receive`` keeps accepted runs until the broker confirms them."""
    return Path(state_dir) / SPOOL


def mesh_cache(state_dir: str | Path, url: str) -> Path:
    """The last good host list of the mesh at ``url``: named by a digest of the URL."""
    import hashlib

    return Path(state_dir) / MESHES / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".json")


def _named(e: OSError, path: str | Path) -> OSError:
    """``e`` with the full path as its filename (an ``*at`` call names only the last part)."""
    return OSError(e.errno, e.strerror, str(path))


def _refuse_link(dir_fd: int, name: str, path: str | Path) -> None:
    """LinkError when ``name`` in ``dir_fd`` is a symbolic link (a missing name is fine)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise LinkError(path)


def open_dir(root: str | Path, *parts: str, create: bool = False) -> int:
    """An fd of ``root/parts...``; no link below ``root`` is followed (``root`` may be one).

    ``create``: missing directories are made (``root`` with its parents, the
    rest one ``mkdirat`` at a time).  Raises LinkError for a link on the way,
    OSError (with the full path) for anything else.
    """
    path = Path(root)
    try:
        fd = os.open(path, _DIR)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, _DIR)
    try:
        for part in parts:
            path = path / part
            sub = _open_sub(fd, part, path, create)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_sub(fd: int, part: str, path: str | Path, create: bool) -> int:
    """An fd of directory ``part`` in ``fd`` (made when missing with ``create``); never a link."""
    # Opened first, made only when missing: sync opens 2 000 existing host
    # directories per run, and a mkdir that fails costs as much as one that works.
    for attempt in (1, 2):
        try:
            return os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError as e:
            if not create or attempt == 2:
                raise _named(e, path) from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                _refuse_link(fd, part, path)
            raise _named(e, path) from None
        try:
            os.mkdir(part, dir_fd=fd)
        except FileExistsError:
            pass  # made meanwhile; or a dangling link (mkdir never follows one): refused above
        except OSError as e:
            raise _named(e, path) from None
    raise AssertionError("unreachable")


def host_dir_fd(state_dir: str | Path, host: str, *, create: bool = False,
                hosts_fd: int | None = None) -> int:
    """An fd of the host's directory, opened without following any link below state_dir.

    ``hosts_fd``: an fd of ``hosts/`` (:func:`hosts_dir_fd`), for a caller going through
    every host (sync): one open per host instead of three.
    """
    path = host_dir(state_dir, host)
    if hosts_fd is None:
        return open_dir(state_dir, HOSTS, host, create=create)
    return _open_sub(hosts_fd, host, path, create)


def hosts_dir_fd(state_dir: str | Path) -> int:
    """An fd of ``hosts/`` (made when missing), for :func:`host_dir_fd` and
    :func:`new_host_dir_fd` over many hosts."""
    return open_dir(state_dir, HOSTS, create=True)


def new_host_dir_fd(state_dir: str | Path, host: str, *, hosts_fd: int | None = None) -> int | None:
    """An fd of the host's directory made by this call; None when it exists already.

    Sync's fast path for a new host (one mkdir, no failed open before it); a
    link in its place counts as existing, and :func:`host_dir_fd` then refuses it.
    """
    host_dir(state_dir, host)
    hfd = open_dir(state_dir, HOSTS, create=True) if hosts_fd is None else hosts_fd
    try:
        try:
            os.mkdir(host, 0o770, dir_fd=hfd)
        except FileExistsError:
            return None
        return os.open(host, _DIR | os.O_NOFOLLOW, dir_fd=hfd)
    finally:
        if hosts_fd is None:
            os.close(hfd)


def create_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644, *, path: str | Path) -> None:
    """Write a file that must not exist yet (``O_EXCL``, no link followed), not fsynced.

    For a file in a directory just made: nothing to replace, so no temp and no
    rename; a crash leaves it short, which its reader takes for damaged.
    """
    fd = open_file(dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, path=path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def each(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, except that one failing item does not stop the others.

    For sync's files of many hosts (links, drop-ins, ``target.json``): every item is
    tried, then the first error, in ``items``' order, is raised.  One thread: on a
    journalled file system (a server's) four made 2 000 hosts' unit files in 0.28 s
    and 0.42 s of CPU, against 0.19 s and 0.19 s alone (bench/unit_files.py): the
    files share a directory, whose lock the threads spin on.
    """
    results: list[Any] = []
    first: BaseException | None = None
    for x in items:
        try:
            results.append(fn(x))
        except Exception as e:  # raised below, once every item was tried
            results.append(None)
            first = first or e
    if first is not None:
        raise first
    return results


def make_host_dir(state_dir: str | Path, host: str) -> Path:
    """The host's directory, made if missing (the safe ``mkdir(parents=True, exist_ok=True)``)."""
    os.close(host_dir_fd(state_dir, host, create=True))
    return host_dir(state_dir, host)


def dir_fd(path: str | Path, root: str | Path | None = None, *, create: bool = False) -> int:
    """An fd of the directory of ``path``.

    With ``root`` (the state directory ``path`` is under), every directory
    between the two is opened without following links.  Without it the
    directory is the caller's choice (the state directory itself, an
    operator's metrics directory) and is taken as it is.
    """
    parent = Path(path).parent
    if root is None:
        if create:
            os.makedirs(parent, exist_ok=True)
        return os.open(parent, _DIR)
    return open_dir(root, *parent.relative_to(root).parts, create=create)


def open_file(dir_fd: int | None, name: str, flags: int, mode: int = 0o640, *,
              path: str | Path) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)``, never through a link; ``path`` is for messages.

    ``dir_fd`` None: ``name`` is opened as given (in an operator's directory).
    The file must be a regular one (a FIFO cannot block the open: O_NONBLOCK),
    and one opened for writing must have a single hard link (a second name
    could be someone else's file).  Raises LinkError, Refused, or OSError
    with ``path`` as its filename.
    """
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkError(path) from None
        raise _named(e, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(path, "not a regular file")
        if flags & (os.O_WRONLY | os.O_RDWR) and st.st_nlink != 1:
            raise Refused(path, f"has {st.st_nlink} hard links; refusing to write it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_at(dir_fd: int, name: str, *, path: str | Path) -> bytes | None:
    """The bytes of ``name`` in ``dir_fd`` (None when missing), never through a link."""
    try:
        fd = open_file(dir_fd, name, os.O_RDONLY, path=path)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    except OSError as e:
        raise _named(e, path) from None
    finally:
        os.close(fd)


def replace_at(dir_fd: int, src: str, dst: str, *, path: str | Path) -> None:
    """``rename(src, dst)`` in ``dir_fd``; refuses a link at ``dst`` (``path``).

    rename(2) would replace a link itself, not follow it, but a link there was
    planted: say so rather than quietly remove it.
    """
    _refuse_link(dir_fd, dst, path)
    try:
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        raise _named(e, path) from None


def check_host_files(dir_fd: int, directory: str | Path) -> None:
    """Refuse (Refused, LinkError) a host directory where a state file is not one.

    A link, something else than a regular file, or a second hard link to a
    file written in place (:data:`IN_PLACE`): found before a run touches
    anything, it stops the run at its start with one line rather than midway.
    """
    for name in HOST_FILES:
        path = Path(directory) / name
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise LinkError(path)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(path, "not a regular file")
        if name in IN_PLACE and st.st_nlink != 1:
            raise Refused(path, f"has {st.st_nlink} hard links; refusing to write it")


def _temp_name(name: str) -> str:
    """A fresh temp name beside ``name`` (created with O_EXCL: a taken one is skipped)."""
    return f".{name}.{os.urandom(4).hex()}.tmp"


def is_temp(name: str, of: str) -> bool:
    """``name`` is a temp file :func:`write_at` makes for ``of`` (a killed run leaves them)."""
    return name.startswith(f".{of}.") and name.endswith(".tmp")


def write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644, *, path: str | Path,
             durable: bool = True, fixed_temp: bool = False) -> None:
    """Replace ``name`` in ``dir_fd`` so that a reader sees the old or the new file, never a torn one.

    A temp file beside it (``O_CREAT | O_EXCL | O_NOFOLLOW``, named
    ``.<name>.<random>.tmp``), fsync, rename, fsync of the directory (both
    skipped unless ``durable``): a crash or a full disk leaves the previous
    version in place.  ``fixed_temp``: the temp is ``.<name>.tmp``, removed
    first (a killed run's leftover, or a planted link: removed, never
    followed), so a writer that holds a lock for the file (the checkpoint,
    under the host's) leaves at most one temp however often it is killed.
    A link at ``name`` is refused; ``path`` is for messages.
    """
    _refuse_link(dir_fd, name, path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    path = Path(path)
    if fixed_temp:
        tmp = f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = open_file(dir_fd, tmp, flags, 0o600, path=path.with_name(tmp))
    else:
        while True:
            tmp = _temp_name(name)
            try:
                fd = open_file(dir_fd, tmp, flags, 0o600, path=path.with_name(tmp))
                break
            except FileExistsError:
                continue
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        replace_at(dir_fd, tmp, name, path=path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644, *,
                 root: str | Path | None = None, durable: bool = True) -> None:
    """:func:`write_at` of ``path``; OSErrors name the path.

    With ``root`` the directories below it are made when missing and never
    followed through a link (see :func:`dir_fd`).
    """
    path = Path(path)
    try:
        dfd = dir_fd(path, root, create=root is not None)
    except Refused:
        raise
    except OSError as e:
        raise _named(e, e.filename or path.parent) from None
    try:
        write_at(dfd, path.name, data, mode, path=path, durable=durable)
    except OSError as e:
        if isinstance(e, Refused) or e.filename:
            raise
        raise _named(e, path) from None
    finally:
        os.close(dfd)


def write_json_atomic(path: str | Path, obj: Any, mode: int = 0o644, *,
                      root: str | Path | None = None) -> None:
    """JSON by :func:`write_atomic`; pass ``root`` (the state directory) for a file below it."""
    write_atomic(path, dumps(obj), mode, root=root)


def dumps(obj: Any) -> bytes:
    """The compact, sorted JSON of a state file."""
    import json

    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def read_json(path: str | Path, default: Any = None, *, root: str | Path | None = None) -> Any:
    """Read a JSON state file; a missing file (or directory) gives ``default``.

    Never through a link (LinkError); pass ``root`` (the state directory) for
    a file below it, see :func:`dir_fd`.  A corrupt file raises ``ValueError``
    naming the path: the caller decides whether that is fatal (checkpoint) or
    only worth a warning (history).
    """
    path = Path(path)
    try:
        dfd = dir_fd(path, root)
    except FileNotFoundError:
        return default
    try:
        return read_json_at(dfd, path.name, default, path=path)
    finally:
        os.close(dfd)


def read_json_at(dir_fd: int, name: str, default: Any = None, *, path: str | Path) -> Any:
    """:func:`read_json` of ``name`` in an open directory (``path`` is for messages)."""
    raw = read_at(dir_fd, name, path=path)
    return default if raw is None else loads(raw, path=path)


def loads(raw: bytes, *, path: str | Path) -> Any:
    """The JSON of a state file's bytes; ``ValueError`` naming ``path`` if it is corrupt."""
    import json

    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: corrupt state file ({e})") from None


def listdir(root: str | Path, *parts: str) -> list[str]:
    """Names in ``root/parts...`` (no link below ``root`` followed); [] when missing."""
    try:
        fd = open_dir(root, *parts)
    except FileNotFoundError:
        return []
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


# --- locks: one flock(2) helper for every lock (host runs, sync, status's probe, run slots)

HOLDERS = ("collect", "backfill")  # what a host's lock file may say holds it


def flock(fd: int, *, shared: bool = False, wait: bool = False) -> bool:
    """flock(2) ``fd``: True once held, False when another process holds it (``wait`` False).

    Held while ``fd`` is open; the kernel drops it when the process dies, so a
    killed run never leaks one.  ``wait`` blocks until it is free; a signal
    handler that raises ends the wait (psprobe.slots' rescan).  Any other
    failure raises OSError.
    """
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if not wait and e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class Busy(Exception):
    """Another process holds the lock; ``holder`` is its kind (from the file) when known."""

    def __init__(self, path: str, holder: str | None = None) -> None:
        super().__init__(path)
        self.holder = holder


def _holder(fd: int) -> str | None:
    """The kind written in a held lock file (``<kind> <pid>``), if it is one of HOLDERS."""
    try:
        word = os.pread(fd, 64, 0).split(b"\n", 1)[0].split(b" ", 1)[0].decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    return word if word in HOLDERS else None


class Lock:
    """An exclusive, non-blocking flock(2) on a file; released when the process dies.

    With a ``kind``, the holder writes ``<kind> <pid>`` into the file, so that
    one finding it held can say who holds it (:attr:`Busy.holder`).  The file
    is never opened through a link; with ``root`` (the state directory) no
    directory below it is followed either, and missing ones are made.
    """

    def __init__(self, path: Path, kind: str | None = None, *, root: str | None = None) -> None:
        self.path, self.kind, self.root = Path(path), kind, root
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        try:
            d = dir_fd(self.path, self.root, create=True)
            try:
                fd = open_file(d, self.path.name, os.O_RDWR | os.O_CREAT, 0o640, path=self.path)
            finally:
                os.close(d)
        except OSError as e:
            raise (e if isinstance(e, Refused) else
                   StateError(f"{self.path}: cannot open lock: {e.strerror}")) from None
        try:
            held = flock(fd)
        except OSError as e:
            os.close(fd)
            raise StateError(f"{self.path}: cannot lock: {e.strerror}") from None
        if not held:
            holder = _holder(fd)
            os.close(fd)
            raise Busy(str(self.path), holder)
        if self.kind:
            rec = f"{self.kind} {os.getpid()}\n".encode()
            with contextlib.suppress(OSError):  # who holds it is for messages only
                os.pwrite(fd, rec, 0)
                os.ftruncate(fd, len(rec))
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def host_lock(state_dir: str, host: str, kind: str = "collect") -> Lock:
    """The host's run lock, taken by a ``kind`` of run (one of HOLDERS)."""
    return Lock(host_file(state_dir, host, LOCK), kind, root=state_dir)


def host_busy(state_dir: str, host: str) -> bool:
    """A collect or backfill holds the host's lock (for status).

    A shared try-lock: it never waits and never makes a run wait.  A lock
    file that is missing or cannot be opened means no run holds it.
    """
    path = host_file(state_dir, host, LOCK)
    try:
        d = host_dir_fd(state_dir, host)
        try:
            fd = open_file(d, LOCK, os.O_RDONLY, path=path)
        finally:
            os.close(d)
    except OSError:
        return False
    try:
        return not flock(fd, shared=True)
    except OSError:
        return False
    finally:
        os.close(fd)


def sync_lock(state_dir: str | Path) -> Lock:
    """The lock a sync holds, so that two syncs never write units at once."""
    return Lock(Path(state_dir) / SYNC_LOCK)
