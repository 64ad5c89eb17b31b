"""Archive faults: each ends the run with one clear line and exit 1, hurts no other host,
and once gone, the next runs deliver every point (0 lost, duplicates within a chunk)."""

from __future__ import annotations

import socket
import ssl

import pytest
import tlsutil
from esmond_sim import EsmondSim
from ports import free_port as _closed_port  # tests/ is on sys.path

from faults.conftest import STEP

A, B = "ps-a.example.org", "ps-b.example.org"


def _page2(lab, host: str, event_type: str = "packet-loss-rate") -> str:
    """Regex of the second data page of one series in the next run (call before ``more``)."""
    h = lab.hosts[host].hosts[host.lower()]
    key = next(k for k, et in h.pairs() if et == event_type)
    last = h.points(key, event_type)[-1][0]
    return rf"{key}/{event_type}/base\?time-start={last + 50 * STEP + 1}&"


def _baseline(lab) -> None:
    """Both hosts collected once; then the archives measure more (3 pages per series)."""
    for h in (A, B):
        assert lab.run(h).status == 0
        assert lab.tally(h).lost == 0


# kind, fault arguments, where ("meta" or "page2"), exit status, words in the reason
CASES = [
    ("HTTP 500, no body", "status", {"status": 500}, "page2", 1, "HTTP 500"),
    ("HTTP 502, HTML body", "status", {"status": 502,
                                       "body": "<html><h1>502 Bad Gateway</h1></html>"},
     "page2", 1, "HTTP 502: 502 Bad Gateway"),
    ("HTTP 503, JSON body", "status", {"status": 503, "body": {"detail": "Down for upgrade"}},
     "page2", 1, "HTTP 503: Down for upgrade"),
    ("HTTP 503 on metadata", "status", {"status": 503}, "meta", 1, "HTTP 503"),
    ("slow answer past timeout", "slow", {"delay": 3.0}, "page2", 1, "no answer within 1s"),
    ("stall mid-body", "stall", {}, "page2", 1, "no answer within 1s"),
    ("connection cut mid-body", "cut", {}, "page2", 1, "ps-a.example.org"),
    ("connection reset", "reset", {}, "page2", 1, "closed connection without response"),
    ("connection reset once (retried)", "reset", {"times": 1}, "page2", 0, ""),
    ("HTTP 503 once (retried)", "status", {"status": 503, "times": 1}, "page2", 0, ""),
    ("truncated JSON", "truncate", {}, "page2", 1, "truncated JSON"),
    ("non-JSON (HTML) answer", "nonjson", {}, "page2", 1, "not JSON"),
    ("non-JSON metadata", "nonjson", {}, "meta", 1, "not JSON"),
    ("shape: object, not list", "shape", {"shape": "object"}, "page2", 1, "not a list"),
    ("shape: point missing ts", "shape", {"shape": "missing_ts"}, "page2", 1, "without ts/val"),
    ("shape: string timestamps", "shape", {"shape": "string_ts"}, "page2", 1, "non-integer ts"),
    ("shape: duplicate timestamps", "shape", {"shape": "duplicate_ts"}, "page2", 0, ""),
    ("shape: points out of order", "shape", {"shape": "out_of_order"}, "page2", 0, ""),
    ("shape: points outside window", "shape", {"shape": "outside_window"}, "page2", 0, ""),
    ("metadata page loop", "page_loop", {}, "meta", 0, ""),
    ("gigantic answer (40 MB)", "gigantic", {"size_mb": 40}, "page2", 1, "larger than 16 MB"),
]


