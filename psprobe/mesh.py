"""Mesh discovery: published mesh documents -> {host: read URL} of the archives to collect,
and the hosts that push their runs to this receiver instead.

Three shapes are read (real examples in ``shared/formats/``): a top-level list
of ``{"include": [url, ...]}`` objects, legacy MeshConfig, and pSConfig.  What
a mesh yields is the set of archives that can be read back, each named by the
``host[:port]`` of its read URL (see :func:`parse_document` for the rules).
Given the URL of this machine's ``psprobe receive`` (``[receive] url``), a
pSConfig mesh also yields the *pushing* hosts: those that run a task whose
``http`` archive posts to that URL (a perfSONAR 5 testpoint keeps no archive
to read; see :func:`receiver_key`).

Meshes are untrusted input.  One bad entry (a hostile name, a wrong type, an
unknown reference) costs that entry and one warning naming the document and
the value, escaped so it cannot forge a log line; it never costs the mesh.
Only a document that is not JSON of a known shape is an error
(:class:`MeshError`).  Fetching is injected, so this module does no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from psprobe import hostnames

MAX_WARNINGS = 1000  # per discover(): a mesh of 100 000 bad names must not flood the journal
_DEFAULT_PORT = {"http": 80, "https": 443}
_URL_CHARS = re.compile(r"[\x21-\x7e]{1,2048}")  # printable ASCII, no space: nothing to strip or forge
_PATH = re.compile(r"(?:/[A-Za-z0-9._~+=,-]*)*")
_SCHEDULED_BY = re.compile(r"\{%\s*scheduled_by_address\s*%\}")
_PLAIN = re.compile(r"[\x21-\x7e]{1,300}")
_PSCONFIG_KEYS = ("addresses", "groups", "tasks", "archives", "hosts", "includes")


class MeshError(Exception):
    """A whole document is unusable: not fetched, too large, not JSON, or of no known shape.

    ``str()`` is the reason alone; ``source`` names the document.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(reason)
        self.source = source
        self.reason = reason


@dataclass
class MeshResult:
    """One top-level mesh URL after following its includes."""

    targets: dict[str, str]  # canonical host[:port] -> read URL
    warnings: list[str] = field(default_factory=list)
    # False when an included document could not be fetched or parsed: the caller
    # should then keep this mesh's last good list rather than lose its hosts.
    complete: bool = True
    # Hosts whose runs an http archive pushes to the receiver (sorted); empty
    # unless discover() was given the receiver's URL.
    pushing: list[str] = field(default_factory=list)


class _Bad(ValueError):
    """One entry refused; the message is the reason."""


def _show(v: Any) -> str:
    """A value for a log line: escaped (no newline can survive), bounded."""
    if isinstance(v, str):
        text = ascii(v[:200])
        return text + f"...({len(v)} characters)" if len(v) > 200 else text
    if v is None or isinstance(v, (bool, int, float)):
        return repr(v)[:50]
    return f"<{type(v).__name__}>"


def _src(source: str) -> str:
    return source if _PLAIN.fullmatch(source) else _show(source)


class _Log:
    """Warnings in order, each once, at most MAX_WARNINGS."""

    def __init__(self) -> None:
        self.lines: dict[str, None] = {}
        self.dropped = 0

    def warn(self, source: str, text: str) -> None:
        line = f"mesh {_src(source)}: {text}"
        if line in self.lines:
            return
        if len(self.lines) < MAX_WARNINGS:
            self.lines[line] = None
        else:
            self.dropped += 1

    def out(self) -> list[str]:
        lines = list(self.lines)
        if self.dropped:
            lines.append(f"... and {self.dropped} more mesh warnings not shown")
        return lines


