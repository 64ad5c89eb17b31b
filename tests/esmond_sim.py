"""A faithful esmond measurement-archive simulator (and its perfSONAR 5 "elmond" variant).

Why: psprobe's tests, demo and benchmarks need archives that answer exactly like the real
ones (paging trap, string-typed metadata, esmond's error codes) and that can be made to
misbehave on demand, at the scale of 2 000 hosts or 1 000 000 points, on loopback only.
Built from the real answers in ``shared/formats/esmond`` and from esmond's and elmond's
own code (``api/perfsonar/api_v2.py``, ``elmond/{metadata,data,util}.py``).

One HTTP/1.1 server (keep-alive, optional TLS with a required client certificate) serves
many archive hosts, told apart by the ``Host`` header (``name`` or ``name:port``) or by a
host's own path prefix.  Series are generated lazily (an arithmetic grid of timestamps
plus explicitly added points), so building a million points costs nothing and serving a
page costs O(offset + limit), found by bisection.

Run ``python3 tests/esmond_sim.py --help`` for the standalone server used by the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import hashlib
import json
import re
import socket
import ssl
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ESMOND_PREFIX = "/esmond/perfsonar/archive/"
FORMATS_DIR = Path(__file__).resolve().parents[2] / "shared" / "formats"
ESMOND_LIMIT = 1500  # esmond's default page for every list answer
ELMOND_LIMIT, ELMOND_MAX = 1000, 10000  # elmond/metadata.py and data.py
RESERVED = {"format", "limit", "offset", "dns-match-rule", "time", "time-start", "time-end",
            "time-range"}
ROW_FILTERS = {"event-type", "summary-type", "summary-window"}
SUMMARY_TYPES = {"base": "base", "aggregations": "aggregation", "statistics": "statistics",
                 "averages": "average"}  # URL name -> JSON name (esmond types.py)
URL_SUMMARY = {v: k for k, v in SUMMARY_TYPES.items()}

# esmond's event-type table (formats README): value type served per event type.
VALUE_TYPES: dict[str, str] = {
    "throughput": "float", "time-error-estimates": "float",
    "packet-count-sent": "integer", "packet-count-lost": "integer",
    "packet-count-lost-bidir": "integer", "packet-duplicates": "integer",
    "packet-duplicates-bidir": "integer", "packet-reorders": "integer",
    "packet-reorders-bidir": "integer", "packet-retransmits": "integer", "path-mtu": "integer",
    "packet-rtt": "integer",
    "packet-loss-rate": "percentage", "packet-loss-rate-bidir": "percentage",
    "histogram-owdelay": "histogram", "histogram-rtt": "histogram", "histogram-ttl": "histogram",
    "histogram-ttl-reverse": "histogram",
    "throughput-subintervals": "subinterval", "packet-retransmits-subintervals": "subinterval",
    "packet-trace": "json", "failures": "json", "pscheduler-run-href": "json",
    "streams-throughput": "json", "streams-packet-retransmits": "json",
    "streams-throughput-subintervals": "json", "streams-packet-retransmits-subintervals": "json",
    "pscheduler-raw": "json",
}

# Real metadata records (real_captures/metadata_sample_one_per_tool.json), key/uri/url
# removed: free-form fields stay strings, event types keep their real summaries.
_AGG = [("aggregation", "300"), ("aggregation", "3600"), ("aggregation", "86400")]
TEMPLATES: dict[str, dict[str, Any]] = {
    "throughput": {
        "subject-type": "point-to-point", "source": "2001:798:bb:2::8e",
        "destination": "2001:738:0:119::97", "measurement-agent": "2001:738:0:119::97",
        "tool-name": "pscheduler/iperf3", "input-source": "psmp-gn-bw-01-mad-es-v6.geant.net",
        "input-destination": "perfsonar.debrecen3.hbone.hu", "time-duration": "39.0",
        "pscheduler-test-type": "throughput", "ip-transport-protocol": "tcp",
        "bw-ignore-first-seconds": "PT10S",
        "event-types": [("packet-retransmits", []), ("pscheduler-run-href", []),
                        ("throughput", [("average", "86400")]), ("failures", []),
                        ("throughput-subintervals", []), ("packet-retransmits-subintervals", [])]},
    "latencybg": {
        "subject-type": "point-to-point", "source": "62.40.106.169",
        "destination": "195.111.102.97", "measurement-agent": "195.111.102.97",
        "tool-name": "pscheduler/powstream", "input-source": "psmp-gn-owd-01.gen.ch.geant.net",
        "input-destination": "perfsonar.debrecen3.hbone.hu", "time-probe-interval": "0.1",
        "time-duration": "86400.0", "sample-size": "600", "sample-bucket-width": "0.0001",
        "pscheduler-test-type": "latencybg",
        "pscheduler-reference-psconfig-created-by-uuid": "4E68656E-79EE-11E8-8617-F3A7C633BCD9",
        "pscheduler-reference-psconfig-created-by-user-agent": "psconfig-pscheduler-agent",
        "mode-flip": "True", "ip-packet-padding": "0",
        "event-types": [("time-error-estimates", []), ("packet-duplicates", []),
                        ("pscheduler-run-href", []), ("histogram-ttl", []),
                        ("packet-count-sent", _AGG), ("packet-reorders", []),
                        ("packet-count-lost", _AGG),
                        ("histogram-owdelay", [*_AGG, ("statistics", "0"), ("statistics", "300"),
                                               ("statistics", "3600"), ("statistics", "86400")]),
                        ("failures", []), ("packet-loss-rate", _AGG)]},
    "trace": {
        "subject-type": "point-to-point", "source": "2001:738:0:119::97",
        "destination": "2001:798:fc00:28::6", "measurement-agent": "2001:738:0:119::97",
        "tool-name": "pscheduler/traceroute", "input-source": "perfsonar.debrecen3.hbone.hu",
        "input-destination": "psmp-gn-bw-01-lon-uk.geant.net", "trace-max-ttl": "64",
        "time-test-timeout": "60.0", "time-probe-interval": "10.0", "time-duration": "68.0",
        "pscheduler-test-type": "trace", "ip-transport-protocol": "udp", "ip-packet-size": "40",
        "event-types": [("packet-trace", []), ("failures", []), ("path-mtu", []),
                        ("pscheduler-run-href", [])]},
    "bwctl-iperf3": {
        "bw-ignore-first-seconds": "10", "bw-parallel-streams": "1",
        "destination": "2001:798:fc00:2c::6", "input-destination": "psmp-gn-bw-01-sof-bg.geant.net",
        "input-source": "psmall.lut.ac.uk", "ip-transport-protocol": "tcp",
        "measurement-agent": "2001:630:301:b018::616a:b17e",
        "source": "2001:630:301:b018::616a:b17e", "subject-type": "point-to-point",
        "time-duration": "20", "time-interval": "21600", "tool-name": "bwctl/iperf3",
        "event-types": [("throughput-subintervals", []), ("failures", []),
                        ("packet-retransmits", []), ("throughput", [("average", "86400")]),
                        ("packet-retransmits-subintervals", [])]},
}

# pScheduler-era trace hops (pscheduler_archiver_esmond/trace_traceroute__bulk_data_PUT.json).
_HOPS = [
    ("198.129.252.141", "lblmr2-lblowamp.es.net", 0.1, "ESNET-WEST - ESnet, US", 292),
    ("134.55.37.49", "sacrcr5-ip-a-lblmr2.es.net", 3.2, "ESNET - ESnet, US", 293),
    ("134.55.50.202", "denvcr5-ip-a-sacrcr5.es.net", 23.6, "ESNET - ESnet, US", 293),
    ("134.55.49.58", "kanscr5-ip-a-denvcr5.es.net", 34.2, "ESNET - ESnet, US", 293),
]


def _rand(seed: int, ts: int) -> float:
    """Deterministic value in [0, 1) for (series, ts): serving and accounting agree."""
    return (((ts * 2654435761) ^ seed) & 0xFFFFFFFF) / 4294967296.0


def make_value(event_type: str, ts: int, seed: int = 0, host: str = "ps.example.org") -> Any:
    """A value of the type the real archive serves for ``event_type`` at ``ts``."""
    r = _rand(seed, ts)
    kind = VALUE_TYPES.get(event_type, "json")
    if kind == "float":
        return round(9.4e9 * (0.5 + r / 2), 1) if event_type == "throughput" else round(r, 6)
    if kind == "integer":
        return 9000 if event_type == "path-mtu" else int(r * 600 if "sent" in event_type else r * 8)
    if kind == "percentage":
        return int(r * 8) / 600.0
    if kind == "histogram":
        if "ttl" in event_type:
            return {"247": 600}
        base = 39.4 + int(r * 20) / 100
        return {f"{base + i / 100:.2f}": c for i, c in enumerate((11, 77, 187, 51, 9))}
    if kind == "subinterval":
        scale = 9.4e9 if event_type.startswith("throughput") else 4
        return [{"start": float(i), "duration": 1.0, "val": round(scale * _rand(seed + i, ts), 3)}
                for i in range(10)]
    if event_type == "packet-trace":
        return [{"success": 1, "ip": ip, "hostname": name, "rtt": round(rtt * (1 + r / 10), 3),
                 "as": {"owner": owner, "number": num}, "ttl": n + 1, "query": 1}
                for n, (ip, name, rtt, owner, num) in enumerate(_HOPS)]
    if event_type == "failures":
        return {"error": f"The test failed for an unspecified reason ({ts})."}
    if event_type == "pscheduler-run-href":
        return {"href": f"https://{host}/pscheduler/tasks/{seed:08x}/runs/{ts:x}"}
    if event_type.startswith("streams-"):
        return [round(4.7e9 * r, 1), round(4.7e9 * (1 - r), 1)]
    return {"value": r}


# ---------------------------------------------------------------- data model


class Series:
    """One (metadata key, event type) series: a lazy grid plus explicit sorted points.

    The grid holds ``count`` points at ``start + k*step`` with values from ``valfn``;
    explicit points (``add``) are kept in sorted arrays and win over a grid point at
    the same timestamp.  ``updated`` is what the archive reports as ``time-updated``.
    """

    def __init__(self, valfn: Callable[[int], Any], start: int = 0, step: int = 1,
                 count: int = 0) -> None:
        self.valfn, self.start, self.step, self.count_ = valfn, start, max(1, step), count
        self.ts: array = array("q")
        self.vals: list[Any] = []
        self.updated: int | None = start + (count - 1) * self.step if count else None

    def _grid(self, lo: int, hi: int) -> range:
        if not self.count_:
            return range(0)
        first = self.start + max(0, -(-(lo - self.start) // self.step)) * self.step
        last = min(self.start + (self.count_ - 1) * self.step, hi)
        return range(first, last + 1, self.step) if first <= last else range(0)

    def add(self, points: Iterable[tuple[int, Any]]) -> None:
        for t, v in sorted(points, key=lambda p: p[0]):
            i = bisect_left(self.ts, t)
            if i < len(self.ts) and self.ts[i] == t:
                self.vals[i] = v
            else:
                self.ts.insert(i, t)
                self.vals.insert(i, v)
            self.updated = t if self.updated is None else max(self.updated, t)

    def iter(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, Any]]:
        """Points with lo <= ts <= hi, ascending, lazily."""
        hi = (1 << 62) if hi is None else hi
        grid, i, j = self._grid(lo, hi), bisect_left(self.ts, lo), bisect_right(self.ts, hi)
        if i == j:
            yield from ((t, self.valfn(t)) for t in grid)
            return
        g = iter(grid)
        gt = next(g, None)
        for k in range(i, j):
            t = self.ts[k]
            while gt is not None and gt < t:
                yield gt, self.valfn(gt)
                gt = next(g, None)
            if gt == t:
                gt = next(g, None)
            yield t, self.vals[k]
        while gt is not None:
            yield gt, self.valfn(gt)
            gt = next(g, None)

    def count(self, lo: int = 0, hi: int | None = None) -> int:
        hi = (1 << 62) if hi is None else hi
        grid, i, j = self._grid(lo, hi), bisect_left(self.ts, lo), bisect_right(self.ts, hi)
        return len(grid) + sum(1 for k in range(i, j) if self.ts[k] not in grid)

    @property
    def last_ts(self) -> int | None:
        ends = [t for t in (self.start + (self.count_ - 1) * self.step if self.count_ else None,
                            self.ts[-1] if self.ts else None) if t is not None]
        return max(ends) if ends else None


@dataclass
class Record:
    """A metadata record: free-form fields, event types with series and summaries.

    ``raw`` records (captures, hostile input) are served verbatim instead.
    """

    key: str
    fields: dict[str, Any]
    series: dict[str, Series]
    summaries: dict[str, list[tuple[str, str]]]
    added: int = 0  # elmond reports the task's "added" time as time-updated
    raw: dict[str, Any] | None = None


@dataclass
class Request:
    method: str
    path: str
    query: str
    host_header: str
    ts: float

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_qsl(self.query, keep_blank_values=True))


@dataclass
class Fault:
    """A misbehaviour of one host, applied to matching requests.

    kind: ``status`` (``status`` + ``body``), ``slow`` (``delay`` then answer), ``stall``
    (headers + half the body, then hang until :meth:`release` or server stop), ``cut``
    (half the body, then close), ``reset`` (close without answering), ``truncate`` (half the
    JSON, consistent Content-Length), ``nonjson``, ``shape`` (data answers, see ``SHAPES``),
    ``page_loop`` (metadata next page points back at itself), ``gigantic`` (``size_mb`` of
    valid JSON points).  ``times``: apply to that many requests (None: until cleared);
    ``path``: regex searched in ``path?query``.

    Shapes of data answers: ``object`` (``{"results": [...]}``), ``missing_ts`` (one point
    without ``ts``), ``string_ts`` (every ``ts`` a string), ``duplicate_ts`` (every point
    twice), ``out_of_order`` (the page reversed), ``outside_window`` (a point before and one
    after the asked window); ``unsorted``: ``limit``/``offset`` applied to the window's
    points in a fixed shuffled storage order, which is also the order served (an archive
    that limits before it sorts); ``raw_values``: ``values`` maps timestamps to raw JSON
    text served as those points' ``val`` (``"1e999"``, ``"NaN"``, ...), whatever the
    series holds.  Values that are :class:`Raw` are always served as their text, without
    a fault.
    """

    kind: str
    status: int = 500
    body: Any = None
    delay: float = 0.0
    shape: str = ""
    values: dict[int, str] | None = None  # raw_values: ts -> raw JSON text of its val
    size_mb: float = 40.0
    times: int | None = None
    path: str | None = None
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event, repr=False)

    def release(self) -> None:
        self.released.set()


KINDS = ("status", "slow", "stall", "cut", "reset", "truncate", "nonjson", "shape", "page_loop",
         "gigantic")
SHAPES = ("object", "missing_ts", "string_ts", "duplicate_ts", "out_of_order", "outside_window",
          "unsorted", "raw_values")


class Raw:
    """A value served as exactly this JSON text: ``Raw("1e999")``, ``Raw('{"error": "\\ud800"}')``.

    For what Python's ``json`` cannot write (a bare ``1e999``, ``-1e999``) or to fix the
    exact text.  (A plain ``str`` holding a lone surrogate is already served as its
    ``\\udXXX`` escape, and a float ``nan`` as ``NaN``.)
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Raw) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def dumps(obj: Any, **kw: Any) -> bytes:
    """``json.dumps`` of an answer, :class:`Raw` values written as their text.

    Costs nothing extra when no value is :class:`Raw` (``default`` is never called).
    """
    raws: list[str] = []

    def default(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(f"not JSON serializable: {type(o).__name__}")

    text = json.dumps(obj, default=default, **kw)
    for i, raw in enumerate(raws):  # the placeholder is written as "\u0000rawN\u0000"
        text = text.replace(f'"\\u0000raw{i}\\u0000"', raw, 1)
    return text.encode()


def storage_rank(ts: int) -> int:
    """Where a point sits in the ``unsorted`` archive's storage: a fixed shuffle of ts."""
    x = (ts * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF  # splitmix64's finaliser
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _event_types(items: list) -> list[tuple[str, list[tuple[str, str]]]]:
    """Event types of a template ((name, summaries) pairs) or of a real record (dicts)."""
    out = []
    for e in items:
        if isinstance(e, dict):
            out.append((e["event-type"], [(x["summary-type"], str(x["summary-window"]))
                                          for x in e.get("summaries") or []]))
        else:
            out.append((e[0], list(e[1])))
    return out


def metadata_key(host: str, n: int, flavor: str = "esmond") -> str:
    digest = hashlib.sha256(f"{host}/{n}".encode()).hexdigest()
    return digest if flavor == "elmond" else digest[:32]


def _native(v: Any) -> Any:
    """elmond serves native JSON types where esmond serves strings."""
    if isinstance(v, str):
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
        if v in ("True", "False"):
            return v == "True"
    return v


class Host:
    """One simulated archive: records, faults, latency and a request log."""

    def __init__(self, name: str, prefix: str = ESMOND_PREFIX, flavor: str = "esmond") -> None:
        if flavor not in ("esmond", "elmond"):
            raise ValueError(f"flavor must be esmond or elmond, not {flavor!r}")
        self.name, self.prefix, self.flavor = name, prefix.rstrip("/") + "/", flavor
        self.records: list[Record] = []
        self.by_key: dict[str, Record] = {}
        self.routes: dict[str, Series] = {}  # explicit data paths of raw records
        self.faults: list[Fault] = []
        self.latency = 0.0
        self.log: list[Request] = []
        self.lock = threading.RLock()

    # -- building data
    def add_test(self, template: str | dict = "throughput", event_types: list[str] | None = None,
                 start: int | None = None, end: int | None = None, step: int = 600,
                 count: int | None = None, key: str | None = None, **fields: Any) -> Record:
        """Add a test (metadata record) whose series hold a generated grid of points.

        Points sit at ``start + k*step`` up to ``end`` inclusive (default: the last 24 h up
        to now) or ``count`` of them.  ``template`` names a real record in ``TEMPLATES`` or
        is a record dict; ``event_types`` overrides its list; ``fields`` override fields.
        """
        tpl = copy.deepcopy(TEMPLATES[template] if isinstance(template, str) else template)
        n = len(self.records)
        ets = _event_types(tpl.pop("event-types", []))
        known = dict(ets)
        if event_types is not None:
            ets = [(e, known.get(e, [])) for e in event_types]
        for drop in ("metadata-key", "uri", "url"):
            tpl.pop(drop, None)
        tpl.update({"destination": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}",
                    "input-destination": f"ps{n}.dest.example.net"} if n else {})
        tpl.update(fields)
        if self.flavor == "elmond":
            tpl = {k: _native(v) for k, v in tpl.items()}
            if "pscheduler-run-href" not in dict(ets):
                ets.append(("pscheduler-run-href", []))
        now = int(time.time())
        end = now - now % step if end is None else end
        start = end - 86400 + step if start is None else start
        count = (end - start) // step + 1 if count is None else count
        key = key or metadata_key(self.name, n, self.flavor)
        series = {}
        for i, (et, _) in enumerate(ets):
            seed = int(key[:8], 16) ^ (i * 0x9E3779B1)
            series[et] = Series(self._valfn(et, seed), start, step, count)
        rec = Record(key, tpl, series, dict(ets), added=start)
        with self.lock:
            self.records.append(rec)
            self.by_key[key] = rec
        return rec

    def _valfn(self, event_type: str, seed: int) -> Callable[[int], Any]:
        elmond_href = self.flavor == "elmond" and event_type == "pscheduler-run-href"
        if elmond_href:  # pS 5 serves the run href as a plain string
            return lambda ts: make_value(event_type, ts, seed, self.name)["href"]
        return lambda ts: make_value(event_type, ts, seed, self.name)

    def add_points(self, key: str, event_type: str, points: Iterable[tuple[int, Any]] | None = None,
                   count: int = 0, step: int = 60, updated: int | None = None) -> list[tuple[int, Any]]:
        """Append points to a series (given, or ``count`` generated after its last point).

        ``time-updated`` moves to the newest timestamp (or to ``updated``).  Returns the
        points added.
        """
        with self.lock:
            s = self.by_key[key].series[event_type]
            if points is None:
                last = s.last_ts or int(time.time()) - count * step
                points = [(last + step * (k + 1), s.valfn(last + step * (k + 1)))
                          for k in range(count)]
            points = list(points)
            s.add(points)
            if updated is not None:
                s.updated = updated
        return points

    def add_raw_record(self, record: dict[str, Any],
                       data: dict[str, list[tuple[int, Any]]] | None = None) -> None:
        """Serve ``record`` verbatim (hostile or captured metadata); ``data`` maps URL
        paths to the points a GET on that exact path returns."""
        with self.lock:
            key = str(record.get("metadata-key", f"raw{len(self.records)}"))
            rec = Record(key, {}, {}, {}, raw=copy.deepcopy(record))
            self.records.append(rec)
            self.by_key.setdefault(key, rec)
            for path, pts in (data or {}).items():
                s = Series(lambda ts: None)
                s.add(pts)
                self.routes[path] = s

    def load_capture(self, path: str | Path) -> int:
        """Serve a real captured metadata list (``real_captures/metadata_list__*.json``)."""
        records = json.loads(Path(path).read_text())
        for r in records:
            for k in ("metadata-count-total", "metadata-next-page", "metadata-previous-page"):
                r.pop(k, None)
            self.add_raw_record(r)
        return len(records)

    # -- faults and observation
    def fault(self, kind: str, **kw: Any) -> Fault:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {KINDS}")
        if kind == "shape" and kw.get("shape") not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}")
        f = Fault(kind, **kw)
        with self.lock:
            self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.lock:
            for f in self.faults:
                f.release()
            self.faults.clear()

    def _take_fault(self, target: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.path and not re.search(f.path, target):
                    continue
                f.hits += 1
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                return f
        return None

    def pairs(self) -> list[tuple[str, str]]:
        return [(r.key, et) for r in self.records for et in r.series]

    def points(self, key: str, event_type: str, start: int = 0,
               end: int | None = None) -> list[tuple[int, Any]]:
        """Every point the archive holds for a pair (for "0 lost" accounting)."""
        with self.lock:
            return list(self.by_key[key].series[event_type].iter(start, end))

    def total_points(self, start: int = 0, end: int | None = None) -> int:
        with self.lock:
            return sum(s.count(start, end) for r in self.records for s in r.series.values())

    def requests(self, path: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.log if path is None or re.search(path, r.path)]


# ---------------------------------------------------------------- API logic


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Answer:
    status: int
    body: Any  # JSON-able object, or bytes served as is
    kind: str = "other"  # "meta" | "data" | "other"
    headers: dict[str, str] = field(default_factory=dict)
    ctype: str = "application/json"


def time_filters(q: dict[str, str], now: int | None = None) -> tuple[bool, int, int | None]:
    """esmond's / elmond's ``handle_time_filters``: (has_filters, begin, end)."""

    def val(name: str) -> int:
        try:
            return int(q[name])
        except ValueError:
            raise ApiError(400, "Time parameter must be an integer") from None

    end: int | None = int(time.time()) if now is None else now
    begin, has = 0, True
    if "time" in q:
        begin = end = val("time")
    elif "time-start" in q and "time-end" in q:
        begin, end = val("time-start"), val("time-end")
    elif "time-start" in q and "time-range" in q:
        begin = val("time-start")
        end = begin + val("time-range")
    elif "time-end" in q and "time-range" in q:
        end = val("time-end")
        begin = end - val("time-range")
    elif "time-start" in q:
        begin, end = val("time-start"), None
    elif "time-end" in q:
        end = val("time-end")
    elif "time-range" in q:
        begin, end = end - val("time-range"), None
    else:
        has = False
    if end is not None and end < begin:
        raise ApiError(400, "Requested start time must be less than end time")
    return has, begin, end


def _positive(v: str | None, default: int, strict: bool) -> int:
    """DRF's ``_positive_int``: anything unusable falls back to the default."""
    try:
        n = int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return default if n < 0 or (strict and n == 0) else n


def _with_query(url: str, **params: Any) -> str:
    """DRF's ``replace_query_param``/``remove_query_param`` (sorted query)."""
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query, keep_blank_values=True))
    for k, v in params.items():
        q.pop(k, None)
        if v is not None:
            q[k] = str(v)
    return urlunsplit((*parts[:3], urlencode(sorted(q.items())), parts[4]))


