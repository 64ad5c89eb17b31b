"""Hostile input: meshes, archive metadata and configuration that try to do harm."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import tlsutil
from test_mesh import HOSTILE

from faults.conftest import AMQP_URL
from psprobe import config

A = "ps-a.example.org"
GOOD = "good.example.org"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _mesh_doc(names: list) -> dict:
    return {"organizations": [], "tests": [{"members": {"type": "mesh", "members": names},
                                            "parameters": {"type": "perfsonarbuoy/owamp"}}]}


@pytest.fixture
def meshlab(lab):
    root = lab.tmp / "root"
    units = root / "units"
    (root / "tpl").mkdir(parents=True)
    (root / "tpl" / "psprobe@.timer").write_text("[Timer]\n")
    lab.set("mesh", unit_dir=units, template_dir=root / "tpl", retries=0)
    return lab


def _sync(lab, urls: list[str], *extra: str):
    lab.set("mesh", urls=", ".join(urls))
    return lab.cli("sync", *extra)


def test_hostile_host_names_in_a_mesh(meshlab, figures):
    lab = meshlab
    doc = lab.tmp / "hostile.json"
    doc.write_text(json.dumps(_mesh_doc([GOOD, *HOSTILE])))
    dry = _sync(lab, [str(doc)], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert re.findall(r"^add +(\S+)", dry.stdout, re.M) == [GOOD]
    warnings = [x for x in dry.stderr.splitlines() if str(doc) in x]
    assert len(warnings) == len(HOSTILE), dry.stderr
    assert not (lab.tmp / "root" / "units").exists()
    before = _tree(lab.tmp)
    real = _sync(lab, [str(doc)], "--unit-dir", str(lab.tmp / "root" / "units"),
                 "--no-systemctl")
    assert real.returncode == 0, real.stderr
    new = _tree(lab.tmp) - before
    wants = "root/units/psprobe-timers.target.wants"
    phase = f"root/units/psprobe@{GOOD}.timer.d"  # the good host's schedule drop-in
    allowed = (wants, phase, "state/", "metrics/")
    assert all(p.startswith(allowed) or p in ("root/units", "state") for p in new), sorted(new)
    assert os.listdir(lab.tmp / wants) == [f"psprobe@{GOOD}.timer"]
    assert os.listdir(lab.tmp / phase) == ["10-phase.conf"]
    assert os.listdir(lab.state / "hosts") == [GOOD]
    out = dry.stdout + dry.stderr + real.stdout + real.stderr
    assert "\n<3>psprobe: forged" not in out and "\x00" not in out
    figures.reject("mesh", "unit/path injection host names (../, /, ;, space, newline, @, "
                   "\\x2d, long label, look-alikes...)", len(HOSTILE), len(warnings),
                   "each dropped with one warning naming the mesh; good host kept")


def test_hostile_mesh_structures(meshlab, figures):
    lab = meshlab
    d = lab.tmp / "meshes"
    d.mkdir()
    # include loop: a -> b -> a
    (d / "a.json").write_text(json.dumps([{"include": [str(d / "b.json")]}]))
    (d / "b.json").write_text(json.dumps([{"include": [str(d / "a.json")]},
                                          {"include": [str(d / "good.json")]}]))
    (d / "good.json").write_text(json.dumps(_mesh_doc([GOOD])))
    # a chain of 30 includes
    for i in range(30):
        nxt = [{"include": [str(d / f"chain{i + 1}.json")]}] if i < 29 else _mesh_doc(
            ["deep.example.org"])
        (d / f"chain{i}.json").write_text(json.dumps(nxt))
    # wrong types everywhere
    (d / "types.json").write_text(json.dumps({
        "organizations": [None, 1, "x", {"sites": "nope"}, {"sites": [{"hosts": 5}]}],
        "tests": [None, {"members": 7}, {"members": {"type": "mesh", "members": [1, None,
                                                                                 {"a": 1}]}}]}))
    # 100 MB (sparse) document
    big = d / "big.json"
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)
    t0 = time.monotonic()
    dry = _sync(lab, [str(d / "a.json"), str(d / "chain0.json"), str(d / "types.json"),
                      str(big)], "--dry-run")
    took = time.monotonic() - t0
    assert dry.returncode == 1, dry.stderr  # the 100 MB mesh failed; the rest applied
    assert re.findall(r"^add +(\S+)", dry.stdout, re.M) == [GOOD]
    err = dry.stderr
    assert "already read" in err and "deeper than" in err and "larger than" in err
    assert "Traceback" not in err and took < 20
    figures.reject("mesh", "include loop, 30-deep include chain, wrong types everywhere, "
                   "100 MB document", 4, 4,
                   "loop read once, depth capped, bad entries warned, 100 MB refused unread")


def test_100000_hosts_mesh(meshlab, figures):
    lab = meshlab
    doc = lab.tmp / "big.json"
    doc.write_text(json.dumps(_mesh_doc([f"ps-{i}.example.org" for i in range(100_000)])))
    t0 = time.monotonic()
    dry = _sync(lab, [str(doc)], "--dry-run")
    took = time.monotonic() - t0
    assert dry.returncode == 0, dry.stderr
    assert "100000 hosts: 100000 to add" in dry.stdout
    assert took < 30
    figures.reject("mesh", "100 000 hosts (sync --dry-run)", 1, 1,
                   f"planned in {took:.1f}s, no error")


# --- archive metadata


def test_hostile_archive_metadata(lab, figures):
    lab.add_host(A)
    h = lab.sim.hosts[A]
    prefix = h.prefix
    now = int(time.time()) - 600
    good = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"
    pts = [(now - 60 * i, 1.0e9 + i) for i in range(10, 0, -1)]

    def rec(key, et="throughput", uri=None):
        return {"metadata-key": key, "subject-type": "point-to-point", "source": "10.0.0.1",
                "destination": "10.0.0.2", "tool-name": "pscheduler/iperf3",
                "event-types": [{"event-type": et, "time-updated": now,
                                 "base-uri": uri if uri is not None
                                 else f"{prefix}{key}/{et}/base", "summaries": []}]}

    hostile = [
        rec("../../../../etc"), rec("k1/../../x"), rec("k2?format=json"), rec("%2e%2e"),
        rec("k3", et="throughput/../../../etc"), rec("k4", et="throughput?x=1"),
        rec("k5", uri=f"{prefix}k5/throughput/base?time-start=0"),
        rec("k6", uri=f"{prefix}../../../etc/passwd"),
        rec("k7", uri="http://evil.example.org/esmond/perfsonar/archive/k7/throughput/base"),
        rec("k8", uri="//evil.example.org/k8/throughput/base"),
        rec("k9", uri=f"{prefix}k9/throughput/base/../../../../../x"),
        rec("k10", uri=f"{prefix}k10/throughput/%2e%2e/base"),
        rec("k11", uri=f"{prefix}other/throughput/base"),
        rec("k12", uri="file:///etc/passwd"),
        rec("k13", uri=f"{prefix}k13/throughput/base#frag"),
        rec("x" * 300),
    ]
    for r in hostile:
        h.add_raw_record(r)
    h.add_raw_record(rec(good), {f"{prefix}{good}/throughput/base": pts})
    before = _tree(lab.tmp)
    r = lab.run(A)
    assert r.status == 0, r.lines
    paths = {q.path for q in h.log}
    allowed = {prefix, f"{prefix}{good}/throughput/base"} | {
        f"{prefix}{k}/{et}/base" for k, et in h.pairs()}
    assert paths <= allowed, paths - allowed
    assert not any(q.host_header.startswith("evil") for q in h.log)
    new = _tree(lab.tmp) - before
    assert all(p.startswith(("state/hosts/ps-a.example.org/", "metrics/")) for p in new), new
    got = [m for m in lab.bus.drain() if m["meta"]["org_metadata_key"] == good]
    assert sum(len(m["datapoints"]) for m in got) == len(pts)
    skipped = [x for x in r.lines if x.startswith("WARNING") and "skipping" in x]
    # two carry event types nobody asked for: ignored without a word, like any such type
    assert len(skipped) == len(hostile) - 2, r.lines
    requested = {q.path.split("/")[-3] for q in h.log if q.path.endswith("/base")}
    refused = [x for x in hostile if x["metadata-key"] not in requested]
    figures.reject("archive", "metadata-key / event-type / base-uri with path segments, "
                   "queries, other hosts, file:, fragments", len(hostile), len(refused),
                   "series skipped with a warning; no request left the archive's own series")


# --- configuration


BAD = ["banana", "-5", "maybe", "relative/path", "ftp", "BAD TYPE!", "http://x", "1e999"]


def _bad_value(f: dataclasses.Field) -> str | None:
    for v in BAD:
        try:
            f.metadata["parse"](v)
        except ValueError:
            return v
    return None


def test_every_config_key_with_a_wrong_value(lab, figures):
    tried = rejected = 0
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            bad = _bad_value(f)
            if bad is None:
                continue  # free text: any value is a value
            key = next((k for (s, k), n in config.ALIASES.items() if (s, n) == (section, f.name)),
                       f.name)
            tried += 1
            lab.write(**{section: {key: bad}})
            proc = lab.cli("collect", A, "--dry-run")
            lines = proc.stderr.strip().splitlines()
            ok = (proc.returncode == 78 and len(lines) == 1 and str(lab.conf) in lines[0]
                  and f"[{section}] {key}:" in lines[0] and not proc.stdout)
            assert ok, (section, key, bad, proc.returncode, proc.stderr)
            rejected += 1
    lab.write(**{f"host {A}": {"timeout": "banana"}})
    proc = lab.cli("collect", A)
    assert proc.returncode == 78 and f"[host {A}]: [archive] timeout:" in proc.stderr
    lab.write()
    figures.reject("config", "every key with a wrong type or out-of-range value",
                   tried + 1, rejected + 1, "exit 78, one line: file: [section] key: why")


def test_secrets_never_in_output(lab, figures, pki):
    lab.add_host(A)
    secret_url, secret_file = "Url-S3cret-7731", "File-S3cret-9127"
    pw = lab.tmp / "broker.pw"
    pw.write_text(secret_file + "\n")
    pw.chmod(0o640)
    url = AMQP_URL.replace("guest:guest@", f"guest:{secret_url}@")
    lab.set("broker", url=url)
    runs = [lab.cli("-v", "collect", A), lab.cli("collect", A, "--dry-run")]
    lab.set("broker", password_file=pw)
    runs += [lab.cli("-v", "collect", A), lab.cli("collect", A, "--dry-run")]
    assert [p.returncode for p in runs] == [69, 0, 69, 0], [p.stderr for p in runs]
    assert all("authentication failed" in p.stderr for p in (runs[0], runs[2]))
    for p in runs:
        assert secret_url not in p.stdout + p.stderr and secret_file not in p.stdout + p.stderr
    for f in lab.tmp.rglob("*"):
        if f.is_file() and f != pw and f != lab.conf:
            data = f.read_bytes()
            assert secret_url.encode() not in data and secret_file.encode() not in data, f
    pw.chmod(0o644)
    p = lab.cli("collect", A)
    assert p.returncode == 78 and "world-readable" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and secret_file not in p.stderr
    # a broker client key that does not match its certificate: a config error, one line
    lab.set("broker", password_file="", url="amqps://127.0.0.1:5671/%2F", ca=pki.ca,
            cert=pki.client_cert, key=pki.wrong_client_key)
    p = lab.cli("collect", A)
    assert p.returncode == 78, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    figures.reject("config", "secrets in URL / password file (searched in all output and "
                   "state), world-readable secret, mismatched client key", 3, 3,
                   "never printed; 0644 refused (exit 78); bad key pair exit 78, one line")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))
