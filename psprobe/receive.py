"""``psprobe receive``: the endpoint pScheduler's ``http`` archiver pushes finished runs to.

One way through: request (:mod:`psprobe.httpd`) -> who pushes (token, client
certificate, the record) -> :func:`psprobe.convert.messages` ->
:meth:`Spool.append <psprobe.spool.Spool.append>` (fsynced) -> 2xx; the
forwarder (:mod:`psprobe.forward`) then publishes the spool in order with
confirms.  Every accepted run goes through the spool, so a broker outage, a
``kill -9`` or a reboot loses nothing that was answered 2xx.  This module
decides who may push and what a request means, and keeps each pushing host's
tallies (``received.json``) for status, the report and the metrics.

What pScheduler's archiver makes of our answers (``pscheduler-archiver-http``):
it POSTs (or PUTs, ``op``) the run record as JSON with the ``_headers`` of its
spec (``Authorization: Bearer ...`` here), counts 200-299 as archived, and
anything else as a failure that it retries by the spec's ``retry-policy``
when one is given (it reads no ``Retry-After``).  So: 2xx only once the run is
safe; 503 + ``Retry-After`` when the spool is full (a generic client waits,
pScheduler retries by its policy); 400 for a record that can never be
converted; 413 for a body over ``[receive] max_body``; 401 without a valid
token (RFC 6750: ``invalid_token`` for a wrong one), 403 for a host that may
not push here (or a token and a client certificate of two hosts).  curl's
``Expect: 100-continue`` is answered only once the credentials and the size
passed, so a refused body is never sent.  The ``Content-Type`` is not
checked: older archivers send none of their own (curl's form type), newer
ones ``application/json``.  Each refusal is one log line.
"""

from __future__ import annotations

import contextlib
import grp
import hmac
import json
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psprobe import history, hostnames, httpd, metrics, state
from psprobe.config import Config, ConfigError
from psprobe.exits import Exit
from psprobe.httpd import Conn, Refused, Request

log = logging.getLogger("psprobe.receive")

RETRY_AFTER = 60  # seconds a 503 (spool full) asks the pusher to wait
FLUSH_EVERY = 5.0  # a host's received.json is written at most this often (and at exit)
SUMMARY_EVERY = 600.0  # the periodic summary line
HOUR = 3600
KEEP = history.KEEP  # received.json's hourly counts go back as far as a pulled host's runs


def _name(host: str) -> str:
    """A host key without its port: who pushes is a machine, not one of its archives."""
    return hostnames.split(host)[0]


# --- who may push


