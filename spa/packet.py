"""Raw IP headers to a knock: the capture's hot path, pure and allocation-light.

Input starts at the network header: the capture reads AF_PACKET
``SOCK_DGRAM`` sockets, which strip the link layer on every link type.
``fields`` gives the numbers the capture loop matches on (no object built);
``parse_ip`` wraps them in a ``Knock`` with address objects. Anything that is
not a TCP or UDP packet we can read completely, is truncated (unless the
capture says so: ``Truncated``), is malformed, or is a non-first fragment
gives ``None``; no input makes either raise.

A packet whose source is unspecified (``0.0.0.0``, ``::``) or multicast
(also as an IPv4-mapped IPv6 address) gives ``None`` too: no grant can ever
be made for such a source (``spa.grant.parse_address`` refuses it), so it
is never a knock, and letting it reach the matcher would make the grant
step raise on the capture loop (found by tests/fuzz).
"""

from __future__ import annotations

import struct

from spa.knock import V6_KEY, Knock, address

__all__ = ["fields", "parse_ip", "udp_payload", "Truncated", "MAX_IPV6_EXTENSION_HEADERS"]

#: IPv6 extension headers walked before giving up (a knock has none in practice).
MAX_IPV6_EXTENSION_HEADERS = 8

_TCP, _UDP = 6, 17
# IPv6 next-header values.
_HOP_BY_HOP, _ROUTING, _FRAGMENT, _DEST_OPTS, _AH = 0, 43, 44, 60, 51
_EXT_GENERIC = frozenset((_HOP_BY_HOP, _ROUTING, _DEST_OPTS))

# version/IHL, (tos), total length, (id), flags/fragment offset, (ttl), protocol, (checksum), src, dst
_IP4 = struct.Struct("!BxH2xHxB2xII")
# (version/class/flow), payload length, next header, (hop limit), src, dst
_IP6 = struct.Struct("!4xHBx16s16s")
# sport, dport, seq, (ack), data offset, flags
_TCP_HDR = struct.Struct("!HHI4xBB")
_TCP_MIN = 20
_UDP_HDR = struct.Struct("!HH")
_UDP_LEN = struct.Struct("!H")
_UDP_MIN = 8
_FRAG_OFFSET = struct.Struct("!H")
_ZERO6 = bytes(16)
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"

_V4_NO_OPTIONS = 0x45


class Truncated(bytes):
    """A packet the capture cut short (a ring frame holds a few hundred bytes): ``wire_len`` is its real length.

    Its headers are still read (a knock's ports are in the first bytes); a
    payload that did not fit (an SPA datagram) is refused.
    """

    wire_len: int

    def __new__(cls, data: bytes, wire_len: int) -> Truncated:
        obj = super().__new__(cls, data)
        obj.wire_len = wire_len
        return obj


def _locate(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int | bytes, int | bytes] | None:
    """(version, protocol, transport offset, end, src, dst) of a TCP/UDP packet we can read, else None.

    ``end`` is where the packet's bytes end: its length field, or the captured
    length of a ``Truncated`` one, whichever is shorter.
    """
    n = len(data)
    if n < 20:
        return None
    wire = data.wire_len if type(data) is Truncated else n
    version = data[0] >> 4
    if version == 4:
        vihl, total, frag, proto, src, dst = _IP4.unpack_from(data)
        ihl = (vihl & 0x0F) << 2
        # The total length bounds the packet: bytes past it are link padding.
        if ihl < 20 or total < ihl or total > wire or frag & 0x1FFF:
            return None
        off, end = ihl, min(total, n)
    elif version == 6:
        if n < 40:
            return None
        plen, proto, src6, dst6 = _IP6.unpack_from(data)
        end = 40 + plen
        # A zero payload length is a jumbogram (or garbage): never a knock.
        if plen == 0 or end > wire:
            return None
        end = min(end, n)
        off = 40
        for _ in range(MAX_IPV6_EXTENSION_HEADERS):
            if proto == _TCP or proto == _UDP:
                break
            if off + 8 > end:  # every extension header is at least 8 bytes
                return None
            if proto in _EXT_GENERIC:
                nxt = data[off]
                off += (data[off + 1] + 1) << 3
            elif proto == _FRAGMENT:
                if _FRAG_OFFSET.unpack_from(data, off + 2)[0] & 0xFFF8:
                    return None
                nxt = data[off]
                off += 8
            elif proto == _AH:
                nxt = data[off]
                off += (data[off + 1] + 2) << 2
            else:  # ESP (50), no next header (59), ICMPv6, anything else
                return None
            proto = nxt
        else:
            if proto != _TCP and proto != _UDP:
                return None
        src, dst = src6, dst6
    else:
        return None
    return version, proto, off, end, src, dst


