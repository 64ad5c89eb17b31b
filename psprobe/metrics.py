"""Prometheus metrics for node_exporter's textfile collector.

Each collect rewrites ``psprobe_host_<instance>.prom`` and each sync
``psprobe_sync.prom`` in ``[metrics] textfile_dir``: one small file per host,
so a run never reads or rewrites what the other 200 hosts wrote.  Files are
written to a temporary name that does not end in ``.prom`` (node_exporter
skips it) and renamed, so a scrape never sees half a file.  The ``_total``
counters come from the running totals of ``history.json``: they survive the
pruning of old runs and only ever grow.  Metrics are a side channel: a missing
directory or a full disk is a warning, never a failed run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from psprobe import hostnames

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
        "gauge", "Exit status of the last collect (0 ok, 1 archive, 2 config, 3 broker, 4 state)."),
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
    regular = [r for r in doc.get("runs", []) if r.get("kind", "collect") == "collect"]
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
    newest = next((r["newest"] for r in reversed(regular) if r.get("newest") is not None), None)
    if newest is not None:
        vals.append(("psprobe_collect_newest_point_timestamp_seconds", lab, newest))
        vals.append(("psprobe_collect_lag_seconds", lab,
                     round(max(0.0, regular[-1].get("end", 0) - newest), 3)))
    vals += [
        ("psprobe_collect_points_published_total", lab, t.get("points", 0)),
        ("psprobe_collect_messages_published_total", lab, t.get("messages", 0)),
        ("psprobe_collect_runs_total", lab, t.get("runs", 0)),
        ("psprobe_collect_failures_total", lab, t.get("failures", 0)),
    ]
    return vals


def write_atomic(directory: str, name: str, text: str) -> bool:
    """Replace ``directory/name``; False (with a warning) when that is not possible."""
    d = Path(directory)
    tmp = d / f".{name}.{os.getpid()}.tmp"  # not *.prom: node_exporter ignores it
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, d / name)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, FileNotFoundError) and not d.is_dir():
            log.warning("[metrics] textfile_dir %s does not exist: metrics not written", d)
        else:
            log.warning("%s: cannot write metrics: %s", d / name, e.strerror or e)
        return False
    return True


def write_host(directory: str, host: str, doc: dict[str, Any]) -> bool:
    """After a collect or backfill: rewrite the host's file (no-op when metrics are off)."""
    if not directory:
        return False
    return write_atomic(directory, host_file(host), render(HOST_METRICS, host_values(host, doc)))


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
    return write_atomic(directory, SYNC_FILE, render(SYNC_METRICS, vals))
