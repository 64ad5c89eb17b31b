"""The archive's HTTP, against the simulator: proxies and CA bundle from the environment,
connections bounded by ``parallel`` and kept alive, a client key that does not fit its certificate."""

from __future__ import annotations

import logging

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


def test_parallel_connections_are_bounded_and_kept_alive(no_proxy_env, bus, tmp_path, pki):
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
