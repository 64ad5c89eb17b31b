"""psprobe receive against the real broker and a real HTTP client, on loopback.

Every real run record pScheduler's http archiver sent (../shared/formats/
pscheduler_http_archiver/) is pushed and must reach the broker as exactly the
messages psprobe.convert makes of it (routing keys, bodies, ids); a broker
outage, a kill -9 and a stop lose nothing acknowledged; each kind of bad
request gets its status and one log line.  No sleeps: a test waits on the
receiver's ready callback, on its stop (which flushes the forwarder), or on
the answer to its own request.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import tlsutil
from conftest import AMQP_URL, ROOT, write_config
from ports import free_port as closed_port  # tests/ is on sys.path

from psprobe import config, convert, metrics, receive, state
from psprobe.exits import Exit
from psprobe.spool import Spool

# The real records (byte copies of shared/formats/pscheduler_http_archiver; see its README).
RECORDS = sorted((ROOT / "tests" / "fixtures" / "pushed" / "real").glob("*.json"))
LIMA, P104 = "lima-perfsonar-vm", "192.168.1.104"  # the records' measurement agents
TOKENS = {LIMA: "tok-lima", P104: "tok-104", "stranger.example.org": "tok-stranger",
          "*": "tok-shared"}

assert RECORDS, "tests/fixtures/pushed/real/ holds the real records"


def runs() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_bytes())) for p in RECORDS]


def all_event_types() -> str:
    """Every event type the records convert to: the tests publish them all."""
    return ", ".join(sorted({s.event_type for _, r in runs() for s in convert.series(r)}))


def make_config(tmp_path: Path, exchange: str = "amq.topic", *, broker_url: str = AMQP_URL,
                tokens: dict[str, str] | None = TOKENS, **receive_kv) -> Path:
    tok = tmp_path / "tokens"
    if tokens is not None and not tok.exists():
        tok.write_text("# host token\n\n" + "".join(f"{h} {t}\n" for h, t in tokens.items()))
        tok.chmod(0o640)
    kv = {"plain_http": "yes", "tokens": tok, "hosts": f"{LIMA}, {P104}",
          "request_timeout": "5s", **receive_kv}
    (tmp_path / "prom").mkdir(exist_ok=True)
    return write_config(tmp_path / "psprobe.conf", {
        "collect": {"state_dir": tmp_path / "state", "event_types": all_event_types()},
        "broker": {"url": broker_url, "exchange": exchange, "timeout": "5s"},
        "metrics": {"textfile_dir": tmp_path / "prom"},
        "receive": kv})


class Running:
    """serve() in a thread on a loopback socket of its own; stop() returns its exit status."""

    def __init__(self, conf: Path) -> None:
        self.cfg = config.load(str(conf))
        self.stop_event, self.started = threading.Event(), threading.Event()
        self.port: int | None = None
        self.status: Exit | None = None
        lsock = socket.create_server(("127.0.0.1", 0))

        def run() -> None:
            try:
                self.status = receive.serve(self.cfg, sockets=[lsock], stop=self.stop_event,
                                            ready=self._ready)
            finally:
                self.started.set()  # an early exit (config error) ends the wait too

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(30)

    def _ready(self, port: int) -> None:
        self.port = port
        self.started.set()

    @property
    def url(self) -> str:
        return f"{'http' if self.cfg.receive.plain_http else 'https'}://127.0.0.1:{self.port}/"

    def stop(self) -> Exit:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.status


@pytest.fixture
def running():
    started: list[Running] = []

    def start(conf: Path) -> Running:
        r = Running(conf)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


def bearer(host: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[host]}"}


def expected(cfg: config.Config, run: dict) -> list[tuple[str, str, dict]]:
    return [(m.routing_key, m.message_id, json.loads(m.body)) for m in convert.messages(
        run, cfg.broker.routing_key_prefix, cfg.collect.chunk_points,
        event_types=cfg.collect.event_types)]


def delivered(bus) -> list[tuple[str, str, dict]]:
    got = bus.drain()
    assert {(d.delivery_mode, d.content_type) for d in got} <= {(2, "application/json")}
    return [(d.routing_key, d.message_id, d.body) for d in got]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "psprobe.receive" and r.levelno >= logging.WARNING]


def received(cfg: config.Config, host: str) -> dict:
    sd = cfg.collect.state_dir
    return state.read_json(state.host_file(sd, host, state.RECEIVED), root=sd)


# --- the data path


def test_every_real_record_reaches_the_broker_as_convert_makes_it(bus, tmp_path, running):
    r = running(make_config(tmp_path, bus.exchange))
    want, per_host = [], {}
    with requests.Session() as http:  # keep-alive, as pScheduler's curl handle does
        for i, (name, run) in enumerate(runs()):
            agent = convert.agent(run)
            # per-host tokens, and the shared one (then the record says who pushes)
            headers = bearer(agent if i % 2 else "*")
            method = http.put if i % 3 == 0 else http.post
            ans = method(r.url, data=json.dumps(run), headers=headers, timeout=30)
            assert ans.status_code == 200, (name, ans.text)
            exp = expected(r.cfg, run)
            assert exp, f"{name} converts to no message: the comparison would prove nothing"
            assert ans.json() == {"host": agent, "messages": len(exp),
                                  "points": sum(m.points for m in convert.messages(
                                      run, "", 200, event_types=r.cfg.collect.event_types))}
            want += exp
            per_host.setdefault(agent, []).append(len(exp))
    assert r.stop() == Exit.OK  # the stop flushes the forwarder: all confirmed now
    assert delivered(bus) == want
    for host, counts in per_host.items():
        t = received(r.cfg, host)
        assert (t["runs"], t["messages"], t["confirmed"]) == (len(counts), sum(counts),
                                                              sum(counts))
        assert t["refused"] is None and t["first_received"] <= t["last_received"]


def test_the_same_run_twice_gives_the_same_ids(bus, tmp_path, running):
    r = running(make_config(tmp_path, bus.exchange))
    _, run = runs()[0]
    assert requests.post(r.url, json=run, headers=bearer("*"), timeout=30).status_code == 200
    raw = json.dumps(run).encode()  # again, chunked this time (a body of unknown length)
    pieces = iter([raw[i:i + 700] for i in range(0, len(raw), 700)])
    assert requests.post(r.url, data=pieces, headers=bearer("*"), timeout=30).status_code == 200
    assert r.stop() == Exit.OK
    got = delivered(bus)
    once = expected(r.cfg, run)
    assert got == once + once


def test_broker_down_spools_and_a_receiver_with_the_broker_drains_it_in_order(bus, tmp_path,
                                                                               running, caplog):
    down = tmp_path / "down"
    down.mkdir()
    r = running(make_config(down, bus.exchange, broker_url=f"amqp://guest:guest@127.0.0.1:"
                                                          f"{closed_port()}/%2F"))
    want = []
    for _, run in runs():
        ans = requests.post(r.url, json=run, headers=bearer("*"), timeout=30)
        assert ans.status_code == 200  # safe in the spool, broker or not
        want += expected(r.cfg, run)
    assert r.stop() == Exit.OK
    assert any("Connection refused" in w or "cannot connect" in w for w in warnings(caplog))
    assert bus.drain() == []
    sd = r.cfg.collect.state_dir
    with Spool(state.spool_dir(sd), r.cfg.receive.spool_max) as sp:
        assert sp.pending() == len(want)
    # the same state directory, the right broker
    up = make_config(down, bus.exchange)
    r2 = running(up)
    assert r2.stop() == Exit.OK
    assert delivered(bus) == want
    with Spool(state.spool_dir(sd), r.cfg.receive.spool_max) as sp:
        assert sp.pending() == 0
    assert received(r2.cfg, LIMA)["confirmed"] == sum(
        len(expected(r.cfg, run)) for _, run in runs() if convert.agent(run) == LIMA)


def test_curl_as_pschedulers_archiver_uses_it_put_with_expect_100_continue(bus, tmp_path,
                                                                          running):
    """libcurl (pycurl in the archiver): PUT, _headers, Expect: 100-continue, keep-alive."""
    if subprocess.run(["sh", "-c", "command -v curl"], capture_output=True).returncode:
        pytest.skip("no curl")
    r = running(make_config(tmp_path, bus.exchange))
    args, want = [], []
    for i, path in enumerate(RECORDS):
        args += [*(["--next"] if i else []), "-sS", "-o", "/dev/null", "-w", "%{http_code}\\n",
                 "-X", "PUT", "-H", "Expect: 100-continue", "-H", "Content-Type: application/json",
                 "-H", f"Authorization: Bearer {TOKENS['*']}", "--data-binary", f"@{path}", r.url]
        want += expected(r.cfg, json.loads(path.read_bytes()))
    out = subprocess.run(["curl", *args], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["200"] * len(RECORDS), out.stderr
    assert r.stop() == Exit.OK
    assert delivered(bus) == want


def test_expect_100_continue_comes_only_once_the_push_is_allowed(tmp_path, running):
    r = running(make_config(tmp_path))
    body = json.dumps(runs()[0][1]).encode()

    def head(token: str) -> bytes:
        return (b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nAuthorization: Bearer "
                b"%s\r\nContent-Length: %d\r\n\r\n" % (token.encode(), len(body)))

    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(head("tok-guessed"))
        assert s.recv(4096).startswith(b"HTTP/1.1 401 ")  # no 100: the body is never sent
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(head(TOKENS[LIMA]))
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    assert r.stop() == Exit.OK


# --- refusals: each its status and one log line


def _record(**change) -> bytes:
    run = dict(runs()[0][1])
    run.update(change)
    return json.dumps(run).encode()


REFUSALS = [
    # (what, method, headers, body, status, in the answer and the log line)
    ("bad JSON", "POST", bearer(LIMA), b'{"id": "x", ', 400, "not JSON"),
    ("wrong type", "POST", bearer(LIMA), _record(schedule={"start": 12, "duration": "PT10S"})
     if RECORDS else b"", 400, "schedule.start"),
    ("not a record", "PUT", bearer(LIMA), b"[1, 2, 3]", 400, "not an object"),
    ("unknown host by its token", "POST", bearer("stranger.example.org"), b"{}", 403,
     "unknown host stranger.example.org"),
    ("unknown host by its record", "POST", bearer("*"),
     _record(participants=["stranger.example.org"]) if RECORDS else b"", 403,
     "unknown host stranger.example.org"),
    ("no token", "POST", {}, b"{}", 401, "no bearer token"),
    ("wrong token", "POST", {"Authorization": "Bearer tok-guessed"}, b"{}", 401,
     "matches none"),
    ("not POST or PUT", "GET", bearer(LIMA), b"", 405, "not allowed"),
    ("too many headers", "POST", {**{f"X-{i}": "v" for i in range(101)}, **bearer(LIMA)}, b"{}",
     431, "more than 100 header fields"),
    ("a header line too long", "POST", {"X-Long": "v" * 9000, **bearer(LIMA)}, b"{}", 431,
     "longer than 8192 bytes"),
]


@pytest.mark.parametrize("what, method, headers, body, status, why", REFUSALS,
                         ids=[x[0] for x in REFUSALS])
def test_a_bad_request_gets_its_status_and_one_log_line(tmp_path, running, caplog, what, method,
                                                        headers, body, status, why):
    r = running(make_config(tmp_path, broker_url=f"amqp://127.0.0.1:{closed_port()}/%2F"))
    caplog.clear()
    ans = requests.request(method, r.url, data=body, headers=headers, timeout=30)
    assert ans.status_code == status
    assert why in ans.text
    lines = warnings(caplog)
    assert len(lines) == 1 and why in lines[0] and "127.0.0.1" in lines[0], lines
    if status == 401:
        assert ans.headers["WWW-Authenticate"].startswith("Bearer")
    if status == 405:
        assert ans.headers["Allow"] == "POST, PUT"
    assert r.stop() == Exit.OK
    if status == 400:  # a known host (its token): its refusal is on its record
        assert received(r.cfg, LIMA)["refused"]["count"] == 1


def test_a_bad_chunk_is_refused_with_400(tmp_path, running, caplog):
    r = running(make_config(tmp_path))
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-lima\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
    lines = warnings(caplog)
    assert len(lines) == 1 and "bad chunk size" in lines[0]
    assert r.stop() == Exit.OK


def test_a_full_spool_answers_503_with_retry_after_and_writes_nothing(tmp_path, running,
                                                                      caplog):
    r = running(make_config(tmp_path, spool_max="2k",
                            broker_url=f"amqp://127.0.0.1:{closed_port()}/%2F"))
    throughput = next(run for name, run in runs() if name.startswith("throughput"))
    caplog.clear()
    ans = requests.post(r.url, json=throughput, headers=bearer("*"), timeout=30)
    assert ans.status_code == 503 and ans.headers["Retry-After"] == str(receive.RETRY_AFTER)
    lines = warnings(caplog)
    assert len(lines) == 1 and "spool is full" in lines[0] and P104 in lines[0]
    assert r.stop() == Exit.OK
    with Spool(state.spool_dir(r.cfg.collect.state_dir), 1 << 20) as sp:
        assert sp.pending() == 0
    assert received(r.cfg, P104)["runs"] == 0 and received(r.cfg, P104)["refused"]["count"] == 1


def send_until_answered(port: int, header: bytes, piece: bytes, total: int) -> tuple[int, bytes]:
    """POST `piece` repeatedly up to `total` bytes, stopping as soon as the server answers (as
    curl does); return the bytes sent and the answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-lima\r\n"
                  + header + b"\r\n")
        sent = 0
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 30)
            if readable or not writable:
                break
            try:
                sent += s.send(piece)
            except OSError:
                break
        answer = b""
        try:  # the head and the body its Content-Length announces, or what came before a reset
            while not answered_whole(answer) and (more := s.recv(65536)):
                answer += more
        except ConnectionResetError:
            pass
        return sent, answer


