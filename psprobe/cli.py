"""The ``psprobe`` command line.

Each command imports what it uses when it runs, so ``psprobe --help`` and a
collect that finds nothing new stay cheap (200 hosts run this every few
minutes).
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from psprobe import __version__

log = logging.getLogger("psprobe")


def _config(ctx: click.Context):
    from psprobe import oneshot

    return oneshot.load_config(ctx.obj["config"])


def _host(name: str) -> str:
    from psprobe import oneshot

    return oneshot.parse_host(name)


def _as_state_owner(cfg, host: str) -> None:
    from psprobe import oneshot

    oneshot.as_state_owner(cfg, host)


def _fail(line: str, status: int):
    from psprobe import oneshot

    oneshot.fail(line, status)


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

    HOST is the host[:port] of the archive (as in psprobe@HOST.service). Run
    as root, it runs as the owner of [collect] state_dir (psprobe). Exit
    status: 0 done (or another run holds the host), 1 archive unreadable,
    2 bad host name, 69 broker failure, 74 state directory unusable, 78 bad
    configuration (README: "Exit status of psprobe collect").
    """
    from psprobe import oneshot

    oneshot.collect(ctx.obj["config"], host, dry_run=dry_run)


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the plan (added, removed, kept); change nothing.")
@click.option("--unit-dir", metavar="DIR",
              help="Where the psprobe-timers.target.wants links go (default [mesh] unit_dir, "
                   "/etc/systemd/system).")
@click.option("--no-systemctl", is_flag=True,
              help="Write the links but do not call systemctl (for images and tests).")
@click.pass_context
def sync(ctx: click.Context, dry_run: bool, unit_dir: str | None, no_systemctl: bool) -> None:
    """Read the meshes and enable one psprobe@HOST.timer per host.

    Hosts that left every mesh lose their timer, but only at a sync where
    every mesh answered: while a mesh fails (a typo, a moved URL, a server
    down) hosts are added and none removed. Exit status 1 when some mesh could
    not be read (the rest is still applied).
    """
    from pathlib import Path

    from psprobe import sync as msync

    cfg = _config(ctx)
    text, status = msync.run(cfg, Path(unit_dir or cfg.mesh.unit_dir), dry_run=dry_run,
                             systemctl=not no_systemctl)
    if text is not None:
        click.echo(text)
    sys.exit(status)


# --- operator tools (issue 5)


def _known_host(cfg, name: str) -> str:
    """HOST as given, checked against the hosts psprobe knows (state, timers, last sync).

    A name without a port stands for the one known ``name:PORT`` (several: exit 2,
    listing them).
    """
    import difflib

    from psprobe import hostnames, status
    from psprobe.exits import Exit

    host = _host(name)
    known = status.known_hosts(cfg)
    if host not in known:
        ports = sorted(k for k in known if hostnames.split(k)[0] == host)
        if len(ports) == 1:
            return ports[0]
        if ports:
            _fail(f"{name}: {len(ports)} known hosts have that name: {', '.join(ports)} "
                  "(give one with its port)", Exit.USAGE)
        near = difflib.get_close_matches(host, sorted(known), n=3)
        _fail(f"{name}: not a host psprobe knows" + (f" (did you mean {', '.join(near)}?)" if near
                                                     else " (see `psprobe status`)"), Exit.USAGE)
    return host


@main.command()
@click.argument("hosts", nargs=-1, metavar="[HOST]...")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.pass_context
def status(ctx: click.Context, hosts: tuple[str, ...], as_json: bool) -> None:
    """One row per host, worst first: timer, last run and success, points and
    messages (last run/24 h), lag, consecutive failures, next timer firing.

    Exit status 1 when a host is failing (its last run failed by its run record
    or by systemd's), lags more than [report] lag_alarm, or a mesh failed at
    the last sync (so it serves as a check); a host that pushes to psprobe
    receive is failing when its last push was refused, and lagging when it has
    been silent for [receive] silent_after. 2 for an unknown host or a bad
    configuration.
    """
    import json

    from psprobe import status as st
    from psprobe.exits import Exit

    cfg = _config(ctx)
    only = [_known_host(cfg, h) for h in hosts] if hosts else None
    ov = st.overview(cfg, only)
    if as_json:
        click.echo(json.dumps(st.to_json(ov), indent=2, sort_keys=True))
    else:
        colour = sys.stdout.isatty()
        click.echo(st.render_text(ov, colour=colour), color=colour)
    sys.exit(Exit.ALARM if ov.alarm else Exit.OK)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("host")
