"""The capture loop's per-packet path, fed arbitrary packets: nothing a packet holds may raise.

``Daemon._read(sock)`` is the loop's whole per-packet logic: ``parse_ip``,
the SPA receiver (``udp_payload`` then ``Verifier.check``), the classic
matcher, the source-bound rotating matcher, and what an open does
(``door_grant``, the grant manager's ``submit``). The daemon is built for
real (no server code changed for the test); only its edges are fakes: a
capture whose ``read`` returns the packets under test, and a grant manager
that records what it is handed. No socket is read and no firewall touched.
"""

from __future__ import annotations

import ipaddress
import struct
import time

import pytest
from hypothesis import given, settings, strategies as st

from spa import protocol, rotating
from spa.authorize import SpaDoor, Verifier
from spa.config import parse_config
from spa.keytext import AuthorizedKey
from spa.packet import parse_ip
from spa.rotating_match import KeyRing, RotatingDoor
from spa.server.daemon import Daemon, Runtime, Settings
from tests.daemon_fakes import FakeCapture, FakeManager
from tests.rawip import SYN, TCP, UDP, ipv4, tcp, udp

from . import strategies as S

SERVER_SEED = bytes(range(32))
CLIENT_SEED = bytes(range(100, 132))
SERVER_PUBLIC = protocol.public_of(SERVER_SEED)
CLIENT_PUBLIC = protocol.public_of(CLIENT_SEED)
SECRET = bytes(range(40, 72))
SPA_PORT = 62201
HERE = ipaddress.ip_address("192.0.2.1")
HERE6 = ipaddress.ip_address("2001:db8::1")

CONF = f"""
[options]
    ServerKey = server.key
    SpaPort = {SPA_PORT}
[classic]
    Sequence = 7000,8000:udp,9000
    Start_Command = true %IP%
    Stop_Command = true %IP%
    Cmd_Timeout = 5
[single]
    Sequence = 7000
    Open = 22/tcp
[flags]
    Sequence = 7000,7001
    TCPFlags = syn,!ack
    Open = 22/tcp
[logonly]
    Sequence = 8000:udp,8000:udp
[spa]
    Authorized_Keys = authorized_keys
    Open = 22/tcp
[rotating]
    Rotating_Key = shared.key
    Open = 22/tcp
[bound]
    Rotating_Key = shared.key
    Rotating_Bind_Source = yes
    Open = 22/tcp
"""
PARAMS = rotating.Params(interval=30, length=2, lo=20000, hi=20063, proto="mixed")


@pytest.fixture(scope="module")
def daemon():
    config = parse_config(CONF, "/nonexistent/knockd.conf")
    doors = {d.name: d for d in config.doors}
    ring = KeyRing("shared.key", PARAMS, (("0123456789abcdef", SECRET, None),))
    rot = tuple(RotatingDoor(n, (ring,), doors[n].seq_timeout, None, None, doors[n].rotating_bind_source)
                for n in ("rotating", "bound"))
    key = AuthorizedKey(CLIENT_PUBLIC, "fuzz", 1)
    verifier = Verifier(SERVER_SEED, [SpaDoor("spa", (key,), doors["spa"].cmd_timeout)], config.options.spa_window)
    d = Daemon(Settings(spa_screen="classic"), Runtime(config, doors, {}, verifier, rot), FakeManager())
    d.capture = FakeCapture()
    d.matcher.local_addresses = frozenset({HERE, HERE6})
    d.bound.local_addresses = frozenset({HERE, HERE6})
    yield d
    d.close()


def _knock_ports():
    steps = [7000, 7001, 8000, 9000, SPA_PORT, 20000, 20001, 20031, 20063, 20064]
    return st.one_of(st.sampled_from(steps), st.integers(19990, 20070), S.ports)


# Sources the daemon must survive: any address, including ones no grant can be made for.
_v4_src = st.one_of(S.v4_any, st.sampled_from([0, 0xE0000001, 0xFFFFFFFF, 0x7F000001]).map(ipaddress.IPv4Address))
_v6_src = st.one_of(S.v6_any, st.sampled_from(["::", "ff02::1", "::ffff:0.0.0.0", "::ffff:224.0.0.1", "::1",
                                               "::ffff:192.0.2.7"]).map(ipaddress.IPv6Address))


@st.composite
def aimed(draw):
    """A packet aimed at this host's knock ports, from any source, well formed or damaged."""
    v6 = draw(st.booleans())
    base = (S.ipv6_packets(src=_v6_src, max_ext=3) if v6 else S.ipv4_packets(src=_v4_src)).map(
        lambda b: _retarget(b, draw(_knock_ports()), HERE6 if v6 else HERE))
    return draw(st.one_of(base.map(lambda b: b.data), S.mutated(base.map(lambda b: b))))