def _unusable_source(version: int, src: int | bytes) -> bool:
    """An unspecified or multicast source (IPv4-mapped too): never a knocker, no grant possible."""
    if version == 4:
        return src == 0 or src >> 28 == 0xE  # type: ignore[operator]
    if src[0] == 0xFF or src == _ZERO6:
        return True
    return src[:12] == _MAPPED_PREFIX and (src[12:] == b"\0\0\0\0" or src[12] >> 4 == 0xE)  # type: ignore[index]


def udp_payload(data: bytes | bytearray | memoryview) -> bytes | None:
    """The payload of a UDP datagram (an SPA packet), bounded by the UDP length; None if not one."""
    if len(data) >= 28 and data[0] == _V4_NO_OPTIONS:
        # IPv4 without options in one go (a flood on the SPA port is mostly that); the rest below.
        _, total, frag, proto, _, _ = _IP4.unpack_from(data)
        if proto == _UDP and 28 <= total <= len(data) and not frag & 0x1FFF:
            length = _UDP_LEN.unpack_from(data, 24)[0]
            if _UDP_MIN <= length <= total - 20:
                return bytes(data[28:20 + length])
            return None
    found = _locate(data)
    if found is None or found[1] != _UDP:
        return None
    _, _, off, end, _, _ = found
    if off + _UDP_MIN > end:
        return None
    length = _UDP_LEN.unpack_from(data, off + 4)[0]
    if length < _UDP_MIN or off + length > end:
        return None
    return bytes(data[off + _UDP_MIN : off + length])


def fields(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int, int, int] | None:
    """``(protocol, source key, destination key, sport, dport, TCP flags, TCP seq)``, or ``None``.

    The capture loop's parse: numbers only, no address object (keys as
    ``spa.knock.key_of`` makes them). The protocol is 6 (TCP) or 17 (UDP).
    """
    if len(data) >= 28 and data[0] == _V4_NO_OPTIONS:
        # The common case, IPv4 without options, in one go; anything odd takes the general path.
        _, total, frag, proto, src, dst = _IP4.unpack_from(data)
        if proto == _TCP and 40 <= total <= len(data) and not frag & 0x1FFF and src and src >> 28 != 0xE:
            sport, dport, seq, doff, flags = _TCP_HDR.unpack_from(data, 20)
            if doff >= 0x50:
                return _TCP, src, dst, sport, dport, flags, seq
            return None
        if proto == _UDP and 28 <= total <= len(data) and not frag & 0x1FFF and src and src >> 28 != 0xE:
            sport, dport = _UDP_HDR.unpack_from(data, 20)
            return _UDP, src, dst, sport, dport, 0, 0
    found = _locate(data)
    if found is None:
        return None
    version, proto, off, end, src, dst = found
    if _unusable_source(version, src):
        return None
    if proto == _TCP:
        if off + _TCP_MIN > end:
            return None
        sport, dport, seq, doff, flags = _TCP_HDR.unpack_from(data, off)
        if doff < 0x50:  # data offset (high nibble) below 5 words
            return None
    elif proto == _UDP:
        if off + _UDP_MIN > end:
            return None
        sport, dport = _UDP_HDR.unpack_from(data, off)
        flags = seq = 0
    else:
        return None
    if version == 6:
        skey = int.from_bytes(src, "big") | V6_KEY  # type: ignore[arg-type]
        return proto, skey, int.from_bytes(dst, "big") | V6_KEY, sport, dport, flags, seq  # type: ignore[arg-type]
    return proto, src, dst, sport, dport, flags, seq  # type: ignore[return-value]


_PROTO_NAMES = {_TCP: "tcp", _UDP: "udp"}


def parse_ip(data: bytes | bytearray | memoryview, time: float) -> Knock | None:
    """The ``Knock`` in one raw IPv4 or IPv6 packet, or ``None``."""
    f = fields(data)
    if f is None:
        return None
    proto, skey, dkey, sport, dport, flags, seq = f
    return Knock(address(skey), address(dkey), _PROTO_NAMES[proto], sport, dport, flags, seq, time)
