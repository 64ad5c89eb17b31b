"""The ``psprobe`` command line.

Each command imports what it uses when it runs, so ``psprobe --help`` and a
collect that finds nothing new stay cheap (200 hosts run this every few
minutes).
"""

from __future__ import annotations

import logging
import sys

import click

from psprobe import __version__

log = logging.getLogger("psprobe")


def _config(ctx: click.Context):
    from psprobe import config

    try:
        return config.load(ctx.obj["config"])
    except config.ConfigError as e:
        _fail(str(e), 2)


def _host(name: str) -> str:
    from psprobe import hostnames

    try:
        return hostnames.from_instance(name)
    except hostnames.BadHost as e:
        _fail(f"{name!r}: not a valid host: {e}", 2)


def _fail(line: str, status: int):
    log.error("%s", line)
    sys.exit(status)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="PSPROBE_CONFIG", metavar="PATH",
              help="Configuration file (default /etc/psprobe/psprobe.conf; conf.d/*.conf beside "
                   "it is read too). Also $PSPROBE_CONFIG.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
@click.version_option(__version__, prog_name="psprobe")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Collect perfSONAR measurement archives into RabbitMQ.

    Normally run by systemd: psprobe-sync.timer keeps one psprobe@HOST.timer
    per host of the meshes, and each runs `psprobe collect HOST`.
    """
    from psprobe import log as logsetup

    logsetup.setup(verbose)
    ctx.obj = {"config": config_path}


@main.command()
@click.argument("host")
@click.option("--dry-run", is_flag=True,
              help="Print the messages as JSON lines instead of publishing; move nothing.")
@click.pass_context
def collect(ctx: click.Context, host: str, dry_run: bool) -> None:
    """Publish everything new in HOST's archive, then move its checkpoint.

    HOST is the host[:port] of the archive (as in psprobe@HOST.service). Exit
    status: 0 done (or another run holds the host), 1 archive unreadable,
    2 bad configuration, 3 broker failure, 4 state directory unusable.
    """
    from psprobe import runner

    cfg = _config(ctx)
    h = _host(host)
    if not dry_run:
        from psprobe import slots

        # Already held when bin/psprobe took it before the imports.
        slots.hold(cfg.collect.runtime_dir, cfg.collect.max_concurrent)
    sys.exit(runner.collect_host(cfg, h, dry_run=dry_run))



@main.command()
@click.option("--dry-run", is_flag=True, help="Print the plan (added, removed, kept); change nothing.")
@click.option("--unit-dir", metavar="DIR",
              help="Where the timers.target.wants links go (default [mesh] unit_dir, "
                   "/etc/systemd/system).")
@click.option("--no-systemctl", is_flag=True,
              help="Write the links but do not call systemctl (for images and tests).")
@click.pass_context
def sync(ctx: click.Context, dry_run: bool, unit_dir: str | None, no_systemctl: bool) -> None:
    """Read the meshes and enable one psprobe@HOST.timer per host.

    Hosts that left every mesh lose their timer; a mesh that cannot be read
    keeps its last good host list for [mesh] forget_after. Exit status 1 when
    some mesh could not be read (the rest is still applied).
    """
    import time
    from pathlib import Path

    from psprobe import checkpoint
    from psprobe import sync as msync

    cfg = _config(ctx)
    udir = Path(unit_dir or cfg.mesh.unit_dir)
    now = time.time()
    fetch = msync.fetcher(cfg)
    if dry_run:
        p = msync.plan(cfg, udir, fetch, now=now, save=False)
        click.echo(msync.describe(p))
        sys.exit(1 if p.failed else 0)
    sd = Path(cfg.collect.state_dir)
    try:
        sd.mkdir(parents=True, exist_ok=True)
        with checkpoint.Lock(sd / "sync.lock"):
            p = msync.plan(cfg, udir, fetch, now=now)
            msync.apply(cfg, p, udir, now=now, systemctl=not no_systemctl)
    except checkpoint.Busy:
        log.info("sync: another sync is running; nothing to do")
        return
    except (checkpoint.StateError, OSError) as e:
        _fail(f"sync: FAILED error={e}", 4)
    for h in p.added:
        log.info("sync: added %s (%s)", h, p.targets[h]["read_url"])
    for h in p.removed:
        log.info("sync: removed %s", h)
    log.log(logging.WARNING if p.failed else logging.INFO,
            "sync: %s hosts=%d added=%d removed=%d kept=%d failed_meshes=%d duration=%.2fs",
            "FAILED" if p.failed else "ok", len(p.targets), len(p.added), len(p.removed),
            len(p.kept), len(p.failed), time.time() - now)
    sys.exit(1 if p.failed else 0)