def answered_whole(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
              if line.lower().startswith(b"content-length:")]
    return bool(found) and len(body) >= (length[0] if length else 0)

def test_a_100mb_body_is_refused_at_max_body_without_being_sent_whole(tmp_path, running,
                                                                      caplog):
    r = running(make_config(tmp_path, max_body="1M"))
    hundred = 100 << 20
    # Content-Length: refused from the head, before a byte of the body is read
    sent, answer = send_until_answered(
        r.port, b"Content-Length: %d\r\n" % hundred, b"x" * (1 << 16), hundred)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert sent < hundred // 4
    # chunked (a streamed body of unknown size): refused once the count passes max_body.
    # A raw socket, as curl and pScheduler behave: stop sending once an answer comes. (How a
    # requests generator body reacts to an early answer depends on its urllib3: EL9's raises.)
    mib = b"y" * (1 << 20)
    sent, answer = send_until_answered(
        r.port, b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n" % (len(mib), mib), hundred)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"max_body" in answer
    assert sent < hundred // 4
    lines = warnings(caplog)
    assert len(lines) == 2 and all("413" in line for line in lines), lines
    assert r.stop() == Exit.OK


@pytest.mark.parametrize("part", ["head", "body"])
def test_slow_loris_ends_at_the_request_deadline(tmp_path, running, caplog, part):
    """One byte at a time, each well within a per-recv timeout: the request's deadline ends it."""
    r = running(make_config(tmp_path, request_timeout="1s"))
    body = b"{}" * 150
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-lima\r\n"
            b"X-Pad: %s\r\nContent-Length: %d\r\n\r\n" % (b"p" * 200, len(body)))
    data = head if part == "head" else body
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        if part == "body":
            s.sendall(head)
        sent = 0
        while sent < len(data):  # 300 bytes, one per 50 ms: 15 s against a deadline of 1 s
            readable, _, _ = select.select([s], [], [], 0.05)
            if readable:
                break
            try:
                sent += s.send(data[sent:sent + 1])
            except OSError:
                break
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    # Ended in the middle of the drip: a timeout per recv (each byte came in time) would not.
    assert sent < len(data)
    lines = warnings(caplog)
    assert len(lines) == 1 and "within 1s" in lines[0]
    assert r.stop() == Exit.OK


