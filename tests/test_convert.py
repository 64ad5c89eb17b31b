"""Pushed runs -> the series pScheduler's esmond archiver would have written, as esmond serves them.

The reference is pScheduler's current ``esmond_util.py`` and ``archive`` script; what its
test file expected is in fixtures/pushed/expected (Python 2 era: SOURCES.md's caveats --
``tool-name`` was bare there and ``pscheduler/<tool>`` in use, ``time-duration`` comes from
the run's schedule, and empty ``streams-*`` lists are no longer sent).  What esmond serves
back differs from what was posted as its validators make it: free-form metadata as text,
``float()`` for float types, a loss rate as the fraction numerator / denominator.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from psprobe import convert
from psprobe.convert import RunError
from psprobe.messages import meta_for

HERE = Path(__file__).resolve().parent / "fixtures" / "pushed"
REAL = sorted((HERE / "real").glob("*.json"))
PREFIX = "perfsonar.raw."
TS = 1497971206  # the esmond_util tests' test_start_time


def load(path: Path):
    return json.loads(path.read_text())


def real(name: str) -> dict:
    return load(HERE / "real" / name)


def built(name: str) -> dict:
    return load(HERE / "built" / name)


def expected(name: str):
    return load(HERE / "expected" / name)


def by_type(run) -> dict[str, convert.Series]:
    return {s.event_type: s for s in convert.series(run)}


def values(run) -> dict[str, object]:
    out = {}
    for et, s in by_type(run).items():
        [(_ts, val)] = s.points  # one run: one point per series
        out[et] = val
    return out


def _no_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict(body: bytes):
    return json.loads(body.decode("utf-8"), parse_constant=_no_constant)


def put_values(name: str) -> dict[str, object]:
    """{event type: val} of an expected bulk PUT (one data point, at TS)."""
    [point] = expected(name)
    assert point["ts"] == TS
    return {v["event-type"]: v["val"] for v in point["val"]}


def served_meta(posted: dict) -> dict[str, object]:
    """An expected metadata POST as esmond serves it back, with SOURCES.md's caveats applied."""
    out = {k: (v if isinstance(v, str) else str(v)) for k, v in posted.items() if k != "event-types"}
    out["tool-name"] = "pscheduler/" + posted["tool-name"]  # the archive script's form
    out["time-duration"] = str(float(posted["time-duration"]))  # iso8601_to_seconds(): a float
    return out


# --- every real pushed record


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_every_real_record_converts_to_messages(path):
    run = load(path)
    msgs = convert.messages(run, PREFIX, 1000)
    ss = convert.series(run)
    assert msgs and len(msgs) == len(ss)
    key = ss[0].metadata["metadata-key"]
    assert len(key) == 32 and int(key, 16) >= 0
    start = convert._timestamp(run["schedule"]["start"], "schedule.start")
    for s, m in zip(ss, msgs):
        assert m.routing_key == PREFIX + s.event_type
        body = strict(m.body)
        assert body["version"] == 2 and body["meta"]["event-type"] == s.event_type
        assert body["meta"]["org_metadata_key"] == key
        assert body["meta"]["tool_name"] == "pscheduler/" + run["tool"]["name"]
        assert body["meta"]["time_duration"] == str(convert._seconds(run["schedule"]["duration"], "d"))
        assert body["meta"]["ts_start"] == start and list(body["datapoints"]) == [str(start)]
        assert (m.points, m.last_ts) == (1, start)
    assert convert.agent(run) == run["participants"][0]


def test_real_rtt_ping_as_esmond_util_writes_it():
    run = real("rtt__ping_1.1.1.1.json")
    s = by_type(run)
    md = s["packet-count-sent"].metadata
    # No source in the spec: the lead participant.  A host name stays a name (no DNS here).
    assert {k: md[k] for k in ("subject-type", "source", "destination", "input-source",
                               "input-destination", "measurement-agent", "tool-name",
                               "time-duration", "pscheduler-test-type")} == {
        "subject-type": "point-to-point", "source": "lima-perfsonar-vm", "destination": "1.1.1.1",
        "input-source": "lima-perfsonar-vm", "input-destination": "1.1.1.1",
        "measurement-agent": "lima-perfsonar-vm", "tool-name": "pscheduler/ping",
        "time-duration": "10.0", "pscheduler-test-type": "rtt"}
    assert [e["event-type"] for e in md["event-types"]] == [
        "failures", "packet-count-sent", "histogram-rtt", "histogram-ttl-reverse",
        "packet-duplicates-bidir", "packet-loss-rate-bidir", "packet-count-lost-bidir",
        "packet-reorders-bidir", "pscheduler-run-href"]
    assert values(run) == {
        "packet-count-sent": 5, "packet-count-lost-bidir": 0, "packet-duplicates-bidir": 0,
        "packet-reorders-bidir": 0,
        # "%.2f" of each roundtrip's rtt in ms
        "histogram-rtt": {"8.96": 1, "9.16": 1, "9.78": 1, "8.79": 1, "8.61": 1},
        "histogram-ttl-reverse": {"57": 5},
        "packet-loss-rate-bidir": 0.0,  # stored {numerator 0, denominator 5}, served 0/5
        "pscheduler-run-href": {"href": run["run"]["href"]}}
    assert s["packet-count-sent"].points[0][0] == 1785131123  # schedule.start, 2026-07-27T05:45:23Z


