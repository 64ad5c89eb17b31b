"""Configuration: INI files, validated once, with per-host overrides.

``/etc/psprobe/psprobe.conf`` then ``conf.d/*.conf`` in name order; a later file
wins key by key.  Every value is parsed here, so a typo is one line naming the
file, section and key (exit status 78) before anything touches the network or
the state directory.  ``[host NAME]`` sections override ``[collect]`` and
``[archive]`` keys (or any key written ``section.key``) for one host.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_PATH = "/etc/psprobe/psprobe.conf"

DEFAULT_EVENT_TYPES = (
    "packet-loss-rate, packet-trace, packet-retransmits, throughput, throughput-subintervals,"
    " failures, packet-count-sent, packet-count-lost, histogram-owdelay, histogram-ttl,"
    " packet-retransmits-subintervals, packet-loss-rate-bidir, packet-count-lost-bidir"
)


class ConfigError(Exception):
    """A bad configuration value; the message is the whole line shown to the operator."""


# --- value parsers: each takes the raw string and returns the value or raises ValueError


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$")
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``1w`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration (like 30s, 15m, 12h, 7d): {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not yes/no: {text!r}")


def _list(text: str) -> tuple[str, ...]:
    return tuple(x for x in re.split(r"[\s,]+", text.strip()) if x)


def _ranged(conv: Callable[[str], Any], lo: float, hi: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = conv(text.strip())
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo:g}..{hi:g}")
        return v

    return parse


def _duration_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        v = parse_duration(text)
        if not lo <= v <= hi:
            raise ValueError(f"{text.strip()} is outside {lo:g}s..{hi:g}s")
        return v

    return parse


# [collect] interval: whole minutes dividing an hour, or whole hours dividing a day, so
# that a host's calendar phase (psprobe.units.on_calendar) repeats evenly for ever.
_INTERVALS = tuple(m * 60 for m in (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60)) + tuple(
    h * 3600 for h in (2, 3, 4, 6, 8, 12, 24))


def _interval(text: str) -> int:
    v = parse_duration(text)
    if v not in _INTERVALS:
        raise ValueError(f"{text.strip()} is not whole minutes dividing an hour or whole hours "
                         "dividing a day: use 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60min, "
                         "or 2, 3, 4, 6, 8, 12 or 24h")
    return int(v)


def _str(text: str) -> str:
    return text.strip()


def _path(text: str) -> str:
    v = text.strip()
    if v and not v.startswith("/"):
        raise ValueError(f"must be an absolute path: {v!r}")
    return v


def _existing_file(text: str) -> str:
    v = _path(text)
    if v and not os.path.isfile(v):
        raise ValueError(f"no such file: {v}")
    return v


def _verify(text: str) -> bool | str:
    """yes / no / path of a CA bundle (what requests' ``verify`` takes)."""
    v = text.strip()
    try:
        return _bool(v)
    except ValueError:
        pass
    if not v.startswith("/") or not os.path.exists(v):
        raise ValueError(f"must be yes, no or an existing CA file: {v!r}")
    return v


def _schemes(text: str) -> tuple[str, ...]:
    v = tuple(s.lower() for s in _list(text))
    if not v or any(s not in ("https", "http") for s in v):
        raise ValueError(f"must list https and/or http: {text.strip()!r}")
    return v


def _amqp_url(text: str) -> str:
    v = text.strip()
    u = urlsplit(v)
    if u.scheme not in ("amqp", "amqps") or not u.hostname:
        raise ValueError("must be an amqp:// or amqps:// URL with a host")
    try:
        u.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError("bad port in broker URL") from None
    return v


def _event_types(text: str) -> tuple[str, ...]:
    v = _list(text)
    bad = [e for e in v if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", e)]
    if not v or bad:
        raise ValueError(f"bad event type(s): {', '.join(map(repr, bad)) or 'none given'}")
    return v


# N collector machines is a handful; the bound keeps a typo (1/30000000) from costing a
# sync N hashes per host.
MAX_SHARDS = 1000


def _shard(text: str) -> tuple[int, int] | None:
    """``K/N`` (this machine is shard K of N, psprobe.shard), or empty / none for no sharding."""
    v = text.strip()
    if v.lower() in ("", "none"):
        return None
    m = re.fullmatch(r"([0-9]+) */ *([0-9]+)", v)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= MAX_SHARDS:
        raise ValueError(f"must be K/N with 1 <= K <= N <= {MAX_SHARDS} (like 2/3), or none: {v!r}")
    return int(m.group(1)), int(m.group(2))


def _emails(text: str) -> tuple[str, ...]:
    v = _list(text)
    bad = [a for a in v if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", a)]
    if bad:
        raise ValueError(f"not an e-mail address: {bad[0]!r}")
    return v


# --- the sections: dataclass fields carry their parser and the raw default in metadata


def _k(default: str, parse: Callable[[str], Any]) -> Any:
    return field(default=parse(default), metadata={"parse": parse})


@dataclass(frozen=True)
class Collect:
    """``[collect]``: what a run reads, how far back, how often, and how many at once."""

    state_dir: str = _k("/var/lib/psprobe", _path)
    first_run_lookback: float = _k("12h", _duration_range(60, 400 * 86400))
    event_types: tuple[str, ...] = _k(DEFAULT_EVENT_TYPES, _event_types)
    chunk_points: int = _k("200", _ranged(int, 1, 100_000))
    # Collects of all hosts that may run at the same time on this machine (0: no bound).
    # A far host's run mostly waits on round trips: 16 keep 2 000 hosts at 50 ms within
    # the 10-minute cycle at ~30 MB each (bench/fleet.py).
    max_concurrent: int = _k("16", _ranged(int, 0, 10_000))
    runtime_dir: str = _k("/run/psprobe", _path)
    # pScheduler retries a failed archiving and a pS 5 archive indexes late, so a point
    # can appear behind a series' checkpoint: every late_window / 2 a run re-reads that
    # far behind and sends what it had not sent (0: never look back).
    late_window: float = _k("2h", _duration_range(0, 7 * 86400))
    # A whole run ends by then, whatever the archive does (the unit's
    # TimeoutStartSec=15min kills it later, and would leave no record).
    run_deadline: float = _k("10min", _duration_range(10, 86400))
    # How often each host is collected, at a phase of its own within it: psprobe sync
    # writes it into the host's timer (psprobe.units.dropin_text).  Divides an hour or a day.
    interval: int = _k("10min", _interval)


@dataclass(frozen=True)
class Archive:
    """``[archive]``: how the measurement archives are reached and read."""

    schemes: tuple[str, ...] = _k("https, http", _schemes)
    timeout: float = _k("30s", _duration_range(0.1, 3600))
    retries: int = _k("2", _ranged(int, 0, 20))
    verify: bool | str = _k("yes", _verify)
    cert: str = _k("", _existing_file)
    key: str = _k("", _existing_file)
    # Data queries of one host at once: a far host's run is round trips x series / parallel
    # (8: 250 series with new points at 50 ms in about 2 s; bench/latency.py).
    parallel: int = _k("8", _ranged(int, 1, 64))
    page_points: int = _k("1000", _ranged(int, 10, 10_000))
    max_answer_mb: float = _k("32", _ranged(float, 1, 4096))
    # Series that failed in a row for want of a connection or an answer before the run
    # gives up on the archive as gone (0: never; read every series).
    give_up_after: int = _k("3", _ranged(int, 0, 10_000))


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        v = text.strip().lower()
        if v not in choices:
            raise ValueError(f"must be {' or '.join(choices)}: {text.strip()!r}")
        return v

    return parse


@dataclass(frozen=True)
class Broker:
    """``[broker]``: where the messages go, and how their delivery is confirmed."""

    url: str = _k("amqp://guest@127.0.0.1:5672/%2F", _amqp_url)
    password_file: str = _k("", _path)
    exchange: str = _k("osg.ps.raw", _str)
    routing_key_prefix: str = _k("perfsonar.raw.", _str)
    declare_exchange: bool = _k("no", _bool)
    ca: str = _k("", _existing_file)
    cert: str = _k("", _existing_file)
    key: str = _k("", _existing_file)
    timeout: float = _k("30s", _duration_range(1, 3600))
    heartbeat: int = _k("60", _ranged(int, 0, 3600))
    # Messages published before their confirms are awaited: a run costs a broker round
    # trip per window, and one that dies resends at most this many.
    confirm_window: int = _k("32", _ranged(int, 1, 10_000))
    # A message no queue is bound for (the broker returns it): warn (count it, warn once
    # per routing key and run, drop it; a run where nothing at all is routed still fails)
    # or fail (stop the run there, as a nack does).
    unroutable: str = _k("warn", _one_of("warn", "fail"))


@dataclass(frozen=True)
class Mesh:
    """``[mesh]``: where the host list comes from, and where sync writes the timers."""

    urls: tuple[str, ...] = _k("", _list)
    hosts: tuple[str, ...] = _k("", _list)
    exclude: tuple[str, ...] = _k("", _list)
    timeout: float = _k("60s", _duration_range(1, 3600))
    retries: int = _k("2", _ranged(int, 0, 20))
    verify: bool | str = _k("yes", _verify)
    forget_after: float = _k("7d", _duration_range(0, 3650 * 86400))
    unit_dir: str = _k("/etc/systemd/system", _path)
    template_dir: str = _k("/usr/lib/systemd/system", _path)
    # This machine's share of the hosts, (K, N) from "K/N", when N machines with this same
    # configuration split them (psprobe.shard); None: this machine collects every host.
    shard: tuple[int, int] | None = _k("", _shard)


@dataclass(frozen=True)
class Metrics:
    """``[metrics]``: node_exporter's textfile directory."""

    textfile_dir: str = _k("/var/lib/prometheus/node-exporter", _path)


@dataclass(frozen=True)
class Report:
    """``[report]``: the daily report's alarm threshold and mail."""

    lag_alarm: float = _k("2h", _duration_range(60, 365 * 86400))
    to: tuple[str, ...] = _k("", _emails)
    sender: str = _k("psprobe@localhost", _str)
    smtp_host: str = _k("localhost", _str)
    smtp_port: int = _k("25", _ranged(int, 1, 65535))
    starttls: bool = _k("no", _bool)
    smtp_user: str = _k("", _str)
    smtp_password_file: str = _k("", _path)


def _size(text: str) -> int:
    """A size in bytes: ``64k``, ``10M``, ``1G`` (powers of 1024), or plain bytes."""
    t = text.strip()
    m = re.fullmatch(r"(\d+)\s*([kKmMgG]?)[bB]?", t)
    if not m:
        raise ValueError(f"not a size (like 10M or 1G): {t!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _listen(text: str) -> tuple[str, int]:
    """``[ADDRESS]:PORT`` or ``PORT`` (all addresses)."""
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if not sep:
        host, port = "", t
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not [ADDRESS:]PORT: {t!r}")
    return host, int(port)


@dataclass(frozen=True)
class Receive:
    """``psprobe receive``: the endpoint pScheduler's http archiver pushes runs to."""

    # Where `psprobe receive` listens when systemd passes it no socket (psprobe-receive.socket
    # has its own ListenStream=, the same port by default).
    listen: tuple[str, int] = _k("8443", _listen)
    # The URL testpoints are given (their pSConfig http archive's _url): sync takes a mesh
    # host whose http archiver points here for a pushing host (no timer).
    url: str = _k("", _str)
    # TLS with the host's certificate; plain HTTP only when asked (behind a TLS proxy).
    certificate: str = _k("/etc/grid-security/hostcert.pem", _path)
    key: str = _k("/etc/grid-security/hostkey.pem", _path)
    plain_http: bool = _k("no", _bool)
    # CA bundle for TLS client certificates: set, a client must show one whose name is
    # the pushing host's.
    client_ca: str = _k("", _path)
    # "host token" lines (root:psprobe 0640); "* token" is a token any allowed host may use.
    tokens: str = _k("/etc/psprobe/tokens", _path)
    # Hosts allowed to push besides those of the meshes (sync's host set).
    hosts: tuple[str, ...] = _k("", _list)
    max_body: int = _k("16M", _size)
    # Accepted runs wait here (fsynced) for the broker; at this size new pushes get 503.
    spool_max: int = _k("1G", _size)
    # A pushing host with nothing received for this long alarms like a lagging pulled host.
    silent_after: float = _k("1h", _duration_range(60, 365 * 86400))
    # Every request ends within this, however slowly its bytes come.
    request_timeout: float = _k("30s", _duration_range(1, 3600))


SECTIONS: dict[str, type] = {
    "collect": Collect,
    "archive": Archive,
    "broker": Broker,
    "mesh": Mesh,
    "metrics": Metrics,
    "report": Report,
    "receive": Receive,
}
# In [host NAME] a plain key means the first of these sections that has it.
HOST_SECTIONS = ("collect", "archive")
# The file option of `from` is spelled `from` in the file (a Python keyword here).
ALIASES = {("report", "from"): "sender"}


@dataclass(frozen=True)
class Config:
    """The whole configuration: one value per section, and the per-host overrides."""

    collect: Collect = field(default_factory=Collect)
    archive: Archive = field(default_factory=Archive)
    broker: Broker = field(default_factory=Broker)
    mesh: Mesh = field(default_factory=Mesh)
    metrics: Metrics = field(default_factory=Metrics)
    report: Report = field(default_factory=Report)
    receive: Receive = field(default_factory=Receive)
    files: tuple[str, ...] = ()
    # host -> {(section, key): (value, origin)}; origin is "file: [host X]" for messages
    overrides: dict[str, dict[tuple[str, str], Any]] = field(default_factory=dict)

    def for_host(self, host: str) -> Config:
        """This configuration with the ``[host NAME]`` overrides of ``host`` applied."""
        ov = self.overrides.get(host)
        if not ov:
            return self
        changes: dict[str, dict[str, Any]] = {}
        for (section, key), value in ov.items():
            changes.setdefault(section, {})[key] = value
        return dataclasses.replace(
            self,
            **{s: dataclasses.replace(getattr(self, s), **kv) for s, kv in changes.items()},
        )


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _parse_value(origin: str, section: str, key: str, raw: str) -> Any:
    name = ALIASES.get((section, key), key)
    fields = _fields(section)
    if name not in fields:
        raise ConfigError(f"{origin}: [{section}] {key}: unknown key")
    try:
        return name, fields[name].metadata["parse"](raw)
    except ValueError as e:
        raise ConfigError(f"{origin}: [{section}] {key}: {e}") from None


def config_files(path: str) -> list[str]:
    """The main file, then ``conf.d/*.conf`` beside it in name order."""
    confd = Path(path).parent / "conf.d"
    extra = sorted(str(p) for p in confd.glob("*.conf")) if confd.is_dir() else []
    return [path, *extra]


def load(path: str | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError with one clear line."""
    path = path or os.environ.get("PSPROBE_CONFIG") or DEFAULT_PATH
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: configuration file not found")
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    overrides: dict[str, dict[tuple[str, str], Any]] = {}
    files = config_files(path)
    for fname in files:
        cp = configparser.ConfigParser(interpolation=None, default_section="\0none")
        try:
            with open(fname, encoding="utf-8") as f:
                cp.read_file(f, source=fname)
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            msg = str(e).replace("\n", " ")
            raise ConfigError(f"{fname}: cannot read: {msg}") from None
        for section in cp.sections():
            if section in SECTIONS:
                for key, raw in cp.items(section):
                    name, value = _parse_value(fname, section, key, raw)
                    values[section][name] = value
            elif section.startswith("host "):
                host = _host_section(fname, section)
                for key, raw in cp.items(section):
                    target, name = _host_key(fname, section, key)
                    name, value = _parse_value(f"{fname}: [{section}]", target, name, raw)
                    overrides.setdefault(host, {})[(target, name)] = value
            else:
                raise ConfigError(f"{fname}: [{section}]: unknown section")
    cfg = Config(
        **{s: SECTIONS[s](**kv) for s, kv in values.items()},
        files=tuple(files),
        overrides=overrides,
    )
    _check_pairs(cfg, files[-1])
    return cfg


def _host_section(fname: str, section: str) -> str:
    from psprobe.hostnames import BadHost, normalise

    name = section[len("host ") :].strip()
    try:
        return normalise(name)
    except BadHost as e:
        raise ConfigError(f"{fname}: [{section}]: not a valid host: {e}") from None


def _host_key(fname: str, section: str, key: str) -> tuple[str, str]:
    if "." in key:
        target, name = key.split(".", 1)
        if target not in SECTIONS:
            raise ConfigError(f"{fname}: [{section}] {key}: unknown section {target!r}")
        return target, name
    for target in HOST_SECTIONS:
        if ALIASES.get((target, key), key) in _fields(target):
            return target, key
    raise ConfigError(f"{fname}: [{section}] {key}: unknown key (use section.key for others)")


def _check_pairs(cfg: Config, origin: str) -> None:
    for section in ("archive", "broker"):
        s = getattr(cfg, section)
        if s.key and not s.cert:
            raise ConfigError(f"{origin}: [{section}] key: set without cert")


# --- secrets


def read_secret(path: str, what: str) -> str:
    """Read a password file, refusing one that others can read.

    The file holds only the secret (one line).  Group-readable is fine: the
    package ships it root:psprobe 0640 so the service user can read it.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e.strerror}") from None
    if st.st_mode & stat.S_IROTH or st.st_mode & stat.S_IWOTH:
        raise ConfigError(
            f"{path}: {what}: refusing a world-readable secrets file "
            f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod 0640 it)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e}") from None


def redact_url(url: str) -> str:
    """A URL fit for logs: the password (if any) replaced by ``***``."""
    u = urlsplit(url)
    if u.password is None:
        return url
    user = unquote(u.username or "")
    host = u.netloc.rsplit("@", 1)[1]
    return u._replace(netloc=f"{user}:***@{host}").geturl()
