"""Shared pieces of the benchmarks: paths, the simulator, broker exchanges, measured children.

Every measured program runs as a child process and is reaped with ``os.wait4``,
whose rusage is that child's own CPU time and peak RSS (what
``getrusage(RUSAGE_CHILDREN)`` reports for a single child): the simulator and
the benchmark itself, in this process, never count (see ``_WRAPPER``).
"""

from __future__ import annotations

import compileall
import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _set_up() -> None:
    """Make each benchmark one command on a fresh machine, as ``tests/setup.sh`` makes the tests.

    In a Python without psprobe's packages, set up the project's ``.venv`` (as root also the
    systemd container's tools) and run again in it; in one with them, make sure a broker
    answers on loopback.  (The measured children run ``sys.executable``: they need the
    packages too.)
    """
    try:
        import click  # noqa: F401
        import pika  # noqa: F401
        import requests  # noqa: F401
    except ImportError:
        if os.environ.get("PSPROBE_BENCH_SET_UP"):  # already re-run in .venv: say what is missing
            raise
        env = {**os.environ, "PSPROBE_BENCH_SET_UP": "1"}
        if os.geteuid() == 0:
            env.setdefault("PSPROBE_SETUP_FULL", "1")
        subprocess.run(["bash", str(ROOT / "tests" / "setup.sh")], env=env, check=True, timeout=1800)
        python = str(ROOT / ".venv" / "bin" / "python")
        os.execve(python, [python, *sys.argv], env)
    subprocess.run(["bash", str(ROOT / "tests" / "broker.sh")], check=True, timeout=300)


_set_up()

# Measure psprobe as the RPM installs it, byte-compiled: with $PYTHONDONTWRITEBYTECODE set
# (some build and CI environments set it) every child would compile psprobe's modules anew.
compileall.compile_dir(ROOT / "psprobe", quiet=1)