class _Watched:
    """A file re-read when its mtime (or inode, size) changes; stat is cheap per request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._key: tuple | None = None
        self._lock = threading.Lock()

    def changed(self) -> os.stat_result | None:
        """The new stat when the file changed since the last look (None: unchanged)."""
        try:
            st = os.stat(self.path)
            key: tuple = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            st, key = None, ()
        if key == self._key:
            return None
        self._key = key
        return st or os.stat_result((0,) * 10)


class Tokens(_Watched):
    """``[receive] tokens``: ``host token`` lines, ``* token`` for a token any allowed host may use.

    Re-read when the file changes; a file that cannot be read keeps the last
    good set (with a warning).  Tokens are compared in constant time and never logged.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.entries: list[tuple[str, bytes]] = []  # (host name or "*", token)

    def load(self, *, first: bool = False) -> None:
        """Read the file if it changed; at start an unreadable file is a ConfigError."""
        with self._lock:
            st = self.changed()
            if st is None:
                return
            if st.st_mode == 0:  # missing
                if self.entries or first:
                    log.warning("%s: [receive] tokens: no such file: no bearer token is accepted",
                                self.path)
                self.entries = []
                return
            try:
                with open(self.path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                why = getattr(e, "strerror", None) or str(e)
                if first:
                    raise ConfigError(f"{self.path}: [receive] tokens: cannot read: {why}") from None
                log.warning("%s: [receive] tokens: cannot read (%s); keeping the %d token(s) read "
                            "before", self.path, why, len(self.entries))
                return
            self._check_mode(st)
            self.entries = self._parse(text)
            log.info("%s: %d token(s) (%d per host, %d shared)", self.path, len(self.entries),
                     sum(h != "*" for h, _ in self.entries), sum(h == "*" for h, _ in self.entries))

    def _check_mode(self, st: os.stat_result) -> None:
        try:
            group: int | None = grp.getgrnam("psprobe").gr_gid
        except KeyError:
            group = None
        mode = stat.S_IMODE(st.st_mode)
        others = mode & (stat.S_IROTH | stat.S_IWOTH)
        odd_group = mode & stat.S_IRGRP and st.st_gid not in (0, os.getgid(), group)
        if others or odd_group:
            log.warning("%s: [receive] tokens: readable by others than root and the psprobe "
                        "group (mode %04o, group %d); chown root:psprobe and chmod 0640 it",
                        self.path, mode, st.st_gid)

    def _parse(self, text: str) -> list[tuple[str, bytes]]:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) != 2:
                log.warning("%s:%d: not \"host token\"; line ignored", self.path, n)
                continue
            host, token = words
            if host != "*":
                try:
                    host = _name(hostnames.normalise(host))
                except hostnames.BadHost as e:
                    log.warning("%s:%d: not a valid host (%s); line ignored", self.path, n, e)
                    continue
            out.append((host, token.encode()))
        return out

    def match(self, token: str) -> str | None:
        """The host of the entry ``token`` is ("*" for a shared one), None when none.

        Every entry is compared, each in constant time, whichever matches.
        """
        given, found = token.encode(), None
        for host, tok in self.entries:
            if hmac.compare_digest(given, tok) and found is None:
                found = host
        return found


class Allowed(_Watched):
    """Hosts that may push: sync.json's ``hosts`` and ``pushing``, and ``[receive] hosts``.

    Also sync.json's ``pushing_since`` (when sync first listed each pushing
    host), which the metrics file of a pushing host carries.
    """

    def __init__(self, state_dir: str, extra: tuple[str, ...]) -> None:
        super().__init__(state.sync_file(state_dir))
        self.extra = set()
        for h in extra:
            try:
                self.extra.add(_name(hostnames.normalise(h)))
            except hostnames.BadHost as e:
                log.warning("[receive] hosts: %r is not a valid host (%s); ignored", h, e)
        self._names: frozenset[str] = frozenset(self.extra)
        self._since: dict[str, float] = {}

    def names(self) -> frozenset[str]:
        with self._lock:
            if self.changed() is not None:
                names, self._since = self._read()
                self._names = frozenset(self.extra | names)
            return self._names

    def since(self, host: str) -> float | None:
        """When sync first listed ``host`` as pushing; None when it does not list it."""
        self.names()
        return self._since.get(host)

    def _read(self) -> tuple[set[str], dict[str, float]]:
        try:
            rec = state.read_json(self.path, {})
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read the hosts sync keeps (%s); only [receive] hosts may "
                        "push", self.path, e)
            return set(), {}
        rec = rec if isinstance(rec, dict) else {}
        out = set()
        for key in ("hosts", "pushing"):
            items = rec.get(key)
            for h in items if isinstance(items, list) else ():
                with contextlib.suppress(hostnames.BadHost):
                    out.add(_name(hostnames.normalise(h)))
        since = rec.get("pushing_since") if isinstance(rec.get("pushing_since"), dict) else {}
        listed = {}
        for h, t in since.items():
            with contextlib.suppress(hostnames.BadHost, TypeError, AttributeError):
                if metrics.timestamp(t) is not None:
                    listed[_name(hostnames.normalise(h))] = float(t)
        return out, listed


# --- per-host tallies (hosts/<host>/received.json)


