"""psprobe.state offline: the layout, the one atomic writer, the one flock helper, refusals.

The links planted by a hostile user during real runs are tests/faults/test_state_links.py
(with the broker); here each primitive on its own, on real files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from psprobe import state

HOST = "ps.example.org"


def test_every_path_is_spelled_by_the_layout(tmp_path):
    sd = tmp_path / "state"
    assert state.host_file(sd, HOST, state.CHECKPOINT) == sd / "hosts" / HOST / "checkpoint.json"
    assert state.sync_file(sd) == sd / "sync.json"
    assert state.sync_lock(sd).path == sd / "sync.lock"
    a, b = state.mesh_cache(sd, "https://a.example/mesh"), state.mesh_cache(sd, "https://b.example/m")
    assert a.parent == b.parent == sd / "meshes" and a != b
    assert a == state.mesh_cache(sd, "https://a.example/mesh") and a.suffix == ".json"
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(ValueError, match="unsafe host name"):
            state.host_dir(sd, bad)


def test_write_at_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.json"
    state.write_json_atomic(path, {"b": 1, "a": [1, 2]}, 0o640)
    assert path.read_bytes() == b'{"a":[1,2],"b":1}' and (path.stat().st_mode & 0o777) == 0o640
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        state.write_at(fd, "f.json", b"two", path=path, durable=False)
        state.write_at(fd, "f.json", b"three", path=path, fixed_temp=True)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"three" and os.listdir(tmp_path) == ["f.json"]
    assert state.is_temp(".f.json.tmp", "f.json") and state.is_temp(".f.json.0a1b.tmp", "f.json")
    assert not state.is_temp(".g.json.tmp", "f.json") and not state.is_temp("f.json.tmp", "f.json")


def test_a_failed_replace_removes_its_temp_and_names_the_path(tmp_path):
    (tmp_path / "f" / "x").mkdir(parents=True)  # a directory where the file belongs
    with pytest.raises(OSError) as e:
        state.write_atomic(tmp_path / "f", b"data")
    assert e.value.filename == str(tmp_path / "f")
    assert sorted(os.listdir(tmp_path)) == ["f"]
    with pytest.raises(FileNotFoundError) as e:  # an operator's directory that is not there
        state.write_atomic(tmp_path / "missing" / "f", b"data", durable=False)
    assert e.value.filename == str(tmp_path / "missing")


def test_a_link_at_the_file_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "f").symlink_to(victim)
    with pytest.raises(state.LinkError) as e:
        state.write_atomic(tmp_path / "f", b"data")
    assert str(e.value) == f"{tmp_path / 'f'}: refusing to follow a symbolic link"
    assert victim.read_text() == "precious"
    with pytest.raises(state.LinkError):
        state.read_json(tmp_path / "f")


def test_state_files_that_are_no_regular_single_files_are_refused(tmp_path):
    sd = tmp_path / "state"
    d = state.make_host_dir(sd, HOST)
    os.mkfifo(d / state.JOURNAL)  # a FIFO never blocks the open
    fd = state.host_dir_fd(sd, HOST)
    try:
        with pytest.raises(state.Refused, match=r"checkpoint\.journal: not a regular file"):
            state.check_host_files(fd, d)
        with pytest.raises(state.Refused, match=r"checkpoint\.journal: not a regular file"):
            state.open_file(fd, state.JOURNAL, os.O_RDONLY, path=d / state.JOURNAL)
        os.unlink(d / state.JOURNAL)
        (tmp_path / "other").write_text("")
        os.link(tmp_path / "other", d / state.LOCK)  # someone else's file under a second name
        with pytest.raises(state.Refused, match="lock: has 2 hard links; refusing to write it"):
            state.check_host_files(fd, d)
        with pytest.raises(state.Refused, match="lock: has 2 hard links"):
            state.open_file(fd, state.LOCK, os.O_RDWR, path=d / state.LOCK)
        assert os.close(state.open_file(fd, state.LOCK, os.O_RDONLY, path=d / state.LOCK)) is None
    finally:
        os.close(fd)


def test_read_json_missing_and_corrupt(tmp_path):
    assert state.read_json(tmp_path / "none.json", default={}) == {}
    assert state.read_json(tmp_path / "no" / "dir.json", root=tmp_path) is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: corrupt state file"):
        state.read_json(tmp_path / "bad.json")
    assert state.listdir(tmp_path, "no") == []


def test_flock_shared_and_exclusive(tmp_path):
    path = tmp_path / "l"
    path.write_text("")
    fds = [os.open(path, os.O_RDONLY) for _ in range(3)]  # one open file each: flock's unit
    try:
        assert state.flock(fds[0], shared=True) and state.flock(fds[1], shared=True)
        assert not state.flock(fds[2])  # exclusive: refused while shared ones are held
        os.close(fds.pop(0))
        os.close(fds.pop(0))
        assert state.flock(fds[0], wait=True)  # free now: does not block
    finally:
        for fd in fds:
            os.close(fd)


def test_host_busy_and_the_sync_lock(tmp_path):
    sd = tmp_path / "state"
    assert not state.host_busy(str(sd), HOST)  # no directory, no lock file
    with state.host_lock(str(sd), HOST):
        assert state.host_busy(str(sd), HOST)
    assert not state.host_busy(str(sd), HOST)
    with state.sync_lock(sd), pytest.raises(state.Busy) as e, state.sync_lock(sd):
        pass
    assert e.value.holder is None


def test_a_lock_that_cannot_be_opened_is_one_line(tmp_path):
    (tmp_path / "l").mkdir()
    with pytest.raises(state.StateError) as e, state.Lock(Path(tmp_path / "l")):
        pass
    assert str(e.value) == f"{tmp_path / 'l'}: cannot open lock: Is a directory"


@pytest.mark.parametrize("n", [3, 200])
def test_each_keeps_the_order_tries_every_item_and_raises_the_first_error(tmp_path, n):
    """state.each: sync's files of many hosts; one that fails stops none of the others."""
    assert state.each(lambda i: i * i, list(range(n))) == [i * i for i in range(n)]
    bad = {0, n // 2}

    def make(i: int) -> None:
        if i in bad:
            raise OSError(28, "No space left on device", str(tmp_path / f"f{i}"))
        (tmp_path / f"f{i}").write_text("x")

    with pytest.raises(OSError) as e:
        state.each(make, list(range(n)))
    assert e.value.filename == str(tmp_path / "f0")  # the first in order
    assert len(list(tmp_path.iterdir())) == n - len(bad)  # all the others were made
