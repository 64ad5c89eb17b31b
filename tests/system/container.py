"""A real systemd, booted with systemd-nspawn, for the system tests.

``prepare.sh`` caches a debootstrapped Debian root once per machine; each test
session boots a copy-on-write copy of it (``cp -a --reflink=auto``) in the
background, shares the host's network (so RabbitMQ and the archive simulator
on 127.0.0.1 are reachable from inside) and runs commands in it with
``nsenter``.  machinectl is not used: the container is not registered.

Environment: ``PSPROBE_TEST_CACHE`` (cache dir, see prepare.sh),
``PSPROBE_TEST_TMP`` (where copies go, default /var/tmp),
``PSPROBE_KEEP_CONTAINER=1`` (leave the copy and its console log for a post-mortem).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[2]
PREPARE = Path(__file__).resolve().with_name("prepare.sh")
SKIP_CODE = 77  # prepare.sh: this machine cannot do it
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The container's Python: where a Debian package would put psprobe.
SITE = "usr/lib/python3/dist-packages"

# Shares the host's network; not registered with machined (none runs here);
# the console (boot messages) goes to a log file.
NSPAWN = ("systemd-nspawn", "-q", "-b", "--register=no", "--keep-unit", "--console=read-only")

T = TypeVar("T")


class Unavailable(Exception):
    """This machine cannot boot the test container; the message says why."""


def unavailable_reason() -> str | None:
    """Why no container can be booted here (None when it can be tried)."""
    if os.geteuid() != 0:
        return "not root: systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install -y systemd-container debootstrap)"
    return None


def prepare_root(timeout: float = 900) -> Path:
    """The cached base root, built by prepare.sh when missing (about 45 s)."""
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    cp = subprocess.run(["bash", str(PREPARE)], capture_output=True, text=True, timeout=timeout, check=False)
    if cp.returncode == SKIP_CODE:
        raise Unavailable(cp.stderr.strip().splitlines()[-1])
    if cp.returncode != 0:
        raise RuntimeError(f"prepare.sh failed ({cp.returncode}): {cp.stderr.strip()}")
    return Path(cp.stdout.strip().splitlines()[-1])


def wait_until(what: str, probe: Callable[[], T], timeout: float, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
    return kids


def _cgroup_dir(leader: int) -> Path:
    """Host directory of the container's root cgroup (its init runs in init.scope).

    Of the hierarchy the container's systemd manages: name=systemd (v1) when it runs
    in a hybrid layout, the unified one when it runs in cgroup v2 only (nspawn's
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1), where its place in v1 holds no init.scope.
    """
    with open(f"/proc/{leader}/cgroup") as f:
        lines = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
    for controller, mount in (("name=systemd", "systemd"), ("", "unified")):
        if controller in lines and lines[controller].endswith("/init.scope"):
            top = Path("/sys/fs/cgroup") / mount
            if controller == "" and not (top / "cgroup.procs").exists():
                top = Path("/sys/fs/cgroup")
            return top / lines[controller].lstrip("/").removesuffix("init.scope").rstrip("/")
    raise RuntimeError(f"no systemd cgroup for pid {leader}")


def _own_cgroups(name: str) -> list[Path]:
    """A fresh cgroup per container in each systemd hierarchy, where this host has them.

    Without one, nspawn (``--keep-unit`` on a host whose init is not systemd)
    puts every container in the same ``/payload`` cgroup, and two containers'
    systemds would manage one cgroup tree.  Best effort: empty when not possible.
    """
    made = []
    with open("/proc/self/cgroup") as f:
        lines = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
    for controller, mounts in (("name=systemd", ["systemd"]), ("", ["unified", ""])):
        if controller not in lines:
            continue
        for mount in mounts:
            top = Path("/sys/fs/cgroup") / mount
            if (top / "cgroup.procs").exists():
                d = top / lines[controller].lstrip("/") / name
                try:
                    d.mkdir()
                except OSError:
                    break
                made.append(d)
                break
    return made


def _join_cgroups(dirs: list[Path]) -> None:
    for d in dirs:
        with open(d / "cgroup.procs", "w") as f:
            f.write("0\n")


def _remove_cgroup(top: Path) -> None:
    """Remove an (empty) cgroup tree, children first."""
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def rss_kb(pid: int) -> int:
    """Resident memory of a process (kB; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _is_systemd(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith("/systemd")
    except OSError:
        return False


@dataclass(eq=False)
class Container:
    """One booted container: ``run`` executes inside it, ``root`` is its file system."""

    workdir: Path
    root: Path
    proc: subprocess.Popen
    leader: int = 0
    console: Path = field(default_factory=Path)
    boot_seconds: float = 0.0
    cgroups: list[Path] = field(default_factory=list)

    # --- running things inside

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = False,
        input: str | None = None,
        timeout: float = 120,
        user: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a list, or a string for ``sh -c``) in the container's namespaces.

        The environment is a clean one from the container, never the test's own.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        full = [
            "nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--",
            "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "TZ=UTC",
            "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb", *argv,
        ]  # fmt: skip
        cp = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and cp.returncode != 0:
            raise AssertionError(
                f"in container: {shlex.join(argv)} -> exit {cp.returncode}\n"
                f"stdout: {cp.stdout}\nstderr: {cp.stderr}"
            )
        return cp

    def systemctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], check=check)

    def journal(self, unit: str, *extra: str) -> str:
        """The unit's journal as plain text (``journalctl -u UNIT -o cat``)."""
        return self.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit, *extra]).stdout

    def slice_pids(self, slice_name: str = "psprobe.slice") -> dict[str, list[int]]:
        """Host PIDs of each unit running in ``slice_name`` (unit name -> pids).

        Read from the host's name=systemd (v1) or unified hierarchy: cheap enough to
        poll during a burst.  (Inside this container the v1 memory and pids
        controllers are read-only, so MemoryMax/TasksMax are measured, not enforced.)
        """
        base = _cgroup_dir(self.leader) / slice_name
        out: dict[str, list[int]] = {}
        with contextlib.suppress(FileNotFoundError):
            for unit in os.listdir(base):
                procs = base / unit / "cgroup.procs"
                try:
                    pids = [int(p) for p in procs.read_text().split()]
                except OSError as e:
                    # a unit that ended while we looked: gone (ENOENT), or its cgroup
                    # being removed under the read (ENODEV)
                    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV):
                        continue
                    raise
                if pids:
                    out[unit] = pids
        return out

    def path(self, inside: str) -> Path:
        """The host path of a path inside the container."""
        return self.root / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644, owner: str = "root") -> None:
        """Write a file inside the container, owner given as ``user[:group]``."""
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chmod(p, mode)
        self.run(["chown", owner, inside], check=True)

    # --- life cycle

    def wait_booted(self, timeout: float = 90) -> str:
        """Wait for the boot to finish; returns ``running`` or ``degraded``."""

        def state() -> str | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited {self.proc.returncode}: {self.console_tail()}")
            cp = self.run(["systemctl", "is-system-running", "--wait"], timeout=timeout)
            s = cp.stdout.strip()
            return s if s in ("running", "degraded") else None

        return wait_until("container boot", state, timeout, interval=0.2)

    def reboot(self, timeout: float = 90) -> str:
        """Power off cleanly, then boot the same root again: a fresh systemd reading the
        unit files and links left on disk, as after a reboot.  Returns the boot state."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.run(["systemctl", "poweroff", "--no-block"], timeout=15)
        self.proc.wait(timeout)
        _launch(self, timeout)
        return self.wait_booted(timeout)

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def shutdown(self, timeout: float = 60) -> int:
        """Power the container off cleanly (killing it after ``timeout``); nspawn's exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run(["systemctl", "poweroff", "--no-block"], timeout=15)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # nspawn asks the container's init to halt
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        _RUNNING.discard(self)
        for d in self.cgroups:
            _remove_cgroup(d)
        if not os.environ.get("PSPROBE_KEEP_CONTAINER"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode


_RUNNING: set[Container] = set()


@atexit.register
def _reap() -> None:
    # A crashed test session must not leave containers running.
    for c in list(_RUNNING):
        with contextlib.suppress(Exception):
            c.shutdown(timeout=20)


def _launch(c: Container, timeout: float) -> None:
    """Start nspawn on ``c.root`` and wait for its systemd to be PID 1 of the container."""
    with open(c.console, "ab") as out:
        c.proc = subprocess.Popen(
            [*NSPAWN, "-D", str(c.root)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _join_cgroups(c.cgroups),
        )
    proc = c.proc

    def leader() -> int:
        if proc.poll() is not None:
            raise RuntimeError(f"nspawn exited {proc.returncode}: {c.console_tail()}")
        return next((p for p in _children(proc.pid) if _is_systemd(p)), 0)

    c.leader = wait_until("container init", leader, timeout)


def boot(base: Path, timeout: float = 90) -> Container:
    """Boot a copy-on-write copy of ``base``; returns once systemd reports the boot done."""
    tmp = os.environ.get("PSPROBE_TEST_TMP", "/var/tmp")
    workdir = Path(tempfile.mkdtemp(prefix="psprobe-ct.", dir=tmp))
    root = workdir / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    cgroups = _own_cgroups(workdir.name)
    t0 = time.monotonic()
    c = Container(workdir=workdir, root=root, proc=None,  # type: ignore[arg-type]
                  console=workdir / "console.log", cgroups=cgroups)
    _RUNNING.add(c)
    try:
        _launch(c, timeout)
        c.wait_booted(timeout)
        c.boot_seconds = time.monotonic() - t0
    except BaseException:
        if c.proc is not None:
            c.shutdown(timeout=20)
        else:
            _RUNNING.discard(c)
        raise
    return c


@contextlib.contextmanager
def booted(base: Path, timeout: float = 90) -> Iterator[Container]:
    """``with booted(prepare_root()) as c:`` a container shut down on exit."""
    c = boot(base, timeout)
    try:
        yield c
    finally:
        c.shutdown()


# --- psprobe from this source tree, installed the way the package lays it out


def install_psprobe(c: Container, config: str, repo: Path = REPO) -> None:
    """Install psprobe, its units, user and config into ``c`` (as the RPM would)."""
    dest = c.path(f"/{SITE}/psprobe")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(repo / "psprobe", dest, ignore=shutil.ignore_patterns("__pycache__"))
    # Byte-compiled inside, by the container's Python, as the RPM's %py_byte_compile does:
    # the units set PYTHONDONTWRITEBYTECODE, so without it every run compiles psprobe anew
    # (about 20 ms of CPU per run, which would inflate the fleet's figures).
    c.run(["python3", "-m", "compileall", "-q", f"/{SITE}/psprobe"], check=True)
    shutil.copy2(repo / "bin" / "psprobe", c.path("/usr/bin/psprobe"))
    os.chmod(c.path("/usr/bin/psprobe"), 0o755)
    for unit in sorted((repo / "units").iterdir()):
        shutil.copy2(unit, c.path(f"/usr/lib/systemd/system/{unit.name}"))
    sysusers = repo / "packaging" / "psprobe.sysusers"
    if sysusers.exists():
        shutil.copy2(sysusers, c.path("/usr/lib/sysusers.d/psprobe.conf"))
        c.run(["systemd-sysusers", "psprobe.conf"], check=True)
    else:
        c.run(
            "getent passwd psprobe || useradd --system --user-group --home-dir /var/lib/psprobe"
            " --no-create-home --shell /usr/sbin/nologin psprobe",
            check=True,
        )
    # What the package ships: the state dir (0770, shared with sync through the group).
    c.run(["install", "-d", "-m", "0770", "-o", "psprobe", "-g", "psprobe", "/var/lib/psprobe"])
    c.run(["install", "-d", "-m", "0755", "/etc/psprobe", "/etc/psprobe/conf.d"], check=True)
    c.write("/etc/psprobe/psprobe.conf", config, mode=0o640, owner="root:psprobe")
    c.systemctl("daemon-reload", check=True)


class MeshHandler(BaseHTTPRequestHandler):
    """A mesh on loopback, changeable between syncs: serves the server's ``doc`` as JSON,
    at the server's ``path`` only when it has one (any other path, a typo, is a 404)."""

    def do_GET(self) -> None:
        want = getattr(self.server, "path", None)
        if want is not None and self.path != want:
            self.send_error(404)
            return
        body = json.dumps(self.server.doc).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
