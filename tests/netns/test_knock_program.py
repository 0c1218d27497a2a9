"""The kernel knock matcher (spa.knock_program) against the Python path it stands for, packet by packet.

The Python path is what the daemon runs without it: the knock filter
(``spa.filter.capture_expression``, compiled by libpcap, run by
``tests.cbpf``), then ``spa.packet.fields``, then ``Matcher.feed_fields``.
The kernel side is the generated program, loaded and run on each packet
with ``BPF_PROG_TEST_RUN``; its clock comes from a map set to the packet's
time, and its events are read back from the ring buffers. Both must give
the same events for every packet: random doors (shared steps, TCP flag
tests, targets, guards), random sources, ports, flags and times, and
packets the parser must refuse (fragments, short headers, IPv6 extension
headers, unusable sources).

Needs root (bpf(2)); carries the ``netns`` marker like every test that does.
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from spa import knock_program as KP
from spa.filter import capture_expression
from spa.grant import PortSpec
from spa.knock import TcpFlags, key_of
from spa.matcher import MatchDoor, Matcher
from spa.packet import fields
from spa.server import ebpf as E
from spa.server.bpf import compile_filter
from tests.cbpf import run as run_cbpf
from tests.rawip import ipv4, ipv6, ext, tcp, udp

pytestmark = pytest.mark.netns

HERE = ipaddress.IPv4Address("192.0.2.1")
OTHER = ipaddress.IPv4Address("192.0.2.99")
HERE6 = ipaddress.IPv6Address("2001:db8::1")
LOCAL = (HERE, HERE6)
POOL = [7000, 7001, 7002, 8000, 9000]
MS = 1_000_000


class Kernel:
    """The maps once; a program per set of doors. ``bitmap``: with the active map, as the daemon runs it
    (door slots spread over all 64 bits), else every door's attempt looked up for every packet."""

    def __init__(self, bitmap: bool = True) -> None:
        self.attempts = E.Map.create(E.LRU_HASH, KP.ATTEMPT_KEY_SIZE, KP.ATTEMPT_VALUE_SIZE, 1 << 14, name="t_att")
        self.opens = E.RingBuffer.create(1 << 16, name="t_opens")
        self.notes = E.RingBuffer.create(1 << 16, name="t_notes")
        self.counters = E.Map.create(E.ARRAY, 4, KP.COUNTERS_VALUE_SIZE, 1, name="t_cnt")
        self.local = E.Map.create(E.HASH, KP.LOCAL_KEY_SIZE, 1, 16, name="t_local")
        self.clock = E.Map.create(E.ARRAY, 4, 8, 1, name="t_clock")
        self.active = (E.Map.create(E.LRU_HASH, KP.LOCAL_KEY_SIZE, KP.ACTIVE_VALUE_SIZE, 1 << 14, name="t_active")
                       if bitmap else None)
        for a in LOCAL:
            self.local.update(KP.local_key(a), b"\1")
        self.maps = KP.Maps(self.attempts.fileno(), self.opens.map.fileno(), self.notes.map.fileno(),
                            self.counters.fileno(), self.local.fileno(), self.clock.fileno(),
                            self.active.fileno() if self.active is not None else None)
        self.program: E.Program | None = None
        self.names: dict[int, str] = {}

    def slots(self, ids) -> dict[int, int] | None:
        """Door id -> slot: spread so that high bits (past 31: a 64-bit mask) are used too."""
        return {i: (i * 23 + 40) % KP.MAX_SLOTS for i in ids} if self.active is not None else None

    def build(self, ids: list[tuple[int, MatchDoor]]) -> E.Program:
        return E.Program.load(KP.build(ids, self.maps, self.slots(i for i, _ in ids)), name="t_knocks")

    def load(self, doors: list[MatchDoor]) -> None:
        for m in (self.attempts, self.active):
            if m is not None:
                for k in list(m.keys()):
                    m.delete(k)
        self.counters.update(struct.pack("=I", 0), bytes(KP.COUNTERS_VALUE_SIZE))
        self.opens.read(1 << 16)
        self.notes.read(1 << 16)
        if self.program is not None:
            self.program.close()
        ids = list(enumerate(doors, 1))
        self.names = {i: d.name for i, d in ids}
        self.program = self.build(ids)

    def feed(self, packet: bytes, t_ns: int) -> list[tuple]:
        assert self.program is not None
        self.clock.update(struct.pack("=I", 0), struct.pack("=Q", t_ns))
        assert self.program.test_run_ip(packet) == 0  # never queued
        out = []
        for record in self.notes.read() + self.opens.read():
            decoded = KP.decode_event(record, self.names)
            assert decoded is not None, record.hex()
            t, e = decoded
            assert t == t_ns
            out.append(tuple(e))
        return sorted(out)

    def counter(self, name: str) -> int:
        value = self.counters.lookup(struct.pack("=I", 0))
        assert value is not None
        return KP.decode_counters(value)[name]

    def close(self) -> None:
        for m in (self.program, self.attempts, self.opens, self.notes, self.counters, self.local, self.clock,
                  self.active):
            if m is not None:
                m.close()