def test_real_total_loss_has_no_histogram_and_a_rate_of_one():
    v = values(real("rtt__ping_100pct_loss.json"))
    assert "histogram-rtt" not in v and "histogram-ttl-reverse" not in v and "failures" not in v
    assert (v["packet-count-lost-bidir"], v["packet-count-sent"], v["packet-loss-rate-bidir"]) == (5, 5, 1.0)


def test_real_latency_twping():
    run = real("latency__twping.json")
    v = values(run)
    r = run["result"]
    assert v["histogram-owdelay"] == r["histogram-latency"] and v["histogram-ttl"] == {"255": 100}
    assert (v["packet-count-sent"], v["packet-count-lost"], v["packet-reorders"], v["packet-duplicates"],
            v["time-error-estimates"], v["packet-loss-rate"]) == (100, 0, 0, 0, 27.47, 0.0)
    md = by_type(run)["histogram-owdelay"].metadata
    assert (md["source"], md["destination"], md["measurement-agent"]) == (
        "192.168.1.104", "192.168.1.101", "192.168.1.104")
    assert "protocol" not in json.dumps(md)  # not in esmond_util's latency field map


def test_real_trace_hops():
    run = real("trace__traceroute_1.1.1.1.json")
    v = values(run)
    hops = v["packet-trace"]
    assert len(hops) == 8 and "path-mtu" not in v
    assert hops[0] == {"ttl": 1, "query": 1, "success": 1, "ip": "192.168.1.1", "hostname": "ntt.setup",
                       "rtt": 1.4}
    assert hops[1] == {"ttl": 2, "query": 1, "success": 1}  # no answer: esmond_util's "success"
    assert hops[7]["as"] == {"owner": "CLOUDFLARENET - Cloudflare, Inc., US", "number": 13335}
    assert hops[7]["rtt"] == pytest.approx(10.1)


def test_real_throughput_tcp_with_subintervals_and_retransmits():
    run = real("throughput__iperf3.json")
    v = values(run)
    r = run["result"]
    total = r["summary"]["summary"]
    spans = [(i["summary"]["start"], i["summary"]["end"] - i["summary"]["start"]) for i in r["intervals"]]
    assert v["throughput"] == float(total["throughput-bits"])
    assert v["packet-retransmits"] == total["retransmits"] == 7
    assert v["throughput-subintervals"] == [
        {"start": s, "duration": d, "val": i["summary"]["throughput-bits"]}
        for (s, d), i in zip(spans, r["intervals"])]
    assert [x["val"] for x in v["packet-retransmits-subintervals"]] == [
        i["summary"]["retransmits"] for i in r["intervals"]]
    # The same event types as the expected TCP body, without the empty streams lists
    # today's esmond_util no longer sends (one stream: not parallel).
    want = {et for et, val in put_values("throughput_iperf3_tcp__bulk_data_PUT.json").items() if val != []}
    assert set(v) - {"pscheduler-run-href"} == want
    md = by_type(run)["throughput"].metadata
    assert md["ip-transport-protocol"] == "tcp" and "bw-parallel-streams" not in md
    assert [e["event-type"] for e in md["event-types"]][:5] == [
        e["event-type"] for e in expected("throughput_iperf3_tcp__metadata_POST.json")["event-types"]]


def _two_streams(run: dict) -> dict:
    """The real iperf3 record as a parallel=2 run: every stream doubled as stream 3, which
    sorts first (esmond_util orders streams by id)."""
    run = copy.deepcopy(run)
    run["test"]["spec"]["parallel"] = 2
    res = run["result"]
    for holder in [res["summary"], *res["intervals"]]:
        twin = [{**s, "stream-id": 3, "throughput-bits": s["throughput-bits"] / 2} for s in holder["streams"]]
        holder["streams"] = holder["streams"] + twin
    return run


