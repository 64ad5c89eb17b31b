"""psprobe.spool on real files: order, commit and reopen, bounds, recovery, links, threads, kill -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from psprobe import state
from psprobe.messages import Message
from psprobe.spool import Entry, Spool, SpoolFull, encode

ROOT = Path(__file__).resolve().parent.parent
SEG = "0000000000000001.seg"


def msg(mid: str, size: int = 200) -> Message:
    body = b'{"meta":{},"version":2,"datapoints":{"1":"' + b"x" * size + b'"}}'
    return Message("perfsonar.raw.packet-trace", mid, body, 1700000000, 1)


def ids(entries) -> list[str]:
    return [e.msg.message_id for e in entries]


def drain(spool: Spool) -> list:
    out = []
    while True:
        got = spool.take(7)  # small batches: take() resumes where it stopped
        if not got:
            return out
        out += got


def test_order_across_segments_commit_and_reopen(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, 1 << 20, segment_bytes=2048) as s:
        for i in range(0, 30, 3):
            s.append(f"h{i}", [msg(f"m{i}"), msg(f"m{i + 1}"), msg(f"m{i + 2}")])
        assert len([n for n in os.listdir(d) if n.endswith(".seg")]) > 3
        assert s.pending() == 30
        got = drain(s)
        assert ids(got) == [f"m{i}" for i in range(30)]
        assert got[4].host == "h3" and got[4].msg == msg("m4")
        s.commit(got[19])
        assert s.pending() == 10
        # Segments wholly before the committed position are gone.
        assert min(n for n in os.listdir(d) if n.endswith(".seg")) == f"{got[19].pos[0]:016d}.seg"
    with Spool(d, 1 << 20, segment_bytes=2048) as s:
        assert s.pending() == 10
        assert ids(drain(s)) == [f"m{i}" for i in range(20, 30)]
        s.append("h", [msg("m30")])
        got = drain(s)
        assert ids(got) == ["m30"]
        s.commit(got[-1])
        assert s.pending() == 0 and s.oldest() is None


def test_rewind_starts_again_after_the_last_commit(tmp_path):
    with Spool(tmp_path / "spool", 1 << 20) as s:
        s.append("h", [msg(f"m{i}") for i in range(6)])
        first = s.take(4)
        assert ids(first) == ["m0", "m1", "m2", "m3"]
        s.rewind()
        assert ids(s.take(4)) == ["m0", "m1", "m2", "m3"]
        s.commit(first[1])
        s.rewind()
        assert ids(drain(s)) == ["m2", "m3", "m4", "m5"] and s.pending() == 4
        s.commit(first[1])  # an older position: nothing moves back
        assert s.pending() == 4
        s.rewind()
        s.commit(first[3])  # confirmed before the rewind: take() goes on after it
        assert s.pending() == 2 and ids(drain(s)) == ["m4", "m5"]
        with pytest.raises(ValueError, match="not taken"):
            s.commit(Entry("h", msg("x"), (99, 0)))


def test_pending_size_and_oldest_follow_appends_and_commits(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, 1 << 20, segment_bytes=1024) as s:
        assert (s.pending(), s.size(), s.oldest()) == (0, 0, None)
        before = time.time()
        s.append("h", [msg("m0"), msg("m1")])
        s.append("h", [msg("m2"), msg("m3")])
        first = s.oldest()
        assert s.pending() == 4 and before <= first <= time.time()
        assert s.size() == sum(p.stat().st_size for p in d.glob("*.seg"))
        got = s.take(10)
        s.commit(got[1])
        assert s.pending() == 2 and first <= s.oldest()  # m2's, read back from its segment
        s.commit(got[3])
        assert (s.pending(), s.oldest()) == (0, None)


def test_wait_wakes_on_append_and_after_rewind(tmp_path):
    with Spool(tmp_path / "spool", 1 << 20) as s:
        assert s.wait(0) is False
        woke: list[bool] = []
        t = threading.Thread(target=lambda: woke.append(s.wait(120)))
        t.start()
        s.append("h", [msg("m0")])
        t.join()
        assert woke == [True]
        assert ids(s.take(10)) == ["m0"] and s.wait(0) is False
        s.rewind()
        assert s.wait(0) is True
        s.take(10)
        t = threading.Thread(target=lambda: woke.append(s.wait(120)))
        t.start()
        s.close()  # a waiting forwarder wakes when the spool closes
        t.join()
        assert woke == [True, False]


def test_full_refuses_and_writes_nothing(tmp_path):
    d = tmp_path / "spool"
    one = len(encode("h", msg("m0"), 0.0))
    with Spool(d, 3 * one) as s:
        s.append("h", [msg("m0"), msg("m1")])
        s.append("h", [msg("m2")])
        before = (d / SEG).read_bytes()
        with pytest.raises(SpoolFull, match="would pass the limit"):
            s.append("h", [msg("m3")])
        with pytest.raises(SpoolFull):
            s.append("h", [msg("m4"), msg("m5")])
        assert (d / SEG).read_bytes() == before and s.pending() == 3 and s.size() == 3 * one
        got = s.take(2)
        s.commit(got[1])  # confirmed: room again
        s.append("h", [msg("m3"), msg("m4")])
        assert ids(drain(s)) == ["m2", "m3", "m4"]


def test_torn_tail_is_truncated(tmp_path, caplog):
    d = tmp_path / "spool"
    with Spool(d, 1 << 20) as s:
        s.append("h", [msg(f"m{i}") for i in range(3)])
    size = (d / SEG).stat().st_size
    with open(d / SEG, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(encode("h", msg("m3"), 0.0)[:150])
    with caplog.at_level(logging.WARNING, "psprobe.spool"), Spool(d, 1 << 20) as s:
        assert (d / SEG).stat().st_size == size
        assert s.pending() == 3
        s.append("h", [msg("m4")])
        assert ids(drain(s)) == ["m0", "m1", "m2", "m4"]
    [warning] = caplog.messages
    assert f"{d / SEG}: 150 bytes at offset {size}" in warning and "truncated" in warning


@pytest.mark.parametrize("damage", ["body", "length", "magic"])
def test_damaged_middle_record_is_skipped_with_its_place(tmp_path, caplog, damage):
    d = tmp_path / "spool"
    with Spool(d, 1 << 20) as s:
        s.append("h", [msg(f"m{i}") for i in range(3)])
    off = len(encode("h", msg("m0"), 0.0))
    raw = bytearray((d / SEG).read_bytes())
    if damage == "body":
        raw[off + 100] ^= 0x01
    elif damage == "length":  # a length past the end of the file
        raw[off + 4:off + 8] = (0xFFFFFFF0).to_bytes(4, "little")
    else:
        raw[off:off + 4] = b"PSR\xff"
    (d / SEG).write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, "psprobe.spool"), Spool(d, 1 << 20) as s:
        assert s.pending() == 2
        assert ids(drain(s)) == ["m0", "m2"]
        s.append("h", [msg("m3")])  # the spool goes on
        assert ids(drain(s)) == ["m3"]
    assert len((d / SEG).read_bytes()) == len(raw) + off  # nothing truncated
    [warning] = caplog.messages
    assert f"{d / SEG}: damaged record at offset {off}; skipped {off} bytes" in warning


def test_an_unreadable_position_resends_rather_than_loses(tmp_path, caplog):
    d = tmp_path / "spool"
    with Spool(d, 1 << 20) as s:
        s.append("h", [msg(f"m{i}") for i in range(3)])
        s.commit(s.take(2)[1])
    (d / "position.json").write_text("{torn")
    with caplog.at_level(logging.WARNING, "psprobe.spool"), Spool(d, 1 << 20) as s:
        assert ids(drain(s)) == ["m0", "m1", "m2"]
    assert "position.json: unreadable" in caplog.text


def test_links_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sd = tmp_path / "state"
    sd.mkdir()
    (sd / "spool").symlink_to(elsewhere)
    with pytest.raises(state.LinkError, match="refusing to follow"):
        Spool(sd / "spool", 1 << 20)
    assert os.listdir(elsewhere) == []

    d = tmp_path / "spool"
    with Spool(d, 1 << 20) as s:
        s.append("h", [msg("m0")])
        s.commit(s.take(1)[0])
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (SEG, "position.json"):
        saved = (d / name).read_bytes()
        (d / name).unlink()
        (d / name).symlink_to(victim)
        with pytest.raises(state.LinkError, match=name):
            Spool(d, 1 << 20)
        (d / name).unlink()
        (d / name).write_bytes(saved)
    assert victim.read_bytes() == b"precious"


def test_one_process_per_spool_and_modes(tmp_path):
    old = os.umask(0o022)
    try:
        with Spool(tmp_path / "spool", 1 << 20) as s:
            with pytest.raises(state.StateError, match="in use"):
                Spool(tmp_path / "spool", 1 << 20)
            s.append("h", [msg("m0")])
            s.commit(s.take(1)[0])
    finally:
        os.umask(old)
    d = tmp_path / "spool"
    assert d.stat().st_mode & 0o777 == 0o750
    assert {n: (d / n).stat().st_mode & 0o777 for n in os.listdir(d)} == {
        SEG: 0o640, "position.json": 0o640, "lock": 0o640}


def test_concurrent_appends_each_come_out_once_in_each_threads_order(tmp_path):
    d = tmp_path / "spool"
    with Spool(d, 1 << 26, segment_bytes=64 << 10) as s:
        start = threading.Barrier(16)

        def push(t: int) -> None:
            start.wait()
            n = 0
            for j in range(60):  # 120 messages in batches of 1, 2 and 3
                batch = [msg(f"{t}-{n + k}") for k in range(j % 3 + 1)]
                s.append(f"h{t}", batch)
                n += len(batch)

        threads = [threading.Thread(target=push, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = drain(s)
    assert len(got) == len({e.msg.message_id for e in got}) == 16 * 120
    for t in range(16):
        mine = [int(e.msg.message_id.split("-")[1]) for e in got if e.host == f"h{t}"]
        assert mine == list(range(120))


# A child appending from 4 threads; it reports each append that returned (its last id) on
# stdout, unbuffered.  Big batches and small segments: the kill lands in writes and rolls.
CHILD = r"""
import os, sys, threading
from psprobe.messages import Message
from psprobe.spool import Spool