@pytest.fixture(scope="module", params=[True, False], ids=["bitmap", "lookup-all"])
def kernel(request):
    k = Kernel(bitmap=request.param)
    try:
        yield k
    finally:
        k.close()


def python_path(doors: list[MatchDoor]):
    """The daemon's path without the kernel matcher: cBPF knock filter, fields, matcher."""
    steps = {(s.proto, s.port, d.tcpflags) for d in doors for s in (*d.sequence, *d.guards)}
    dests = set(LOCAL) | {d.target for d in doors if d.target is not None}
    program = compile_filter(capture_expression(dests, steps))
    m = Matcher(doors, local_addresses=set(LOCAL))

    def feed(packet: bytes, t_ns: int) -> tuple[list[tuple], bool]:
        if not run_cbpf(program, packet):
            return [], False
        f = fields(packet)
        if f is None:
            return [], False
        return sorted(tuple(e) for e in m.feed_fields(*f, t_ns / 1e9)), True
    return feed


specs = st.builds(PortSpec, st.sampled_from(POOL), st.sampled_from(["tcp", "udp"]))


@st.composite
def tcpflags(draw):
    must_set = draw(st.sampled_from([0, 0x02, 0x10, 0x12, 0x01]))
    return draw(st.one_of(st.none(), st.just(TcpFlags(must_set, draw(st.sampled_from([0, 0x10, 0x04])) & ~must_set))))


@st.composite
def door_lists(draw):
    n = draw(st.integers(1, 4))
    return [MatchDoor(f"door{i}", tuple(draw(st.lists(specs, min_size=1, max_size=4))),
                      # Whole milliseconds and a half: a packet time (whole ms) never sits on the boundary.
                      (draw(st.integers(1, 3000)) + 0.5) / 1e3, draw(tcpflags()),
                      draw(st.sampled_from([None, None, None, HERE, OTHER, HERE6])),
                      tuple(draw(st.lists(specs, max_size=2))))
            for i in range(n)]


SOURCES4 = [f"198.51.100.{n}" for n in range(1, 5)] + ["0.0.0.0", "224.0.0.5"]
SOURCES6 = ["2001:db8::2", "2001:db8::3", "::", "ff02::1", "::ffff:198.51.100.1", "::ffff:0.0.0.0",
            "::ffff:224.1.1.1", "::1"]


@st.composite
def packets(draw):
    """(IP packet, time step in ms)."""
    six = draw(st.integers(0, 4)) == 0
    src = draw(st.sampled_from(SOURCES6 if six else SOURCES4))
    dst = draw(st.sampled_from([str(HERE6)] if six else [str(HERE), str(OTHER)]))
    dport = draw(st.one_of(st.sampled_from(POOL), st.integers(1, 65535)))
    sport = draw(st.sampled_from([40000, 40001]))
    if draw(st.booleans()):
        l4 = tcp(sport, dport, draw(st.sampled_from([0x02, 0x02, 0x12, 0x10, 0x04, 0x01, 0x03])),
                 draw(st.sampled_from([1, 2])), doff=draw(st.sampled_from([5, 5, 5, 6, 4])))
        proto = 6
    else:
        l4, proto = udp(sport, dport), 17
    odd = draw(st.integers(0, 9))
    if six:
        if odd == 0:
            packet = ipv6(0, ext(proto) + l4, src, dst)  # behind a hop-by-hop header: the filter's blind spot
        elif odd == 1:
            packet = ipv6(proto, l4, src, dst, plen=len(l4) + 8)  # longer than what arrived
        else:
            packet = ipv6(proto, l4, src, dst)
    else:
        if odd == 0:
            packet = ipv4(proto, l4, src, dst, frag=draw(st.sampled_from([1, 0x2000, 0x4000])))
        elif odd == 1:
            packet = ipv4(proto, l4, src, dst, total=draw(st.sampled_from([20, 27, 39, 200])))
        elif odd == 2:
            packet = ipv4(proto, l4, src, dst, ihl=6)
        else:
            packet = ipv4(proto, l4, src, dst)
    return packet, draw(st.sampled_from([0, 1, 5, 50, 400, 1500]))