def test_two_streams_give_the_streams_series_in_stream_id_order():
    base = real("throughput__iperf3.json")
    run = _two_streams(base)
    v = values(run)
    tb = base["result"]["summary"]["streams"][0]["throughput-bits"]
    assert v["streams-throughput"] == [tb / 2, tb]
    assert v["streams-packet-retransmits"] == [7, 7] and v["streams-packet-rtt"] == [5802, 5802]
    n = len(base["result"]["intervals"])
    for et in ("streams-throughput-subintervals", "streams-packet-retransmits-subintervals",
               "streams-packet-rtt-subintervals", "streams-tcp-windowsize-subintervals"):
        assert [len(x) for x in v[et]] == [n, n], et
    want = set(put_values("throughput_iperf3_parallel2__bulk_data_PUT.json"))
    assert set(v) - {"pscheduler-run-href"} == want
    md = by_type(run)["throughput"].metadata
    listed = [e["event-type"] for e in md["event-types"]]
    posted = [e["event-type"]
              for e in expected("throughput_iperf3_parallel2__metadata_POST.json")["event-types"]]
    assert listed[:len(posted)] == posted
    # esmond_util writes these without listing them: listed after the others, so none is lost.
    assert set(listed[len(posted):]) == {"pscheduler-run-href", "streams-packet-rtt",
                                         "streams-packet-rtt-subintervals",
                                         "streams-tcp-windowsize-subintervals"}
    assert md["bw-parallel-streams"] == "2"
    # The metadata (so the key) changes with the spec: another test.
    assert md["metadata-key"] != by_type(base)["throughput"].metadata["metadata-key"]


def test_a_zero_in_one_stream_is_kept_in_place():
    run = _two_streams(real("throughput__iperf3.json"))
    run["result"]["summary"]["streams"][1]["retransmits"] = 0  # stream 3 after sorting: first
    assert values(run)["streams-packet-retransmits"] == [0, 7]


def test_udp_gives_loss_and_no_retransmits():
    run = copy.deepcopy(real("throughput__iperf3.json"))
    run["test"]["spec"]["udp"] = True
    run["result"]["summary"]["summary"].update(sent=42779, lost=3)
    v = values(run)
    assert (v["packet-count-sent"], v["packet-count-lost"]) == (42779, 3)
    assert v["packet-loss-rate"] == 3 / 42779
    want = {et for et, val in put_values("throughput_iperf3_udp__bulk_data_PUT.json").items() if val != []}
    assert set(v) - {"pscheduler-run-href"} == want
    md = by_type(run)["throughput"].metadata
    assert md["ip-transport-protocol"] == "udp"
    posted = expected("throughput_iperf3_udp__metadata_POST.json")["event-types"]
    assert [e["event-type"] for e in md["event-types"]][:-1] == [e["event-type"] for e in posted]


# --- the esmond_util test inputs against what that test expected


@pytest.mark.parametrize("name", ["latency_powstream", "rtt_ping", "trace_traceroute", "trace_tracepath"])
def test_built_records_match_the_expected_metadata(name):
    posted = expected(f"{name}__metadata_POST.json")
    ss = convert.series(built(f"{name}.json"))
    md = ss[0].metadata
    fields = {k: v for k, v in md.items() if k not in ("metadata-key", "uri", "event-types")}
    assert fields == served_meta(posted)
    assert [e["event-type"] for e in md["event-types"]] == [e["event-type"] for e in posted["event-types"]]
    for ours, theirs in zip(md["event-types"], posted["event-types"]):
        want = {(s["summary-type"], str(s["summary-window"])) for s in theirs.get("summaries", [])}
        if ours["event-type"] == "histogram-rtt":
            # The old expectation has a statistics/0 summary today's DEFAULT_SUMMARIES lacks.
            want.discard(("statistics", "0"))
        assert {(s["summary-type"], s["summary-window"]) for s in ours["summaries"]} == want
        assert ours["base-uri"] == f"/esmond/perfsonar/archive/{md['metadata-key']}/{ours['event-type']}/base"


# What esmond gives back for what was PUT, where it is not the value itself.
SERVED = {
    "latency_powstream": {"packet-loss-rate": 0 / 600, "time-error-estimates": 0.0},
    "rtt_ping": {"packet-loss-rate-bidir": 0 / 5},
}


