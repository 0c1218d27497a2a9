"""Capture filters: the expressions spa.filter builds, compiled by libpcap (server/bpf.py), then executed.

The compiled programs run on hand-built raw IP packets in a small classic-BPF
interpreter below, so what is proved is what the kernel would do with them.
Needs libpcap (not root).
"""

from __future__ import annotations

import ipaddress
import random
import socket

import pytest

from spa.filter import knock_filter, port_expression, udp_port_filter
from spa.knock import ACK, FIN, PSH, RST, SYN, URG, TcpFlags
from spa.packet import parse_ip
from spa.server.bpf import BPF_MAXINSNS, DLT_RAW, DROP_ALL, FilterError, attach_filter, compile_filter
from tests.cbpf import run
from tests.rawip import DEST_OPTS, FRAGMENT, ICMP, TCP, UDP, ext, frag6, ipv4, ipv6, tcp, udp

ip = ipaddress.ip_address
SERVER4, OTHER4 = ip("192.0.2.1"), ip("192.0.2.9")
SERVER6, OTHER6 = ip("2001:db8::1"), ip("2001:db8::9")


def passes(prog, pkt: bytes) -> bool:
    return run(prog, pkt) > 0


def test_interpreter_on_known_programs():
    assert not passes(DROP_ALL, ipv4(TCP, tcp()))
    # tcpdump -y RAW -dd 'ip': ldb [0]; and #0xf0; jeq #0x40; ret #N; ret #0
    prog = [(0x30, 0, 0, 0), (0x54, 0, 0, 0xF0), (0x15, 0, 1, 0x40), (0x06, 0, 0, 65535), (0x06, 0, 0, 0)]
    assert passes(prog, ipv4(TCP, tcp())) and not passes(prog, ipv6(TCP, tcp()))
    assert run([(0x06, 0, 0, 9)], b"") == 9


# -- the compiler ------------------------------------------------------------------

def test_dlt_raw_tests_the_version_nibble():
    # DLT_RAW (12) on Linux; byte 0's high nibble is the IP version, no link header.
    assert DLT_RAW == 12
    v4 = compile_filter("ip")
    v6 = compile_filter("ip6")
    assert v4[:3] == [(0x30, 0, 0, 0), (0x54, 0, 0, 0xF0), (0x15, 0, 1, 0x40)]
    assert v6[:3] == [(0x30, 0, 0, 0), (0x54, 0, 0, 0xF0), (0x15, 0, 1, 0x60)]
    assert passes(v4, ipv4(UDP, udp())) and not passes(v4, ipv6(UDP, udp()))
    assert passes(v6, ipv6(UDP, udp())) and not passes(v6, ipv4(UDP, udp()))


def test_snaplen_is_the_accept_value():
    assert compile_filter("ip")[-2] == (0x06, 0, 0, 65535)
    assert compile_filter("ip", snaplen=128)[-2] == (0x06, 0, 0, 128)


def test_linktype_raw_file_value_is_not_a_dlt():
    # LINKTYPE_RAW (101) is the capture-file value; pcap_open_dead wants the DLT_ one.
    with pytest.raises(FilterError, match="101"):
        compile_filter("ip", 101)


def test_ethernet_linktype_is_available_too():
    prog = compile_filter("ip", 1)  # DLT_EN10MB: tests the ethertype at offset 12
    assert prog[0] == (0x28, 0, 0, 12)


def test_syntax_error_names_expression_and_reason():
    with pytest.raises(FilterError) as e:
        compile_filter("tcp dst port banana and")
    assert "tcp dst port banana and" in str(e.value)
    assert "syntax error" in str(e.value) or "unknown" in str(e.value)


def test_expression_that_rejects_everything_compiles_to_drop_all():
    assert compile_filter("ip and not ip") == DROP_ALL
    # libpcap cannot read TCP behind IPv6 with tcp[]: it rejects every packet.
    assert compile_filter("ip6 and tcp[13] & 2 != 0") == DROP_ALL


