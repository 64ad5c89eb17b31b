"""A rolling record of each host's runs, for status, metrics and the weekly report.

One small JSON file per host (``hosts/<host>/history.json``), rewritten
atomically after each run and pruned to :data:`KEEP` seconds, so it stays
bounded whatever the timer interval.  Losing it loses reports, never data, so
failing to write it is a warning, not a failed run.
"""

from __future__ import annotations

import logging
from typing import Any

from psprobe import state

log = logging.getLogger("psprobe.history")

KEEP = 8 * 86400
MAX_RUNS = 5000


def path(state_dir: str, host: str):
    return state.host_dir(state_dir, host) / "history.json"


def load(state_dir: str, host: str) -> list[dict[str, Any]]:
    """The host's runs, oldest first; a damaged file reads as empty (with a warning)."""
    try:
        data = state.read_json(path(state_dir, host), default={})
    except (ValueError, OSError) as e:
        log.warning("%s", e)
        return []
    runs = data.get("runs") if isinstance(data, dict) else None
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def record(state_dir: str, host: str, run: dict[str, Any]) -> None:
    """Append one run and drop what is older than KEEP."""
    runs = load(state_dir, host)
    runs.append(run)
    horizon = run.get("end", 0) - KEEP
    runs = [r for r in runs if r.get("end", 0) >= horizon][-MAX_RUNS:]
    try:
        state.write_json_atomic(path(state_dir, host), {"version": 1, "runs": runs})
    except OSError as e:
        log.warning("%s: cannot write run history: %s", path(state_dir, host), e.strerror)
