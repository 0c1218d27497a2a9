"""tests/cbpf.py held to the kernel: the same programs on real AF_PACKET SOCK_DGRAM sockets agree with ``run``.

Everything happens on ``lo`` in a namespace of its own (nothing else sends
there). An unfiltered socket sees every packet; each filtered socket must
see exactly those ``run`` accepts, cut to the length ``run`` returns (the
kernel keeps ``min(len, verdict)`` bytes). Packets are hand-built and
injected through a packet socket, so IP options, fragments and truncated
headers reach the filter byte for byte; one test uses real UDP sockets.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest

from spa.server.bpf import FilterError, attach_filter, compile_filter
from spa.server.netns import in_netns, sh
from tests.cbpf import (
    BPF_A, BPF_ABS, BPF_ADD, BPF_ALU, BPF_AND, BPF_B, BPF_DIV, BPF_H, BPF_IMM, BPF_IND, BPF_JA, BPF_JEQ, BPF_JGE,
    BPF_JGT, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX, BPF_LEN, BPF_LSH, BPF_MEM, BPF_MISC, BPF_MOD, BPF_MSH,
    BPF_MUL, BPF_NEG, BPF_OR, BPF_RET, BPF_RSH, BPF_ST, BPF_STX, BPF_SUB, BPF_TAX, BPF_TXA, BPF_W, BPF_X, BPF_XOR,
    SKF_NET_OFF, Insn, jump, run, stmt, validate,
)
from tests.rawip import ACK, FRAGMENT, SYN, TCP, UDP, frag6, ipv4, ipv6, tcp, udp
from tests.unit.test_cbpf import CASES

pytestmark = pytest.mark.netns

ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
_counter = itertools.count()
Program = Sequence[Insn]


@contextlib.contextmanager
def _loopback_namespace() -> Iterator[str]:
    """A fresh namespace with only ``lo`` (up, MTU 1500 so large datagrams fragment); deleted after."""
    name = f"spacbpf{os.getpid()}x{next(_counter)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "mtu", "1500", "up", ns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _packet_socket(ns: str, program: Program | None) -> socket.socket:
    """Filter first, bind after: no packet reaches the socket unfiltered."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    if program is not None:
        attach_filter(sock, program)
    sock.bind(("lo", ETH_P_ALL))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    """The inbound packets queued on ``sock`` (lo shows each packet once outgoing, once inbound)."""
    out = []
    while True:
        try:
            data, addr = sock.recvfrom(1 << 17)
        except BlockingIOError:
            return out
        if addr[2] != socket.PACKET_OUTGOING:
            out.append(data)


def _capture(ns: str, programs: Sequence[Program], send, count: int) -> tuple[list[bytes], list[list[bytes]]]:
    """Run ``send()``; return what an unfiltered socket and each filtered one received.

    ``count`` packets are awaited on the unfiltered socket; the filtered ones
    were queued in the same pass of the receive path.
    """
    reference = _packet_socket(ns, None)
    filtered = [_packet_socket(ns, p) for p in programs]
    try:
        send()
        seen: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(seen) < count and time.monotonic() < deadline:
            seen += _drain(reference)
            time.sleep(0.005)
        time.sleep(0.05)
        seen += _drain(reference)
        return seen, [_drain(s) for s in filtered]
    finally:
        reference.close()
        for s in filtered:
            s.close()


def _expected(program: Program, packets: Sequence[bytes]) -> Counter[bytes]:
    """What the kernel should hand up, by ``run``: accepted packets cut to the verdict."""
    return Counter(p[:run(program, p)] for p in packets if run(program, p))


