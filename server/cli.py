"""``spa-server``: the daemon.

This release runs the grant module: at start it builds the firewall
structure and reconciles the journal (closing what went overdue while it was
down, rescheduling the rest), then closes grants on their deadlines and
repairs the firewall if it is flushed behind its back. SIGTERM or SIGINT: a
clean stop that closes every grant and removes what it added.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from spa import __version__
from spa.cli_errors import handle_errors

log = logging.getLogger("spa.server")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("--backend", default="auto", show_default=True, help="Firewall backend: auto, nft or iptables.")
@click.option("--state-dir", default="/var/lib/spa", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the grant journal.")
@click.option("--repair-interval", type=float, default=10.0, show_default=True,
              help="Seconds between checks that the firewall still holds our table and grants.")
@click.option("-v", "--verbose", is_flag=True, help="Log to stdout.")
@click.option("-D", "--debug", is_flag=True, help="Log everything, including each firewall command.")
@handle_errors
def main(backend: str, state_dir: str, repair_interval: float, verbose: bool, debug: bool) -> None:
    """Keep every port closed; open one for one address, for a while, when a client proves it may."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    from spa.server.firewall import create_backend
    from spa.server.firewall.command import CommandBackend
    from spa.server.grants import GrantManager
    from spa.server.journal import Journal

    native = create_backend(backend)
    manager = GrantManager(Journal(state_dir), native, CommandBackend(), repair_interval=repair_interval)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    manager.start()
    log.info("started: backend %s, state in %s", native.name, state_dir)
    while not stop.wait(3600):
        pass
    manager.stop(close_grants=True)
    log.info("stopped; every grant closed")


if __name__ == "__main__":  # pragma: no cover
    main()
