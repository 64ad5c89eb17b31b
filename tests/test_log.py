"""``<N>`` priority prefixes only where journald reads them: stderr IS the journal's stream.

Why: systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` for a unit whose output it
connected to journald, and every child inherits it (a shell of ``systemd-run
-t``, a command run from a unit's script): the variable alone says nothing of
where this process's stderr goes.  sd_journal compares it with fstat(2) of the
stream; so does psprobe.log.  On a terminal or in a pipe a line reads
``warning: ...``, never ``<4>...``.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAY = ("import logging, sys; from psprobe import log, slots; log.setup();"
       "lg = logging.getLogger('psprobe'); lg.info('an info'); lg.warning('a warning');"
       "lg.error('an error'); slots._say(4, 'an early warning')")


def run(stderr, journal_stream: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(ROOT)
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    subprocess.run([sys.executable, "-c", SAY], stderr=stderr, env=env, check=True, timeout=60)


def dev_ino(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_prefix_when_stderr_is_the_journal_stream(tmp_path):
    out = tmp_path / "stream"  # stands for journald's socket: what matters is dev:ino
    with open(out, "wb") as f:
        run(f, dev_ino(out))
    assert out.read_text().splitlines() == ["<6>an info", "<4>a warning", "<3>an error",
                                            "<4>an early warning"]


@pytest.mark.parametrize("inherited", [None, "", "garbage", "1:2"])
def test_no_prefix_in_a_pipe_or_file_whatever_the_environment(tmp_path, inherited):
    out = tmp_path / "out"
    with open(out, "wb") as f:
        run(f, inherited if inherited != "1:2" else dev_ino(tmp_path))  # another file's
    assert out.read_text().splitlines() == ["an info", "warning: a warning", "error: an error",
                                            "warning: an early warning"]
    p = subprocess.run([sys.executable, "-c", SAY], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": "0:0"})
    assert "<" not in p.stderr, p.stderr


def test_no_prefix_on_a_terminal(tmp_path):
    """A shell in a systemd unit (JOURNAL_STREAM inherited) running psprobe on a pty."""
    primary, secondary = pty.openpty()
    try:
        # the journal's stream is some other file: the inherited variable of a login shell
        run(secondary, dev_ino(ROOT / "README.md"))
        os.close(secondary)
        secondary = -1
        got = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the writer is gone
                break
            if not chunk:
                break
            got += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    lines = got.decode().replace("\r\n", "\n").splitlines()
    assert lines == ["an info", "warning: a warning", "error: an error", "warning: an early warning"]
