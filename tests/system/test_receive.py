"""A testpoint's push under the real systemd: the socket starts the receiver (issue 14).

As an operator would: psprobe installed as the package lays it out, [receive] set,
``systemctl enable --now psprobe-receive.socket`` and nothing else.  Then a real
run record, as pScheduler's http archiver sends it, is PUT to the port: systemd
starts psprobe-receive.service with that socket, the answer is 2xx, and the run's
messages (the ids psprobe.convert gives it) are on a queue bound to the exchange.

The container shares the host's network, so the socket listens on a free loopback
port through a drop-in (``systemctl edit psprobe-receive.socket``), never on the
host's 8443.  Plain HTTP (``[receive] plain_http``): TLS is tested in the receiver's
own tests; here it is systemd's part that is under test.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import requests
from ports import free_port  # tests/ is on sys.path
from tlsutil import make_pki  # tests/ is on sys.path (tests/conftest.py)

from psprobe import config, convert

from .conftest import BASE_CONFIG
from .container import REPO, Container, wait_until
from .test_systemd import Bus

RECORD = REPO / "tests" / "fixtures" / "pushed" / "real" / "rtt__ping_1.1.1.1.json"  # a real one
SOCKET = "psprobe-receive.socket"
SERVICE = "psprobe-receive.service"
DROPIN = f"/etc/systemd/system/{SOCKET}.d/50-test-port.conf"
TOKENS = "/etc/psprobe/tokens"
# README, "Testpoints that push", TLS: psprobe's own copy of the root-only host key, made
# at every start by a drop-in ("+": that one command as root, outside the sandbox).
KEY_COPY = "/etc/psprobe/tls/hostkey.pem"
KEY_COPY_DROPIN = f"/etc/systemd/system/{SERVICE}.d/50-hostkey.conf"
KEY_COPY_EXEC = ("ExecStartPre=+/usr/bin/install -m 0640 -o root -g psprobe "
                 f"/etc/grid-security/hostkey.pem {KEY_COPY}")
TOKEN = uuid.uuid4().hex



@dataclass
class Push:
    c: Container
    q: Bus
    port: int
    run: dict
    body: bytes

    def put(self, scheme: str = "http", verify: bool | str = True) -> requests.Response:
        return requests.put(f"{scheme}://127.0.0.1:{self.port}/", data=self.body, timeout=120,
                            verify=verify, headers={"Content-Type": "application/json",
                                                    "Authorization": f"Bearer {TOKEN}"})

    def configure(self, receive: str) -> None:
        """psprobe.conf with the test's broker exchange and this [receive] section."""
        self.c.write("/etc/psprobe/psprobe.conf",
                     f"{BASE_CONFIG}\n[broker]\nurl = amqp://guest@127.0.0.1:5672/%2F\n"
                     f"exchange = {self.q.exchange}\n\n[receive]\n{receive}",
                     mode=0o640, owner="root:psprobe")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        cp = self.c.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)

    @property
    def cfg(self) -> config.Config:
        """The receiver's configuration, read as it reads it."""
        return config.load(str(self.c.path("/etc/psprobe/psprobe.conf")))

    @property
    def prefix(self) -> str:
        return self.cfg.broker.routing_key_prefix

    def expected(self) -> dict[str, str]:
        """message id -> routing key, as the pushed run converts under the receiver's
        configuration (only [collect] event_types, as the pull path publishes)."""
        cfg = self.cfg
        msgs = convert.messages(self.run, self.prefix, cfg.collect.chunk_points,
                                event_types=cfg.collect.event_types)
        return {m.message_id: m.routing_key for m in msgs}

    def arrived(self, want: dict[str, str], since: int = 0) -> dict[str, str]:
        """Wait until every wanted message id is on the queue (among the messages after the
        first ``since``); what came, id -> key."""

        def came() -> dict[str, str]:
            return {mid: key for key, mid, _ in self.q.messages()[since:]}

        def all_there() -> dict[str, str] | None:
            got = came()
            return got if set(want) <= set(got) else None

        try:
            return wait_until("the pushed run's messages on the queue", all_there, 60, interval=0.2)
        except TimeoutError:
            got = came()
            raise AssertionError(f"wanted {want}, the queue has {got}; the receiver's journal:\n"
                                 f"{self.c.journal(SERVICE)[-3000:]}") from None


