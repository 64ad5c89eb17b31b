"""Prometheus metrics for node_exporter's textfile collector.

Each collect rewrites ``psprobe_host_<instance>.prom`` and each sync
``psprobe_sync.prom`` in ``[metrics] textfile_dir``: one small file per host,
so a run never reads or rewrites what the other 200 hosts wrote.  Files are
written to a temporary name that does not end in ``.prom`` (node_exporter
skips it) and renamed, so a scrape never sees half a file.  The ``_total``
counters come from the running totals of ``history.json``: they survive the
pruning of old runs and only ever grow.  Metrics are a side channel: a full
disk or a missing directory the operator set is a warning, never a failed run;
the default directory missing (no node_exporter here) is not even that.

A host that pushes to ``psprobe receive`` gets ``psprobe_push_<instance>.prom``
(:func:`write_received`, from its ``received.json``; written by receive as it
counts and by each sync) with the *same* metric names as a collected host and
a ``kind="push"`` label: one dashboard and one alert rule
(``time() - psprobe_collect_newest_point_timestamp_seconds``) cover both kinds.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from psprobe import exits, history, hostnames, state

log = logging.getLogger("psprobe.metrics")

HOST_PREFIX = "psprobe_host_"
PUSH_PREFIX = "psprobe_push_"
SYNC_FILE = "psprobe_sync.prom"

# name -> (type, help); identical in every file, as node_exporter merges them.
HOST_METRICS = {
    "psprobe_collect_last_run_timestamp_seconds": (
        "gauge", "When the last collect of the host ended (kind=push: its last push, accepted or "
        "refused)."),
    "psprobe_collect_last_success_timestamp_seconds": (
        "gauge", "When the last successful collect of the host ended (kind=push: the last run "
        "received)."),
    "psprobe_collect_last_status": (
        "gauge", f"Exit status of the last collect ({exits.describe(exits.RUN)})."),
    "psprobe_collect_duration_seconds": ("gauge", "Duration of the last collect."),
    "psprobe_collect_lag_seconds": (
        "gauge", "End of the last collect minus the newest point the broker confirmed (kind=push: "
        "the last run received minus its newest point)."),
    "psprobe_collect_newest_point_timestamp_seconds": (
        "gauge", "Timestamp of the newest point the broker confirmed (for time() - x alerts)."),
    "psprobe_collect_points_published_total": (
        "counter", "Points published and confirmed (collects and backfills)."),
    "psprobe_collect_messages_published_total": (
        "counter", "Messages published and confirmed (collects and backfills)."),
    "psprobe_collect_runs_total": ("counter", "Collects run (kind=push: runs received)."),
    "psprobe_collect_failures_total": (
        "counter", "Collects that failed (kind=push: pushes refused)."),
    "psprobe_collect_unroutable_messages": (
        "gauge", "Messages of the last collect the broker returned unroutable (no queue bound "
        "for their routing key), by routing key; dropped unless [broker] unroutable = fail. "
        "No sample when there were none."),
}
# A pushing host's file: the collect names above (same HELP: node_exporter merges them)
# and what only a push has.
PUSH_METRICS = {
    **{k: HOST_METRICS[k] for k in (
        "psprobe_collect_last_run_timestamp_seconds", "psprobe_collect_last_success_timestamp_seconds",
        "psprobe_collect_lag_seconds", "psprobe_collect_newest_point_timestamp_seconds",
        "psprobe_collect_points_published_total", "psprobe_collect_messages_published_total",
        "psprobe_collect_runs_total", "psprobe_collect_failures_total")},
    "psprobe_receive_failed_runs_total": (
        "counter", "Runs received whose test failed (published as failures)."),
    "psprobe_receive_listed_timestamp_seconds": (
        "gauge", "When sync first listed the host as pushing (silent since then if it never pushed)."),
}
SYNC_METRICS = {
    "psprobe_sync_hosts": ("gauge", "Hosts the meshes name (timers enabled)."),
    "psprobe_sync_pushing_hosts": ("gauge", "Hosts that push to psprobe receive (no timer)."),
    "psprobe_sync_failed_meshes": ("gauge", "Meshes the last sync could not read."),
    "psprobe_sync_last_run_timestamp_seconds": ("gauge", "When the last sync ran."),
    "psprobe_sync_last_success_timestamp_seconds": (
        "gauge", "When a sync last read every mesh."),
}


def host_file(host: str) -> str:
    return f"{HOST_PREFIX}{hostnames.unit_instance(host)}.prom"


def push_file(host: str) -> str:
    return f"{PUSH_PREFIX}{hostnames.unit_instance(host)}.prom"


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(metrics: dict[str, tuple[str, str]], values: Iterable[tuple[str, dict[str, str], float]]) -> str:
    """Text exposition format: HELP and TYPE once per name, then its samples."""
    by_name: dict[str, list[str]] = {}
    for name, labels, value in values:
        lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        by_name.setdefault(name, []).append(f"{name}{{{lab}}} {_num(value)}" if lab
                                            else f"{name} {_num(value)}")
    out = []
    for name, (kind, text) in metrics.items():
        if name in by_name:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *by_name[name]]
    return "\n".join(out) + "\n"


def host_values(host: str, doc: dict[str, Any]) -> list[tuple[str, dict[str, str], float]]:
    """Samples of one host from its history file (see :func:`psprobe.history.load_doc`)."""
    lab = {"host": host}
    regular = [r for r in doc.get("runs", []) if history.is_regular(r)]
    t = doc.get("totals", {})
    vals: list[tuple[str, dict[str, str], float]] = []
    if regular:
        last = regular[-1]
        vals += [
            ("psprobe_collect_last_run_timestamp_seconds", lab, last.get("end", 0)),
            ("psprobe_collect_last_status", lab, last.get("status", 0)),
            ("psprobe_collect_duration_seconds", lab,
             round(last.get("end", 0) - last.get("start", 0), 3)),
        ]
    if doc.get("last_success") is not None:
        vals.append(("psprobe_collect_last_success_timestamp_seconds", lab, doc["last_success"]))
    newest = history.newest(regular)
    if newest is not None:
        vals.append(("psprobe_collect_newest_point_timestamp_seconds", lab, newest))
        vals.append(("psprobe_collect_lag_seconds", lab,
                     round(max(0.0, regular[-1].get("end", 0) - newest), 3)))
    if regular:
        for key, n in sorted(unroutable(regular[-1]).items()):
            vals.append(("psprobe_collect_unroutable_messages", {**lab, "routing_key": key}, n))
    vals += [
        ("psprobe_collect_points_published_total", lab, t.get("points", 0)),
        ("psprobe_collect_messages_published_total", lab, t.get("messages", 0)),
        ("psprobe_collect_runs_total", lab, t.get("runs", 0)),
        ("psprobe_collect_failures_total", lab, t.get("failures", 0)),
    ]
    return vals


def unroutable(run: dict[str, Any]) -> dict[str, int]:
    """A run's ``"unroutable"`` ({routing key: messages returned}), whatever the file holds."""
    raw = run.get("unroutable")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0}


