"""The checkpoint, offline, on real files: what %check runs of the crash-safety core.

A run killed between its confirms and the end (journal replay), a torn or damaged
journal line, a damaged checkpoint falling back to the copy of the last run, no
usable copy, links planted at the host's state files, the look-back record's
delta encoding, status's read-only peek, and who holds the host's lock.  No
broker: the checkpoint moves on what a test says was confirmed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from psprobe import checkpoint, state

HOST = "ps.example.org"
A, B = "0123abcd/throughput", "4567ef01/packet-loss-rate"


@pytest.fixture
def sd(tmp_path) -> str:
    d = str(tmp_path / "state")
    state.make_host_dir(d, HOST)
    return d


def hostfile(sd: str, name: str) -> Path:
    return state.host_file(sd, HOST, name)


def ended_run(sd: str, pairs: dict[str, int]) -> None:
    """A run that confirmed ``pairs`` and ended: snapshot and copy written, journal empty."""
    cp = checkpoint.load(sd, HOST)
    for pair, ts in pairs.items():
        cp.advance(pair, ts)
    cp.sync()
    cp.keep_copy()
    cp.close()


def on_disk(sd: str, name: str = state.CHECKPOINT) -> dict:
    return json.loads(hostfile(sd, name).read_bytes())


# --- the journal: what a killed run confirmed is not lost


KILLED_RUN = """
import os, signal, sys
from psprobe import checkpoint
cp = checkpoint.load(sys.argv[1], sys.argv[2])
cp.advance(sys.argv[3], 200)
cp.advance(sys.argv[4], 50)
cp.sync()
os.kill(os.getpid(), signal.SIGKILL)  # before the end of the run folds the journal
"""


def test_a_killed_run_is_replayed_from_its_journal(sd):
    ended_run(sd, {A: 100})
    p = subprocess.run([sys.executable, "-c", KILLED_RUN, sd, HOST, A, B],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert on_disk(sd)["pairs"] == {A: 100}  # the snapshot never saw the confirms
    assert hostfile(sd, state.JOURNAL).read_text() == f"{A} 200\n{B} 50\n"
    cp = checkpoint.load(sd, HOST)
    assert cp.pairs == {A: 200, B: 50}
    cp.close()
    assert checkpoint.load(sd, HOST).pairs == {A: 200, B: 50}  # replaying twice is harmless
    cp = checkpoint.load(sd, HOST)
    cp.keep_copy()  # the end of the next run folds it
    cp.close()
    assert hostfile(sd, state.JOURNAL).read_bytes() == b""
    assert on_disk(sd)["pairs"] == on_disk(sd, state.COPY)["pairs"] == {A: 200, B: 50}


def test_the_journal_only_moves_forward_and_save_empties_it(sd):
    cp = checkpoint.load(sd, HOST)
    cp.advance(A, 10)
    cp.advance(A, 5)  # a late confirm of an older message: never backwards
    cp.advance(A, 10)
    assert cp.get(A) == 10 and cp.get(B) is None
    cp.sync()
    assert hostfile(sd, state.JOURNAL).read_text() == f"{A} 10\n"
    cp.save()
    assert hostfile(sd, state.JOURNAL).read_bytes() == b""
    cp.close()
    # A run that confirmed nothing new still empties a journal left behind.
    hostfile(sd, state.JOURNAL).write_text(f"{A} 11\n")
    cp = checkpoint.load(sd, HOST)
    cp.save()
    cp.close()
    assert hostfile(sd, state.JOURNAL).read_bytes() == b"" and on_disk(sd)["pairs"] == {A: 11}


def test_a_run_that_moved_nothing_rewrites_neither_file_unless_the_copy_differs(sd):
    ended_run(sd, {A: 100, B: 7})
    files = [hostfile(sd, n) for n in (state.CHECKPOINT, state.COPY)]
    before = [(f.stat().st_ino, f.read_bytes()) for f in files]
    ended_run(sd, {})  # an idle run: the file and its copy already say it all
    assert [(f.stat().st_ino, f.read_bytes()) for f in files] == before
    ended_run(sd, {A: 90})  # an old confirm moves nothing either
    assert [f.stat().st_ino for f in files] == [i for i, _ in before]
    hostfile(sd, state.COPY).write_bytes(b"{}")  # a copy that fell behind (a killed run)
    ended_run(sd, {})
    assert on_disk(sd, state.COPY) == on_disk(sd) and on_disk(sd)["pairs"] == {A: 100, B: 7}
    hostfile(sd, state.JOURNAL).write_text(f"{A} 50\n")  # a journal line, even an old one
    ended_run(sd, {})
    assert hostfile(sd, state.JOURNAL).read_bytes() == b""
    assert hostfile(sd, state.CHECKPOINT).stat().st_ino != before[0][0]
    ended_run(sd, {B: 8})
    assert on_disk(sd)["pairs"] == on_disk(sd, state.COPY)["pairs"] == {A: 100, B: 8}


def test_a_torn_last_line_is_ignored(sd):
    ended_run(sd, {A: 100})
    hostfile(sd, state.JOURNAL).write_text(f"{A} 150\n{B} 7\n{A} 16")  # power lost mid-line
    assert checkpoint.load(sd, HOST).pairs == {A: 150, B: 7}


def test_a_damaged_line_stops_the_replay_there_with_a_warning(sd, caplog):
    ended_run(sd, {A: 100})
    hostfile(sd, state.JOURNAL).write_bytes(f"{A} 150\n\xff\xfe 3\n{A} 999\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, "psprobe.checkpoint"):
        assert checkpoint.load(sd, HOST).pairs == {A: 150}
    assert [r.getMessage() for r in caplog.records] == [
        f"{hostfile(sd, state.JOURNAL)}: line 2 is damaged; replayed the 1 before it"]


# --- a damaged checkpoint: the copy of the end of the last run, or one clear line


def test_a_damaged_checkpoint_resumes_from_the_copy_and_is_kept_aside(sd, caplog):
    ended_run(sd, {A: 100, B: 40})
    cp = checkpoint.load(sd, HOST)
    cp.advance(A, 300)
    cp.save()  # the snapshot moved on; the copy is the end of the last run
    cp.close()
    hostfile(sd, state.CHECKPOINT).write_text('{"version": 1, "pairs": {"x": "soon"}}')
    with caplog.at_level(logging.WARNING, "psprobe.checkpoint"):
        cp = checkpoint.load(sd, HOST)
    assert cp.pairs == {A: 100, B: 40}  # no newer than what was confirmed: nothing skipped
    assert hostfile(sd, state.DAMAGED).read_text() == '{"version": 1, "pairs": {"x": "soon"}}'
    assert not hostfile(sd, state.CHECKPOINT).exists()
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning == (f"{hostfile(sd, state.CHECKPOINT)}: checkpoint has the wrong shape; "
                       "resuming from checkpoint.prev.json (the end of the last run), kept the "
                       "damaged file as checkpoint.json.damaged")
    cp.keep_copy()
    cp.close()
    assert on_disk(sd)["pairs"] == {A: 100, B: 40}


@pytest.mark.parametrize("copy", [None, b"{", b'{"pairs": [1]}'], ids=["missing", "torn", "shape"])
def test_no_usable_copy_is_one_line_and_nothing_moves(sd, copy):
    hostfile(sd, state.CHECKPOINT).write_bytes(b'{"version": 1, "pa')
    if copy is not None:
        hostfile(sd, state.COPY).write_bytes(copy)
    with pytest.raises(state.StateError) as e:
        checkpoint.load(sd, HOST)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(f"{hostfile(sd, state.CHECKPOINT)}: corrupt state file (")
    assert line.endswith("; no usable checkpoint.prev.json either: move it aside to start from "
                         "[collect] first_run_lookback")
    assert hostfile(sd, state.CHECKPOINT).read_bytes() == b'{"version": 1, "pa'
    assert not hostfile(sd, state.DAMAGED).exists()


def test_a_damaged_checkpoint_that_cannot_be_moved_aside_stops_the_run(sd):
    ended_run(sd, {A: 100})
    hostfile(sd, state.CHECKPOINT).write_text("{")
    (hostfile(sd, state.DAMAGED) / "x").mkdir(parents=True)  # an operator's directory there
    with pytest.raises(state.StateError, match=r"corrupt state file .*; cannot move it aside: "):
        checkpoint.load(sd, HOST)
    assert hostfile(sd, state.CHECKPOINT).read_text() == "{"


# --- links: never followed, the file they point at never touched


@pytest.mark.parametrize("name", [state.CHECKPOINT, state.JOURNAL, state.COPY, state.LOCK,
                                  state.HISTORY, state.TARGET])
def test_a_link_at_a_host_state_file_is_refused_at_load(sd, tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    hostfile(sd, name).symlink_to(victim)
    with pytest.raises(state.LinkError) as e:
        checkpoint.load(sd, HOST)
    assert str(e.value) == f"{hostfile(sd, name)}: refusing to follow a symbolic link"
    assert victim.read_text() == "precious\n"


def test_a_link_planted_during_a_run_is_refused_by_save_and_advance(sd, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    cp = checkpoint.load(sd, HOST)
    hostfile(sd, state.CHECKPOINT).symlink_to(victim)
    hostfile(sd, state.JOURNAL).symlink_to(victim)
    with pytest.raises(state.LinkError, match=r"checkpoint\.journal: refusing to follow"):
        cp.advance(A, 1)
    with pytest.raises(state.LinkError, match=r"checkpoint\.json: refusing to follow"):
        cp.save()
    cp.close()
    assert victim.read_text() == "precious\n"
    assert not [n for n in os.listdir(hostfile(sd, ".")) if n.endswith(".tmp")]


@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_at_the_fixed_temp_name_is_removed_never_written_through(sd, tmp_path, dangling):
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious\n")
    hostfile(sd, ".checkpoint.json.tmp").symlink_to(victim)
    ended_run(sd, {A: 1})
    assert on_disk(sd)["pairs"] == {A: 1} and not hostfile(sd, state.CHECKPOINT).is_symlink()
    assert not os.path.lexists(hostfile(sd, ".checkpoint.json.tmp"))
    assert victim.read_text() == "precious\n" if not dangling else not victim.exists()


def test_a_link_at_the_damaged_name_is_refused(sd, tmp_path):
    ended_run(sd, {A: 100})
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    hostfile(sd, state.CHECKPOINT).write_text("{")
    hostfile(sd, state.DAMAGED).symlink_to(victim)
    with pytest.raises(state.LinkError, match=r"checkpoint\.json\.damaged: refusing to follow"):
        checkpoint.load(sd, HOST)
    assert victim.read_text() == "precious\n" and hostfile(sd, state.CHECKPOINT).read_text() == "{"


def test_a_link_at_the_host_lock_is_refused(sd, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    hostfile(sd, state.LOCK).symlink_to(victim)
    with pytest.raises(state.LinkError), state.host_lock(sd, HOST):
        pass
    assert victim.read_text() == "precious\n"


# --- errors are one line naming the path


def test_an_unusable_host_directory_is_one_line(tmp_path):
    sd = tmp_path / "state"
    (sd / "hosts").mkdir(parents=True)
    (sd / "hosts" / HOST).write_text("")  # a file where the directory belongs
    with pytest.raises(state.StateError) as e:
        checkpoint.load(str(sd), HOST)
    assert str(e.value) == f"{sd / 'hosts' / HOST}: cannot read checkpoint: Not a directory"
    assert checkpoint.peek(str(sd), HOST) == {}


def test_a_host_directory_gone_mid_run_fails_the_write_in_one_line(sd):
    cp = checkpoint.load(sd, HOST)
    cp.advance(A, 1)
    for name in os.listdir(hostfile(sd, ".")):
        os.unlink(hostfile(sd, name))
    os.rmdir(hostfile(sd, "."))
    with pytest.raises(state.StateError, match=r"checkpoint.json: cannot write checkpoint: No such"):
        cp.save()
    cp.close()


def test_no_host_directory_yet_is_an_empty_checkpoint(tmp_path):
    cp = checkpoint.load(str(tmp_path / "state"), HOST)  # a first dry run
    assert cp.pairs == {} and cp.scheme is None and cp.recent == {}
    cp.keep_copy()  # nothing confirmed: nothing written
    assert not (tmp_path / "state").exists()


# --- what the file holds


def test_scheme_routed_and_the_look_back_record_round_trip_delta_encoded(sd):
    cp = checkpoint.load(sd, HOST)
    cp.advance(A, 1_700_000_900)
    cp.scheme, cp.swept, cp.routed = "https", 1_700_001_000.12345, {"perfsonar.raw.throughput"}
    cp.remember(A, 1_700_000_000, [1_700_000_600, 1_700_000_900])
    cp.remember(A, 0, [1_700_000_950])  # the floor only opens a new record
    cp.keep_copy()
    cp.close()
    doc = on_disk(sd)
    assert doc["recent"] == {A: [1_700_000_000, 600, 300, 50]}  # a few digits a point
    assert doc["swept"] == 1_700_001_000.123 and doc["routed"] == ["perfsonar.raw.throughput"]
    assert doc == on_disk(sd, state.COPY)
    back = checkpoint.load(sd, HOST)
    assert back.scheme == "https" and back.routed == {"perfsonar.raw.throughput"}
    assert back.recent == {A: (1_700_000_000, [1_700_000_600, 1_700_000_900, 1_700_000_950])}
    assert back.seen(A) == (1_700_000_000, frozenset({1_700_000_600, 1_700_000_900, 1_700_000_950}))
    assert back.seen(B) == (0, frozenset())  # no record: complete from after its checkpoint


def test_what_the_file_does_not_know_is_dropped_not_guessed(sd):
    hostfile(sd, state.CHECKPOINT).write_text(json.dumps({
        "version": 1, "scheme": "gopher", "pairs": {A: 5}, "routed": ["k", 3], "swept": True,
        "recent": {A: [1, 2]}}))
    cp = checkpoint.load(sd, HOST)
    assert (cp.pairs, cp.scheme, cp.routed, cp.swept, cp.recent) == ({A: 5}, None, {"k"}, None, {})
    hostfile(sd, state.CHECKPOINT).write_text(json.dumps({
        "version": 1, "pairs": {}, "swept": 10, "recent": {A: [], B: [4, 1], "c": ["x"]}}))
    assert checkpoint.load(sd, HOST).recent == {B: (4, [5])}


def test_remember_keeps_only_what_the_next_look_back_reaches(sd):
    cp = checkpoint.load(sd, HOST)
    cp.horizon = 100
    cp.remember(A, 0, [10, 20])  # wholly behind the horizon: not kept
    cp.remember(B, 50, [90, 100, 120])
    assert cp.recent == {B: (50, [100, 120])}


def test_forget_before(sd):
    cp = checkpoint.load(sd, HOST)
    cp.pairs = {A: 500, B: 90, "idle/x": 10}
    cp.recent = {A: (100, [150, 210, 210, 300]), B: (80, [85, 90]), "idle/x": (0, [5, 10])}
    cp.forget_before(200)
    # The floor moves up with the horizon, duplicates merge; a series with nothing in reach
    # and its checkpoint behind the horizon is idle: its record restarts at its checkpoint.
    assert cp.recent == {A: (200, [210, 300])}
    cp.pairs[B] = 250
    cp.recent[B] = (100, [120])
    cp.forget_before(200)
    assert cp.recent[B] == (200, [])  # its checkpoint is within reach: an empty, complete record


# --- status's read-only view


def test_peek_reads_the_journal_but_moves_renames_and_writes_nothing(sd):
    assert checkpoint.peek(sd, HOST) == {}
    ended_run(sd, {A: 100})
    hostfile(sd, state.JOURNAL).write_text(f"{A} 120\n{B} 3\n")  # a collect running now
    before = {n: hostfile(sd, n).read_bytes() for n in os.listdir(hostfile(sd, "."))}
    assert checkpoint.peek(sd, HOST) == {A: 120, B: 3}
    hostfile(sd, state.CHECKPOINT).write_text("{")
    before[state.CHECKPOINT] = b"{"
    assert checkpoint.peek(sd, HOST) == {}  # damaged: no fallback, no renaming
    assert {n: hostfile(sd, n).read_bytes() for n in os.listdir(hostfile(sd, "."))} == before
    assert checkpoint.peek(sd, "other.example.org") == {}


def test_sweep_removes_only_collects_own_leftovers(sd):
    ended_run(sd, {A: 1})
    d = hostfile(sd, ".")
    mine = [".checkpoint.json.tmp", ".checkpoint.prev.json.tmp", ".history.json.0a1b2c3d.tmp"]
    theirs = [".target.json.0a1b2c3d.tmp", "notes.tmp"]
    for n in mine + theirs:
        (d / n).write_text("")
    (d / ".history.json.dead.tmp").symlink_to(d / state.CHECKPOINT)  # removed, never followed
    cp = checkpoint.load(sd, HOST)
    assert cp.sweep() == 4
    assert sorted(os.listdir(d)) == sorted([*theirs, state.CHECKPOINT, state.COPY, state.JOURNAL])


# --- the host's lock: who holds it


@pytest.mark.parametrize("kind", state.HOLDERS)
def test_a_held_lock_says_who_holds_it(sd, kind):
    with state.host_lock(sd, HOST, kind):
        assert hostfile(sd, state.LOCK).read_text() == f"{kind} {os.getpid()}\n"
        assert state.host_busy(sd, HOST)
        with pytest.raises(state.Busy) as e, state.host_lock(sd, HOST):
            pass
        assert e.value.holder == kind
    assert not state.host_busy(sd, HOST)
    with state.host_lock(sd, HOST, "backfill"):  # free again; the file now names the new holder
        assert hostfile(sd, state.LOCK).read_text() == f"backfill {os.getpid()}\n"


def test_a_lock_file_naming_no_known_holder_gives_none(sd):
    hostfile(sd, state.LOCK).write_text("someone 1\n")
    with state.Lock(hostfile(sd, state.LOCK)):  # no kind: the file is left as it is
        assert hostfile(sd, state.LOCK).read_text() == "someone 1\n"
        with pytest.raises(state.Busy) as e, state.host_lock(sd, HOST):
            pass
        assert e.value.holder is None