def _retarget(b: S.Built, dport: int, dst) -> S.Built:
    data = bytearray(b.data)
    struct.pack_into("!H", data, b.l4_offset + 2, dport)
    if b.version == 4:
        data[16:20] = dst.packed
    else:
        data[24:40] = dst.packed
    return S.Built(bytes(data), b.version, b.src, dst, b.proto, b.sport, dport, b.flags, b.seq, b.payload,
                   b.ip_len, b.l4_offset, b.ext_count)


@st.composite
def spa_datagrams(draw):
    """A UDP packet to the SPA port: a valid SPA packet (maybe damaged), or junk of the right size."""
    src = draw(st.one_of(S.v4_any, st.just(ipaddress.IPv4Address("198.51.100.7"))))
    now_ms = int(time.time() * 1000)
    kind = draw(st.sampled_from(["valid", "damaged", "junk"]))
    if kind == "junk":
        payload = b"\x01" + draw(st.binary(min_size=protocol.PACKET_SIZE - 1, max_size=protocol.PACKET_SIZE - 1))
    else:
        payload = protocol.build(CLIENT_SEED, SERVER_PUBLIC, draw(st.sampled_from(["spa", "classic", "x"])),
                                 draw(st.sampled_from([src, ipaddress.IPv4Address("203.0.113.9"),
                                                       ipaddress.IPv6Address("2001:db8::9")])),
                                 draw(st.integers(0, 100)), time_ms=now_ms + draw(st.integers(-90_000, 90_000)))
        if kind == "damaged":
            data = bytearray(payload)
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            payload = bytes(data)
    return ipv4(UDP, udp(draw(S.ports), SPA_PORT, payload), src=str(src), dst=str(HERE))


packets = st.one_of(aimed(), spa_datagrams(), st.binary(max_size=120))


@given(st.lists(packets, min_size=1, max_size=30), st.floats(0, 1e6, allow_nan=False))
def test_read_never_raises_and_counts_every_packet(daemon, batch, t0):
    before = dict(daemon.stats)
    daemon.capture.packets = [(p, t0 + i * 0.01) for i, p in enumerate(batch)]
    daemon._read(daemon.capture.sock)
    parsed = sum(parse_ip(p, 0.0) is not None for p in batch)
    assert daemon.stats["knocks"] - before["knocks"] == parsed
    assert daemon.stats["malformed"] - before["malformed"] >= len(batch) - parsed
    assert len(daemon.matcher) <= daemon.matcher.max_attempts
    for grant, _ in daemon.manager.submitted:
        assert not grant.address.is_unspecified and not grant.address.is_multicast
    daemon.manager.submitted.clear()


def _knock(src, dport, proto, seq):
    if proto == "tcp":
        return ipv4(TCP, tcp(40000, dport, SYN, seq=seq), src=str(src), dst=str(HERE))
    return ipv4(UDP, udp(40000, dport), src=str(src), dst=str(HERE))


@given(st.sampled_from(["0.0.0.0", "224.0.0.1", "239.255.255.250"]).map(ipaddress.IPv4Address))
@settings(max_examples=10)
def test_spoofed_unusable_sources_never_reach_the_loop(daemon, src):
    """Regression: a knock from 0.0.0.0 or a multicast source used to raise InvalidGrant out of ``_read``.

    Completing [classic] made ``door_grant`` build a Grant for it, and one packet into the
    [bound] door's range made ``source_bytes`` refuse it: either stopped the capture loop.
    """
    seq = [(7000, "tcp"), (8000, "udp"), (9000, "tcp"), (20010, "tcp"), (20011, "udp")]
    daemon.capture.packets = [(_knock(src, p, proto, i), 1.0 + i * 0.01) for i, (p, proto) in enumerate(seq)]
    daemon._read(daemon.capture.sock)
    assert not daemon.manager.submitted


def test_a_real_knock_still_opens(daemon):
    """The fakes are wired right: the classic sequence from a normal source reaches submit()."""
    src = ipaddress.IPv4Address("198.51.100.20")
    seq = [(7000, "tcp"), (8000, "udp"), (9000, "tcp")]
    daemon.capture.packets = [(_knock(src, p, proto, i), 5e6 + i * 0.01) for i, (p, proto) in enumerate(seq)]
    daemon._read(daemon.capture.sock)
    assert sorted(g.door for g, _ in daemon.manager.submitted) == ["classic", "single"]
    daemon.manager.submitted.clear()
