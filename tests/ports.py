"""A loopback port for a test: one to listen on next, or one where nothing answers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick, then closed).

    Connecting to it is refused until something binds it: the "closed port" of a broker
    or an archive that is down.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
