"""The SPA port's kernel screen (spa.spa_program, spa.aead_program) against Python, datagram by datagram.

Poly1305 alone is checked against ``cryptography``'s, on random keys and
messages and on the inputs that reach the final reduction and every carry.
The whole screen is run with ``BPF_PROG_TEST_RUN`` on real SPA packets and
on every kind of damage (a flipped bit anywhere, a replay, a wrong size,
version or family, fragments, another port), and must name the same
outcome as the reference: length and version, the hint map, the nonce map,
then libsodium's XChaCha20-Poly1305 open (``spa.protocol.aead_open``).

Needs root (bpf(2)); carries the ``netns`` marker like every test that does.
"""

from __future__ import annotations

import ipaddress
import os
import time

import pytest
from cryptography.hazmat.primitives.poly1305 import Poly1305
from hypothesis import HealthCheck, given, settings, strategies as st

from spa import aead_program as P
from spa import ebpf_asm as A
from spa import protocol as PR
from spa import spa_program as SP
from spa.server import ebpf as E
from spa.server.spa_kernel import SpaScreen
from tests.rawip import HOP_BY_HOP, UDP, ext, ipv4, ipv6, udp

pytestmark = pytest.mark.netns

PORT = 62201
EXAMPLES = 3000 if os.environ.get("SPA_FUZZ_PROFILE") == "long" else 200
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- Poly1305 alone --------------------------------------------------------------------------

class PolyProgram:
    """A program that reads a key and ``blocks`` 16-byte blocks from the packet and writes the tag to a map."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        end = 32 + 16 * blocks
        self.scratch = E.Map.create(E.ARRAY, 4, end + P.POLY_WORK_SIZE + 16, 1, name="t_poly")
        a = A.Asm()
        a.mov64_reg(A.R6, A.R1)
        a.array_element0(self.scratch.fileno(), -4, "out")
        a.mov64_reg(A.R9, A.R0)
        a.mov64_reg(A.R1, A.R6)
        a.mov64_imm(A.R2, 0)
        a.mov64_reg(A.R3, A.R9)
        a.mov64_imm(A.R4, end)
        a.call(A.FN_skb_load_bytes)
        a.jmp_imm(A.JNE, A.R0, 0, "out")
        P.poly1305(a, A.R9, 0, 32, blocks, end, end + P.POLY_WORK_SIZE)
        a.label("out")
        a.ret(0)
        self.program = E.Program.load(a.assemble(), name="t_poly")

    def tag(self, key: bytes, message: bytes) -> bytes:
        assert len(key) == 32 and len(message) == 16 * self.blocks
        self.program.test_run(bytes(12) + b"\x08\x00" + key + message)
        value = self.scratch.lookup(bytes(4))
        assert value is not None
        return value[-16:]

    def close(self) -> None:
        self.program.close()
        self.scratch.close()


@pytest.fixture(scope="module")
def poly():
    p = PolyProgram(3)
    try:
        yield p
    finally:
        p.close()


def _key(r: int, s: int) -> bytes:
    return r.to_bytes(16, "little") + s.to_bytes(16, "little")


EDGES = [
    # r = 1: h is the sum of the blocks (each + 2**128), unreduced: three all-ones blocks end above p.
    (_key(1, 0), b"\xff" * 48),
    (_key(1, (1 << 128) - 1), b"\xff" * 48),  # s all ones: a carry through every 32-bit word
    (b"\xff" * 32, b"\xff" * 48),  # r as large as clamping leaves it
    (b"\xff" * 32, bytes(48)),
    (bytes(32), b"\xff" * 48),  # r = 0: the tag is s
    (_key(1, 0), (((1 << 130) - 6) // 3).to_bytes(17, "little")[:16] + bytes(32)),
    (_key(5, 0), b"\xfb" + b"\xff" * 15 + bytes(32)),
]


@pytest.mark.parametrize("key,message", EDGES)
def test_poly1305_edges(poly, key, message):
    assert poly.tag(key, message) == Poly1305.generate_tag(key, message)


@FAST
@given(key=st.binary(min_size=32, max_size=32), message=st.binary(min_size=48, max_size=48))
def test_poly1305_random(poly, key, message):
    assert poly.tag(key, message) == Poly1305.generate_tag(key, message)


# -- the whole screen ------------------------------------------------------------------------

class Screen(SpaScreen):
    """The daemon's screen (``spa.server.spa_kernel``: its maps and program) and what one datagram did to it."""

    def __init__(self) -> None:
        super().__init__(PORT)

    def run(self, ip_packet: bytes) -> tuple[bool, str | None]:
        """(passed, the counter that moved besides ``datagrams``, if any)."""
        before = self.counts()
        passed = self.program.test_run_ip(ip_packet) == SP.ACCEPT
        after = self.counts()
        moved = [k for k in SP.COUNTERS if after[k] != before[k] and k != "datagrams"]
        assert len(moved) <= 1
        if moved:
            assert after["datagrams"] == before["datagrams"] + 1
        return passed, moved[0] if moved else None


