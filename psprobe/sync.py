"""Mesh sync: meshes -> host set -> one enabled psprobe@<host>.timer per host.

A mesh that does not answer well (cannot be fetched or parsed, or only in
part) has *failed* this sync, whether or not it has a last good host list
(``meshes/<digest>.json``).  While any mesh fails, sync adds hosts but removes
none: a host that no mesh names any more keeps its timer ("held"), and the
log says ``N host(s) would be removed but mesh X failed: keeping them``.
Removal resumes at the first sync where every mesh answered.  So a mistyped
or moved mesh URL, or a mesh server down for a month, never switches
collection off; dropping a mesh for good is done by removing it from
``[mesh] urls``.  Only ``[mesh] exclude``, the operator's explicit word,
removes a host while a mesh fails.

``[mesh] forget_after`` bounds how long a failed mesh's last good list still
counts as its answer: its hosts are added and their read URLs recorded.  Past
it the list is ignored (its hosts are neither added nor updated), but they are
not removed either while the mesh fails.  Each host's read URL and the meshes
that named it go to ``hosts/<host>/target.json``, which collect reads.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from psprobe import hostnames, mesh, metrics, state, units
from psprobe.archive import default_read_url
from psprobe.config import Config

log = logging.getLogger("psprobe.sync")

MAX_MESH_BYTES = 50 * 1024 * 1024
SYNC_KEEP = 8 * 86400


@dataclass
class Plan:
    targets: dict[str, dict]  # host -> {"read_url": ..., "meshes": [...]}
    added: list[str]
    removed: list[str]
    kept: list[str]
    failed: list[str] = field(default_factory=list)  # mesh URLs that did not answer well
    # Enabled hosts no mesh names, kept because a mesh failed (see the module's docstring).
    held: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # failed mesh URL -> why


def fetcher(cfg: Config) -> Callable[[str], bytes]:
    """GET a mesh document (http/https, or a local path / file:// URL), size-capped."""
    import requests

    m = cfg.mesh
    session = requests.Session()
    session.headers["User-Agent"] = "psprobe"

    def fetch(url: str) -> bytes:
        if url.startswith("file://") or url.startswith("/"):
            p = Path(url[len("file://"):] if url.startswith("file://") else url)
            try:
                if p.stat().st_size > MAX_MESH_BYTES:
                    raise mesh.MeshError(url, f"larger than {MAX_MESH_BYTES >> 20} MB")
                return p.read_bytes()
            except OSError as e:
                raise mesh.MeshError(url, f"cannot read: {e.strerror}") from None
        last: Exception | None = None
        for attempt in range(m.retries + 1):
            try:
                with session.get(url, timeout=m.timeout, stream=True, verify=m.verify) as r:
                    r.raise_for_status()
                    parts, size = [], 0
                    for part in r.iter_content(65536):
                        size += len(part)
                        if size > MAX_MESH_BYTES:
                            raise mesh.MeshError(url, f"larger than {MAX_MESH_BYTES >> 20} MB")
                        parts.append(part)
                    return b"".join(parts)
            except requests.RequestException as e:
                last = e
                if attempt < m.retries:
                    time.sleep(min(2**attempt, 10))
        raise mesh.MeshError(url, f"cannot fetch: {type(last).__name__}: {last}")

    return fetch


def _cache_path(state_dir: str, url: str) -> Path:
    return Path(state_dir) / "meshes" / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".json")


