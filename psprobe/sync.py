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

With ``[mesh] shard = K/N`` the host set is cut to this machine's shard
(psprobe.shard) before it meets the enabled timers: a host of another shard
enabled here (N changed) is removed like a host that left the meshes (so,
like it, only at a sync where every mesh answered), and only this shard's
hosts get a ``target.json``.

Pushing hosts (perfSONAR 5 testpoints: no archive to read) send their runs to
``psprobe receive``: a mesh host whose pSConfig ``http`` archive posts to
``[receive] url`` (psprobe.mesh), or one listed in ``[receive] hosts``.  They
get no timer and no target: pushing wins over pulling, since reading a host's
runs back as well would publish them twice.  An enabled host that becomes
pushing is removed like a host that left (so, like it, only at a sync where
every mesh answered), and while a mesh fails, a host the last sync listed as
pushing stays listed.  ``sync.json`` lists them (``"pushing"``, which receive
reads to know who may push, and ``"pushing_since"``: when each was first
listed, so that one that never pushed can be called silent).  They are not
sharded: whichever collector runs the receiver the testpoint names gets its
runs, so every shard lists every pushing host.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psprobe import hostnames, mesh, metrics, shard, state, units
from psprobe.config import Config
from psprobe.exits import Exit

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
    # Enabled hosts no mesh names (or another shard has), kept because a mesh failed (see
    # the module's docstring).
    held: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # failed mesh URL -> why
    # [mesh] shard: how the meshes' hosts split, and the enabled hosts another shard
    # now collects (removed or held above) -> that shard.
    split: shard.Split | None = None
    elsewhere: dict[str, int] = field(default_factory=dict)
    # Hosts that push to this receiver (no timer), sorted; those of them held over from
    # the last sync while a mesh fails are in it too.
    pushing: list[str] = field(default_factory=list)


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


