"""Host names as psprobe keys them: one canonical ``host[:port]`` string.

A host key becomes a systemd unit name (``psprobe@<key>.timer``), a state
directory (``hosts/<key>/``) and a URL authority.  It comes from meshes that
anyone on the internet may publish, so the rule is an allow-list, not a
sanitiser: a DNS name (RFC 1123), an IPv4 literal or an IPv6 literal, with an
optional port; anything else is refused with :class:`BadHost`.  Nothing is
repaired or IDNA-encoded: a look-alike name is refused, never turned into a
different, valid one.
"""

from __future__ import annotations

import re

# "psprobe@" + instance + ".service" must fit systemd's 255-character unit names.
UNIT_INSTANCE_MAX = 255 - len("psprobe@.service")
_ALLOWED = re.compile(r"[A-Za-z0-9.:\[\]-]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DNS = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([^:]*))?")
_IPV4_PART = re.compile(r"0|[1-9][0-9]{0,2}")
_ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")


class BadHost(ValueError):
    """Not a host psprobe will use; the message says why (never the name itself)."""


def normalise(name: str) -> str:
    """Canonical key of a host: lower-case DNS name, IPv4, or ``[IPv6]``, with ``:port``.

    Raises :class:`BadHost` for anything else, so a name that passed can be
    used as a unit instance, a path component and a URL authority as it is.
    """
    if not isinstance(name, str):
        raise BadHost(f"not a string but {type(name).__name__}")
    if not name:
        raise BadHost("empty")
    if len(name) > 300:
        raise BadHost("longer than 300 characters")
    if not _ALLOWED.fullmatch(name):
        bad = next(c for c in name if not _ALLOWED.fullmatch(c))
        raise BadHost(f"forbidden character {bad!a}")
    m = _BRACKETED.fullmatch(name)
    if m:
        host, port = "[" + _ipv6(m.group(1)) + "]", m.group(2)
    elif "[" in name or "]" in name:
        raise BadHost("brackets only around an IPv6 address")
    elif name.count(":") >= 2:
        host, port = "[" + _ipv6(name) + "]", None
    else:
        host, sep, port_text = name.partition(":")
        port = port_text if sep else None
        host = _dns_or_ipv4(host)
    key = host if port is None else f"{host}:{_port(port)}"
    if len(unit_instance(key)) > UNIT_INSTANCE_MAX:
        raise BadHost(f"longer than {UNIT_INSTANCE_MAX} characters: too long for a systemd unit name")
    return key


def _ipv6(text: str) -> str:
    """RFC 5952 text, spelled out here: Python 3.13 changed how ``str()`` writes
    IPv4-mapped addresses, and a key must not change with the interpreter."""
    import ipaddress  # here: most keys are DNS names, and every run parses its own

    try:
        hextets = [int(h, 16) for h in ipaddress.IPv6Address(text).exploded.split(":")]
    except ValueError:
        raise BadHost("not a valid IPv6 address") from None
    best, start = (0, 0), None  # (length, index) of the longest run of zero hextets
    for i, h in enumerate([*hextets, 1]):
        if h == 0 and start is None:
            start = i
        elif h != 0 and start is not None:
            if i - start > best[0]:
                best = (i - start, start)
            start = None
    words = [f"{h:x}" for h in hextets]
    if best[0] >= 2:
        n, i = best
        return ":".join(words[:i]) + "::" + ":".join(words[i + n :])
    return ":".join(words)


def _port(text: str) -> str:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise BadHost("port must be a number from 1 to 65535 without leading zeros")
    return text


def _dns_or_ipv4(host: str) -> str:
    if host.endswith("."):
        host = host[:-1]  # the root dot: "example.org." is "example.org"
    if not host:
        raise BadHost("empty host name")
    host = host.lower()
    if len(host) <= 253 and _DNS.fullmatch(host) and not host.rpartition(".")[2].isdigit():
        return host  # the common case, in one regex; the checks below say what is wrong
    labels = host.split(".")
    if labels[-1].isdigit():
        # All-numeric last label: only an IPv4 literal may look like that.
        if len(labels) == 4 and all(_IPV4_PART.fullmatch(p) and int(p) <= 255 for p in labels):
            return host
        raise BadHost("not a valid IPv4 address (numeric last label)")
    if len(host) > 253:
        raise BadHost("DNS name longer than 253 characters")
    for label in labels:
        if not label:
            raise BadHost("empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise BadHost("label longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise BadHost(f"label {label!r} starts or ends with '-'")
    return host


def split(host: str) -> tuple[str, int | None]:
    """(name, port) of a canonical key; IPv6 names keep their brackets."""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", int(rest[1:]) if rest else None
    name, sep, port = host.partition(":")
    return name, int(port) if sep else None


def unit_instance(host: str) -> str:
    """The instance string of ``psprobe@<instance>.timer`` for a canonical key.

    Unit names allow ``[A-Za-z0-9:_.\\-\\\\]``: DNS names, IPv4 and ports pass
    unchanged (the units use ``%i``, which keeps ``-`` as it is); IPv6 brackets
    are written as systemd-escape does, ``\\x5b`` and ``\\x5d``.
    """
    return host.replace("[", "\\x5b").replace("]", "\\x5d")


def from_instance(s: str) -> str:
    """The canonical key of a unit instance, escaped (``\\x5b``) or already unescaped.

    systemd hands ``%i`` over escaped, but an ``ExecStart=`` line C-unescapes
    it, so both forms reach us; whatever the unescaping gives must still pass
    :func:`normalise`.
    """
    if not isinstance(s, str):
        raise BadHost(f"not a string but {type(s).__name__}")
    return normalise(_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), s))


# Where a perfSONAR toolkit keeps its own archive.  Here, in the leaf both sides
# import, because sync (a mesh naming a bare host) and collect (a host with no
# read URL recorded) must agree on it.
ARCHIVE_PATH = "/esmond/perfsonar/archive/"


def default_read_url(host: str, scheme: str = "https") -> str:
    """The read URL of ``host``'s own archive, for a host named without one."""
    return f"{scheme}://{host}{ARCHIVE_PATH}"