@pytest.mark.parametrize("name", ["latency_powstream", "rtt_ping", "trace_traceroute", "trace_tracepath"])
def test_built_records_match_the_expected_data(name):
    want = {**put_values(f"{name}__bulk_data_PUT.json"), **SERVED.get(name, {})}
    got = values(built(f"{name}.json"))
    assert got == want
    assert {et: type(v) for et, v in got.items()} == {et: type(v) for et, v in want.items()}


def test_tracepath_mtu_and_the_silent_hop():
    v = values(built("trace_tracepath.json"))
    assert v["path-mtu"] == 9000
    assert v["packet-trace"][6] == {"ttl": 7, "query": 1, "success": 1, "mtu": 9000}  # carried on


def test_other_test_types_are_stored_raw_as_the_archive_script_does():
    run = built("raw_other_test.json")
    s = by_type(run)
    assert set(s) == {"pscheduler-raw"}
    assert values(run)["pscheduler-raw"] == put_values("raw_other_test__bulk_data_PUT.json")["pscheduler-raw"]
    md = s["pscheduler-raw"].metadata
    posted = expected("raw_other_test__metadata_POST.json")
    params = {k: v for k, v in served_meta(posted).items() if k.startswith("pscheduler-bar-")}
    params["pscheduler-bar-list-key-4"] = '{"key1":"val1"}'  # an object in a list: JSON text here
    assert {k: v for k, v in md.items() if k.startswith("pscheduler-bar-")} == params
    assert (md["pscheduler-test-type"], md["tool-name"]) == ("bar", "pscheduler/foo")
    # The archive script stores raw records without source/dest fields: one end, the lead.
    assert (md["subject-type"], md["source"], md["input-source"], md["measurement-agent"]) == (
        "network-element", "10.0.0.1", "10.0.0.1", "10.0.0.1")
    assert "destination" not in md and meta_for(md, "pscheduler-raw")["destination"] is None


def test_reference_fields_are_flattened_into_the_metadata():
    run = real("trace__traceroute_1.1.1.1.json")
    made = {"uuid": "4E68656E", "user-agent": "psconfig-pscheduler-agent"}
    run["reference"] = {"psconfig": {"created-by": made}, "_secret": "x", "tags": ["a", "b"]}
    md = by_type(run)["packet-trace"].metadata
    ref = {k: v for k, v in md.items() if k.startswith("pscheduler-reference-")}
    assert ref == {  # the names live archives show
        "pscheduler-reference-psconfig-created-by-uuid": "4E68656E",
        "pscheduler-reference-psconfig-created-by-user-agent": "psconfig-pscheduler-agent",
        "pscheduler-reference-tags-0": "a", "pscheduler-reference-tags-1": "b"}
    # A task's reference is part of its identity, as it is of esmond's metadata.
    assert md["metadata-key"] != by_type(real("trace__traceroute_1.1.1.1.json"))["packet-trace"].metadata[
        "metadata-key"]


def test_disk_to_disk_as_the_archive_script_stores_it():
    run = built("raw_other_test.json")
    run["test"] = {"type": "disk-to-disk",
                   "spec": {"source": "ftp://files.example.org/x", "dest": "file:///tmp/x", "parallel": 2}}
    run["result"] = {"succeeded": True, "throughput": 123}
    v = values(run)
    assert v == {"throughput": 123.0, "pscheduler-raw": run["result"]}
    md = by_type(run)["throughput"].metadata
    assert (md["input-source"], md["input-destination"], md["bw-parallel-streams"]) == (
        "files.example.org", "10.0.0.1", "2")  # a URL without a host: the lead
    assert md["pscheduler-disk-to-disk-source"] == "ftp://files.example.org/x"


def test_a_hostile_nesting_is_refused():
    run = built("raw_other_test.json")
    deep: dict = {}
    for _ in range(5000):
        deep = {"k": deep}
    run["test"]["spec"]["deep"] = deep
    with pytest.raises(RunError, match="nested too deeply"):
        convert.series(run)


@pytest.mark.parametrize("name", ["failure", "failure_unspecified"])
def test_failures(name):
    v = values(built(f"{name}.json"))
    assert v == put_values(f"{name}__bulk_data_PUT.json")