class _Targets:
    """host -> read URL, one per host, chosen the same way whatever the order.

    An archive the mesh names beats the toolkit default, https beats http, and
    then the smaller URL wins; two different named archives for one host warn.
    """

    def __init__(self) -> None:
        self.best: dict[str, tuple[int, int, str]] = {}

    def add(self, host: str, url: str, named: bool, log: _Log, source: str) -> None:
        rank = (0 if named else 1, 0 if url.startswith("https:") else 1, url)
        old = self.best.get(host)
        if old is None:
            self.best[host] = rank
        elif old != rank:
            new = min(old, rank)
            if old[0] == 0 and named:
                log.warn(source, f"host {host} has two read URLs, {_show(old[2])} and {_show(url)}: "
                                 f"using {_show(new[2])}")
            self.best[host] = new

    def merge(self, other: _Targets, log: _Log, source: str) -> None:
        for host, (named, _, url) in other.best.items():
            self.add(host, url, named == 0, log, source)

    def result(self) -> dict[str, str]:
        return {h: self.best[h][2] for h in sorted(self.best)}


def read_url(raw: Any) -> tuple[str, str]:
    """(canonical host, read URL) of an archive URL from a mesh; :class:`ValueError` if unusable.

    Only http(s), no user info, query or fragment, a plain path (no ``..``);
    the default port is dropped and the path ends in ``/``.
    """
    if not isinstance(raw, str):
        raise _Bad(f"read URL is {_show(raw)}, not a string")
    if not _URL_CHARS.fullmatch(raw):
        raise _Bad("URL has spaces, control or non-ASCII characters, or is over 2048 characters")
    try:
        u = urlsplit(raw)
        port = u.port  # checks the port is numeric and in range
    except ValueError as e:
        raise _Bad(f"not a URL ({e})") from None
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORT:
        raise _Bad("not an http or https URL")
    if "@" in u.netloc:
        raise _Bad("user information in the URL")
    if u.query or u.fragment:
        raise _Bad("query or fragment in a read URL")
    try:
        host = hostnames.normalise(u.netloc)
    except hostnames.BadHost as e:
        raise _Bad(f"bad host in URL: {e}") from None
    if port == _DEFAULT_PORT[scheme]:
        host = hostnames.split(host)[0]
    path = u.path or "/"
    if not _PATH.fullmatch(path) or any(seg in (".", "..") for seg in path.split("/")):
        raise _Bad("URL path has characters other than letters, digits and ._~+=,- or a . or .. segment")
    if not path.endswith("/"):
        path += "/"
    return host, f"{scheme}://{host}{path}"


def receiver_key(raw: Any) -> str | None:
    """The form in which two URLs of a receiver compare equal, or None when ``raw`` is no
    http(s) URL: scheme and host in lower case, the default port dropped, no trailing
    slash.  pScheduler posts to the ``_url`` as written, so nothing else is folded
    (a path differing in case is another URL)."""
    if not isinstance(raw, str) or not _URL_CHARS.fullmatch(raw):
        return None
    try:
        u = urlsplit(raw)
        port = u.port
        scheme = u.scheme.lower()
        if scheme not in _DEFAULT_PORT or "@" in u.netloc:
            return None
        host = hostnames.normalise(u.netloc)
    except (ValueError, hostnames.BadHost):
        return None
    if port == _DEFAULT_PORT[scheme]:
        host = hostnames.split(host)[0]
    key = f"{scheme}://{host}{u.path.rstrip('/')}"
    return key + (f"?{u.query}" if u.query else "")


def _include_url(raw: Any, parent: str) -> str:
    """An include to follow.  A document from the network may only include http(s) URLs:
    a remote mesh must not make sync read local files (``/dev/zero``, ``/etc/...``)."""
    if not isinstance(raw, str):
        raise _Bad(f"include is {_show(raw)}, not a string")
    if not _URL_CHARS.fullmatch(raw):
        raise _Bad("URL has spaces, control or non-ASCII characters, or is over 2048 characters")
    local = parent.startswith(("/", "file:"))
    url = urljoin(parent, raw) if not local or "://" not in raw else raw
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise _Bad(f"not a URL ({e})") from None
    if u.scheme in ("http", "https"):
        if "@" in u.netloc:
            raise _Bad("user information in the URL")
        try:
            hostnames.normalise(u.netloc)
        except hostnames.BadHost as e:
            raise _Bad(f"bad host in URL: {e}") from None
        return url
    if local and (u.scheme == "file" or url.startswith("/")):
        return url
    why = "" if local else " (a mesh from the network cannot include files)"
    raise _Bad("not an http or https URL" + why)


