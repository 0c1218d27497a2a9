"""Static knocks on the wire, as knockd's ``knock`` client sends them.

A TCP knock is a non-blocking connect closed at once: exactly one SYN,
never retransmitted. A UDP knock is one 1-byte datagram. Only the standard
library is used, so the client starts fast.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spa.errors import InvalidGrant, SpaError
from spa.grant import Proto


class KnockError(SpaError):
    """A knock could not be sent (resolution or socket error)."""


@dataclass(frozen=True, slots=True)
class KnockTarget:
    port: int
    proto: Proto


def parse_target(text: str, force_udp: bool = False, lookup: Callable[[str, str], int] = socket.getservbyname) -> KnockTarget:
    """``PORT[:PROTO]`` as knock reads it: ``:udp`` means UDP, any other suffix TCP; service names allowed."""
    port_text, _, proto_text = text.partition(":")
    proto: Proto = "udp" if force_udp or proto_text.lower() == "udp" else "tcp"
    port_text = port_text.strip()
    if port_text.isdigit():
        port = int(port_text)
    else:
        try:
            port = lookup(port_text, proto)
        except OSError:
            raise InvalidGrant(f"unknown service {port_text!r} for {proto}") from None
    if not 1 <= port <= 65535:
        raise InvalidGrant(f"port {port} is out of range (1-65535)")
    return KnockTarget(port, proto)


def resolve(host: str, family: int = socket.AF_UNSPEC) -> tuple[int, tuple]:
    """(family, socket address) of ``host``: the first answer, as knock takes it.

    The socket address keeps an IPv6 zone (``fe80::1%eth0``), which a
    link-local knock needs.
    """
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise KnockError(f"cannot resolve {host!r}: {exc.strerror}") from None
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


def send_knock(family: int, sockaddr: tuple, target: KnockTarget) -> None:
    dest = (sockaddr[0], target.port, *sockaddr[2:])
    try:
        if target.proto == "udp":
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.sendto(b"\0", dest)
            return
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            err = s.connect_ex(dest)
            if err not in (0, errno.EINPROGRESS, errno.ECONNREFUSED):
                raise OSError(err, errno.errorcode.get(err, str(err)))
    except OSError as exc:
        raise KnockError(f"cannot knock {target.proto} {sockaddr[0]}:{target.port}: {exc.strerror or exc}") from None


def knock(
    host: str,
    targets: Sequence[KnockTarget],
    *,
    family: int = socket.AF_UNSPEC,
    delay_ms: int = 0,
    verbose: Callable[[str], None] | None = None,
) -> None:
    """Knock every target in order; the host is resolved once per knock, as knock does."""
    for t in targets:
        fam, sockaddr = resolve(host, family)
        if verbose is not None:
            verbose(f"hitting {t.proto} {sockaddr[0]}:{t.port}")
        send_knock(fam, sockaddr, t)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000.0)