AMQP_URL = os.environ.get("PSPROBE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
PSPROBE = [sys.executable, str(ROOT / "bin" / "psprobe")]


@dataclass
class Child:
    """What one child process cost."""

    status: int
    wall: float
    cpu: float  # user + system seconds
    maxrss_mb: float
    stdout: str
    stderr: str


# Forks the measured program from a small, freshly exec'd process: Linux carries
# the peak RSS of the forking process's memory over into the child's
# ru_maxrss across execve, so a child forked straight from this (big) process
# would report this process's peak, not its own.
_WRAPPER = """
import os, sys, time
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%d %f %f %d" % (os.waitstatus_to_exitcode(status), time.monotonic() - t0,
                             ru.ru_utime + ru.ru_stime, ru.ru_maxrss))
"""


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> Child:
    """Run ``argv`` to the end; its own wall time, CPU and peak RSS (wait4(2))."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="psprobe-run-") as d:
        res = Path(d) / "rusage"
        out, err = Path(d) / "out", Path(d) / "err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            subprocess.run([sys.executable, "-c", _WRAPPER, str(res), *argv], stdout=fo,
                           stderr=fe, env=env, timeout=timeout, check=False)
        status, wall, cpu, rss = res.read_text().split()
        return Child(int(status), float(wall), float(cpu), int(rss) / 1024,
                     out.read_text(errors="replace"), err.read_text(errors="replace"))


class Exchange:
    """A throw-away topic exchange with one bounded queue on ``#``, so publishes are routable."""

    def __init__(self, tag: str) -> None:
        import pika

        self.name = f"bench.psprobe.{tag}.{uuid.uuid4().hex[:8]}"
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.ch = self.conn.channel()
        self.ch.exchange_declare(self.name, exchange_type="topic")
        # Drop-head at 2 000 messages: a million-point run never fills the broker's memory.
        self.queue = self.ch.queue_declare("", exclusive=True,
                                           arguments={"x-max-length": 2000}).method.queue
        self.ch.queue_bind(self.queue, self.name, routing_key="#")

    def count(self) -> int:
        return self.ch.queue_declare(self.queue, passive=True).method.message_count

    def close(self) -> None:
        try:
            self.ch.exchange_delete(self.name)
            self.conn.close()
        except Exception:  # best effort at the end of a benchmark
            pass


class Sink:
    """A throw-away topic exchange and a named queue on ``#``, held by no connection.

    (An exclusive queue dies with its connection, and an idle BlockingConnection is
    dropped by the broker after a few missed heartbeats: then every publish of a
    benchmark's long run comes back unroutable.)  ``max_length``: drop-head bound
    (None: keep all, to count them with :meth:`drain`).
    """

    def __init__(self, tag: str, max_length: int | None = 1000) -> None:
        self.name = f"bench.psprobe.{tag}.{uuid.uuid4().hex[:8]}"
        with self._channel() as ch:
            ch.exchange_declare(self.name, exchange_type="topic")
            ch.queue_declare(self.name, arguments={"x-max-length": max_length} if max_length else {})
            ch.queue_bind(self.name, self.name, routing_key="#")

    @staticmethod
    @contextlib.contextmanager
    def _channel():
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            yield conn.channel()
        finally:
            conn.close()

    def drain(self) -> dict[str, int]:
        """Every message in the queue, consumed: message id -> times received."""
        seen: dict[str, int] = {}
        with self._channel() as ch:
            left = ch.queue_declare(self.name, passive=True).method.message_count
            ch.basic_qos(prefetch_count=2000)
            for method, props, _body in ch.consume(self.name, auto_ack=True, inactivity_timeout=5):
                if method is None:  # 5 s with nothing more: what was there is consumed
                    break
                seen[props.message_id] = seen.get(props.message_id, 0) + 1
                left -= 1
                if left <= 0:  # all that was counted is here: stop when nothing came meanwhile
                    left = ch.queue_declare(self.name, passive=True).method.message_count
                    if left == 0 and ch.get_waiting_message_count() == 0:
                        break
            ch.cancel()
        return seen

    def close(self) -> None:
        with contextlib.suppress(Exception), self._channel() as ch:  # best effort
            ch.queue_delete(self.name)
            ch.exchange_delete(self.name)



def idle_archive(sim):
    """Three tests on ``sim``'s 127.0.0.1 that ended a minute ago: after a first run, every
    run of that host finds nothing new (one metadata request, no broker connection).
    Returns the simulated host."""
    now = int(time.time())
    h = sim.host("127.0.0.1")
    for t in ("latencybg", "throughput", "trace"):
        h.add_test(t, start=now - 3600, end=now - 60, step=60)
    return h


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    lines = []
    for section, kv in sections.items():
        lines += [f"[{section}]", *(f"{k} = {v}" for k, v in kv.items()), ""]
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def journalled_ext4(where: str | Path, size: int = 4 << 30) -> Iterator[Path | None]:
    """A fresh ext4 with a journal, made on a sparse file in ``where`` and loop-mounted
    (root): its mount point, or None (with a line saying why) when it cannot be made.

    What a server's root file system is like, whatever the benchmark machine's own
    disk is (bench/unit_files.py shows why that matters).  Unmounted and removed after.
    """
    work = Path(tempfile.mkdtemp(prefix="psprobe-disk.", dir=where))
    image, mnt = work / "ext4.img", work / "mnt"
    try:
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(work, ignore_errors=True)
        why = (getattr(e, "stderr", None) or str(e)).strip()
        print(f"disk: cannot loop-mount an ext4 with a journal ({why}): on {where} as it is")
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)  # a loop mount detaches its device
        shutil.rmtree(work, ignore_errors=True)


def describe_disk(path: str | Path) -> str:
    """The file system ``path`` is on, and for ext4 whether it has a journal (jbd2 lists it)."""
    cp = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)],
                        capture_output=True, text=True, check=False)
    fstype, _, source = cp.stdout.strip().partition(" ")
    source = source.strip()
    if fstype != "ext4":
        return f"{fstype or '?'} ({path})"
    dev = os.path.basename(source)
    try:
        journal = any(j.startswith(f"{dev}-") for j in os.listdir("/proc/fs/jbd2"))
    except OSError:
        journal = False
    return f"ext4 {'with' if journal else 'WITHOUT'} a journal ({path}, on {source})"


def machine() -> str:
    """nproc, CPU model and memory: the line every benchmark prints first."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem = 0
    return (f"machine: {os.cpu_count()} CPU(s), {model}, {mem / 1024 / 1024:.1f} GiB RAM, "
            f"Python {sys.version.split()[0]}")


class DelayProxy:
    """A TCP relay on loopback that holds every chunk ``delay`` seconds each way: a far broker.

    Round trip = 2 x ``delay``; bandwidth is not limited.  Use as a context manager;
    ``url(amqp_url)`` points an AMQP URL at it.
    """

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, amqp_url: str) -> str:
        return amqp_url.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            for s in (a, b):  # as pika and RabbitMQ do: no Nagle delay on top of ours
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((a, b), (b, a)):
                self._pipe(src, dst)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: queue.Queue = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                q.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = q.get()
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        for fn in (read, write):
            threading.Thread(target=fn, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