def _truthy(v: Any) -> bool:
    """MeshConfig booleans are true/false, 1/0 or "1"/"0"."""
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return v is True or (isinstance(v, int) and v == 1)


class _Doc:
    """Parsing context of one document: its name, the log, the targets found, a name cache."""

    def __init__(self, source: str, log: _Log, receiver: str | None = None) -> None:
        self.source = source
        self.log = log
        self.targets = _Targets()
        self.includes: list[str] = []
        self.receiver = receiver  # receiver_key() of [receive] url, or None
        self.pushing: set[str] = set()
        self._keys: dict[str, str | None] = {}
        self._urls: dict[str, tuple[str, str] | None] = {}

    def warn(self, text: str) -> None:
        self.log.warn(self.source, text)

    def host(self, raw: Any, where: str) -> str | None:
        """Canonical key of a host name from the document, or None and a warning."""
        if isinstance(raw, str):
            if raw in self._keys:
                return self._keys[raw]
            try:
                key: str | None = hostnames.normalise(raw)
            except hostnames.BadHost as e:
                self.warn(f"{_src(where)}: host {_show(raw)} rejected: {e}")
                key = None
            self._keys[raw] = key
            return key
        self.warn(f"{_src(where)}: host {_show(raw)} rejected: not a string")
        return None

    def url(self, raw: Any, where: str) -> tuple[str, str] | None:
        """(host, read URL) of an archive URL, or None and a warning."""
        hashable = raw if isinstance(raw, str) else None
        if hashable is not None and hashable in self._urls:
            return self._urls[hashable]
        try:
            got: tuple[str, str] | None = read_url(raw)
        except _Bad as e:
            self.warn(f"{_src(where)}: read URL {_show(raw)} rejected: {e}")
            got = None
        if hashable is not None:
            self._urls[hashable] = got
        return got

    def named(self, raw: Any, where: str) -> None:
        got = self.url(raw, where)
        if got:
            self.targets.add(got[0], got[1], True, self.log, self.source)

    def default(self, host: str) -> None:
        self.targets.add(host, hostnames.default_read_url(host), False, self.log, self.source)

    def items(self, parent: Any, key: str, where: str) -> list[Any]:
        """``parent[key]`` as a list; absent is empty, anything else a warning."""
        v = parent.get(key) if isinstance(parent, dict) else None
        if v is None:
            return []
        if isinstance(v, list):
            return v
        self.warn(f"{_src(f'{where}.{key}')} is {_show(v)}, not a list: ignored")
        return []

    def mapping(self, parent: dict, key: str) -> dict:
        v = parent.get(key)
        if v is None:
            return {}
        if isinstance(v, dict):
            return v
        self.warn(f"{key} is {_show(v)}, not an object: ignored")
        return {}


def parse_document(doc: object, source: str, receiver: str | None = None
                   ) -> tuple[dict[str, str], list[str], list[str]]:
    """(targets, includes, warnings) of one decoded document.

    MeshConfig: every ``measurement_archives[].read_url`` (mesh, organization,
    site, host or test level) is collected; a test member that runs an agent
    and finds no archive for the test's type on its host, site, organization,
    the mesh or the test is read at its toolkit
    (``https://<member>/esmond/perfsonar/archive/``).

    pSConfig: for each task not ``disabled``, the archives of the task and of
    the hosts running it; an archive's read URL is ``data._meta.esmond_url``,
    else ``data.url`` / ``data._url`` of an ``esmond`` archiver, with
    ``{% scheduled_by_address %}`` expanded to each address that runs the
    task.  Other archivers give no host (a warning says so).  An address that
    runs a task and gets no archive from task or host is read at its toolkit.
    Addresses that are disabled or no-agent (or whose host is) run nothing.

    ``receiver`` (``[receive] url``): an ``http`` archive whose ``data._url``
    is that URL (:func:`receiver_key`) pushes here.  It gives no read URL (its
    ``_meta.esmond_url`` is ignored: reading the runs back would publish them
    twice) and no warning, and every address that runs a task with it, as a
    task or a host archive, is a pushing host (:func:`pushing`).  MeshConfig
    has no http archivers: it names no pushing host.

    Raises :class:`MeshError` when ``doc`` is of no known shape.
    """
    log = _Log()
    d = _parse(doc, source, log, receiver_key(receiver))
    return d.targets.result(), d.includes, log.out()


