"""spa.packet.parse_ip: raw IPv4/IPv6 headers to a Knock, and never an exception."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from spa.knock import Knock
from spa.packet import MAX_IPV6_EXTENSION_HEADERS, parse_ip
from tests.rawip import (
    ACK, AH, DEST_OPTS, ESP, FRAGMENT, HOP_BY_HOP, ICMP, ICMP6, NO_NEXT, ROUTING, SYN, TCP, UDP,
    ah, ext, frag6, ipv4, ipv6, tcp, udp,
)

V4C, V4S = ipaddress.IPv4Address("192.0.2.2"), ipaddress.IPv4Address("192.0.2.1")
V6C, V6S = ipaddress.IPv6Address("2001:db8::2"), ipaddress.IPv6Address("2001:db8::1")


# -- IPv4 ---------------------------------------------------------------------

def test_ipv4_tcp():
    pkt = ipv4(TCP, tcp(40001, 7000, SYN | ACK, seq=0xDEADBEEF))
    assert parse_ip(pkt, 12.5) == Knock(V4C, V4S, "tcp", 40001, 7000, SYN | ACK, 0xDEADBEEF, 12.5)


def test_ipv4_udp():
    assert parse_ip(ipv4(UDP, udp(5353, 9000, b"hello")), 1.0) == Knock(V4C, V4S, "udp", 5353, 9000, 0, 0, 1.0)


def test_ipv4_addresses_are_ipaddress_objects():
    k = parse_ip(ipv4(UDP, udp(), src="203.0.113.9", dst="198.51.100.7"), 0.0)
    assert k.src == ipaddress.ip_address("203.0.113.9") and type(k.src) is ipaddress.IPv4Address
    assert k.dst == ipaddress.ip_address("198.51.100.7")
    # Hashable and equal to what the config side builds, so dict look-ups work.
    assert {k.src: 1}[ipaddress.ip_address("203.0.113.9")] == 1


def test_ipv4_options_move_the_transport_header():
    k = parse_ip(ipv4(TCP, tcp(1, 2), ihl=7), 0.0)
    assert (k.sport, k.dport) == (1, 2)


def test_ipv4_tcp_options_are_fine():
    assert parse_ip(ipv4(TCP, tcp(1, 2, doff=10)), 0.0).dport == 2


def test_ipv4_trailing_link_padding_is_ignored():
    # A 28-byte UDP packet padded to Ethernet's 46-byte minimum payload.
    pkt = ipv4(UDP, udp(1, 9000)) + b"\xff" * 18
    assert parse_ip(pkt, 0.0).dport == 9000


def test_ipv4_total_length_bounds_the_transport_header():
    # The padding would complete the TCP header, but the IP length says it ends early.
    pkt = ipv4(TCP, tcp(1, 7000), total=20 + 12) + b"\x00" * 20
    assert parse_ip(pkt, 0.0) is None


@pytest.mark.parametrize("total", [0, 19, 24, 41, 65535])
def test_ipv4_bad_total_length(total):
    # A 44-byte packet (24-byte IP header): total below the header, cutting TCP short, or beyond the buffer.
    assert parse_ip(ipv4(TCP, tcp(), ihl=6, total=total), 0.0) is None


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_ihl_below_5(ihl):
    pkt = bytearray(ipv4(TCP, tcp()))
    pkt[0] = 0x40 | ihl
    assert parse_ip(bytes(pkt), 0.0) is None


def test_ipv4_ihl_past_total_length():
    pkt = bytearray(ipv4(UDP, udp()))  # 28 bytes
    pkt[0] = 0x4F  # 60-byte header
    assert parse_ip(bytes(pkt) + b"\x00" * 40, 0.0) is None


def test_ipv4_first_fragment_is_read_later_ones_dropped():
    more_fragments = 0x2000
    assert parse_ip(ipv4(TCP, tcp(), frag=more_fragments), 0.0) is not None
    assert parse_ip(ipv4(TCP, tcp(), frag=0x4000), 0.0) is not None  # don't-fragment
    for offset in (1, 185, 0x1FFF):
        assert parse_ip(ipv4(TCP, tcp(), frag=offset), 0.0) is None
        assert parse_ip(ipv4(TCP, tcp(), frag=more_fragments | offset), 0.0) is None


@pytest.mark.parametrize("doff", [0, 1, 4])
def test_tcp_data_offset_below_5(doff):
    pkt = bytearray(ipv4(TCP, tcp()))
    pkt[20 + 12] = doff << 4
    assert parse_ip(bytes(pkt), 0.0) is None


def test_short_transport_headers():
    assert parse_ip(ipv4(TCP, tcp()[:19]), 0.0) is None
    assert parse_ip(ipv4(TCP, tcp()[:20]), 0.0) is not None
    assert parse_ip(ipv4(UDP, udp()[:7]), 0.0) is None
    assert parse_ip(ipv4(UDP, udp()[:8]), 0.0) is not None


def test_other_protocols_and_versions():
    assert parse_ip(ipv4(ICMP, b"\x08\x00" + b"\x00" * 30), 0.0) is None
    assert parse_ip(ipv4(TCP, tcp(), version=5), 0.0) is None
    assert parse_ip(b"", 0.0) is None
    assert parse_ip(b"\x45", 0.0) is None
    assert parse_ip(b"\x00" * 64, 0.0) is None


def test_memoryview_and_bytearray_input():
    pkt = ipv4(TCP, tcp(1, 7000))
    buf = bytearray(2048)
    buf[: len(pkt)] = pkt
    assert parse_ip(memoryview(buf)[: len(pkt)], 3.0) == parse_ip(pkt, 3.0)
    assert parse_ip(bytearray(pkt), 3.0) == parse_ip(pkt, 3.0)
    # A receive buffer longer than the packet: the IP length decides.
    assert parse_ip(memoryview(buf), 3.0) == parse_ip(pkt, 3.0)


# -- IPv6 ---------------------------------------------------------------------

def test_ipv6_tcp_and_udp():
    assert parse_ip(ipv6(TCP, tcp(40001, 7000, SYN, seq=7)), 2.0) == Knock(V6C, V6S, "tcp", 40001, 7000, SYN, 7, 2.0)
    assert parse_ip(ipv6(UDP, udp(1, 9000)), 2.0) == Knock(V6C, V6S, "udp", 1, 9000, 0, 0, 2.0)


def test_ipv6_addresses_have_no_zone():
    k = parse_ip(ipv6(UDP, udp(), src="fe80::2", dst="fe80::1"), 0.0)
    assert type(k.dst) is ipaddress.IPv6Address and k.dst.scope_id is None
    assert str(k.src) == "fe80::2"


def test_ipv6_extension_headers_are_walked():
    chain = ext(ROUTING) + ext(FRAGMENT, 2) + frag6(DEST_OPTS, 0, more=True) + ext(AH, 1) + ah(TCP) + tcp(5, 7000)
    k = parse_ip(ipv6(HOP_BY_HOP, chain), 0.0)
    assert (k.proto, k.sport, k.dport) == ("tcp", 5, 7000)


@pytest.mark.parametrize("nh,header", [
    (HOP_BY_HOP, ext(UDP)), (ROUTING, ext(UDP, 3)), (DEST_OPTS, ext(UDP, 255)),
    (FRAGMENT, frag6(UDP)), (AH, ah(UDP)), (AH, ah(UDP, 1)),
])
def test_ipv6_each_extension_header(nh, header):
    assert parse_ip(ipv6(nh, header + udp(1, 9000)), 0.0).dport == 9000


def test_ipv6_later_fragments_dropped():
    assert parse_ip(ipv6(FRAGMENT, frag6(TCP, 1) + tcp()), 0.0) is None
    assert parse_ip(ipv6(FRAGMENT, frag6(TCP, 8191, more=True) + tcp()), 0.0) is None


@pytest.mark.parametrize("nh", [ESP, NO_NEXT, ICMP6, 4, 41, 135, 253])
def test_ipv6_not_tcp_or_udp(nh):
    assert parse_ip(ipv6(nh, tcp() + b"\x00" * 40), 0.0) is None
    assert parse_ip(ipv6(DEST_OPTS, ext(nh) + tcp() + b"\x00" * 40), 0.0) is None


def test_ipv6_extension_header_walk_is_bounded():
    def chain(count):
        headers = b"".join(ext(DEST_OPTS) for _ in range(count - 1)) + ext(UDP)
        return ipv6(DEST_OPTS, headers + udp(1, 9000))

    assert parse_ip(chain(MAX_IPV6_EXTENSION_HEADERS), 0.0).dport == 9000
    assert parse_ip(chain(MAX_IPV6_EXTENSION_HEADERS + 1), 0.0) is None
    assert parse_ip(chain(1000), 0.0) is None


def test_ipv6_extension_header_past_the_payload():
    # Claims 2048 bytes while 8 remain.
    assert parse_ip(ipv6(DEST_OPTS, ext(UDP)[:1] + b"\xff" + b"\x00" * 6 + udp()), 0.0) is None
    assert parse_ip(ipv6(DEST_OPTS, ext(UDP)[:4]), 0.0) is None
    assert parse_ip(ipv6(FRAGMENT, frag6(UDP)[:6]), 0.0) is None


def test_ipv6_payload_length():
    pkt = ipv6(UDP, udp(1, 9000))
    assert parse_ip(pkt + b"\x00" * 30, 0.0).dport == 9000  # trailing padding
    assert parse_ip(ipv6(UDP, udp(), plen=9), 0.0) is None  # beyond the buffer
    assert parse_ip(ipv6(UDP, udp(), plen=7), 0.0) is None  # UDP header cut by the IP length
    assert parse_ip(ipv6(UDP, udp(), plen=0) + b"\x00" * 8, 0.0) is None  # jumbogram marker
    assert parse_ip(ipv6(TCP, tcp()[:19]), 0.0) is None
    assert parse_ip(pkt[:39], 0.0) is None


# -- never raises ----------------------------------------------------------------

SAMPLES = [
    ipv4(TCP, tcp(40001, 7000, SYN, seq=99)),
    ipv4(UDP, udp(40001, 9000, b"payload")),
    ipv4(TCP, tcp(1, 2, doff=8), ihl=9),
    ipv6(TCP, tcp(40001, 7000, SYN | ACK)),
    ipv6(UDP, udp(1, 9000, b"x" * 20)),
    ipv6(HOP_BY_HOP, ext(ROUTING) + ext(FRAGMENT, 1) + frag6(AH) + ah(DEST_OPTS) + ext(TCP) + tcp(3, 4)),
]


@pytest.mark.parametrize("pkt", SAMPLES)
def test_every_truncation(pkt):
    assert parse_ip(pkt, 0.0) is not None
    for k in range(len(pkt)):
        # The IP length now runs past the buffer.
        assert parse_ip(pkt[:k], 0.0) is None
        assert parse_ip(memoryview(pkt)[:k], 0.0) is None
        # The same truncation with the length field agreeing with it: None or a Knock, no exception.
        cut = bytearray(pkt[:k])
        if k >= 4 and pkt[0] >> 4 == 4:
            struct.pack_into("!H", cut, 2, k)
        elif k >= 6 and pkt[0] >> 4 == 6:
            struct.pack_into("!H", cut, 4, max(0, k - 40))
        result = parse_ip(bytes(cut), 0.0)
        assert result is None or isinstance(result, Knock)


def reference_parse(pkt: bytes) -> tuple | None:
    """A slow, obviously-correct parser written differently (slices, int.from_bytes) to compare against."""
    if len(pkt) < 1:
        return None
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            return None
        ihl = (pkt[0] & 15) * 4
        total = int.from_bytes(pkt[2:4], "big")
        if ihl < 20 or total < ihl or total > len(pkt):
            return None
        if int.from_bytes(pkt[6:8], "big") & 0x1FFF:
            return None
        proto, body = pkt[9], pkt[ihl:total]
        src, dst = ipaddress.IPv4Address(pkt[12:16]), ipaddress.IPv4Address(pkt[16:20])
    elif version == 6:
        if len(pkt) < 40:
            return None
        plen = int.from_bytes(pkt[4:6], "big")
        if plen == 0 or 40 + plen > len(pkt):
            return None
        proto, body = pkt[6], pkt[40 : 40 + plen]
        src, dst = ipaddress.IPv6Address(pkt[8:24]), ipaddress.IPv6Address(pkt[24:40])
        walked = 0
        while proto not in (TCP, UDP):
            if walked == MAX_IPV6_EXTENSION_HEADERS or len(body) < 8:
                return None
            if proto in (HOP_BY_HOP, ROUTING, DEST_OPTS):
                size = (body[1] + 1) * 8
            elif proto == FRAGMENT:
                if int.from_bytes(body[2:4], "big") >> 3:
                    return None
                size = 8
            elif proto == AH:
                size = (body[1] + 2) * 4
            else:
                return None
            proto, body = body[0], body[size:]
            walked += 1
    else:
        return None
    # A source no grant can be made for (unspecified, multicast, also IPv4-mapped) is never a knock.
    plain = src.ipv4_mapped if version == 6 and src.ipv4_mapped is not None else src
    if plain.is_unspecified or plain.is_multicast:
        return None
    if proto == TCP:
        if len(body) < 20 or body[12] >> 4 < 5:
            return None
        return (src, dst, "tcp", int.from_bytes(body[0:2], "big"), int.from_bytes(body[2:4], "big"),
                body[13], int.from_bytes(body[4:8], "big"))
    if proto == UDP:
        if len(body) < 8:
            return None
        return (src, dst, "udp", int.from_bytes(body[0:2], "big"), int.from_bytes(body[2:4], "big"), 0, 0)
    return None


def _mutate(rng: random.Random, pkt: bytes) -> bytes:
    b = bytearray(pkt)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.45 and b:  # flip a byte, biased towards the headers
            i = min(int(rng.expovariate(1 / 24)), len(b) - 1)
            b[i] = rng.randrange(256)
        elif op < 0.6 and b:  # flip one bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.75:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op < 0.85:  # append garbage
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif op < 0.95 and len(b) >= 6:  # rewrite a length field to something plausible
            value = rng.choice([0, 1, len(b), len(b) - 1, len(b) + 1, len(b) - 40, 65535, rng.randrange(65536)]) & 0xFFFF
            struct.pack_into("!H", b, 2 if b[0] >> 4 == 4 else 4, value)
        else:  # random bytes altogether
            b = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
    return bytes(b)


def test_fuzz_never_raises_and_agrees_with_reference():
    rng = random.Random(20240607)
    parsed = 0
    for i in range(20_000):
        pkt = _mutate(rng, rng.choice(SAMPLES))
        data = memoryview(pkt) if i % 3 == 0 else pkt
        result = parse_ip(data, 1.5)  # any exception fails the test
        expected = reference_parse(pkt)
        if expected is None:
            assert result is None, pkt.hex()
        else:
            parsed += 1
            assert result == Knock(*expected, 1.5), pkt.hex()
            assert 0 <= result.sport <= 65535 and 0 <= result.dport <= 65535 and 0 <= result.flags <= 255
    # The mutations keep a fair share of packets readable, so the comparison means something.
    assert 2_000 < parsed < 18_000, parsed


def test_fuzz_random_bytes_with_ip_version_nibbles():
    rng = random.Random(7)
    for _ in range(5_000):
        n = rng.randrange(0, 120)
        pkt = bytearray(rng.randrange(256) for _ in range(n))
        if pkt:
            pkt[0] = (rng.choice([4, 6]) << 4) | (pkt[0] & 15)
        result = parse_ip(bytes(pkt), 0.0)
        assert result is None or isinstance(result, Knock)
        assert (result is None) == (reference_parse(bytes(pkt)) is None)


def test_address_cache_is_bounded_and_exact():
    import spa.knock

    for i in range(spa.knock._CACHE_MAX * 2 + 17):
        src4 = str(ipaddress.IPv4Address(0x0A000000 + i))
        k = parse_ip(ipv4(UDP, udp(), src=src4), 0.0)
        assert str(k.src) == src4 and k.dst == V4S
        src6 = str(ipaddress.IPv6Address((0x20010DB8 << 96) + i))
        k = parse_ip(ipv6(UDP, udp(), src=src6), 0.0)
        assert str(k.src) == src6 and k.dst == V6S
    assert len(spa.knock._addresses) <= spa.knock._CACHE_MAX
    # The same value in both families stays two different objects.
    a = parse_ip(ipv4(UDP, udp(), src="0.0.0.1"), 0.0).src
    b = parse_ip(ipv6(UDP, udp(), src="::1"), 0.0).src
    assert (a.version, b.version) == (4, 6)


def test_sources_no_grant_can_be_made_for_are_not_knocks():
    """Regression (tests/fuzz): such a knock used to raise InvalidGrant on the capture loop.

    One SYN from 0.0.0.0 to a one-step door (door_grant -> Grant) or into a
    Rotating_Bind_Source door's range (source_bytes) stopped the daemon.
    """
    for src in ("0.0.0.0", "224.0.0.1", "239.255.255.255"):
        assert parse_ip(ipv4(TCP, tcp(), src=src), 0.0) is None
    for src in ("::", "ff02::1", "ff0e::1", "::ffff:0.0.0.0", "::ffff:224.0.0.1"):
        assert parse_ip(ipv6(UDP, udp(), src=src), 0.0) is None
    # Neighbours that can be granted still parse (the destination is not checked: multicast knocks are fine).
    for src in ("0.0.0.1", "223.255.255.255", "240.0.0.1", "255.255.255.255"):
        assert parse_ip(ipv4(TCP, tcp(), src=src, dst="224.0.0.1"), 0.0).src == ipaddress.ip_address(src)
    for src in ("::1", "fe80::1", "::ffff:192.0.2.1", "::ffff:0.0.0.1"):
        assert parse_ip(ipv6(UDP, udp(), src=src, dst="ff02::1"), 0.0).src == ipaddress.ip_address(src)


def test_fields_agree_with_parse_ip_and_key_addresses():
    from spa.knock import address, key_of
    from spa.packet import fields

    rng = random.Random(11)
    pkts = [ipv4(TCP, tcp(40001, 7000, SYN, seq=9)), ipv4(UDP, udp(5353, 9000, b"x")),
            ipv4(TCP, tcp(1, 2), ihl=7), ipv6(TCP, tcp(40001, 7000, SYN, seq=7)), ipv6(UDP, udp(1, 2))]
    for _ in range(2000):
        pkt = bytearray(rng.choice(pkts))
        if rng.random() < 0.5:
            pkt[rng.randrange(len(pkt))] = rng.randrange(256)
        f, k = fields(bytes(pkt)), parse_ip(bytes(pkt), 1.0)
        assert (f is None) == (k is None)
        if f is not None:
            proto, skey, dkey, sport, dport, flags, seq = f
            assert (address(skey), address(dkey), {6: "tcp", 17: "udp"}[proto], sport, dport, flags, seq) == k[:7]
            assert key_of(k.src) == skey and key_of(k.dst) == dkey


def test_a_truncated_capture_still_gives_its_headers_but_no_payload():
    from spa.packet import Truncated, fields, udp_payload

    big = ipv4(UDP, udp(5353, 9000, b"p" * 3000))
    cut = Truncated(big[:600], len(big))
    assert fields(cut)[3:5] == (5353, 9000)
    assert parse_ip(cut, 0.0).dport == 9000
    assert udp_payload(cut) is None  # the payload did not fit: never an SPA packet
    assert udp_payload(big) == b"p" * 3000
    # Cut short in the transport header, or claiming more than was on the wire: nothing.
    assert fields(Truncated(big[:24], len(big))) is None
    assert fields(Truncated(big[:600], 700)) is None
    big6 = ipv6(TCP, tcp(1, 7000, SYN) + b"d" * 2000)
    assert fields(Truncated(big6[:300], len(big6)))[4] == 7000
    assert fields(big6[:300]) is None  # without the wire length, a short packet is malformed


def test_udp_payload_is_bounded_by_the_udp_length_on_every_path():
    from spa.packet import udp_payload

    body = udp(5353, 62201, b"spa" * 90)
    for pkt in (ipv4(UDP, body), ipv4(UDP, body, ihl=6), ipv6(UDP, body)):
        assert udp_payload(pkt) == b"spa" * 90
        assert udp_payload(pkt + b"\0" * 6) == b"spa" * 90  # link padding after the IP packet
    for length in (0, 7, len(body) + 1):
        bad = struct.pack("!HHHH", 5353, 62201, length, 0) + body[8:]
        assert udp_payload(ipv4(UDP, bad)) is None and udp_payload(ipv6(UDP, bad)) is None
    shorter = struct.pack("!HHHH", 5353, 62201, 8 + 6, 0) + body[8:]
    assert udp_payload(ipv4(UDP, shorter)) == b"spaspa" == udp_payload(ipv6(UDP, shorter))
    assert udp_payload(ipv4(UDP, body, frag=0x0010)) is None  # a non-first fragment
    assert udp_payload(ipv4(UDP, body, total=len(body) + 20 + 1)) is None  # longer than the buffer
    assert udp_payload(ipv4(TCP, tcp(1, 62201))) is None
