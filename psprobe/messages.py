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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode


@dataclass(frozen=True)
class Message:
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


class Encoder:
    """Builds the messages of one (metadata, event type) pair.

    The ``meta`` part is serialised once per pair; a chunk costs one encode of
    its datapoints and one SHA-256, which keeps the collector near the cost of
    merely decoding and re-encoding the archive's answers.
    """

    def __init__(self, meta: dict[str, Any], routing_key: str) -> None:
        head = _dumps(meta)
        self._head = ('{"meta":' + head[:-1] + ',"ts_start":').encode()
        self.routing_key = routing_key

    def encode(self, points: Sequence[tuple[int, Any]]) -> Message:
        """One message for a chunk of ``(ts, val)`` points in ascending order."""
        first = points[0][0]
        data = _dumps({str(ts): val for ts, val in points})
        body = b"".join((self._head, str(first).encode(), b'},"version":2,"datapoints":',
                         data.encode(), b"}"))
        # Same points of the same series -> same id, whichever run sends them.
        mid = hashlib.sha256(body).hexdigest()[:32]
        return Message(self.routing_key, mid, body, points[-1][0], len(points))