@click.argument("journalctl_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def logs(ctx: click.Context, host: str, journalctl_args: tuple[str, ...]) -> None:
    """The journal of HOST's collects: journalctl -u psprobe@HOST.service [ARGS]...

    For a host that pushes its runs, psprobe receive's lines that name it:
    journalctl -u psprobe-receive.service --grep=HOST [ARGS]... (filtered here,
    without a pager, where journalctl has no --grep: systemd before 237 or
    without PCRE2). HOST may leave out the port when one known host has that
    name. Any journalctl option may follow (e.g. -f, --since today, -p
    warning); journalctl pages on a terminal.
    """
    import subprocess

    from psprobe import control, status
    from psprobe.exits import Exit

    cfg = _config(ctx)
    host = _known_host(cfg, host)
    grep = True
    if status.pushes(cfg, host):
        grep = control.journal_grep()
        cmd = control.receive_journal_command(host, journalctl_args, grep=grep)
    else:
        cmd = control.journalctl_command(host, journalctl_args)
    try:
        if grep:
            sys.exit(subprocess.call(cmd))
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, errors="replace") as p:
            try:
                for line in control.filter_lines(p.stdout, host):
                    sys.stdout.write(line)
                    sys.stdout.flush()  # -f: each line as it comes
            except KeyboardInterrupt:  # the end of a -f: journalctl too, then click's abort
                p.terminate()
                raise
        sys.exit(p.returncode)
    except FileNotFoundError:
        _fail("journalctl not found: is this a systemd machine?", Exit.FAILURE)


@main.command()
@click.option("-f", "--force", is_flag=True, help="Also stop the collects running now.")
@click.pass_context
def pause(ctx: click.Context, force: bool) -> None:
    """Stop psprobe-sync.timer and every host timer until `psprobe resume`, reboots included:
    systemctl disable --now psprobe-timers.target.

    A sync by hand meanwhile enables new hosts without starting them. A collect
    stopped by -f resends at most [broker] confirm_window messages when it runs again.
    """
    from pathlib import Path

    from psprobe import control, units
    from psprobe.exits import Exit

    cfg = _config(ctx)
    try:
        control.pause(force=force)
    except control.ControlError as e:
        _fail(f"pause: {e}", Exit.FAILURE)
    log.info("paused: %s disabled and stopped, with the sync timer and %d host timers%s",
             units.TARGET, len(units.enabled_hosts(Path(cfg.mesh.unit_dir))),
             " and the running collects" if force else "")


@main.command()
@click.pass_context
def resume(ctx: click.Context) -> None:
    """Undo `psprobe pause`: systemctl enable --now psprobe-timers.target, which starts
    the sync timer (when enabled) and every host timer sync enabled."""
    from pathlib import Path

    from psprobe import control, units
    from psprobe.exits import Exit

    cfg = _config(ctx)
    try:
        control.resume()
    except control.ControlError as e:
        _fail(f"resume: {e}", Exit.FAILURE)
    log.info("resumed: %s enabled and started, with the sync timer and %d host timers",
             units.TARGET, len(units.enabled_hosts(Path(cfg.mesh.unit_dir))))


@main.command("migrate-units")
@click.pass_context
def migrate_units(ctx: click.Context) -> None:
    """Move an older psprobe's timer links (timers.target.wants) under psprobe-timers.target.

    The package runs it on upgrade, and every sync does; once done it changes nothing.
    """
    from pathlib import Path

    from psprobe import status, units
    from psprobe.exits import Exit

    cfg = _config(ctx)
    run = units.systemctl if status.systemd_runs(cfg.mesh.unit_dir) else None
    try:
        moved = units.migrate(Path(cfg.mesh.unit_dir), cfg.collect.state_dir,
                              template_dir=Path(cfg.mesh.template_dir), systemctl=run)
    except OSError as e:
        _fail(f"migrate-units: {e}", Exit.FAILURE)
    if moved:
        log.info("migrate-units: %d timer link(s) now under %s", moved, units.TARGET)


def _when(text: str, what: str) -> int:
    from psprobe import control

    try:
        return control.parse_when(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=what) from None


@main.command()
@click.argument("host")
@click.option("--since", "since_text", required=True, metavar="WHEN",
              help="Start: ISO 8601 (UTC unless a zone is given), @EPOCH, or an age like 3d or 12h.")