# --- TLS, client certificates, configuration


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = tlsutil.make_pki(tmp_path_factory.mktemp("pki"))
    now = dt.datetime.now(dt.timezone.utc)
    year = (now - dt.timedelta(days=1), now + dt.timedelta(days=365))
    for stem, name in (("lima", LIMA), ("stranger", "stranger.example.org")):
        tlsutil._Crypto().issue(p.dir, stem, name, "ca", year, names=(name,), client=True)
    return p


def test_tls_with_client_certificates_names_the_pushing_host(bus, tmp_path, running, caplog, pki):
    conf = make_config(tmp_path, bus.exchange, tokens={}, plain_http="no",
                       certificate=pki.server_cert, key=pki.server_key, client_ca=pki.ca)
    r = running(conf)
    assert r.url.startswith("https://")
    _name, run = next((n, x) for n, x in runs() if convert.agent(x) == LIMA)
    post = {"json": run, "verify": str(pki.ca), "timeout": 30}
    lima = (str(pki.dir / "lima.crt"), str(pki.dir / "lima.key"))
    assert requests.post(r.url, cert=lima, **post).status_code == 200
    # the certificate, not the record, says who pushes
    caplog.clear()
    stranger = (str(pki.dir / "stranger.crt"), str(pki.dir / "stranger.key"))
    ans = requests.post(r.url, cert=stranger, **post)
    assert ans.status_code == 403 and "unknown host stranger.example.org" in ans.text
    assert len(warnings(caplog)) == 1
    caplog.clear()
    with pytest.raises(requests.exceptions.RequestException):  # no client certificate
        requests.post(r.url, **post)
    with pytest.raises(requests.exceptions.RequestException):  # one from another CA
        requests.post(r.url, cert=(str(pki.wrong_client_cert), str(pki.wrong_client_key)), **post)
    assert r.stop() == Exit.OK  # connections joined: their lines are out
    lines = warnings(caplog)
    assert len(lines) == 2 and all("TLS handshake failed" in line for line in lines), lines
    assert delivered(bus) == expected(r.cfg, run)


