"""Hand-built raw IP packets (from the network header on) for the parser and filter tests.

Checksums are left zero: neither ``spa.packet`` nor a BPF filter reads them.
"""

from __future__ import annotations

import ipaddress
import struct

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
HOP_BY_HOP, ROUTING, FRAGMENT, ESP, AH, NO_NEXT, DEST_OPTS = 0, 43, 44, 50, 51, 59, 60
SYN, ACK = 0x02, 0x10


def tcp(sport: int = 40000, dport: int = 7000, flags: int = SYN, seq: int = 1, doff: int = 5,
        payload: bytes = b"") -> bytes:
    options = b"\x01" * max(0, (doff - 5) * 4)  # NOPs
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, doff << 4, flags, 65535, 0, 0) + options + payload


def udp(sport: int = 40000, dport: int = 7000, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(proto: int, l4: bytes, src: str = "192.0.2.2", dst: str = "192.0.2.1", *, ihl: int = 5,
         frag: int = 0, total: int | None = None, version: int = 4) -> bytes:
    options = b"\x01" * max(0, (ihl - 5) * 4)
    length = 20 + len(options) + len(l4) if total is None else total
    header = struct.pack(
        "!BBHHHBBH4s4s", (version << 4) | ihl, 0, length, 0x1234, frag, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + options + l4


def ipv6(nh: int, payload: bytes, src: str = "2001:db8::2", dst: str = "2001:db8::1", *,
         plen: int | None = None) -> bytes:
    length = len(payload) if plen is None else plen
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, length, nh, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


def ext(nh: int, units: int = 0) -> bytes:
    """A hop-by-hop, routing or destination options header: (units + 1) * 8 bytes."""
    body = 8 * (units + 1) - 2
    return struct.pack("!BB", nh, units) + b"\x01\x00" + b"\x00" * (body - 2)


def frag6(nh: int, offset: int = 0, more: bool = False) -> bytes:
    """An IPv6 fragment header; ``offset`` in 8-byte units."""
    return struct.pack("!BBHI", nh, 0, (offset << 3) | int(more), 0xCAFE)


def ah(nh: int, words: int = 4) -> bytes:
    """An authentication header of (words + 2) * 4 bytes (words=4 is HMAC-96: 24 bytes)."""
    return struct.pack("!BBHII", nh, words, 0, 0x100, 1) + b"\xaa" * ((words + 2) * 4 - 12)