def _rows(rec: Record) -> Iterator[tuple[str, str, str, Any]]:
    """(event-type, summary-type, window, time-updated) rows as esmond's ps_event_types."""
    if rec.raw is not None:
        for et in rec.raw.get("event-types") or []:
            if isinstance(et, dict):
                yield str(et.get("event-type")), "base", "0", et.get("time-updated")
                for s in et.get("summaries") or []:
                    if isinstance(s, dict):
                        yield (str(et.get("event-type")), str(s.get("summary-type")),
                               str(s.get("summary-window")), s.get("time-updated"))
        return
    for et, s in rec.series.items():
        yield et, "base", "0", s.updated
        for st, w in rec.summaries.get(et, []):
            yield et, st, w, s.updated


class Api:
    """The read side of the archive API for one host, both flavours."""

    def __init__(self, host: Host, origin: str, storage: str = "sorted") -> None:
        self.host, self.origin = host, origin
        self.storage = storage  # "unsorted": limit applied in storage order, served unsorted
        self.elmond = host.flavor == "elmond"
        self.path = host.prefix

    def handle(self, path: str, query: str) -> Answer:
        q = dict(parse_qsl(query, keep_blank_values=True))
        self.path, prefix = path, self.host.prefix
        raw_route = self.host.routes.get(path)
        try:
            if raw_route is not None:
                return self.data(raw_route, q, "base")
            if path in (prefix, prefix.rstrip("/")):
                return self.metadata_list(q, path, query)
            if not path.startswith(prefix):
                raise ApiError(404, "Not found.")
            return self.elmond_route(path[len(prefix):], q) if self.elmond else \
                self.esmond_route(path[len(prefix):], q)
        except ApiError as e:
            if self.elmond:
                return Answer(e.status, _werkzeug_page(e.status, e.detail).encode(),
                              ctype="text/html; charset=utf-8")
            if e.status == 500:
                return Answer(500, b"<h1>Server Error (500)</h1>", ctype="text/html")
            return Answer(e.status, {"detail": e.detail})

    # -- esmond: /<key>/, /<key>/<et>/, /<key>/<et>/<summary>[/<window>]
    def esmond_route(self, rest: str, q: dict[str, str]) -> Answer:
        parts = rest.rstrip("/").split("/")
        rec = self.host.by_key.get(parts[0])
        if len(parts) == 1:
            if rec is None:
                raise ApiError(404, "Not found.")
            return Answer(200, self.render(rec))
        if len(parts) == 2:
            if rec is None:
                return Answer(200, [])
            return Answer(200, [e for e in self.render(rec)["event-types"]
                                if e.get("event-type") == parts[1]])
        if len(parts) > 4:
            raise ApiError(404, "Not found.")
        et, summary = parts[1], parts[2]
        if et not in VALUE_TYPES:
            raise ApiError(400, f"Unsupported event type '{et}' provided")
        if summary not in SUMMARY_TYPES:
            raise ApiError(400, f"Invalid summary type '{summary}'")
        if len(parts) == 4:
            try:
                int(parts[3])
            except ValueError:
                raise ApiError(400, "Summary window parameter must be an integer") from None
        series = rec.series.get(et) if rec is not None and rec.raw is None else None
        return self.data(series, q, summary)

    # -- elmond: /<key>, /<key>/<et>/<summary>/<window>
    def elmond_route(self, rest: str, q: dict[str, str]) -> Answer:
        parts = rest.split("/")
        rec = self.host.by_key.get(parts[0])
        if len(parts) == 1:
            if rec is None:
                raise ApiError(404, f"Unable to find metadata with key {parts[0]}")
            return Answer(200, self.render(rec))
        if len(parts) != 4:
            raise ApiError(404, "Not Found")
        et, summary, window = parts[1:]
        try:
            w = int(window)
        except ValueError:
            raise ApiError(400, "Summary window must be an int") from None
        if w == 0 and summary == "base" and et not in VALUE_TYPES:
            raise ApiError(400, f"Unrecognized event type {et}")
        series = rec.series.get(et) if rec is not None and rec.raw is None else None
        return self.data(series, q, summary if w == 0 else "rollup")

    def data(self, series: Series | None, q: dict[str, str], summary: str) -> Answer:
        _, begin, end = time_filters(q)
        headers: dict[str, str] = {}
        if self.elmond:
            limit, offset = self._elmond_paging(q)
            stop = offset + limit
        else:
            if "limit" in q:  # esmond: int(limit) unguarded -> 500
                try:
                    stop = int(q["limit"]) + int(q.get("offset", 0))
                except ValueError:
                    raise ApiError(500, "Server Error") from None
            else:
                stop = 1000000
            limit = _positive(q.get("limit"), ESMOND_LIMIT, strict=True)
            offset = _positive(q.get("offset"), 0, strict=False)
            stop = min(stop, offset + limit)
        if series is None or summary != "base":
            return Answer(200, [], kind="data")
        with self.host.lock:
            if self.storage == "unsorted":  # a broken archive: limit before (never) sorting
                pts = sorted(series.iter(begin, end), key=lambda p: storage_rank(p[0]))
                pts = pts[offset:max(offset, stop)]
            else:
                pts = list(islice(series.iter(begin, end), offset, max(offset, stop)))
            if not self.elmond and "limit" not in q and offset + limit < min(
                    series.count(begin, end), 1000000):
                headers["Link"] = f'<{self._self_url(q, limit=limit, offset=offset + limit)}>; rel="next"'
        return Answer(200, [{"ts": t, "val": v} for t, v in pts], kind="data", headers=headers)

    def _elmond_paging(self, q: dict[str, str]) -> tuple[int, int]:
        try:
            limit = int(q["limit"]) if q.get("limit") else ELMOND_LIMIT
            offset = int(q["offset"]) if q.get("offset") else 0
        except ValueError:
            raise ApiError(400, "limit parameter must be an integer") from None
        if limit > ELMOND_MAX:
            raise ApiError(400, f"limit parameter cannot exceed {ELMOND_MAX}")
        return max(0, limit), max(0, offset)

    def _self_url(self, q: dict[str, str], **params: Any) -> str:
        return _with_query(f"{self.origin}{self.path}?{urlencode(q)}", **params)

    def metadata_list(self, q: dict[str, str], path: str, query: str) -> Answer:
        has_time, begin, end = time_filters(q)
        rows_wanted = {k: q[k] for k in ROW_FILTERS if k in q}
        fields_wanted = {k: v for k, v in q.items() if k not in RESERVED | ROW_FILTERS}
        with self.host.lock:
            matches = [r for r in self.host.records
                       if self._match(r, rows_wanted, fields_wanted, has_time, begin, end)]
            if self.elmond:
                matches.sort(key=lambda r: -max((s.last_ts or 0 for s in r.series.values()),
                                                default=0))
        total = len(matches)
        url = f"{self.origin}{path}" + (f"?{query}" if query else "")
        if self.elmond:
            limit, offset = self._elmond_paging(q)
            nxt = _elmond_link(url, limit, offset, total, forward=True)
            prev = _elmond_link(url, limit, offset, total, forward=False)
            headers = {}
        else:
            limit = _positive(q.get("limit"), ESMOND_LIMIT, strict=True)
            offset = _positive(q.get("offset"), 0, strict=False)
            nxt = None if offset + limit >= total else _with_query(url, limit=limit,
                                                                   offset=offset + limit)
            prev = None if offset <= 0 else (_with_query(url, limit=limit, offset=None)
                                             if offset - limit <= 0 else
                                             _with_query(url, limit=limit, offset=offset - limit))
            links = [f'<{nxt}>; rel="next"'] if nxt else []
            links += [f'<{prev}>; rel="prev"'] if prev else []
            headers = {"Link": ", ".join(links)} if links else {}
        with self.host.lock:
            page = [self.render(r) for r in matches[offset:offset + limit]]
        if page:
            page[0].update({"metadata-count-total": total, "metadata-previous-page": prev,
                            "metadata-next-page": nxt})
        return Answer(200, page, kind="meta", headers=headers)

    def _match(self, rec: Record, rows: dict[str, str], fields: dict[str, str], has_time: bool,
               begin: int, end: int | None) -> bool:
        if fields:
            view = rec.raw if rec.raw is not None else {**rec.fields, "metadata-key": rec.key}
            if any(str(view.get(k)) != v for k, v in fields.items()):
                return False
        if not rows and not has_time:
            return True
        if self.elmond and has_time:  # elmond: some run of the test started in the window
            if not any(s.count(begin, end) for s in rec.series.values()):
                return False
            has_time = False
        for et, st, w, updated in _rows(rec):
            if rows.get("event-type", et) != et or rows.get("summary-type", st) != st or \
                    rows.get("summary-window", w) != w:
                continue
            if not has_time or (isinstance(updated, int) and updated >= begin
                                and (end is None or updated <= end)):
                return True
        return False

    def render(self, rec: Record) -> dict[str, Any]:
        """The record as the archive serves it to this origin."""
        if rec.raw is not None:
            return copy.deepcopy(rec.raw)
        key, ets = rec.key, []
        if self.elmond:
            base = self.host.prefix.rstrip("/")
            for et in rec.series:
                ets.append({"event-type": et, "base-uri": f"{base}/{key}/{et}/base/0",
                            "time-updated": rec.added, "summaries": [
                                {"event-type": et, "summary-window": int(w), "summary-type": st,
                                 "uri": f"{base}/{key}/{et}/{URL_SUMMARY.get(st, st)}/{w}"}
                                for st, w in rec.summaries.get(et, [])]})
            origin = "https" + self.origin[self.origin.index(":"):]  # FORCE_HTTPS_URLS
            return {"metadata-key": key, "uri": f"{base}/{key}", **rec.fields,
                    "event-types": ets, "url": f"{origin}{base}/{key}"}
        uri = f"{self.host.prefix}{key}/"
        for et, s in rec.series.items():
            ets.append({"summaries": [{"summary-type": st, "uri": f"{uri}{et}/{URL_SUMMARY[st]}/{w}",
                                       "time-updated": s.updated, "summary-window": w}
                                      for st, w in rec.summaries.get(et, [])],
                        "time-updated": s.updated, "base-uri": f"{uri}{et}/base",
                        "event-type": et})
        return {"url": f"{self.origin}{uri}", "metadata-key": key,
                "subject-type": rec.fields.get("subject-type", "point-to-point"),
                "event-types": ets, **{k: v for k, v in rec.fields.items() if k != "subject-type"},
                "uri": uri}


