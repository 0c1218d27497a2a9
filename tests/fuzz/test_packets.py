"""``spa.packet``: raw IPv4/IPv6 headers in, a ``Knock`` (or an SPA payload) out, nothing ever raised.

Packets are built field by field (``strategies``), so for well-formed input
the test knows what the parser must read; then they are damaged (bit flips,
truncation at every length, extension, lying length fields) and the parser
must still only return ``None`` or a ``Knock``.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, strategies as st

from spa.knock import Knock
from spa.packet import MAX_IPV6_EXTENSION_HEADERS, parse_ip, udp_payload

from . import strategies as S


def _check_knock(k, built: S.Built) -> None:
    assert k == Knock(built.src, built.dst, built.proto, built.sport, built.dport, built.flags, built.seq, 2.5)


@given(S.ipv4_packets())
def test_ipv4_fields_agree_with_what_was_built(built):
    _check_knock(parse_ip(built.data, 2.5), built)


@given(S.ipv6_packets())
def test_ipv6_extension_chains(built):
    k = parse_ip(built.data, 2.5)
    if built.ext_count <= MAX_IPV6_EXTENSION_HEADERS:
        _check_knock(k, built)
    else:
        assert k is None  # longer chains are not walked (no knock has them)


@given(S.ip_packets(protos=("udp",), max_ext=MAX_IPV6_EXTENSION_HEADERS))
def test_udp_payload_is_exactly_the_payload(built):
    assert udp_payload(built.data) == built.payload
    assert udp_payload(memoryview(built.data)) == built.payload


@given(S.ip_packets(protos=("tcp",), max_ext=MAX_IPV6_EXTENSION_HEADERS))
def test_udp_payload_of_tcp_is_none(built):
    assert udp_payload(built.data) is None


@given(S.ip_packets(max_ext=MAX_IPV6_EXTENSION_HEADERS))
def test_truncation_at_every_length(built):
    """Every strict prefix of the IP packet proper is None; with any of the link padding it still parses."""
    for n in range(len(built.data) + 1):
        prefix = built.data[:n]
        k = parse_ip(prefix, 2.5)
        p = udp_payload(prefix)
        if n < built.ip_len:
            assert k is None and p is None, n
        else:
            _check_knock(k, built)
            assert p == (built.payload if built.proto == "udp" else None)


@given(S.mutated(S.ip_packets()))
def test_damaged_packets_never_raise(data):
    for view in (data, memoryview(data), bytearray(data)):
        k = parse_ip(view, 1.0)
        p = udp_payload(view)
        if k is not None:
            assert isinstance(k, Knock) and k.proto in ("tcp", "udp")
            assert 0 <= k.sport <= 65535 and 0 <= k.dport <= 65535 and 0 <= k.flags <= 255
            assert k.src.version == k.dst.version == data[0] >> 4
            assert not k.src.is_unspecified and not k.src.is_multicast
            if k.proto == "udp":
                assert k.flags == 0 and k.seq == 0
        if p is not None:
            # A payload is only ever found where a UDP knock is, and lies inside the buffer.
            assert k is not None and k.proto == "udp" and len(p) <= len(data) - 28


@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    k = parse_ip(data, 0.0)
    assert k is None or isinstance(k, Knock)
    p = udp_payload(data)
    assert p is None or isinstance(p, bytes)


@given(st.integers(0, 255), st.binary(max_size=120))
def test_arbitrary_bytes_with_ip_version_nibble(low, rest):
    for version in (4, 6):
        data = bytes([(version << 4) | (low & 15)]) + rest
        k = parse_ip(data, 0.0)
        assert k is None or k.src.version == version
        udp_payload(data)


@given(S.ipv4_packets(), S.ipv4_packets(), st.integers(0, 0xFFFF))
def test_lying_total_length(a, b, total):
    """IPv4: the total length bounds the packet; one that overruns the buffer or undercuts the header is None."""
    data = bytearray(a.data)
    struct.pack_into("!H", data, 2, total)
    ihl = (data[0] & 15) * 4
    k = parse_ip(bytes(data), 2.5)
    if total > len(data) or total < ihl:
        assert k is None
    elif total >= a.ip_len:
        _check_knock(k, a)  # the extra bytes are link padding
    p = udp_payload(bytes(data))
    if p is not None:
        assert len(p) <= total - ihl - 8


ETHERTYPES = st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00"])


@given(S.ip_packets(), st.binary(min_size=12, max_size=12), ETHERTYPES, st.sampled_from([None, 0x45, 0x60, 0x4F]))
def test_ethernet_framed_buffer_is_not_misparsed(built, macs, ethertype, first):
    """A buffer that still carries its 14-byte Ethernet header is read as IP from byte 0, never searched.

    The property, precisely: ``parse_ip(frame)`` is ``None`` unless the frame's
    first byte (the destination MAC's first octet) has version nibble 4 or 6;
    when it does return a knock, every field was read at IP offsets of the
    frame itself (for IPv4: source = frame[12:16], which is the EtherType and
    the inner packet's first two bytes), so it is the inner packet's knock
    only by coincidence, never by the parser finding it.
    """
    macs = bytearray(macs)
    if first is not None:
        macs[0] = first  # a MAC that happens to start like an IP header
    frame = bytes(macs) + ethertype + built.data
    k = parse_ip(frame, 2.5)
    p = udp_payload(frame)
    if frame[0] >> 4 not in (4, 6):
        assert k is None and p is None
    if k is not None:
        if frame[0] >> 4 == 4:
            assert k.src == ipaddress.IPv4Address(frame[12:16]) and k.dst == ipaddress.IPv4Address(frame[16:20])
            assert k.src.packed[:2] == ethertype
        else:
            assert k.src == ipaddress.IPv6Address(frame[8:24]) and k.dst == ipaddress.IPv6Address(frame[24:40])
    # Stripping the link header, as SOCK_DGRAM does, gives the real knock back.
    k = parse_ip(frame[14:], 2.5)
    if built.ext_count <= MAX_IPV6_EXTENSION_HEADERS:
        _check_knock(k, built)


@given(st.sampled_from(["0.0.0.0", "224.0.0.1", "239.1.2.3", "::", "ff02::1", "::ffff:0.0.0.0", "::ffff:224.0.0.5"]),
       st.data())
def test_unusable_sources_are_never_knocks(src, data):
    """Regression: such a knock reached the grant step and raised on the capture loop (docs/fuzzing.md)."""
    addr = ipaddress.ip_address(src)
    base = S.ipv4_packets(src=st.just(addr)) if addr.version == 4 else S.ipv6_packets(src=st.just(addr))
    built = data.draw(base)
    assert parse_ip(built.data, 0.0) is None