# -- expression text ---------------------------------------------------------------

def test_expression_one_door():
    expr = knock_filter([SERVER4], [("tcp", 7000, None), ("tcp", 8000, None), ("udp", 9000, None)])
    assert expr == "dst host 192.0.2.1 and (udp dst port 9000 or (tcp dst port 7000 or tcp dst port 8000))"


def test_expression_flags_and_families():
    expr = knock_filter([SERVER6, SERVER4], [("tcp", 7000, TcpFlags(SYN, ACK))])
    assert expr == (
        "(dst host 192.0.2.1 or dst host 2001:db8::1) and (tcp dst port 7000 and "
        "((ip and (tcp[13] & 0x12) = 0x02) or (ip6 and (ip6[53] & 0x12) = 0x02)))"
    )
    assert "ip6[53]" not in knock_filter([SERVER4], [("tcp", 7000, TcpFlags(SYN, ACK))])
    assert "tcp[13]" not in knock_filter([SERVER6], [("tcp", 7000, TcpFlags(SYN, ACK))])


def test_ports_group_contiguous_runs():
    assert port_expression("tcp", [7003, 7001, 7002, 9000, 9001]) == (
        "(tcp dst portrange 7001-7003 or tcp dst port 9000 or tcp dst port 9001)"
    )
    assert port_expression("udp", [5]) == "udp dst port 5"


def test_nothing_to_match_is_none():
    assert knock_filter([], [("tcp", 7000, None)]) is None
    assert knock_filter([SERVER4], []) is None
    # syn and !syn: never true, dropped; nothing left.
    assert knock_filter([SERVER4], [("tcp", 7000, TcpFlags(SYN, SYN))]) is None
    assert udp_port_filter([], 62201) is None


def test_link_local_zone_is_dropped():
    expr = knock_filter([ip("fe80::1%veth0")], [("udp", 9000, None)])
    assert expr == "dst host fe80::1 and udp dst port 9000"
    prog = compile_filter(expr)
    assert passes(prog, ipv6(UDP, udp(1, 9000), src="fe80::2", dst="fe80::1"))
    assert not passes(prog, ipv6(UDP, udp(1, 9000), src="fe80::2", dst="fe80::3"))


def test_duplicates_and_any_flags_subsume():
    expr = knock_filter(
        [SERVER4, SERVER4],
        [("tcp", 7000, None), ("tcp", 7000, TcpFlags(SYN, ACK)), ("tcp", 7000, TcpFlags()), ("tcp", 7000, None)],
    )
    assert expr == "dst host 192.0.2.1 and tcp dst port 7000"


def test_bad_steps_are_refused():
    with pytest.raises(ValueError):
        knock_filter([SERVER4], [("icmp", 7000, None)])
    with pytest.raises(ValueError):
        knock_filter([SERVER4], [("tcp", 70000, None)])
    with pytest.raises(ValueError):
        udp_port_filter([SERVER4], -1)


# -- compiled programs on packets ---------------------------------------------------

SYN_NOT_ACK = TcpFlags(SYN, ACK)
FIN_NOT_ACK = TcpFlags(FIN, ACK)


@pytest.fixture(scope="module")
def door_prog():
    steps = [
        ("tcp", 7000, None),
        ("tcp", 8000, SYN_NOT_ACK),
        ("tcp", 8000, FIN_NOT_ACK),  # the same port under two flag tests: either passes
        ("udp", 9000, None),
        ("tcp", 9000, SYN_NOT_ACK),
    ]
    return compile_filter(knock_filter([SERVER4, SERVER6], steps))