# 150 examples in CI (a few seconds); SPA_FUZZ_PROFILE=long runs 3 000 (about a minute), as for tests/fuzz.
EXAMPLES = 3000 if os.environ.get("SPA_FUZZ_PROFILE") == "long" else 150


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(door_lists(), st.lists(packets(), min_size=1, max_size=80))
def test_kernel_matcher_gives_the_python_paths_events(kernel, doors, stream):
    kernel.load(doors)
    python = python_path(doors)
    t = 10_000 * MS
    counted = 0
    kinds = dict.fromkeys(("stage", "open", "timeout", "reset"), 0)
    for packet, step in stream:
        t += step * MS
        want, passed = python(packet, t)
        counted += passed
        for e in want:
            kinds[e[0]] += 1
        assert kernel.feed(packet, t) == want, packet.hex()
    assert kernel.counter("packets") == counted
    for kind in ("stage", "open", "timeout", "reset"):
        assert kernel.counter(kind) == kinds[kind]
    assert kernel.counter("lost_opens") == kernel.counter("lost_notes") == 0


def test_a_sequence_opens_and_a_stray_knock_resets(kernel):
    """The plain case, spelled out: knockd's example door, its sequence from one source, then a reset."""
    door = MatchDoor("openSSH", (PortSpec(7000), PortSpec(8000), PortSpec(9000)), 5.0, TcpFlags(0x02, 0))
    kernel.load([door])
    src = "198.51.100.7"
    skey = key_of(ipaddress.ip_address(src))
    t = 1_000 * MS
    got = [kernel.feed(ipv4(6, tcp(40000 + i, p), src, str(HERE)), t + i * MS) for i, p in enumerate((7000, 8000, 9000))]
    assert got == [[("stage", "openSSH", skey, 1)], [("stage", "openSSH", skey, 2)],
                   [("open", "openSSH", skey, 3), ("stage", "openSSH", skey, 3)]]
    kernel.feed(ipv4(6, tcp(40010, 7000), src, str(HERE)), t + 10 * MS)
    assert kernel.feed(ipv4(6, tcp(40011, 9000), src, str(HERE)), t + 11 * MS) == [("reset", "openSSH", skey, 1)]
    # An ACK is invisible to a door that wants SYN: it neither starts nor resets.
    kernel.feed(ipv4(6, tcp(40012, 7000), src, str(HERE)), t + 12 * MS)
    assert kernel.feed(ipv4(6, tcp(40013, 8000, flags=0x10), src, str(HERE)), t + 13 * MS) == []
    # Past seq_timeout the attempt ends; the packet on the first port starts a new one.
    assert kernel.feed(ipv4(6, tcp(40014, 7000), src, str(HERE)), t + 5_100 * MS) == [
        ("stage", "openSSH", skey, 1), ("timeout", "openSSH", skey, 1)]


def test_attempts_of_a_door_that_keeps_its_id_survive_a_new_program(kernel):
    door = MatchDoor("a", (PortSpec(7000, "udp"), PortSpec(8000, "udp")), 5.0)
    kernel.load([door])
    src = "198.51.100.8"
    kernel.feed(ipv4(17, udp(40000, 7000), src, str(HERE)), 1_000 * MS)
    names = kernel.names
    kernel.program = kernel.build([(1, door), (2, MatchDoor("b", (PortSpec(9000),), 5.0))])
    kernel.names = {**names, 2: "b"}
    skey = key_of(ipaddress.ip_address(src))
    assert kernel.feed(ipv4(17, udp(40000, 8000), src, str(HERE)), 1_001 * MS) == [
        ("open", "a", skey, 2), ("stage", "a", skey, 2)]