def _elmond_link(url: str, size: int, offset: int, total: int, forward: bool) -> str | None:
    """elmond's ``_get_next_link`` / ``_get_prev_link``."""
    if forward:
        if size + offset >= total:
            return None
        new_offset, new_limit = size + offset, size
        if new_offset + new_limit > total > new_offset:
            new_limit = total - new_offset
    else:
        if offset == 0:
            return None
        new_offset, new_limit = offset - size, size
        if size > offset:
            new_offset, new_limit = 0, offset
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    q.update({"limit": str(new_limit), "offset": str(new_offset)})
    return urlunsplit((*parts[:3], urlencode(q), parts[4]))


_TITLES = {400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


def _werkzeug_page(status: int, detail: str) -> str:
    title = _TITLES.get(status, "Error")
    return (f"<!doctype html>\n<html lang=en>\n<title>{status} {title}</title>\n"
            f"<h1>{title}</h1>\n<p>{detail}</p>\n")


# ---------------------------------------------------------------- faults


def _reshape(points: list[dict[str, Any]], shape: str, q: dict[str, str]) -> Any:
    if not points:
        return points
    if shape == "object":
        return {"results": points}
    if shape == "missing_ts":
        del points[len(points) // 2]["ts"]
    elif shape == "string_ts":
        for p in points:
            p["ts"] = str(p["ts"])
    elif shape == "duplicate_ts":
        return [p for p in points for _ in (0, 1)]
    elif shape == "out_of_order":
        return points[::-1]
    elif shape == "outside_window":
        _, begin, end = time_filters(q)
        after = (end if end is not None else int(time.time())) + 3600
        return [{"ts": begin - 3600, "val": points[0]["val"]}, *points,
                {"ts": after, "val": points[-1]["val"]}]
    return points


# ---------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    sim: EsmondSim

    def finish_request(self, request: Any, client_address: Any) -> None:
        sim = self.sim
        with sim._lock:
            sim.stats["connections"] += 1
            sim._conns.add(request)
        try:
            if sim.ssl_context is not None:
                request.settimeout(10)
                try:
                    tls = sim.ssl_context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    with sim._lock:
                        sim.stats["tls_failures"] += 1
                    return
                with sim._lock:
                    sim.stats["tls_handshakes"] += 1
                    sim.stats["tls_resumed"] += int(tls.session_reused)
                    sim._conns.add(tls)
                tls.settimeout(None)
                try:
                    self.RequestHandlerClass(tls, client_address, self)
                finally:
                    sim._conns.discard(tls)
                    tls.close()
            else:
                self.RequestHandlerClass(request, client_address, self)
        finally:
            with sim._lock:
                sim._conns.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up mid-answer are part of the job, not errors."""


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "esmond-sim/1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.sim._serve(self)

    def _refuse(self) -> None:
        self.server.sim._send(self, 405, b'{"detail":"Method not allowed."}', "application/json")

    do_POST = do_PUT = do_DELETE = _refuse


class EsmondSim:
    """The simulator: many archive hosts behind one loopback port.

    Use as a context manager (starts a background thread).  ``tls=(cert, key)`` serves
    HTTPS; ``client_ca`` then requires a client certificate signed by that CA.
    ``default_host`` answers requests whose Host header names no known host.
    """

    def __init__(self, bind: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None,
                 client_ca: str | None = None, default_host: str | None = None) -> None:
        self.bind, self.port = bind, port
        self.hosts: dict[str, Host] = {}
        self.by_prefix: dict[str, Host] = {}
        self.default_host = default_host
        # Answer gzip-compressed to clients that accept it, as Apache's mod_deflate does.
        self.gzip = False
        self.stats = {"connections": 0, "tls_handshakes": 0, "tls_failures": 0,
                      "tls_resumed": 0, "requests": 0, "gzipped": 0}
        self.ssl_context: ssl.SSLContext | None = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            if client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(client_ca)
            self.ssl_context = ctx
        self.scheme = "https" if tls else "http"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> EsmondSim:
        cls = _Server6 if ":" in self.bind else _Server
        self._server = cls((self.bind, self.port), _Handler)
        self._server.sim = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for h in self.hosts.values():
            h.clear_faults()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.drop_connections()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> EsmondSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connections(self) -> int:
        """Shut every open client connection (the server keeps listening)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        return len(conns)

    # -- hosts
    def host(self, name: str, prefix: str = ESMOND_PREFIX, flavor: str = "esmond") -> Host:
        """Get or create the host answering to ``Host: name`` (names are case-insensitive).

        A non-default ``prefix`` also routes requests for that path prefix to this host
        whatever their Host header (so many hosts can share ``127.0.0.1:port``).
        """
        key = name.lower()
        if key not in self.hosts:
            self.hosts[key] = Host(name, prefix, flavor)
            if prefix.rstrip("/") + "/" != ESMOND_PREFIX:
                self.by_prefix[self.hosts[key].prefix] = self.hosts[key]
        return self.hosts[key]

    def add_test(self, host: str, **kw: Any) -> Record:
        return self.host(host).add_test(**kw)

    def add_points(self, host: str, key: str, event_type: str,
                   points: Iterable[tuple[int, Any]] | None = None, **kw: Any) -> list:
        return self.hosts[host.lower()].add_points(key, event_type, points, **kw)

    def fault(self, host: str, kind: str, **kw: Any) -> Fault:
        return self.hosts[host.lower()].fault(kind, **kw)

    def clear_faults(self, host: str | None = None) -> None:
        for h in [self.hosts[host.lower()]] if host else self.hosts.values():
            h.clear_faults()

    def set_latency(self, seconds: float, host: str | None = None) -> None:
        for h in [self.hosts[host.lower()]] if host else self.hosts.values():
            h.latency = seconds

    @property
    def netloc(self) -> str:
        return f"[{self.bind}]:{self.port}" if ":" in self.bind else f"{self.bind}:{self.port}"

    def url(self, host: str | None = None, loopback: bool = False) -> str:
        """Archive read URL of ``host``: ``scheme://<name>:<port><prefix>``.

        With ``loopback`` (or for a prefix-routed host, or no host) the bind address
        stands in for the name; send ``Host: <name>`` with it to reach a named host.
        """
        h = self.hosts[host.lower()] if host else None
        if h is None or loopback or h.prefix in self.by_prefix:
            return f"{self.scheme}://{self.netloc}{h.prefix if h else ESMOND_PREFIX}"
        name = f"[{h.name}]" if ":" in h.name and not h.name.startswith("[") else h.name
        return f"{self.scheme}://{name}:{self.port}{h.prefix}"

    def resolve(self, host_header: str, path: str) -> Host | None:
        """The host a request is for: its own path prefix first, then the Host header
        (``name:port``, then ``name``), then the default host."""
        segs = path.split("/")
        for n in range(len(segs) - 1, 1, -1):
            h = self.by_prefix.get("/".join(segs[:n]) + "/")
            if h is not None:
                return h
        hh = host_header.strip().lower()
        name = hh[: hh.index("]") + 1] if hh.startswith("[") else hh.rsplit(":", 1)[0]
        h = self.hosts.get(hh) or self.hosts.get(name) or self.hosts.get(name.strip("[]"))
        if h is None and self.default_host:
            h = self.hosts.get(self.default_host.lower())
        return h

    # -- serving
    def _send(self, h: _Handler, status: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None, length: int | None = None) -> None:
        if self.gzip and length is None and "gzip" in h.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers = {**(headers or {}), "Content-Encoding": "gzip"}
            with self._lock:
                self.stats["gzipped"] += 1
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _serve(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        host_header = h.headers.get("Host", "")
        host = self.resolve(host_header, split.path)
        with self._lock:
            self.stats["requests"] += 1
        if host is None:
            self._send(h, 404, b'{"detail":"Not found."}', "application/json")
            return
        with host.lock:
            host.log.append(Request(h.command, split.path, split.query, host_header, time.time()))
        if host.latency:
            self._stop.wait(host.latency)
        fault = host._take_fault(f"{split.path}?{split.query}")
        kind = fault.kind if fault else ""
        if kind == "reset":
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if kind == "slow":
            self._stop.wait(fault.delay)
        if kind == "status":
            body = fault.body
            body = (json.dumps(body).encode() if isinstance(body, (dict, list)) else
                    body.encode() if isinstance(body, str) else body or b"")
            ctype = "application/json" if body[:1] in (b"{", b"[") else "text/html"
            self._send(h, fault.status, body, ctype)
            return
        origin = f"{self.scheme}://{host_header or self.netloc}"
        storage = "unsorted" if kind == "shape" and fault.shape == "unsorted" else "sorted"
        ans = Api(host, origin, storage).handle(split.path, split.query)
        q = dict(parse_qsl(split.query, keep_blank_values=True))
        if kind == "shape" and ans.kind == "data":
            ans.body = _reshape(ans.body, fault.shape, q)
        if kind == "page_loop" and ans.kind == "meta" and ans.body:
            here = f"{origin}{h.path}"
            ans.body[0]["metadata-next-page"] = here
            ans.headers["Link"] = f'<{here}>; rel="next"'
        if kind == "gigantic":
            self._send_gigantic(h, fault.size_mb, q)
            return
        if kind == "shape" and fault.shape == "raw_values" and ans.kind == "data" \
                and isinstance(ans.body, list):
            raw = {int(t): Raw(v) for t, v in (fault.values or {}).items()}
            for p in ans.body:
                if isinstance(p, dict) and p.get("ts") in raw:
                    p["val"] = raw[p["ts"]]
        body = ans.body if isinstance(ans.body, bytes) else (
            dumps(ans.body, sort_keys=True, indent=4) + b"\n"
            if host.flavor == "elmond" else dumps(ans.body, separators=(",", ":")))
        if kind == "nonjson":
            ans.status, ans.ctype = 200, "text/html"
            body = b"<html><body><h1>Service Temporarily Unavailable</h1></body></html>"
        if kind == "truncate":
            body = body[: max(1, len(body) // 2)]
        if kind in ("stall", "cut"):
            h.close_connection = True
            self._send(h, ans.status, body[: len(body) // 2], ans.ctype, ans.headers, len(body))
            h.wfile.flush()
            if kind == "stall":
                while not (fault.released.wait(0.05) or self._stop.is_set()):
                    pass
            return
        self._send(h, ans.status, body, ans.ctype, ans.headers)

    def _send_gigantic(self, h: _Handler, size_mb: float, q: dict[str, str]) -> None:
        """``size_mb`` of valid, ascending points, streamed (never built in memory)."""
        start = max(1_000_000_000, _positive(q.get("time-start"), 0, strict=False))
        unit = len(b'{"ts":1000000000,"val":0.5},')
        n = max(1, int(size_mb * 1e6) // unit)
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(n * unit + 1))
        h.end_headers()
        h.wfile.write(b"[")
        for off in range(0, n, 20000):
            chunk = b",".join(b'{"ts":%d,"val":0.5}' % (start + i)
                              for i in range(off, min(n, off + 20000)))
            h.wfile.write(chunk + (b"]" if off + 20000 >= n else b","))


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve simulated esmond archives until killed.")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--hosts", type=int, default=1, help="number of archive hosts")
    p.add_argument("--host-name", default="ps{n:04d}.sim",
                   help="host name pattern; hosts are also reachable by path /<name>/esmond/...")
    p.add_argument("--tests", type=int, default=4, help="tests (metadata records) per host")
    p.add_argument("--templates", default="throughput,latencybg,trace",
                   help=f"comma list, cycled over tests; of {','.join(TEMPLATES)}")
    p.add_argument("--event-types", default="", help="comma list overriding each template's")
    p.add_argument("--points", type=int, default=144, help="points per series")
    p.add_argument("--step", type=int, default=600, help="seconds between points")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    p.add_argument("--flavor", choices=("esmond", "elmond"), default="esmond")
    p.add_argument("--tls", metavar="CERTDIR", help="serve HTTPS with CERTDIR/server.{crt,key} "
                   "(made with tests/tlsutil.py if missing)")
    p.add_argument("--client-ca", action="store_true", help="with --tls: require a client "
                   "certificate signed by CERTDIR/ca.crt")
    a = p.parse_args(argv)
    tls = None
    if a.tls:
        certdir = Path(a.tls)
        if not (certdir / "server.crt").exists():
            sys.path.insert(0, str(Path(__file__).parent))
            import tlsutil

            tlsutil.make_pki(certdir)
        tls = (str(certdir / "server.crt"), str(certdir / "server.key"))
    names = [a.host_name.format(n=n) for n in range(a.hosts)]
    sim = EsmondSim(a.bind, a.port, tls=tls,
                    client_ca=str(Path(a.tls) / "ca.crt") if a.tls and a.client_ca else None,
                    default_host=names[0])
    templates = a.templates.split(",")
    ets = [e for e in a.event_types.split(",") if e] or None
    now = int(time.time())
    end = now - now % a.step
    for i, name in enumerate(names):
        prefix = ESMOND_PREFIX if i == 0 else f"/{name}{ESMOND_PREFIX}"
        h = sim.host(name, prefix, a.flavor)
        h.latency = a.latency
        for t in range(a.tests):
            h.add_test(templates[t % len(templates)], event_types=ets,
                       start=end - (a.points - 1) * a.step, step=a.step, count=a.points)
    sim.start()
    print(f"esmond-sim: {a.hosts} host(s) x {a.tests} test(s), "
          f"{sum(h.total_points() for h in sim.hosts.values())} points, on "
          f"{sim.scheme}://{sim.netloc}", flush=True)
    for i, name in enumerate(names[:20]):
        print(f"{name} {sim.url() if i == 0 else sim.url(name)}", flush=True)
    if a.hosts > 20:
        print(f"... {a.hosts - 20} more, at {sim.scheme}://{sim.netloc}/<name>{ESMOND_PREFIX}",
              flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
