"""The fault lab: simulated archives, a real broker queue that survives faults, accounting.

Why: every fault test asks the same three questions -- did the faulted run end
with one clear line and the documented exit status, were the other hosts
untouched, and once the fault is gone did every point the simulator holds reach
the broker (0 lost) with few duplicates?  :class:`Lab` answers them; the
:class:`Figures` collector turns the answers into the table the README shows
(``tests/faults/figures.md``, also printed at the end of the run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AMQP_URL, write_config  # noqa: E402
from esmond_sim import ESMOND_PREFIX, EsmondSim  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures.md"
CHUNK = 25  # [collect] chunk_points in the lab: several messages per series
WINDOW = 4  # [broker] confirm_window in the lab: a run dies with at most 4 messages unconfirmed
POINTS = 120  # per series; 4 series per host
STEP = 60
# How a subprocess runs the CLI (bin/psprobe needs the packaged slot module).
CLI = [sys.executable, "-c", "import sys; from psprobe.cli import main; sys.exit(main())"]


# ----------------------------------------------------------------- broker helpers


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=120, check=check)


def wait_broker(deadline: float = 60.0) -> None:
    """Block until the broker accepts an AMQP connection (after start_app)."""
    import pika

    end = time.monotonic() + deadline
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
            return
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)  # polling with a deadline, not synchronisation by sleep


class FaultBus:
    """A durable exchange and queue: what arrived survives connection kills and restarts."""

    def __init__(self, bind: bool = True) -> None:
        tag = uuid.uuid4().hex[:10]
        self.exchange = f"test.psprobe.faults.{tag}"
        self.queue = f"test.psprobe.faults.q.{tag}"
        self._conn = None
        ch = self.channel()
        ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        ch.queue_declare(self.queue, durable=True)
        if bind:
            self.bind()

    def channel(self):
        """The channel, reconnecting if a fault (kill, restart) took the connection."""
        import pika

        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.process_data_events(0)
                if self._ch.is_open:
                    return self._ch
            except pika.exceptions.AMQPError:
                pass
        self._conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self._ch = self._conn.channel()
        return self._ch

    def bind(self) -> None:
        self.channel().queue_bind(self.queue, self.exchange, routing_key="#")

    def unbind(self) -> None:
        self.channel().queue_unbind(self.queue, self.exchange, routing_key="#")

    def drain(self) -> list[dict]:
        ch = self.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return out
            msg = json.loads(body)
            msg["_id"] = props.message_id
            out.append(msg)

    def close(self) -> None:
        try:
            ch = self.channel()
            ch.queue_delete(self.queue)
            ch.exchange_delete(self.exchange)
            self._conn.close()
        except Exception:
            pass


# ----------------------------------------------------------------- runs and accounting


@dataclass
class Run:
    status: int
    lines: list[str]

    def failed_line(self, host: str) -> str:
        """The one summary line of a failed run (asserts there is exactly one)."""
        mine = [x for x in self.lines if f"collect {host}: FAILED" in x]
        assert len(mine) == 1, self.lines
        assert "error=" in mine[0], mine
        assert not any("Traceback" in x for x in self.lines), self.lines
        return mine[0]


@dataclass
class Tally:
    expected: int
    delivered: int
    lost: int
    duplicates: int


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


class Observed:
    """An outlet around another that calls ``progress(self)`` after each confirmed message,
    ``messages`` counting them (a fault test acts at a known point of the run)."""

    def __init__(self, inner: Any, progress: Callable[[Observed], None]) -> None:
        self.inner, self.progress, self.messages = inner, progress, 0

    def send(self, msg: Any, confirmed: Callable[[], None]) -> None:
        def seen() -> None:
            confirmed()
            self.messages += 1
            self.progress(self)

        self.inner.send(msg, seen)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # routed_keys, unroutable: the inner outlet's
        return getattr(self.inner, name)


class Lab:
    """Archive hosts on one simulator, a fault bus, a state dir and a config file."""

    def __init__(self, tmp: Path, sim: EsmondSim, bus: FaultBus) -> None:
        self.tmp, self.sim, self.bus = tmp, sim, bus
        self.state = tmp / "state"
        self.conf = tmp / "psprobe.conf"
        self.sections: dict[str, dict[str, Any]] = {
            "collect": {"state_dir": self.state, "first_run_lookback": "2d",
                        "chunk_points": CHUNK},
            "archive": {"schemes": "http", "timeout": "1s", "retries": 1, "page_points": 50,
                        "parallel": 2},
            "broker": {"url": AMQP_URL, "exchange": bus.exchange, "timeout": "3s",
                       "confirm_window": WINDOW},
            "metrics": {"textfile_dir": tmp / "metrics"},
        }
        (tmp / "metrics").mkdir()
        self.delivered: list[dict] = []
        self.hosts: dict[str, EsmondSim] = {}  # psprobe host name -> its simulator
        self.write()

    # -- setting up
    def write(self, **extra: dict[str, Any]) -> Path:
        sections = {k: dict(v) for k, v in self.sections.items()}
        for s, kv in extra.items():
            sections.setdefault(s, {}).update(kv)
        return write_config(self.conf, sections)

    def set(self, section: str, **kv: Any) -> None:
        self.sections.setdefault(section, {}).update(kv)
        self.write()

    def add_host(self, name: str, routed: bool = True, points: int = POINTS,
                 sim: EsmondSim | None = None, room: int = 400) -> str:
        """An archive with 2 tests x 2 event types x ``points``; psprobe reads it at ``name``.

        ``routed``: the simulator tells it by a path prefix and sync's target.json
        carries the read URL; otherwise by the Host header (``name`` must resolve).
        """
        sim = sim or self.sim
        prefix = f"/{name}{ESMOND_PREFIX}" if routed else ESMOND_PREFIX
        h = sim.host(name, prefix)
        # In the past, leaving ``room`` steps before now for what ``more`` adds.
        start = int(time.time()) // STEP * STEP - (points + room) * STEP
        h.add_test("throughput", event_types=["throughput", "packet-retransmits"],
                   start=start, step=STEP, count=points)
        h.add_test("latencybg", event_types=["packet-loss-rate", "histogram-owdelay"],
                   start=start, step=STEP, count=points)
        if routed:
            self.set_read_url(name, sim.url(name))
        self.hosts[name] = sim
        return name

    def set_read_url(self, host: str, url: str) -> None:
        d = self.state / "hosts" / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "target.json").write_text(json.dumps({"host": host, "read_url": url,
                                                   "meshes": ["test"]}))

    def more(self, host: str, n: int = 7) -> None:
        """New points on every series of ``host`` (the archive keeps measuring)."""
        h = self.hosts[host].hosts[host.lower()]
        for key, et in h.pairs():
            pts = h.add_points(key, et, count=n, step=STEP)
            assert pts[-1][0] <= time.time() - STEP, "add_host(room=...) too small"

    # -- running
    def run(self, host: str, progress: Callable | None = None, **extra: dict[str, Any]) -> Run:
        """One in-process ``psprobe collect HOST``: exit status and every log line.

        ``progress(seen)`` is called after each confirmed message (``seen.messages``
        of them so far): the run's broker outlet is wrapped in an :class:`Observed`
        one, passed in through the envelope's outlet factory.
        """
        from psprobe import config, runner

        self.write(**extra)
        cfg = config.load(str(self.conf))
        cap = _Capture()
        lg = logging.getLogger("psprobe")
        old_level = lg.level
        lg.addHandler(cap)
        lg.setLevel(logging.INFO)
        outlet = None
        if progress is not None:
            def outlet(cfg, cp):
                return Observed(runner.broker_outlet(cfg, cp), progress)
        try:
            status = runner.collect_host(cfg, host, outlet=outlet)
        finally:
            lg.removeHandler(cap)
            lg.setLevel(old_level)
        if extra:
            self.write()
        return Run(status, cap.lines)

    def cli(self, *args: str, timeout: float = 60, user: int | None = None,
            wrap: list[str] | None = None) -> subprocess.CompletedProcess:
        """The CLI in a subprocess (``wrap`` prefixes e.g. unshare/setpriv)."""
        return subprocess.run([*(wrap or []), *CLI, *args], capture_output=True, text=True,
                              timeout=timeout, env={**self.env(), "PYTHONPATH": str(ROOT)},
                              cwd=str(ROOT))

    def env(self) -> dict[str, str]:
        """The environment of a CLI run on this lab's config (not the journal's stream)."""
        env = {**os.environ, "PSPROBE_CONFIG": str(self.conf)}
        env.pop("JOURNAL_STREAM", None)
        return env

    # -- accounting
    def tally(self, host: str, expect: dict[tuple[str, str, int], Any] | None = None) -> Tally:
        """Lost and duplicated points of ``host`` over everything delivered so far.

        ``expect``: (key, event type, ts) -> the value that point must arrive as, where
        the collector documents a change (a value strict JSON cannot carry).
        """
        self.delivered += self.bus.drain()
        h = self.hosts[host].hosts[host.lower()]
        want = {(k, et): dict(h.points(k, et)) for k, et in h.pairs()}
        for (k, et, ts), val in (expect or {}).items():
            assert ts in want[(k, et)], f"expect names a point the archive does not hold: {ts}"
            want[(k, et)][ts] = val
        got: Counter = Counter()
        for m in self.delivered:
            meta = m["meta"]
            pair = (meta["org_metadata_key"], meta["event-type"])
            if pair not in want:
                continue
            for ts, val in m["datapoints"].items():
                assert want[pair].get(int(ts), "missing") == val or int(ts) not in want[pair], \
                    f"{pair} {ts}: value changed in transit"
                got[(pair, int(ts))] += 1
        expected = {(p, ts) for p, pts in want.items() for ts in pts}
        extra = set(got) - expected
        assert not extra, f"points the archive never held: {sorted(extra)[:5]}"
        lost = len(expected - set(got))
        return Tally(len(expected), sum(got.values()), lost, sum(got.values()) - len(got))

    def unaffected(self, host: str) -> None:
        """``host`` (another host of the lab) measures more and is collected whole."""
        self.more(host, 120)
        r = self.run(host)
        assert r.status == 0, r.lines
        assert self.tally(host).lost == 0

    def catch_up(self, host: str, max_runs: int = 5, **extra: dict[str, Any]) -> tuple[int, Tally]:
        """Runs (fault removed) until nothing is lost; returns (runs, tally)."""
        for n in range(1, max_runs + 1):
            r = self.run(host, **extra)
            assert r.status == 0, r.lines
            t = self.tally(host)
            if t.lost == 0:
                return n, t
        raise AssertionError(f"{host}: still {t.lost} points lost after {max_runs} runs")


# ----------------------------------------------------------------- the service user

SERVICE_USER = "psprobe-test"


def service_user() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip(f"no user {SERVICE_USER}, and only root may create it")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVICE_USER], check=True, capture_output=True)
        pw = pwd.getpwnam(SERVICE_USER)
    return pw.pw_uid, pw.pw_gid


@contextlib.contextmanager
def service_lab(sim: EsmondSim, bus: FaultBus, hosts: tuple[str, ...], prefix: str,
                **collect: Any) -> Iterator[tuple[Lab, int, int, list[str]]]:
    """A lab the service user runs in: ``(lab, uid, gid, its python command)``.

    In a directory it can reach (pytest's tmp_path is root's 0700), with state,
    metrics and run directories its own, as the units' StateDirectory= makes them.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the service user")
    uid, gid = service_user()
    py = python_for(uid, gid)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        os.chmod(tmp, 0o755)
        lab = Lab(tmp, sim, bus)
        lab.set("collect", runtime_dir=tmp / "run", max_concurrent=2, **collect)
        for h in hosts:
            lab.add_host(h)
        (tmp / "run").mkdir()
        for p in (tmp / "state", tmp / "metrics", tmp / "run"):
            for q in [p, *p.rglob("*")]:
                os.chown(q, uid, gid)
        os.chmod(lab.conf, 0o644)
        yield lab, uid, gid, py
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def python_for(uid: int, gid: int) -> list[str]:
    """An interpreter the user can run, with this one's packages (a venv under /root is not)."""
    site = sysconfig.get_paths()["purelib"]
    wrap = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "env",
            f"PYTHONPATH={ROOT}:{site}"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    names = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{version}",
             f"/usr/local/bin/{version}", version]
    for py in names:
        exe = shutil.which(py)
        if exe is None:
            continue
        ok = subprocess.run([*wrap, exe, "-c", "import click, pika, requests, psprobe.cli"],
                            capture_output=True, timeout=60, cwd="/")
        if ok.returncode == 0:
            return [*wrap, exe]
    pytest.skip(f"no Python interpreter {SERVICE_USER} can run with psprobe's packages")