def test_a_tls_handshake_that_never_comes_ends_at_the_deadline(tmp_path, running, caplog, pki):
    r = running(make_config(tmp_path, plain_http="no", certificate=pki.server_cert,
                            key=pki.server_key, request_timeout="1s"))
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and no more
        s.settimeout(30)  # a bound for a server that never ends it (the test then fails)
        assert s.recv(4096) == b""  # closed by the receiver
    assert r.stop() == Exit.OK
    lines = warnings(caplog)
    assert len(lines) == 1 and "no TLS handshake within the deadline" in lines[0]


def test_a_token_must_fit_the_client_certificate(tmp_path, running, pki):
    r = running(make_config(tmp_path, plain_http="no", certificate=pki.server_cert,
                            key=pki.server_key, client_ca=pki.ca))
    lima = (str(pki.dir / "lima.crt"), str(pki.dir / "lima.key"))
    ans = requests.post(r.url, data=b"{}", headers=bearer(P104), cert=lima, verify=str(pki.ca),
                        timeout=30)
    assert ans.status_code == 403 and "client certificate names lima-perfsonar-vm" in ans.text
    assert r.stop() == Exit.OK


@pytest.mark.parametrize("which", ["certificate", "key"])
def test_an_unreadable_certificate_or_key_is_a_config_error_naming_the_file(tmp_path, running,
                                                                         caplog, pki, which):
    files = {"certificate": pki.server_cert, "key": pki.server_key}
    files[which] = tmp_path / "missing.pem"
    r = running(make_config(tmp_path, plain_http="no", **files))
    assert r.status == Exit.CONFIG and r.port is None
    errors = [x.getMessage() for x in caplog.records if x.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(tmp_path / "missing.pem") in errors[0] \
        and f"[receive] {which}" in errors[0]


def test_the_tokens_file_is_read_again_when_it_changes(tmp_path, running, caplog):
    r = running(make_config(tmp_path))
    tok = Path(r.cfg.receive.tokens)
    run = runs()[0][1]
    assert requests.post(r.url, json=run, headers=bearer(LIMA), timeout=30).status_code == 200
    tok.write_text(f"{LIMA} tok-new\n")
    tok.chmod(0o644)
    st = os.stat(tok)
    os.utime(tok, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new mtime, surely
    caplog.clear()
    assert requests.post(r.url, json=run, headers=bearer(LIMA), timeout=30).status_code == 401
    assert any("readable by others" in w for w in warnings(caplog))
    ans = requests.post(r.url, json=run, headers={"Authorization": "Bearer tok-new"}, timeout=30)
    assert ans.status_code == 200
    assert r.stop() == Exit.OK


def test_the_hosts_sync_keeps_may_push_as_soon_as_sync_json_names_them(tmp_path, running):
    r = running(make_config(tmp_path))
    stranger = {"Authorization": f"Bearer {TOKENS['stranger.example.org']}"}
    run = runs()[0][1]
    assert requests.post(r.url, json=run, headers=stranger, timeout=30).status_code == 403
    sd = r.cfg.collect.state_dir
    for key in ("pushing", "hosts"):  # a testpoint of the meshes; a pulled host (with a port)
        name = "stranger.example.org" + ("" if key == "pushing" else ":8085")
        # an atomic write: a new inode, whatever the clock's granularity (the receiver stats it)
        state.write_json_atomic(state.sync_file(sd), {key: [name]})
        ans = requests.post(r.url, json=run, headers=stranger, timeout=30)
        assert ans.status_code == 200 and ans.json()["host"] == "stranger.example.org"
    state.write_json_atomic(state.sync_file(sd), {"hosts": [], "pushing": []})
    assert requests.post(r.url, json=run, headers=stranger, timeout=30).status_code == 403
    assert r.stop() == Exit.OK
    assert received(r.cfg, "stranger.example.org")["runs"] == 2


# --- the tallies: received.json (totals, the last run, hourly counts) and the metrics file


def test_the_tallies_count_each_hour_and_keep_the_metrics_fresh(bus, tmp_path, running):
    conf = make_config(tmp_path, bus.exchange)
    sd = tmp_path / "state"
    sd.mkdir()
    state.write_json_atomic(state.sync_file(sd), {"hosts": [], "pushing": [LIMA],
                                                  "pushing_since": {LIMA: 1_700_000_000}})
    r = running(conf)
    mine = [run for _, run in runs() if convert.agent(run) == LIMA]
    assert len(mine) >= 2
    for run in mine:
        assert requests.post(r.url, json=run, headers=bearer(LIMA), timeout=30).status_code == 200
    assert requests.post(r.url, data=b"{", headers=bearer(LIMA), timeout=30).status_code == 400
    assert r.stop() == Exit.OK
    t = received(r.cfg, LIMA)
    last = convert.messages(mine[-1], "", r.cfg.collect.chunk_points,
                            event_types=r.cfg.collect.event_types)
    assert t["last"] == {"time": t["last_received"], "points": sum(m.points for m in last),
                         "messages": len(last)}
    # one row per hour (two if the test crossed an hour), summing to the totals
    assert 1 <= len(t["hours"]) <= 2 and all(h[0] % 3600 == 0 for h in t["hours"])
    sums = [sum(col) for col in zip(*t["hours"])][1:]
    assert sums == [t["runs"], t["points"], t["messages"], t["failed_runs"], 1]
    assert t["runs"] == len(mine) and t["refused"]["count"] == 1
    # the metrics file, written with it: not only at the next sync
    prom = (tmp_path / "prom" / metrics.push_file(LIMA)).read_text()
    lab = f'{{host="{LIMA}",kind="push"}}'
    assert f"psprobe_collect_runs_total{lab} {len(mine)}\n" in prom
    assert f"psprobe_collect_messages_published_total{lab} {t['confirmed']}\n" in prom
    assert f"psprobe_receive_listed_timestamp_seconds{lab} 1700000000\n" in prom


def test_hourly_counts_roll_over_stay_bounded_and_an_older_file_carries_on(tmp_path):
    sd = tmp_path / "state"
    state.host_dir(sd, LIMA).mkdir(parents=True)
    # a received.json of before the hourly counts: its totals go on, its history starts now
    state.write_json_atomic(state.host_file(sd, LIMA, state.RECEIVED), {
        "first_received": 1.0, "last_received": 2.0, "newest_ts": 1, "runs": 5, "points": 50,
        "messages": 5, "confirmed": 5, "failed_runs": 0, "last_failure": None, "refused": None},
        root=sd)
    old = metrics.read_received(str(sd), LIMA)
    assert old["hours"] is None and old["last"] is None and old["runs"] == 5
    assert metrics.received_between(old, 0) is None  # no history, not "none received"
    run = runs()[0][1]
    msgs = convert.messages(run, "", 200)
    tallies = receive.Tallies(str(sd))
    t0 = 1_800_000_000  # an hour's start
    for i in range(240):  # ten days, one run an hour
        tallies.received(LIMA, msgs, None, t0 + i * 3600 + 10)
    now = t0 + 239 * 3600 + 20
    tallies.received(LIMA, msgs, "ping failed", now)  # the same hour: the same row
    tallies.refused(LIMA, "401 no bearer token", now)
    tallies.flush()
    rec = metrics.read_received(str(sd), LIMA)
    points = sum(m.points for m in msgs)
    assert rec["runs"] == 5 + 241 and rec["points"] == 50 + 241 * points
    assert rec["last"] == {"time": now, "points": points, "messages": len(msgs)}
    hours = rec["hours"]
    assert len(hours) == receive.KEEP // 3600  # 8 days of rows, the older ones dropped
    assert hours[0][0] == t0 + 48 * 3600 and hours[-1] == [t0 + 239 * 3600, 2, 2 * points,
                                                           2 * len(msgs), 1, 1]
    # the last 24 h, to the hour: the 25 rows that overlap them
    day = metrics.received_between(rec, now - 86400)
    assert day == {"runs": 26, "points": 26 * points, "messages": 26 * len(msgs),
                   "failed_runs": 1, "refused": 1}


# --- the process: socket activation, SIGTERM, kill -9


def _activated(conf: Path) -> tuple[subprocess.Popen, int]:
    """``psprobe receive`` under systemd-socket-activate: started by the first connection."""
    port = closed_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JOURNAL_STREAM", None)
    p = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", sys.executable,
                          "-m", "psprobe", "--config", str(conf), "receive"],
                         stderr=subprocess.PIPE, text=True, env=env)
    assert "Listening on" in p.stderr.readline()  # the socket is there: connections wait in it
    return p, port


