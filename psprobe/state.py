"""Where psprobe keeps its state, and the one way it writes it.

Everything lives under ``state_dir`` (``/var/lib/psprobe``)::

    hosts/<host>/target.json      written by sync: read URL and the meshes naming it
    hosts/<host>/checkpoint.json  written by collect: newest confirmed ts per pair
    hosts/<host>/checkpoint.journal  confirmed positions appended during a run
    hosts/<host>/history.json     written by collect: rolling record of runs
    hosts/<host>/lock             flock(2) held for a run
    meshes/<digest>.json          last good host list of each mesh URL
    sync.json                     sync's own record (last run, host set, changes)

``<host>`` is always a name that passed :func:`psprobe.hostnames.normalise`, so it
can never climb out of ``hosts/``; :func:`host_dir` checks that again.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def host_dir(state_dir: str | Path, host: str) -> Path:
    """Directory of one host; refuses anything that is not a single path component."""
    if not host or host in (".", "..") or "/" in host or "\0" in host:
        raise ValueError(f"unsafe host name for a state path: {host!r}")
    return Path(state_dir) / "hosts" / host


def write_json_atomic(path: str | Path, obj: Any, mode: int = 0o644) -> None:
    """Write JSON so that a reader sees the old or the new file, never a torn one.

    temp file in the same directory, fsync, rename, fsync of the directory: a
    crash or a full disk leaves the previous version in place.
    """
    path = Path(path)
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: str | Path, default: Any = None) -> Any:
    """Read a JSON state file; a missing file gives ``default``.

    A corrupt file raises ``ValueError`` naming the path: the caller decides
    whether that is fatal (checkpoint) or only worth a warning (history).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return default
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: corrupt state file ({e})") from None
