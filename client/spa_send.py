"""Sending one SPA packet: ``knock-client --key KEY HOST DOOR``.

The server never answers (it has no socket to answer from), so success is
seen by connecting to the opened port afterwards; ``-v`` says what was sent.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable

from spa import protocol
from spa.client.knock import KnockError, resolve
from spa.errors import InvalidGrant
from spa.grant import Address, parse_address
from spa.keys import ed25519, trust
from spa.keytext import PublicKey

DEFAULT_PORT = 62201


def route_source(family: int, sockaddr: tuple, port: int) -> Address:
    """The source address this host would use to reach ``sockaddr``: a UDP connect sends nothing."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((sockaddr[0], port, *sockaddr[2:]))
        except OSError as exc:
            raise KnockError(f"no route to {sockaddr[0]}: {exc.strerror or exc}") from None
        return parse_address(s.getsockname()[0])


def server_key(host: str, server_key_file: str | None, known_servers: str | None = None) -> PublicKey:
    if server_key_file is not None:
        return ed25519.load_public(server_key_file)
    return trust.lookup(host, known_servers)


def send_spa(
    host: str,
    door: str,
    key_path: str,
    *,
    server_key_file: str | None = None,
    allow_ip: str | None = None,
    port: int = DEFAULT_PORT,
    duration: int = 0,
    family: int = socket.AF_UNSPEC,
    known_servers: str | None = None,
    verbose: Callable[[str], None] | None = None,
) -> bytes:
    """Build and send one SPA packet; returns it (for tests and ``-v``)."""
    pair = ed25519.load(key_path)
    server = server_key(host, server_key_file, known_servers)
    fam, sockaddr = resolve(host, family)
    if allow_ip is None:
        address = route_source(fam, sockaddr, port)
    else:
        address = parse_address(allow_ip)
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local and allow_ip is None:
        raise InvalidGrant(f"the route to {host} uses the link-local address {address}; give --allow-ip")
    try:
        packet = protocol.build(pair.private.seed, server.public, door, address, duration,
                                time_ms=int(time.time() * 1000))
    except ValueError as exc:
        raise InvalidGrant(str(exc)) from None
    packets = [(pair, packet)]
    # During a rotation (``spa keygen --rotate`` left PATH.old) the server may
    # list only the old key or only the new one: send one packet with each,
    # so there is no moment at which the client is locked out. A server that
    # knows both opens once (the second grant only extends the first).
    if os.path.exists(f"{key_path}.old"):
        old = ed25519.load(f"{key_path}.old")
        packets.append((old, protocol.build(old.private.seed, server.public, door, address, duration,
                                            time_ms=int(time.time() * 1000))))
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            for p, data in packets:
                if verbose is not None:
                    verbose(f"SPA for door {door!r}, opening for {address}, key {p.key_id}"
                            f"{' (old key, rotation in progress)' if p is not pair else ''}, "
                            f"to udp {sockaddr[0]}:{port} (server key {server.key_id})")
                s.sendto(data, (sockaddr[0], port, *sockaddr[2:]))
    except OSError as exc:
        raise KnockError(f"cannot send to udp {sockaddr[0]}:{port}: {exc.strerror or exc}") from None
    return packet