def test_a_failed_run_of_a_test_shares_its_key_and_says_why():
    ok = real("rtt__ping_1.1.1.1.json")
    bad = copy.deepcopy(ok)
    bad["result"] = {"succeeded": False, "error": "ping: unknown host"}
    s = by_type(bad)
    assert set(s) == {"failures", "pscheduler-run-href"}
    assert s["failures"].points == [(1785131123, {"error": "ping: unknown host"})]
    assert s["failures"].metadata["metadata-key"] == by_type(ok)["packet-count-sent"].metadata["metadata-key"]
    # No result at all: the run's errors say why, else esmond_util's words.
    bad["result"] = None
    bad["run"]["errors"] = "Run never started"
    assert values(bad)["failures"] == {"error": "Run never started"}
    bad["run"]["errors"] = None
    assert values(bad)["failures"] == {"error": convert.UNSPECIFIED}


# --- messages: ids, keys, strict JSON


def test_same_run_twice_gives_the_same_messages():
    run = real("latency__twping.json")
    a = convert.messages(run, PREFIX, 1000)
    b = convert.messages(json.loads(json.dumps(run)), PREFIX, 1000)
    assert a == b and len({m.message_id for m in a}) == len(a)


def test_two_runs_of_one_test_share_the_key_not_the_ids():
    one = real("rtt__ping_1.1.1.1.json")
    two = copy.deepcopy(one)
    two["id"] = "another-run"
    two["schedule"]["start"] = "2026-07-27T05:55:23+00:00"
    two["run"]["href"] = one["run"]["href"].replace(one["id"], "another-run")
    two["result"]["roundtrips"][0]["rtt"] = "PT0.0091S"
    m1 = {strict(m.body)["meta"]["event-type"]: m for m in convert.messages(one, PREFIX, 1000)}
    m2 = {strict(m.body)["meta"]["event-type"]: m for m in convert.messages(two, PREFIX, 1000)}
    assert set(m1) == set(m2)
    for et in m1:
        keys = {strict(m.body)["meta"]["org_metadata_key"] for m in (m1[et], m2[et])}
        assert len(keys) == 1
        assert m1[et].message_id != m2[et].message_id
    # Another test (another destination): another key.
    three = copy.deepcopy(one)
    three["test"]["spec"]["dest"] = "1.0.0.1"
    assert by_type(three)["packet-count-sent"].metadata["metadata-key"] != \
        by_type(one)["packet-count-sent"].metadata["metadata-key"]


def test_messages_carry_what_the_pull_path_would_publish():
    run = real("rtt__ping_1.1.1.1.json")
    [m] = convert.messages(run, PREFIX, 1000, event_types={"packet-loss-rate-bidir"})
    body = strict(m.body)
    assert m.routing_key == "perfsonar.raw.packet-loss-rate-bidir"
    assert body["meta"] == {
        "source": "lima-perfsonar-vm", "destination": "1.1.1.1", "input_source": "lima-perfsonar-vm",
        "input_destination": "1.1.1.1", "measurement_agent": "lima-perfsonar-vm",
        "tool_name": "pscheduler/ping", "subject_type": "point-to-point", "time_duration": "10.0",
        "org_metadata_key": by_type(run)["packet-count-sent"].metadata["metadata-key"],
        "event-type": "packet-loss-rate-bidir", "summaries": 0, "ts_start": 1785131123}
    assert body["datapoints"] == {"1785131123": 0.0}
    assert convert.messages(run, PREFIX, 1000, event_types=()) == []


def test_strange_values_are_kept_and_bodies_stay_strict(caplog):
    run = real("latency__twping.json")
    run["result"]["max-clock-error"] = float("nan")
    run["result"]["histogram-ttl"] = {"255": float("inf")}
    run["test"]["spec"]["ip-tos"] = "\ud800"
    msgs = {m.routing_key[len(PREFIX):]: m for m in convert.messages(run, PREFIX, 1000)}
    bodies = {et: strict(m.body) for et, m in msgs.items()}  # strict JSON, every one
    assert list(bodies["time-error-estimates"]["datapoints"].values()) == ["NaN"]
    assert list(bodies["histogram-ttl"]["datapoints"].values()) == [{"255": "Infinity"}]
    assert "NaN" in caplog.text


# --- records conversion cannot use


def _broken(name: str, change) -> dict:
    run = real(name)
    change(run)
    return run


