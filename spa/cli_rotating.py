"""``spa`` commands for rotating knock sequences.

``keygen_shared`` and ``rotate_shared`` do the work of ``spa keygen --shared``
and ``spa keygen --rotate`` (the ``keygen`` command in ``spa.cli`` parses the
options and calls them inside its ``handle_errors``). ``sequence`` is the
``spa sequence`` command: it prints the sequence in force for a door, ready
to put after ``knock HOST``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable

import click

from spa.cli_errors import handle_errors
from spa.errors import InvalidGrant
from spa.keys import shared
from spa.rotating import (
    Params,
    RotatingProto,
    counter,
    derive,
    format_time,
    parse_port_list,
    parse_range,
    parse_time,
    seconds_left,
    source_bytes,
)

DEFAULT_INTERVAL = 30
DEFAULT_LENGTH = 4
DEFAULT_PORTS = "10000-65000"
DEFAULT_PROTO: RotatingProto = "tcp"
DEFAULT_GRACE = "7d"

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([smhdw]?)")


def parse_grace(text: str | float) -> float:
    """A grace period: seconds, or a number with ``s``, ``m``, ``h``, ``d`` or ``w`` (``7d``, ``36h``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = _DURATION_RE.fullmatch(str(text).strip().lower())
    if m is None:
        raise InvalidGrant(f"invalid grace {text!r}: expected seconds or a number with s, m, h, d or w (7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _describe(params: Params) -> str:
    exclude = ",".join(str(p) for p in sorted(params.exclude)) or "none"
    return (
        f"interval {params.interval} s, {params.length} knocks, ports {params.range_text}, "
        f"proto {params.proto}, excluding {exclude} (about {params.bits:.0f} bits per sequence)"
    )


def keygen_shared(
    output: str,
    interval: int = DEFAULT_INTERVAL,
    length: int = DEFAULT_LENGTH,
    ports: str = DEFAULT_PORTS,
    proto: str = DEFAULT_PROTO,
    force: bool = False,
    exclude: Iterable[str | int] = (),
) -> shared.SharedKey:
    """Write a new shared-key file (mode 0600) and say what was written.

    ``exclude`` adds ports (numbers, or text such as ``"22,8080"``) to the
    default exclusion, the SPA port.
    """
    excluded = set(shared.DEFAULT_EXCLUDE)
    for item in exclude:
        excluded |= {item} if isinstance(item, int) else parse_port_list(item)
    lo, hi = parse_range(ports)
    params = Params(interval, length, lo, hi, proto.lower(), frozenset(excluded))  # type: ignore[arg-type]
    key = shared.generate(params)
    shared.write(output, key, force=force)
    click.echo(f"wrote shared key {output} (mode 0600)")
    click.echo(f"key id: {key.newest.key_id}")
    click.echo(_describe(params))
    click.echo("give the client a copy over a secure channel; the door names it with 'Rotating_Key'")
    return key


def rotate_shared(path: str, grace: str | float = DEFAULT_GRACE) -> shared.SharedKey:
    """Add a new current secret to ``path``; the previous one stays valid for ``grace``; say what changed."""
    seconds = parse_grace(grace)
    before = {s.key_id for s in shared.load(path).secrets}
    key = shared.rotate(path, seconds)
    previous = key.secrets[-2]
    click.echo(f"rotated {path}: new key id {key.newest.key_id} (clients knock with it once they have the file)")
    click.echo(
        f"previous key id {previous.key_id} stays valid until {format_time(previous.until or 0)} "
        f"(grace {grace if isinstance(grace, str) else f'{seconds:.0f} s'})"
    )
    dropped = before - {s.key_id for s in key.secrets}
    if dropped:
        click.echo(f"dropped (grace ended): {', '.join(sorted(dropped))}")
    # The server must know the new secret before any client uses it.
    click.echo("let the server read the new file (spa-server reloads on SIGHUP) before clients get it")
    return key


@click.command("sequence")
@click.option("--key", "key_path", required=True, metavar="PATH", help="Shared-key file (mode 0600).")
@click.argument("door")
@click.option("--at", "at", metavar="TIME", help="Unix seconds or ISO 8601 (UTC when no zone is given); default now.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "knock"]),
    default="text",
    show_default=True,
    help="knock: PORT:PROTO ... on stdout, ready to put after 'knock HOST' (the seconds left go to stderr).",
)
@click.option(
    "--bind-source",
    metavar="ADDR",
    help="The client's address as the server sees it, for doors with Rotating_Bind_Source.",
)
@handle_errors
def sequence(key_path: str, door: str, at: str | None, fmt: str, bind_source: str | None) -> None:
    """Print the knock sequence of DOOR in force now (or at TIME) and the seconds until it changes."""
    key = shared.load(key_path)
    t = time.time() if at is None else parse_time(at)
    if t < 0:
        raise InvalidGrant(f"time {at!r} is before 1970")
    params = key.params
    source = source_bytes(bind_source) if bind_source is not None else None
    window = counter(t, params.interval)
    # The client always knocks with the newest secret; the server still accepts older ones in their grace.
    newest = key.newest
    ports = derive(newest.secret, door, window, params, source)
    left = math.ceil(seconds_left(t, params.interval))
    if fmt == "knock":
        click.echo(" ".join(f"{p.port}:{p.proto}" for p in ports))
        click.echo(f"changes in {left} s", err=True)
        return
    click.echo(f"door {door}, key {newest.key_id}, window {window} ({params.interval} s)")
    click.echo(" ".join(str(p) for p in ports))
    click.echo(f"changes in {left} s (at {format_time((window + 1) * params.interval)})")
