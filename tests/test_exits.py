"""Exit statuses: one home (psprobe/exits.py), the README's table equal to it, systemd's names.

Why: an operator reads a failed run as ``status=69/UNAVAILABLE`` in ``systemctl
status``; the number, systemd's name for it and the README's words must agree.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from psprobe import exits, metrics
from psprobe.exits import Exit

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_table() -> list[tuple[str, str, str]]:
    """The rows of the table under "### Exit status of `psprobe collect`"."""
    text = README.read_text()
    section = text.split("### Exit status of `psprobe collect`", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].replace(" ", "") == "|status|systemd'sname|meaning|", rows[0]
    assert set(rows[1]) <= {"|", "-"}, rows[1]
    out = []
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, line
        out.append((cells[0], cells[1], cells[2]))
    return out


def test_the_readme_table_is_the_enum():
    want = [(str(int(e)), f"`{exits.SYSTEMD[e]}`", exits.README_ROWS[e]) for e in Exit]
    assert readme_table() == want


def test_every_status_has_its_words_and_a_distinct_value():
    assert set(exits.SYSTEMD) == set(exits.README_ROWS) == set(Exit)
    assert len({int(e) for e in Exit}) == len(Exit)
    assert all(0 <= e <= 255 for e in Exit)
    # What psprobe used to exit with, and systemd names NOTIMPLEMENTED / NOPERMISSION: gone.
    assert not {3, 4} & {int(e) for e in Exit}


def test_the_enum_writes_as_its_number():
    # as the history file, the metrics and a log line write them, on every Python
    assert str(Exit.BROKER) == "69" and f"{Exit.STATE}" == "74" and json.dumps(Exit.CONFIG) == "78"


def test_the_other_commands_1_is_row_1():
    """sync's failed mesh, status's alarm and the tools' failure are the table's row 1
    (aliases: the table lists 1 once), and that row and the README's sentence on the
    other commands say so."""
    assert Exit.MESH is Exit.ALARM is Exit.FAILURE is Exit.ARCHIVE
    assert [int(e) for e in Exit].count(1) == 1
    assert "sync: a mesh could not be read" in exits.README_ROWS[Exit.MESH]
    section = README.read_text().split("### Exit status of `psprobe collect`", 1)[1]
    section = " ".join(section.split("\n### ", 1)[0].split())
    assert "`psprobe status` exits 1 when a host fails or lags" in section
    assert "`psprobe report` when its mail could not be sent" in section


def test_metrics_help_names_the_statuses_a_run_records():
    """The help text of psprobe_collect_last_status is the enum's: each status a run can
    record, with its word, and no other."""
    _, text = metrics.HOST_METRICS["psprobe_collect_last_status"]
    listed = re.search(r"\((.*)\)", text).group(1)
    assert listed == exits.describe(exits.RUN)
    pairs = [p.split(" ", 1) for p in listed.split(", ")]
    assert [(int(v), w) for v, w in pairs] == [(int(e), e.name.lower()) for e in exits.RUN]
    assert set(exits.RUN) == set(Exit) - {Exit.USAGE, Exit.BUSY}  # those end a process before a run
    assert "69 broker" in text and "74 state" in text and "78 config" in text
    assert re.search(r"\b[34] (broker|state)\b", text) is None


def test_no_literal_exit_status_left_in_the_code():
    """Statuses come from psprobe.exits: no sys.exit(3), _fail(..., 4), status = 2 in psprobe/,
    nor an exit with a bare 0 or 1 (``sys.exit(1 if ... else 0)``, ``_fail(..., 1)``)."""
    bad = re.compile(r"(sys\.exit\(|_fail\(.*, |\.status = |status=|return )([2-9]|[1-9]\d+)\)?\s*$")
    bare = re.compile(r"sys\.exit\((\d|\d+ if .* else \d+)\)|_fail\(.*, \d+\)\s*$")
    found = []
    for f in sorted((ROOT / "psprobe").glob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if bad.search(line) or bare.search(line):
                found.append(f"{f.name}:{n}: {line.strip()}")
    assert found == []


def test_systemd_names_them_so():
    """``systemd-analyze exit-status`` (systemd >= 243) says the names the README shows."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    values = [str(int(e)) for e in Exit if e != Exit.STOPPED]
    p = subprocess.run([tool, "exit-status", *values], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"this systemd-analyze has no exit-status verb: {p.stderr.strip()}")
    names = {}
    for line in p.stdout.splitlines()[1:]:
        name, value, _cls = line.split()
        names[int(value)] = name
    for e in Exit:
        if e != Exit.STOPPED:
            assert exits.SYSTEMD[e] == f"{int(e)}/{names[int(e)]}", e
    assert exits.SYSTEMD[Exit.STOPPED] == "15/TERM"  # a signal: the journal's status=15/TERM