BAD = [
    ("no schedule", "rtt__ping_1.1.1.1.json", lambda r: r.pop("schedule"), "schedule: missing"),
    ("start a number", "rtt__ping_1.1.1.1.json", lambda r: r["schedule"].update(start=5),
     "schedule.start: a number, not a string"),
    ("start not a time", "rtt__ping_1.1.1.1.json", lambda r: r["schedule"].update(start="yesterday"),
     "schedule.start: not an ISO 8601 date and time"),
    ("duration in months", "rtt__ping_1.1.1.1.json", lambda r: r["schedule"].update(duration="P1M"),
     "schedule.duration: not an ISO 8601 duration"),
    ("no test", "rtt__ping_1.1.1.1.json", lambda r: (r.pop("test"), r.pop("task")), "test: missing"),
    ("spec a list", "rtt__ping_1.1.1.1.json", lambda r: r["test"].update(spec=[]),
     "test.spec: a list, not an object"),
    ("no dest", "rtt__ping_1.1.1.1.json", lambda r: r["test"]["spec"].pop("dest"), "test.spec.dest: missing"),
    ("no result", "rtt__ping_1.1.1.1.json", lambda r: r.pop("result"), "result: missing"),
    ("result a string", "rtt__ping_1.1.1.1.json", lambda r: r.update(result="ok"),
     "result: a string, not an object"),
    ("rtt not a duration", "rtt__ping_1.1.1.1.json",
     lambda r: r["result"]["roundtrips"][2].update(rtt="9 ms"), "result.roundtrips[2].rtt: not an ISO 8601"),
    ("no participants", "rtt__ping_1.1.1.1.json", lambda r: r.update(participants=[]),
     "participants: empty list"),
    ("no tool", "rtt__ping_1.1.1.1.json", lambda r: r.pop("tool"), "tool: missing"),
    ("loss count a string", "latency__twping.json", lambda r: r["result"].update({"packets-sent": "many"}),
     "result.packets-sent: a string, not a number"),
    ("hop a string", "trace__traceroute_1.1.1.1.json", lambda r: r["result"]["paths"][0].__setitem__(1, "*"),
     "result.paths[0][1]: a string, not an object"),
    ("parallel a string", "throughput__iperf3.json", lambda r: r["test"]["spec"].update(parallel="two"),
     "test.spec.parallel: a string, not a number"),
    ("interval end a string", "throughput__iperf3.json",
     lambda r: r["result"]["intervals"][3]["summary"].update(end="soon"),
     "result.intervals[3].summary.end: a string, not a number"),
]


@pytest.mark.parametrize(("case", "name", "change", "message"), BAD, ids=[c for c, *_ in BAD])
def test_bad_records_are_refused_with_the_path(case, name, change, message):
    with pytest.raises(RunError) as e:
        convert.messages(_broken(name, change), PREFIX, 1000)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("run", [[], "x", None, 5])
def test_a_record_that_is_no_object_is_refused(run):
    with pytest.raises(RunError, match=r"^\$: the run record is "):
        convert.series(run)


def test_the_test_may_come_from_the_task():
    run = real("rtt__ping_1.1.1.1.json")
    run.pop("test")  # the archive script falls back to the task's (pScheduler issue #929)
    assert values(run) == values(real("rtt__ping_1.1.1.1.json"))


def test_agent_is_the_lead_participant_or_none():
    assert convert.agent(real("throughput__iperf3.json")) == "192.168.1.104"
    assert convert.agent([]) is None and convert.agent({"participants": [5]}) is None


def test_iso8601_as_pscheduler_reads_it():
    assert "%.2f" % (convert._seconds("PT0.00896S", "x") * 1000) == "8.96"
    assert convert._seconds("PT0.0000005S", "x") == 0.0  # a timedelta: microseconds, half to even
    assert convert._seconds("P1DT2H3M4.5S", "x") == 93784.5
    assert convert._seconds("P0D", "x") == 0.0
    assert convert._timestamp("2017-06-20T15:06:46+00:00", "x") == TS
    assert convert._timestamp("2017-06-20T17:06:46.75+02:00", "x") == TS
    assert convert._timestamp("2017-06-20T15:06:46Z", "x") == TS
    for bad in ("PT", "P", "P1DT", "1S", "PT-1S"):
        with pytest.raises(RunError):
            convert._seconds(bad, "x")


def test_ip_literals_pair_as_pscheduler_pairs_them():
    assert convert._normalize("2001:DB8::0:1", "2001:db8::2") == ("2001:db8::1", "2001:db8::2")
    assert convert._normalize("192.0.2.1", "2001:db8::2") == (None, None)  # no common version
    assert convert._normalize("192.0.2.1", "192.0.2.2", 6) == (None, None)
    assert convert._normalize("host.example", "192.0.2.2") == ("host.example", "192.0.2.2")
