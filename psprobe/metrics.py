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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from psprobe import exits, history, hostnames, state

log = logging.getLogger("psprobe.metrics")

HOST_PREFIX = "psprobe_host_"
SYNC_FILE = "psprobe_sync.prom"

# name -> (type, help); identical in every file, as node_exporter merges them.
HOST_METRICS = {
    "psprobe_collect_last_run_timestamp_seconds": (
        "gauge", "When the last collect of the host ended."),
    "psprobe_collect_last_success_timestamp_seconds": (
        "gauge", "When the last successful collect of the host ended."),
    "psprobe_collect_last_status": (
        "gauge", f"Exit status of the last collect ({exits.describe(exits.RUN)})."),
    "psprobe_collect_duration_seconds": ("gauge", "Duration of the last collect."),
    "psprobe_collect_lag_seconds": (
        "gauge", "End of the last collect minus the newest point the broker confirmed."),
    "psprobe_collect_newest_point_timestamp_seconds": (
        "gauge", "Timestamp of the newest point the broker confirmed (for time() - x alerts)."),
    "psprobe_collect_points_published_total": (
        "counter", "Points published and confirmed (collects and backfills)."),
    "psprobe_collect_messages_published_total": (
        "counter", "Messages published and confirmed (collects and backfills)."),
    "psprobe_collect_runs_total": ("counter", "Collects run."),
    "psprobe_collect_failures_total": ("counter", "Collects that failed."),
    "psprobe_collect_unroutable_messages": (
        "gauge", "Messages of the last collect the broker returned unroutable (no queue bound "
        "for their routing key), by routing key; dropped unless [broker] unroutable = fail. "
        "No sample when there were none."),
}
SYNC_METRICS = {
    "psprobe_sync_hosts": ("gauge", "Hosts the meshes name (timers enabled)."),
    "psprobe_sync_failed_meshes": ("gauge", "Meshes the last sync could not read."),
    "psprobe_sync_last_run_timestamp_seconds": ("gauge", "When the last sync ran."),
    "psprobe_sync_last_success_timestamp_seconds": (
        "gauge", "When a sync last read every mesh."),
}


def host_file(host: str) -> str:
    return f"{HOST_PREFIX}{hostnames.unit_instance(host)}.prom"


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
    if not directory:
        return
    for h in hosts:
        with contextlib.suppress(OSError):
            (Path(directory) / host_file(h)).unlink()


def write_sync(directory: str, rec: dict[str, Any]) -> bool:
    """After a sync: host count, failed meshes, last run and last success."""
    if not directory:
        return False
    vals: list[tuple[str, dict[str, str], float]] = [
        ("psprobe_sync_hosts", {}, len(rec.get("hosts", []))),
        ("psprobe_sync_failed_meshes", {}, len(rec.get("failed_meshes", []))),
        ("psprobe_sync_last_run_timestamp_seconds", {}, rec.get("last_run", 0)),
    ]
    if rec.get("last_success") is not None:
        vals.append(("psprobe_sync_last_success_timestamp_seconds", {}, rec["last_success"]))
    return _write(directory, SYNC_FILE, render(SYNC_METRICS, vals))
