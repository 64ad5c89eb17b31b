"""The archive's HTTP, against the simulator: proxies and CA bundle from the environment,
connections bounded by ``parallel``, kept alive and resuming one TLS session, gzip, and a
client key that does not fit its certificate."""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
import threading
import time

import pytest
import tlsutil
from esmond_sim import EsmondSim
from test_collect import arrived, make_cfg

from psprobe import runner
from psprobe.collect import ARCHIVE_FAILED, CONFIG_ERROR, OK

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
        assert runner.collect_host(cfg, host) == OK
        assert len(arrived(bus.drain())) == 72
        (req, *_) = sim.host(FAR).requests()
        assert req.host_header == host and req.path == "/esmond/perfsonar/archive/"
        no_proxy_env.setenv("no_proxy", "localhost,.example.invalid")
        assert runner.collect_host(make_cfg(tmp_path / "direct", bus), host) == ARCHIVE_FAILED
        assert bus.drain() == []


def test_unreachable_proxy_is_a_connect_error_naming_the_url(no_proxy_env, bus, tmp_path, caplog):
    no_proxy_env.setenv("HTTP_PROXY", "http://user:Pr0xy-S3cret@127.0.0.1:1")
    assert runner.collect_host(make_cfg(tmp_path, bus), f"{FAR}:8085") == ARCHIVE_FAILED
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
        assert runner.collect_host(cfg, host) == ARCHIVE_FAILED  # the test CA is not trusted
        monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca))
        assert runner.collect_host(cfg, host) == OK
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
        assert runner.collect_host(cfg, host) == OK
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
        assert runner.collect_host(cfg, host) == CONFIG_ERROR
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
        assert runner.collect_host(make_cfg(tmp_path, bus), host) == OK
        assert len(arrived(bus.drain())) == 72 and sim.stats["gzipped"] == 2
        # 10 000 traceroutes: megabytes of JSON in one page, a fraction of that on the wire
        now = int(time.time())
        h.add_test("trace", event_types=["packet-trace"], start=now - 20_000,
                   count=20_000, step=1)
        cfg = make_cfg(tmp_path / "cap", bus, archive={"max_answer_mb": 1, "page_points": 10_000})
        assert runner.collect_host(cfg, host) == ARCHIVE_FAILED
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
            assert runner.collect_host(cfg, host) == OK
            assert len(arrived(bus.drain())) == 72
            basic = "Basic " + base64.b64encode(b"ps@collector:p:ss").decode()
            assert proxy.tunnels == [(host, basic)]  # one tunnel, kept alive for the run
            assert sim.stats["tls_handshakes"] == 1
    finally:
        proxy.close()