# ----------------------------------------------------------------- figures


@dataclass
class Figures:
    faults: list[dict] = field(default_factory=list)
    hostile: list[dict] = field(default_factory=list)

    def fault(self, group: str, name: str, status: int, line: str, tally: Tally, runs: int,
              faults: int = 1, bound: int | None = None) -> None:
        """Record one fault and assert the collector's promise for it.

        Duplicates are bounded by one window of chunks per fault (the messages a run
        had published and not yet seen confirmed) unless ``bound`` says otherwise.
        """
        bound = CHUNK * WINDOW * faults if bound is None else bound
        assert tally.lost == 0
        assert tally.duplicates <= bound, (name, tally)
        reason = line.split("error=", 1)[-1] if "error=" in line else line
        reason = re.sub(r"^(WARNING|INFO|ERROR): ", "", reason)
        reason = re.sub(r"(https?|amqps?)://\S+?: ", "", reason)  # URLs are in the test log
        reason = re.sub(r"/\S*/state/hosts/[^/]+/", "", reason)
        self.faults.append({"group": group, "fault": name, "status": status,
                            "reason": reason, "points": tally.expected, "lost": tally.lost,
                            "dups": tally.duplicates, "bound": bound, "runs": runs})

    def reject(self, group: str, name: str, tried: int, rejected: int, how: str) -> None:
        assert rejected == tried, (name, tried, rejected)
        self.hostile.append({"group": group, "input": name, "tried": tried,
                             "rejected": rejected, "how": how})

    def markdown(self) -> str:
        out = []
        if self.faults:
            out += ["| group | fault | exit | points | lost | duplicates (bound) | runs to catch up "
                    "| reason given |", "|---|---|---|---|---|---|---|---|"]
            for f in self.faults:
                reason = f["reason"].replace("|", "\\|")
                reason = reason if len(reason) <= 90 else reason[:87] + "..."
                out.append(f"| {f['group']} | {f['fault']} | {f['status']} | {f['points']} "
                           f"| {f['lost']} | {f['dups']} ({f['bound']}) | {f['runs']} | {reason} |")
            worst = max(f["dups"] for f in self.faults)
            out += ["", f"Faults tried: {len(self.faults)}; points lost: "
                    f"{sum(f['lost'] for f in self.faults)}; worst duplicates: {worst} "
                    f"(chunk_points = {CHUNK}, confirm_window = {WINDOW}).", ""]
        if self.hostile:
            out += ["| group | hostile input | tried | rejected | how |", "|---|---|---|---|---|"]
            for h in self.hostile:
                out.append(f"| {h['group']} | {h['input']} | {h['tried']} | {h['rejected']} "
                           f"| {h['how']} |")
            out += ["", f"Hostile inputs tried: {sum(h['tried'] for h in self.hostile)}; "
                    f"rejected: {sum(h['rejected'] for h in self.hostile)}.", ""]
        return "\n".join(out)


_FIGURES = Figures()


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


def pytest_sessionfinish(session, exitstatus) -> None:
    # Only a complete, green run of the suite rewrites the README's figures.
    whole = not session.config.option.keyword and len(_FIGURES.faults) >= 30
    if whole and exitstatus == 0:
        FIGURES.write_text("# psprobe fault suite figures\n\n"
                           "Generated by `python3 -m pytest tests/faults`.\n\n"
                           + _FIGURES.markdown())


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES.faults or _FIGURES.hostile:
        terminalreporter.write_sep("=", f"fault figures (also in {FIGURES.relative_to(ROOT)})")
        terminalreporter.write_line(_FIGURES.markdown())


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def sim():
    with EsmondSim() as s:
        yield s


@pytest.fixture
def fbus():
    b = FaultBus()
    yield b
    b.close()


@pytest.fixture
def lab(tmp_path, sim, fbus) -> Lab:
    return Lab(tmp_path, sim, fbus)
