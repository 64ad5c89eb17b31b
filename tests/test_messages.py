"""Message bodies: byte for byte the legacy ones, and always strict JSON in UTF-8.

A value strict JSON (RFC 8259) in UTF-8 cannot carry -- a non-finite number, a lone
UTF-16 surrogate, both of which the archive's JSON can hold -- goes out in the form
psprobe/messages.py documents, with a warning, and never stops a series.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter

import pytest

from psprobe.messages import Encoder, meta_for, sanitise

REC = {"metadata-key": "0123456789abcdef0123456789abcdef", "source": "2001:db8::1",
       "destination": "192.0.2.7", "input-source": "ps-\u00e9.example.org",
       "input-destination": "ps2.example.org", "measurement-agent": "2001:db8::1",
       "tool-name": "pscheduler/powstream", "subject-type": "point-to-point",
       "time-duration": "86400.0"}
SERIES = "0123456789abcdef0123456789abcdef/histogram-owdelay"

# Made by the collector before strict JSON (commit 5b07457): the body must not move.
LEGACY = (
    b'{"meta":{"source":"2001:db8::1","destination":"192.0.2.7","input_source":"ps-\xc3\xa9.'
    b'example.org","input_destination":"ps2.example.org","measurement_agent":"2001:db8::1",'
    b'"tool_name":"pscheduler/powstream","subject_type":"point-to-point","time_duration":'
    b'"86400.0","org_metadata_key":"0123456789abcdef0123456789abcdef","event-type":'
    b'"histogram-owdelay","summaries":0,"ts_start":1700000000},"version":2,"datapoints":'
    b'{"1700000000":{"39.40":11,"39.41":77},"1700000060":{"39.42":1e-05},"1700000120":'
    b'{"x":[1,2.5,null,true,"\xc3\xbc \xe2\x80\xa8"]}}}')
LEGACY_ID = "fa490beab840a300856ff9616a2e79c6"


def _no_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict(body: bytes):
    """What any strict consumer does: UTF-8 without surrogates, no NaN/Infinity."""
    return json.loads(body.decode("utf-8"), parse_constant=_no_constant)


def encoder(record=REC, event_type="histogram-owdelay") -> Encoder:
    return Encoder(meta_for(record, event_type), "perfsonar.raw." + event_type)


def test_usual_bodies_are_the_legacy_bytes(caplog):
    m = encoder().encode([(1700000000, {"39.40": 11, "39.41": 77}),
                          (1700000060, {"39.42": 1e-05}),
                          (1700000120, {"x": [1, 2.5, None, True, "\u00fc \u2028"]})])
    assert m.body == LEGACY and m.message_id == LEGACY_ID
    assert (m.last_ts, m.points, m.routing_key) == (1700000120, 3, "perfsonar.raw.histogram-owdelay")
    assert not caplog.records


@pytest.mark.parametrize(("value", "form"), [
    (float("inf"), "Infinity"), (float("-inf"), "-Infinity"), (float("nan"), "NaN"),
    ("\ud800", "\\ud800"), ("a\udfffb\ud83d", "a\\udfffb\\ud83d"),
    ("\U0001f600 ok", "\U0001f600 ok"),  # a surrogate pair decoded to its character stays
    (1e308, 1e308), (-0.0, -0.0), (10**30, 10**30), (None, None), (True, True),
])
def test_sanitise_scalars(value, form):
    changes: Counter = Counter()
    out = sanitise(value, changes)
    assert out == form and type(out) is type(form)
    assert sum(changes.values()) == (0 if value is form or value == form else 1)


def test_sanitise_walks_keys_lists_and_nested_values():
    changes: Counter = Counter()
    hist = {"39.40": 11, "\udc00": 3, "39.41": float("nan")}
    trace = [{"ip": "192.0.2.1", "hostname": "r1.\ud800.example", "rtt": float("inf"),
              "as": {"owner": "\udbff", "number": 65000}}, ("tuple", float("-inf"))]
    failures = {"error": "\ud800 lone", "nested": {"deeper": [["\udfff"]]}}
    assert sanitise(hist, changes) == {"39.40": 11, "\\udc00": 3, "39.41": "NaN"}
    assert sanitise(trace, changes) == [
        {"ip": "192.0.2.1", "hostname": "r1.\\ud800.example", "rtt": "Infinity",
         "as": {"owner": "\\udbff", "number": 65000}}, ["tuple", "-Infinity"]]
    assert sanitise(failures, changes) == {"error": "\\ud800 lone",
                                           "nested": {"deeper": [["\\udfff"]]}}
    assert sorted(changes.values()) == [3, 5]  # 3 non-finite, 5 surrogates
    ok = {"a": [1, "b", {"c": 2.5}]}
    assert sanitise(ok) == ok


def test_poisoned_points_go_out_strict_in_the_documented_form(caplog):
    enc = encoder()
    points = [(1700000000, {"39.40": 11}), (1700000060, {"\ud800": 1, "39.41": float("inf")}),
              (1700000120, float("nan")), (1700000180, [{"hop": "\udfff", "rtt": float("-inf")}])]
    with caplog.at_level(logging.WARNING, "psprobe.messages"):
        m = enc.encode(points)
    got = strict(m.body)
    assert got["datapoints"] == {"1700000000": {"39.40": 11},
                                 "1700000060": {"\\ud800": 1, "39.41": "Infinity"},
                                 "1700000120": "NaN",
                                 "1700000180": [{"hop": "\\udfff", "rtt": "-Infinity"}]}
    assert b'"\\\\ud800":1' in m.body  # the six characters, JSON-escaped
    assert got["meta"]["ts_start"] == 1700000000 and got["version"] == 2
    assert m.message_id == hashlib.sha256(m.body).hexdigest()[:32]
    assert (m.last_ts, m.points) == (1700000180, 4)
    assert enc.encode(points).message_id == m.message_id  # deterministic, as any chunk
    # one warning per kind for the series, naming it, what changed and where
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{SERIES}: ") and "points 1700000000..1700000180" in lines[0]
    assert "3 non-finite number(s)" in lines[0] and "2 lone UTF-16 surrogate(s)" in lines[0]
    # the clean chunks of the same series are untouched and still the usual bytes
    clean = enc.encode([(1700000240, {"39.40": 11})])
    assert clean.body.endswith(b'"datapoints":{"1700000240":{"39.40":11}}}')


def test_poisoned_metadata_fields_are_carried_once_per_series(caplog):
    rec = {**REC, "input-source": "bad\ud800host", "time-duration": float("nan"),
           "destination": "192.0.2.\udfff"}
    with caplog.at_level(logging.WARNING, "psprobe.messages"):
        enc = encoder(rec)
        m1 = enc.encode([(1700000000, 1.0)])
        m2 = enc.encode([(1700000060, 2.0), (1700000120, float("inf"))])
    meta = strict(m1.body)["meta"]
    assert meta["input_source"] == "bad\\ud800host" and meta["time_duration"] == "NaN"
    assert meta["destination"] == "192.0.2.\\udfff"
    assert strict(m2.body)["meta"] == {**meta, "ts_start": 1700000060}
    assert strict(m2.body)["datapoints"] == {"1700000060": 2.0, "1700000120": "Infinity"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one for meta (once per series), one for the points
    assert "metadata field(s) destination, input_source, time_duration" in lines[0]
    assert "points 1700000060..1700000120" in lines[1]


def test_one_warning_per_kind_and_series():
    enc = encoder()
    logger = logging.getLogger("psprobe.messages")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    logger.addHandler(handler)
    try:
        for k in range(5):
            enc.encode([(1700000000 + k, float("nan"))])
        enc.encode([(1700000100, "\ud800")])
        encoder().encode([(1700000000, float("nan"))])  # another series (or run)
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 3, seen
