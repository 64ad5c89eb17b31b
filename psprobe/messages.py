"""Archive records -> the message bodies existing consumers read.

Body (unchanged from the legacy collectors, ``version: 2``)::

    {"meta": {"source", "destination", "input_source", "input_destination",
              "measurement_agent", "tool_name", "subject_type", "time_duration",
              "ip_transport_protocol", "org_metadata_key", "event-type",
              "summaries": 0, "ts_start"},
     "version": 2, "datapoints": {"<ts>": <val>, ...}}

``meta`` uses underscores where the archive uses dashes, except ``event-type``;
``time_duration`` and ``ip_transport_protocol`` appear only when the archive
has them; values pass through exactly as the archive returned them.

Except what strict JSON (RFC 8259) in UTF-8 cannot carry, which the archive's
JSON can hold and Python decodes: a non-finite number (a bare ``1e999``,
``-1e999``, ``NaN``) goes out as the string ``"Infinity"``, ``"-Infinity"`` or
``"NaN"``, and a lone UTF-16 surrogate in any string (a value, a key, a ``meta``
field; from ``"\\ud800"``) as the six characters of its escape, ``\\ud800``
(JSON ``"\\\\ud800"``), with a warning naming the series.  Such a value never
stops a series.  Bodies without one are byte for byte what they always were,
and cost nothing more: the walk that replaces them runs only when the encoder
refused the chunk.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("psprobe.messages")

# (archive field, message field, required)
META_FIELDS = (
    ("source", "source", True),
    ("destination", "destination", True),
    ("input-source", "input_source", True),
    ("input-destination", "input_destination", True),
    ("measurement-agent", "measurement_agent", True),
    ("tool-name", "tool_name", True),
    ("subject-type", "subject_type", True),
    ("time-duration", "time_duration", False),
    ("ip-transport-protocol", "ip_transport_protocol", False),
)

# allow_nan=False: a non-finite number raises (ValueError) instead of writing
# JavaScript's Infinity/NaN, which strict parsers refuse; see sanitise().
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

_NONFINITE = "non-finite number(s) sent as the string \"Infinity\", \"-Infinity\" or \"NaN\""
_SURROGATE = "lone UTF-16 surrogate(s) sent as the text of their escape (\\udXXX)"


@dataclass(frozen=True)
class Message:
    """One message as published: routing key, id, body, and what its confirm moves."""

    routing_key: str
    message_id: str
    body: bytes
    last_ts: int  # newest point in it: what the checkpoint moves to once confirmed
    points: int


def meta_for(record: dict[str, Any], event_type: str) -> dict[str, Any]:
    """The ``meta`` object for one metadata record and event type (without ts_start)."""
    meta: dict[str, Any] = {}
    for src, dst, required in META_FIELDS:
        if src in record and record[src] is not None:
            meta[dst] = record[src]
        elif required:
            meta[dst] = None
    meta["org_metadata_key"] = record["metadata-key"]
    meta["event-type"] = event_type
    meta["summaries"] = 0
    return meta


def sanitise(obj: Any, changes: Counter | None = None) -> Any:
    """``obj`` with what strict JSON in UTF-8 cannot carry replaced (see the module doc).

    Walks dicts (keys too), lists and tuples; counts what it replaced in ``changes``
    (by kind).  Anything else passes unchanged.
    """
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            if changes is not None:
                changes[_SURROGATE] += 1
            return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if changes is not None:
            changes[_NONFINITE] += 1
        return "NaN" if obj != obj else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {sanitise(k, changes): sanitise(v, changes) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitise(v, changes) for v in obj]
    return obj


def _sanitised(obj: Any) -> tuple[bytes, Counter]:
    """UTF-8 strict JSON of ``obj`` after :func:`sanitise`, and what was replaced."""
    changes: Counter = Counter()
    return _dumps(sanitise(obj, changes)).encode(), changes


class Encoder:
    """Builds the messages of one (metadata, event type) pair.

    The ``meta`` part is serialised once per pair; a chunk costs one encode of
    its datapoints and one SHA-256, which keeps the collector near the cost of
    merely decoding and re-encoding the archive's answers.  What strict JSON
    cannot carry is replaced (:func:`sanitise`), with one warning per kind of
    replacement in meta and in points (an Encoder lives for one series of one run).
    """

    def __init__(self, meta: dict[str, Any], routing_key: str, name: str | None = None) -> None:
        self.name = name or f"{meta.get('org_metadata_key')}/{meta.get('event-type')}"
        self._warned: set[tuple[str, str]] = set()  # (meta or points, kind of change)
        try:
            head = _dumps(meta).encode()
        except ValueError:  # a non-finite number; UnicodeEncodeError (a lone surrogate) is one
            head, changes = _sanitised(meta)
            fields = [k for k, v in meta.items() if sanitise(v) != v or sanitise(k) != k]
            self._warn(changes, "meta", f"metadata field(s) {', '.join(map(str, fields))}")
        self._head = b'{"meta":' + head[:-1] + b',"ts_start":'
        self.routing_key = routing_key

    def encode(self, points: Sequence[tuple[int, Any]]) -> Message:
        """One message for a chunk of ``(ts, val)`` points in ascending order."""
        from hashlib import sha256  # here: a run that finds nothing new encodes nothing

        first = points[0][0]
        try:
            data = _dumps({str(ts): val for ts, val in points}).encode()
        except ValueError:  # as in __init__: only then is the chunk walked
            data, changes = _sanitised({str(ts): val for ts, val in points})
            self._warn(changes, "points", f"points {first}..{points[-1][0]}")
        body = b"".join((self._head, str(first).encode(), b'},"version":2,"datapoints":',
                         data, b"}"))
        # Same points of the same series -> same id, whichever run sends them.
        mid = sha256(body).hexdigest()[:32]
        return Message(self.routing_key, mid, body, points[-1][0], len(points))

    def _warn(self, changes: Counter, part: str, where: str) -> None:
        new = [k for k in changes if (part, k) not in self._warned]
        if not new:
            return
        self._warned.update((part, k) for k in new)
        log.warning("%s: %s, in %s (not logged again for this series in this run)",
                    self.name, "; ".join(f"{changes[k]} {k}" for k in new), where)