def pushing(doc: object, source: str, receiver: str) -> list[str]:
    """The hosts of one decoded document that push to ``receiver`` (see :func:`parse_document`)."""
    return sorted(_parse(doc, source, _Log(), receiver_key(receiver)).pushing)


def _parse(doc: object, source: str, log: _Log, receiver: str | None = None) -> _Doc:
    d = _Doc(source, log, receiver)
    if isinstance(doc, list):
        _include_list(doc, d)
    elif isinstance(doc, dict):
        if "organizations" in doc or isinstance(doc.get("tests"), list):
            _meshconfig(doc, d)
        elif any(k in doc for k in _PSCONFIG_KEYS):
            _psconfig(doc, d)
        elif "include" in doc:
            _include_list([doc], d)
        else:
            keys = ", ".join(_show(k) for k in list(doc)[:10])
            raise MeshError(source, "not a MeshConfig, pSConfig or include document "
                                    f"(keys: {keys or 'none'})")
    else:
        raise MeshError(source, f"not a mesh document: JSON {type(doc).__name__} at top level")
    return d


def _include_list(doc: list, d: _Doc) -> None:
    for i, item in enumerate(doc):
        if not isinstance(item, dict) or "include" not in item:
            d.warn(f"[{i}] is {_show(item)}, not an {{\"include\": [...]}} object: ignored")
            continue
        d.includes.extend(d.items(item, "include", f"[{i}]"))


# --- MeshConfig


@dataclass(frozen=True)
class _MA:
    type: str | None  # None: serves every test type


def _mas(d: _Doc, parent: Any, where: str) -> list[_MA]:
    """The measurement archives at one level; each readable one is a target."""
    out = []
    for i, ma in enumerate(d.items(parent, "measurement_archives", where)):
        w = f"{where}.measurement_archives[{i}]"
        if not isinstance(ma, dict):
            d.warn(f"{w} is {_show(ma)}, not an object: ignored")
            continue
        if "read_url" in ma:
            d.named(ma["read_url"], w)
        else:
            d.warn(f"{w} has no read_url: nothing to collect from it")
        # Named even when unreadable: its members archive there, not on their toolkit.
        t = ma.get("type")
        out.append(_MA(t if isinstance(t, str) else None))
    return out


def _meshconfig(doc: dict, d: _Doc) -> None:
    mesh_mas = _mas(d, doc, "mesh")
    # address -> (archive levels from the host up, no_agent)
    index: dict[str, tuple[list[list[_MA]], bool]] = {}

    def hosts(parent: Any, where: str, above: list[list[_MA]]) -> None:
        for i, h in enumerate(d.items(parent, "hosts", where)):
            w = f"{where}.hosts[{i}]"
            if not isinstance(h, dict):
                d.warn(f"{w} is {_show(h)}, not an object: ignored")
                continue
            levels = [_mas(d, h, w), *above]
            no_agent = _truthy(h.get("no_agent"))
            for j, a in enumerate(d.items(h, "addresses", w)):
                key = d.host(a.get("address") if isinstance(a, dict) else a, f"{w}.addresses[{j}]")
                if key:
                    index.setdefault(key, (levels, no_agent))

    for i, org in enumerate(d.items(doc, "organizations", "mesh")):
        w = f"organizations[{i}]"
        if not isinstance(org, dict):
            d.warn(f"{w} is {_show(org)}, not an object: ignored")
            continue
        org_mas = _mas(d, org, w)
        hosts(org, w, [org_mas, mesh_mas])
        for j, site in enumerate(d.items(org, "sites", w)):
            ws = f"{w}.sites[{j}]"
            if not isinstance(site, dict):
                d.warn(f"{ws} is {_show(site)}, not an object: ignored")
                continue
            hosts(site, ws, [_mas(d, site, ws), org_mas, mesh_mas])
    hosts(doc, "mesh", [mesh_mas])

    for i, test in enumerate(d.items(doc, "tests", "mesh")):
        w = f"tests[{i}]"
        if not isinstance(test, dict):
            d.warn(f"{w} is {_show(test)}, not an object: ignored")
            continue
        if _truthy(test.get("disabled")):
            continue
        params = test.get("parameters")
        ttype = params.get("type") if isinstance(params, dict) else None
        ttype = ttype if isinstance(ttype, str) else None
        test_mas = _mas(d, test, w)
        group = test.get("members")
        if not isinstance(group, dict):
            d.warn(f"{w}.members is {_show(group)}, not an object: ignored")
            continue
        wm = f"{w}.members"
        members = [m for k in ("members", "a_members", "b_members") for m in d.items(group, k, wm)]
        if "center_address" in group:
            members.append(group["center_address"])
        no_agents = {d.host(_address(a), f"{wm}.no_agents") for a in d.items(group, "no_agents", wm)}
        for m in members:
            key = d.host(_address(m), wm)
            if key is None or key in no_agents:
                continue
            levels, no_agent = index.get(key, ([mesh_mas], False))
            if no_agent:
                continue
            if not any(ma.type in (None, ttype) or ttype is None for lv in (test_mas, *levels) for ma in lv):
                d.default(key)


