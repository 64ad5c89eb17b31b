"""The archive simulator answers like esmond/elmond, and its faults fire and clear."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

import tlsutil
from esmond_sim import ESMOND_PREFIX, FORMATS_DIR, EsmondSim, Raw, Series, make_value

T0 = 1_600_000_000


@pytest.fixture()
def sim():
    with EsmondSim(default_host="ps.example.org") as s:
        yield s


def walk_metadata(url: str, **params) -> list[list[dict]]:
    pages, seen = [], set()
    while url:
        assert url not in seen, "page loop"
        seen.add(url)
        r = requests.get(url, params=params if not pages else None, timeout=5)
        assert r.status_code == 200
        page = r.json()
        pages.append(page)
        url = page[0]["metadata-next-page"] if page else None
        link = r.headers.get("Link", "")
        assert (f'<{url}>; rel="next"' in link) if url else 'rel="next"' not in link
    return pages


def test_metadata_pages_by_1500_and_chain_covers_every_record_once(sim):
    h = sim.host("ps.example.org")
    keys = [h.add_test("trace", start=T0, count=1).key for _ in range(3100)]
    pages = walk_metadata(sim.url())
    assert [len(p) for p in pages] == [1500, 1500, 100]
    assert [r["metadata-key"] for p in pages for r in p] == keys
    first = pages[0][0]
    assert first["metadata-count-total"] == 3100 and first["metadata-previous-page"] is None
    assert first["metadata-next-page"].endswith(f"{ESMOND_PREFIX}?limit=1500&offset=1500")
    assert pages[1][0]["metadata-previous-page"].endswith(f"{ESMOND_PREFIX}?limit=1500")
    assert all("metadata-count-total" not in r for r in pages[0][1:])
    assert sum(map(len, walk_metadata(sim.url(), limit=1000))) == 3100
    # limit=0 or garbage falls back to the default page, as DRF does
    assert len(requests.get(sim.url(), params={"limit": "x"}).json()) == 1500


def test_record_shape_is_the_real_one(sim):
    rec = sim.host("ps.example.org").add_test("latencybg", start=T0, count=3)
    r = requests.get(sim.url()).json()[0]
    uri = f"{ESMOND_PREFIX}{rec.key}/"
    assert re.fullmatch("[0-9a-f]{32}", r["metadata-key"])
    assert r["uri"] == uri and r["url"] == f"http://{sim.netloc}{uri}"
    assert r["tool-name"] == "pscheduler/powstream" and r["sample-size"] == "600"
    owd = next(e for e in r["event-types"] if e["event-type"] == "histogram-owdelay")
    assert owd["base-uri"] == f"{uri}histogram-owdelay/base" and owd["time-updated"] == T0 + 1200
    assert {"summary-type": "aggregation", "summary-window": "300", "time-updated": T0 + 1200,
            "uri": f"{uri}histogram-owdelay/aggregations/300"} in owd["summaries"]
    assert requests.get(f"http://{sim.netloc}{uri}").json()["metadata-key"] == rec.key


@pytest.mark.skipif(not FORMATS_DIR.exists(), reason="shared/formats not beside the repo")
def test_serves_a_real_capture_verbatim(sim):
    path = FORMATS_DIR / "esmond/real_captures/metadata_list__perfsonar.debrecen3.hbone.hu__2018.json"
    real = json.loads(path.read_text())
    assert sim.host("ps.example.org").load_capture(path) == 101
    served = requests.get(sim.url()).json()
    assert served == real  # same pagination keys on the first record, same values


@pytest.mark.parametrize(("event_type", "check"), [
    ("throughput", lambda v: isinstance(v, float)),
    ("packet-count-sent", lambda v: isinstance(v, int)),
    ("packet-loss-rate", lambda v: isinstance(v, float) and 0 <= v <= 1),
    ("histogram-owdelay", lambda v: all(isinstance(c, int) for c in v.values())),
    ("throughput-subintervals", lambda v: {"start", "duration", "val"} == set(v[0])),
    ("packet-trace", lambda v: v[0]["ttl"] == 1 and v[0]["query"] == 1 and "number" in v[0]["as"]),
    ("failures", lambda v: set(v) == {"error"}),
])
def test_value_types_follow_the_event_type_table(event_type, check):
    assert check(make_value(event_type, T0, seed=7))


def test_metadata_time_and_event_type_filters(sim):
    h = sim.host("ps.example.org")
    old = h.add_test("throughput", start=T0, count=10)
    new = h.add_test("latencybg", start=T0 + 86400, count=10)
    keys = lambda **p: [r["metadata-key"] for r in requests.get(sim.url(), params=p).json()]  # noqa: E731
    assert keys() == [old.key, new.key]
    assert keys(**{"time-start": T0 + 86400}) == [new.key]
    assert keys(**{"time-start": T0, "time-end": T0 + 86400}) == [old.key]
    assert keys(**{"event-type": "throughput"}) == [old.key]
    assert keys(**{"event-type": "throughput", "time-start": T0 + 86400}) == []
    assert keys(**{"tool-name": "pscheduler/powstream"}) == [new.key]
    r = requests.get(sim.url(), params={"time-start": "yesterday"})
    assert (r.status_code, r.json()) == (400, {"detail": "Time parameter must be an integer"})


def test_data_paging_by_limit_and_time_start_loses_nothing(sim):
    h = sim.host("ps.example.org")
    rec = h.add_test("throughput", event_types=["throughput"], start=T0, step=30, count=5000)
    url = f"http://{sim.netloc}{ESMOND_PREFIX}{rec.key}/throughput/base"
    got, start = [], T0
    while True:
        page = requests.get(url, params={"time-start": start, "limit": 1000}).json()
        got += page
        if len(page) < 1000:
            break
        start = page[-1]["ts"] + 1
    assert [(p["ts"], p["val"]) for p in got] == h.points(rec.key, "throughput")
    assert len(got) == 5000 == h.total_points()
    r = requests.get(url, params={"time-start": T0})  # no limit: esmond's 1500 and a Link
    assert len(r.json()) == 1500 and "offset=1500" in r.headers["Link"]
    window = requests.get(url, params={"time-start": T0 + 30, "time-end": T0 + 90}).json()
    assert [p["ts"] for p in window] == [T0 + 30, T0 + 60, T0 + 90]


def test_data_errors_are_esmonds(sim):
    rec = sim.host("ps.example.org").add_test("throughput", start=T0, count=5)
    base = f"http://{sim.netloc}{ESMOND_PREFIX}"

    def get(path, **params):
        r = requests.get(base + path, params=params)
        return r.status_code, r.json() if r.headers["Content-Type"] == "application/json" else None

    data = f"{rec.key}/throughput/base"
    assert get(data, **{"time-start": "1.5"}) == (400, {"detail": "Time parameter must be an integer"})
    assert get(data, **{"time-start": T0 + 9, "time-end": T0}) == (
        400, {"detail": "Requested start time must be less than end time"})
    assert get(data, limit="many")[0] == 500
    assert get(f"{'0' * 32}/throughput/base") == (200, [])
    assert get(f"{rec.key}/no-such-type/base") == (
        400, {"detail": "Unsupported event type 'no-such-type' provided"})
    assert get(f"{rec.key}/throughput/sums") == (400, {"detail": "Invalid summary type 'sums'"})
    assert get(f"{'0' * 32}/") == (404, {"detail": "Not found."})
    assert requests.get(f"http://{sim.netloc}/elsewhere/").status_code == 404


def test_add_points_moves_time_updated_and_serves_them(sim):
    h = sim.host("ps.example.org")
    rec = h.add_test("throughput", event_types=["throughput"], start=T0, step=60, count=10)
    added = h.add_points(rec.key, "throughput", count=5)
    assert [t for t, _ in added] == [T0 + 600 + 60 * k for k in range(5)]
    et = requests.get(sim.url()).json()[0]["event-types"][0]
    assert et["time-updated"] == T0 + 840
    h.add_points(rec.key, "throughput", [(T0 + 10_000, 1.5)])
    data = requests.get(f"http://{sim.netloc}{et['base-uri']}", params={"time-start": T0 + 841}).json()
    assert data == [{"ts": T0 + 10_000, "val": 1.5}]


def test_series_merges_grid_and_explicit_points():
    s = Series(lambda t: t * 2, start=100, step=10, count=5)  # 100..140
    s.add([(120, "x"), (95, "early"), (200, "late")])
    assert list(s.iter()) == [(95, "early"), (100, 200), (110, 220), (120, "x"), (130, 260),
                              (140, 280), (200, "late")]
    assert s.count() == 7 and s.count(105, 135) == 3 and s.last_ts == 200
    assert list(s.iter(121, 199)) == [(130, 260), (140, 280)]


def test_elmond_flavour(sim):
    h = sim.host("ps5.example.org", flavor="elmond")
    rec = h.add_test("throughput", start=T0, count=1500)
    hdr = {"Host": "ps5.example.org"}
    r = requests.get(sim.url(), headers=hdr).json()[0]
    assert re.fullmatch("[0-9a-f]{64}", rec.key) and r["time-duration"] == 39.0
    et = next(e for e in r["event-types"] if e["event-type"] == "throughput")
    assert et["base-uri"] == f"/esmond/perfsonar/archive/{rec.key}/throughput/base/0"
    assert et["time-updated"] == T0 and et["summaries"][0]["summary-window"] == 86400
    data = f"http://{sim.netloc}{et['base-uri']}"
    assert len(requests.get(data, headers=hdr, params={"time-start": T0}).json()) == 1000
    bad = requests.get(data, headers=hdr, params={"limit": 10001})
    assert bad.status_code == 400 and bad.text.startswith("<!doctype html>")
    assert requests.get(f"{sim.url()}{rec.key}/", headers=hdr).status_code == 404
    assert requests.get(f"{sim.url()}{rec.key}", headers=hdr).json()["metadata-key"] == rec.key
    href = next(e for e in r["event-types"] if e["event-type"] == "pscheduler-run-href")
    val = requests.get(f"http://{sim.netloc}{href['base-uri']}", headers=hdr,
                       params={"time-start": T0, "limit": 1}).json()[0]["val"]
    assert isinstance(val, str)


def test_hosts_are_told_apart_by_host_header_and_prefix():
    with EsmondSim() as sim:
        a = sim.host("a.example").add_test("trace", start=T0, count=1).key
        b = sim.host("b.example").add_test("trace", start=T0, count=1).key
        c = sim.host("c.example", prefix="/c/esmond/perfsonar/archive/").add_test(
            "trace", start=T0, count=1).key
        local = sim.host(sim.netloc).add_test("trace", start=T0, count=1).key

        def keys(url, host=None):
            r = requests.get(url, headers={"Host": host} if host else {})
            return r.status_code, [x["metadata-key"] for x in r.json()] if r.ok else None

        assert keys(sim.url(), "a.example") == (200, [a])
        assert keys(sim.url(), "B.example:8443") == (200, [b])
        assert keys(sim.url("c.example")) == (200, [c])
        assert keys(sim.url()) == (200, [local])  # Host: 127.0.0.1:<port>
        assert keys(sim.url(), "nobody.example")[0] == 404
        assert [r.path for r in sim.hosts["a.example"].requests()] == [ESMOND_PREFIX]


def test_tls_with_required_client_certificate(tmp_path):
    pki = tlsutil.make_pki(tmp_path)
    with EsmondSim(tls=(str(pki.server_cert), str(pki.server_key)), client_ca=str(pki.ca),
                   default_host="x") as sim:
        sim.host("x").add_test("trace", start=T0, count=3)
        url = f"https://localhost:{sim.port}{ESMOND_PREFIX}"
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, verify=str(pki.ca), timeout=5)
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(url, verify=str(pki.ca), timeout=5,
                         cert=(str(pki.wrong_client_cert), str(pki.wrong_client_key)))
        before = sim.stats["tls_handshakes"]
        with requests.Session() as s:  # verify per request: REQUESTS_CA_BUNDLE beats s.verify
            s.cert = (str(pki.client_cert), str(pki.client_key))
            for _ in range(3):
                r = s.get(url, timeout=5, verify=str(pki.ca))
                assert r.json()[0]["metadata-count-total"] == 1
        assert sim.stats["tls_handshakes"] - before == 1  # keep-alive: one handshake
        assert sim.stats["tls_failures"] >= 2


@pytest.mark.parametrize("which", ["expired", "wrong_ca"])
def test_tls_bad_server_certificates_are_refused_by_a_verifying_client(tmp_path, which):
    pki = tlsutil.make_pki(tmp_path)
    cert = (pki.expired_cert, pki.expired_key) if which == "expired" else \
        (pki.wrong_server_cert, pki.wrong_server_key)
    with EsmondSim(tls=(str(cert[0]), str(cert[1])), default_host="x") as sim:
        sim.host("x")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://localhost:{sim.port}/", verify=str(pki.ca), timeout=5)


def test_faults_fire_count_down_and_clear(sim):
    h = sim.host("ps.example.org")
    rec = h.add_test("throughput", event_types=["throughput"], start=T0, count=10)
    data = f"http://{sim.netloc}{ESMOND_PREFIX}{rec.key}/throughput/base"
    q = {"time-start": T0, "time-end": T0 + 5400}

    h.fault("status", status=503, times=2)
    assert [requests.get(data).status_code for _ in range(3)] == [503, 503, 200]
    h.fault("status", status=502, body={"detail": "bad gateway"}, path="/throughput/")
    assert requests.get(sim.url()).status_code == 200  # path filter
    assert requests.get(data).json() == {"detail": "bad gateway"}
    h.clear_faults()
    assert requests.get(data).status_code == 200

    def faulty(kind, **kw):
        h.fault(kind, times=1, **kw)
        return requests.get(data, params=q, timeout=5)

    assert faulty("shape", shape="object").json()["results"][0]["ts"] == T0
    assert "ts" not in faulty("shape", shape="missing_ts").json()[5]
    assert faulty("shape", shape="string_ts").json()[0]["ts"] == str(T0)
    dup = [p["ts"] for p in faulty("shape", shape="duplicate_ts").json()]
    assert dup[:2] == [T0, T0] and len(dup) == 20
    assert faulty("shape", shape="out_of_order").json()[0]["ts"] == T0 + 5400
    outside = [p["ts"] for p in faulty("shape", shape="outside_window").json()]
    assert outside[0] < T0 and outside[-1] > T0 + 5400
    with pytest.raises(ValueError):
        faulty("truncate").json()
    nonjson = faulty("nonjson")
    assert nonjson.status_code == 200 and nonjson.text.startswith("<html>")
    h.fault("cut", times=1)  # shorter than its Content-Length (urllib3 1.x would not say so)
    u = urlsplit(data)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", f"{u.path}?{urlencode(q)}")
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()
    conn.close()
    with pytest.raises(requests.exceptions.ConnectionError):
        faulty("reset")
    big = faulty("gigantic", size_mb=2)
    assert len(big.content) > 1_990_000 and big.json()[0]["ts"] == T0
    assert len(requests.get(data, params=q).json()) == 10  # all one-shot faults are gone


def test_page_loop_points_back(sim):
    h = sim.host("ps.example.org")
    for _ in range(3):
        h.add_test("trace", start=T0, count=1)
    h.fault("page_loop")
    first = requests.get(sim.url(), params={"limit": 2})
    assert first.json()[0]["metadata-next-page"] == first.url
    assert f"<{first.url}>" in first.headers["Link"]


def test_unsorted_limits_in_a_fixed_storage_order_and_serves_it_unsorted(sim):
    h = sim.host("ps.example.org")
    rec = h.add_test("throughput", event_types=["throughput"], start=T0, step=60, count=300)
    data = f"http://{sim.netloc}{ESMOND_PREFIX}{rec.key}/throughput/base"
    q = {"time-start": T0, "time-end": T0 + 299 * 60, "limit": 50}
    everything = dict(h.points(rec.key, "throughput"))
    h.fault("shape", shape="unsorted")
    page = requests.get(data, params=q).json()
    ts = [p["ts"] for p in page]
    assert len(ts) == 50 and ts != sorted(ts)  # limited, and not in time order
    assert sorted(ts) != sorted(everything)[:50]  # not the window's first 50 either
    assert all(everything[p["ts"]] == p["val"] for p in page)
    assert requests.get(data, params=q).json() == page  # the same storage order every time
    pages = [requests.get(data, params={**q, "offset": o}).json() for o in range(0, 300, 50)]
    assert sorted(p["ts"] for pg in pages for p in pg) == sorted(everything)  # offsets cover all
    small = {"time-start": T0 + 60, "time-end": T0 + 600, "limit": 50}  # a window under limit
    assert sorted(p["ts"] for p in requests.get(data, params=small).json()) == \
        [T0 + 60 * k for k in range(1, 11)]
    h.clear_faults()
    assert [p["ts"] for p in requests.get(data, params=q).json()] == sorted(everything)[:50]
    with pytest.raises(ValueError):
        h.fault("shape", shape="sideways")


def test_poison_values_are_served_as_raw_json_text(sim):
    h = sim.host("ps.example.org")
    rec = h.add_test("trace", event_types=["failures", "throughput"], start=T0, step=60, count=5)
    h.add_points(rec.key, "failures", [(T0 + 60, {"error": "\ud800 lone surrogate"}),
                                       (T0 + 120, Raw('{"error": "\\udfff raw"}'))])
    h.add_points(rec.key, "throughput", [(T0, Raw("1e999")), (T0 + 60, Raw("-1e999")),
                                         (T0 + 120, float("nan"))])
    base = f"http://{sim.netloc}{ESMOND_PREFIX}{rec.key}"
    q = {"time-start": T0, "time-end": T0 + 240}
    fails = requests.get(f"{base}/failures/base", params=q).content
    assert b'{"ts":%d,"val":{"error":"\\ud800 lone surrogate"}}' % (T0 + 60) in fails
    assert b'{"ts":%d,"val":{"error": "\\udfff raw"}}' % (T0 + 120) in fails
    vals = [p["val"] for p in json.loads(fails)]
    assert vals[1] == {"error": "\ud800 lone surrogate"} and vals[2] == {"error": "\udfff raw"}
    tput = requests.get(f"{base}/throughput/base", params=q).content
    assert b'"val":1e999}' in tput and b'"val":-1e999}' in tput and b'"val":NaN}' in tput
    got = [p["val"] for p in json.loads(tput)][:3]
    assert got[:2] == [float("inf"), float("-inf")] and got[2] != got[2]
    # raw_values rewrites chosen points of an answer, whatever the series holds
    h.fault("shape", shape="raw_values", values={T0 + 180: "1e999", T0 + 240: "NaN"}, times=1)
    raw = requests.get(f"{base}/throughput/base", params=q).content
    assert b'{"ts":%d,"val":1e999}' % (T0 + 180) in raw
    assert b'{"ts":%d,"val":NaN}' % (T0 + 240) in raw
    assert b"1e999}" not in requests.get(f"{base}/throughput/base",
                                         params={"time-start": T0 + 180}).content
    # and in metadata (esmond's compact form and elmond's indented one)
    h.add_test("trace", **{"input-source": Raw('"\\ud800.example.org"')})
    assert b'"input-source":"\\ud800.example.org"' in requests.get(sim.url()).content
    h5 = sim.host("ps5.example.org", flavor="elmond")
    h5.add_test("trace", **{"input-source": Raw('"\\ud800.example.org"')})
    meta = requests.get(sim.url(), headers={"Host": "ps5.example.org"}).content
    assert b'"input-source": "\\ud800.example.org"' in meta


def test_slow_stall_and_latency(sim):
    h = sim.host("ps.example.org")
    h.add_test("trace", start=T0, count=1)
    h.fault("slow", delay=5, times=1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(sim.url(), timeout=0.3)
    stall = h.fault("stall", times=1)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(sim.url(), timeout=0.3)
    stall.release()
    h.latency = 0.2
    r = requests.get(sim.url(), timeout=5)
    assert r.ok and r.elapsed.total_seconds() >= 0.2
    assert sim.stats["requests"] == len(h.requests()) == 3


def test_hostile_raw_records_are_served_verbatim(sim):
    h = sim.host("ps.example.org")
    nasty = {"metadata-key": "../../etc", "event-types": [
        {"event-type": "throughput/../../x?y=1", "base-uri": "http://evil.example/steal",
         "time-updated": T0, "summaries": []}]}
    h.add_raw_record(nasty, data={"/esmond/perfsonar/archive/odd/throughput/base": [(T0, 1.0)]})
    page = requests.get(sim.url()).json()
    assert page[0]["event-types"] == nasty["event-types"]
    odd = requests.get(f"http://{sim.netloc}/esmond/perfsonar/archive/odd/throughput/base",
                       params={"time-start": T0}).json()
    assert odd == [{"ts": T0, "val": 1.0}]


def test_cli_serves_until_killed():
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("esmond_sim.py")),
                             "--port", "0", "--hosts", "3", "--tests", "2", "--points", "5"],
                            stdout=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        assert "3 host(s) x 2 test(s), 240 points" in banner, banner
        urls = [proc.stdout.readline().split()[1] for _ in range(3)]
        assert [len(requests.get(u, timeout=5).json()) for u in urls] == [2, 2, 2]
        assert urls[2].endswith(f"/ps0002.sim{ESMOND_PREFIX}")
    finally:
        proc.kill()
        proc.wait()