@pytest.fixture(scope="module")
def push(container: Container) -> Iterator[Push]:
    c = container
    run = json.loads(RECORD.read_text())
    agent = convert.agent(run)
    assert agent, "the record names its measurement agent"
    q = Bus()
    port = free_port()
    c.write(TOKENS, f"{agent} {TOKEN}\n", mode=0o640, owner="root:psprobe")
    p = Push(c, q, port, run, RECORD.read_bytes())
    p.configure(f"plain_http = yes\nhosts = {agent}\ntokens = {TOKENS}\n")
    c.write(DROPIN, f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
    c.systemctl("daemon-reload", check=True)
    try:
        yield p
    finally:
        print(f"journal of {SERVICE}:\n{c.journal(SERVICE)[-4000:]}", file=sys.stderr)
        c.systemctl("disable", "--now", SOCKET)
        c.systemctl("stop", SERVICE)
        c.systemctl("reset-failed", SOCKET, SERVICE)
        c.run(["rm", "-rf", str(Path(DROPIN).parent), str(Path(KEY_COPY_DROPIN).parent), TOKENS,
               "/var/lib/psprobe/spool", f"/var/lib/psprobe/hosts/{agent}", "/etc/grid-security",
               str(Path(KEY_COPY).parent)])
        c.write("/etc/psprobe/psprobe.conf", BASE_CONFIG, mode=0o640, owner="root:psprobe")
        c.systemctl("daemon-reload")
        q.close()


def test_enabling_the_socket_listens_and_starts_nothing(push):
    p = push
    p.c.systemctl("enable", "--now", SOCKET, check=True)
    assert p.c.systemctl("is-enabled", SOCKET).stdout.strip() == "enabled"
    sock = p.show(SOCKET, "ActiveState", "SubState", "Listen")
    assert (sock["ActiveState"], sock["SubState"]) == ("active", "listening"), sock
    assert sock["Listen"] == f"127.0.0.1:{p.port} (Stream)"
    svc = p.show(SERVICE, "ActiveState", "ExecMainStartTimestampMonotonic")
    assert svc["ActiveState"] == "inactive"
    assert svc["ExecMainStartTimestampMonotonic"] == "0", "started before any push"


def test_the_first_push_starts_the_receiver_which_publishes_the_run(push):
    p = push
    want = p.expected()
    assert want, "the record converts to at least one message"
    r = p.put()
    assert 200 <= r.status_code < 300, (r.status_code, r.text)
    svc = p.show(SERVICE, "ActiveState", "TriggeredBy", "MainPID", "ControlGroup", "NRestarts")
    print(f"{SERVICE} after the first push: {svc}", file=sys.stderr)
    assert svc["ActiveState"] == "active"
    assert svc["TriggeredBy"] == SOCKET
    assert svc["ControlGroup"].endswith(f"/psprobe.slice/{SERVICE}")
    assert svc["NRestarts"] == "0"
    # As the unprivileged account, with no capability: systemd passed it the socket.
    text = p.c.run(["cat", f"/proc/{svc['MainPID']}/status"], check=True).stdout
    proc = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    uid = p.c.run(["id", "-u", "psprobe"], check=True).stdout.strip()
    assert proc["Uid"].split()[:2] == [uid, uid]
    assert int(proc["CapEff"], 16) == 0 and int(proc["CapBnd"], 16) == 0

    got = p.arrived(want)
    assert got == want, "exactly the run's messages, each once, under its routing key"
    assert len(p.q.messages()) == len(want)
    for key, _mid, body in p.q.messages():
        assert key == p.prefix + body["meta"]["event-type"]
        assert body["meta"]["measurement_agent"] and body["datapoints"]


def test_a_stopped_receiver_is_started_again_by_the_next_push(push):
    """Stopped (an upgrade, an operator), the socket stays: the next push starts it again,
    and the same run pushed twice (a pScheduler retry) carries the same message ids."""
    p = push
    p.c.systemctl("stop", SERVICE, check=True)
    assert p.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert p.show(SOCKET, "SubState")["SubState"] == "listening"
    before = len(p.q.messages())
    r = p.put()
    assert 200 <= r.status_code < 300, (r.status_code, r.text)
    assert p.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    want = p.expected()
    assert p.arrived(want, since=before) == want  # the second push's: the same ids


# --- TLS with the host key, as the README says to set it up


def test_a_root_only_host_key_fails_the_receiver_once_and_its_socket_within_bounds(push, tmp_path):
    """The usual /etc/grid-security/hostkey.pem (root, 0400) is unreadable for psprobe: exit
    78, never restarted, and the start limit (5 in 10 min) fails the socket too instead of
    starting the receiver again for every push."""
    p, c = push, push.c
    pki = make_pki(tmp_path / "pki")
    c.write("/etc/grid-security/hostcert.pem", pki.server_cert.read_text(), mode=0o444)
    c.write("/etc/grid-security/hostkey.pem", pki.server_key.read_text(), mode=0o400)
    c.systemctl("stop", SERVICE, check=True)
    p.configure(f"hosts = {convert.agent(p.run)}\ntokens = {TOKENS}\n")  # TLS, default paths
    with pytest.raises(requests.exceptions.RequestException):
        p.put("https", verify=str(pki.ca))  # the socket closes under the waiting push

    def socket_failed() -> dict | None:
        st = p.show(SOCKET, "ActiveState", "Result")
        return st if st["ActiveState"] == "failed" else None

    sock = wait_until("the socket failed by the start limit", socket_failed, 60)
    assert sock["Result"] == "service-start-limit-hit", sock
    svc = p.show(SERVICE, "ExecMainStatus", "NRestarts")
    assert svc["ExecMainStatus"] == "78" and svc["NRestarts"] == "0", svc
    journal = c.journal(SERVICE)
    assert "/etc/grid-security/hostkey.pem: [receive] key: cannot read: Permission denied" in journal
    # Bounded by StartLimitBurst=5 (which counts this module's earlier starts too).
    assert 1 <= journal.count("cannot read: Permission denied") <= 5, journal
    assert "Start request repeated too quickly" in journal


def test_the_documented_key_copy_gives_the_receiver_tls(push, tmp_path):
    """README: /etc/psprobe/tls, [receive] key = the copy, and a drop-in that copies the key
    at every start: the receiver answers over TLS with the host certificate."""
    p, c = push, push.c
    pki = make_pki(tmp_path / "pki")
    c.write("/etc/grid-security/hostcert.pem", pki.server_cert.read_text(), mode=0o444)
    c.write("/etc/grid-security/hostkey.pem", pki.server_key.read_text(), mode=0o400)
    c.run(["install", "-d", "-m", "0750", "-o", "root", "-g", "psprobe",
           str(Path(KEY_COPY).parent)], check=True)
    c.write(KEY_COPY_DROPIN, f"[Service]\n{KEY_COPY_EXEC}\n")
    p.configure(f"key = {KEY_COPY}\nhosts = {convert.agent(p.run)}\ntokens = {TOKENS}\n")
    c.systemctl("daemon-reload", check=True)
    c.systemctl("reset-failed", SOCKET, SERVICE)
    c.systemctl("restart", SOCKET, check=True)
    before = len(p.q.messages())
    r = p.put("https", verify=str(pki.ca))
    assert 200 <= r.status_code < 300, (r.status_code, r.text)
    st = c.run(["stat", "-c", "%U:%G %a", KEY_COPY], check=True).stdout.split()
    assert st == ["root:psprobe", "640"]
    assert f"listening on 127.0.0.1:{p.port} (TLS)" in c.journal(SERVICE)
    want = p.expected()
    assert p.arrived(want, since=before) == want  # the TLS push's


# --- the packaged configuration documents [receive] as psprobe reads it


def test_packaged_conf_documents_every_receive_key_with_its_default(tmp_path):
    """packaging/psprobe.conf shows each [receive] key commented out at its default:
    uncommented, the file must load to exactly config.Receive()."""
    text = (REPO / "packaging" / "psprobe.conf").read_text()
    section = text.split("\n[receive]\n", 1)[1]
    section = re.split(r"^#?\[", section, maxsplit=1, flags=re.M)[0]  # up to the next section
    keys = dict(re.findall(r"^#(\w+) =(.*)$", section, re.M))
    assert sorted(keys) == sorted(f.name for f in fields(config.Receive))
    path = tmp_path / "p.conf"
    path.write_text("[receive]\n" + "".join(f"{k} ={v}\n" for k, v in keys.items()))
    assert config.load(str(path)).receive == config.Receive()
