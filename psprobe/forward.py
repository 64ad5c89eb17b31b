"""The spool's forwarder: pushed runs' messages from the spool to the broker, in order.

``psprobe receive`` answers 2xx once a run is in the spool; this thread makes
that promise good.  It takes the spool in order, publishes with confirms
(:class:`psprobe.publish.BrokerOutlet`, as a collect does) and commits only
what the broker confirmed, so an outage, a ``kill -9`` or a reboot loses
nothing and resends at most what was sent since the last commit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable

from psprobe.config import Broker, ConfigError

# The lines of the receive service, whichever module writes them (one name to filter on).
log = logging.getLogger("psprobe.receive")

TAKE = 256  # spooled messages taken at a time
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # reconnects: doubling, capped


class Forwarder(threading.Thread):
    """Takes the spool in order, publishes with confirms, commits what the broker confirmed.

    On a broker error: close, rewind the spool to the last commit, wait
    (doubling up to BACKOFF_MAX, cut short by ``finish``), reconnect.  A commit
    persists the position once per round of confirms, not once per message, and
    hands ``confirmed`` the messages per host it covered.  Idle, it waits on
    ``kick``, which every append and the stop set: no polling.
    """

    def __init__(self, settings: Broker, spool, kick: threading.Event,
                 confirmed: Callable[[Counter], None]) -> None:
        super().__init__(name="receive-forwarder", daemon=True)
        self.settings, self.spool, self.kick, self.confirmed = settings, spool, kick, confirmed
        self.finish = threading.Event()  # set at a stop: send what is spooled, then end
        self.routed: frozenset[str] = frozenset()
        self._last = None  # the newest confirmed entry, not yet committed
        self._counts: Counter = Counter()

    def run(self) -> None:
        from psprobe.publish import BrokerError, BrokerOutlet

        outlet, backoff, failing = None, BACKOFF_FIRST, None
        while True:
            try:
                # Set before this take: every append came before it (requests joined).
                finishing = self.finish.is_set()
                self.kick.clear()  # an append from now on sets it again: none is missed
                entries = self.spool.take(TAKE)
                if not entries:
                    if outlet is not None:
                        outlet.flush()
                    self._commit()
                    if finishing:
                        break
                    self.kick.wait()
                    continue
                if outlet is None:
                    outlet = BrokerOutlet(self.settings, self.routed)
                    if failing is not None:
                        log.info("receive: broker %s answers again; sending the %d spooled "
                                 "message(s)", outlet.where, self.spool.pending())
                    failing, backoff = None, BACKOFF_FIRST
                for e in entries:
                    outlet.send(e.msg, lambda e=e: self._confirmed(e))
                self._commit()
            except (BrokerError, ConfigError) as e:
                self._commit()
                if outlet is not None:
                    self.routed |= outlet.routed_keys
                    outlet.close()
                    outlet = None
                self.spool.rewind()
                if str(e) != failing:
                    log.warning("receive: %s; %d message(s) wait in the spool; retrying in %gs "
                                "(doubling up to %gs)", e, self.spool.pending(), backoff,
                                BACKOFF_MAX)
                failing = str(e)
                if self.finish.is_set() or self.finish.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as e:  # the spool's disk: a bug or a damaged file; keep trying
                log.error("receive: forwarder: %s: %s", type(e).__name__, e, exc_info=True)
                if outlet is not None:
                    outlet.close()
                    outlet = None
                with contextlib.suppress(Exception):
                    self.spool.rewind()
                if self.finish.wait(backoff):
                    break
                backoff = min(backoff * 2, BACKOFF_MAX)
        if outlet is not None:
            self.routed |= outlet.routed_keys
            outlet.close()

    def _confirmed(self, entry) -> None:
        self._last = entry
        self._counts[entry.host] += 1

    def _commit(self) -> None:
        if self._last is None:
            return
        last, counts = self._last, self._counts
        self._last, self._counts = None, Counter()
        self.spool.commit(last)
        self.confirmed(counts)
