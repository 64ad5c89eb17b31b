"""The archive's HTTP, against the simulator: proxies and CA bundle from the environment,
connections bounded by ``parallel``, kept alive and resuming one TLS session, gzip, and a
client key that does not fit its certificate."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import threading
import time

import pytest
import tlsutil
from esmond_sim import EsmondSim
from faultproxy import FaultProxy
from test_collect import arrived, make_cfg

from psprobe import fetch, runner
from psprobe.archive import Archive, ArchiveError
from psprobe.exits import Exit

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
FAR = "ps-far.example.invalid"  # resolves nowhere: only a proxy can reach it


@pytest.fixture
def no_proxy_env(monkeypatch):
    for v in PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
        monkeypatch.delenv(v.upper(), raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))


def test_http_proxy_from_the_environment_is_used_and_no_proxy_bypasses_it(
        no_proxy_env, bus, tmp_path):
    with EsmondSim() as sim:  # the simulator answers proxy-form requests by their Host
        sim.host(FAR).add_test("throughput", event_types=["throughput"], step=600)
        cfg = make_cfg(tmp_path, bus)
        host = f"{FAR}:8085"
        no_proxy_env.setenv("http_proxy", f"http://127.0.0.1:{sim.port}")
        assert runner.collect_host(cfg, host) == Exit.OK
        assert len(arrived(bus.drain())) == 72
        (req, *_) = sim.host(FAR).requests()
        assert req.host_header == host and req.path == "/esmond/perfsonar/archive/"
        no_proxy_env.setenv("no_proxy", "localhost,.example.invalid")
        assert runner.collect_host(make_cfg(tmp_path / "direct", bus), host) == Exit.ARCHIVE
        assert bus.drain() == []


def test_unreachable_proxy_is_a_connect_error_naming_the_url(no_proxy_env, bus, tmp_path, caplog):
    no_proxy_env.setenv("HTTP_PROXY", "http://user:Pr0xy-S3cret@127.0.0.1:1")
    assert runner.collect_host(make_cfg(tmp_path, bus), f"{FAR}:8085") == Exit.ARCHIVE
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (f"http://{FAR}:8085/esmond/perfsonar/archive/: cannot connect through proxy "
            "http://127.0.0.1:1: Connection refused") in line
    assert "S3cret" not in caplog.text


def test_verify_yes_takes_the_ca_bundle_of_the_environment(monkeypatch, bus, tmp_path, pki):
    for v in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(v, raising=False)
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key))) as sim:
        sim.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
        host = f"localhost:{sim.port}"
        cfg = make_cfg(tmp_path, bus, archive={"schemes": "https"})  # verify = yes
        assert runner.collect_host(cfg, host) == Exit.ARCHIVE  # the test CA is not trusted
        monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca))
        assert runner.collect_host(cfg, host) == Exit.OK
        assert len(arrived(bus.drain())) == 72


def test_parallel_connections_are_bounded_kept_alive_and_resume_one_tls_session(
        no_proxy_env, bus, tmp_path, pki):
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key))) as sim:
        h = sim.host("localhost")
        for _ in range(12):
            h.add_test("latencybg", event_types=["packet-loss-rate"], step=600)
        h.latency = 0.02  # answers overlap: the run needs its parallel connections
        host = f"localhost:{sim.port}"
        cfg = make_cfg(tmp_path, bus, archive={"schemes": "https", "verify": pki.ca,
                                               "parallel": 3})
        assert runner.collect_host(cfg, host) == Exit.OK
        assert len(arrived(bus.drain())) == 12 * 72
        assert len(h.requests()) == 1 + 12
        assert sim.stats["tls_handshakes"] == sim.stats["connections"] <= 3
        # one full handshake (the metadata walk's); the fetch connections resume its session
        assert sim.stats["tls_resumed"] == sim.stats["tls_handshakes"] - 1


def test_a_client_key_that_does_not_fit_is_a_config_error(no_proxy_env, bus, tmp_path, pki, caplog):
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key)), client_ca=str(pki.ca)) as sim:
        sim.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
        host = f"localhost:{sim.port}"
        cfg = make_cfg(tmp_path, bus, archive={"schemes": "https", "verify": pki.ca,
                                               "cert": pki.client_cert,
                                               "key": pki.wrong_client_key})
        assert runner.collect_host(cfg, host) == Exit.CONFIG
        (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert f"{host}: [archive] cert/key: cannot load:" in line and "\n" not in line
        assert sim.host("localhost").requests() == [] and bus.drain() == []


def test_gzip_answers_are_decoded_and_capped_by_their_decoded_size(no_proxy_env, bus, tmp_path,
                                                                     caplog):
    with EsmondSim() as sim:
        sim.gzip = True
        h = sim.host("localhost")
        h.add_test("latencybg", event_types=["packet-loss-rate"], step=600)
        host = f"localhost:{sim.port}"
        assert runner.collect_host(make_cfg(tmp_path, bus), host) == Exit.OK
        assert len(arrived(bus.drain())) == 72 and sim.stats["gzipped"] == 2
        # 10 000 traceroutes: megabytes of JSON in one page, a fraction of that on the wire
        now = int(time.time())
        h.add_test("trace", event_types=["packet-trace"], start=now - 20_000,
                   count=20_000, step=1)
        cfg = make_cfg(tmp_path / "cap", bus, archive={"max_answer_mb": 1, "page_points": 10_000})
        assert runner.collect_host(cfg, host) == Exit.ARCHIVE
        assert "answer larger than 1 MB" in caplog.text


class ConnectProxy:
    """A CONNECT-only HTTP proxy on loopback: it records each tunnel's target and relays."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tunnels: list[tuple[str, str]] = []  # (target, Proxy-Authorization)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return client.close()
            head += chunk
        lines = head.decode().split("\r\n")
        target = lines[0].split()[1]
        auth = next((x.split(":", 1)[1].strip() for x in lines
                     if x.lower().startswith("proxy-authorization:")), "")
        self.tunnels.append((target, auth))
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_relay, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _relay(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def test_https_goes_through_a_connect_proxy_with_its_credentials(no_proxy_env, bus, tmp_path,
                                                                 pki):
    proxy = ConnectProxy()
    try:
        with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key))) as sim:
            sim.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
            host = f"localhost:{sim.port}"
            no_proxy_env.setenv("https_proxy", f"http://ps%40collector:p%3Ass@127.0.0.1:{proxy.port}")
            cfg = make_cfg(tmp_path, bus, archive={"schemes": "https", "verify": pki.ca})
            assert runner.collect_host(cfg, host) == Exit.OK
            assert len(arrived(bus.drain())) == 72
            basic = "Basic " + base64.b64encode(b"ps@collector:p:ss").decode()
            assert proxy.tunnels == [(host, basic)]  # one tunnel, kept alive for the run
            assert sim.stats["tls_handshakes"] == 1
    finally:
        proxy.close()


