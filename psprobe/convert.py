"""Pushed pScheduler runs -> the esmond series, and the messages, the pull path makes.

A perfSONAR 5 testpoint keeps no archive: its ``http`` archiver pushes each
finished run record (``id, schedule, test, tool, run, task, participants,
result, reference``).  This module turns one record into what pScheduler's own
esmond archiver (``pscheduler-archiver-esmond``: its ``archive`` script and
``esmond_util.py``, the current Python 3 code being the reference) would have
written for that run, **as esmond serves it back** -- because that is what
psprobe's pull path reads and publishes.  So a pushed run and a pulled series
of the same test give the same ``meta`` and datapoints, and the messages come
from :mod:`psprobe.messages` like every other.

The record is untrusted input: whatever conversion needs is checked, and a
record it cannot use raises :class:`RunError`, one line naming the JSON path
(the receiver answers 400).  Values conversion only carries are passed on as
they are -- a strange value never drops a point (non-finite numbers are
:class:`~psprobe.messages.Encoder`'s to write).  Nothing here looks up DNS or
reads a clock: the same record always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from psprobe.hostnames import ARCHIVE_PATH
from psprobe.messages import Encoder, Message, meta_for

# esmond_util: written as the ``error`` of a failed run that says nothing.
UNSPECIFIED = "The test failed for an unspecified reason. See the server logs of the testing host(s)."

# esmond_util's DEFAULT_SUMMARIES, as (event type) -> [(summary type, window)].
_SUMMARIES: dict[str, list[tuple[str, int]]] = {
    "throughput": [("average", 86400)],
    **{et: [("aggregation", 300), ("aggregation", 3600), ("aggregation", 86400)]
       for et in ("packet-loss-rate", "packet-count-sent", "packet-count-lost",
                  "packet-count-lost-bidir")},
    "histogram-owdelay": [("aggregation", 300), ("statistics", 300), ("aggregation", 3600),
                          ("statistics", 0), ("statistics", 3600), ("aggregation", 86400),
                          ("statistics", 86400)],
    "packet-loss-rate-bidir": [("aggregation", 3600), ("aggregation", 86400)],
    "histogram-rtt": [("aggregation", 3600), ("statistics", 3600), ("aggregation", 86400),
                      ("statistics", 86400)],
}
_PLURAL = {"average": "averages", "aggregation": "aggregations", "statistics": "statistics"}

# How esmond stores, and so serves, each value (its event-type table and validators):
# float() for float types, long() for integer types and histogram counts; the rest as posted.
_FLOAT = frozenset({"throughput", "time-error-estimates"})
_INTEGER = frozenset({
    "packet-count-sent", "packet-count-lost", "packet-count-lost-bidir", "packet-duplicates",
    "packet-duplicates-bidir", "packet-reorders", "packet-reorders-bidir", "packet-retransmits",
    "path-mtu", "packet-rtt"})
_HISTOGRAM = frozenset({"histogram-owdelay", "histogram-rtt", "histogram-ttl", "histogram-ttl-reverse"})

_LATENCY_EVENTS = ("failures", "packet-count-sent", "histogram-owdelay", "histogram-ttl",
                   "packet-duplicates", "packet-loss-rate", "packet-count-lost", "packet-reorders",
                   "time-error-estimates")
_LATENCY_FIELDS = {"packet-count": "sample-size", "bucket-width": "sample-bucket-width",
                   "packet-interval": "time-probe-interval", "packet-timeout": "time-probe-timeout",
                   "ip-tos": "ip-tos", "flip": "mode-flip", "packet-padding": "ip-packet-padding",
                   "single-participant-mode": "mode-single-participant"}
_LATENCY_DATA = {"histogram-latency": "histogram-owdelay", "histogram-ttl": "histogram-ttl",
                 "packets-sent": "packet-count-sent", "packets-lost": "packet-count-lost",
                 "packets-reordered": "packet-reorders", "packets-duplicated": "packet-duplicates",
                 "max-clock-error": "time-error-estimates"}
_THROUGHPUT_FIELDS = {"tos": "ip-tos", "dscp": "ip-dscp", "buffer-length": "bw-buffer-size",
                      "parallel": "bw-parallel-streams", "bandwidth": "bw-target-bandwidth",
                      "window-size": "tcp-window-size", "dynamic-window-size": "tcp-dynamic-window-size",
                      "mss": "tcp-max-segment-size", "omit": "bw-ignore-first-seconds"}
_TRACE_FIELDS = {"algorithm": "trace-algorithm", "first-ttl": "trace-first-ttl", "fragment": "ip-fragment",
                 "hops": "trace-max-ttl", "length": "ip-packet-size", "probe-type": "ip-transport-protocol",
                 "queries": "trace-num-queries", "tos": "ip-tos"}
_RTT_EVENTS = ("failures", "packet-count-sent", "histogram-rtt", "histogram-ttl-reverse",
               "packet-duplicates-bidir", "packet-loss-rate-bidir", "packet-count-lost-bidir",
               "packet-reorders-bidir")
_RTT_FIELDS = {"count": "sample-size", "flowlabel": "ip-packet-flowlabel", "tos": "ip-tos",
               "length": "ip-packet-size", "ttl": "ip-ttl"}
_RTT_DATA = {"sent": "packet-count-sent", "lost": "packet-count-lost-bidir",
             "duplicates": "packet-duplicates-bidir", "reorders": "packet-reorders-bidir"}
# Per-interval throughput values: (summary field, event type, per-stream event type).
_INTERVAL_VALUES = (("throughput-bits", "throughput-subintervals", "streams-throughput-subintervals"),
                    ("retransmits", "packet-retransmits-subintervals",
                     "streams-packet-retransmits-subintervals"),
                    ("rtt", "packet-rtt-subintervals", "streams-packet-rtt-subintervals"),
                    ("tcp-window-size", "tcp-windowsize-subintervals",
                     "streams-tcp-windowsize-subintervals"))


class RunError(ValueError):
    """A pushed record conversion cannot use: one line, what is wrong and where (a JSON path)."""


@dataclass(frozen=True)
class Series:
    """One event type of one run, as the pull path would read it from esmond.

    ``metadata`` is the esmond metadata record (keys and string values as esmond
    serves them, with a ``metadata-key`` every run of the test shares);
    ``points`` holds this run's one ``(ts, val)``.
    """

    metadata: dict
    event_type: str
    points: list[tuple[int, Any]]


def series(run: Any) -> list[Series]:
    """The esmond series pScheduler's esmond archiver would have written for ``run``.

    Raises :class:`RunError` for a record conversion cannot use.
    """
    try:
        rec = _Run(run)
        meta, data = rec.convert()
    except RecursionError:  # walking a hostile nesting of lists and objects
        raise RunError("$: nested too deeply") from None
    return [Series(meta, et, [(rec.ts, val)]) for et, val in data.items()]


def messages(run: Any, prefix: str, chunk_points: int, *,
             event_types: Collection[str] | None = None) -> list[Message]:
    """The messages of ``run``: the same kind, routing keys and ids as the pull path's.

    ``event_types``: publish only these (the pull path's ``[collect] event_types``);
    None: every series.  A run sent twice gives the same ids (they hash the body).
    """
    out = []
    for s in series(run):
        if event_types is not None and s.event_type not in event_types:
            continue
        enc = Encoder(meta_for(s.metadata, s.event_type), prefix + s.event_type,
                      name=f"pushed {s.metadata['metadata-key']}/{s.event_type}")
        # Chunked like collect._messages (a run has one point per series: one message).
        step = max(1, chunk_points)
        out.extend(enc.encode(s.points[i:i + step]) for i in range(0, len(s.points), step))
    return out


def agent(run: Any) -> str | None:
    """The measurement agent as the record names it: the lead participant, or None.

    Used to tell who pushed when neither a token nor a certificate says so.
    """
    if not isinstance(run, dict):
        return None
    parts = run.get("participants")
    if isinstance(parts, list) and parts and isinstance(parts[0], str) and parts[0]:
        return parts[0]
    return None


# --- the conversion


class _Run:
    """One record, checked where conversion needs it; ``convert()`` does the rest."""

    def __init__(self, run: Any) -> None:
        if not isinstance(run, dict):
            raise RunError(f"$: the run record is {_kind(run)}, not an object")
        self.run = run
        # The esmond archive script reads the test from the record, else from its task
        # (pScheduler issue #929).
        test = run.get("test")
        where = "test"
        if not test and isinstance(run.get("task"), dict) and run["task"].get("test"):
            test, where = run["task"]["test"], "task.test"
        if test is None:
            raise RunError("test: missing")
        _need(test, dict, where)
        self.test_type = _need(test.get("type"), str, f"{where}.type")
        self.spec = _need(test.get("spec"), dict, f"{where}.spec")
        self.where = where
        schedule = _need(run.get("schedule"), dict, "schedule")
        self.ts = _timestamp(schedule.get("start"), "schedule.start")
        self.duration = _seconds(schedule.get("duration"), "schedule.duration")
        if "result" not in run:
            raise RunError("result: missing")
        result = run["result"]  # null: a run with no result (the archiver takes {})
        self.result = {} if result is None else _need(result, dict, "result")
        tool = run.get("tool")
        name = tool.get("name") if isinstance(tool, dict) else tool
        self.tool = _need(name, str, "tool.name" if isinstance(tool, dict) else "tool")
        parts = _need(run.get("participants"), list, "participants")
        if not parts:
            raise RunError("participants: empty list")
        self.lead = _need(parts[0], str, "participants[0]")
        ref = run.get("reference")
        self.reference = {} if ref is None else _need(ref, dict, "reference")
        href = run["run"].get("href") if isinstance(run.get("run"), dict) else None
        self.href = href if isinstance(href, str) and href else None

    def convert(self) -> tuple[dict, dict[str, Any]]:
        """(served metadata, {event type: served value}) for this run."""
        t = self.test_type
        params: dict[str, Any] = {"pscheduler-test-type": t}
        data: dict[str, Any] = {}
        kind = t if t in ("latency", "latencybg", "throughput", "trace", "rtt", "disk-to-disk") else "raw"
        if kind == "raw":  # any other test: the archive script's fallback, a raw record
            subject = self._subject(None, None)  # it names no source/dest fields: one end, the lead
            events = ["pscheduler-raw"]
            for k, v in self.spec.items():
                _flatten(params, f"pscheduler-{t}-{k}", v)
        elif kind == "disk-to-disk":
            subject = self._urls()
            events = ["failures", "throughput"]
            _fields(params, self.spec, {"parallel": "bw-parallel-streams"})
            for k, v in self.spec.items():
                _flatten(params, f"pscheduler-{t}-{k}", v)
        else:
            subject = self._subject("source", "dest")
            events, fields = {
                "latency": (list(_LATENCY_EVENTS), _LATENCY_FIELDS),
                "latencybg": (list(_LATENCY_EVENTS), _LATENCY_FIELDS),
                "throughput": (self._throughput_events(), _THROUGHPUT_FIELDS),
                "trace": (["failures", "packet-trace", "path-mtu"]
                          + (["packet-trace-multi"] if self._paris() else []), _TRACE_FIELDS),
                "rtt": (list(_RTT_EVENTS), _RTT_FIELDS),
            }[kind]
            _fields(params, self.spec, fields)
            self._extra_metadata(kind, params)
        if self.href:
            events.append("pscheduler-run-href")
        for k, v in self.reference.items():
            if not str(k).startswith("_"):
                _flatten(params, f"pscheduler-reference-{k}", v)

        if self.result.get("succeeded"):
            if kind == "raw":
                data["pscheduler-raw"] = self.result
            elif kind == "disk-to-disk":
                self._disk_to_disk(data)
            else:
                {"latency": self._latency, "latencybg": self._latency, "throughput": self._throughput,
                 "trace": self._trace, "rtt": self._rtt}[kind](data)
        else:
            data["failures"] = {"error": self._error()}
        if kind == "disk-to-disk":  # the archive script always adds the raw result for this test
            events.append("pscheduler-raw")
            data["pscheduler-raw"] = self.result
        if self.href:
            data["pscheduler-run-href"] = {"href": self.href}

        # The archive script's tool-name (live archives show it; its old tests the bare tool),
        # and time-duration: the run's scheduled slot in seconds, a float.
        meta = {**subject, "tool-name": f"pscheduler/{self.tool}", "time-duration": self.duration,
                **params}
        served = {k: _text(v) for k, v in meta.items() if v is not None or k in subject}
        key = _metadata_key(served)
        uri = f"{ARCHIVE_PATH}{key}/"
        # esmond_util writes some values (packet-rtt, tcp-windowsize, their stream and
        # subinterval forms) under event types its metadata does not list; they are listed
        # here, after the others, so that no point is left out of every series.
        listed = events + [et for et in data if et not in events]
        record = {"metadata-key": key, "uri": uri, **served,
                  "event-types": [_event_type(uri, et, self.ts if et in data else None) for et in listed]}
        values = {et: _served(et, data[et]) for et in listed if et in data}
        return record, values

    # -- metadata

    def _subject(self, src_field: str | None, dst_field: str | None) -> dict[str, Any]:
        """esmond_util's parse_addresses, without DNS (see _normalize)."""
        spec = self.spec
        ipv = spec.get("ip-version")
        src = self.lead
        if src_field and src_field in spec:
            src = _need(spec[src_field], str, f"{self.where}.spec.{src_field}")
        out: dict[str, Any] = {}
        if dst_field:
            if dst_field not in spec:
                raise RunError(f"{self.where}.spec.{dst_field}: missing")
            dst = _need(spec[dst_field], str, f"{self.where}.spec.{dst_field}")
            src_ip, dst_ip = _normalize(src, dst, ipv)
            out.update({"subject-type": "point-to-point", "source": src_ip, "input-source": src,
                        "input-destination": dst})
            if dst_ip:
                out["destination"] = dst_ip
        else:
            src_ip = _normalize(src, src, ipv)[0]
            out.update({"subject-type": "network-element", "source": src_ip, "input-source": src})
        # The agent in the source's family: the lead participant (the archive's
        # measurement-agent option is the esmond archiver's own config, not in the record).
        out["measurement-agent"] = _normalize(src_ip, self.lead)[1] if src_ip else None
        return out

    def _urls(self) -> dict[str, Any]:
        """disk-to-disk: the hosts of the source and destination URLs (else the lead)."""
        from urllib.parse import urlsplit

        ends = []
        for f in ("source", "dest"):
            host = None
            if f in self.spec:
                url = _need(self.spec[f], str, f"{self.where}.spec.{f}")
                try:
                    host = urlsplit(url).hostname
                except ValueError:
                    host = None
            ends.append(host or self.lead)
        src_ip, dst_ip = _normalize(ends[0], ends[1], self.spec.get("ip-version"))
        return {"subject-type": "point-to-point", "source": src_ip, "destination": dst_ip,
                "input-source": ends[0], "input-destination": ends[1],
                "measurement-agent": _normalize(src_ip, self.lead)[1] if src_ip else None}

    def _parallel(self) -> bool:
        p = self.spec.get("parallel")
        if p is None:
            return False
        return _number(p, f"{self.where}.spec.parallel") > 1

    def _udp(self) -> bool:
        return bool(self.spec.get("udp"))

    def _paris(self) -> bool:
        return self.spec.get("algorithm") == "paris-traceroute"

    def _throughput_events(self) -> list[str]:
        par = self._parallel()
        events = ["failures", "throughput", "throughput-subintervals"]
        if par:
            events += ["streams-throughput", "streams-throughput-subintervals"]
        if self._udp():
            events += ["packet-loss-rate", "packet-count-lost", "packet-count-sent"]
        else:
            events += ["packet-retransmits", "packet-retransmits-subintervals"]
            if par:
                events += ["streams-packet-retransmits", "streams-packet-retransmits-subintervals"]
        return events

    def _extra_metadata(self, kind: str, params: dict[str, Any]) -> None:
        spec, at = self.spec, f"{self.where}.spec"
        if kind == "throughput":
            params["ip-transport-protocol"] = "udp" if self._udp() else "tcp"
        elif kind == "trace":
            for f, name in (("sendwait", "time-probe-interval"), ("wait", "time-test-timeout")):
                if spec.get(f):
                    params[name] = _seconds(spec[f], f"{at}.{f}")
        elif kind == "rtt":
            for f, name in (("interval", "time-probe-interval"), ("timeout", "time-test-timeout"),
                            ("deadline", "time-probe-timeout")):
                if spec.get(f):
                    params[name] = _seconds(spec[f], f"{at}.{f}")

    def _error(self) -> str:
        """A failed run's message: the result's error, else the run's errors, else esmond_util's."""
        err = self.result.get("error")
        if err:
            return err if isinstance(err, str) else json.dumps(err, sort_keys=True)
        errs = self.run["run"].get("errors") if isinstance(self.run.get("run"), dict) else None
        if isinstance(errs, str) and errs.strip():
            return errs
        return UNSPECIFIED

    # -- data (one method per esmond_util record class)

    def _mapped(self, data: dict[str, Any], fields: dict[str, str]) -> None:
        """The values esmond_util copies as they are (a null is no value; an empty dict esmond refused)."""
        for f, et in fields.items():
            v = self.result.get(f)
            if v is None or (isinstance(v, dict) and not v):
                continue
            data[et] = v

    def _rate(self, data: dict[str, Any], et: str, obj: dict, num: str, den: str, at: str) -> None:
        """A loss rate as esmond serves it: numerator / denominator (stored as both, served as
        the fraction); none when either is missing or the denominator is 0, as esmond_util."""
        if obj.get(num) is None or obj.get(den) is None:
            return
        n = _number(obj[num], f"{at}.{num}")
        d = _number(obj[den], f"{at}.{den}")
        if d == 0:
            return
        data[et] = n / d

    def _latency(self, data: dict[str, Any]) -> None:
        self._mapped(data, _LATENCY_DATA)
        self._rate(data, "packet-loss-rate", self.result, "packets-lost", "packets-sent", "result")

    def _rtt(self, data: dict[str, Any]) -> None:
        self._mapped(data, _RTT_DATA)
        trips = self.result.get("roundtrips") or []
        _need(trips, list, "result.roundtrips")
        rtts: dict[str, int] = {}
        ttls: dict[str, int] = {}
        for i, rt in enumerate(trips):
            at = f"result.roundtrips[{i}]"
            _need(rt, dict, at)
            if rt.get("rtt"):
                ms = "%.2f" % (_seconds(rt["rtt"], f"{at}.rtt") * 1000)
                rtts[ms] = rtts.get(ms, 0) + 1
            if rt.get("ttl"):
                ttl = rt["ttl"]
                if isinstance(ttl, (dict, list)):
                    raise RunError(f"{at}.ttl: {_kind(ttl)}, not a number")
                k = _text(ttl)
                ttls[k] = ttls.get(k, 0) + 1
        if rtts:
            data["histogram-rtt"] = rtts
        if ttls:
            data["histogram-ttl-reverse"] = ttls
        self._rate(data, "packet-loss-rate-bidir", self.result, "lost", "sent", "result")

    def _trace(self, data: dict[str, Any]) -> None:
        paths = _need(self.result.get("paths"), list, "result.paths")
        formatted = []
        pmtu = mtu = None  # the path MTU; the last MTU seen (carried on, across paths too)
        for p, path in enumerate(paths):
            _need(path, list, f"result.paths[{p}]")
            out = []
            for h, hop in enumerate(path):
                at = f"result.paths[{p}][{h}]"
                _need(hop, dict, at)
                f: dict[str, Any] = {"ttl": h + 1, "query": 1}  # one query per hop in this test
                if hop.get("error"):
                    f["success"], f["error-message"] = 0, hop["error"]
                else:
                    f["success"] = 1
                for k in ("ip", "hostname", "as"):
                    if hop.get(k):
                        f[k] = hop[k]
                if hop.get("rtt") is not None:
                    f["rtt"] = _seconds(hop["rtt"], f"{at}.rtt") * 1000  # ms
                if hop.get("mtu") is not None:
                    f["mtu"] = mtu = _number(hop["mtu"], f"{at}.mtu")
                    if pmtu is None or pmtu > mtu:
                        pmtu = mtu  # the path MTU is the smallest seen
                elif mtu is not None:
                    f["mtu"] = mtu
                out.append(f)
            formatted.append(out)
        first = next((p for p in formatted if p), None)  # packet-trace holds one path
        if first:
            data["packet-trace"] = first
        if pmtu is not None:
            data["path-mtu"] = pmtu
        if self._paris() and formatted:
            data["packet-trace-multi"] = formatted

    def _throughput(self, data: dict[str, Any]) -> None:
        udp, par = self._udp(), self._parallel()
        summary = self.result.get("summary")
        if summary:
            _need(summary, dict, "result.summary")
            total = summary.get("summary")
            if total:
                _need(total, dict, "result.summary.summary")
                pick = [("throughput-bits", "throughput")]
                pick += ([("sent", "packet-count-sent"), ("lost", "packet-count-lost")] if udp else
                         [("retransmits", "packet-retransmits"), ("rtt", "packet-rtt"),
                          ("tcp-window-size", "tcp-windowsize")])
                for f, et in pick:
                    if total.get(f) is not None:
                        data[et] = total[f]
                if udp:
                    self._rate(data, "packet-loss-rate", total, "lost", "sent", "result.summary.summary")
            streams = summary.get("streams")
            if streams and par:
                streams = _sorted_streams(_need(streams, list, "result.summary.streams"),
                                          "result.summary.streams")
                data["streams-throughput"] = [s.get("throughput-bits") for s in streams]
                if not udp:
                    # esmond_util drops a stream's 0 here (a truthiness test), which shifts the
                    # list against streams-throughput; every stream's value is kept instead.
                    for f, et in (("retransmits", "streams-packet-retransmits"),
                                  ("rtt", "streams-packet-rtt"),
                                  ("tcp-window-size", "streams-tcp-windowsize")):
                        vals = [s[f] for s in streams if s.get(f) is not None]
                        if vals:
                            data[et] = vals
        intervals = self.result.get("intervals")
        if intervals:
            self._intervals(data, _need(intervals, list, "result.intervals"), udp, par)

    def _intervals(self, data: dict[str, Any], intervals: list, udp: bool, par: bool) -> None:
        whole: dict[str, list] = {et: [] for _, et, _ in _INTERVAL_VALUES}
        per: dict[str, dict[Any, list]] = {et: {} for _, _, et in _INTERVAL_VALUES}
        for i, iv in enumerate(intervals):
            at = f"result.intervals[{i}]"
            _need(iv, dict, at)
            s = iv.get("summary")
            if s:
                _need(s, dict, f"{at}.summary")
                span = _span(s, f"{at}.summary")
                if span:
                    for f, et, _ in _INTERVAL_VALUES:
                        if s.get(f) is not None:
                            whole[et].append({"start": span[0], "duration": span[1], "val": s[f]})
            if iv.get("streams") and par:
                for j, st in enumerate(_need(iv["streams"], list, f"{at}.streams")):
                    _need(st, dict, f"{at}.streams[{j}]")
                    span = _span(st, f"{at}.streams[{j}]")
                    sid = st.get("stream-id")
                    if not span or sid is None:
                        continue
                    for f, _, et in _INTERVAL_VALUES:
                        lst = per[et].setdefault(sid, [])
                        if st.get(f) is not None:
                            lst.append({"start": span[0], "duration": span[1], "val": st[f]})
        tcp_only = {"packet-retransmits-subintervals", "packet-rtt-subintervals",
                    "tcp-windowsize-subintervals", "streams-packet-retransmits-subintervals",
                    "streams-packet-rtt-subintervals", "streams-tcp-windowsize-subintervals"}
        for _, et, set_ in _INTERVAL_VALUES:
            if whole[et] and not (udp and et in tcp_only):
                data[et] = whole[et]
            # The current esmond_util sends a streams list only when it has streams (since 2020).
            if per[set_] and not (udp and set_ in tcp_only):
                ids = _sorted_ids(list(per[set_]), "result.intervals[].streams[].stream-id")
                data[set_] = [per[set_][k] for k in ids]

    def _disk_to_disk(self, data: dict[str, Any]) -> None:
        tput = self.result.get("throughput")
        if tput is not None:
            data["throughput"] = float(_number(tput, "result.throughput"))


# --- helpers


def _metadata_key(served: dict[str, Any]) -> str:
    """32 hex characters from the test's identity: every field of its metadata record.

    Every run of one test has the same record (the test spec, tool, lead and
    reference make it; the run's result and time do not), so they share the key,
    as they share one esmond metadata (esmond answers a POST of metadata it
    holds with the existing key).
    """
    canon = json.dumps(served, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"psprobe-pushed-metadata/1\n" + canon.encode()).hexdigest()[:32]


def _event_type(uri: str, et: str, updated: int | None) -> dict[str, Any]:
    """One entry of the record's ``event-types``, shaped as esmond lists it."""
    return {"event-type": et, "base-uri": f"{uri}{et}/base", "time-updated": updated,
            "summaries": [{"summary-type": st, "summary-window": str(w),
                           "uri": f"{uri}{et}/{_PLURAL[st]}/{w}", "time-updated": updated}
                          for st, w in _SUMMARIES.get(et, [])]}


def _served(et: str, val: Any) -> Any:
    """``val`` as esmond gives it back: its validators store float() for float types and
    long() for integers and histogram counts.  Only what converts exactly is converted;
    anything else passes as it came (a point is never dropped, nor truncated)."""
    if et in _FLOAT and isinstance(val, int) and not isinstance(val, bool):
        try:
            return float(val)
        except OverflowError:
            return val
    if et in _INTEGER:
        return _integral(val)
    if et in _HISTOGRAM and isinstance(val, dict):
        return {_text(k): _integral(v) for k, v in val.items()}
    return val


def _integral(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


def _text(v: Any) -> Any:
    """A metadata value as esmond serves it: esmond keeps free-form fields as text.

    Python's str() of the posted value (``True``, ``68.0``, ``PT10S`` in live
    archives); a list or object as compact JSON (esmond kept Python's repr);
    a string, or None, as it is.
    """
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _fields(params: dict[str, Any], spec: dict, fields: dict[str, str]) -> None:
    for f, name in fields.items():
        if f in spec:
            params[name] = spec[f]


def _flatten(params: dict[str, Any], key: str, val: Any) -> None:
    """esmond_util's parse_metadata_field: lists by index (one level), objects by key
    (skipping keys that start with ``_``, which pScheduler keeps private)."""
    if isinstance(val, list):
        for i, v in enumerate(val):
            params[f"{key}-{i}"] = v
    elif isinstance(val, dict):
        for k, v in val.items():
            if not str(k).startswith("_"):
                _flatten(params, f"{key}-{k}", v)
    else:
        params[key] = val


def _normalize(a: str, b: str, ip_version: Any = None) -> tuple[str | None, str | None]:
    """pScheduler's ip_normalize_version without DNS.

    Two IP literals are paired as it pairs them (the forced version, else both
    IPv6, else both IPv4, else none).  A host name is kept as the record gives
    it: resolving here would block, and make the message (so its id) depend on
    this host's resolver and the moment.
    """
    fa, fb = _literal(a), _literal(b)
    if fa is None or fb is None:
        return (fa[1] if fa else a), (fb[1] if fb else b)
    if ip_version in (4, 6):
        return (fa[1], fb[1]) if fa[0] == fb[0] == ip_version else (None, None)
    return (fa[1], fb[1]) if fa[0] == fb[0] else (None, None)


def _literal(addr: str) -> tuple[int, str] | None:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    return ip.version, ip.compressed


_DURATION = re.compile(
    r"P(?:(?P<w>\d+(?:[.,]\d+)?)W)?(?:(?P<d>\d+(?:[.,]\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:[.,]\d+)?)H)?(?:(?P<m>\d+(?:[.,]\d+)?)M)?(?:(?P<s>\d+(?:[.,]\d+)?)S)?)?")


def _seconds(v: Any, at: str) -> float:
    """An ISO 8601 duration in seconds, as pScheduler's iso8601_as_timedelta().total_seconds()
    (a timedelta: microsecond resolution)."""
    text = _need(v, str, at)
    m = _DURATION.fullmatch(text.strip())
    if not m or not any(m.groupdict().values()) or text.strip().endswith("T"):
        raise RunError(f"{at}: not an ISO 8601 duration (PnDTnHnMnS): {_show(v)}")
    n = {k: float(x.replace(",", ".")) if x else 0.0 for k, x in m.groupdict().items()}
    try:
        td = timedelta(weeks=n["w"], days=n["d"], hours=n["h"], minutes=n["m"], seconds=n["s"])
    except OverflowError:
        raise RunError(f"{at}: duration out of range: {_show(v)}") from None
    return td.total_seconds()


_DATETIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,]\d+)?"
                       r"(Z|[+-]\d\d(?::?\d\d)?)?")


