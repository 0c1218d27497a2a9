"""``knock-client``: knock's command line (``knock-client HOST PORT[:PROTO] ...``).

Flags as in knock: ``-u/--udp``, ``-d/--delay MS``, ``-v/--verbose``,
``-4``, ``-6``. Unlike knock it exits non-zero when a name does not resolve
or a knock cannot be sent. Signed and rotating knocks (``--key``) come with
their issues.
"""

from __future__ import annotations

import socket

import click

from spa import __version__
from spa.cli_errors import handle_errors
from spa.client.knock import knock, parse_target


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-u", "--udp", is_flag=True, help="Make every knock UDP (overrides :tcp).")
@click.option("-d", "--delay", type=click.IntRange(min=0), default=0, metavar="MS", help="Wait MS milliseconds after each knock.")
@click.option("-v", "--verbose", is_flag=True, help="Print each knock as it is sent.")
@click.option("-4", "--ipv4", "v4", is_flag=True, help="Use IPv4 only.")
@click.option("-6", "--ipv6", "v6", is_flag=True, help="Use IPv6 only.")
@click.argument("host")
@click.argument("ports", nargs=-1, required=True, metavar="PORT[:PROTO]...")
@handle_errors
def main(udp: bool, delay: int, verbose: bool, v4: bool, v6: bool, host: str, ports: tuple[str, ...]) -> None:
    """Knock on HOST's PORTS in order (PROTO: tcp or udp; default tcp)."""
    if v4 and v6:
        raise click.UsageError("-4 and -6 exclude each other")
    family = socket.AF_INET if v4 else socket.AF_INET6 if v6 else socket.AF_UNSPEC
    targets = [parse_target(p, force_udp=udp) for p in ports]
    knock(host, targets, family=family, delay_ms=delay, verbose=click.echo if verbose else None)


if __name__ == "__main__":  # pragma: no cover
    main()