def _address(a: Any) -> Any:
    return a.get("address") if isinstance(a, dict) else a


# --- pSConfig


class _Unsupported(Exception):
    pass


def _psconfig(doc: dict, d: _Doc) -> None:
    addresses = d.mapping(doc, "addresses")
    hosts = d.mapping(doc, "hosts")
    archives = d.mapping(doc, "archives")
    groups = d.mapping(doc, "groups")
    tasks = d.mapping(doc, "tasks")
    classes = d.mapping(doc, "address-classes")
    d.includes.extend(d.items(doc, "includes", "pSConfig"))
    ps = _PS(d, addresses, hosts, archives, classes)

    for tname, task in tasks.items():
        w = f"tasks.{tname}"
        if not isinstance(task, dict):
            d.warn(f"{_src(w)} is {_show(task)}, not an object: ignored")
            continue
        if _truthy(task.get("disabled")):
            continue
        # Defined archives, readable or not: an address with any of them does not archive locally.
        t_arch = [a for a in (ps.archive(n, w) for n in d.items(task, "archives", w)) if a]
        t_push = any(a[2] for a in t_arch)
        gname = task.get("group")
        group = groups.get(gname) if isinstance(gname, str) else None
        if not isinstance(group, dict):
            d.warn(f"{_src(w)}: group {_show(gname)} is not defined: task ignored")
            runners: list[tuple[str, str | None]] = []
        else:
            runners = ps.runners(group, task, f"groups.{gname}")
        for url, templated, _ in t_arch:
            if url and not templated:
                d.named(url, f"{w}.archives")
        for key, hname in runners:
            h_arch = ps.host_archives(hname)
            if not t_arch and not h_arch:
                d.default(key)
                continue
            if t_push or ps.host_pushes(hname):
                d.pushing.add(key)
            for url, templated, _ in t_arch:
                if url and templated:
                    d.named(_SCHEDULED_BY.sub(key, url), f"{w}.archives")
            for url, templated, _ in h_arch:
                if url:
                    d.named(_SCHEDULED_BY.sub(key, url) if templated else url, f"hosts.{hname}.archives")