class Clients:
    """Two clients of one server, their pair keys, and the nonces accepted so far."""

    def __init__(self) -> None:
        self.server = os.urandom(32)
        self.server_public = PR.public_of(self.server)
        self.seeds = [os.urandom(32) for _ in range(2)]
        self.pairs = [PR.pair_keys(s, self.server_public, PR.public_of(s), self.server_public) for s in self.seeds]
        self.keys: dict[bytes, bytes] = {}  # hint -> AEAD key
        self.accepted: set[bytes] = set()


@pytest.fixture(scope="module")
def world():
    s, c = Screen(), Clients()
    now_ms = int(time.time() * 1000)
    try:
        for pair in c.pairs:
            for epoch in range(PR.epoch_of(now_ms) - 1, PR.epoch_of(now_ms) + 2):
                c.keys[pair.hint(epoch)] = pair.aead_key
        s.set_hints(c.keys)
        yield s, c, now_ms
    finally:
        s.close()


def reference(c: Clients, payload: bytes) -> str:
    """What the screen must do with ``payload`` (a UDP datagram's bytes, to the SPA port)."""
    if len(payload) != PR.PACKET_SIZE:
        return "size"
    if payload[0] != PR.VERSION:
        return "version"
    key = c.keys.get(payload[1:1 + PR.HINT_SIZE])
    if key is None:
        return "unknown"
    nonce = payload[1 + PR.HINT_SIZE:PR.HEADER_SIZE]
    if nonce in c.accepted:
        return "replay"
    opened = PR.aead_open(payload[PR.HEADER_SIZE:], payload[:PR.HEADER_SIZE], nonce, key)
    return "passed" if opened is not None else "forged"


def _wrap(payload: bytes, v6: bool, port: int = PORT) -> bytes:
    datagram = udp(40000, port, payload)
    return ipv6(UDP, datagram) if v6 else ipv4(UDP, datagram)