class Tallies:
    """What each pushing host sent (``hosts/<host>/received.json``), for status, the report
    and the metrics, which read it with :func:`psprobe.metrics.read_received`.

    Totals that only grow (Prometheus counters must not drop), the last run
    received (``"last"``: status' last-run columns), and counts per hour
    (``"hours"``, rows of :data:`psprobe.metrics.HOUR_FIELDS`) for KEEP, so
    that status' 24 h and the report's period count a pushing host as they
    count a pulled host's runs; at most KEEP/HOUR + 1 rows, whatever the rate.
    Kept in memory, written through state's atomic writer at most every
    FLUSH_EVERY seconds per host and at exit, each time with the host's
    metrics file (fresh between syncs); a restart carries on from the file.
    """

    def __init__(self, state_dir: str, textfile_dir: str = "",
                 listed: Callable[[str], float | None] | None = None) -> None:
        self.state_dir, self.textfile_dir = state_dir, textfile_dir
        self.listed = listed or (lambda host: None)  # sync.json's pushing_since of a host
        self._t: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()

    def _get(self, host: str) -> dict[str, Any]:
        t = self._t.get(host)
        if t is None:
            path = state.host_file(self.state_dir, host, state.RECEIVED)
            try:
                t = state.read_json(path, None, root=self.state_dir)
            except (OSError, ValueError) as e:
                log.warning("%s; counting afresh", e)
                t = None
            if not isinstance(t, dict):
                t = {}
            base = {"first_received": None, "last_received": None, "newest_ts": None, "runs": 0,
                    "points": 0, "messages": 0, "confirmed": 0, "failed_runs": 0,
                    "last_failure": None, "refused": None, "last": None, "hours": []}
            old = t
            t = {**base, **{k: v for k, v in old.items() if k in base}}
            t["hours"] = metrics.hours(old.get("hours")) or []  # none in a file of before
            t["last"] = metrics.last_run(old.get("last"))
            self._t[host] = t
        return t

    @staticmethod
    def _hour(t: dict[str, Any], now: float) -> list[int]:
        """The row of the hour of ``now`` (a clock gone back counts in the newest row)."""
        hours, start = t["hours"], int(now // HOUR * HOUR)
        if not hours or hours[-1][0] < start:
            hours.append([start] + [0] * (len(metrics.HOUR_FIELDS) - 1))
            keep = [h for h in hours if h[0] > start - KEEP]
            t["hours"] = hours = keep[-(KEEP // HOUR + 1):]
        return hours[-1]

    def received(self, host: str, msgs: list, failure: str | None, now: float) -> None:
        with self._lock:
            t = self._get(host)
            points = sum(m.points for m in msgs)
            t["first_received"] = t["first_received"] or now
            t["last_received"] = now
            t["runs"] += 1
            t["messages"] += len(msgs)
            t["points"] += points
            t["last"] = {"time": now, "points": points, "messages": len(msgs)}
            if msgs:
                newest = max(m.last_ts for m in msgs)
                t["newest_ts"] = max(newest, t["newest_ts"] or newest)
            row = self._hour(t, now)
            row[1] += 1
            row[2] += points
            row[3] += len(msgs)
            if failure is not None:
                t["failed_runs"] += 1
                t["last_failure"] = {"time": now, "error": failure}
                row[4] += 1
            self._dirty.add(host)

    def refused(self, host: str, reason: str, now: float) -> None:
        with self._lock:
            t = self._get(host)
            count = (t["refused"] or {}).get("count", 0)
            t["refused"] = {"count": count + 1, "last_time": now, "last_reason": reason}
            self._hour(t, now)[5] += 1
            self._dirty.add(host)

    def confirmed(self, counts: Counter) -> None:
        with self._lock:
            for host, n in counts.items():
                self._get(host)["confirmed"] += n
                self._dirty.add(host)

    def flush(self) -> None:
        """Write every host changed since the last flush, and its metrics file."""
        with self._lock:
            todo = [(h, {**self._t[h], "hours": [list(r) for r in self._t[h]["hours"]]})
                    for h in sorted(self._dirty)]
            self._dirty.clear()
        for host, t in todo:
            try:
                state.write_json_atomic(state.host_file(self.state_dir, host, state.RECEIVED), t,
                                        root=self.state_dir)
            except OSError as e:
                log.warning("%s: cannot write the tallies of %s: %s", e.filename or self.state_dir,
                            host, e.strerror or e)
                with self._lock:
                    self._dirty.add(host)
            metrics.write_received(self.textfile_dir, host, t, listed=self.listed(host))


# --- what a request means


@dataclass
class Stats:
    """Counts since the last summary line."""

    runs: int = 0
    messages: int = 0
    confirmed: int = 0
    hosts: set[str] = field(default_factory=set)
    refused: Counter = field(default_factory=Counter)


class Receiver:
    """What a request means (the :class:`psprobe.httpd.Handler` of :func:`serve`): who
    pushes, may they, the conversion, the spool, the tallies and the summary line."""

    def __init__(self, cfg: Config, spool, tokens: Tokens, allowed: Allowed, tallies: Tallies,
                 kick: threading.Event) -> None:
        from psprobe import convert  # the conversion, imported once the server is set up

        self.convert = convert
        self.cfg, self.r = cfg, cfg.receive
        self.spool, self.tokens, self.allowed, self.tallies = spool, tokens, allowed, tallies
        self.kick = kick  # something new in the spool, for the forwarder
        self.stats = Stats()
        self._stats_lock = threading.Lock()

    def handle(self, conn: Conn, req: Request) -> tuple[int, bytes, str]:
        """Auth, body, conversion, spool: (status, body, host) or Refused."""
        if req.method not in ("POST", "PUT"):
            raise Refused(405, f"method {req.method[:20]} not allowed: pScheduler's http archiver "
                               "POSTs or PUTs runs", headers={"Allow": "POST, PUT"})
        length = httpd.content_length(req, self.r.max_body)
        host = self._who(conn, req)
        if host is not None:
            self._check_allowed(host)
        conn.proceed(req)  # 100 Continue, if asked: auth and size passed, now the body
        body = conn.body(length, self.r.max_body, host)
        try:
            run = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(400, f"not JSON: {e}", host, read_all=True) from None
        try:
            # Only [collect] event_types, as the pull path publishes.
            msgs = self.convert.messages(run, self.cfg.broker.routing_key_prefix,
                                         self.cfg.collect.chunk_points,
                                         event_types=self.cfg.collect.event_types)
        except self.convert.RunError as e:
            raise Refused(400, f"not a run record psprobe can convert: {e}", host,
                          read_all=True) from None
        if host is None:  # a shared token, no certificate: the record says whose run it is
            host = self._agent(run)
            self._check_allowed(host, read_all=True)
        return self._spool(host, run, msgs)

    def _who(self, conn: Conn, req: Request) -> str | None:
        """The host the credentials name; None when the record must say (a shared token)."""
        auth = req.headers.first("Authorization")
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        self.tokens.load()
        if self.tokens.entries or not self.r.client_ca:
            # A token is required whenever tokens are configured, or no client CA vouches.
            challenge = 'Bearer realm="psprobe"'
            if scheme.lower() != "bearer" or not token:
                raise Refused(401, "no bearer token (pScheduler's http archive spec gives it in "
                                   "_headers: Authorization: Bearer TOKEN)",
                              headers={"WWW-Authenticate": challenge})
            found = self.tokens.match(token)
            if found is None:
                raise Refused(401, f"the bearer token matches none in {self.tokens.path}",
                              headers={"WWW-Authenticate": challenge + ', error="invalid_token"'})
            if found != "*":
                if conn.names and found not in conn.names:
                    raise Refused(403, f"the token is {found}'s but the client certificate names "
                                       f"{', '.join(conn.names[:3])}", found)
                return found
        if conn.names:  # verified against client_ca: the first name allowed to push
            allowed = self.allowed.names()
            return next((n for n in conn.names if n in allowed), conn.names[0])
        if self.r.client_ca:
            raise Refused(403, "the client certificate names no valid host")
        return None

    def _agent(self, run: Any) -> str:
        name = self.convert.agent(run)
        try:
            return _name(hostnames.normalise(name))
        except hostnames.BadHost as e:
            raise Refused(403, f"the record's measurement agent {str(name)[:80]!r} is not a valid "
                               f"host ({e})", read_all=True) from None

    def _check_allowed(self, host: str, read_all: bool = False) -> None:
        if host not in self.allowed.names():
            # No host set entry: never a state directory for a name anyone can send.
            raise Refused(403, f"unknown host {host}: not in the meshes' hosts (sync.json) nor "
                               "[receive] hosts", read_all=read_all)

    def _spool(self, host: str, run: Any, msgs: list) -> tuple[int, bytes, str]:
        from psprobe.spool import SpoolFull

        try:
            self.spool.append(host, msgs)
            self.kick.set()
        except SpoolFull as e:
            raise Refused(503, f"the spool is full ({e}); try again later", host,
                          headers={"Retry-After": str(RETRY_AFTER)}, read_all=True) from None
        except (OSError, state.StateError) as e:
            log.error("receive: cannot spool a run of %s: %s", host, e)
            raise Refused(503, "the spool cannot be written; try again later", None,
                          headers={"Retry-After": str(RETRY_AFTER)}, read_all=True) from None
        now = time.time()
        self.tallies.received(host, msgs, _failure(run), now)
        with self._stats_lock:
            self.stats.runs += 1
            self.stats.messages += len(msgs)
            self.stats.hosts.add(host)
        points = sum(m.points for m in msgs)
        log.debug("receive: %s: a run of %d point(s) in %d message(s) spooled", host, points,
                  len(msgs))
        body = json.dumps({"host": host, "messages": len(msgs), "points": points}).encode()
        return 200, body + b"\n", host

    def refused(self, peer: str, host: str | None, status: int, reason: str) -> None:
        """The one log line of a refused request (before the answer leaves: tests read it)."""
        who = f"{host} ({peer})" if host else peer
        log.warning("receive: refused %s from %s: %s", status or "connection", who, reason)
        with self._stats_lock:
            self.stats.refused[status] += 1
        if host is not None and host in self.allowed.names():
            self.tallies.refused(host, f"{status} {reason}" if status else reason, time.time())

    def summary(self, final: bool = False) -> None:
        """The periodic line: what came in, what the broker confirmed, what waits."""
        with self._stats_lock:
            s, self.stats = self.stats, Stats()
        oldest = self.spool.oldest()
        refused = ", ".join(f"{n} x {k or 'TLS'}" for k, n in sorted(s.refused.items())) or "none"
        log.info("receive%s: %d run(s) from %d host(s), %d message(s) spooled, %d confirmed by the "
                 "broker, refused: %s; spool: %d message(s) waiting%s",
                 " (at exit)" if final else "", s.runs, len(s.hosts), s.messages, s.confirmed,
                 refused, self.spool.pending(),
                 f", the oldest for {time.time() - oldest:.0f}s" if oldest else "")

    def confirmed(self, counts: Counter) -> None:
        """The forwarder's commit: messages per host the broker confirmed."""
        self.tallies.confirmed(counts)
        with self._stats_lock:
            self.stats.confirmed += sum(counts.values())


def _failure(run: Any) -> str | None:
    """The error of a run whose test failed (``result.succeeded`` false), else None."""
    result = run.get("result") if isinstance(run, dict) else None
    if isinstance(result, dict) and result.get("succeeded") is False:
        err = result.get("error")
        return (err if isinstance(err, str) and err else "the test failed")[:500]
    return None


# --- the whole


def serve(cfg: Config, *, sockets: list[socket.socket] | None = None,
          stop: threading.Event | None = None, ready: Callable[[int], None] | None = None) -> Exit:
    """Receive pushed runs until ``stop`` is set (SIGTERM/SIGINT in the CLI); then end cleanly.

    Sockets: ``sockets`` (a test's), else systemd's (socket activation), else
    bound from ``[receive] listen``.  At a stop: no new connection, idle ones
    closed, requests under way finish (each within request_timeout), the
    forwarder sends what is spooled (bounded by the broker's timeout), tallies
    are written.  78 for a configuration that cannot work, 74 for an unusable spool.
    """
    from psprobe import publish
    from psprobe.forward import Forwarder
    from psprobe.spool import Spool

    r, sd = cfg.receive, cfg.collect.state_dir
    stop = stop or threading.Event()
    try:
        ctx = httpd.tls_context(r)
        try:
            publish.connection_parameters(cfg.broker)  # a bad [broker] ca/cert/password file now
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"[broker] ca/cert/key: cannot load: "
                              f"{getattr(e, 'reason', None) or e.strerror or e}") from None
        tokens = Tokens(r.tokens)
        tokens.load(first=True)
        if not tokens.entries and not r.client_ca:
            log.warning("receive: no token in %s and no [receive] client_ca: every push will be "
                        "refused (401) until tokens are added", r.tokens)
        socks = sockets or httpd.systemd_sockets()
        if not socks:
            try:
                socks = [httpd.bind(r.listen)]
            except OSError as e:
                host, port = r.listen
                raise ConfigError(f"[receive] listen: cannot listen on {host or '*'}:{port}: "
                                  f"{e.strerror or e}") from None
    except ConfigError as e:
        log.error("%s", e)
        return Exit.CONFIG
    try:
        spool = Spool(state.spool_dir(sd), r.spool_max)
    except (OSError, state.StateError) as e:
        log.error("receive: the spool cannot be used: %s", e)
        for s in socks:
            s.close()
        return Exit.STATE
    allowed = Allowed(sd, r.hosts)
    tallies = Tallies(sd, cfg.metrics.textfile_dir, allowed.since)
    receiver = Receiver(cfg, spool, tokens, allowed, tallies, threading.Event())
    server = httpd.Server(receiver, ctx, r.request_timeout, stop)
    forwarder = Forwarder(cfg.broker, spool, receiver.kick, receiver.confirmed)
    forwarder.start()
    flusher = threading.Thread(target=_flush_loop, args=(receiver, tallies, stop),
                               name="receive-tallies", daemon=True)
    flusher.start()
    where = ", ".join(httpd.sockname(s) for s in socks)
    log.info("receive: listening on %s (%s); %d message(s) in the spool", where,
             "plain HTTP" if ctx is None else
             "TLS, client certificates required" if r.client_ca else "TLS", spool.pending())
    if ready is not None:
        ready(socks[0].getsockname()[1])
    try:
        server.accept_loop(socks)
    finally:
        stop.set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        server.close_idle()
        left = server.join(time.monotonic() + r.request_timeout + 1)
        if left:
            log.warning("receive: %d request(s) still under way at the stop deadline", left)
        forwarder.finish.set()
        forwarder.kick.set()
        forwarder.join(3 * cfg.broker.timeout + 1)  # connect, confirms, close: each bounded
        if forwarder.is_alive():
            log.warning("receive: the broker did not confirm within its timeout; %d message(s) "
                        "stay in the spool for the next start", spool.pending())
        flusher.join()
        tallies.flush()
        receiver.summary(final=True)
        if not forwarder.is_alive():
            spool.close()
    return Exit.OK


def _flush_loop(receiver: Receiver, tallies: Tallies, stop: threading.Event) -> None:
    last = time.monotonic()
    while not stop.wait(FLUSH_EVERY):
        tallies.flush()
        if time.monotonic() - last >= SUMMARY_EVERY:
            last = time.monotonic()
            receiver.summary()
