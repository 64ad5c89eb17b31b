"""``psprobe report``: the weekly service-performance report, printed or mailed.

Built from the same state as ``psprobe status`` (run histories, checkpoints,
sync's record of added and removed hosts), so the two never disagree.  How a
report leaves is an *emitter* (as in dnf-automatic): one small interface,
``emit(output)``, with one implementation that prints and one that mails
through ``[report] smtp_host``.  A new way out (a webhook, a file) is one more
class, and building the report knows nothing about any of them.

Hosts that push to ``psprobe receive`` have rows like the others, marked
``(push)``: runs are pushes (ok: received, failed: refused), counted from the
hourly rows of their ``received.json`` (the hours that overlap the period: to
the hour).  A file written before receive kept those rows gives its totals
instead, when something came in the period.  Their points are not in the
per-event-type table (receive counts points per host, not per type).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from psprobe import config, history, metrics, status
from psprobe.config import Config

log = logging.getLogger("psprobe.report")

WORST_LAGS = 10


class ReportError(Exception):
    """The report could not be delivered; one line."""


@dataclass
class HostLine:
    host: str
    health: str
    runs: int
    ok: int
    failed: int
    points: int
    messages: int
    lag: float | None
    last_error: str | None
    last_error_time: float | None
    kind: str = "pull"  # or "push" (see the module's docstring)
    failed_tests: int = 0  # push: runs received whose test failed

    @property
    def state(self) -> str:
        return f"{self.health} (push)" if self.kind == "push" else self.health

    @property
    def success_rate(self) -> float | None:
        return None if not self.runs else self.ok / self.runs


@dataclass
class Report:
    since: float
    until: float
    collector: str  # this machine
    lag_alarm: float
    hosts: list[HostLine]
    by_type: dict[str, int]
    added: list[tuple[float, str]]
    removed: list[tuple[float, str]]
    backfills: int = 0
    backfill_points: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # health -> hosts now
    shard: str | None = None  # [mesh] shard: which shard this machine is (status.shard_line)

    @property
    def runs(self) -> int:
        return sum(h.runs for h in self.hosts)

    @property
    def ok(self) -> int:
        return sum(h.ok for h in self.hosts)

    @property
    def points(self) -> int:
        return sum(h.points for h in self.hosts)

    @property
    def messages(self) -> int:
        return sum(h.messages for h in self.hosts)

    @property
    def collected(self) -> list[HostLine]:
        return [h for h in self.hosts if h.ok]

    @property
    def failures(self) -> list[HostLine]:
        return sorted((h for h in self.hosts if h.failed),
                      key=lambda h: (-h.failed, -(h.last_error_time or 0), h.host))

    @property
    def worst_lags(self) -> list[HostLine]:
        lagged = [h for h in self.hosts if h.lag is not None and h.health != "disabled"]
        return sorted(lagged, key=lambda h: -(h.lag or 0))[:WORST_LAGS]


def build(cfg: Config, since: float, *, now: float | None = None) -> Report:
    """The report of ``[since, now]`` from the state directory."""
    now = time.time() if now is None else now
    ov = status.overview(cfg, now=now)  # systemd's view too, when it runs the units
    sd = cfg.collect.state_dir
    lines, by_type = [], {}
    backfills = backfill_points = 0
    for h in ov.hosts:
        if h.kind == "push":
            lines.append(_push_line(h, since, now))
            continue
        runs = [r for r in history.load(sd, h.host) if r.get("end", 0) >= since]
        regular = [r for r in runs if history.is_regular(r)]
        failed = [r for r in regular if r.get("status")]
        for r in runs:
            for et, n in (r.get("by_type") or {}).items():
                by_type[et] = by_type.get(et, 0) + int(n)
            if history.is_backfill(r):
                backfills += 1
                backfill_points += int(r.get("points") or 0)
        lines.append(HostLine(
            host=h.host, health=h.health, runs=len(regular), ok=len(regular) - len(failed),
            failed=len(failed), points=sum(int(r.get("points") or 0) for r in runs),
            messages=sum(int(r.get("messages") or 0) for r in runs), lag=h.lag,
            last_error=failed[-1].get("error") if failed else None,
            last_error_time=failed[-1].get("end") if failed else None))
    lines.sort(key=lambda x: (x.success_rate if x.success_rate is not None else 2.0, x.host))
    added, removed = [], []
    for c in (ov.sync or {}).get("changes", []):
        if isinstance(c, dict) and c.get("time", 0) >= since:
            added += [(c["time"], h) for h in c.get("added", [])]
            removed += [(c["time"], h) for h in c.get("removed", [])]
    return Report(since=since, until=now, collector=socket.gethostname(),
                  lag_alarm=cfg.report.lag_alarm, hosts=lines,
                  by_type=dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
                  added=added, removed=removed, backfills=backfills,
                  backfill_points=backfill_points, counts=ov.counts(),
                  shard=status.shard_line(ov) if ov.shard else None)


def _push_line(h: status.HostStatus, since: float, until: float) -> HostLine:
    """A pushing host's line: the hours of the period in its received.json."""
    r = h.received or {}
    refused = r.get("refused") or {}
    c = metrics.received_between(r, since, until)
    if c is None:  # a file of before the hourly rows: its totals, if the period saw any
        got = (r.get("last_received") or 0) >= since
        c = {"runs": r.get("runs", 0), "points": r.get("points", 0),
             "messages": r.get("confirmed", 0), "failed_runs": r.get("failed_runs", 0)} if got \
            else dict.fromkeys(("runs", "points", "messages", "failed_runs"), 0)
        c["refused"] = refused.get("count", 0) if (refused.get("last_time") or 0) >= since else 0
    failed = c["refused"]
    return HostLine(
        host=h.host, health=h.health, runs=c["runs"] + failed, ok=c["runs"], failed=failed,
        points=c["points"], messages=c["messages"], lag=h.lag,
        last_error=refused.get("last_reason") if failed else None,
        last_error_time=refused.get("last_time") if failed else None, kind="push",
        failed_tests=c["failed_runs"])