def _inject(ns: str, packets: Sequence[bytes]):
    """A ``send`` that puts raw network-layer bytes on lo (no IP stack involved on the way out)."""
    def send() -> None:
        with in_netns(ns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        with s:
            for p in packets:
                ethertype = ETH_P_IPV6 if p[:1] and p[0] >> 4 == 6 else ETH_P_IP
                s.sendto(p, ("lo", ethertype, 0, 0, b"\x00" * 6))
    return send


def test_libpcap_programs_on_injected_packets():
    """Every hand-built packet of the unit tests, against every expression, in the kernel and in run()."""
    # The empty packet is left out: a packet socket cannot send nothing.
    packets = [p for cases in CASES.values() for _, p, _ in cases if p]
    extra = [
        ipv4(TCP, tcp(dport=7000, flags=SYN | ACK), ihl=7), ipv4(UDP, udp(dport=62201))[:10],
        ipv6(FRAGMENT, frag6(UDP, offset=3) + udp(dport=53)), ipv6(TCP, tcp(dport=62201, flags=SYN))[:50],
    ]
    packets += extra
    programs = [compile_filter(e) for e in CASES]
    with _loopback_namespace() as ns:
        seen, got = _capture(ns, programs, _inject(ns, packets), len(packets))
    assert Counter(seen) == Counter(packets)
    for expression, program, received in zip(CASES, programs, got):
        assert Counter(received) == _expected(program, packets), expression


def test_udp_datagrams_from_real_sockets():
    """Kernel-built UDP over 127.0.0.1 and ::1: IP options, fragments, ports in and out of the filter."""
    expressions = ["udp dst port 62201", "ip6 and udp dst port 53", "udp[8] = 1", "udp dst portrange 20000-29999"]
    programs = [compile_filter(e) for e in expressions]
    ports = [62201, 62202, 53, 25000, 30000]
    with _loopback_namespace() as ns:
        with in_netns(ns):
            sinks = [socket.socket(f, socket.SOCK_DGRAM) for f in (socket.AF_INET, socket.AF_INET6) for _ in ports]
            plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            options = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        socks = [*sinks, plain, options, six]
        try:
            # Listeners on every port, so no ICMP "port unreachable" joins the traffic.
            for i, s in enumerate(sinks):
                s.bind(("127.0.0.1" if i < len(ports) else "::1", ports[i % len(ports)]))
            options.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")  # NOPs, EOL: ihl 6

            def send() -> None:
                for port in ports:
                    for payload in (b"\x01knock", b"\x02knock", b"\x01" * 3000):  # 3000 bytes: fragments
                        plain.sendto(payload, ("127.0.0.1", port))
                        options.sendto(payload, ("127.0.0.1", port))
                        six.sendto(payload, ("::1", port))

            # A 3000-byte datagram is 3 fragments at MTU 1500; await at least the 30 small datagrams.
            seen, got = _capture(ns, programs, send, 2 * 3 * len(ports))
        finally:
            for s in socks:
                s.close()
    assert any(p[0] == 0x46 for p in seen), "no packet with IP options was seen"
    assert any(int.from_bytes(p[6:8], "big") & 0x1FFF for p in seen if p[0] >> 4 == 4), "no later fragment"
    for expression, program, received in zip(expressions, programs, got):
        assert Counter(received) == _expected(program, seen), expression
    assert got[0], "udp dst port 62201 accepted nothing"


_OFFSETS = (0, 1, 2, 9, 20, 40, 1019, 1020, 1023, 1024, 2000)
_VALUES = (0, 1, 2, 3, 31, 32, 33, 255, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_ALU = (BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR)


def _pick(rng: random.Random, choices: Sequence[int]) -> int:
    """One of ``choices`` (the edges), or now and then any 32-bit value."""
    return rng.randrange(1 << 32) if rng.random() < 0.15 else rng.choice(choices)


def _random_program(rng: random.Random) -> list[Insn]:
    """A valid program mixing every opcode class; most end by encoding A as a length 1..1024."""
    prog = [stmt(BPF_ST, 0), stmt(BPF_STX, 1)]  # M[0], M[1] readable from here on
    for _ in range(rng.randrange(1, 12)):
        kind = rng.randrange(9)
        if kind == 0:
            code = BPF_LD | rng.choice((BPF_W, BPF_H, BPF_B)) | rng.choice((BPF_ABS, BPF_IND))
            prog.append(stmt(code, _pick(rng, _OFFSETS)))
        elif kind == 1:
            prog.append(stmt(rng.choice((BPF_LD, BPF_LDX)) | BPF_IMM, _pick(rng, _VALUES)))
        elif kind == 2:
            code = rng.choice((BPF_LD | BPF_W | BPF_LEN, BPF_LDX | BPF_W | BPF_LEN, BPF_LDX | BPF_B | BPF_MSH))
            prog.append(stmt(code, rng.choice((0, 1, 1500))))
        elif kind in (3, 4, 5):
            op = rng.choice(_ALU)
            k = _pick(rng, _VALUES)
            if op != BPF_NEG and rng.random() < 0.5:
                prog.append(stmt(BPF_ALU | op | BPF_X))
            elif op in (BPF_LSH, BPF_RSH):
                prog.append(stmt(BPF_ALU | op | BPF_K, k % 32))  # K >= 32 is refused
            elif op in (BPF_DIV, BPF_MOD):
                prog.append(stmt(BPF_ALU | op | BPF_K, k or 7))  # so is K = 0
            else:
                prog.append(stmt(BPF_ALU | op | BPF_K, k))
        elif kind == 6:
            prog.append(stmt(BPF_MISC | rng.choice((BPF_TAX, BPF_TXA))))
        elif kind == 7:
            prog += [stmt(rng.choice((BPF_ST, BPF_STX)), rng.randrange(2)),
                     stmt(rng.choice((BPF_LD, BPF_LDX)) | BPF_MEM, rng.randrange(2))]
        else:
            # Skip the next instruction or not: JA 0/1, or a condition's jt=1.
            op = rng.choice((BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET))
            if op == BPF_JA:
                prog.append(jump(BPF_JMP | BPF_JA, rng.randrange(2)))
            else:
                prog.append(jump(BPF_JMP | op | rng.choice((BPF_K, BPF_X)), _pick(rng, _VALUES), 1, 0))
            prog.append(stmt(BPF_ALU | BPF_ADD | BPF_K, 1))
    if rng.random() < 0.1:
        return prog + [stmt(BPF_RET | BPF_K, rng.choice((0, 1, 64, 0xFFFFFFFF)))]
    # Received length = min(packet length, A & 0x3ff + 1): every packet is longer, except one.
    return prog + [stmt(BPF_ALU | BPF_AND | BPF_K, 0x3FF), stmt(BPF_ALU | BPF_ADD | BPF_K, 1), stmt(BPF_RET | BPF_A)]


def test_random_programs_agree_with_the_kernel():
    """ALU edge cases (shifts by X >= 32, division by zero, wrap), IND/MSH/out-of-bounds loads, scratch, jumps."""
    rng = random.Random(20240617)
    programs = [_random_program(rng) for _ in range(250)]
    programs += [
        # Hand-picked: X shift amounts past 31, IND wrap-around, network-relative loads, division by X = 0.
        [stmt(BPF_LD | BPF_IMM, 1), stmt(BPF_LDX | BPF_IMM, 33), stmt(BPF_ALU | BPF_LSH | BPF_X), stmt(BPF_RET | BPF_A)],
        [stmt(BPF_LD | BPF_IMM, 512), stmt(BPF_LDX | BPF_IMM, 40), stmt(BPF_ALU | BPF_RSH | BPF_X), stmt(BPF_RET | BPF_A)],
        [stmt(BPF_LDX | BPF_IMM, 0xFFFFFFFF), stmt(BPF_LD | BPF_B | BPF_IND, 2), stmt(BPF_RET | BPF_A)],
        [stmt(BPF_LD | BPF_H | BPF_ABS, (SKF_NET_OFF + 2) & 0xFFFFFFFF), stmt(BPF_RET | BPF_A)],
        [stmt(BPF_LDX | BPF_IMM, SKF_NET_OFF & 0xFFFFFFFF), stmt(BPF_LD | BPF_B | BPF_IND, 9), stmt(BPF_RET | BPF_A)],
        [stmt(BPF_LD | BPF_B | BPF_ABS, 0xFFDFFFFF), stmt(BPF_RET | BPF_K, 64)],  # below SKF_LL_OFF
        [stmt(BPF_LD | BPF_IMM, 9), stmt(BPF_ALU | BPF_DIV | BPF_X), stmt(BPF_RET | BPF_K, 64)],
        [stmt(BPF_LD | BPF_IMM, 9), stmt(BPF_ALU | BPF_MOD | BPF_X), stmt(BPF_RET | BPF_K, 64)],
    ]
    for program in programs:
        validate(program)
    rng_bytes = random.Random(7)
    packets = [
        bytes([0x45]) + rng_bytes.randbytes(1099),
        bytes([0x4F]) + rng_bytes.randbytes(1199),
        bytes([0x46]) + rng_bytes.randbytes(29),
        ipv4(UDP, udp(dport=62201, payload=rng_bytes.randbytes(1000)), ihl=6),
    ]
    with _loopback_namespace() as ns:
        seen, got = _capture(ns, programs, _inject(ns, packets), len(packets))
    assert Counter(seen) == Counter(packets)
    for program, received in zip(programs, got):
        assert Counter(received) == _expected(program, packets), _dump(program)


def _dump(program: Program) -> str:
    """A one-line program for an assertion message."""
    return "; ".join(f"({c:#x},{jt},{jf},{k:#x})" for c, jt, jf, k in program)


@pytest.mark.parametrize("k", [0, 1, 15, 16, 32, 0xFFFFF000, 0xFFFFF004, 0xFFFFF040])
def test_validate_refuses_what_so_attach_filter_refuses(k):
    """Every 9-bit opcode, as [insn, ret #0] and [insn, ret #0, ret #0]: validate() and the kernel agree."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # never bound: receives nothing
    disagree = []
    with sock:
        for code in range(0x200):
            for program in ([(code, 0, 0, k), (BPF_RET | BPF_K, 0, 0, 0)],
                            [(code, 1, 0, k), (BPF_RET | BPF_K, 0, 0, 0), (BPF_RET | BPF_K, 0, 0, 0)],
                            [(code, 0, 0, k)]):
                try:
                    validate(program)
                    ours = True
                except ValueError:
                    ours = False
                try:
                    attach_filter(sock, program)
                    theirs = True
                except FilterError:
                    theirs = False
                if ours != theirs:
                    disagree.append((program, ours, theirs))
    assert not disagree, disagree[:10]