spool = Spool(sys.argv[1], 1 << 30, segment_bytes=256 << 10)
out = threading.Lock()

def push(t):
    i = 0
    while True:
        spool.append(f"h{t}", [Message("rk", f"{t}-{i + k}", b"x" * 20000, i + k, 1)
                               for k in range(3)])
        i += 3
        with out:
            os.write(1, f"{t}-{i - 1}\n".encode())

for t in range(4):
    threading.Thread(target=push, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def test_kill_9_loses_no_append_that_returned(tmp_path, caplog):
    d = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(d)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    reported = []
    try:
        for line in child.stdout:  # the child says how far it got; the kill follows its word
            reported.append(line.decode().strip())
            if len(reported) == 300:
                child.send_signal(signal.SIGKILL)
                break
        assert child.wait() == -signal.SIGKILL
        reported += [line.strip() for line in child.stdout.read().decode().splitlines()]
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert len(reported) >= 300
    acked: dict[int, int] = {}
    for r in reported:
        t, i = map(int, r.split("-"))
        acked[t] = max(acked.get(t, -1), i)
    with caplog.at_level(logging.WARNING, "psprobe.spool"), Spool(d, 1 << 30) as s:
        got = drain(s)
        s.append("h", [msg("after")])  # the spool goes on where the child stopped
        assert ids(drain(s)) == ["after"]
    assert len(got) == len({e.msg.message_id for e in got})
    for t, last in acked.items():
        mine = [int(e.msg.message_id.split("-")[1]) for e in got if e.host == f"h{t}"]
        # Everything acknowledged, in order; past it at most what was written unreported.
        assert mine == list(range(len(mine))) and len(mine) > last
    assert all("truncated" in m for m in caplog.messages)
