"""A rolling record of each host's runs, for status, metrics and the weekly report.

One small JSON file per host (``hosts/<host>/history.json``), rewritten
atomically after each run and pruned to :data:`KEEP` seconds, so it stays
bounded whatever the timer interval.  Beside the runs it keeps running totals
(points and messages published, failed runs) that only ever grow: Prometheus
counters must not drop when old runs are pruned.  Losing the file loses
reports, never data, so failing to write it is a warning, not a failed run.

A run is ``{"start", "end", "status", "error", "points", "messages", "newest",
"by_type", ...}``; a backfill run also has ``"kind": "backfill"`` (status and
lag are about the regular runs only).  A collect that found a backfill holding
the host's lock is recorded as ``{"kind": "skipped", "reason", "start", "end"}``:
neither a failure nor a success, and no run in the totals.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from psprobe import state

log = logging.getLogger("psprobe.history")

KEEP = 8 * 86400
MAX_RUNS = 5000
TOTALS = ("runs", "failures", "points", "messages")


def path(state_dir: str, host: str) -> Path:
    return state.host_file(state_dir, host, state.HISTORY)


def load_doc(state_dir: str, host: str) -> dict[str, Any]:
    """The whole file: ``{"runs": [...], "totals": {...}, "last_success": ts|None}``.

    A damaged or missing file reads as empty (a damaged one with a warning).
    """
    try:
        data = state.read_json(path(state_dir, host), default={}, root=state_dir)
    except (ValueError, OSError) as e:
        log.warning("%s", e)
        data = {}
    if not isinstance(data, dict):
        data = {}
    runs = data.get("runs")
    runs = [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
    raw = data.get("totals") if isinstance(data.get("totals"), dict) else {}
    totals = {k: raw[k] if isinstance(raw.get(k), int) else 0 for k in TOTALS}
    last_ok = data.get("last_success")
    if not isinstance(last_ok, (int, float)):
        last_ok = None
    return {"version": 1, "runs": runs, "totals": totals, "last_success": last_ok}


def load(state_dir: str, host: str) -> list[dict[str, Any]]:
    """The host's runs, oldest first; a damaged file reads as empty (with a warning)."""
    return load_doc(state_dir, host)["runs"]


def is_regular(run: dict[str, Any]) -> bool:
    """A scheduled collect (not a backfill, not a skip): what status and lag are about."""
    return run.get("kind", "collect") == "collect"


def newest(runs: list[dict[str, Any]]) -> int | None:
    """The newest point the broker confirmed, as the last regular run that knew it recorded it.

    Each run records its checkpoint's newest position (``"newest"``); status
    and metrics read it here, so a backfill (which moves no checkpoint) or a
    run that recorded none never hides an older answer.
    """
    return next((r["newest"] for r in reversed(runs)
                 if is_regular(r) and r.get("newest") is not None), None)


def is_backfill(run: dict[str, Any]) -> bool:
    return run.get("kind") == "backfill"


def is_skipped(run: dict[str, Any]) -> bool:
    """A collect that did not run: a backfill held the host's lock (not failed, not ok)."""
    return run.get("kind") == "skipped"


def record(state_dir: str, host: str, run: dict[str, Any]) -> dict[str, Any]:
    """Append one run, add it to the totals, drop runs older than KEEP; returns the file."""
    doc = load_doc(state_dir, host)
    runs = doc["runs"]
    runs.append(run)
    horizon = run.get("end", 0) - KEEP
    doc["runs"] = [r for r in runs if r.get("end", 0) >= horizon][-MAX_RUNS:]
    t = doc["totals"]
    t["points"] += int(run.get("points") or 0)
    t["messages"] += int(run.get("messages") or 0)
    if is_regular(run):
        t["runs"] += 1
        if run.get("status"):
            t["failures"] += 1
        else:
            doc["last_success"] = run.get("end")
    try:
        state.write_json_atomic(path(state_dir, host), doc, root=state_dir)
    except OSError as e:
        log.warning("%s: cannot write run history: %s", path(state_dir, host), e.strerror)
    return doc