@pytest.mark.parametrize("build,src,dst", [(ipv4, "192.0.2.2", "192.0.2.1"), (ipv6, "2001:db8::2", "2001:db8::1")])
def test_door_program(door_prog, build, src, dst):
    def ok(proto, l4, to=dst):
        return passes(door_prog, build(proto, l4, src=src, dst=to))

    assert ok(TCP, tcp(dport=7000, flags=SYN))
    assert ok(TCP, tcp(dport=7000, flags=ACK | RST))  # no flag test on 7000
    assert ok(TCP, tcp(dport=8000, flags=SYN))
    assert ok(TCP, tcp(dport=8000, flags=FIN))
    assert ok(TCP, tcp(dport=8000, flags=SYN | FIN | PSH | URG))  # unlisted flags don't care
    assert ok(UDP, udp(dport=9000))
    assert ok(TCP, tcp(dport=9000, flags=SYN))
    # wrong flags
    assert not ok(TCP, tcp(dport=8000, flags=SYN | ACK))
    assert not ok(TCP, tcp(dport=8000, flags=ACK))
    assert not ok(TCP, tcp(dport=8000, flags=0))
    assert not ok(TCP, tcp(dport=9000, flags=FIN))
    # wrong port
    for port in (6999, 7001, 8001, 9001, 22, 0, 65535):
        assert not ok(TCP, tcp(dport=port, flags=SYN))
        assert not ok(UDP, udp(dport=port))
    # wrong protocol
    assert not ok(UDP, udp(dport=7000))
    assert not ok(UDP, udp(dport=8000))
    assert not ok(ICMP, b"\x08\x00\x00\x00" + udp(dport=7000))
    # wrong destination; the source port is not the destination port
    other = "192.0.2.9" if build is ipv4 else "2001:db8::9"
    assert not ok(TCP, tcp(dport=7000, flags=SYN), to=other)
    assert not ok(TCP, tcp(sport=7000, dport=40000, flags=SYN))


def test_ipv6_to_an_ipv4_only_server_is_dropped():
    prog = compile_filter(knock_filter([SERVER4], [("tcp", 7000, None), ("udp", 9000, None)]))
    assert passes(prog, ipv4(TCP, tcp(dport=7000)))
    # 2001:db8::c000:201 ends with the bytes of 192.0.2.1; ::ffff:192.0.2.1 is v4-mapped.
    for dst in ("2001:db8::c000:201", "::ffff:192.0.2.1", "2001:db8::1"):
        assert not passes(prog, ipv6(TCP, tcp(dport=7000), dst=dst))
        assert not passes(prog, ipv6(UDP, udp(dport=9000), dst=dst))


def test_ipv4_to_an_ipv6_only_server_is_dropped():
    prog = compile_filter(knock_filter([SERVER6], [("udp", 9000, None)]))
    assert passes(prog, ipv6(UDP, udp(dport=9000)))
    assert not passes(prog, ipv4(UDP, udp(dport=9000)))


def test_fragments(door_prog):
    assert not passes(door_prog, ipv4(TCP, tcp(dport=7000), frag=100))
    assert passes(door_prog, ipv4(TCP, tcp(dport=7000), frag=0x2000))  # first fragment
    # IPv4 options: the transport header is found through the IHL.
    assert passes(door_prog, ipv4(TCP, tcp(dport=7000), ihl=8))


def test_ipv6_extension_headers_are_dropped_in_the_kernel(door_prog):
    # libpcap reads TCP/UDP at the fixed offset 40 (knockd has the same limit);
    # spa.packet could read these, but they never reach it.
    for pkt in (ipv6(DEST_OPTS, ext(UDP) + udp(dport=9000)), ipv6(FRAGMENT, frag6(TCP) + tcp(dport=7000))):
        assert parse_ip(pkt, 0.0) is not None
        assert not passes(door_prog, pkt)


def test_truncated_packets_are_dropped(door_prog):
    for pkt in (ipv4(TCP, tcp(dport=8000, flags=SYN)), ipv6(TCP, tcp(dport=8000, flags=SYN))):
        assert passes(door_prog, pkt)
        for k in range(len(pkt) - 6):  # up to the flags byte
            assert not passes(door_prog, pkt[:k])


