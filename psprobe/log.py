"""Logging that journald keeps well: one line per event, ``<N>`` priority prefixes.

journald reads a ``<N>`` prefix on a stdout/stderr line as the syslog priority
(``SyslogLevelPrefix=yes`` is the default), so ``journalctl -p warning -u
psprobe@X`` works without a syslog library.  The prefix is written only when
stderr IS the journal's stream (:func:`to_journal`); on a terminal, in a pipe
or a file it becomes a word (``warning:``, ``error:``) or nothing.  Newlines in
a message are escaped: text from a mesh or an archive can never forge a second
log line.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _Formatter(logging.Formatter):
    def __init__(self, prefix: bool) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR and os.environ.get("PSPROBE_DEBUG"):
            msg += " | " + self.formatException(record.exc_info)
        msg = msg.replace("\r", "\\r").replace("\n", "\\n")
        if self.prefix:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{msg}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def setup(verbose: bool = False, stream=None) -> None:
    """Route the ``psprobe`` logger to stderr, once per process."""
    stream = stream or sys.stderr
    prefix = to_journal(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(prefix))
    root = logging.getLogger("psprobe")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # pika logs every connection hiccup at length; our own line says what matters.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def to_journal(stream) -> bool:
    """Whether ``stream`` is connected to the journal, as sd_journal's own check decides.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a unit whose stderr (or
    stdout) it connected to journald; a child process inherits the variable
    whatever its stderr, so the variable alone proves nothing: the stream's own
    fstat must match it.  (psprobe.slots prints its few early lines by this too.)
    """
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, ValueError, OSError):  # no fd (a test's buffer), closed, garbage
        return False