# --- rendering


def _utc(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _rate(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.1f}%"


def subject(rep: Report) -> str:
    c = rep.counts
    return (f"psprobe report {rep.collector}: {len(rep.collected)}/{len(rep.hosts)} hosts collected, "
            f"{c.get('failing', 0)} failing, {c.get('lagging', 0)} lagging "
            f"({time.strftime('%Y-%m-%d', time.gmtime(rep.since))} to "
            f"{time.strftime('%Y-%m-%d', time.gmtime(rep.until))})")


def _sections(rep: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table: text and HTML render the same thing."""
    out = [
        ("Success rate per host (worst first)",
         ["host", "state", "runs", "ok", "failed", "success", "points", "messages", "lag"],
         [[h.host, h.state, str(h.runs), str(h.ok), str(h.failed), _rate(h.success_rate),
           str(h.points), str(h.messages), status.span(h.lag)] for h in rep.hosts]),
        ("Points per event type", ["event type", "points"],
         [[et, str(n)] for et, n in rep.by_type.items()]),
        (f"Worst lags (alarm at {status.span(rep.lag_alarm)})", ["host", "lag", "state"],
         [[h.host, status.span(h.lag), h.state] for h in rep.worst_lags]),
        ("Hosts added and removed by sync", ["when", "change", "host"],
         [[_utc(t), "added", h] for t, h in rep.added]
         + [[_utc(t), "removed", h] for t, h in rep.removed]),
        ("Failures (last error of each host)", ["host", "failed runs", "last failure", "last error"],
         [[h.host, str(h.failed), _utc(h.last_error_time), h.last_error or "-"]
          for h in rep.failures]),
    ]
    return out


def _intro(rep: Report) -> list[str]:
    c = rep.counts
    now_parts = ", ".join(f"{c[k]} {k}" for k in status.HEALTH_ORDER if c.get(k))
    lines = [
        f"psprobe on {rep.collector}, {_utc(rep.since)} to {_utc(rep.until)}",
        *([f"This machine is {rep.shard}"] if rep.shard else []),
        f"Hosts: {len(rep.hosts)} known, {len(rep.collected)} collected in the period; "
        f"now {now_parts or 'none'}",
        f"Runs: {rep.runs}, {rep.ok} ok ({_rate(rep.ok / rep.runs if rep.runs else None)}); "
        f"{rep.points} points in {rep.messages} messages",
    ]
    if rep.backfills:
        lines.append(f"Backfills: {rep.backfills} ({rep.backfill_points} points)")
    push = [h for h in rep.hosts if h.kind == "push" and h.health != "disabled"]  # listed now
    if push:
        lines.append(f"Pushing hosts: {len(push)} (psprobe receive; runs are pushes, failed ones "
                     "refused; counted by the hour)")
    return lines


def render_text(rep: Report) -> str:
    lines = [*_intro(rep)]
    for title, header, rows in _sections(rep):
        lines += ["", title]
        if not rows:
            lines.append("  (none)")
            continue
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines) + "\n"


def render_html(rep: Report) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>{e(subject(rep))}</title>",
             "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:2px 8px;text-align:left}</style></head><body>",
             f"<h1>{e(subject(rep))}</h1>"]
    parts += [f"<p>{e(line)}</p>" for line in _intro(rep)]
    for title, header, rows in _sections(rep):
        parts.append(f"<h2>{e(title)}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def to_json(rep: Report) -> dict[str, Any]:
    d = dataclasses.asdict(rep)
    for h, line in zip(d["hosts"], rep.hosts):
        h["success_rate"] = line.success_rate
    d.update(runs=rep.runs, ok=rep.ok, points=rep.points, messages=rep.messages,
             collected=[h.host for h in rep.collected], subject=subject(rep))
    return d


# --- emitters


@dataclass(frozen=True)
class Output:
    subject: str
    fmt: str  # text, html or json: what ``body`` is
    body: str
    text: str  # the plain-text report (the mail's text part whatever fmt is)


def render(rep: Report, fmt: str) -> Output:
    text = render_text(rep)
    body = {"text": lambda: text, "html": lambda: render_html(rep),
            "json": lambda: json.dumps(to_json(rep), indent=2, sort_keys=True) + "\n"}[fmt]()
    return Output(subject(rep), fmt, body, text)


class Emitter(Protocol):
    """Where a report goes.  ``emit`` raises ReportError when it could not go there."""

    def emit(self, out: Output) -> None: ...


class PrintEmitter:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, out: Output) -> None:
        self.stream.write(out.body)
        self.stream.flush()


class MailEmitter:
    """One message to ``to`` through ``[report]``'s SMTP server (STARTTLS, login)."""

    def __init__(self, settings: config.Report, to: tuple[str, ...] | list[str]) -> None:
        if not to:
            raise ReportError("no recipient: give --to or set [report] to")
        if settings.smtp_user and not settings.starttls and not _loopback(settings.smtp_host):
            raise ReportError("[report] smtp_user is set without starttls = yes: the password "
                              "would cross the network in clear")
        self.settings, self.to = settings, tuple(to)

    def message(self, out: Output):
        from email.message import EmailMessage
        from email.utils import formatdate, make_msgid

        msg = EmailMessage()
        msg["Subject"] = out.subject
        msg["From"] = self.settings.sender
        msg["To"] = ", ".join(self.to)
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.settings.sender.rpartition("@")[2] or None)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
        msg.set_content(out.text)
        if out.fmt == "html":
            msg.add_alternative(out.body, subtype="html")
        elif out.fmt == "json":
            msg.add_attachment(out.body.encode(), maintype="application", subtype="json",
                               filename="psprobe-report.json")
        return msg

    def emit(self, out: Output) -> None:
        import smtplib
        import ssl

        s = self.settings
        msg = self.message(out)
        where = f"{s.smtp_host}:{s.smtp_port}"
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=60) as smtp:
                smtp.ehlo()
                if s.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if s.smtp_user:
                    password = config.read_secret(s.smtp_password_file, "[report] smtp_password_file") \
                        if s.smtp_password_file else ""
                    smtp.login(s.smtp_user, password)
                refused = smtp.send_message(msg)
        except config.ConfigError as e:
            raise ReportError(str(e)) from None
        except (smtplib.SMTPException, OSError) as e:
            text = str(e).replace("\n", " ") or type(e).__name__
            raise ReportError(f"mail to {', '.join(self.to)} via {where} failed: {text}") from None
        if refused:
            raise ReportError(f"mail via {where}: refused for {', '.join(sorted(refused))}")
        log.info("report: mailed to %s via %s", ", ".join(self.to), where)


def _loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1", "[::1]")