def timestamp(v: Any) -> float | None:
    """A time from a state file: a finite number, else None."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


# The columns of received.json's "hours": one row per hour a pushing host was heard from.
HOUR_FIELDS = ("start", "runs", "points", "messages", "failed_runs", "refused")


def hours(raw: Any) -> list[list[int]] | None:
    """received.json's ``"hours"``, checked: rows of HOUR_FIELDS (whole numbers, the first an
    hour's start), oldest first; a bad row is left out.  None: a file of before it had them."""
    if not isinstance(raw, list):
        return None
    out = []
    for row in raw:
        if (isinstance(row, list) and len(row) == len(HOUR_FIELDS)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)):
            out.append(list(row))
    return sorted(out)


def last_run(raw: Any) -> dict[str, Any] | None:
    """received.json's ``"last"`` (the last run received: time, points, messages), checked."""
    if not isinstance(raw, dict) or timestamp(raw.get("time")) is None:
        return None
    return {"time": timestamp(raw.get("time")), "points": _count(raw.get("points")),
            "messages": _count(raw.get("messages"))}


def read_received(state_dir: str, host: str) -> dict[str, Any] | None:
    """A pushing host's ``hosts/<host>/received.json`` (psprobe receive's tallies), every
    field checked: an unreadable or torn file is None, a field of the wrong type absent
    (times None, counts 0, ``hours`` None in a file of before them).  What status, report
    and these metrics show."""
    try:
        raw = state.read_json(state.host_file(state_dir, host, state.RECEIVED), root=state_dir)
    except (ValueError, OSError):
        return None
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {k: timestamp(raw.get(k))
                           for k in ("first_received", "last_received", "newest_ts")}
    out.update({k: _count(raw.get(k))
                for k in ("runs", "points", "messages", "confirmed", "failed_runs")})
    lf, rf = raw.get("last_failure"), raw.get("refused")
    out["last_failure"] = {"time": timestamp(lf.get("time")),
                           "error": str(lf.get("error", ""))[:500]} if isinstance(lf, dict) else None
    out["refused"] = {"count": _count(rf.get("count")), "last_time": timestamp(rf.get("last_time")),
                      "last_reason": str(rf.get("last_reason", ""))[:500]} \
        if isinstance(rf, dict) else None
    out["last"] = last_run(raw.get("last"))
    out["hours"] = hours(raw.get("hours"))
    return out


def received_between(rec: dict[str, Any] | None, since: float,
                     until: float | None = None) -> dict[str, int] | None:
    """The HOUR_FIELDS counts of the hours that overlap ``[since, until]`` (to the hour: the
    first hour counts whole), summed; None when the file has no hours (written before them)."""
    rows = (rec or {}).get("hours")
    if rows is None:
        return None
    first = since - 3600
    out = dict.fromkeys(HOUR_FIELDS[1:], 0)
    for row in rows:
        if row[0] > first and (until is None or row[0] <= until):
            for k, v in zip(HOUR_FIELDS[1:], row[1:]):
                out[k] += v
    return out