class _PS:
    """Lookups in one pSConfig document, each warning at most once."""

    def __init__(self, d: _Doc, addresses: dict, hosts: dict, archives: dict, classes: dict) -> None:
        self.d, self.addresses, self.hosts = d, addresses, hosts
        self.archives, self.classes = archives, classes
        self._archive: dict[str, tuple[str | None, bool, bool] | None] = {}
        self._host_archives: dict[str | None, list[tuple[str | None, bool, bool]]] = {}
        self._host_pushes: dict[str | None, bool] = {}
        self._class: dict[str, list[str]] = {}

    def archive(self, name: Any, where: str) -> tuple[str | None, bool, bool] | None:
        """(read URL or URL template, templated, pushes here) of a named archive; the URL
        is None when the archive cannot be read back, and the whole is None when it is not
        defined."""
        if not isinstance(name, str):
            self.d.warn(f"{_src(where)}: archive name {_show(name)} is not a string")
            return None
        if name in self._archive:
            return self._archive[name]
        spec = self.archives.get(name)
        got: tuple[str | None, bool, bool] | None = None
        if spec is None:
            self.d.warn(f"{_src(where)}: archive {_show(name)} is not defined")
        elif self.d.receiver and _pushes_to(spec) == self.d.receiver:
            got = (None, False, True)
        else:
            url, why = _archive_url(spec)
            if url is None:
                self.d.warn(f"archive {_show(name)}: {why}; it gives no host to collect")
            got = (url, bool(url and _SCHEDULED_BY.search(url)), False)
        self._archive[name] = got
        return got

    def host_archives(self, hname: str | None) -> list[tuple[str | None, bool, bool]]:
        if hname not in self._host_archives:
            spec = self.hosts.get(hname) if hname is not None else None
            w = f"hosts.{hname}"
            names = self.d.items(spec, "archives", _src(w)) if isinstance(spec, dict) else []
            self._host_archives[hname] = [a for a in (self.archive(n, w) for n in names) if a]
        return self._host_archives[hname]

    def host_pushes(self, hname: str | None) -> bool:
        """Does a host archive of ``hname`` push to the receiver?  (Cached: one per host.)"""
        got = self._host_pushes.get(hname)
        if got is None:
            got = self._host_pushes[hname] = any(a[2] for a in self.host_archives(hname))
        return got

    def _host_of(self, name: str, spec: dict) -> tuple[str | None, dict]:
        h = spec.get("host")
        if not isinstance(h, str):
            h = name if name in self.hosts else spec.get("address")
            if not isinstance(h, str) or h not in self.hosts:
                return None, {}
        hspec = self.hosts.get(h)
        return h, hspec if isinstance(hspec, dict) else {}

    def _selected(self, sel: Any, group: dict, where: str) -> list[tuple[str, str | None]]:
        """(address name, label) pairs a group selector stands for."""
        if not isinstance(sel, dict):
            self.d.warn(f"{_src(where)}: address selector {_show(sel)} is not an object: ignored")
            return []
        if _truthy(sel.get("disabled")):
            return []
        label = sel.get("label", group.get("default-address-label"))
        label = label if isinstance(label, str) else None
        if "name" in sel:
            return [(sel["name"], label)]
        if "class" in sel:
            return [(n, label) for n in self.class_members(sel["class"], where, 0)]
        self.d.warn(f"{_src(where)}: address selector without name or class: ignored")
        return []

    def _eligible(self, name: Any, label: str | None, where: str) -> tuple[str, str | None] | bool | None:
        """(key, host name) of an address that runs tasks; False for a no-agent one; None otherwise."""
        spec = self.addresses.get(name) if isinstance(name, str) else None
        if not isinstance(spec, dict):
            self.d.warn(f"{_src(where)}: address {_show(name)} is not defined: ignored")
            return None
        hname, hspec = self._host_of(name, spec)
        lspec = spec.get("labels", {}).get(label) if isinstance(spec.get("labels"), dict) else None
        parts = [p for p in (spec, lspec, hspec) if isinstance(p, dict)]
        if any(_truthy(p.get("disabled")) for p in parts):
            return None
        if any(_truthy(p.get("no-agent")) for p in parts):
            return False
        key = self.d.host(spec.get("address"), f"addresses.{name}")
        return (key, hname) if key else None

    def runners(self, group: dict, task: dict, where: str) -> list[tuple[str, str | None]]:
        """(key, host name) of every address of the group that schedules the task."""
        gtype = group.get("type")
        gtype = gtype if isinstance(gtype, str) else None
        fields = {"mesh": ("addresses",), "list": ("addresses",), "disjoint": ("a-addresses", "b-addresses")}
        if gtype not in fields:
            self.d.warn(f"{_src(where)}: unknown group type {_show(gtype)}: using all its addresses")
        sides = []
        for f in fields.get(gtype, ("addresses", "a-addresses", "b-addresses")):
            side = []
            for sel in self.d.items(group, f, _src(where)):
                for name, label in self._selected(sel, group, where):
                    side.append(self._eligible(name, label, where))
            sides.append(side)
        if gtype == "disjoint" and _truthy(group.get("unidirectional")):
            # Only the scheduled-by side runs it, unless one of its addresses has no agent.
            first, second = (sides[1], sides[0]) if task.get("scheduled-by") == 1 else sides
            sides = [first, second] if any(e is False for e in first) else [first]
        seen: dict[str, tuple[str, str | None]] = {}
        for side in sides:
            for e in side:
                if e and e[0] not in seen:
                    seen[e[0]] = e
        return list(seen.values())

    # address classes (pSConfig "address-classes"): evaluated for current-config sources

    def class_members(self, cname: Any, where: str, depth: int) -> list[str]:
        if not isinstance(cname, str):
            self.d.warn(f"{_src(where)}: class name {_show(cname)} is not a string")
            return []
        if cname in self._class:
            return self._class[cname]
        self._class[cname] = []  # a class naming itself resolves to nothing
        cls = self.classes.get(cname)
        w = f"address-classes.{cname}"
        if not isinstance(cls, dict):
            self.d.warn(f"{_src(where)}: address class {_show(cname)} is not defined")
            return []
        ds = cls.get("data-source")
        if not isinstance(ds, dict) or ds.get("type") != "current-config":
            self.d.warn(f"{_src(w)}: data-source {_show(ds.get('type') if isinstance(ds, dict) else ds)}"
                        " is not current-config: class skipped")
            return []
        match, exclude = cls.get("match-filter"), cls.get("exclude-filter")
        try:
            got = [n for n, spec in self.addresses.items() if isinstance(spec, dict)
                   and (match is None or self._filter(match, n, spec, depth))
                   and not (exclude is not None and self._filter(exclude, n, spec, depth))]
        except _Unsupported as e:
            self.d.warn(f"{_src(w)}: {e}: class skipped")
            got = []
        self._class[cname] = got
        return got

    def _filter(self, f: Any, name: str, spec: dict, depth: int) -> bool:
        if not isinstance(f, dict) or depth > 8:
            raise _Unsupported("filter is not an object, or nested too deeply")
        t = f.get("type")
        if t == "tag":
            return f.get("tag") in _tags(spec)
        if t == "host":
            if "jq" in f:
                raise _Unsupported("jq filters are not evaluated")
            _, hspec = self._host_of(name, spec)
            ok = bool(hspec) or name in self.hosts
            if "no-agent" in f:
                ok = ok and bool(hspec.get("no-agent")) == bool(f["no-agent"])
            if "tag" in f:
                ok = ok and f["tag"] in _tags(hspec)
            return ok
        if t in ("and", "or"):
            subs = f.get("filters")
            if not isinstance(subs, list):
                raise _Unsupported(f"{t} filter without a filters list")
            results = (self._filter(s, name, spec, depth + 1) for s in subs)
            return all(results) if t == "and" else any(results)
        if t == "not":
            return not self._filter(f.get("filter"), name, spec, depth + 1)
        if t == "address-class":
            return name in self.class_members(f.get("class"), f"address-classes filter in {name}", depth + 1)
        if t in ("ip-version", "netmask"):
            try:
                addr = spec.get("address")
                ip = ipaddress.ip_address(addr if isinstance(addr, str) else "")
            except ValueError:
                raise _Unsupported(f"{t} filter on a DNS name needs DNS, which sync does not use") from None
            if t == "ip-version":
                return ip.version == f.get("ip-version")
            try:
                return ip in ipaddress.ip_network(f.get("netmask"), strict=False)
            except (TypeError, ValueError):
                raise _Unsupported(f"netmask {_show(f.get('netmask'))} is not a network") from None
        raise _Unsupported(f"filter type {_show(t)} is not evaluated")