def _timestamp(v: Any, at: str) -> int:
    """An ISO 8601 time as whole epoch seconds, as the archive script's timegm(utctimetuple())
    (fractions dropped; no offset means UTC)."""
    text = _need(v, str, at)
    m = _DATETIME.fullmatch(text.strip())
    if not m:
        raise RunError(f"{at}: not an ISO 8601 date and time: {_show(v)}")
    zone = m.group(7)
    offset = timedelta(0)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
    try:
        dt = datetime(*map(int, m.groups()[:6]), tzinfo=timezone(offset))
    except ValueError as e:
        raise RunError(f"{at}: {e}: {_show(v)}") from None
    return int(dt.timestamp())


def _span(obj: dict, at: str) -> tuple[Any, Any] | None:
    """(start, duration) of an interval; None when it has no start or end (esmond_util skips it)."""
    start, end = obj.get("start"), obj.get("end")
    if start is None or end is None:
        return None
    return start, _number(end, f"{at}.end") - _number(start, f"{at}.start")


def _sorted_streams(streams: list, at: str) -> list[dict]:
    for j, s in enumerate(streams):
        _need(s, dict, f"{at}[{j}]")
        if "stream-id" not in s:
            raise RunError(f"{at}[{j}].stream-id: missing")
    try:
        return sorted(streams, key=lambda s: s["stream-id"])
    except TypeError:
        raise RunError(f"{at}[].stream-id: stream ids that do not sort together") from None


def _sorted_ids(ids: list, at: str) -> list:
    try:
        return sorted(ids)
    except TypeError:
        raise RunError(f"{at}: stream ids that do not sort together") from None


def _number(v: Any, at: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RunError(f"{at}: {_kind(v)}, not a number: {_show(v)}")
    return v


def _need(v: Any, typ: type, at: str) -> Any:
    if not isinstance(v, typ):
        want = {dict: "an object", list: "a list", str: "a string"}.get(typ, typ.__name__)
        what = "missing" if v is None else f"{_kind(v)}, not {want}"
        raise RunError(f"{at}: {what}")
    return v


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