def test_udp_port_filter():
    prog = compile_filter(udp_port_filter([SERVER4, SERVER6], 62201))
    assert passes(prog, ipv4(UDP, udp(dport=62201, payload=b"x" * 200)))
    assert passes(prog, ipv6(UDP, udp(dport=62201)))
    assert not passes(prog, ipv4(TCP, tcp(dport=62201)))
    assert not passes(prog, ipv4(UDP, udp(dport=62202)))
    assert not passes(prog, ipv4(UDP, udp(dport=62201), dst="192.0.2.9"))
    assert run(prog, ipv4(UDP, udp(dport=62201, payload=b"x" * 1200))) >= 1228  # whole datagram kept


# -- the program agrees with the matcher's view of a packet ---------------------------

FLAG_CHOICES = [None, SYN_NOT_ACK, FIN_NOT_ACK, TcpFlags(SYN, 0), TcpFlags(SYN | ACK, 0),
                TcpFlags(0, RST), TcpFlags(SYN, FIN | RST | ACK)]


def _expected(knock, dests, steps) -> bool:
    if knock is None or knock.dst not in dests:
        return False
    return any(
        proto == knock.proto and port == knock.dport and (flags is None or knock.proto == "udp" or flags.matches(knock.flags))
        for proto, port, flags in steps
    )


def test_compiled_program_agrees_with_python_model():
    rng = random.Random(4242)
    for _ in range(40):
        dests = set(rng.sample([SERVER4, OTHER4, SERVER6, OTHER6, ip("fe80::1")], rng.randint(1, 3)))
        steps = [(rng.choice(["tcp", "udp"]), rng.choice([1, 7000, 7001, 7002, 8000, 65535]), rng.choice(FLAG_CHOICES))
                 for _ in range(rng.randint(1, 6))]
        expr = knock_filter(dests, steps)
        prog = compile_filter(expr) if expr else DROP_ALL
        ports = [p for _, p, _ in steps] + [2, 6999, 7003]
        addrs = [SERVER4, OTHER4, ip("192.0.2.77"), SERVER6, OTHER6, ip("fe80::1"), ip("fe80::2")]
        targets = sorted(dests, key=lambda a: (a.version, int(a)))
        for _ in range(300):
            dst = rng.choice(targets) if rng.random() < 0.5 else rng.choice(addrs)
            proto = rng.choice([TCP, TCP, UDP, ICMP])
            l4 = (tcp(rng.randrange(65536), rng.choice(ports), rng.randrange(256)) if proto == TCP
                  else udp(rng.randrange(65536), rng.choice(ports)) if proto == UDP else b"\x08" + b"\x00" * 19)
            if dst.version == 4:
                pkt = ipv4(proto, l4, src="198.51.100.1", dst=str(dst))
            else:
                pkt = ipv6(proto, l4, src="2001:db8:1::5", dst=str(dst))
            assert passes(prog, pkt) == _expected(parse_ip(pkt, 0.0), dests, steps), (expr, pkt.hex())


# -- size ---------------------------------------------------------------------------

def test_program_size_for_a_large_configuration():
    """100 doors x 3 ports, 10 addresses, mixed protocols and flags: well under the kernel's 4096."""
    rng = random.Random(1)
    dests = [ip(f"10.0.0.{i}") for i in range(1, 6)] + [ip(f"2001:db8::{i}") for i in range(1, 6)]
    steps = []
    for _door in range(100):
        flags = rng.choice(FLAG_CHOICES)
        for _ in range(3):
            proto = rng.choice(["tcp", "udp"])
            steps.append((proto, rng.randrange(1024, 65536), flags if proto == "tcp" else None))
    prog = compile_filter(knock_filter(dests, steps))
    assert len(prog) < BPF_MAXINSNS // 4, len(prog)
    # Spot-check that it still does its job.
    proto, port, flags = next(s for s in steps if s[0] == "tcp" and s[2] is None)
    assert passes(prog, ipv4(TCP, tcp(dport=port, flags=ACK), dst="10.0.0.3"))
    assert passes(prog, ipv6(TCP, tcp(dport=port, flags=ACK), dst="2001:db8::5"))
    assert not passes(prog, ipv4(TCP, tcp(dport=port, flags=ACK), dst="10.0.0.7"))