# --- whole-answer deadline: every phase of a GET, however slowly its bytes come

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: 200\r\n\r\n")
BODY = b"[" + b" " * 198 + b"]"


class Trickler:
    """An HTTP server on loopback sending ``answer``: ``prompt`` bytes at once, then one
    byte per ``every`` seconds (the fault itself), until the client hangs up."""

    def __init__(self, answer: bytes, prompt: int, every: float = 0.1) -> None:
        self.answer, self.prompt, self.every = answer, prompt, every
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(c,), daemon=True).start()

    def _answer(self, c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = c.recv(4096)
                if not chunk:
                    return
                head += chunk
            c.sendall(self.answer[:self.prompt])
            for i in range(self.prompt, len(self.answer)):
                if self.stop.wait(self.every):
                    return
                c.sendall(self.answer[i:i + 1])

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


PHASES = [
    ("status line", HEAD + BODY, 0),
    ("headers", HEAD + BODY, len(b"HTTP/1.1 200 OK\r\n")),
    ("body", HEAD + BODY, len(HEAD)),
    # read to EOF: cut short by the watchdog it would look whole, but is not taken
    ("body without length", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY,
     len(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")),
]


@pytest.mark.parametrize(("phase", "answer", "prompt"), PHASES, ids=[p[0] for p in PHASES])
def test_a_trickled_get_ends_at_its_deadline_in_every_phase(phase, answer, prompt):
    """A byte every 0.1 s never trips the 5 s socket timeout: only the deadline ends it
    (the whole answer would take 4 to 24 s)."""
    srv = Trickler(answer, prompt)
    pool = fetch.Pool(f"http://127.0.0.1:{srv.port}", 2, 5.0)
    try:
        t = time.monotonic()
        with pytest.raises(fetch.TooSlow):
            pool.get("/", 1 << 20, time.monotonic() + 0.5)
        assert time.monotonic() - t < 2.5
    finally:
        pool.close()
        srv.close()


def test_a_trickled_tls_handshake_ends_at_the_deadline(no_proxy_env, pki):
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key))) as sim, \
            FaultProxy(("127.0.0.1", sim.port), direction="down") as slow:
        sim.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
        ctx = fetch.tls_context(str(pki.ca))
        pool = fetch.Pool(f"https://localhost:{slow.port}", 2, 5.0, ctx)
        assert pool.get("/esmond/perfsonar/archive/", 1 << 20,
                        time.monotonic() + 5).status == 200  # the way works at full speed
        pool.close()
        slow.trickle(50)  # the server's certificate flight alone takes over 20 s
        t = time.monotonic()
        with pytest.raises(fetch.TooSlow):
            pool.get("/esmond/perfsonar/archive/", 1 << 20, time.monotonic() + 0.5)
        assert time.monotonic() - t < 2.5
        assert sim.stats["tls_handshakes"] == 1


