"""``spa keygen`` and ``spa trust``: making keys and telling the client which server key to trust."""

from __future__ import annotations

import click

from spa.cli_errors import handle_errors


@click.command()
@click.option("-o", "--output", "output", metavar="PATH", type=click.Path(dir_okay=False),
              help="Where to write the key (PATH, and PATH.pub for Ed25519 keys).")
@click.option("--server", "server", is_flag=True, help="Make the server's key pair (for ServerKey).")
@click.option("--shared", "shared", is_flag=True, help="Make a shared key for rotating knock sequences.")
@click.option("--rotate", "rotate", metavar="PATH", type=click.Path(dir_okay=False),
              help="Rotate the key at PATH: a client key moves to PATH.old and a new one takes its place; "
                   "a shared key gains a new secret and keeps the old one for --grace.")
@click.option("--comment", default=None, help="Comment for the .pub line (default: user@host).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--interval", type=click.IntRange(min=5), default=30, show_default=True,
              help="Shared key: seconds each rotating sequence lasts.")
@click.option("--length", type=click.IntRange(2, 32), default=4, show_default=True, help="Shared key: knocks per sequence.")
@click.option("--ports", default="10000-65000", show_default=True, metavar="LO-HI", help="Shared key: port range.")
@click.option("--proto", type=click.Choice(["tcp", "udp", "mixed"]), default="tcp", show_default=True,
              help="Shared key: protocol of the knocks.")
@click.option("--exclude", default="", metavar="PORT[,PORT...]", help="Shared key: ports never used in a sequence.")
@click.option("--grace", default="7d", show_default=True, metavar="DURATION",
              help="Shared key rotation: how long the previous secret stays valid (s, m, h or d suffix).")
@handle_errors
def keygen(output, server, shared, rotate, comment, force, interval, length, ports, proto, exclude, grace) -> None:
    """Make a client key (default), a server key (--server) or a shared key (--shared); or rotate one."""
    from spa.keys import ed25519

    if rotate is not None:
        if output or server or shared:
            raise click.UsageError("--rotate takes only the key's PATH")
        from spa.keytext import PRIVATE_TYPE

        if ed25519.kind(rotate) == PRIVATE_TYPE:
            new, old_path = ed25519.rotate(rotate, comment)
            click.echo(f"new key {new.key_id} in {rotate} (public: {rotate}.pub)")
            click.echo(f"old key kept in {old_path}; once the server lists the new .pub line, "
                       f"remove the old line there, then {old_path}")
            return
        from spa.cli_rotating import rotate_shared

        rotate_shared(rotate, grace)
        return
    if not output:
        raise click.UsageError("give -o PATH")
    if server and shared:
        raise click.UsageError("--server and --shared exclude each other")
    if shared:
        from spa.cli_rotating import keygen_shared

        keygen_shared(output, interval, length, ports, proto, force, exclude)
        return
    pair = ed25519.generate(output, "server" if server else "client", comment, force=force)
    click.echo(f"{'server' if server else 'client'} key {pair.key_id} written to {output} (mode 0600)")
    click.echo(f"public key: {output}.pub")
    if server:
        click.echo(f"clients run: spa trust HOST {output}.pub")
    else:
        click.echo(f"the server adds this line to a door's authorized_keys file: {output}.pub")


@click.command()
@click.argument("host")
@click.argument("public_key", metavar="SERVER.pub", type=click.Path(dir_okay=False))
@click.option("--known-servers", metavar="FILE", type=click.Path(dir_okay=False),
              help="The file to update (default: ~/.knock/known_servers).")
@handle_errors
def trust(host: str, public_key: str, known_servers: str | None) -> None:
    """Trust SERVER.pub as HOST's key for SPA (replaces an earlier key for HOST)."""
    from spa.keys import ed25519
    from spa.keys.trust import trust as record

    key = ed25519.load_public(public_key)
    path = record(host, key, known_servers)
    click.echo(f"{host}: server key {key.key_id} recorded in {path}")