def _tags(spec: dict) -> list:
    tags = spec.get("tags")
    return tags if isinstance(tags, list) else []


def _pushes_to(spec: Any) -> str | None:
    """receiver_key() of an http archive's ``data._url`` (None for any other archive)."""
    if not isinstance(spec, dict) or spec.get("archiver") != "http":
        return None
    data = spec.get("data")
    return receiver_key(data.get("_url")) if isinstance(data, dict) else None


def _archive_url(spec: Any) -> tuple[str | None, str]:
    """(read URL or template, reason when None) of a pSConfig archive."""
    if not isinstance(spec, dict):
        return None, "not an object"
    archiver, data = spec.get("archiver"), spec.get("data")
    if not isinstance(data, dict):
        return None, f"archiver {_show(archiver)} with data {_show(data)}"
    meta = data.get("_meta")
    if isinstance(meta, dict) and "esmond_url" in meta:
        url = meta["esmond_url"]
    elif archiver == "esmond":
        url = data.get("url", data.get("_url"))
    elif archiver == "http":
        return None, "http archiver without _meta.esmond_url cannot be read back"
    else:
        return None, f"archiver {_show(archiver)} cannot be read back"
    if not isinstance(url, str):
        return None, f"read URL {_show(url)} is not a string"
    return url, ""