@FAST
@given(data=st.data())
def test_screen_matches_the_reference(world, data):
    screen, c, now_ms = world
    who = data.draw(st.integers(0, 1), label="client")
    v6 = data.draw(st.booleans(), label="ipv6")
    skew = data.draw(st.integers(-30_000, 30_000), label="skew ms")
    packet = PR.build(c.seeds[who], c.server_public, data.draw(st.sampled_from(["ssh", "web", "x" * 127])),
                      ipaddress.ip_address("2001:db8::2" if v6 else "192.0.2.2"), time_ms=now_ms + skew,
                      pair=c.pairs[who])
    damage = data.draw(st.sampled_from(["none", "bit", "junk", "truncate", "extend", "replay"]), label="damage")
    if damage == "bit":
        at = data.draw(st.integers(0, len(packet) * 8 - 1), label="bit")
        packet = bytearray(packet)
        packet[at // 8] ^= 1 << at % 8
        packet = bytes(packet)
    elif damage == "junk":  # a forgery under the client's real hint: random nonce and body
        packet = packet[:1 + PR.HINT_SIZE] + data.draw(st.binary(min_size=PR.PACKET_SIZE - 9,
                                                                 max_size=PR.PACKET_SIZE - 9))
    elif damage == "truncate":
        packet = packet[:data.draw(st.integers(0, len(packet) - 1))]
    elif damage == "extend":
        packet += data.draw(st.binary(min_size=1, max_size=8))
    expected = reference(c, packet)
    passed, moved = screen.run(_wrap(packet, v6))
    assert (moved, passed) == (expected, expected == "passed")
    if damage == "replay" and passed:
        nonce = packet[1 + PR.HINT_SIZE:PR.HEADER_SIZE]
        c.accepted.add(nonce)
        screen.refuse([nonce])
        assert screen.run(_wrap(packet, v6)) == (False, "replay")


def test_what_is_not_a_whole_datagram_to_the_port_is_not_counted(world):
    screen, c, now_ms = world
    packet = PR.build(c.seeds[0], c.server_public, "ssh", ipaddress.ip_address("192.0.2.2"), time_ms=now_ms,
                      pair=c.pairs[0])
    assert screen.run(_wrap(packet, False)) == (True, "passed")
    datagram = udp(40000, PORT, packet)
    refused = {
        "another port": _wrap(packet, False, PORT + 1),
        "first fragment": ipv4(UDP, datagram, frag=0x2000),
        "later fragment": ipv4(UDP, datagram, frag=0x0001),
        "ipv6 extension header": ipv6(HOP_BY_HOP, ext(UDP) + datagram),
        "tcp": ipv4(6, datagram),
    }
    for what, ip_packet in refused.items():
        assert screen.run(ip_packet) == (False, None), what
    # To the port, but not a whole datagram of the SPA size: counted as the wrong size.
    bad_length = datagram[:4] + (8 + PR.PACKET_SIZE - 1).to_bytes(2, "big") + datagram[6:]
    short = {
        "udp length": ipv4(UDP, bad_length),
        "ip length short": ipv4(UDP, datagram, total=200),
        "ipv6 length short": ipv6(UDP, datagram, plen=200),
    }
    for what, ip_packet in short.items():
        assert screen.run(ip_packet) == (False, "size"), what


def test_the_runtime_keeps_its_hint_map_in_step_and_passes_what_the_program_passes():
    """``spa.server.spa_kernel.SpaScreen``: ``set_hints`` leaves exactly the hints given (changed keys
    replaced, the rest deleted), ``refuse`` adds nonces, and the loaded program follows both."""
    c = Clients()
    now_ms = int(time.time() * 1000)
    epoch = PR.epoch_of(now_ms)
    screen = SpaScreen(PORT)
    try:
        first = {c.pairs[0].hint(e): c.pairs[0].aead_key for e in (epoch - 1, epoch)}
        screen.set_hints(first)
        assert sorted(screen.hints.keys()) == sorted(first)
        packet = PR.build(c.seeds[0], c.server_public, "ssh", ipaddress.ip_address("192.0.2.2"), time_ms=now_ms,
                          pair=c.pairs[0])
        ip_packet = _wrap(packet, False)
        assert screen.program.test_run_ip(ip_packet) == SP.ACCEPT
        # The index moves an epoch and the second client is added; a hint whose key changed is replaced.
        moved = {c.pairs[0].hint(e): c.pairs[0].aead_key for e in (epoch, epoch + 1)}
        moved.update({c.pairs[1].hint(epoch): c.pairs[1].aead_key})
        moved[c.pairs[0].hint(epoch)] = c.pairs[1].aead_key
        screen.set_hints(moved)
        assert sorted(screen.hints.keys()) == sorted(moved)
        assert screen.hints.lookup(c.pairs[0].hint(epoch)) == c.pairs[1].aead_key
        assert screen.program.test_run_ip(ip_packet) == 0  # the wrong key for it now: refused as forged
        moved[c.pairs[0].hint(epoch)] = c.pairs[0].aead_key
        screen.set_hints(moved)
        assert screen.program.test_run_ip(ip_packet) == SP.ACCEPT
        screen.refuse([packet[1 + PR.HINT_SIZE:PR.HEADER_SIZE]])
        assert screen.program.test_run_ip(ip_packet) == 0
        assert screen.counts() == {"datagrams": 4, "size": 0, "version": 0, "unknown": 0, "replay": 1,
                                   "forged": 1, "passed": 2}
        screen.set_hints({})
        assert list(screen.hints.keys()) == []
    finally:
        screen.close()
