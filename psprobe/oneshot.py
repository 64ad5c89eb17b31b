"""``psprobe collect HOST`` without click: the command psprobe@.service runs.

2 000 hosts run it every interval, most finding nothing new, so its start-up is
the fleet's steady cost.  For the unit's own command line (``[--config P] [-v]
collect HOST``, :func:`psprobe.slots.unit_command`) bin/psprobe calls :func:`main`
and never imports click (about 10 ms of CPU per run); ``psprobe collect`` typed
with other options goes through the CLI, which runs the same :func:`collect`.
The CLI's other commands load their configuration and hosts through here too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

log = logging.getLogger("psprobe")


def fail(line: str, status: int) -> NoReturn:
    """One line, then the exit status."""
    log.error("%s", line)
    sys.exit(status)


def load_config(path: str | None):
    """The configuration, or one line and exit 78."""
    from psprobe import config
    from psprobe.exits import Exit

    try:
        return config.load(path)
    except config.ConfigError as e:
        fail(str(e), Exit.CONFIG)


def parse_host(name: str) -> str:
    """HOST as given (a unit instance or host[:port]), or one line and exit 2."""
    from psprobe import hostnames
    from psprobe.exits import Exit

    try:
        return hostnames.from_instance(name)
    except hostnames.BadHost as e:
        fail(f"{name!r}: not a valid host: {e}", Exit.USAGE)


def as_state_owner(cfg, host: str) -> None:
    """Started as root: run as the owner of the host's state directory (psprobe), so a run
    by hand leaves nothing a timer run cannot use (bin/psprobe may have done it already)."""
    from psprobe import slots

    slots.drop_to_owner(cfg.for_host(host).collect.state_dir)


def main(config_path: str | None, verbose: bool, host: str) -> NoReturn:
    """The unit's ``collect HOST``, logging set up as the CLI's group does."""
    from psprobe import log as logsetup

    logsetup.setup(verbose)
    collect(config_path, host)


def collect(config_path: str | None, host: str, *, dry_run: bool = False) -> NoReturn:
    """Publish everything new in ``host``'s archive, then move its checkpoint; exit."""
    from psprobe import runner, slots

    cfg = load_config(config_path)
    h = parse_host(host)
    as_state_owner(cfg, h)
    if not dry_run:
        # Already held when bin/psprobe took it before the imports.
        slots.hold(cfg.collect.runtime_dir, cfg.collect.max_concurrent)
    got = _stop_on_signals()
    status = runner.collect_host(cfg, h, dry_run=dry_run)
    if got:  # recorded: now end as the signal asked, without waiting for fetch threads
        sys.stderr.flush()
        signal.signal(got[0], signal.SIG_DFL)
        os.kill(os.getpid(), got[0])
    sys.exit(status)


def _stop_on_signals() -> list[int]:
    """SIGTERM (systemctl stop, pause -f, TimeoutStartSec) and SIGINT end the run as a
    failure with its reason on record; returns the list the signal's number goes in.

    A second signal is ignored while the run records itself (systemd's
    TimeoutStopSec still bounds that with SIGKILL).
    """
    from psprobe.collect import Stopped

    got: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        got.append(signum)
        raise Stopped(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)
    return got
