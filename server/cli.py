"""``spa-server``: the daemon, with knockd's command line.

``spa-server -c /etc/knockd.conf -i eth0`` runs an unmodified knockd.conf.
Flags mean what knockd's mean (``-i`` may be repeated or a comma list; the
command line wins over the config file, where knockd lets ``LogFile`` and
``PidFile`` override ``-g`` and ``-p``). A configuration with any error is
refused before anything is touched: every error is printed with file and
line, and the exit status is 2.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from spa import __version__
from spa.cli_errors import handle_errors

log = logging.getLogger("spa.server")

DEFAULT_STATE_DIR = "/var/lib/spa"
DEFAULT_PIDFILE = "/run/spa-server.pid"


def _interfaces(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        out += [x for x in v.replace(",", " ").split() if x]
    return tuple(out)


def _daemonize() -> None:
    """Detach as knockd -d does: background, new session, cwd /, standard streams to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-i", "--interface", "interfaces", multiple=True, metavar="IF[,IF...]",
              help="Interface(s) to sniff; repeat or give a comma list; 'any' for all (default: the config's, else any).")
@click.option("-c", "--config", "config_path", default="/etc/knockd.conf", show_default=True,
              help="knockd.conf-style configuration file.")
@click.option("-d", "--daemon", "daemon", is_flag=True, help="Run in the background.")
@click.option("-D", "--debug", is_flag=True, help="Log everything, including every firewall command and the capture filter.")
@click.option("-v", "--verbose", is_flag=True, help="Print log messages on stdout.")
@click.option("-l", "--lookup", is_flag=True, help="Show the host name of each knocker (looked up off the capture loop).")
@click.option("-p", "--pidfile", default=None, help=f"PID file (default with -d: {DEFAULT_PIDFILE}).")
@click.option("-g", "--logfile", default=None, help="Log file, in knockd's format.")
@click.option("-4", "--only-ip-v4", "only_ipv4", is_flag=True, help="Ignore IPv6.")
@click.option("--backend", default=None, help="Firewall backend for 'open =' doors: auto, nft or iptables (default: the config's Backend, else auto).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help=f"Grant journal directory (default: the config's StateDir, else {DEFAULT_STATE_DIR}).")
@click.option("--repair-interval", type=float, default=10.0, show_default=True,
              help="Seconds between checks that the firewall still holds our rules.")
@click.option("--metrics-file", default=None, type=click.Path(dir_okay=False),
              help="Prometheus textfile, rewritten every 5 s (default: STATE_DIR/metrics.prom).")
@click.option("--knock-matcher", type=click.Choice(["auto", "kernel", "user"]), default="auto", show_default=True,
              help="Match knock sequences in the kernel (an eBPF program: floods cost user space nothing) or in"
                   " user space; auto: the kernel when it can.")
@click.option("--spa-screen", type=click.Choice(["auto", "ebpf", "classic"]), default="auto", show_default=True,
              help="Check each SPA datagram's AEAD tag in the kernel (an eBPF program: forgeries never reach user"
                   " space) or only its key hint and nonce (classic BPF); auto: eBPF when it can.")
@handle_errors
def main(interfaces, config_path, daemon, debug, verbose, lookup, pidfile, logfile, only_ipv4, backend, state_dir,
         repair_interval, metrics_file, knock_matcher, spa_screen) -> None:
    """Keep every port closed; open one for one address, for a while, when a client knocks right."""
    from spa.server import logs
    from spa.server.daemon import Daemon, Runtime, Settings
    from spa.server.firewall import create_backend
    from spa.server.firewall.command import CommandBackend
    from spa.server.grants import GrantManager
    from spa.server.journal import Journal

    # -d moves to /: every path is resolved against the directory we were started in, before that
    # (else -d -c knockd.conf -g knockd.log would log to /knockd.log and SIGHUP would read /knockd.conf).
    settings = Settings(
        config=os.path.abspath(config_path), interfaces=_interfaces(interfaces), only_ipv4=only_ipv4,
        lookup=lookup, backend=backend, state_dir=state_dir, repair_interval=repair_interval,
        knock_matcher=knock_matcher, spa_screen=spa_screen,
    )
    runtime = Runtime.load(config_path)  # every error, with file and line, before anything is touched
    opts = runtime.config.options
    native = None
    if runtime.needs_native or backend is not None:
        native = create_backend(backend or opts.backend or "auto")
    logfile, pid_path, state_dir = (
        os.path.abspath(p) if p else None
        for p in (logfile or opts.logfile, pidfile or opts.pidfile or (DEFAULT_PIDFILE if daemon else None),
                  state_dir or opts.state_dir or DEFAULT_STATE_DIR)
    )
    if daemon:
        _daemonize()
    logs.configure(logfile=logfile, use_syslog=opts.use_syslog, verbose=verbose, debug=debug)
    for w in runtime.warnings:
        log.warning("%s", w)
    if native is not None:
        log.info("firewall backend: %s", native.describe())
    settings.state_dir = state_dir
    settings.metrics_file = os.path.abspath(metrics_file) if metrics_file else os.path.join(state_dir, "metrics.prom")
    settings.status_file = os.path.join(state_dir, "status.json")
    manager = GrantManager(Journal(state_dir), native, CommandBackend(),
                           repair_interval=repair_interval)
    d = Daemon(settings, runtime, manager)
    # Signals first: a SIGTERM from here on is a clean stop, never a kill that leaves the PID file.
    d.install_signals()
    if pid_path:
        with open(pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        manager.start()
        d.start()
        d.run()
    finally:
        d.notifier.stopping()
        d.close()
        manager.stop(close_grants=True)
        manager.journal.end_session()  # everything on disk: the next start need not refuse older SPA packets
        for path in (settings.status_file,):
            try:
                os.unlink(path)  # status.json says "running"; a stopped daemon leaves none
            except (FileNotFoundError, TypeError):
                pass
        if pid_path:
            try:
                os.unlink(pid_path)
            except FileNotFoundError:
                pass
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