@click.option("--until", "until_text", metavar="WHEN", help="End (default: now), same forms.")
@click.option("--event-type", "event_types", multiple=True, metavar="TYPE",
              help="Only this event type (repeat for more; default [collect] event_types).")
@click.pass_context
def backfill(ctx: click.Context, host: str, since_text: str, until_text: str | None,
             event_types: tuple[str, ...]) -> None:
    """Publish HOST's points of [--since, --until] again; the checkpoint stays.

    Messages carry the same ids as the regular run's, so a consumer can drop
    what it already has.  Runs under HOST's lock (exit 75 while a collect
    holds it); stops at the first failing slice and says where to resume.
    Run as root, it runs as the owner of [collect] state_dir (psprobe).
    """
    import time

    from psprobe import runner

    cfg = _config(ctx)
    h = _host(host)
    _as_state_owner(cfg, h)
    since = _when(since_text, "--since")
    until = _when(until_text, "--until") if until_text else int(time.time())
    if until < since:
        raise click.BadParameter("--until is before --since", param_hint="--until")
    tty = sys.stderr.isatty()
    bar = None
    last_line = [time.time()]

    def progress(done: int, total: int, bf) -> None:
        if bar is not None:
            bar.update(1)
            return
        now = time.time()
        if now - last_line[0] >= 10 or done == total:
            last_line[0] = now
            log.info("backfill %s: %d/%d slices, up to %s, points=%d messages=%d", h, done, total,
                     time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(bf.done_until)), bf.points,
                     bf.messages)

    n = len(runner.slices(since, until))
    if tty:
        with click.progressbar(length=n, label=f"backfill {h}", file=sys.stderr) as bar:
            bf = runner.backfill_host(cfg, h, since, until, event_types=event_types or None,
                                      progress=progress)
    else:
        bf = runner.backfill_host(cfg, h, since, until, event_types=event_types or None,
                                  progress=progress)
    runner.log_backfill(bf)  # after the bar's last line
    sys.exit(bf.status)


@main.command()
@click.option("--since", "since_text", default="7d", show_default=True, metavar="WHEN",
              help="Start of the period: an age like 7d, ISO 8601 or @EPOCH.")
@click.option("--to", "to", multiple=True, metavar="ADDRESS",
              help="Mail it to ADDRESS (repeat for more) instead of printing it.")
@click.option("--mail", is_flag=True, help="Mail it to [report] to (what psprobe-report.service runs).")
@click.option("--format", "fmt", type=click.Choice(["text", "html", "json"]), default=None,
              help="text (default when printing), html (default when mailing: with a text part) or json.")
@click.pass_context
def report(ctx: click.Context, since_text: str, to: tuple[str, ...], mail: bool,
           fmt: str | None) -> None:
    """The service-performance report: hosts collected, success rate per host,
    points per event type, worst lags, hosts added/removed by sync, failures
    with their last error.  Exit status 1 when the mail could not be sent.
    """
    from psprobe import report as rp
    from psprobe.exits import Exit

    cfg = _config(ctx)
    since = _when(since_text, "--since")
    recipients = tuple(to) or (cfg.report.to if mail else ())
    if mail and not recipients:
        _fail("report --mail: [report] to is empty", Exit.CONFIG)
    out = rp.render(rp.build(cfg, since), fmt or ("html" if recipients else "text"))
    try:
        emitter = rp.MailEmitter(cfg.report, recipients) if recipients else rp.PrintEmitter(sys.stdout)
        emitter.emit(out)
    except rp.ReportError as e:
        _fail(f"report: {e}", Exit.FAILURE)


@main.command()
@click.pass_context
def receive(ctx: click.Context) -> None:
    """Receive the runs perfSONAR testpoints push (pScheduler's http archiver) and publish
    them like pulled ones, until SIGTERM/SIGINT.

    What psprobe-receive.service runs (socket-activated by psprobe-receive.socket,
    else it listens on [receive] listen). Each accepted run is spooled (fsynced)
    before the 2xx answer, then forwarded to the broker with confirms. Run as
    root, it runs as the owner of [collect] state_dir (psprobe). Exit status:
    0 stopped cleanly, 74 spool unusable, 78 bad configuration (certificate or
    key unreadable, tokens file unreadable, address in use).
    """
    import threading

    from psprobe import receive as rcv
    from psprobe import slots

    cfg = _config(ctx)
    slots.drop_to_owner(cfg.collect.state_dir)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("receive: %s: finishing the requests under way, then stopping",
                 signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    sys.exit(rcv.serve(cfg, stop=stop))