def test_program_size_every_door_its_own_flags():
    dests = [ip(f"10.0.0.{i}") for i in range(1, 6)] + [ip(f"2001:db8::{i}") for i in range(1, 6)]
    # 63 distinct (set, clear) pairs over three flags, every port distinct.
    combos = [TcpFlags(s, c) for s in range(8) for c in range(8) if s & c == 0 and s | c]
    steps = [("tcp", 20000 + 7 * i + j, combos[i % len(combos)]) for i in range(100) for j in range(3)]
    prog = compile_filter(knock_filter(dests, steps))
    assert len(prog) < BPF_MAXINSNS // 2, len(prog)


# -- attaching (a UDP socket on loopback: no root needed) ---------------------------

def _udp_pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.3)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return rx, tx


def test_attach_filter_drop_all_then_replace():
    rx, tx = _udp_pair()
    with rx, tx:
        attach_filter(rx, DROP_ALL)
        tx.sendto(b"dropped", rx.getsockname())
        with pytest.raises(TimeoutError):
            rx.recv(100)
        attach_filter(rx, [(0x06, 0, 0, 0xFFFF)])  # replaced in one setsockopt
        tx.sendto(b"kept", rx.getsockname())
        assert rx.recv(100) == b"kept"


def test_attach_filter_refuses_bad_programs():
    rx, tx = _udp_pair()
    with rx, tx:
        with pytest.raises(FilterError):
            attach_filter(rx, [])
        with pytest.raises(FilterError):
            attach_filter(rx, [(0x15, 5, 5, 1), (0x06, 0, 0, 0)])  # jumps out of the program: EINVAL
        with pytest.raises(FilterError):
            attach_filter(rx, DROP_ALL * (BPF_MAXINSNS + 1))


def test_whole_ranges_are_one_portrange_term_each_with_their_flag_test():
    from spa.knock import SYN, ACK, TcpFlags

    expr = knock_filter([ipaddress.ip_address("192.0.2.1")], [("udp", 62201, None)],
                        [("tcp", 10000, 65000, TcpFlags(SYN, ACK)), ("udp", 20000, 20100, None)])
    assert expr == ("dst host 192.0.2.1 and (udp dst port 62201 or "
                    "(tcp dst portrange 10000-65000 and (ip and (tcp[13] & 0x12) = 0x02)) or "
                    "udp dst portrange 20000-20100)")
    assert knock_filter([ipaddress.ip_address("192.0.2.1")], [], [("tcp", 1, 5, None)]) == \
        "dst host 192.0.2.1 and tcp dst portrange 1-5"


def test_coarse_ranges_cover_every_step_in_few_ranges_split_at_the_widest_gaps():
    from spa.filter import coarse_ranges
    from spa.knock import SYN, TcpFlags

    rng = random.Random(7)
    syn = TcpFlags(SYN)
    steps = {("tcp", rng.randint(10000, 65000), syn) for _ in range(2400)} | {("udp", 62201, None), ("udp", 7, None)}
    ranges = coarse_ranges(steps, 8)
    assert len([r for r in ranges if r[0] == "tcp"]) <= 8
    assert [r for r in ranges if r[0] == "udp"] == [("udp", 7, 7, None), ("udp", 62201, 62201, None)]
    for proto, port, _ in steps:
        assert any(p == proto and lo <= port <= hi for p, lo, hi, _ in ranges)
    assert all(f == syn for p, _, _, f in ranges if p == "tcp")  # one shared flag test survives
    mixed = coarse_ranges({("tcp", 1, syn), ("tcp", 2, None)}, 1)
    assert mixed == [("tcp", 1, 2, None)]
