"""Logging that journald keeps well: one line per event, ``<N>`` priority prefixes.

journald reads a ``<N>`` prefix on a stdout/stderr line as the syslog priority
(``SyslogLevelPrefix=yes`` is the default), so ``journalctl -p warning -u
psprobe@X`` works without a syslog library.  On a terminal the prefix becomes
a word.  Newlines in a message are escaped: text from a mesh or an archive can
never forge a second log line.
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
    prefix = bool(os.environ.get("JOURNAL_STREAM")) or not _isatty(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(prefix))
    root = logging.getLogger("psprobe")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # pika logs every connection hiccup at length; our own line says what matters.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
