"""Hypothesis strategies shared by the fuzz tests: raw IP packets, built field by field.

Every builder returns the bytes and what was put in them (``Built``), so a
test can compare what the parser read with what was written. Checksums stay
zero: nothing in ``spa.packet`` reads them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

TCP, UDP = 6, 17
HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS, AH = 0, 43, 44, 60, 51
#: How many IPv6 extension headers ``spa.packet`` walks (MAX_IPV6_EXTENSION_HEADERS).
EXT_NAMES = {HOP_BY_HOP: "hop-by-hop", ROUTING: "routing", FRAGMENT: "fragment", DEST_OPTS: "dest-opts", AH: "ah"}


@dataclass(frozen=True)
class Built:
    """One well-formed packet and the values written into it."""

    data: bytes
    version: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: str
    sport: int
    dport: int
    flags: int
    seq: int
    #: The UDP payload (b"" for TCP).
    payload: bytes
    #: Length of the IP packet proper (``data`` may carry link padding after it).
    ip_len: int
    #: Offset of the transport header.
    l4_offset: int
    #: Number of IPv6 extension headers (0 for IPv4).
    ext_count: int = 0


ports = st.integers(0, 65535)
payloads = st.binary(max_size=300)
# Sources a grant can be made for (the parser drops unspecified and multicast sources).
v4_sources = st.integers(1, 0xFFFFFFFF).filter(lambda n: n >> 28 != 0xE).map(ipaddress.IPv4Address)
v4_any = st.integers(0, 0xFFFFFFFF).map(ipaddress.IPv4Address)
v6_any = st.binary(min_size=16, max_size=16).map(ipaddress.IPv6Address)
v6_sources = v6_any.filter(lambda a: not a.is_unspecified and not a.is_multicast
                           and not (a.ipv4_mapped is not None
                                    and (a.ipv4_mapped.is_unspecified or a.ipv4_mapped.is_multicast)))


@st.composite
def tcp_segments(draw):
    """(header bytes, sport, dport, flags, seq): data offset 5-15 words, random options, any flag byte."""
    sport, dport = draw(ports), draw(ports)
    seq = draw(st.integers(0, 0xFFFFFFFF))
    flags = draw(st.integers(0, 255))
    doff = draw(st.integers(5, 15))
    options = draw(st.binary(min_size=(doff - 5) * 4, max_size=(doff - 5) * 4))
    reserved = draw(st.integers(0, 15))  # the low nibble of the data offset byte: NS and reserved bits
    ack, window, urg = draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    data = draw(st.binary(max_size=64))
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff << 4) | reserved, flags, window, 0, urg)
    return header + options + data, sport, dport, flags, seq


@st.composite
def udp_datagrams(draw, payload=payloads):
    """(datagram bytes, sport, dport, payload) with a truthful UDP length."""
    sport, dport, body = draw(ports), draw(ports), draw(payload)
    return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body, sport, dport, body


@st.composite
def transports(draw, payload=payloads, protos=("tcp", "udp")):
    proto = draw(st.sampled_from(protos))
    if proto == "tcp":
        seg, sport, dport, flags, seq = draw(tcp_segments())
        return proto, seg, sport, dport, flags, seq, b""
    dgram, sport, dport, body = draw(udp_datagrams(payload))
    return proto, dgram, sport, dport, 0, 0, body


@st.composite
def ipv4_packets(draw, src=v4_sources, payload=payloads, protos=("tcp", "udp")):
    """A well-formed IPv4 packet: IHL 5-15 with random options, DF/MF with offset 0, maybe link padding."""
    proto, l4, sport, dport, flags, seq, body = draw(transports(payload, protos))
    s, d = draw(src), draw(v4_any)
    ihl = draw(st.integers(5, 15))
    options = draw(st.binary(min_size=(ihl - 5) * 4, max_size=(ihl - 5) * 4))
    frag_flags = draw(st.sampled_from([0, 0x4000, 0x2000, 0x6000, 0x8000]))  # DF, MF, reserved bit: offset 0
    total = ihl * 4 + len(l4)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, draw(st.integers(0, 255)), total, draw(st.integers(0, 0xFFFF)),
                         frag_flags, draw(st.integers(0, 255)), TCP if proto == "tcp" else UDP, 0, s.packed, d.packed)
    padding = draw(st.binary(max_size=32))
    return Built(header + options + l4 + padding, 4, s, d, proto, sport, dport, flags, seq, body, total, ihl * 4)


@st.composite
def ipv6_extension(draw, kind: int, nxt: int) -> bytes:
    if kind in (HOP_BY_HOP, ROUTING, DEST_OPTS):
        units = draw(st.integers(0, 6))
        return bytes([nxt, units]) + draw(st.binary(min_size=8 * (units + 1) - 2, max_size=8 * (units + 1) - 2))
    if kind == FRAGMENT:
        more = draw(st.booleans())  # offset 0: the first fragment, which carries the ports
        return struct.pack("!BBHI", nxt, draw(st.integers(0, 255)), int(more) | draw(st.integers(0, 3)) << 1,
                           draw(st.integers(0, 0xFFFFFFFF)))
    assert kind == AH
    words = draw(st.integers(0, 10))  # payload length in 4-byte words, minus 2
    return bytes([nxt, words]) + draw(st.binary(min_size=(words + 2) * 4 - 2, max_size=(words + 2) * 4 - 2))


@st.composite
def ipv6_packets(draw, src=v6_sources, payload=payloads, protos=("tcp", "udp"), max_ext=10):
    """A well-formed IPv6 packet behind a chain of 0 to ``max_ext`` extension headers, maybe link padding."""
    proto, l4, sport, dport, flags, seq, body = draw(transports(payload, protos))
    kinds = draw(st.lists(st.sampled_from(list(EXT_NAMES)), max_size=max_ext))
    chain = b""
    nxt = TCP if proto == "tcp" else UDP
    for kind in reversed(kinds):
        chain = draw(ipv6_extension(kind, nxt)) + chain
        nxt = kind
    s, d = draw(src), draw(v6_any)
    plen = len(chain) + len(l4)
    if plen > 0xFFFF:
        plen = 0xFFFF  # cannot happen with these sizes; keeps struct.pack honest
    first = (6 << 28) | (draw(st.integers(0, 255)) << 20) | draw(st.integers(0, 0xFFFFF))
    header = struct.pack("!IHBB16s16s", first, plen, nxt, draw(st.integers(0, 255)), s.packed, d.packed)
    padding = draw(st.binary(max_size=32))
    return Built(header + chain + l4 + padding, 6, s, d, proto, sport, dport, flags, seq, body, 40 + plen,
                 40 + len(chain), len(kinds))


def ip_packets(**kw):
    max_ext = kw.pop("max_ext", 10)
    return st.one_of(ipv4_packets(**kw), ipv6_packets(max_ext=max_ext, **kw))


@st.composite
def mutated(draw, base):
    """A packet with random damage: byte flips, truncation, extension, lying length fields."""
    built = draw(base)
    data = bytearray(built.data)
    for _ in range(draw(st.integers(0, 4))):
        how = draw(st.sampled_from(["flip", "set", "truncate", "extend", "total", "ihl", "plen", "udplen", "doff",
                                    "nexthdr", "fragment"]))
        if how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif how == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
        elif how == "total" and len(data) >= 4:
            struct.pack_into("!H", data, 2, draw(st.integers(0, 0xFFFF)))
        elif how == "ihl" and data:
            data[0] = (data[0] & 0xF0) | draw(st.integers(0, 15))
        elif how == "plen" and len(data) >= 6:
            struct.pack_into("!H", data, 4, draw(st.integers(0, 0xFFFF)))
        elif how == "udplen" and len(data) >= built.l4_offset + 6:
            struct.pack_into("!H", data, built.l4_offset + 4, draw(st.integers(0, 0xFFFF)))
        elif how == "doff" and len(data) >= built.l4_offset + 13:
            data[built.l4_offset + 12] = draw(st.integers(0, 255))
        elif how == "nexthdr" and len(data) >= 10:
            data[9 if built.version == 4 else 6] = draw(st.integers(0, 255))
        elif how == "fragment" and len(data) >= 8:
            struct.pack_into("!H", data, 6, draw(st.integers(0, 0xFFFF)))
    return bytes(data)