def test_a_trickled_proxy_tunnel_ends_at_the_deadline(no_proxy_env, pki):
    proxy = ConnectProxy()
    try:
        with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key))) as sim, \
                FaultProxy(("127.0.0.1", proxy.port), direction="down") as slow:
            slow.trickle(5)  # "HTTP/1.1 200 Connection established" takes 8 s
            pool = fetch.Pool(f"https://localhost:{sim.port}", 2, 5.0,
                              fetch.tls_context(str(pki.ca)), f"http://127.0.0.1:{slow.port}")
            t = time.monotonic()
            with pytest.raises(fetch.TooSlow):
                pool.get("/esmond/perfsonar/archive/", 1 << 20, time.monotonic() + 0.5)
            assert time.monotonic() - t < 2.5
            assert [target for target, _ in proxy.tunnels] == [f"localhost:{sim.port}"]
            assert sim.stats["tls_handshakes"] == 0
    finally:
        proxy.close()


# --- the HTTP/1.1 psprobe reads itself (fetch.py: no http.client, for its imports)

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
READABLE = [
    ("Content-Length, kept alive", HEAD + BODY, BODY, True),
    ("chunked, with extensions and trailers",
     CHUNKED + b"4;x=y\r\n[1, \r\n2\r\n2]\r\n0\r\nX-Trailer: 1\r\n\r\n", b"[1, 2]", True),
    ("HTTP/1.0 without a length: read to the close", b"HTTP/1.0 200 OK\r\n\r\n[3]", b"[3]", False),
    ("Connection: close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n[4]",
     b"[4]", False),
    ("a 100 Continue before the answer",
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[5]", b"[5]", True),
    ("bare LF line ends", b"HTTP/1.1 200 OK\nContent-Length: 3\n\n[6]", b"[6]", True),
    ("a repeated header", b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n"
     b"Content-Length: 3\r\n\r\n[7]", b"[7]", False),
]


@pytest.mark.parametrize(("answer", "body", "kept"), [r[1:] for r in READABLE],
                         ids=[r[0] for r in READABLE])
def test_answers_are_framed_as_http_1_1_says(answer, body, kept):
    srv = Trickler(answer, len(answer))
    pool = fetch.Pool(f"http://127.0.0.1:{srv.port}", 2, 5.0)
    try:
        got = pool.get("/", 1 << 20, time.monotonic() + 5)
        assert (got.status, got.body) == (200, body)
        assert len(pool._idle) == (1 if kept else 0)  # kept alive only where HTTP allows
    finally:
        pool.close()
        srv.close()


BROKEN = [
    ("not HTTP", b"SSH-2.0-OpenSSH_8.7\r\n", fetch.ConnectFailed, "not an HTTP answer"),
    ("closed before any answer", b"", fetch.ConnectFailed,
     "Remote end closed connection without response"),
    ("closed in the headers", b"HTTP/1.1 200 OK\r\nContent-Le", fetch.ConnectFailed,
     "closed in the headers"),
    ("more than 100 headers", b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n",
     fetch.ConnectFailed, "more than 100 headers"),
    ("a header line of 70 000 bytes", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000,
     fetch.ConnectFailed, "header line too long"),
    ("cut in the body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1,", fetch.Broken,
     "IncompleteRead(3 bytes read, 7 more expected)"),
    ("cut in a chunk", CHUNKED + b"10\r\n[1,", fetch.Broken,
     "IncompleteRead(3 bytes read, 13 more expected)"),
    ("a chunk size that is not hex", CHUNKED + b"zz\r\n", fetch.Broken, "bad chunk size"),
    ("a chunk without its CRLF", CHUNKED + b"2\r\n[]xx", fetch.Broken, "chunk not followed by CRLF"),
    ("two different lengths",
     b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n[1]",
     fetch.Broken, "bad Content-Length"),
    ("a length over the limit, refused unread", b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n",
     fetch.TooLarge, "too large"),
]


@pytest.mark.parametrize(("answer", "error", "words"), [r[1:] for r in BROKEN],
                         ids=[r[0] for r in BROKEN])
def test_a_broken_answer_is_one_clear_error_and_its_connection_is_not_kept(answer, error, words):
    srv = Trickler(answer, len(answer))
    pool = fetch.Pool(f"http://127.0.0.1:{srv.port}", 2, 5.0)
    try:
        with pytest.raises(error) as e:
            pool.get("/", 1 << 20, time.monotonic() + 5)
        assert words in e.value.reason
        assert pool._idle == []
    finally:
        pool.close()
        srv.close()


def test_a_deadline_already_past_makes_no_connection():
    srv = Trickler(HEAD + BODY, len(HEAD + BODY))
    try:
        with pytest.raises(fetch.TooSlow):
            fetch.Pool(f"http://127.0.0.1:{srv.port}", 2, 5.0).get("/", 1 << 20,
                                                                   time.monotonic() - 1)
    finally:
        srv.close()


def test_the_watchdog_wakes_only_for_an_earlier_deadline_and_shuts_only_its_own_socket():
    dog = fetch._Watchdog()
    notified = []
    real_notify = dog._cv.notify
    dog._cv.notify = lambda *a: (notified.append(1), real_notify(*a))[1]
    pairs = [socket.socketpair() for _ in range(3)]
    (a, a_peer), (b, _), (c, c_peer) = pairs
    try:
        far = time.monotonic() + 60
        for i in range(300):  # a run's GETs: each deadline later than the one before
            w = fetch._Watch(far + i)
            dog.arm(w, c)
            assert dog.disarm(w) is False
        assert notified == []  # the first arm started the thread; none woke it since
        gone = fetch._Watch(time.monotonic() + 0.05)
        dog.arm(gone, a)
        dog.disarm(gone)  # done before its deadline: its socket is never touched
        due = fetch._Watch(time.monotonic() + 0.1)
        dog.arm(due, b)
        assert len(notified) == 1  # earlier than what the thread slept until
        t = time.monotonic()
        assert b.recv(1) == b""  # blocked, until shut down at the deadline
        assert time.monotonic() - t < 2
        assert dog.disarm(due) is True
        a.setblocking(False)
        with pytest.raises(BlockingIOError):  # open, nothing to read: not shut down
            a.recv(1)
        a.setblocking(True)
        a_peer.sendall(b"x")
        assert a.recv(1) == b"x"
        c_peer.sendall(b"y")
        assert c.recv(1) == b"y"
        assert sum(t.name == "fetch-watchdog" for t in threading.enumerate()) <= 2
    finally:
        for s in (x for p in pairs for x in p):
            s.close()


def test_one_watchdog_thread_for_every_get_and_no_descriptor_left(no_proxy_env):
    with EsmondSim() as sim:
        sim.host("localhost").add_test("throughput", event_types=["throughput"], step=600)
        pools = [fetch.Pool(f"http://localhost:{sim.port}", 2, 5.0) for _ in range(3)]
        before = {t for t in threading.enumerate() if t.name == "fetch-watchdog"}
        fds = []
        for _ in range(30):
            for p in pools:
                assert p.get("/esmond/perfsonar/archive/", 1 << 20,
                             time.monotonic() + 5).status == 200
            fds.append(len(os.listdir("/proc/self/fd")))
        assert fds == fds[:1] * 30  # each pool's one kept-alive connection; no dup left
        after = {t for t in threading.enumerate() if t.name == "fetch-watchdog"}
        assert after == before | {fetch._WATCHDOG._thread}  # the process's one, for all
        for p in pools:
            p.close()


def _archive(tmp_path, sim_or_url, **archive) -> Archive:
    cfg = make_cfg(tmp_path, None, archive={"retries": 0, "timeout": "5s", **archive})
    url = sim_or_url if isinstance(sim_or_url, str) else sim_or_url.url("localhost")
    return Archive("localhost", cfg.archive, url)


def test_no_request_or_retry_goes_past_the_run_deadline(no_proxy_env, tmp_path):
    with EsmondSim() as sim:
        h = sim.host("localhost")
        h.add_test("throughput", event_types=["throughput"], step=600)
        arch = _archive(tmp_path, sim, retries=3)
        arch.deadline = time.monotonic() - 1
        with pytest.raises(ArchiveError, match=r"archive/: run deadline reached$"):
            arch.get_json(arch._url_for("http"), {})
        assert h.requests() == []
        # HTTP 503: the pause before a second try (0.5 s) would pass the run's deadline
        h.fault("status", status=503)
        arch.deadline = time.monotonic() + 0.3
        t = time.monotonic()
        with pytest.raises(ArchiveError) as e:
            arch.get_json(arch._url_for("http"), {})
        assert time.monotonic() - t < 0.3
        assert str(e.value).endswith("HTTP 503 (run deadline reached: not retried)")
        assert len(h.requests()) == 1
        arch.close()


def test_a_request_is_cut_at_the_run_deadline_when_that_comes_first(no_proxy_env, tmp_path):
    srv = Trickler(HEAD + BODY, 0)
    try:
        arch = _archive(tmp_path, f"http://127.0.0.1:{srv.port}/esmond/perfsonar/archive/",
                        retries=2)  # its own deadline: 4 x 5 s
        arch.deadline = time.monotonic() + 0.5
        t = time.monotonic()
        with pytest.raises(ArchiveError, match=r"run deadline reached before the answer$"):
            arch.get_json(arch._url_for("http"), {"limit": 1})
        assert time.monotonic() - t < 2.5
        assert arch.requests == 1
        arch.close()
    finally:
        srv.close()


def test_a_trickled_answer_is_one_line_naming_the_url_and_four_times_the_timeout(
        no_proxy_env, tmp_path):
    srv = Trickler(HEAD + BODY, len(HEAD), every=0.05)  # 10 s of body; 4 x 1 s allowed
    try:
        arch = _archive(tmp_path, f"http://127.0.0.1:{srv.port}/esmond/perfsonar/archive/",
                        timeout="1s")
        t = time.monotonic()
        with pytest.raises(ArchiveError) as e:
            arch.get_json(arch._url_for("http"), {"limit": 1})
        assert 4 <= time.monotonic() - t < 4 * 2
        assert str(e.value) == (f"http://127.0.0.1:{srv.port}/esmond/perfsonar/archive/"
                                "?limit=1: answer took longer than 4s")
        arch.close()
    finally:
        srv.close()
