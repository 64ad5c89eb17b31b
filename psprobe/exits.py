"""Every exit status of psprobe, in one place: value, systemd's name for it, what it means.

Why these values: systemd names an exit status in the journal line every failed
run leaves (``Main process exited, code=exited, status=69/UNAVAILABLE``, which
``systemctl status`` and ``journalctl -u`` show), from the LSB codes (2-7) and
the BSD sysexits (64-78).  Each failure is a value whose name says what it is:
the old 3 and 4 read ``NOTIMPLEMENTED`` and ``NOPERMISSION``, which they were
not.  (systemd 239, EL8, names 64-78 in that journal line too; its ``Main PID:``
line shows the bare number, as 252's does.)

The README's table "Exit status of psprobe collect" is :data:`README_ROWS`
(tests/test_exits.py checks it, and ``systemd-analyze exit-status`` for the
names).  Cheap to import: enum only (``signal`` loads it anyway).
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    ARCHIVE = 1  # collect, backfill: an archive (or some of its series) unreadable; sync: a mesh
    USAGE = 2  # a bad argument: host name, unknown host, --since (click's own usage errors: 2 too)
    BROKER = 69  # EX_UNAVAILABLE
    STATE = 74  # EX_IOERR: the state directory
    BUSY = 75  # EX_TEMPFAIL: backfill while a collect holds the host's lock
    CONFIG = 78  # EX_CONFIG
    STOPPED = 143  # 128 + SIGTERM; the process then ends by the signal itself
    # The other commands' 1, by what it means there (aliases: the same member as
    # ARCHIVE, so the table and the loops over Exit list 1 once).
    MESH = 1  # sync: a mesh could not be read (the rest was applied)
    ALARM = 1  # status: a host fails or lags, or a mesh failed at the last sync (a check)
    FAILURE = 1  # report: no mail sent; logs: no journalctl; pause/resume: systemctl failed

    def __str__(self) -> str:  # "69" on every Python (3.9 and 3.10 would say "Exit.BROKER")
        return str(int(self))

    @property
    def journal(self) -> str:
        """What systemd's journal line says of this status (``status=...``)."""
        return SYSTEMD[self]

    @property
    def word(self) -> str:
        """One word for it, e.g. in the metrics' help text."""
        return self.name.lower()


# systemd's name (systemd-analyze exit-status); 143 is never an exit: the run
# is recorded, then the process kills itself with the SIGTERM it got.
SYSTEMD = {
    Exit.OK: "0/SUCCESS",
    Exit.ARCHIVE: "1/FAILURE",
    Exit.USAGE: "2/INVALIDARGUMENT",
    Exit.BROKER: "69/UNAVAILABLE",
    Exit.STATE: "74/IOERR",
    Exit.BUSY: "75/TEMPFAIL",
    Exit.CONFIG: "78/CONFIG",
    Exit.STOPPED: "15/TERM",
}

# The README's rows, word for word: | status | the journal says | meaning |
README_ROWS = {
    Exit.OK: "done; or another collect of this host holds its lock: nothing done",
    Exit.ARCHIVE: "collect, backfill: the archive could not be read (all of it, or some series: "
                  "the others were collected); sync: a mesh could not be read (the rest was "
                  "applied)",
    Exit.USAGE: "a bad argument: not a valid host name, a host psprobe does not know, a bad "
                "`--since`",
    Exit.BROKER: "the broker refused, lost the connection, did not confirm, or routed nothing "
                 "of the run",
    Exit.STATE: "the state directory cannot be used (unwritable, full, a link where a state file "
                "belongs, damaged checkpoint); also sync's",
    Exit.BUSY: "backfill: a collect of the host holds its lock; try again",
    Exit.CONFIG: "bad configuration, one line naming file, section and key (also a "
                 "world-readable secrets file, a client key that does not fit its certificate)",
    Exit.STOPPED: "stopped from outside (SIGTERM: `systemctl stop`, `psprobe pause -f`, "
                  "`TimeoutStartSec`); the run is recorded as failed, `error=stopped by SIGTERM "
                  "...`, and the process then ends by that signal (a shell shows 143)",
}


# What a collect run can record (its history, psprobe_collect_last_status): the others
# end the process before a run starts.
RUN = (Exit.OK, Exit.ARCHIVE, Exit.BROKER, Exit.STATE, Exit.CONFIG, Exit.STOPPED)


def describe(statuses: tuple[Exit, ...] = tuple(Exit)) -> str:
    """``0 ok, 1 archive, ...``: the statuses with their words."""
    return ", ".join(f"{int(e)} {e.word}" for e in statuses)
