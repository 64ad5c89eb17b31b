"""The machine-wide bound on concurrent collects: one flock'd slot file per run.

Why: 2 000 host timers can fall due together (a boot, a sync that enabled
them all, a clock jump).  Each collect holds an exclusive flock(2) on one of
``[collect] runtime_dir/slot.0 .. slot.N-1`` (N = ``[collect] max_concurrent``)
for its whole run, so at most N archives are read at once; the others wait,
blocked in flock, before they import anything heavy (``bin/psprobe`` calls
:func:`early` first: a waiting process is ~3 MB instead of ~25 MB).  The kernel
drops a lock when its process dies, so a killed run can never leak a slot.
Slot files are opened and locked by psprobe.state's :func:`~psprobe.state.open_file`
(never through a link) and :func:`~psprobe.state.flock`; ``runtime_dir``
itself is the operator's choice.

Before any slot or state file is touched, a collect or backfill started as root
becomes the owner of ``[collect] state_dir`` (:func:`drop_to_owner`): an
operator testing a host by hand must not leave root-owned files that every
later timer run (user psprobe) fails on.

This module must stay cheap to import: os, signal, configparser and psprobe.state
(no dataclasses, no random: they would add ~2 MB to every waiting process).
"""

from __future__ import annotations

import configparser
import os
import signal
import sys
import time

from psprobe import state

# Same as psprobe.config.DEFAULT_PATH (a test checks): importing config costs ~2 MB.
DEFAULT_CONFIG = "/etc/psprobe/psprobe.conf"
DEFAULT_RUNTIME_DIR = "/run/psprobe"
DEFAULT_STATE_DIR = "/var/lib/psprobe"
DEFAULT_MAX = 16
TICK = 1.0  # a waiter rescans every slot about this often (seconds, randomised)


class Slot:
    """A held slot: the lock lasts as long as ``fd`` is open (or the process lives)."""

    __slots__ = ("fd", "index", "path", "waited")

    def __init__(self, index: int, path: str, fd: int, waited: float) -> None:
        self.index, self.path, self.fd = index, path, fd
        self.waited = waited  # seconds spent waiting for it

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _rand(n: int) -> int:
    """A random index below n, spread over waiters (os.urandom: no random module)."""
    return int.from_bytes(os.urandom(4), "little") % n


_held: Slot | None = None


