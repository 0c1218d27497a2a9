"""``knock-client``: knock's command line (``knock-client HOST PORT[:PROTO] ...``).

Flags as in knock: ``-u/--udp``, ``-d/--delay MS``, ``-v/--verbose``,
``-4``, ``-6``; and ``--tcpflags fin,urg,...``, which knock lacks: TCP
knocks then go out as raw packets with exactly those flags set (root
needed; ``spa.client.raw``, and scapy with it, is imported only then).
Unlike knock it exits non-zero when a name does not resolve or a knock
cannot be sent.

``knock-client --key KEY HOST DOOR`` sends one signed SPA packet when KEY
is an Ed25519 key (``spa keygen``), and knocks the current rotating sequence
when KEY is a shared key (``spa keygen --shared``).
"""

from __future__ import annotations

import socket

import click

from spa import __version__
from spa.cli_errors import handle_errors
from spa.client.knock import knock, parse_target


def _tcpflags(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from spa.client.raw import parse_flags  # light: scapy itself is imported only to send

    try:
        return parse_flags(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-u", "--udp", is_flag=True, help="Make every knock UDP (overrides :tcp).")
@click.option("-d", "--delay", type=click.IntRange(min=0), default=0, metavar="MS", help="Wait MS milliseconds after each knock.")
@click.option("-v", "--verbose", is_flag=True, help="Print each knock as it is sent.")
@click.option("-4", "--ipv4", "v4", is_flag=True, help="Use IPv4 only.")
@click.option("-6", "--ipv6", "v6", is_flag=True, help="Use IPv6 only.")
@click.option("--tcpflags", "tcpflags", metavar="FLAG[,FLAG...]", callback=_tcpflags,
              help="Send TCP knocks as raw packets with exactly these flags set "
                   "(fin,syn,rst,psh,ack,urg); needs root.")
@click.option("--key", "key_path", metavar="KEY", type=click.Path(dir_okay=False),
              help="Send SPA (Ed25519 key) or the rotating sequence (shared key) for DOOR instead of PORTS.")
@click.option("--server-key", metavar="FILE", type=click.Path(dir_okay=False),
              help="The server's .pub file (default: HOST's entry in ~/.knock/known_servers).")
@click.option("--allow-ip", metavar="ADDR", help="SPA: the address to open for (default: this host's source address towards HOST).")
@click.option("--port", "spa_port", type=click.IntRange(1, 65535), default=62201, show_default=True,
              help="SPA: the server's SpaPort.")
@click.option("--duration", type=click.IntRange(min=0), default=0, metavar="SECONDS",
              help="SPA: how long to open (the server caps it at the door's cmd_timeout; default: the door's).")
@click.option("--bind-source", metavar="ADDR",
              help="Rotating: the door binds the source; ADDR is this client's address as the server sees it.")
@click.argument("host")
@click.argument("ports", nargs=-1, required=True, metavar="PORT[:PROTO]... | DOOR")
@handle_errors
def main(udp: bool, delay: int, verbose: bool, v4: bool, v6: bool, tcpflags: int | None, key_path: str | None,
         server_key: str | None, allow_ip: str | None, spa_port: int, duration: int, bind_source: str | None,
         host: str, ports: tuple[str, ...]) -> None:
    """Knock on HOST's PORTS in order (PROTO: tcp or udp; default tcp), or open DOOR with --key."""
    if v4 and v6:
        raise click.UsageError("-4 and -6 exclude each other")
    family = socket.AF_INET if v4 else socket.AF_INET6 if v6 else socket.AF_UNSPEC
    echo = click.echo if verbose else None
    if key_path is not None:
        if len(ports) != 1:
            raise click.UsageError("with --key, give HOST and one DOOR name")
        if udp or tcpflags is not None:
            raise click.UsageError("-u and --tcpflags are for static knocks; with --key the key file decides "
                                   "what is sent")
        _keyed(key_path, host, ports[0], server_key, allow_ip, spa_port, duration, family, delay, echo, bind_source)
        return
    if bind_source is not None:
        raise click.UsageError("--bind-source needs --key with a shared key")
    targets = [parse_target(p, force_udp=udp) for p in ports]
    if tcpflags is None:
        knock(host, targets, family=family, delay_ms=delay, verbose=echo)
        return
    from spa.client.raw import knock_raw

    knock_raw(host, targets, tcpflags, family=family, delay_ms=delay, verbose=echo)


def _keyed(key_path, host, door, server_key, allow_ip, spa_port, duration, family, delay, echo, bind_source) -> None:
    # Only the file's type line is read here: the crypto libraries load for SPA only.
    from spa.keys.secure import read_private
    from spa.keytext import PRIVATE_TYPE, file_type

    if file_type(read_private(key_path)) == PRIVATE_TYPE:
        if bind_source is not None:
            raise click.UsageError("--bind-source is for rotating sequences (a shared key), not SPA")
        from spa.client.spa_send import send_spa

        send_spa(host, door, key_path, server_key_file=server_key, allow_ip=allow_ip, port=spa_port,
                 duration=duration, family=family, verbose=echo)
        return
    from spa.client.rotating_knock import knock_rotating

    knock_rotating(host, door, key_path, family=family, delay_ms=delay, verbose=echo, bind_source=bind_source)


if __name__ == "__main__":  # pragma: no cover
    main()
