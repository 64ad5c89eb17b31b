"""Where psprobe keeps its state, and the one way it opens, writes and reads it.

Everything lives under ``state_dir`` (``/var/lib/psprobe``)::

    hosts/<host>/target.json      written by sync: read URL and the meshes naming it
    hosts/<host>/checkpoint.json  written by collect: newest confirmed ts per pair
    hosts/<host>/checkpoint.journal  confirmed positions appended during a run
    hosts/<host>/checkpoint.prev.json  collect's copy of the end of its last run
    hosts/<host>/history.json     written by collect: rolling record of runs
    hosts/<host>/lock             flock(2) held for a run; holds "<kind> <pid>"
    meshes/<digest>.json          last good host list of each mesh URL
    sync.json                     sync's own record (last run, host set, changes)

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
``[metrics] textfile_dir``): the directory is taken as it is, the file in it
is never written through a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

# The files of a host directory (see the layout above), and those written in place.
HOST_FILES = ("lock", "checkpoint.json", "checkpoint.journal", "checkpoint.prev.json",
              "history.json", "target.json")
IN_PLACE = ("lock", "checkpoint.journal")

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
    return Path(state_dir) / "hosts" / host


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
    if create:
        os.makedirs(path, exist_ok=True)
    fd = os.open(path, _DIR)
    try:
        for part in parts:
            path = path / part
            if create:
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass  # mkdir never follows a link: a dangling one stays dangling
                except OSError as e:
                    raise _named(e, path) from None
            try:
                sub = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    _refuse_link(fd, part, path)
                raise _named(e, path) from None
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def host_dir_fd(state_dir: str | Path, host: str, *, create: bool = False) -> int:
    """An fd of the host's directory, opened without following any link below state_dir."""
    host_dir(state_dir, host)
    return open_dir(state_dir, "hosts", host, create=create)


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


def open_file(dir_fd: int, name: str, flags: int, mode: int = 0o640, *,
              path: str | Path) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)``, never through a link; ``path`` is for messages.

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


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644, *,
                 root: str | Path | None = None, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never a torn one.

    Temp file in the same directory (``O_CREAT | O_EXCL | O_NOFOLLOW``, named
    ``.<name>.<random>.tmp``), fsync, rename, fsync of the directory (both
    skipped unless ``durable``): a crash or a full disk leaves the previous
    version in place.  With ``root`` the directories below it are made when
    missing and never followed through a link (see :func:`dir_fd`); a link
    at ``path`` itself is refused.
    """
    path = Path(path)
    try:
        dfd = dir_fd(path, root, create=root is not None)
    except Refused:
        raise
    except OSError as e:
        raise _named(e, e.filename or path.parent) from None
    try:
        _refuse_link(dfd, path.name, path)
        while True:
            tmp = _temp_name(path.name)
            try:
                fd = open_file(dfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600,
                               path=path.with_name(tmp))
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
            replace_at(dfd, tmp, path.name, path=path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        if durable:
            os.fsync(dfd)
    except OSError as e:
        if isinstance(e, Refused) or e.filename:
            raise
        raise _named(e, path) from None
    finally:
        os.close(dfd)


def write_json_atomic(path: str | Path, obj: Any, mode: int = 0o644, *,
                      root: str | Path | None = None) -> None:
    """JSON by :func:`write_atomic`; pass ``root`` (the state directory) for a file below it."""
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    write_atomic(path, data, mode, root=root)


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
    if raw is None:
        return default
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


# --- locks: one flock(2) helper for every run lock

HOLDERS = ("collect", "backfill")  # what a host's lock file may say holds it


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
                fd = open_file(d, self.path.name, os.O_RDWR | os.O_CREAT, 0o640,
                                     path=self.path)
            finally:
                os.close(d)
        except OSError as e:
            raise (e if isinstance(e, Refused) else
                   StateError(f"{self.path}: cannot open lock: {e.strerror}")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Busy(str(self.path), holder) from None
            raise StateError(f"{self.path}: cannot lock: {e.strerror}") from None
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
    return Lock(host_dir(state_dir, host) / "lock", kind, root=state_dir)
