"""psprobe.mesh: real MeshConfig / pSConfig documents -> the archives to collect, and hostile meshes."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from psprobe import hostnames, mesh
from psprobe.mesh import MeshError, discover, parse_document

FORMATS = Path(__file__).resolve().parent / "fixtures" / "formats"  # real documents
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mesh"
ARCHIVE = "/esmond/perfsonar/archive/"


def real(name: str) -> object:
    return json.loads((FORMATS / name).read_text())


def fixture(name: str) -> object:
    return json.loads((FIXTURES / name).read_text())


def https(host: str) -> str:
    return f"https://{host}{ARCHIVE}"


def http(host: str) -> str:
    return f"http://{host}{ARCHIVE}"


LATENTPUT = {  # the same mesh published by psconfig-web in both formats
    "asdf": "http://asdf/",  # the mesh-level / test archive of the real document
    "perf-tokyo.sinet.ad.jp": https("perf-tokyo.sinet.ad.jp"),
    "perfsonar.cbio.uct.ac.za": https("perfsonar.cbio.uct.ac.za"),
}

REAL = {
    # 13 test members, every one archives to the mesh-level MA.
    "meshconfig/perfsonar_dev_testbed__meshconfig.json": {
        "perfsonar-testbed-ma.grnoc.iu.edu": https("perfsonar-testbed-ma.grnoc.iu.edu")
    },
    # 5 members: 2 with host-level archives, 3 inheriting the mesh-level "http://asdf/".
    "meshconfig/pwa__latentput__meshconfig.json": LATENTPUT,
    "pSConfig/pwa_published__latentput.json": LATENTPUT,
    # 5 addresses, task archive dev8 plus host archives dev9, dev99, nms1.
    "pSConfig/pwa_published__publisher1-multi-mas.json": {
        "nms1-10g.jp.apan.net": https("nms1-10g.jp.apan.net"),
        "perfsonar-dev8.grnoc.iu.edu": https("perfsonar-dev8.grnoc.iu.edu"),
        "perfsonar-dev9.grnoc.iu.edu": https("perfsonar-dev9.grnoc.iu.edu"),
        "perfsonar-dev99.grnoc.iu.edu": https("perfsonar-dev99.grnoc.iu.edu"),
    },
    # http archive to /logstash with _meta.esmond_url.
    "pSConfig/example-1-simple.json": {"archive.perfsonar.net": http("archive.perfsonar.net")},
    "pSConfig/example-5-classes.json": {"archive.perfsonar.net": http("archive.perfsonar.net")},
    # 19 addresses, 6 enabled tasks, all to the central archive; 6 disabled IPv6 tasks.
    "pSConfig/example-2-testbed.json": {
        "perfsonar-testbed-ma.grnoc.iu.edu": http("perfsonar-testbed-ma.grnoc.iu.edu")
    },
    # 18 addresses on 9 hosts, tasks without archives, one host-level archive per host.
    "pSConfig/example-3-circuits.json": {
        h: http(h)
        for h in [
            "amst-pt1.es.net",
            "aofa-pt1.es.net",
            "bost-pt1.es.net",
            "cern-513.es.net",
            "ga-pt1.es.net",
            "lond-pt1.es.net",
            "lsvn-pt1.es.net",
            "newy-pt1.es.net",
            "wash-pt1.es.net",
        ]
    },
    # snmptrap only: nothing can be read back.
    "pSConfig/example-4-snmp.json": {},
    # FILL_IN_... placeholders are not host names.
    "pSConfig/skeleton.json": {},
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_documents_give_the_expected_hosts(name):
    targets, includes, _ = parse_document(real(name), name)
    assert targets == REAL[name]
    assert includes == []
    for host in targets:
        assert hostnames.normalise(host) == host


def test_real_documents_warn_only_where_they_should():
    for name in REAL:
        _, _, warnings = parse_document(real(name), name)
        if name.endswith("example-4-snmp.json"):
            assert warnings == [
                f"mesh {name}: archive 'archive-snmp': archiver 'snmptrap' cannot be read "
                "back; it gives no host to collect"
            ]
        elif name.endswith("skeleton.json"):
            assert len(warnings) == 3
            assert all(w.startswith(f"mesh {name}: ") and "FILL_IN_" in w and "'_'" in w for w in warnings)
        else:
            assert warnings == [], name


@pytest.mark.parametrize(
    "name",
    [
        "pSConfig/psconfig-schema.json",
        "pSConfig/psconfig-pscheduler-agent-schema.json",
        "meshconfig/meshconfig-schema.json",
    ],
)
def test_a_schema_is_not_a_mesh(name):
    with pytest.raises(MeshError, match="not a MeshConfig, pSConfig or include document"):
        parse_document(real(name), name)


def test_address_classes_are_evaluated():
    doc = real("pSConfig/example-5-classes.json")
    for task in doc["tasks"].values():
        del task["archives"]  # now every address that runs a task is read on its toolkit
    targets, _, warnings = parse_document(doc, "ex5")
    assert warnings == []
    assert targets == {h: https(h) for h in doc["addresses"]}
    doc["address-classes"]["latency"]["exclude-filter"] = {"type": "tag", "tag": "latency"}
    targets, _, _ = parse_document(doc, "ex5")
    assert sorted(targets) == [
        "host-a-thr.perfsonar.net",
        "host-b-thr.perfsonar.net",
        "host-c-thr.perfsonar.net",
    ]
    doc["address-classes"]["latency"]["match-filter"] = {"type": "jq", "jq": {"script": "."}}
    targets, _, warnings = parse_document(doc, "ex5")
    assert len(targets) == 3
    assert any("address-classes.latency" in w and "jq" in w and "class skipped" in w for w in warnings)


def test_scheduled_by_address_disabled_no_agent_labels_and_unreadable_archivers():
    targets, _, warnings = parse_document(fixture("psconfig_scheduled_by.json"), "sched")
    assert targets == {
        # thr-all: templated local archive, expanded to each address that runs it (d disabled,
        # e no-agent, f on a disabled host, the v6 address's disabled v4 label: none of them).
        "a.example.org": https("a.example.org"),
        "b.example.org": https("b.example.org"),
        "c-dash.example.org": https("c-dash.example.org"),
        "[2001:db8::10]": https("[2001:db8::10]"),
        # lat-edu: no task archive, both addresses on host pt1 whose archive has data._url.
        "pt1.example.edu": http("pt1.example.edu"),
        # lat-plain: no archive at all -> its toolkit.
        "h.example.org": https("h.example.org"),
        # thr-central: _meta.esmond_url with a port, trailing slash added.
        "ma.example.net:8443": "https://ma.example.net:8443/esmond/perfsonar/archive/",
    }
    assert warnings == [
        "mesh sched: archive 'syslog': archiver 'syslog' cannot be read back; it gives no host to collect",
        "mesh sched: archive 'rabbit': archiver 'rabbitmq' cannot be read back; it gives no host to collect",
        "mesh sched: archive 'logstash-only': http archiver without _meta.esmond_url cannot be read back; "
        "it gives no host to collect",
    ]


def test_unidirectional_disjoint_runs_on_the_scheduling_side():
    doc = {
        "addresses": {n: {"address": n} for n in ("a.example.org", "b.example.org", "c.example.org")},
        "groups": {
            "g": {
                "type": "disjoint",
                "unidirectional": True,
                "a-addresses": [{"name": "a.example.org"}],
                "b-addresses": [{"name": "b.example.org"}, {"name": "c.example.org"}],
            }
        },
        "tasks": {"t": {"group": "g", "test": "x"}},
    }
    assert list(parse_document(doc, "u")[0]) == ["a.example.org"]
    doc["tasks"]["t"]["scheduled-by"] = 1
    assert list(parse_document(doc, "u")[0]) == ["b.example.org", "c.example.org"]
    doc["addresses"]["b.example.org"]["no-agent"] = True  # a no-agent scheduler hands over to the other side
    assert list(parse_document(doc, "u")[0]) == ["a.example.org", "c.example.org"]


def test_meshconfig_archive_lookup_follows_levels_and_types():
    doc = {
        "organizations": [
            {
                "measurement_archives": [
                    {
                        "type": "perfsonarbuoy/bwctl",
                        "read_url": "https://org-ma.example.org/esmond/perfsonar/archive/",
                    }
                ],
                "sites": [
                    {
                        "hosts": [
                            {
                                "addresses": ["owamp-only.example.org"],
                                "measurement_archives": [
                                    {
                                        "type": "perfsonarbuoy/owamp",
                                        "read_url": "https://owamp-only.example.org:8443/ma/",
                                    }
                                ],
                            },
                            {"addresses": [{"address": "plain.example.org"}]},
                            {"addresses": ["agentless.example.org"], "no_agent": "1"},
                        ]
                    }
                ],
            }
        ],
        "tests": [
            {
                "members": {"type": "mesh", "members": ["owamp-only.example.org", "plain.example.org"]},
                "parameters": {"type": "perfsonarbuoy/owamp"},
            },
            {
                "members": {
                    "type": "disjoint",
                    "a_members": ["owamp-only.example.org"],
                    "b_members": ["plain.example.org", "agentless.example.org", "10.1.2.3"],
                    "no_agents": ["10.1.2.3"],
                },
                "parameters": {"type": "perfsonarbuoy/bwctl"},
            },
            {
                "members": {"type": "star", "center_address": "center.example.org", "members": []},
                "parameters": {"type": "traceroute"},
                "disabled": True,
            },
            {
                "members": {"type": "star", "center_address": "star.example.org", "members": ["2001:db8::7"]},
                "parameters": {"type": "traceroute"},
            },
        ],
    }
    targets, _, warnings = parse_document(doc, "mc")
    assert warnings == []
    assert targets == {
        "org-ma.example.org": https("org-ma.example.org"),
        "owamp-only.example.org:8443": "https://owamp-only.example.org:8443/ma/",
        # owamp test: no owamp archive above plain -> its toolkit; bwctl finds the org MA.
        "plain.example.org": https("plain.example.org"),
        "star.example.org": https("star.example.org"),
        "[2001:db8::7]": https("[2001:db8::7]"),
    }


# --- hostile input

HOSTILE = [
    "../../etc/passwd",
    "/",
    "..",
    "a/b.example.org",
    "x.example.org;reboot",
    "x.example.org && reboot",
    "sp ace.example.org",
    "a.example.org\n<3>psprobe: forged",
    "a.example.org\r\nX",
    "root@x.example.org",
    "a\\x2db.example.org",
    "a\\x2f..\\x2fb",
    "%2e%2e",
    "fe80::1%eth0",
    "ex\u0430mple.org",
    "example\uff0eorg",
    "\u0440s1.example.org",
    "l" * 64 + ".example.org",
    "-x.example.org",
    "$(reboot).example.org",
    "`id`.example.org",
    "x.example.org:0",
    "x.example.org:99999",
    "",
    "x.example.org\x00",
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_each_hostile_name_is_rejected_alone_and_named(bad):
    doc = {
        "organizations": [],
        "tests": [
            {
                "members": {"type": "mesh", "members": ["good.example.org", bad]},
                "parameters": {"type": "perfsonarbuoy/owamp"},
            }
        ],
    }
    targets, _, warnings = parse_document(doc, "https://mesh.example.org/pub/config/x")
    assert targets == {"good.example.org": https("good.example.org")}
    assert len(warnings) == 1
    w = warnings[0]
    assert w.startswith("mesh https://mesh.example.org/pub/config/x: ")
    assert ascii(bad) in w
    assert w.isascii() and "\n" not in w and "\r" not in w and "\x00" not in w


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names_in_psconfig_and_read_urls(bad):
    doc = {
        "addresses": {"good": {"address": "good.example.org"}, "bad": {"address": bad}},
        "archives": {
            "local": {
                "archiver": "esmond",
                "data": {"url": "https://{% scheduled_by_address %}/esmond/perfsonar/archive/"},
            },
            "named": {"archiver": "esmond", "data": {"url": f"https://{bad}/esmond/perfsonar/archive/"}},
        },
        "groups": {"g": {"type": "mesh", "addresses": [{"name": "good"}, {"name": "bad"}]}},
        "tasks": {
            "t": {"group": "g", "test": "x", "archives": ["local"]},
            "t2": {"group": "g", "test": "x", "archives": ["named"]},
        },
    }
    targets, _, warnings = parse_document(doc, "ps")
    # The bad address is never substituted into the templated URL.  The URL built around it by
    # t2 may still parse as some other, well-formed URL ("https://a/b.example.org/..." is host
    # "a"): whatever comes out is a valid key whose read URL is on that host.
    assert targets.pop("good.example.org") == https("good.example.org")
    for host, url in targets.items():
        assert hostnames.normalise(host) == host and mesh.read_url(url)[0] == host
    assert warnings and all(w.startswith("mesh ps: ") and w.isascii() and "\n" not in w for w in warnings)
    del doc["tasks"]["t2"]
    assert parse_document(doc, "ps")[0] == {"good.example.org": https("good.example.org")}


def test_hostile_fixture_keeps_the_good_hosts():
    targets, _, warnings = parse_document(fixture("hostile_meshconfig.json"), "hostile")
    assert targets == {
        "perf-tokyo.sinet.ad.jp": https("perf-tokyo.sinet.ad.jp"),
        "perfsonar-dev8.grnoc.iu.edu": https("perfsonar-dev8.grnoc.iu.edu"),
        "test-pt1.es.net": https("test-pt1.es.net"),
    }
    assert len(warnings) == 17
    joined = "\n".join(warnings)
    for needle in [
        "'../../etc/passwd'",
        "'evil.example.org;rm -rf /'",
        "'a.example.org\\n<3>psprobe: forged line'",
        "'ex\\u0430mple.org'",
        "'fullwidth\\uff0eexample\\uff0eorg'",
        "'user@host.example.org'",
        "'a\\\\x2db.example.org'",
        "'file:///etc/shadow'",
        "query or fragment",
        "not a list",
        "host 42 rejected",
        "host None rejected",
    ]:
        assert needle in joined, needle


@pytest.mark.parametrize(
    "url,why",
    [
        ("ftp://h.example.org/x/", "not an http or https URL"),
        ("file:///etc/passwd", "not an http or https URL"),
        ("https://u:p@h.example.org/x/", "user information"),
        ("https://h.example.org/x/?a=b", "query"),
        ("https://h.example.org/x/#f", "query or fragment"),
        ("https://h.example.org/../x/", "segment"),
        ("https://h.example.org/a b/", "spaces"),
        ("https://h.example.org/a\n/", "spaces"),
        ("https://h.example.org:99999/x/", "not a URL"),
        ("https://[::1/x/", "not a URL"),
        ("https://h_x.example.org/x/", "bad host"),
        ("https:///x/", "bad host"),
        (["https://h.example.org/"], "not a string"),
    ],
)
def test_read_urls_are_checked(url, why):
    with pytest.raises(ValueError, match=why):
        mesh.read_url(url)


def test_read_url_normalises():
    assert mesh.read_url("HTTPS://H.Example.ORG:443/esmond/perfsonar/archive") == (
        "h.example.org",
        https("h.example.org"),
    )
    assert mesh.read_url("http://h.example.org:80") == ("h.example.org", "http://h.example.org/")
    assert mesh.read_url("http://64.106.40.252//esmond/perfsonar/archive/") == (
        "64.106.40.252",
        "http://64.106.40.252//esmond/perfsonar/archive/",
    )
    assert mesh.read_url("https://[2001:DB8::1]:8443/a/") == (
        "[2001:db8::1]:8443",
        "https://[2001:db8::1]:8443/a/",
    )


def test_one_host_two_read_urls_is_deterministic_and_warned():
    def doc(urls):
        return {
            "organizations": [],
            "tests": [],
            "measurement_archives": [{"type": "t", "read_url": u} for u in urls],
        }

    urls = [
        "http://h.example.org/esmond/perfsonar/archive/",
        "https://h.example.org/other/",
        "https://h.example.org/esmond/perfsonar/archive/",
    ]
    results = set()
    for order in (urls, urls[::-1], urls[1:] + urls[:1]):
        targets, _, warnings = parse_document(doc(order), "two")
        results.add(targets["h.example.org"])
        assert warnings and all("h.example.org has two read URLs" in w for w in warnings)
    assert results == {"https://h.example.org/esmond/perfsonar/archive/"}


def test_a_named_archive_beats_the_toolkit_default_silently():
    doc = {
        "organizations": [
            {
                "sites": [
                    {
                        "hosts": [
                            {
                                "addresses": ["h.example.org"],
                                "measurement_archives": [
                                    {
                                        "type": "perfsonarbuoy/owamp",
                                        "read_url": "http://h.example.org/esmond/perfsonar/archive/",
                                    }
                                ],
                            }
                        ]
                    }
                ]
            }
        ],
        "tests": [
            {"members": {"type": "mesh", "members": ["h.example.org"]}, "parameters": {"type": "traceroute"}}
        ],
    }
    targets, _, warnings = parse_document(doc, "d")
    assert targets == {"h.example.org": http("h.example.org")}
    assert warnings == []


def _mutations(doc, rng, n):
    """Copies of doc with one random node replaced by a value of a wrong type."""
    junk = [None, 7, -1.5, True, "x", "../../x", "", [], {}, [None], {"address": 5}, ["a\n"], {"type": []}]
    for _ in range(n):
        d = copy.deepcopy(doc)
        node, path = d, []
        while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if path:
            parent, key = path[-1]
            parent[key] = rng.choice(junk)
        yield d


@pytest.mark.parametrize("name", sorted(REAL))
def test_wrong_types_anywhere_are_warnings_not_crashes(name):
    rng = random.Random(name)
    for d in _mutations(real(name), rng, 150):
        try:
            targets, _, warnings = parse_document(d, name)
        except MeshError:
            continue  # the top-level shape itself was broken
        for host, url in targets.items():
            assert hostnames.normalise(host) == host
            assert mesh.read_url(url)[0] == host
        assert all("\n" not in w for w in warnings)


@pytest.mark.parametrize(
    "doc,why",
    [
        ("a string", "JSON str"),
        (42, "JSON int"),
        (None, "JSON NoneType"),
        ({}, "keys: none"),
        ({"foo": 1, "bar\n": 2}, "'bar\\n'"),
    ],
)
def test_documents_of_no_known_shape_are_errors(doc, why):
    with pytest.raises(MeshError) as e:
        parse_document(doc, "src")
    assert why in str(e.value)
    assert e.value.source == "src"


def test_warnings_are_capped():
    doc = {
        "organizations": [],
        "tests": [
            {"members": {"type": "mesh", "members": [f"bad_{i}" for i in range(5000)]}, "parameters": {}}
        ],
    }
    targets, _, warnings = parse_document(doc, "many")
    assert targets == {}
    assert len(warnings) == mesh.MAX_WARNINGS + 1
    assert warnings[-1] == "... and 4000 more mesh warnings not shown"


# --- discover: includes, limits, failures

TOP = "https://mesh.example.org/pub/config/"


class Server:
    """An injected fetch serving documents from a dict; counts what was asked."""

    def __init__(self, docs):
        self.docs = docs
        self.asked = []

    def __call__(self, url):
        self.asked.append(url)
        got = self.docs[url]
        if isinstance(got, Exception):
            raise got
        return got if isinstance(got, bytes) else json.dumps(got).encode()


def test_top_level_list_follows_every_include():
    server = Server(
        {
            TOP: fixture("toplevel_list.json"),
            TOP + "latentput?format=psconfig": real("pSConfig/pwa_published__latentput.json"),
            TOP + "testbed?format=meshconfig": real("meshconfig/perfsonar_dev_testbed__meshconfig.json"),
        }
    )
    res = discover(TOP, server)
    assert res.complete and res.warnings == []
    assert res.targets == {
        **LATENTPUT,
        "perfsonar-testbed-ma.grnoc.iu.edu": https("perfsonar-testbed-ma.grnoc.iu.edu"),
    }
    assert len(server.asked) == 3


def test_include_loops_are_read_once():
    a, b = TOP + "a", TOP + "b"
    server = Server(
        {
            a: {"includes": [b, a], "addresses": {}, "tasks": {}},
            b: [{"include": [a, b]}, {"include": [TOP + "c"]}],
            TOP + "c": real("pSConfig/example-1-simple.json"),
        }
    )
    res = discover(a, server)
    assert res.complete
    assert res.targets == {"archive.perfsonar.net": http("archive.perfsonar.net")}
    assert sorted(server.asked) == [a, b, TOP + "c"]
    assert sum("already read" in w for w in res.warnings) == 3


def test_include_depth_is_limited():
    docs = {
        f"{TOP}{i}": {
            "includes": [f"{TOP}{i + 1}"],
            "addresses": {"h": {"address": f"h{i}.example.org"}},
            "groups": {"g": {"type": "list", "addresses": [{"name": "h"}]}},
            "tasks": {"t": {"group": "g", "test": "x"}},
        }
        for i in range(10)
    }
    server = Server(docs)
    res = discover(TOP + "0", server, max_depth=5)
    assert sorted(res.targets) == [f"h{i}.example.org" for i in range(6)]
    assert res.complete  # a limit reached is the document's doing, not an outage
    assert res.warnings == [f"mesh {TOP}5: include {TOP}6 not read: deeper than 5 levels"]


def test_document_count_is_limited():
    server = Server(
        {
            TOP: [{"include": [f"{TOP}{i}" for i in range(10)]}],
            **{f"{TOP}{i}": {"includes": []} for i in range(10)},
        }
    )
    res = discover(TOP, server, max_docs=4)
    assert len(server.asked) == 4
    assert sum("over 4 documents" in w for w in res.warnings) == 7


def test_a_failing_include_is_a_warning_and_makes_the_result_incomplete():
    server = Server(
        {
            TOP: [{"include": [TOP + "down", TOP + "garbage", TOP + "huge", TOP + "ok"]}],
            TOP + "down": OSError("connection refused"),
            TOP + "garbage": b"<html>502 Bad Gateway</html>",
            TOP + "huge": b" " * 20_000,
            TOP + "ok": real("pSConfig/example-1-simple.json"),
        }
    )
    res = discover(TOP, server, max_bytes=10_000)
    assert not res.complete
    assert res.targets == {"archive.perfsonar.net": http("archive.perfsonar.net")}
    assert res.warnings == [
        f"mesh {TOP}: include {TOP}down: cannot fetch: OSError: 'connection refused'",
        f"mesh {TOP}: include {TOP}garbage: not JSON: 'Expecting value: line 1 column 1 (char 0)'",
        f"mesh {TOP}: include {TOP}huge: document of 20000 bytes is over the 10000-byte limit: not parsed",
    ]


def test_fetch_raising_meserror_on_an_include_is_a_warning():
    server = Server({TOP: [{"include": [TOP + "x"]}], TOP + "x": MeshError(TOP + "x", "cannot fetch: 404")})
    res = discover(TOP, server)
    assert not res.complete
    assert res.warnings == [f"mesh {TOP}: include {TOP}x: cannot fetch: 404"]


@pytest.mark.parametrize(
    "answer,why",
    [
        (OSError("timed out"), "cannot fetch: OSError"),
        (MeshError(TOP, "cannot fetch: HTTP 500"), "cannot fetch: HTTP 500"),
        (b"\xff\xfe garbage", "not JSON"),
        (b'"just a string"', "JSON str"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ],
)
def test_the_top_level_url_failing_raises(answer, why):
    with pytest.raises(MeshError, match=why) as e:
        discover(TOP, Server({TOP: answer}))
    assert e.value.source == TOP


def test_a_100_mb_document_is_refused_without_parsing(monkeypatch):
    def no_parse(*a, **k):
        raise AssertionError("parsed")

    monkeypatch.setattr(mesh.json, "loads", no_parse)
    big = b" " * (100 * 1024 * 1024)
    with pytest.raises(MeshError, match="over the 50000000-byte limit"):
        discover(TOP, lambda url: big)


@pytest.mark.parametrize(
    "inc,why",
    [
        ("file:///etc/passwd", "cannot include files"),
        (
            "/dev/zero",
            "bad host",
        ),  # joined to the remote parent: https://mesh.example.org/dev/zero -> fetched remotely
        ("https://user@evil.example.org/x", "user information"),
        ("https://evil.example.org/x\n<3>forged", "spaces, control"),
        ("gopher://evil.example.org/", "not an http or https URL"),
        ("https://evil_host.example.org/", "bad host"),
        (17, "not a string"),
    ],
)
def test_hostile_include_urls_are_refused(inc, why):
    server = Server(
        {TOP: {"includes": [inc], "addresses": {}}, "https://mesh.example.org/dev/zero": {"includes": []}}
    )
    res = discover(TOP, server)
    if inc == "/dev/zero":  # a relative include is on the same (remote) server, never a local file
        assert server.asked == [TOP, "https://mesh.example.org/dev/zero"]
        return
    assert server.asked == [TOP]
    assert len(res.warnings) == 1 and why in res.warnings[0] and "\n" not in res.warnings[0]
    assert res.complete


def test_a_local_mesh_may_include_local_files(tmp_path):
    (tmp_path / "top.json").write_text(json.dumps([{"include": ["ex1.json", f"file://{tmp_path}/ex3.json"]}]))
    (tmp_path / "ex1.json").write_bytes((FORMATS / "pSConfig/example-1-simple.json").read_bytes())
    (tmp_path / "ex3.json").write_bytes((FORMATS / "pSConfig/example-3-circuits.json").read_bytes())

    def fetch(url):
        return Path(url[len("file://") :] if url.startswith("file://") else url).read_bytes()

    res = discover(str(tmp_path / "top.json"), fetch)
    assert res.complete and res.warnings == []
    assert res.targets == {
        **REAL["pSConfig/example-1-simple.json"],
        **REAL["pSConfig/example-3-circuits.json"],
    }


# --- scale

N = 100_000


def test_100000_hosts_meshconfig_all_found():
    """Correctness at scale; the time it takes is in bench/scale.py."""
    hosts = [f"ps-{i}.site{i % 997}.example.org" for i in range(N)]
    doc = {
        "organizations": [{"sites": [{"hosts": [{"addresses": [h]} for h in hosts]}]}],
        "tests": [
            {"members": {"type": "mesh", "members": hosts}, "parameters": {"type": "perfsonarbuoy/owamp"}}
        ],
    }
    data = json.dumps(doc).encode()
    res = discover(TOP, lambda url: data)
    assert len(res.targets) == N and res.warnings == []
    assert res.targets["ps-99999.site299.example.org"] == https("ps-99999.site299.example.org")


def test_100000_hosts_psconfig_all_found():
    """Correctness at scale; the time it takes is in bench/scale.py."""
    hosts = [f"ps-{i}.example.net" for i in range(N)]
    doc = {
        "addresses": {h: {"address": h} for h in hosts},
        "archives": {
            "a": {
                "archiver": "esmond",
                "data": {"url": "https://{% scheduled_by_address %}:8443/esmond/perfsonar/archive/"},
            }
        },
        "groups": {"g": {"type": "mesh", "addresses": [{"name": h} for h in hosts]}},
        "tasks": {"t": {"group": "g", "test": "x", "archives": ["a"]}},
    }
    data = json.dumps(doc).encode()
    res = discover(TOP, lambda url: data)
    assert len(res.targets) == N and res.warnings == []
    assert res.targets["ps-5.example.net:8443"] == "https://ps-5.example.net:8443/esmond/perfsonar/archive/"


# --- pushing hosts: an http archive whose _url is this receiver ([receive] url)


def runners_of(doc: dict) -> list[str]:
    """The addresses that run a task: with no archive anywhere, each is read at its toolkit."""
    bare = copy.deepcopy(doc)
    for task in bare["tasks"].values():
        task.pop("archives", None)
    for host in bare.get("hosts", {}).values():
        host.pop("archives", None)
    return sorted(parse_document(bare, "bare")[0])


def test_real_psconfig_task_archive_to_the_receiver_makes_every_runner_pushing():
    doc = real("pSConfig/example-1-simple.json")  # 3 tasks, all to https://archive.perfsonar.net/logstash
    # written another way: scheme and host case, default port, trailing slash
    receiver = "HTTPS://Archive.PerfSonar.NET:443/logstash/"
    targets, _, warnings = parse_document(doc, "ex1", receiver)
    # its _meta.esmond_url is not read back (the runs come here), and nothing to warn about
    assert targets == {} and warnings == []
    assert mesh.pushing(doc, "ex1", receiver) == runners_of(doc) == [
        "host-a.perfsonar.net", "host-b.perfsonar.net", "host-c.perfsonar.net"]
    # not this receiver: the archive is read back as before, nobody pushes here
    for other in ("https://archive.perfsonar.net/Logstash", "http://archive.perfsonar.net/logstash",
                  "https://archive.perfsonar.net:8443/logstash", "https://archive.perfsonar.net/"):
        assert parse_document(doc, "ex1", other)[0] == REAL["pSConfig/example-1-simple.json"], other
        assert mesh.pushing(doc, "ex1", other) == []
    assert parse_document(doc, "ex1")[0] == REAL["pSConfig/example-1-simple.json"]


def test_real_psconfig_host_archive_to_the_receiver_makes_that_hosts_addresses_pushing():
    doc = real("pSConfig/example-3-circuits.json")  # one http archive per host, no task archive
    receiver = "https://ga-pt1.es.net/logstash"
    targets, _, warnings = parse_document(doc, "ex3", receiver)
    assert mesh.pushing(doc, "ex3", receiver) == ["ga-owamp.es.net", "ga-pt1.es.net"]  # host ga-pt1's
    assert targets == {h: u for h, u in REAL["pSConfig/example-3-circuits.json"].items()
                       if h != "ga-pt1.es.net"}
    assert warnings == []


def test_pushing_skips_disabled_tasks_and_addresses_and_other_archivers():
    doc = fixture("psconfig_scheduled_by.json")
    # "central" (https://ma.example.net/logstash) serves lat-all-disabled (disabled) and
    # thr-central, which only h.example.org runs
    targets, _, warnings = parse_document(doc, "sched", "https://ma.example.net/logstash")
    assert mesh.pushing(doc, "sched", "https://ma.example.net/logstash") == ["h.example.org"]
    assert "ma.example.net:8443" not in targets
    assert targets["h.example.org"] == https("h.example.org")  # lat-plain still archives locally
    # logstash-only (g.example.org's) pushes here: no more warning that it cannot be read back
    assert mesh.pushing(doc, "sched", "https://ls.example.net/logstash") == ["g.example.org"]
    _, _, warnings = parse_document(doc, "sched", "https://ls.example.net/logstash")
    assert not any("logstash-only" in w for w in warnings)
    # a templated _url, another archiver with the same _url, a hostile _url: never "here"
    doc["archives"]["tmpl"] = {"archiver": "http", "data": {"_url": "https://{% scheduled_by_address %}/x"}}
    doc["archives"]["rabbit"]["data"]["_url"] = "https://ls.example.net/logstash"
    doc["archives"]["bad"] = {"archiver": "http", "data": {"_url": ["https://ls.example.net/logstash"]}}
    doc["tasks"]["thr-all"]["archives"] += ["tmpl", "rabbit", "bad"]
    assert mesh.pushing(doc, "sched", "https://ls.example.net/logstash") == ["g.example.org"]


def test_receiver_key_normalises_only_what_pscheduler_does_not_care_about():
    same = ["https://psprobe.example.org/receive", "HTTPS://PSProbe.Example.Org:443/receive/",
            "https://psprobe.example.org./receive//"]
    assert {mesh.receiver_key(u) for u in same} == {"https://psprobe.example.org/receive"}
    assert mesh.receiver_key("http://psprobe.example.org:80") == "http://psprobe.example.org"
    assert mesh.receiver_key("https://psprobe.example.org:8443/") == "https://psprobe.example.org:8443"
    for bad in (None, 17, "", "ftp://psprobe.example.org/", "https://u:p@psprobe.example.org/",
                "https://psprobe example.org/", "https://psprobe.example.org:99999/", "/local/path"):
        assert mesh.receiver_key(bad) is None, bad


def test_discover_gathers_pushing_hosts_from_included_documents():
    inc = {"addresses": {"tp.example.org": {"address": "tp.example.org"}},
           "archives": {"here": {"archiver": "http", "data": {"_url": "https://rx.example.org/push"}}},
           "groups": {"g": {"type": "list", "addresses": [{"name": "tp.example.org"}]}},
           "tasks": {"t": {"group": "g", "test": "x", "archives": ["here"]}}}
    server = Server({TOP: json.dumps([{"include": [TOP + "/inc.json"]}]).encode(),
                     TOP + "/inc.json": json.dumps(inc).encode()})
    res = discover(TOP, server, receiver="https://rx.example.org/push/")
    assert res.pushing == ["tp.example.org"] and res.targets == {} and res.complete
    res = discover(TOP, server)  # no receiver: nobody pushes, the archive cannot be read back
    assert res.pushing == [] and res.targets == {}
    assert any("cannot be read back" in w for w in res.warnings)
