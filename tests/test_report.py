"""psprobe report: contents from real runs and prepared state; mail through a real SMTP server."""

from __future__ import annotations

import email
import email.policy
import json
import ssl
import time
from pathlib import Path

import pytest
import tlsutil
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from conftest import cli_runner
from ports import free_port  # tests/ is on sys.path
from test_status import DOWN_HOST, LAG_HOST, OK_HOST, make_world, prepared, push_world, run, sim  # noqa: F401

from psprobe import config, report, state
from psprobe.cli import main


def cli(conf, *args):
    return cli_runner().invoke(main, ["--config", str(conf), *args])


class Inbox:
    """aiosmtpd handler: every message it accepted, with its envelope."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = Inbox()
    c = Controller(inbox, hostname="127.0.0.1", port=free_port())
    c.start()
    inbox.port = c.port
    yield inbox
    c.stop()


def with_report(conf: Path, **kv) -> Path:
    """Report settings in conf.d/, read after the main file."""
    d = conf.parent / "conf.d"
    d.mkdir(exist_ok=True)
    (d / "report.conf").write_text("[report]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()))
    return conf


# --- contents


def test_report_of_real_runs(tmp_path, sim, bus):  # noqa: F811
    w = make_world(tmp_path / "w", sim, bus.exchange)
    arrived = bus.drain()
    r = cli(w.conf, "report")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Hosts: 3 known, 3 collected in the period; now 1 failing, 1 lagging, 1 ok" in out
    assert f"Runs: 6, 5 ok (83.3%); {sum(len(m.body['datapoints']) for m in arrived)} points " \
           f"in {len(arrived)} messages" in out
    sec = out.split("\n\n")
    rate = next(s for s in sec if s.startswith("Success rate per host")).splitlines()
    assert rate[2].split()[:6] == [DOWN_HOST, "failing", "2", "1", "1", "50.0%"]
    per_type = {}
    for m in arrived:
        et = m.body["meta"]["event-type"]
        per_type[et] = per_type.get(et, 0) + len(m.body["datapoints"])
    types = next(s for s in sec if s.startswith("Points per event type")).splitlines()[2:]
    assert {ln.split()[0]: int(ln.split()[1]) for ln in types} == per_type
    lags = next(s for s in sec if s.startswith("Worst lags")).splitlines()
    assert lags[0] == "Worst lags (alarm at 2h)" and lags[2].split()[0] == LAG_HOST
    fails = next(s for s in sec if s.startswith("Failures")).splitlines()
    assert len(fails) == 3 and fails[2].split()[0] == DOWN_HOST
    assert fails[2].endswith("HTTP 500: Internal Server Error")
    js = json.loads(cli(w.conf, "report", "--format", "json").stdout)
    assert js["points"] == sum(len(m.body["datapoints"]) for m in arrived)
    assert js["by_type"] == per_type and sorted(js["collected"]) == sorted([OK_HOST, LAG_HOST, DOWN_HOST])


def test_window_sync_changes_and_escaping(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {
        "a.example": {"runs": [run(now - 9 * 86400, 1, error="too old"), run(now - 3600, points=40)],
                      "newest": int(now - 100)},
        "b.example": {"runs": [run(now - 7200, 1, error="<script>alert(1)</script> & co"),
                               run(now - 3600, 1, error="second <b>")], "newest": int(now - 50000)},
    })
    cfg = config.load(str(conf))
    state.write_json_atomic(Path(cfg.collect.state_dir) / "sync.json", {
        "last_run": now, "last_success": now, "hosts": ["a.example", "b.example"], "failed_meshes": [],
        "changes": [{"time": now - 10 * 86400, "added": ["ancient.example"], "removed": []},
                    {"time": now - 86400, "added": ["b.example"], "removed": ["gone.example"]}]})
    rep = report.build(cfg, now - 7 * 86400, now=now)
    assert [(h.host, h.runs, h.ok, h.failed, h.points) for h in rep.hosts] == [
        ("b.example", 2, 0, 2, 20), ("a.example", 1, 1, 0, 40)]  # the 9-day-old run is outside
    assert rep.added == [(now - 86400, "b.example")] and rep.removed == [(now - 86400, "gone.example")]
    assert rep.failures[0].last_error == "second <b>"
    assert [h.host for h in rep.worst_lags] == ["b.example", "a.example"]
    text = report.render_text(rep)
    assert "added    b.example" in text and "removed  gone.example" in text and "ancient" not in text
    page = report.render_html(rep)
    assert "<script>" not in page and "&lt;script&gt;" not in page  # only the last error is shown
    assert "second &lt;b&gt;" in page and "<b>" not in page
    assert page.count("<table>") == 5
    assert "Runs: 3, 1 ok (33.3%); 60 points in 3 messages" in text


def test_since_option(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 3 * 3600), run(now - 600)],
                                                  "newest": int(now - 100)}})
    assert "Runs: 1, 1 ok" in cli(conf, "report", "--since", "1h").stdout
    assert "Runs: 2, 2 ok" in cli(conf, "report").stdout
    assert cli(conf, "report", "--since", "soon").exit_code == 2


# --- mail


def test_mail_to_given_addresses_html_with_text_part(tmp_path, smtp):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 600, 1, error="HTTP 500")],
                                                  "newest": int(now - 100)}})
    with_report(conf, smtp_host="127.0.0.1", smtp_port=smtp.port, **{"from": "psprobe@collector.example"})
    r = cli(conf, "report", "--to", "ops@example.org", "--to", "boss@example.org")
    assert r.exit_code == 0, r.output
    assert "mailed to ops@example.org, boss@example.org" in r.output
    [(sender, rcpt, msg)] = smtp.got
    assert sender == "psprobe@collector.example" and rcpt == ["ops@example.org", "boss@example.org"]
    assert msg["From"] == "psprobe@collector.example" and msg["To"] == "ops@example.org, boss@example.org"
    assert msg["Subject"].startswith("psprobe report ") and "0/1 hosts collected, 1 failing" in msg["Subject"]
    assert msg["Date"] and msg["Message-ID"].endswith("@collector.example>")
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "a.example" in text and "HTTP 500" in text and "<table>" in html and "HTTP 500" in html


def test_mail_flag_uses_configured_recipients_and_format(tmp_path, smtp):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 600)], "newest": int(now - 100)}})
    assert cli(conf, "report", "--mail").exit_code == 78  # [report] to is empty: EX_CONFIG
    with_report(conf, smtp_host="127.0.0.1", smtp_port=smtp.port, to="a@example.org, b@example.org")
    r = cli(conf, "report", "--mail", "--format", "text")
    assert r.exit_code == 0, r.output
    [(_, rcpt, msg)] = smtp.got
    assert rcpt == ["a@example.org", "b@example.org"]
    assert msg.get_content_type() == "text/plain" and "Success rate per host" in msg.get_content()
    assert r.stdout == ""  # mailed, not printed
    r = cli(conf, "report", "--mail", "--format", "json")
    msg = smtp.got[-1][2]
    att = next(msg.iter_attachments())
    assert att.get_filename() == "psprobe-report.json" and json.loads(att.get_content())["runs"] == 1


def test_starttls_and_login(tmp_path, monkeypatch):
    pki = tlsutil.make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    logins = []

    def auth(server, session, envelope, mechanism, data):
        logins.append((mechanism, data.login, data.password, session.ssl is not None))
        return AuthResult(success=data.password == b"s3cret", handled=False)  # False: answer 535

    inbox = Inbox()
    c = Controller(inbox, hostname="127.0.0.1", port=free_port(), tls_context=ctx, require_starttls=True,
                   authenticator=auth, auth_required=True)
    c.start()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # the test CA is the system's, for this run
        secret = tmp_path / "smtp.secret"
        secret.write_text("s3cret\n")
        secret.chmod(0o640)
        now = time.time()
        conf = prepared(tmp_path / "s", now, {"a.example": {"runs": [run(now - 60)], "newest": int(now)}})
        with_report(conf, smtp_host="localhost", smtp_port=c.port, starttls="yes", smtp_user="psprobe",
                    smtp_password_file=secret)
        r = cli(conf, "report", "--to", "ops@example.org")
        assert r.exit_code == 0, r.output
        assert logins and logins[-1][1:] == (b"psprobe", b"s3cret", True)
        assert len(inbox.got) == 1
        secret.write_text("wrong\n")
        r = cli(conf, "report", "--to", "ops@example.org")
        assert r.exit_code == 1 and "failed" in r.output and "s3cret" not in r.output
        assert len(inbox.got) == 1
    finally:
        c.stop()


def test_smtp_down_is_one_line_and_exit_1(tmp_path):
    now = time.time()
    conf = prepared(tmp_path, now, {"a.example": {"runs": [run(now - 60)], "newest": int(now)}})
    with_report(conf, smtp_host="127.0.0.1", smtp_port=free_port())
    r = cli(conf, "report", "--to", "ops@example.org")
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1
    assert "report: mail to ops@example.org via 127.0.0.1" in r.output


def test_login_over_clear_text_to_a_remote_server_is_refused():
    s = config.Report(smtp_host="mail.example.org", smtp_user="u")
    with pytest.raises(report.ReportError, match="starttls"):
        report.MailEmitter(s, ["a@example.org"])
    report.MailEmitter(config.Report(smtp_host="localhost", smtp_user="u"), ["a@example.org"])


def test_print_emitter_writes_the_body(tmp_path):
    import io

    out = report.Output("s", "json", '{"x": 1}\n', "text")
    buf = io.StringIO()
    report.PrintEmitter(buf).emit(out)
    assert buf.getvalue() == '{"x": 1}\n'


# --- pushing hosts


def test_pushing_hosts_are_in_the_report_beside_pulled_ones(tmp_path):
    now = time.time()
    _, cfg = push_world(tmp_path, now)  # received.json fixtures: see test_status
    rep = report.build(cfg, now - 7 * 86400, now=now)
    by = {h.host: h for h in rep.hosts}
    # the hours of the week in its received.json, not its totals (1200 runs: one row is older)
    ok = by["p-ok.example"]
    assert (ok.kind, ok.runs, ok.ok, ok.failed, ok.points, ok.messages, ok.failed_tests) == \
        ("push", 1100, 1100, 0, 5000, 1200, 7)
    ref = by["p-refused.example"]  # a refused push is its failed run: 4 of its 5 in the week
    assert (ref.runs, ref.ok, ref.failed, ref.last_error) == (13, 9, 4, "403: wrong token")
    gone = by["p-gone.example"]  # nothing received in the period: nothing counted
    assert (gone.runs, gone.points, gone.health) == (0, 0, "disabled")
    # a file of before the hourly rows: its totals, as something came in the period
    silent = by["p-silent.example"]
    assert (silent.runs, silent.points, silent.messages) == (50, 300, 50)
    # a day: only the rows of that day
    day = {h.host: h for h in report.build(cfg, now - 86400, now=now).hosts}["p-ok.example"]
    assert (day.runs, day.points, day.messages, day.failed_tests) == (200, 900, 200, 1)
    assert by["pulled.example"].kind == "pull"
    assert rep.counts["lagging"] == 2 and rep.counts["failing"] == 1
    assert "1 failing, 2 lagging" in report.subject(rep)
    text = report.render_text(rep)
    row = next(ln.split() for ln in text.splitlines() if ln.strip().startswith("p-silent.example")
               and "%" in ln)
    assert row[:3] == ["p-silent.example", "lagging", "(push)"]
    assert any(ln.split()[:2] == ["p-refused.example", "4"] for ln in text.splitlines())  # failures
    assert "Pushing hosts: 6 (psprobe receive" in text  # p-gone no longer pushes
    js = report.to_json(rep)
    assert {h["host"]: h["kind"] for h in js["hosts"]}["p-ok.example"] == "push"
    # the runs of the period: 1 pulled collect, then every push received or refused
    assert rep.runs == 1 + 1100 + 50 + 13 + 1
