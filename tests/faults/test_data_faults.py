"""Data that is odd but real loses nothing.

An archive that applies ``limit`` before it sorts (a page holds any points of the
window, unsorted) and values that strict JSON in UTF-8 cannot carry (a lone UTF-16
surrogate, a bare ``1e999``, ``-1e999`` or ``NaN``): each run ends with exit 0, every
point reaches the broker, in bodies any strict parser reads, the odd values in the
documented form (psprobe/messages.py), and no value stops its series.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from esmond_sim import ESMOND_PREFIX

from faults.conftest import STEP

A, B = "ps-a.example.org", "ps-b.example.org"


def _one_series(lab, name: str, event_type: str, points: int, **fields) -> tuple[str, int]:
    """A host with one series of ``points``, one a minute, ending 400 minutes before now
    (room for what ``lab.more`` adds)."""
    h = lab.sim.host(name, f"/{name}{ESMOND_PREFIX}")
    start = int(time.time()) // STEP * STEP - (points + 400) * STEP
    rec = h.add_test("trace", event_types=[event_type], start=start, step=STEP, count=points,
                     **fields)
    lab.set_read_url(name, lab.sim.url(name))
    lab.hosts[name] = lab.sim
    return rec.key, start


def _no_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def _strict_drain(lab) -> list[tuple[bytes, dict]]:
    """What reached the queue, each body checked to be strict JSON in strict UTF-8; the
    messages also go to ``lab.delivered`` for :meth:`Lab.tally`."""
    ch = lab.bus.channel()
    out = []
    while True:
        method, props, body = ch.basic_get(lab.bus.queue, auto_ack=True)
        if method is None:
            return out
        body.decode("utf-8")  # strict: raises on a lone surrogate's bytes
        msg = json.loads(body, parse_constant=_no_constant)  # NaN, Infinity, -Infinity
        assert props.message_id == hashlib.sha256(body).hexdigest()[:32]  # a hash of the body
        msg["_id"] = props.message_id
        lab.delivered.append(msg)
        out.append((body, msg))


def _warnings(run) -> list[str]:
    return [x for x in run.lines if x.startswith("WARNING")]


def _data_requests(lab, host: str) -> int:
    return len(lab.sim.hosts[host].requests(r"/base$"))


# ---------------------------------------------------------------- unsorted pages


def test_sorted_pages_cost_what_they_always_did(lab):
    """The usual archive (sorts, then limits): one request per page of 50, no warning."""
    lab.set("collect", first_run_lookback="7d")
    _one_series(lab, A, "throughput", 3000)
    r = lab.run(A)
    assert r.status == 0 and not _warnings(r), r.lines
    assert lab.tally(A).lost == 0
    assert _data_requests(lab, A) == 3000 // 50 + 1


def test_unsorted_pages_lose_nothing(lab, figures):
    """Each page holds the first 50 points of the window in storage order, unsorted."""
    lab.set("collect", first_run_lookback="7d")
    key, _ = _one_series(lab, A, "throughput", 3000)
    fault = lab.sim.fault(A, "shape", shape="unsorted", path=r"/base\?")
    r = lab.run(A)
    assert r.status == 0, r.lines
    assert fault.hits >= 1
    t = lab.tally(A)
    assert (t.expected, t.lost, t.duplicates) == (3000, 0, 0), t
    warned = _warnings(r)
    assert len(warned) == 1 and "out of time order" in warned[0] and key in warned[0], warned
    requests = _data_requests(lab, A)
    assert requests <= 2 * (3000 // 50), requests  # narrowing costs little
    # The fault stays: the archive keeps measuring, later runs lose nothing either.
    lab.more(A, 180)
    r2 = lab.run(A)
    assert r2.status == 0, r2.lines
    assert lab.tally(A).lost == 0
    lab.sim.clear_faults()
    lab.more(A, 60)
    _, t = lab.catch_up(A)
    assert t.lost == 0 and t.duplicates == 0
    figures.fault("data", f"unsorted pages (limit before sort), 3 000 points, {requests} requests",
                  r.status, "handled: " + warned[0].split(": ", 1)[1], t, 0)


def test_unsorted_pages_of_many_series_and_a_sorted_host_alongside(lab):
    """4 series of 600 points on one host, every page unsorted; the other host is untouched."""
    lab.set("collect", first_run_lookback="7d")
    lab.add_host(A, points=600, room=100)
    lab.add_host(B, points=600, room=100)
    lab.sim.fault(A, "shape", shape="unsorted")
    for host in (A, B):
        r = lab.run(host)
        assert r.status == 0, r.lines
        t = lab.tally(host)
        assert (t.expected, t.lost, t.duplicates) == (2400, 0, 0), (host, t)
    assert _data_requests(lab, B) == 4 * (600 // 50 + 1)


# ---------------------------------------------------------------- poison values


def test_lone_surrogate_in_a_failures_value(lab, figures):
    key, start = _one_series(lab, A, "failures", 300)
    poisoned = {start: {"error": "\ud800 lone surrogate, first point"},
                start + 150 * STEP: {"error": "udp \udfff", "nested": [{"\udc00": "key"}]}}
    lab.sim.add_points(A, key, "failures", poisoned.items())
    expect = {(key, "failures", start): {"error": "\\ud800 lone surrogate, first point"},
              (key, "failures", start + 150 * STEP): {"error": "udp \\udfff",
                                                     "nested": [{"\\udc00": "key"}]}}
    r = lab.run(A)
    assert r.status == 0, r.lines
    bodies = _strict_drain(lab)
    assert sum(len(m["datapoints"]) for _, m in bodies) == 300
    assert any(b'"error":"\\\\ud800 lone surrogate' in b for b, _ in bodies)
    t = lab.tally(A, expect=expect)
    assert (t.expected, t.delivered, t.lost) == (300, 300, 0), t
    warned = _warnings(r)
    assert len(warned) == 1 and f"{key}/failures" in warned[0] and "surrogate" in warned[0], warned
    # The series is not stopped: the next run goes on from where this one ended.
    lab.more(A, 7)
    r2 = lab.run(A)
    assert r2.status == 0 and not _warnings(r2), r2.lines
    _strict_drain(lab)
    t = lab.tally(A, expect=expect)
    assert (t.expected, t.lost, t.duplicates) == (307, 0, 0), t
    figures.fault("data", "lone surrogate in a failures value", r.status,
                  "handled: " + warned[0].split(": ", 2)[2], t, 0)


NONFINITE = [("1e999", "Infinity"), ("-1e999", "-Infinity"), ("NaN", "NaN")]


@pytest.mark.parametrize(("text", "form"), NONFINITE, ids=[t for t, _ in NONFINITE])
def test_non_finite_number_in_an_answer(lab, figures, text, form):
    key, start = _one_series(lab, A, "throughput", 300)
    chosen = [start + k * STEP for k in (0, 1, 149, 299)]
    fault = lab.sim.fault(A, "shape", shape="raw_values", values=dict.fromkeys(chosen, text))
    r = lab.run(A)
    assert r.status == 0, r.lines
    assert fault.hits >= 1
    bodies = _strict_drain(lab)
    assert not any(b"Infinity," in b or b"NaN," in b or b"Infinity}" in b for b, _ in bodies)
    assert any(f'"{chosen[0]}":"{form}"'.encode() in b for b, _ in bodies)
    t = lab.tally(A, expect={(key, "throughput", ts): form for ts in chosen})
    assert (t.expected, t.delivered, t.lost) == (300, 300, 0), t
    warned = _warnings(r)
    assert len(warned) == 1 and f"{key}/throughput" in warned[0] and "non-finite" in warned[0]
    lab.sim.clear_faults()
    lab.more(A, 7)
    assert lab.run(A).status == 0
    _strict_drain(lab)
    t = lab.tally(A, expect={(key, "throughput", ts): form for ts in chosen})
    assert (t.lost, t.duplicates) == (0, 0), t
    figures.fault("data", f"bare {text} in an answer", r.status,
                  "handled: " + warned[0].split(": ", 2)[2], t, 0)


def test_poisoned_metadata_fields(lab, figures):
    """A lone surrogate and a NaN in the metadata record: meta is made once per series."""
    from esmond_sim import Raw

    key, _ = _one_series(lab, A, "packet-trace", 120,
                         **{"input-source": "\ud800bad.example.org", "time-duration": Raw("NaN")})
    r = lab.run(A)
    assert r.status == 0, r.lines
    bodies = _strict_drain(lab)
    metas = [m["meta"] for _, m in bodies]
    assert metas and all(m["input_source"] == "\\ud800bad.example.org" for m in metas)
    assert all(m["time_duration"] == "NaN" for m in metas)
    t = lab.tally(A)
    assert (t.expected, t.delivered, t.lost) == (120, 120, 0), t
    warned = _warnings(r)
    assert len(warned) == 1, warned
    assert "input_source, time_duration" in warned[0] and f"{key}/packet-trace" in warned[0]
    figures.fault("data", "lone surrogate and NaN in metadata fields", r.status,
                  "handled: " + warned[0].split(": ", 2)[2], t, 0)


def test_unsorted_pages_that_cannot_be_narrowed_fail_the_series_loudly(lab, figures):
    """An archive that limits before sorting and whose answers stay full however narrow the
    window (here: the same 60 unsorted points whatever is asked) fails that series, at the
    point it reached; the next runs, once it answers properly, deliver everything."""
    lab.add_host(A)
    lab.add_host(B)
    assert lab.run(A).status == 0 and lab.tally(A).lost == 0
    h = lab.sim.hosts[A]
    key = next(k for k, et in h.pairs() if et == "throughput")
    lab.more(A, 120)
    new = [ts for ts, _ in h.points(key, "throughput")][-120:]
    body = [{"ts": ts, "val": 1.0} for ts in sorted(new[:60], key=lambda t: -t)]
    fault = lab.sim.fault(A, "status", status=200, body=body, path=rf"{key}/throughput/base\?")
    r = lab.run(A)
    assert r.status == 1, r.lines
    line = r.failed_line(A)
    assert "1 of 4 series" in line and "one-second window" in line and "cannot page" in line
    assert fault.hits < 40  # halving: about log2 of the window, not a point at a time
    t = lab.tally(A)
    assert t.lost == 120  # the other three series were collected; this one moved nothing
    lab.more(B, 10)
    assert lab.run(B).status == 0 and lab.tally(B).lost == 0
    lab.sim.clear_faults()
    runs, t = lab.catch_up(A)
    figures.fault("data", "unsorted full pages however narrow the window", r.status, line, t, runs)
