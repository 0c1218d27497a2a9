"""Raw TCP knocks with chosen flags: ``knock-client --tcpflags fin,urg``.

knockd doors can demand TCP flags (``tcpflags = fin,!ack``) that no
``connect()`` will ever send; this module builds one IP/TCP packet per TCP
knock with exactly the requested flags set and sends it with scapy. UDP
knocks stay plain datagrams (``spa.client.knock.send_knock``).

The cli imports this module only when ``--tcpflags`` is given, and this
module imports scapy only when a raw packet is about to be sent, after the
flags, the targets and root have been checked: ``import scapy`` costs
hundreds of milliseconds, a usage error should not. Only the submodules
needed are imported (``scapy.layers.inet``, ``scapy.layers.inet6``,
``scapy.sendrecv``), not ``scapy.all``, which costs about three times as
much. scapy reads the kernel's routing tables (``conf.route``,
``conf.route6``) when it is imported, so the import happens in the
process's own network namespace, which is what a client started by
``ip netns exec`` wants.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import time
from collections.abc import Callable, Sequence

from spa.client.knock import KnockError, KnockTarget, resolve, send_knock
from spa.knock import FLAG_BITS

ROOT_NEEDED = "--tcpflags needs root (raw sockets)"

#: Linux's default ``net.ipv4.ip_local_port_range``, used when it cannot be read.
_DEFAULT_EPHEMERAL = (32768, 60999)


def parse_flags(text: str) -> int:
    """The flags to set, as knockd names them: ``fin,urg`` -> 0x21.

    Comma separated, spaces allowed around names, case-insensitive, repeats
    harmless. No ``!``: these are the flags the packet carries, not a filter.
    Raises ``ValueError`` with a message fit for a usage error.
    """
    names = ", ".join(FLAG_BITS)
    if not text.strip():
        raise ValueError(f"needs at least one TCP flag ({names})")
    bits = 0
    for item in text.split(","):
        word = item.strip()
        if not word:
            raise ValueError(f"empty entry in {text!r} (a comma too many)")
        if word.startswith("!"):
            raise ValueError(f"{word!r}: no '!' here, list the flags to set ({names})")
        bit = FLAG_BITS.get(word.lower())
        if bit is None:
            raise ValueError(f"unknown TCP flag {word!r} (known: {names})")
        bits |= bit
    return bits


def flag_names(bits: int) -> str:
    """``0x21`` -> ``fin,urg`` (knockd's order: fin, syn, rst, psh, ack, urg)."""
    return ",".join(name for name, bit in FLAG_BITS.items() if bits & bit)


def require_root() -> None:
    if os.geteuid() != 0:
        raise KnockError(ROOT_NEEDED)


def ephemeral_port(rng: random.Random) -> int:
    """A random source port from the kernel's ephemeral range, as a connect() would get."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        if not 1 <= low <= high <= 65535:
            raise ValueError
    except (OSError, ValueError):
        low, high = _DEFAULT_EPHEMERAL
    return rng.randint(low, high)


class _Sender:
    """scapy, imported on first use, and one layer-3 socket per (interface, family), reused for every knock.

    ``scapy.sendrecv.send`` opens and closes a socket per call when it is not
    given one; binding that packet socket costs ~15 ms, so reusing it keeps
    knocks as close together as ``--delay`` asks.
    """

    def __init__(self) -> None:
        from scapy.base_classes import ScopedIP
        from scapy.interfaces import resolve_iface
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6
        from scapy.sendrecv import send

        self._ip, self._ipv6, self._tcp, self._send = IP, IPv6, TCP, send
        self._scoped, self._resolve_iface = ScopedIP, resolve_iface
        self._sockets: dict[tuple[str, bool], object] = {}

    def send(self, family: int, address: str, dport: int, flags: int, sport: int, seq: int, scope_id: int = 0) -> None:
        ipv6 = family == socket.AF_INET6
        if ipv6:
            # A link-local address needs its zone (fe80::1%eth0) to be routed and resolved on the right link.
            l3 = self._ipv6(dst=self._scoped(address, scope=scope_id or None))
        else:
            l3 = self._ip(dst=address)
        pkt = l3 / self._tcp(sport=sport, dport=dport, flags=flags, seq=seq)
        iface, src, _gateway = pkt.route()  # scapy's copy of the kernel's routing table
        if not iface or src in (None, "0.0.0.0", "::"):
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        key = (str(iface), ipv6)
        sock = self._sockets.get(key)
        if sock is None:
            # The socket class send() itself would pick (raw IP sockets on loopback).
            dev = self._resolve_iface(iface)
            sock = self._sockets[key] = dev.l3socket(ipv6)(iface=dev)
        self._send(pkt, socket=sock, verbose=False)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()  # type: ignore[attr-defined]
        self._sockets.clear()


def knock_raw(
    host: str,
    targets: Sequence[KnockTarget],
    flags: int,
    *,
    family: int = socket.AF_UNSPEC,
    delay_ms: int = 0,
    verbose: Callable[[str], None] | None = None,
    rng: random.Random | None = None,
) -> None:
    """Knock every target in order, TCP knocks as one raw packet with exactly ``flags`` set.

    As ``spa.client.knock.knock``: the host is resolved once per knock, each
    knock is sent once (no retransmission), ``delay_ms`` after each one.
    """
    rng = rng or random.SystemRandom()
    if any(t.proto == "tcp" for t in targets):
        require_root()
    names = flag_names(flags)
    sender: _Sender | None = None
    try:
        for t in targets:
            fam, sockaddr = resolve(host, family)
            # The socket address keeps an IPv6 zone (fe80::1%eth0) as its scope id.
            addr = sockaddr[0]
            scope_id = sockaddr[3] if len(sockaddr) == 4 else 0
            if verbose is not None:
                suffix = f" ({names})" if t.proto == "tcp" else ""
                verbose(f"hitting {t.proto} {addr}:{t.port}{suffix}")
            if t.proto == "udp":
                send_knock(fam, sockaddr, t)
            else:
                if sender is None:
                    sender = _Sender()
                try:
                    sender.send(fam, addr, t.port, flags, ephemeral_port(rng), rng.getrandbits(32), scope_id)
                except PermissionError:
                    raise KnockError(ROOT_NEEDED) from None
                except OSError as exc:
                    raise KnockError(f"cannot knock tcp {addr}:{t.port}: {exc.strerror or exc}") from None
            if delay_ms > 0:
                time.sleep(delay_ms / 1000.0)
    finally:
        if sender is not None:
            sender.close()