@pytest.mark.parametrize(("name", "kind", "kw", "where", "status", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_archive_fault(lab, figures, name, kind, kw, where, status, words):
    lab.set("archive", max_answer_mb=16)
    lab.add_host(A)
    lab.add_host(B)
    _baseline(lab)
    path = r"/esmond/perfsonar/archive/\?" if where == "meta" else _page2(lab, A)
    lab.more(A, 120)
    fault = lab.sim.fault(A, kind, path=path, **kw)
    r = lab.run(A)
    assert r.status == status, r.lines
    assert fault.hits >= 1
    if status:
        line = r.failed_line(A)
        assert words in line, line
    else:
        line = "handled: " + next((x.split(": ", 1)[1] for x in r.lines
                                   if x.startswith("WARNING")), "nothing to report")
        assert lab.tally(A).lost == 0
    lab.unaffected(B)
    lab.sim.clear_faults()
    runs, t = lab.catch_up(A)
    figures.fault("archive", name, r.status, line, t, runs if status else 0)


def test_connection_refused(lab, figures):
    lab.add_host(A)
    lab.add_host(B)
    _baseline(lab)
    lab.more(A, 120)
    port = _closed_port()
    lab.set_read_url(A, lab.sim.url(A).replace(f":{lab.sim.port}/", f":{port}/"))
    r = lab.run(A)
    assert r.status == 1
    line = r.failed_line(A)
    assert "cannot connect" in line and "Connection refused" in line
    lab.unaffected(B)
    back = EsmondSim(port=port)  # the archive comes back on its port
    back.hosts, back.by_prefix = lab.sim.hosts, lab.sim.by_prefix
    with back:
        runs, t = lab.catch_up(A)
    figures.fault("archive", "connection refused", r.status, line, t, runs)


def test_dns_failure(lab, figures, monkeypatch):
    name = "ps-dns.invalid"
    lab.add_host(A)
    lab.add_host(B)
    lab.add_host(name, routed=False)
    lab.set_read_url(name, f"http://{name}:{lab.sim.port}/esmond/perfsonar/archive/")
    r = lab.run(name)
    assert r.status == 1
    line = r.failed_line(name)
    assert "cannot connect" in line and name in line
    lab.unaffected(B)
    real = socket.getaddrinfo

    def resolver(host, *a, **k):  # the name resolves again (psprobe passes an ASCII name as bytes)
        plain = host.decode() if isinstance(host, bytes) else host
        return real("127.0.0.1" if plain == name else host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    runs, t = lab.catch_up(name)
    figures.fault("archive", "DNS failure (.invalid)", r.status, line, t, runs)


# --- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))


def _ctx(cert, key, ca=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    if ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(ca))
    return ctx


@pytest.fixture
def tls_sim(pki):
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key)), client_ca=str(pki.ca)) as s:
        yield s


TLS = [
    ("untrusted CA", "wrong", "certificate verify failed"),
    ("expired certificate", "expired", "certificate has expired"),
    ("no client certificate", "noclient", "certificate required"),
]


@pytest.mark.parametrize(("name", "case", "words"), TLS, ids=[c[1] for c in TLS])
def test_tls_failure(lab, figures, pki, tls_sim, name, case, words):
    lab.add_host(A, sim=tls_sim)
    lab.add_host(B)
    lab.set(f"host {A}", schemes="https", verify=pki.ca, cert=pki.client_cert,
            key=pki.client_key)
    _baseline(lab)
    lab.more(A, 120)
    good = tls_sim.ssl_context
    extra = {}
    if case == "wrong":
        tls_sim.ssl_context = _ctx(pki.wrong_server_cert, pki.wrong_server_key, pki.ca)
    elif case == "expired":
        tls_sim.ssl_context = _ctx(pki.expired_cert, pki.expired_key, pki.ca)
    else:
        extra = {f"host {A}": {"cert": "", "key": ""}}
    r = lab.run(A, **extra)
    assert r.status == 1, r.lines
    line = r.failed_line(A)
    assert words in line, line
    lab.unaffected(B)
    tls_sim.ssl_context = good
    runs, t = lab.catch_up(A)
    figures.fault("archive", f"TLS: {name}", r.status, line, t, runs)


def test_tls_verification_is_on_by_default_and_off_is_logged_every_run(lab, figures, pki, tls_sim):
    """Default verify=yes refuses the test CA; verify=no for one host only, logged each run."""
    lab.add_host(A, sim=tls_sim)
    lab.add_host(B, sim=tls_sim)
    lab.set("archive", schemes="https", cert=pki.client_cert, key=pki.client_key)
    for h in (A, B):
        r = lab.run(h)
        assert r.status == 1 and "certificate verify failed" in r.failed_line(h)
    lab.set(f"host {A}", verify="no")
    for _ in range(2):
        r = lab.run(A)
        assert r.status == 0, r.lines
        assert sum("verification is OFF" in x and x.startswith("WARNING") for x in r.lines) == 1
    r = lab.run(B)
    assert r.status == 1 and "certificate verify failed" in r.failed_line(B)
    assert lab.tally(A).lost == 0
    figures.reject("TLS", "untrusted certificate with default verify", 2, 2,
                   "exit 1, 'certificate verify failed'; verify=no only per host, warned every run")