def gather(cfg: Config, fetch: Callable[[str], bytes], *, now: float, save: bool = True,
           errors: dict[str, str] | None = None,
           pushing: set[str] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Every host to collect, with its read URL and the meshes naming it.

    Also the meshes that failed; ``errors`` (when given) gets why each failed,
    and ``pushing`` (when given) the hosts that push to ``[receive] url`` or are
    listed in ``[receive] hosts``, none of which is among the hosts returned.
    """
    m, sd = cfg.mesh, cfg.collect.state_dir
    targets: dict[str, dict] = {}
    failed: list[str] = []
    why: dict[str, str] = {} if errors is None else errors
    push: set[str] = set()
    for url in m.urls:
        found = _one_mesh(url, fetch, sd, now, m.forget_after, save, why, cfg.receive.url or None)
        if found is None:
            failed.append(url)
            continue
        got, ok, pushed = found
        push.update(pushed)
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
            key = hostnames.normalise(entry)
        except hostnames.BadHost as e:
            log.warning("[mesh] exclude: ignoring %r: %s", entry, e)
            continue
        targets.pop(key, None)
        push.discard(key)
    for entry in cfg.receive.hosts:  # the operator's word: after [mesh] exclude
        try:
            push.add(hostnames.normalise(entry))
        except hostnames.BadHost as e:
            log.warning("[receive] hosts: ignoring %r: %s", entry, e)
    for host in push:
        targets.pop(host, None)
    if pushing is not None:
        pushing.update(push)
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
    return host, url or hostnames.default_read_url(host)


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
              save: bool, why: dict[str, str], receiver: str | None = None,
              ) -> tuple[dict[str, str], bool, list[str]] | None:
    """(hosts, fresh, pushing hosts) of one mesh: fresh from the network, else the last good list.

    None when there is no list to use; ``why[url]`` says why it was not fresh.
    """
    cache = state.mesh_cache(sd, url)
    try:
        res = mesh.discover(url, fetch, max_bytes=MAX_MESH_BYTES, receiver=receiver)
        for w in res.warnings:
            log.warning("%s", w)
        if res.complete:
            if save:
                state.write_json_atomic(cache, {"url": url, "fetched": now, "targets": res.targets,
                                                "receiver": receiver, "pushing": res.pushing}, root=sd)
            return res.targets, True, res.pushing
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
    # Its pushing hosts pushed to the receiver of then: none if [receive] url has changed
    # since (plan() keeps the last sync's listed while a mesh fails).
    pushed = last.get("pushing") if isinstance(last.get("pushing"), list) else []
    if mesh.receiver_key(last.get("receiver")) != mesh.receiver_key(receiver):
        pushed = []
    return ({h: u for h, u in last["targets"].items() if isinstance(u, str)}, False,
            [h for h in pushed if isinstance(h, str)])


def plan(cfg: Config, unit_dir: Path, fetch: Callable[[str], bytes], *, now: float,
         save: bool = True) -> Plan:
    """What sync changes: hosts to add, to remove, kept, and held while a mesh fails."""
    errors: dict[str, str] = {}
    pushing: set[str] = set()
    targets, failed = gather(cfg, fetch, now=now, save=save, errors=errors, pushing=pushing)
    enabled = units.enabled_hosts(unit_dir)
    if failed:
        # A pushing host the last sync listed stays listed while a mesh fails (receive
        # would refuse its runs otherwise), unless it is now pulled or excluded.
        old = _last_sync(cfg.collect.state_dir).get("pushing")
        kept = {h for h in old if isinstance(h, str)} if isinstance(old, list) else set()
        pushing |= kept - set(targets) - _excluded(cfg)
    # Not sharded (every shard lists every pushing host): not in shard.assign either.
    split, elsewhere = None, {}
    if cfg.mesh.shard:
        k, n = cfg.mesh.shard
        owners = shard.assign(targets, n)
        split = shard.Split.of(owners, k, n)
        targets = {h: t for h, t in targets.items() if owners[h] == k}
        elsewhere = {h: owners[h] for h in enabled if owners.get(h, k) != k}
        if elsewhere:
            log.info("%d host(s) enabled here are now collected by other shards of %d",
                     len(elsewhere), n)
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
                failed, sorted(held), {u: errors.get(u, "failed") for u in failed},
                split, elsewhere, sorted(pushing))


def _last_sync(sd: str) -> dict[str, Any]:
    """The last sync's record (``sync.json``), or {} when there is none to use."""
    try:
        old = state.read_json(state.sync_file(sd), default={}, root=sd)
    except ValueError:
        return {}
    return old if isinstance(old, dict) else {}


def apply(cfg: Config, p: Plan, unit_dir: Path, *, now: float,
          systemctl: bool | units.Systemctl = True) -> None:
    """Record targets, switch timers, and keep sync's own record for status/report.

    ``systemctl``: True for the real one, False for none (images, tests), or a stand-in.
    """
    sd = cfg.collect.state_dir
    run = units.systemctl if systemctl is True else None if systemctl is False else systemctl
    # An older psprobe's links (timers.target.wants) move under the parent first;
    # when there are none this is one directory listing.
    units.migrate(unit_dir, sd, template_dir=Path(cfg.mesh.template_dir), systemctl=run)
    hfd = state.hosts_dir_fd(sd)
    added = set(p.added)

    def write(host: str) -> None:
        t = p.targets[host]
        _write_target(sd, hfd, host, {"host": host, "read_url": t["read_url"],
                                      "meshes": sorted(set(t["meshes"]))}, new=host in added)

    try:
        # The targets are written before any timer starts, while PID 1 reloads (a first
        # sync's 2 000 timers: seconds of it) when the timers need a reload.
        units.apply(unit_dir, p.added, p.removed, template_dir=Path(cfg.mesh.template_dir),
                    interval=lambda host: cfg.for_host(host).collect.interval, systemctl=run,
                    meanwhile=lambda: state.each(write, list(p.targets)))
    finally:
        os.close(hfd)
    for host in p.removed:
        if host in p.elsewhere and state.host_dir(sd, host).is_dir():
            # Its positions here go stale while another shard collects it
            # (checkpoint.retire_if_moved, at its next collect here if it comes back).
            state.write_json_atomic(state.host_file(sd, host, state.MOVED),
                                    {"time": now, "shard": p.elsewhere[host]}, root=sd)
    path = state.sync_file(sd)
    old = _last_sync(sd)
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
        "shard": p.split.record() if p.split else None,
        # Hosts that push to psprobe receive (no timer; receive reads this), and since when.
        "pushing": p.pushing,
        "pushing_since": _since(old.get("pushing_since"), p.pushing, now),
    }
    state.write_json_atomic(path, rec, root=sd)
    metrics.remove_hosts(cfg.metrics.textfile_dir, p.removed)
    left = old.get("pushing") if isinstance(old.get("pushing"), list) else []
    now_pushing = set(p.pushing)
    metrics.remove_received(cfg.metrics.textfile_dir,
                            [h for h in left if isinstance(h, str) and h not in now_pushing])
    if cfg.metrics.textfile_dir and Path(cfg.metrics.textfile_dir).is_dir():
        # Here too, not only as receive counts: one that never pushed gets its file too
        # (listed since), for a silence alert.
        for host in p.pushing:
            metrics.write_received(cfg.metrics.textfile_dir, host, metrics.read_received(sd, host),
                                   listed=rec["pushing_since"][host])
    metrics.write_sync(cfg.metrics.textfile_dir, rec)


def _since(old: Any, pushing: list[str], now: float) -> dict[str, float]:
    """host -> when a sync first listed it as pushing (kept from the last record)."""
    old = old if isinstance(old, dict) else {}
    return {h: old[h] if isinstance(old.get(h), (int, float)) else now for h in pushing}