class _Tick(Exception):
    """Raised by SIGALRM to break a blocking flock and rescan the other slots."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Tick


def _open(path: str) -> int:
    """The slot file, never through a link."""
    return state.open_file(None, path, os.O_RDWR | os.O_CREAT, 0o660, path=path)


def _try(path: str) -> int | None:
    """The fd of ``path`` locked, or None when another process holds it."""
    fd = _open(path)
    try:
        if state.flock(fd):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def acquire(runtime_dir: str, n: int, *, tick: float = TICK) -> Slot | None:
    """Block until one of ``n`` slots is ours; None when ``n`` is 0 (no bound).

    Scans every slot without blocking (from a random one, so waiters spread);
    when all are taken, blocks in flock on a random slot and rescans every
    ``tick`` seconds or so (SIGALRM breaks the flock), so a slot freed
    anywhere is taken within about a tick.  Raises OSError when the directory
    or a slot file cannot be used.
    """
    if n <= 0:
        return None
    os.makedirs(runtime_dir, mode=0o750, exist_ok=True)
    paths = [os.path.join(runtime_dir, f"slot.{k}") for k in range(n)]
    t0 = time.monotonic()
    while True:
        first = _rand(n)
        for k in (*range(first, n), *range(first)):
            fd = _try(paths[k])
            if fd is not None:
                return Slot(k, paths[k], fd, time.monotonic() - t0)
        k = _rand(n)
        fd = _open(paths[k])
        try:
            old = signal.signal(signal.SIGALRM, _on_alarm)
        except ValueError:  # not the main thread: no alarm to break a flock, so poll
            os.close(fd)
            time.sleep(tick * (0.5 + _rand(1000) / 1000))
            continue
        try:
            signal.setitimer(signal.ITIMER_REAL, tick * (0.5 + _rand(1000) / 1000))
            state.flock(fd, wait=True)
            signal.setitimer(signal.ITIMER_REAL, 0)
        except _Tick:
            # The alarm may have come just after flock returned: closing the fd
            # drops the lock in that case too, so nothing is held twice.
            os.close(fd)
            continue
        except BaseException:
            signal.setitimer(signal.ITIMER_REAL, 0)
            os.close(fd)
            raise
        finally:
            signal.signal(signal.SIGALRM, old)
        return Slot(k, paths[k], fd, time.monotonic() - t0)


def hold(runtime_dir: str, n: int) -> Slot | None:
    """Take a slot for the rest of this process (once; later calls return the same).

    A slot directory that cannot be used costs the bound, never the run: one
    warning on stderr, and the collect goes ahead unbounded.
    """
    global _held
    if _held is not None or n <= 0:
        return _held
    try:
        _held = acquire(runtime_dir, n)
    except OSError as e:
        why = f"{e.filename}: {e.strerror}" if e.filename not in (None, runtime_dir) else e.strerror
        _say(4, f"collect: cannot use run slots in {runtime_dir} ({why}); "
                f"running without the [collect] max_concurrent bound")
        return None
    if _held is not None and _held.waited >= 1.0:
        _say(6, f"collect: waited {_held.waited:.1f}s for a run slot "
                f"([collect] max_concurrent = {n})")
    return _held


def settings(path: str | None = None) -> tuple[str, int] | None:
    """``(runtime_dir, max_concurrent)`` from the configuration files, read cheaply.

    None when the files cannot be read or a value is bad: then the full
    configuration load reports the error (exit 78) before anything runs.
    ``[host NAME]`` sections do not count: the bound is the machine's.
    """
    found = _read(path)
    return None if found is None else (found[0], found[1])


def _read(path: str | None) -> tuple[str, int, str, bool] | None:
    """``(runtime_dir, max_concurrent, state_dir, a [host] section sets state_dir)``."""
    path = path or os.environ.get("PSPROBE_CONFIG") or DEFAULT_CONFIG
    confd = os.path.join(os.path.dirname(path), "conf.d")
    try:
        extra = sorted(os.path.join(confd, f) for f in os.listdir(confd) if f.endswith(".conf"))
    except OSError:
        extra = []
    runtime_dir, n, state_dir, host_state = DEFAULT_RUNTIME_DIR, DEFAULT_MAX, DEFAULT_STATE_DIR, False
    for fname in [path, *extra]:
        cp = configparser.ConfigParser(interpolation=None, default_section="\0none")
        try:
            with open(fname, encoding="utf-8") as f:
                cp.read_file(f, source=fname)
        except (OSError, UnicodeDecodeError, configparser.Error):
            return None
        if cp.has_section("collect"):
            sec = cp["collect"]
            try:
                if "max_concurrent" in sec:
                    n = int(sec["max_concurrent"].strip())
                if "runtime_dir" in sec:
                    runtime_dir = sec["runtime_dir"].strip()
                if "state_dir" in sec:
                    state_dir = sec["state_dir"].strip()
            except ValueError:
                return None
        host_state = host_state or any(  # state_dir or collect.state_dir in a [host NAME]
            k.rpartition(".")[2] == "state_dir"
            for name in cp.sections() if name.startswith("host ") for k in cp[name])
    if not 0 <= n <= 10_000 or not runtime_dir.startswith("/") or not state_dir.startswith("/"):
        return None
    return runtime_dir, n, state_dir, host_state


def unit_command(argv: list[str]) -> tuple[str | None, bool, str] | None:
    """``(config, verbose, HOST)`` of ``[--config P] [-v] collect HOST``, the command line
    psprobe@.service runs; None for anything else (another command, --dry-run, --help,
    an option this does not know)."""
    config, verbose = None, False
    args = list(argv)
    while args and args[0].startswith("-"):
        a = args.pop(0)
        if a in ("-v", "--verbose"):
            verbose = True
        elif a == "--config" and args:
            config = args.pop(0)
        elif a.startswith("--config="):
            config = a[len("--config="):]
        else:
            return None
    if len(args) != 2 or args[0] != "collect" or args[1].startswith("-"):
        return None
    return config, verbose, args[1]


def early(argv: list[str]) -> Slot | None:
    """From ``bin/psprobe``: for the unit's command line (:func:`unit_command`), hold a
    slot now.  Anything else returns None untouched: the CLI takes the slot after its
    imports.
    """
    unit = unit_command(argv)
    if unit is None:
        return None
    config = unit[0]
    found = _read(config)
    if found is None:
        return None
    runtime_dir, n, state_dir, host_state = found
    if os.geteuid() == 0:
        if host_state:  # the host's own state_dir decides: the CLI drops, then takes the slot
            return None
        drop_to_owner(state_dir)
    return hold(runtime_dir, n)


def drop_to_owner(state_dir: str) -> str | None:
    """Started as root: become the owner of ``state_dir``; returns its user name, or None.

    Its uid, the directory's group, and the owner's supplementary groups (the
    broker secret is root:psprobe 0640), with one line saying so.  Nothing
    happens for another user, for a directory root owns (a development box)
    or one not there yet.  Once dropped, for good (real, effective and saved
    ids).  A drop that fails ends the process (exit 74): going on as root
    would leave the very files the owner's runs then cannot use.
    """
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(state_dir)
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    import pwd

    try:
        name = pwd.getpwuid(st.st_uid).pw_name
        groups = os.getgrouplist(name, st.st_gid)
    except KeyError:  # an owner without a passwd entry: its uid and the directory's group
        name, groups = str(st.st_uid), [st.st_gid]
    try:
        os.setgroups(groups)
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    except OSError as e:
        from psprobe.exits import Exit

        _say(3, f"cannot run as {name}, the owner of {state_dir}: {e.strerror}; "
                "run as that user, or give it the state directory")
        sys.exit(Exit.STATE)
    _say(6, f"running as {name}, the owner of {state_dir}")
    return name


def _say(priority: int, line: str) -> None:
    """One log line like psprobe.log's (``<N>`` prefix for journald), before logging is set up.

    Imports psprobe.log (and logging) only now: a process waiting for its slot
    has printed nothing, so it stays small.
    """
    from psprobe.log import to_journal

    if to_journal(sys.stderr):
        line = f"<{priority}>{line}"
    elif priority <= 3:
        line = f"error: {line}"
    elif priority <= 4:
        line = f"warning: {line}"
    print(line, file=sys.stderr, flush=True)