def received_values(host: str, rec: dict[str, Any] | None,
                    listed: float | None = None) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a pushing host from :func:`read_received`'s record (None: nothing yet)."""
    lab = {"host": host, "kind": "push"}
    r = rec or {}
    last_ok, newest = r.get("last_received"), r.get("newest_ts")
    refused = r.get("refused") or {}
    last_try = max((t for t in (last_ok, refused.get("last_time")) if t is not None), default=None)
    vals: list[tuple[str, dict[str, str], float]] = []
    if last_try is not None:
        vals.append(("psprobe_collect_last_run_timestamp_seconds", lab, last_try))
    if last_ok is not None:
        vals.append(("psprobe_collect_last_success_timestamp_seconds", lab, last_ok))
    if newest is not None:
        vals.append(("psprobe_collect_newest_point_timestamp_seconds", lab, newest))
        if last_ok is not None:
            vals.append(("psprobe_collect_lag_seconds", lab, round(max(0.0, last_ok - newest), 3)))
    vals += [
        ("psprobe_collect_points_published_total", lab, r.get("points", 0)),
        # published = confirmed by the broker, as for a collect
        ("psprobe_collect_messages_published_total", lab, r.get("confirmed", 0)),
        ("psprobe_collect_runs_total", lab, r.get("runs", 0)),
        ("psprobe_collect_failures_total", lab, refused.get("count", 0)),
        ("psprobe_receive_failed_runs_total", lab, r.get("failed_runs", 0)),
    ]
    if listed is not None:
        vals.append(("psprobe_receive_listed_timestamp_seconds", lab, listed))
    return vals


def write_received(directory: str, host: str, rec: dict[str, Any] | None,
                   listed: float | None = None) -> bool:
    """A pushing host's file (no-op when metrics are off); ``listed``: sync.json's
    ``pushing_since`` of the host, when the caller has it."""
    if not directory:
        return False
    return _write(directory, push_file(host), render(PUSH_METRICS, received_values(host, rec, listed)))


def remove_received(directory: str, hosts: Iterable[str]) -> None:
    """Hosts that no longer push here: their series stop."""
    _remove(directory, map(push_file, hosts))


def _remove(directory: str, names: Iterable[str]) -> None:
    if not directory:
        return
    for name in names:
        with contextlib.suppress(OSError):
            (Path(directory) / name).unlink()


def _write(directory: str, name: str, text: str) -> bool:
    """Replace ``directory/name``; False (with a warning) when that is not possible.

    By :func:`psprobe.state.write_atomic`, not durable (the next run rewrites
    the file).  Its temp name ``.<name>.<random>.tmp`` does not end in .prom
    (node_exporter ignores it), and neither it nor the file is written
    through a link (the directory is the operator's).
    """
    d = Path(directory)
    try:
        state.write_atomic(d / name, text.encode(), durable=False)
        return True
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not d.is_dir():
            # The default is node_exporter's directory: on a machine without it, every run
            # would warn about a choice nobody made.
            from psprobe.config import Metrics

            level = logging.DEBUG if str(d) == Metrics().textfile_dir else logging.WARNING
            log.log(level, "[metrics] textfile_dir %s does not exist: metrics not written", d)
        else:
            log.warning("%s: %s; metrics not written", e.filename, e.strerror)
        return False


def write_host(directory: str, host: str, doc: dict[str, Any]) -> bool:
    """After a collect or backfill: rewrite the host's file (no-op when metrics are off)."""
    if not directory:
        return False
    return _write(directory, host_file(host), render(HOST_METRICS, host_values(host, doc)))


def remove_hosts(directory: str, hosts: Iterable[str]) -> None:
    """Hosts that left every mesh: their series stop, rather than freeze at their last value."""
    _remove(directory, map(host_file, hosts))


def write_sync(directory: str, rec: dict[str, Any]) -> bool:
    """After a sync: host count, failed meshes, last run and last success."""
    if not directory:
        return False
    vals: list[tuple[str, dict[str, str], float]] = [
        ("psprobe_sync_hosts", {}, len(rec.get("hosts", []))),
        ("psprobe_sync_pushing_hosts", {}, len(rec.get("pushing") or [])),
        ("psprobe_sync_failed_meshes", {}, len(rec.get("failed_meshes", []))),
        ("psprobe_sync_last_run_timestamp_seconds", {}, rec.get("last_run", 0)),
    ]
    if rec.get("last_success") is not None:
        vals.append(("psprobe_sync_last_success_timestamp_seconds", {}, rec["last_success"]))
    return _write(directory, SYNC_FILE, render(SYNC_METRICS, vals))