# --- following includes


def _load(source: str, data: Any, max_bytes: int) -> object:
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MeshError(source, f"fetch gave {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise MeshError(source, f"document of {len(data)} bytes is over the {max_bytes}-byte limit: "
                                "not parsed")
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise MeshError(source, "not usable JSON: nested too deeply") from None
    except ValueError as e:
        raise MeshError(source, f"not JSON: {_show(str(e))}") from None


def discover(url: str, fetch: Callable[[str], bytes], max_depth: int = 5, max_docs: int = 200,
             max_bytes: int = 50_000_000, receiver: str | None = None) -> MeshResult:
    """Read one mesh URL and everything it includes.

    Includes (top-level lists and pSConfig ``includes``) are followed breadth
    first up to ``max_depth`` levels and ``max_docs`` documents; a URL seen
    before is skipped with a warning (loops, diamonds).  A failure of ``url``
    itself raises :class:`MeshError`.  An include that cannot be fetched or
    parsed is a warning and makes the result ``complete=False``.  Limits hit
    and bad include URLs are warnings only: they come from the document, would
    recur on every run, and must not make a mesh count as down for good.
    ``receiver`` (``[receive] url``) also finds the pushing hosts (:func:`parse_document`).
    """
    log = _Log()
    targets = _Targets()
    key = receiver_key(receiver)
    pushed: set[str] = set()
    complete = True
    seen = {url}
    queue: deque[tuple[str, int, str | None]] = deque([(url, 0, None)])
    docs = 0
    while queue:
        u, depth, parent = queue.popleft()
        if docs >= max_docs:
            log.warn(parent or u, f"include {_src(u)} not read: over {max_docs} documents")
            continue
        docs += 1
        try:
            try:
                data = fetch(u)
            except MeshError:
                raise
            except Exception as e:  # an injected fetch may raise anything
                raise MeshError(u, f"cannot fetch: {type(e).__name__}: {_show(str(e))}") from None
            d = _parse(_load(u, data, max_bytes), u, log, key)
        except MeshError as e:
            if parent is None:
                raise
            log.warn(parent, f"include {_src(u)}: {e.reason}")
            complete = False
            continue
        targets.merge(d.targets, log, u)
        pushed |= d.pushing
        _follow(d.includes, u, depth, max_depth, seen, queue, log)
    return MeshResult(targets.result(), log.out(), complete, sorted(pushed))


def _follow(includes: Iterable[Any], parent: str, depth: int, max_depth: int, seen: set[str],
            queue: deque[tuple[str, int, str | None]], log: _Log) -> None:
    for raw in includes:
        try:
            inc = _include_url(raw, parent)
        except _Bad as e:
            log.warn(parent, f"include {_show(raw)} ignored: {e}")
            continue
        if inc in seen:
            log.warn(parent, f"include {_src(inc)} already read: skipped (include loop or repeat)")
        elif depth + 1 > max_depth:
            log.warn(parent, f"include {_src(inc)} not read: deeper than {max_depth} levels")
        else:
            seen.add(inc)
            queue.append((inc, depth + 1, parent))