def gather(cfg: Config, fetch: Callable[[str], bytes], *, now: float, save: bool = True,
           errors: dict[str, str] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Every host to collect, with its read URL and the meshes naming it.

    Also the meshes that failed; ``errors`` (when given) gets why each failed.
    """
    m, sd = cfg.mesh, cfg.collect.state_dir
    targets: dict[str, dict] = {}
    failed: list[str] = []
    why: dict[str, str] = {} if errors is None else errors
    for url in m.urls:
        found = _one_mesh(url, fetch, sd, now, m.forget_after, save, why)
        if found is None:
            failed.append(url)
            continue
        got, ok = found
        if not ok:
            failed.append(url)
        for host, read_url in got.items():
            t = targets.setdefault(host, {"read_url": read_url, "meshes": []})
            if t["read_url"] != read_url:
                log.warning("host %s: mesh %s reads it at %s, keeping %s", host, url, read_url,
                            t["read_url"])
            t["meshes"].append(url)
    for entry in m.hosts:
        host, read_url = _static(entry)
        if host:
            targets.setdefault(host, {"read_url": read_url, "meshes": []})["meshes"].append("static")
    for entry in m.exclude:
        try:
            targets.pop(hostnames.normalise(entry), None)
        except hostnames.BadHost as e:
            log.warning("[mesh] exclude: ignoring %r: %s", entry, e)
    return targets, failed


def _static(entry: str) -> tuple[str | None, str]:
    """A ``[mesh] hosts`` entry: a host[:port], or a whole read URL."""
    from urllib.parse import urlsplit

    name, url = entry, None
    if "://" in entry:
        u = urlsplit(entry)
        name, url = u.netloc, entry
    try:
        host = hostnames.normalise(name)
    except hostnames.BadHost as e:
        log.warning("[mesh] hosts: ignoring %r: %s", entry, e)
        return None, ""
    return host, url or default_read_url(host, "https")


def _excluded(cfg: Config) -> set[str]:
    """``[mesh] exclude`` as host keys (bad entries are warned about by :func:`gather`)."""
    out = set()
    for entry in cfg.mesh.exclude:
        try:
            out.add(hostnames.normalise(entry))
        except hostnames.BadHost:
            continue
    return out


def _one_mesh(url: str, fetch: Callable[[str], bytes], sd: str, now: float, forget_after: float,
              save: bool, why: dict[str, str]) -> tuple[dict[str, str], bool] | None:
    """(hosts, fresh) of one mesh: fresh from the network, else the last good list.

    None when there is no list to use; ``why[url]`` says why it was not fresh.
    """
    cache = _cache_path(sd, url)
    try:
        res = mesh.discover(url, fetch, max_bytes=MAX_MESH_BYTES)
        for w in res.warnings:
            log.warning("%s", w)
        if res.complete:
            if save:
                state.write_json_atomic(cache, {"url": url, "fetched": now, "targets": res.targets},
                                        root=sd)
            return res.targets, True
        reason = "part of it could not be read"
    except mesh.MeshError as e:
        reason = str(e)
    why[url] = reason
    try:
        last = state.read_json(cache, root=sd)
    except ValueError as e:
        log.warning("%s", e)
        last = None
    if not isinstance(last, dict) or not isinstance(last.get("targets"), dict):
        log.error("mesh %s: %s; no earlier good list to fall back on", url, reason)
        return None
    age = now - float(last.get("fetched", 0))
    if age > forget_after:
        log.error("mesh %s: %s; last good list is %.1f days old (over [mesh] forget_after): "
                  "its hosts are no longer added or updated (none is removed while it fails)",
                  url, reason, age / 86400)
        return None
    log.warning("mesh %s: %s; keeping its last good list of %d hosts from %s", url, reason,
                len(last["targets"]), time.strftime("%Y-%m-%d %H:%M", time.gmtime(last["fetched"])))
    return {h: u for h, u in last["targets"].items() if isinstance(u, str)}, False


def plan(cfg: Config, unit_dir: Path, fetch: Callable[[str], bytes], *, now: float,
         save: bool = True) -> Plan:
    """What sync changes: hosts to add, to remove, kept, and held while a mesh fails."""
    errors: dict[str, str] = {}
    targets, failed = gather(cfg, fetch, now=now, save=save, errors=errors)
    enabled = units.enabled_hosts(unit_dir)
    want = set(targets)
    gone = enabled - want
    held: set[str] = set()
    if failed:
        # No answer from a mesh is not "the host left": remove only what the operator
        # excluded, keep the rest until every mesh answers.
        held = gone - _excluded(cfg)
        gone -= held
        if held:
            log.warning("%d host(s) would be removed but mesh %s failed: keeping them",
                        len(held), ", ".join(failed))
    return Plan(targets, sorted(want - enabled), sorted(gone), sorted(want & enabled),
                failed, sorted(held), {u: errors.get(u, "failed") for u in failed})


def apply(cfg: Config, p: Plan, unit_dir: Path, *, now: float, systemctl: bool = True) -> None:
    """Record targets, switch timers, and keep sync's own record for status/report."""
    sd = cfg.collect.state_dir
    for host, t in p.targets.items():
        path = state.make_host_dir(sd, host) / "target.json"
        rec = {"host": host, "read_url": t["read_url"], "meshes": sorted(set(t["meshes"]))}
        try:
            old = state.read_json(path, root=sd)
        except ValueError:
            old = None
        if old != rec:
            state.write_json_atomic(path, rec, root=sd)
    units.apply(unit_dir, p.added, p.removed, template_dir=Path(cfg.mesh.template_dir),
                interval=lambda host: cfg.for_host(host).collect.interval, systemctl=systemctl)
    path = Path(sd) / "sync.json"
    try:
        old = state.read_json(path, default={}, root=sd) or {}
    except ValueError:
        old = {}
    changes = [c for c in old.get("changes", []) if c.get("time", 0) >= now - SYNC_KEEP]
    if p.added or p.removed:
        changes.append({"time": now, "added": p.added, "removed": p.removed})
    rec = {
        "last_run": now,
        "last_success": now if not p.failed else old.get("last_success"),
        "hosts": sorted({*p.targets, *p.held}),  # every host whose timer sync keeps
        "failed_meshes": p.failed,
        "mesh_errors": p.errors,
        "held": p.held,
        "changes": changes,
    }
    state.write_json_atomic(path, rec, root=sd)
    metrics.remove_hosts(cfg.metrics.textfile_dir, p.removed)
    metrics.write_sync(cfg.metrics.textfile_dir, rec)


def describe(p: Plan) -> str:
    """The plan as text, for --dry-run and the log."""
    lines = [f"add    {h}  {p.targets[h]['read_url']}" for h in p.added]
    lines += [f"remove {h}" for h in p.removed]
    lines += [f"keep   {h}  {p.targets[h]['read_url']}" for h in p.kept]
    lines += [f"hold   {h}  (no mesh names it, kept while a mesh fails)" for h in p.held]
    lines += [f"FAILED mesh {u}: {p.errors.get(u, 'failed')}" for u in p.failed]
    summary = (f"{len(p.targets)} hosts: {len(p.added)} to add, {len(p.removed)} to remove, "
               f"{len(p.kept)} kept; {len(p.failed)} mesh(es) failed")
    if p.failed:
        summary += (f"; {len(p.held)} held: nothing is removed while mesh "
                    f"{', '.join(p.failed)} fails")
    lines.append(summary)
    return "\n".join(lines)