def _write_target(sd: str, hosts_fd: int, host: str, rec: dict[str, Any], *, new: bool) -> None:
    """``hosts/<host>/target.json``, rewritten only when it changes.

    Not fsynced (2 000 hosts would cost 4 000 fsyncs per first sync): a record
    lost or torn by a crash reads as missing, collect then uses the default
    read URL with a warning, and the next sync, finding it different, writes it
    again.  A ``new`` host whose directory is made here gets it written
    straight, with nothing to read or replace.
    """
    path = state.host_file(sd, host, state.TARGET)
    dfd = state.new_host_dir_fd(sd, host, hosts_fd=hosts_fd) if new else None
    if dfd is not None:
        try:
            state.create_at(dfd, state.TARGET, state.dumps(rec), 0o644, path=path)
        finally:
            os.close(dfd)
        return
    dfd = state.host_dir_fd(sd, host, create=True, hosts_fd=hosts_fd)
    try:
        try:
            old = state.read_json_at(dfd, state.TARGET, path=path)
        except ValueError:
            old = None
        if old != rec:
            state.write_at(dfd, state.TARGET, state.dumps(rec), 0o644, path=path, durable=False)
    finally:
        os.close(dfd)


def _gone_because(p: Plan, host: str) -> str | None:
    """Why an enabled host goes (or would go) when it is not that no mesh names it."""
    if host in p.elsewhere:
        return f"shard {p.elsewhere[host]} collects it now"
    return "it pushes here now" if host in p.pushing else None


def describe(p: Plan) -> str:
    """The plan as text, for --dry-run and the log."""
    def why(h: str) -> str:
        return _gone_because(p, h) or "no mesh names it"

    lines = [p.split.line()] if p.split else []
    lines += [f"add    {h}  {p.targets[h]['read_url']}" for h in p.added]
    lines += [f"remove {h}" + (f"  ({why(h)})" if _gone_because(p, h) else "") for h in p.removed]
    lines += [f"keep   {h}  {p.targets[h]['read_url']}" for h in p.kept]
    lines += [f"hold   {h}  ({why(h)}, kept while a mesh fails)" for h in p.held]
    lines += [f"push   {h}" for h in p.pushing]
    lines += [f"FAILED mesh {u}: {p.errors.get(u, 'failed')}" for u in p.failed]
    summary = (f"{len(p.targets)} hosts: {len(p.added)} to add, {len(p.removed)} to remove, "
               f"{len(p.kept)} kept, {len(p.pushing)} pushing; {len(p.failed)} mesh(es) failed")
    if p.failed:
        summary += (f"; {len(p.held)} held: nothing is removed while mesh "
                    f"{', '.join(p.failed)} fails")
    lines.append(summary)
    return "\n".join(lines)


def run(cfg: Config, unit_dir: Path, *, dry_run: bool = False,
        systemctl: bool | units.Systemctl = True) -> tuple[str | None, Exit]:
    """One ``psprobe sync``: (the text to print, the exit status).

    A dry run returns the plan as text and changes nothing.  Otherwise the plan
    is applied under sync's lock, with one log line per host added or removed
    and a summary line.  MESH when a mesh failed (the rest is applied), STATE
    when the state directory cannot be used; OK when another sync is running.
    """
    udir = Path(unit_dir)
    now = time.time()
    fetch = fetcher(cfg)
    if dry_run:
        p = plan(cfg, udir, fetch, now=now, save=False)
        return describe(p), Exit.MESH if p.failed else Exit.OK
    sd = Path(cfg.collect.state_dir)
    if not sd.is_dir():
        # Name the cause: under the unit's ProtectSystem=strict a removed state directory
        # would otherwise read as "Read-only file system".
        try:
            sd.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("sync: FAILED error=state directory %s does not exist and cannot be "
                      "created here (%s); recreate it: install -d -m 0770 -o psprobe -g psprobe "
                      "%s", sd, e.strerror, sd)
            return None, Exit.STATE
    try:
        with state.sync_lock(sd):
            p = plan(cfg, udir, fetch, now=now)
            apply(cfg, p, udir, now=now, systemctl=systemctl)
    except state.Busy:
        log.info("sync: another sync is running; nothing to do")
        return None, Exit.OK
    except (state.StateError, OSError) as e:
        log.error("sync: FAILED error=%s", e)
        return None, Exit.STATE
    for h in p.added:
        log.info("sync: added %s (%s)", h, p.targets[h]["read_url"])
    for h in p.removed:
        because = _gone_because(p, h)
        log.info("sync: removed %s%s", h, f" ({because})" if because else "")
    log.log(logging.WARNING if p.failed else logging.INFO,
            "sync: %s hosts=%d added=%d removed=%d kept=%d held=%d failed_meshes=%d pushing=%d%s "
            "duration=%.2fs", "FAILED" if p.failed else "ok", len(p.targets), len(p.added),
            len(p.removed), len(p.kept), len(p.held), len(p.failed), len(p.pushing),
            f" shard={cfg.mesh.shard[0]}/{cfg.mesh.shard[1]}" if cfg.mesh.shard else "",
            time.time() - now)
    return None, Exit.MESH if p.failed else Exit.OK