needs_activate = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v systemd-socket-activate"],
                   capture_output=True).returncode != 0, reason="no systemd-socket-activate")


def push_every_record(cfg, port: int) -> list:
    """Push each real record once (shared token), each answered 200: the messages expected."""
    want = []
    for _, run in runs():
        ans = requests.post(f"http://127.0.0.1:{port}/", json=run, headers=bearer("*"), timeout=30)
        assert ans.status_code == 200
        want += expected(cfg, run)
    return want


@needs_activate
def test_socket_activation_then_sigterm_delivers_everything_and_exits_0(bus, tmp_path):
    conf = make_config(tmp_path, bus.exchange)
    cfg = config.load(str(conf))
    p, port = _activated(conf)
    try:
        want = push_every_record(cfg, port)
    finally:
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
    assert p.returncode == 0, err
    assert "SIGTERM" in err and "(at exit)" in err
    assert delivered(bus) == want
    assert received(cfg, LIMA)["confirmed"] > 0


@needs_activate
def test_kill_9_loses_nothing_that_was_acknowledged(bus, tmp_path, running):
    conf = make_config(tmp_path, bus.exchange,
                       broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F")
    cfg = config.load(str(conf))
    p, port = _activated(conf)
    try:
        want = push_every_record(cfg, port)
    finally:
        p.kill()
        p.communicate(timeout=60)
    r = running(make_config(tmp_path, bus.exchange))
    assert r.stop() == Exit.OK
    assert delivered(bus) == want
