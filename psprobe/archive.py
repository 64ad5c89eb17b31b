"""Reading one esmond measurement archive (``/esmond/perfsonar/archive/``).

The archive is untrusted input.  Everything it says is checked before it is
used: a data URL must be a path below the archive's own read URL on the same
origin (no ``..``, no query, no other host), timestamps must be integers, and
an answer larger than ``[archive] max_answer_mb`` is abandoned.  So is a
request not done within four times ``timeout`` from the start of the connect to
the answer's last byte, however steadily the bytes trickle in (a socket timeout
alone restarts at every byte), and anything past :attr:`Archive.deadline`, the
run's own limit: no request, retry or pause between tries goes past it.  Every
failure is an :class:`ArchiveError` whose text is one line naming the URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter, lt
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit

from psprobe import config, fetch
from psprobe.hostnames import default_read_url

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("psprobe.archive")

METADATA_PAGE = 1000  # below both esmond's 1500 default and pS 5's cap of 10000
MAX_METADATA_PAGES = 500
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EVENT = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
RETRY_STATUS = (500, 502, 503, 504, 429)


class ArchiveError(Exception):
    """The archive could not be read; the message is one line naming the URL."""


@dataclass(frozen=True)
class Pair:
    """One (metadata record, event type) series to collect."""

    key: str  # metadata-key
    event_type: str
    url: str  # absolute base-data URL, checked to be on this archive
    record: dict  # the metadata record (for the message's meta)
    time_updated: int | None

    @property
    def name(self) -> str:
        return f"{self.key}/{self.event_type}"


class Archive:
    """One archive for one run: keep-alive connections (:mod:`psprobe.fetch` does the
    HTTP) sharing one TLS context."""

    def __init__(self, host: str, settings: config.Archive, read_url: str | None = None,
                 scheme_first: str | None = None) -> None:
        self.host = host
        self.settings = settings
        self.read_url = read_url
        schemes = list(settings.schemes)
        preferred = [s for s in (scheme_first, read_url and urlsplit(read_url).scheme) if s]
        for s in reversed(preferred):
            if s in schemes:
                schemes.remove(s)
            schemes.insert(0, s)
        self.schemes = schemes
        self.scheme: str | None = None  # set once an answer came back
        self.base = ""  # read URL in use
        self.requests = 0  # HTTP requests made: the summary line's requests=
        # A time.monotonic() value (the run's deadline, set by the caller) past which
        # no request runs and no retry waits; None: only each request's own limit.
        self.deadline: float | None = None
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[str, fetch.Pool] = {}  # by origin

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    def _url_for(self, scheme: str) -> str:
        if self.read_url:
            u = urlsplit(self.read_url)
            path = u.path if u.path.endswith("/") else u.path + "/"
            return f"{scheme}://{u.netloc}{path}"
        return default_read_url(self.host, scheme)

    # --- HTTP

    def _pool(self, origin: str) -> fetch.Pool:
        """The keep-alive connections to ``origin``: at most ``parallel``, one TLS context.

        Made at the first request (the metadata walk, before the fetch threads).
        """
        pool = self._pools.get(origin)
        if pool is None:
            ctx = self._context() if origin.startswith("https:") else None
            pool = fetch.Pool(origin, self.settings.parallel, self.settings.timeout, ctx,
                              fetch.proxy_for(origin + "/"))
            self._pools[origin] = pool
        return pool

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            s = self.settings
            try:
                self._ssl = fetch.tls_context(_verify(s.verify), s.cert, s.key)
            except OSError as e:  # ssl.SSLError too
                what = "cert/key" if s.cert else "verify"
                raise config.ConfigError(
                    f"{self.host}: [archive] {what}: cannot load: {_reason(e)}") from None
        return self._ssl

    def get_json(self, url: str, params: dict[str, Any]) -> Any:
        """GET and decode one answer, retrying what may pass (timeouts, 5xx)."""
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise ArchiveError(f"{url}: run deadline reached")
            try:
                return self._get_once(url, params)
            except (_Transient, _Connect) as e:
                # Before an answer came back, a connect failure means "try the next
                # scheme" at once; afterwards (a keep-alive reset, the server
                # restarting) it passes like a timeout and is worth another try.
                first_contact = isinstance(e, _Connect) and self.scheme is None
                if isinstance(e, _TLS) or first_contact or attempt + 1 >= attempts:
                    raise  # its class says what failed (unreachable() reads it)
                pause = min(0.5 * 2**attempt, 5.0)
                if self.deadline is not None and time.monotonic() + pause >= self.deadline:
                    raise ArchiveError(f"{e} (run deadline reached: not retried)") from None
                log.debug("retrying %s: %s", url, e)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _get_once(self, url: str, params: dict[str, Any]) -> Any:
        s = self.settings
        u = urlsplit(url)
        target = f"{u.path}?{urlencode(params)}" if params else u.path
        where = f"{u.scheme}://{u.netloc}{target}"
        pool = self._pool(f"{u.scheme}://{u.netloc}")
        self.requests += 1
        # The whole request (connect, TLS, proxy tunnel, status, headers, body) ends by
        # then, however slowly its bytes come: 4 x timeout, or the run's deadline if sooner.
        deadline = own = time.monotonic() + 4 * s.timeout
        if self.deadline is not None:
            deadline = min(own, self.deadline)
        capped = deadline < own
        try:
            ans = pool.get(target, int(s.max_answer_mb * 1024 * 1024), deadline)
        except fetch.TLSFailed as e:
            raise _TLS(f"{url}: TLS failed: {_reason(e)}") from None
        except fetch.ConnectFailed as e:
            via = f" through proxy {fetch.no_userinfo(pool.proxy)}" if pool.proxy else ""
            raise _Connect(f"{url}: cannot connect{via}: {_reason(e)}") from None
        except fetch.TimedOut:
            raise _TimedOut(f"{url}: no answer within {s.timeout:g}s") from None
        except fetch.TooLarge:
            raise ArchiveError(f"{where}: answer larger than {s.max_answer_mb:g} MB") from None
        except fetch.TooSlow:
            if capped:
                raise ArchiveError(f"{where}: run deadline reached before the answer") from None
            raise _TimedOut(f"{where}: answer took longer than {4 * s.timeout:g}s") from None
        except fetch.Broken as e:
            raise _Transient(f"{url}: {_reason(e)}") from None
        if ans.status != 200:
            detail = _detail(ans.body)
            msg = f"{where}: HTTP {ans.status}{': ' + detail if detail else ''}"
            if ans.status in RETRY_STATUS:
                raise _Transient(msg)
            raise ArchiveError(msg)
        try:
            return json.loads(ans.body)
        except ValueError as e:
            kind = "truncated JSON" if ans.body[:1] in (b"[", b"{") else "not JSON"
            raise ArchiveError(f"{where}: answer is {kind} ({e})") from None

    # --- metadata

    def metadata(self, time_start: int | None = None) -> Iterator[dict]:
        """Every metadata record, paging by ``limit``/``offset`` until a short page.

        The first page also picks the scheme.  Paging is ours (offsets), not the
        server's ``metadata-next-page`` links, so a link pointing back cannot
        loop; a page of nothing but records already seen is an error.
        """
        params: dict[str, Any] = {"format": "json", "limit": METADATA_PAGE}
        if time_start is not None:
            params["time-start"] = int(time_start)
        first = self._first_page(params)
        seen: set[str] = set()
        page, offset, total = first, 0, None
        for _ in range(MAX_METADATA_PAGES):
            if not isinstance(page, list):
                raise ArchiveError(f"{self.base}: metadata answer is {_kind(page)}, not a list")
            if page and isinstance(page[0], dict) and total is None:
                t = page[0].get("metadata-count-total")
                total = t if isinstance(t, int) and not isinstance(t, bool) else None
            new = 0
            for rec in page:
                if not isinstance(rec, dict) or not isinstance(rec.get("metadata-key"), str):
                    raise ArchiveError(f"{self.base}: metadata record without metadata-key")
                if rec["metadata-key"] in seen:
                    continue
                seen.add(rec["metadata-key"])
                new += 1
                yield rec
            if len(page) < METADATA_PAGE or (total is not None and len(seen) >= total):
                return
            if new == 0:
                raise ArchiveError(f"{self.base}: metadata paging loops (offset {offset})")
            offset += METADATA_PAGE
            page = self.get_json(self.base, {**params, "offset": offset})
        raise ArchiveError(f"{self.base}: more than {MAX_METADATA_PAGES} metadata pages")

    def _first_page(self, params: dict[str, Any]) -> Any:
        errors = []
        for i, scheme in enumerate(self.schemes):
            url = self._url_for(scheme)
            try:
                page = self.get_json(url, params)
            except (_Connect, _TLS) as e:
                errors.append(str(e))
                nxt = self.schemes[i + 1] if i + 1 < len(self.schemes) else None
                if nxt:
                    level = logging.WARNING if isinstance(e, _TLS) else logging.INFO
                    log.log(level, "%s; trying %s as [archive] schemes allows", e, nxt)
                continue
            self.scheme, self.base = scheme, url
            return page
        raise ArchiveError("; ".join(errors) or f"{self.host}: no scheme to try")

    def pairs(self, records: Iterator[dict], event_types: tuple[str, ...]) -> Iterator[Pair]:
        """The wanted (record, event type) series, each checked to point into this archive."""
        wanted = set(event_types)
        for rec in records:
            key = rec["metadata-key"]
            if not _KEY.fullmatch(key):
                log.warning("%s: skipping metadata with a bad metadata-key %r", self.base, key[:80])
                continue
            ets = rec.get("event-types")
            if not isinstance(ets, list):
                log.warning("%s: metadata %s has no event-types list", self.base, key)
                continue
            for et in ets:
                if not isinstance(et, dict):
                    continue
                name = et.get("event-type")
                if not isinstance(name, str) or name not in wanted or not _EVENT.fullmatch(name):
                    continue
                url = self.data_url(et.get("base-uri"), key, name)
                if url is None:
                    continue
                tu = et.get("time-updated")
                # pS 5 (elmond, 64-hex keys) reports the task's creation time there, which
                # never moves as data arrives: only esmond's time-updated can skip a series.
                trusted = isinstance(tu, int) and not isinstance(tu, bool) and len(key) != 64
                tu = tu if trusted else None
                yield Pair(key, name, url, rec, tu)

    def data_url(self, uri: Any, key: str, event_type: str) -> str | None:
        """Absolute URL of a series' base data, or None (and a warning) if it leaves the archive."""
        base = urlsplit(self.base)
        usual = f"{base.path}{key}/{event_type}/base"
        if not isinstance(uri, str) or not uri:
            uri = usual
        if uri == usual:  # esmond's own form; key and event type are checked already
            return f"{base.scheme}://{base.netloc}{uri}"
        u = urlsplit(urljoin(self.base, uri))
        segments = u.path[len(base.path):].split("/") if u.path.startswith(base.path) else []
        ok = (
            u.scheme in ("http", "https")
            and u.netloc.lower() == base.netloc.lower()
            and not u.query and not u.fragment
            and "%" not in uri
            and len(segments) >= 2
            and all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments if s)
            and segments[0] == key
            and segments[1] == event_type
        )
        if not ok:
            log.warning("%s: skipping %s/%s: base-uri %r is not a series of this archive",
                        self.base, key, event_type, uri[:120])
            return None
        return f"{base.scheme}://{base.netloc}{u.path}"

    # --- data

    def points(self, pair: Pair, start: int, end: int) -> Iterator[list[tuple[int, Any]]]:
        """Pages of ``(ts, val)`` in ascending order with start <= ts <= end.

        Pages by ``time-start = last ts + 1`` until a page comes back shorter than
        ``limit``.  Points outside the window are dropped (the next run asks
        again), duplicates dropped, disorder sorted; a point without an integer
        ``ts`` makes the page an error, because skipping it could lose data.

        A full page is trusted to hold the window's earliest points only when it
        came in time order (esmond sorts, then limits).  A full page out of order
        comes from an archive that limits first: its points may be any of the
        window's, so going on past its newest would skip the others.  Then the
        window is halved (``time-end``) until an answer is not full -- such an
        answer holds every point of its window, whatever their order -- and the
        series goes on window by window, each sized from the last one's count,
        never past a point not seen; no full page of it is trusted any more.  A
        one-second window still full is an error (more than ``limit`` points at
        one timestamp).
        """
        limit = self.settings.page_points
        width = 0  # > 0: windows of this many seconds (the archive limits before sorting)
        while start <= end:
            stop = min(end, start + width - 1) if width else end
            params = {"time-start": start, "time-end": stop, "limit": limit}
            page = self.get_json(pair.url, params)
            if not isinstance(page, list):
                raise ArchiveError(f"{pair.url}: data answer is {_kind(page)}, not a list")
            pts, ordered = _checked(page, pair.url, start, stop)
            full = len(page) >= limit
            # Nothing of the page stays alive here while the caller waits for the
            # broker: it may clear() what it got (collect does) to free the values.
            del page
            if full and (width or not ordered):
                del pts  # any points of [start, stop]: not "the earliest", not to be trusted
                if stop <= start:
                    raise ArchiveError(
                        f"{pair.url}: the one-second window at ts {start} still came back "
                        f"full (limit {limit}) from an archive that limits before sorting: "
                        f"cannot page past it")
                if not width:
                    log.warning("%s: a full page came back out of time order (the archive "
                                "limits before sorting?): reading windows narrow enough to "
                                "come back whole", pair.url)
                width = (stop - start + 1) // 2
                continue
            last = pts[-1][0] if pts else None
            n = len(pts)
            if pts:
                yield pts
                del pts
            if not full:
                if stop >= end:
                    return
                # Every point of [start, stop] seen: on to the next window, sized for
                # about 3/4 of a page at the density just seen (at most 4 times wider).
                start = stop + 1
                width = max(1, min(4 * width, width * 3 * limit // (4 * max(n, 1))))
                continue
            if last is None:
                raise ArchiveError(f"{pair.url}: full page with no point in the window")
            start = last + 1


def _fast(page: list, start: int, end: int) -> list[tuple[int, Any]] | None:
    """The usual page (integer ts, strictly ascending, inside the window) checked at C speed.

    None for anything else: :func:`_checked` then walks it point by point.
    """
    try:
        out = [(p["ts"], p["val"]) for p in page]
    except (TypeError, KeyError, IndexError):
        return None
    if not out:
        return out
    ts = list(map(itemgetter(0), out))
    if set(map(type, ts)) != {int} or ts[0] < start or ts[-1] > end \
            or not all(map(lt, ts, islice(ts, 1, None))):
        return None
    return out


def _checked(page: list, url: str, start: int, end: int) -> tuple[list[tuple[int, Any]], bool]:
    """The page's points in the window, ascending, one per ts; and whether they came
    in time order (repeated timestamps allowed)."""
    fast = _fast(page, start, end)
    if fast is not None:
        return fast, True
    out = []
    last = None
    ordered = True  # strictly ascending: nothing to sort or drop
    ascending = True  # in time order, maybe with repeats
    for p in page:
        try:
            ts, val = p["ts"], p["val"]
        except (TypeError, KeyError):
            raise ArchiveError(f"{url}: data point without ts/val: {str(p)[:80]}") from None
        if type(ts) is not int:
            raise ArchiveError(f"{url}: data point with a non-integer ts {ts!r}")
        if start <= ts <= end:
            if last is not None and ts <= last:
                ordered = False
                ascending = ascending and ts == last
            last = ts
            out.append((ts, val))
    if len(out) < len(page):
        log.warning("%s: dropped %d point(s) outside the asked window", url, len(page) - len(out))
    if not ordered:
        n = len(out)
        out = sorted(dict(out[::-1]).items())  # first value of each ts wins
        if len(out) < n:
            log.warning("%s: dropped %d duplicate timestamp(s)", url, n - len(out))
    return out, ascending


class _Transient(ArchiveError):
    """Worth another try: timeout, 5xx."""


class _TimedOut(_Transient):
    """No answer, or no whole answer, in time."""


class _Connect(ArchiveError):
    """Could not connect at all: the next scheme may work."""


class _TLS(_Connect):
    """TLS handshake or verification failed."""


def _verify(verify: bool | str) -> bool | str:
    """``[archive] verify`` for :func:`psprobe.fetch.tls_context`; ``yes`` honours the CA bundle
    variables operators already set for curl and Python tools ($REQUESTS_CA_BUNDLE,
    $CURL_CA_BUNDLE), as psprobe did when it read archives with requests."""
    if verify is True:
        return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return verify


def _kind(obj: Any) -> str:
    return {dict: "an object", str: "a string", type(None): "null"}.get(type(obj), type(obj).__name__)


def _detail(body: bytes) -> str:
    try:
        d = json.loads(body)
        if isinstance(d, dict) and isinstance(d.get("detail"), str):
            return d["detail"][:200]
    except ValueError:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", text)).strip()[:120]


def _reason(e: Exception) -> str:
    """The innermost useful words of an HTTP, socket or TLS failure."""
    text = str(e)
    if "EOF occurred in violation of protocol" in text or "UNEXPECTED_EOF" in text:
        # TLS 1.3 sends the "certificate required" alert after the handshake: the
        # client may only see the server hang up.
        return "server closed the TLS connection (EOF): client certificate required or refused?"
    for pat in (r"\[SSL: [A-Z0-9_]+\] ([^(]+?)(?: \(|'|\"|$)", r"\[Errno -?\d+\] ([^'\")]+)",
                r"(Name or service not known|Connection refused|certificate verify failed[^'\")]*"
                r"|Remote end closed connection without response|Connection reset by peer)",
                r"(IncompleteRead\(\d+ bytes read, \d+ more expected\))"):
        m = re.search(pat, text)
        if m:
            return m.group(1).strip()
    return text.split(":")[-1].strip()[:160] or type(e).__name__


def unreachable(e: ArchiveError) -> bool:
    """No connection, or no answer in time: what an archive that is gone gives."""
    return isinstance(e, (_Connect, _TimedOut))
