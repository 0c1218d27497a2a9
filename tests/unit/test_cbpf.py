"""The classic BPF interpreter of tests/cbpf.py: each opcode class by hand, the kernel's refusals, libpcap's programs.

Pure and fast: libpcap compiles (no capture handle), nothing touches a socket.
tests/netns/test_cbpf_kernel.py holds the same interpreter to a real kernel.
"""

from __future__ import annotations

import pytest

from spa.server import bpf
from spa.server.bpf import compile_filter
from tests.cbpf import (
    BPF_A, BPF_ABS, BPF_ADD, BPF_ALU, BPF_AND, BPF_B, BPF_DIV, BPF_H, BPF_IMM, BPF_IND, BPF_JA, BPF_JEQ, BPF_JGE,
    BPF_JGT, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX, BPF_LEN, BPF_LSH, BPF_MAXINSNS, BPF_MEM, BPF_MISC, BPF_MOD,
    BPF_MSH, BPF_MUL, BPF_NEG, BPF_OR, BPF_RET, BPF_RSH, BPF_ST, BPF_STX, BPF_SUB, BPF_TAX, BPF_TXA, BPF_W, BPF_X,
    BPF_XOR, SKF_AD_OFF, SKF_LL_OFF, SKF_NET_OFF, Insn, jump, run, stmt, validate,
)
from tests.rawip import ACK, FRAGMENT, SYN, TCP, UDP, frag6, ipv4, ipv6, tcp, udp

RET_A = stmt(BPF_RET | BPF_A)


def ret(k: int) -> Insn:
    return stmt(BPF_RET | BPF_K, k)


def ld(k: int) -> Insn:
    return stmt(BPF_LD | BPF_IMM, k)


def ldx(k: int) -> Insn:
    return stmt(BPF_LDX | BPF_IMM, k)


# -- encodings ------------------------------------------------------------------------


def test_opcodes_are_the_kernels():
    """The constants build the codes tcpdump -d prints (linux/filter.h values)."""
    assert stmt(BPF_LD | BPF_B | BPF_ABS, 0) == (0x30, 0, 0, 0)  # ldb [0]
    assert stmt(BPF_LD | BPF_H | BPF_ABS, 6) == (0x28, 0, 0, 6)  # ldh [6]
    assert stmt(BPF_LD | BPF_W | BPF_ABS, 16) == (0x20, 0, 0, 16)  # ld [16]
    assert stmt(BPF_LD | BPF_H | BPF_IND, 2) == (0x48, 0, 0, 2)  # ldh [x + 2]
    assert stmt(BPF_LD | BPF_B | BPF_IND, 8)[0] == 0x50  # ldb [x + 8]
    assert stmt(BPF_LDX | BPF_B | BPF_MSH, 0)[0] == 0xB1  # ldxb 4*([0]&0xf)
    assert stmt(BPF_ALU | BPF_AND | BPF_K, 0xF0) == (0x54, 0, 0, 0xF0)
    assert jump(BPF_JMP | BPF_JEQ | BPF_K, 0x40, 0, 4) == (0x15, 0, 4, 0x40)
    assert jump(BPF_JMP | BPF_JSET | BPF_K, 0x1FFF, 4, 0)[0] == 0x45
    assert jump(BPF_JMP | BPF_JGE | BPF_K, 1)[0] == 0x35 and jump(BPF_JMP | BPF_JGT | BPF_K, 1)[0] == 0x25
    assert ret(0xFFFF) == (0x06, 0, 0, 0xFFFF) and RET_A == (0x16, 0, 0, 0)
    assert stmt(BPF_MISC | BPF_TAX)[0] == 0x07 and stmt(BPF_MISC | BPF_TXA)[0] == 0x87
    assert stmt(BPF_LD | BPF_W | BPF_LEN)[0] == 0x80 and stmt(BPF_ST, 1)[0] == 0x02
    assert stmt(BPF_ALU | BPF_NEG)[0] == 0x84 and stmt(BPF_ALU | BPF_MOD | BPF_X)[0] == 0x9C
    assert BPF_MAXINSNS == bpf.BPF_MAXINSNS
    assert run(bpf.DROP_ALL, b"\x45") == 0


# -- ALU ------------------------------------------------------------------------------

U32 = 0xFFFFFFFF

ALU_CASES = [
    (BPF_ADD, 5, 7, 12), (BPF_ADD, U32, 2, 1),
    (BPF_SUB, 7, 5, 2), (BPF_SUB, 1, 2, U32),
    (BPF_MUL, 6, 7, 42), (BPF_MUL, 0x10000, 0x10000, 0), (BPF_MUL, 0x80000001, 2, 2),
    (BPF_DIV, 7, 2, 3), (BPF_DIV, U32, 2, 0x7FFFFFFF), (BPF_DIV, 1, U32, 0),
    (BPF_MOD, 7, 3, 1), (BPF_MOD, U32, 0x10, 0xF), (BPF_MOD, 3, U32, 3),
    (BPF_OR, 0xF0, 0x0F, 0xFF), (BPF_AND, 0xF0F0, 0xFF00, 0xF000), (BPF_XOR, 0xFF, 0x0F, 0xF0),
    (BPF_LSH, 1, 31, 0x80000000), (BPF_LSH, 3, 31, 0x80000000), (BPF_LSH, 0xABCD, 0, 0xABCD),
    (BPF_RSH, 0x80000000, 31, 1), (BPF_RSH, U32, 4, 0x0FFFFFFF),  # logical, not arithmetic
]


@pytest.mark.parametrize("op,a,b,want", ALU_CASES)
def test_alu_with_k_and_with_x(op, a, b, want):
    assert run([ld(a), stmt(BPF_ALU | op | BPF_K, b), RET_A], b"") == want
    assert run([ld(a), ldx(b), stmt(BPF_ALU | op | BPF_X), RET_A], b"") == want


@pytest.mark.parametrize("a,want", [(1, U32), (0, 0), (0x80000000, 0x80000000), (U32, 1)])
def test_neg_wraps(a, want):
    assert run([ld(a), stmt(BPF_ALU | BPF_NEG), RET_A], b"") == want


@pytest.mark.parametrize("op", [BPF_DIV, BPF_MOD])
def test_division_by_x_zero_returns_zero_from_the_program(op):
    # ret #99 is never reached: the kernel exits with 0 at the division.
    assert run([ld(7), ldx(0), stmt(BPF_ALU | op | BPF_X), ret(99)], b"") == 0
    assert run([ld(7), ldx(0), stmt(BPF_ALU | BPF_ADD | BPF_X), ret(99)], b"") == 99


@pytest.mark.parametrize("op,a,x,want", [
    (BPF_LSH, 1, 32, 1), (BPF_LSH, 1, 33, 2), (BPF_LSH, 1, 63, 0x80000000), (BPF_LSH, 1, U32, 0x80000000),
    (BPF_RSH, 0x80000000, 32, 0x80000000), (BPF_RSH, 0x80000000, 35, 0x10000000),
])
def test_shift_by_x_uses_its_low_five_bits(op, a, x, want):
    assert run([ld(a), ldx(x), stmt(BPF_ALU | op | BPF_X), RET_A], b"") == want


# -- jumps ----------------------------------------------------------------------------

JUMP_CASES = [
    (BPF_JEQ, 5, 5, True), (BPF_JEQ, 5, 6, False),
    (BPF_JGT, 6, 5, True), (BPF_JGT, 5, 5, False), (BPF_JGT, 0x80000000, 0x7FFFFFFF, True), (BPF_JGT, 1, U32, False),
    (BPF_JGE, 5, 5, True), (BPF_JGE, 4, 5, False), (BPF_JGE, U32, 0x80000000, True),
    (BPF_JSET, 0x12, 0x02, True), (BPF_JSET, 0x10, 0x02, False), (BPF_JSET, 0x80000000, 0x80000000, True),
]


@pytest.mark.parametrize("op,a,b,taken", JUMP_CASES)
def test_conditional_jumps_k_and_x_unsigned(op, a, b, taken):
    # jt skips two instructions, jf one: each lands on its own RET.
    tail = [ret(1), ret(2), ret(3)]
    want = 3 if taken else 2
    assert run([ld(a), jump(BPF_JMP | op | BPF_K, b, 2, 1), *tail], b"") == want
    assert run([ld(a), ldx(b), jump(BPF_JMP | op | BPF_X, 0, 2, 1), *tail], b"") == want


def test_jt_and_jf_zero_fall_through():
    assert run([ld(1), jump(BPF_JMP | BPF_JEQ | BPF_K, 1), ret(7), ret(8)], b"") == 7


def test_ja_skips_k_instructions():
    prog = [ld(1), jump(BPF_JMP | BPF_JA, 3), ret(10), ret(11), ret(12), ret(13)]
    assert run(prog, b"") == 13
    assert run([jump(BPF_JMP | BPF_JA, 0), ret(5)], b"") == 5


def test_jump_offsets_count_from_the_next_instruction():
    prog = [ld(0), jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 255, 0), ret(1)] + [ret(2)] * 254 + [ret(3)]
    assert run(prog, b"") == 3


# -- loads ----------------------------------------------------------------------------

PKT = bytes(range(0x40, 0x60))  # 32 bytes: 0x40, 0x41, ...


@pytest.mark.parametrize("size,k,want", [(BPF_B, 0, 0x40), (BPF_H, 1, 0x4142), (BPF_W, 28, 0x5C5D5E5F)])
def test_absolute_loads_are_big_endian(size, k, want):
    assert run([stmt(BPF_LD | size | BPF_ABS, k), RET_A], PKT) == want


@pytest.mark.parametrize("size,k", [(BPF_B, 32), (BPF_H, 31), (BPF_W, 29), (BPF_W, 0xFFFF), (BPF_B, 0x7FFFFFFF)])
def test_absolute_load_past_the_end_drops(size, k):
    assert run([stmt(BPF_LD | size | BPF_ABS, k), ret(1)], PKT) == 0


def test_indirect_loads_add_x():
    assert run([ldx(4), stmt(BPF_LD | BPF_H | BPF_IND, 2), RET_A], PKT) == 0x4647
    assert run([ldx(30), stmt(BPF_LD | BPF_H | BPF_IND, 0), RET_A], PKT) == 0x5E5F
    assert run([ldx(30), stmt(BPF_LD | BPF_H | BPF_IND, 1), ret(1)], PKT) == 0
    assert run([ldx(31), stmt(BPF_LD | BPF_W | BPF_IND, 0), ret(1)], PKT) == 0
    # X + k wraps at 32 bits: 0xffffffff + 2 is offset 1.
    assert run([ldx(U32), stmt(BPF_LD | BPF_B | BPF_IND, 2), RET_A], PKT) == 0x41


def test_msh_is_four_times_the_low_nibble():
    assert run([stmt(BPF_LDX | BPF_B | BPF_MSH, 0), stmt(BPF_MISC | BPF_TXA), RET_A], PKT) == 0
    assert run([stmt(BPF_LDX | BPF_B | BPF_MSH, 15), stmt(BPF_MISC | BPF_TXA), RET_A], PKT) == 0x3C
    ihl6 = ipv4(UDP, udp(dport=53), ihl=6)
    prog = [stmt(BPF_LDX | BPF_B | BPF_MSH, 0), stmt(BPF_LD | BPF_H | BPF_IND, 2), RET_A]
    assert run(prog, ihl6) == 53
    assert run([stmt(BPF_LDX | BPF_B | BPF_MSH, 32), ret(1)], PKT) == 0


def test_msh_leaves_a_alone():
    assert run([ld(77), stmt(BPF_LDX | BPF_B | BPF_MSH, 0), RET_A], PKT) == 77


def test_len_imm_and_register_moves():
    assert run([stmt(BPF_LD | BPF_W | BPF_LEN), RET_A], PKT) == 32
    assert run([stmt(BPF_LDX | BPF_W | BPF_LEN), stmt(BPF_MISC | BPF_TXA), RET_A], PKT[:5]) == 5
    assert run([ld(9), stmt(BPF_MISC | BPF_TAX), ld(1), stmt(BPF_ALU | BPF_ADD | BPF_X), RET_A], b"") == 10


def test_a_and_x_start_at_zero():
    assert run([RET_A], PKT) == 0
    assert run([stmt(BPF_MISC | BPF_TXA), stmt(BPF_ALU | BPF_ADD | BPF_K, 1), RET_A], PKT) == 1


def test_scratch_memory():
    prog = [
        ld(5), stmt(BPF_ST, 3), ldx(1000), stmt(BPF_STX, 15), ld(0), ldx(0),
        stmt(BPF_LD | BPF_MEM, 3), stmt(BPF_LDX | BPF_MEM, 15), stmt(BPF_ALU | BPF_ADD | BPF_X), RET_A,
    ]
    assert run(prog, b"") == 1005


def test_network_relative_load_reads_from_the_packet_start():
    # The packet starts at the network header, so SKF_NET_OFF + n is byte n.
    assert run([stmt(BPF_LD | BPF_H | BPF_ABS, (SKF_NET_OFF + 2) & U32), RET_A], PKT) == 0x4243
    assert run([ldx(SKF_NET_OFF & U32), stmt(BPF_LD | BPF_B | BPF_IND, 1), RET_A], PKT) == 0x41
    assert run([stmt(BPF_LD | BPF_B | BPF_ABS, (SKF_NET_OFF + 32) & U32), ret(1)], PKT) == 0
    # Below SKF_LL_OFF the kernel finds no header at all: drop.
    assert run([stmt(BPF_LD | BPF_B | BPF_ABS, (SKF_LL_OFF - 1) & U32), ret(1)], PKT) == 0


def test_ancillary_and_link_layer_loads_are_not_modelled():
    with pytest.raises(NotImplementedError):
        run([stmt(BPF_LD | BPF_H | BPF_ABS, SKF_AD_OFF & U32), RET_A], PKT)  # SKF_AD_PROTOCOL
    with pytest.raises(NotImplementedError):
        run([stmt(BPF_LD | BPF_B | BPF_ABS, SKF_LL_OFF & U32), RET_A], PKT)


def test_ret_k_and_ret_a_values():
    assert run([ret(0)], PKT) == 0
    assert run([ret(U32)], PKT) == U32
    assert run([ld(0x1234), RET_A], PKT) == 0x1234


# -- what the kernel refuses ----------------------------------------------------------


def test_validate_accepts_libpcap_and_hand_programs():
    validate([ret(0)])
    validate([ret(0)] * BPF_MAXINSNS)
    validate([jump(BPF_JMP | BPF_JA, 1), ld(1), RET_A])
    validate([stmt(BPF_LD | BPF_W | BPF_ABS, (SKF_AD_OFF + 60) & U32), RET_A])  # SKF_AD_VLAN_TPID
    for expression in EXPRESSIONS:
        validate(compile_filter(expression))


@pytest.mark.parametrize("program,why", [
    ([], "empty"),
    ([ret(0)] * (BPF_MAXINSNS + 1), "BPF_MAXINSNS"),
    ([ld(1)], "last instruction"),
    ([ret(0), ld(1)], "last instruction"),
    ([stmt(BPF_RET | BPF_X), ret(0)], "opcode"),  # RET X exists in BSD, not in Linux
    ([stmt(BPF_LD | BPF_H | BPF_LEN), ret(0)], "opcode"),
    ([stmt(BPF_ALU | BPF_NEG | BPF_X), ret(0)], "opcode"),
    ([stmt(BPF_LD | BPF_B | BPF_MSH), ret(0)], "opcode"),
    ([stmt(BPF_LDX | BPF_W | BPF_ABS), ret(0)], "opcode"),
    ([stmt(0xB0 | BPF_ALU), ret(0)], "opcode"),
    ([stmt(0x100 | BPF_RET), ret(0)], "opcode"),
    ([stmt(BPF_ALU | BPF_DIV | BPF_K, 0), ret(0)], "zero"),
    ([stmt(BPF_ALU | BPF_MOD | BPF_K, 0), ret(0)], "zero"),
    ([stmt(BPF_ALU | BPF_LSH | BPF_K, 32), ret(0)], "shift"),
    ([stmt(BPF_ALU | BPF_RSH | BPF_K, 32), ret(0)], "shift"),
    ([stmt(BPF_ST, 16), ret(0)], "scratch word 16"),
    ([stmt(BPF_STX, 16), ret(0)], "scratch word 16"),
    ([stmt(BPF_ST, 0), stmt(BPF_LD | BPF_MEM, 16), ret(0)], "scratch word 16"),
    ([stmt(BPF_ST, 0), stmt(BPF_LDX | BPF_MEM, 16), ret(0)], "scratch word 16"),
    ([jump(BPF_JMP | BPF_JA, 1), ret(0)], "past the end"),
    ([jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), ret(0)], "past the end"),
    ([jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1), ret(0)], "past the end"),
    ([jump(BPF_JMP | BPF_JSET | BPF_X, 0, 0, 0)], "past the end"),
    ([stmt(BPF_LD | BPF_B | BPF_ABS, (SKF_AD_OFF + 64) & U32), ret(0)], "ancillary"),
    ([stmt(BPF_LD | BPF_B | BPF_ABS, (SKF_AD_OFF + 2) & U32), ret(0)], "ancillary"),
    ([(0x06, 0, 0, -1)], "out of range"),
    ([(0x06, 256, 0, 0)], "out of range"),
    ([stmt(BPF_LD | BPF_MEM, 0), RET_A], "before any write"),
    # M[0] is written on the jf path only.
    ([jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), stmt(BPF_ST, 0), stmt(BPF_LD | BPF_MEM, 0), RET_A], "before any write"),
    # The kernel's check does not reset after a RET: the unreachable read still counts.
    ([ret(0), stmt(BPF_LD | BPF_MEM, 0), RET_A], "before any write"),
])
def test_validate_refuses_what_the_kernel_refuses(program, why):
    with pytest.raises(ValueError, match=why):
        validate(program)
    with pytest.raises(ValueError):
        run(program, PKT)


def test_scratch_written_on_every_path_is_readable():
    prog = [
        jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2), stmt(BPF_ST, 4), jump(BPF_JMP | BPF_JA, 1),
        stmt(BPF_STX, 4), stmt(BPF_LD | BPF_MEM, 4), RET_A,
    ]
    validate(prog)
    assert run(prog, b"") == 0


# -- libpcap's programs: the verdicts the expressions mean ------------------------------

EXPRESSIONS = [
    "udp dst port 62201",
    "tcp dst port 7000 and (tcp[13] & 0x12) = 0x02",
    "dst host 192.0.2.1 and udp dst portrange 20000-29999",
    "ip6 and udp dst port 53",
    "udp[4:2] = 279 and udp[8] = 1",
    "ip6[44:2] = 279",
]

MORE_FRAGMENTS = 0x2000
# A UDP datagram of length 279 whose payload starts with 1.
MARKED = udp(dport=5000, payload=b"\x01" + b"m" * 270)

CASES = {
    "udp dst port 62201": [
        ("v4", ipv4(UDP, udp(dport=62201)), True),
        ("v4 options ihl=6", ipv4(UDP, udp(dport=62201), ihl=6), True),
        ("v4 options ihl=15", ipv4(UDP, udp(dport=62201), ihl=15), True),
        ("v4 first fragment", ipv4(UDP, udp(dport=62201), frag=MORE_FRAGMENTS), True),
        ("v4 later fragment", ipv4(UDP, udp(dport=62201), frag=185), False),
        ("v4 last fragment", ipv4(UDP, udp(dport=62201), frag=MORE_FRAGMENTS | 1), False),
        ("v4 wrong port", ipv4(UDP, udp(dport=62202)), False),
        ("v4 source port", ipv4(UDP, udp(sport=62201, dport=7000)), False),
        ("v4 tcp", ipv4(TCP, tcp(dport=62201)), False),
        ("v4 cut before dport", ipv4(UDP, udp(dport=62201))[:23], False),
        ("v4 cut after dport", ipv4(UDP, udp(dport=62201))[:24], True),
        ("v4 options cut", ipv4(UDP, udp(dport=62201), ihl=15)[:62], False),
        ("version 5", ipv4(UDP, udp(dport=62201), version=5), False),
        ("v6", ipv6(UDP, udp(dport=62201)), True),
        ("v6 wrong port", ipv6(UDP, udp(dport=62202)), False),
        ("v6 fragment header", ipv6(FRAGMENT, frag6(UDP) + udp(dport=62201)), False),
        ("v6 cut", ipv6(UDP, udp(dport=62201))[:43], False),
        ("empty", b"", False),
    ],
    "tcp dst port 7000 and (tcp[13] & 0x12) = 0x02": [
        ("syn", ipv4(TCP, tcp(dport=7000, flags=SYN)), True),
        ("syn options", ipv4(TCP, tcp(dport=7000, flags=SYN), ihl=7), True),
        ("syn ack", ipv4(TCP, tcp(dport=7000, flags=SYN | ACK)), False),
        ("ack", ipv4(TCP, tcp(dport=7000, flags=ACK)), False),
        ("syn wrong port", ipv4(TCP, tcp(dport=7001, flags=SYN)), False),
        ("udp", ipv4(UDP, udp(dport=7000)), False),
        ("later fragment", ipv4(TCP, tcp(dport=7000, flags=SYN), frag=3), False),
        ("cut before flags", ipv4(TCP, tcp(dport=7000, flags=SYN))[:33], False),
        # libpcap's tcp[] indexes IPv4 only: every IPv6 packet fails it.
        ("v6 syn", ipv6(TCP, tcp(dport=7000, flags=SYN)), False),
    ],
    "dst host 192.0.2.1 and udp dst portrange 20000-29999": [
        ("low end", ipv4(UDP, udp(dport=20000)), True),
        ("high end", ipv4(UDP, udp(dport=29999)), True),
        ("options", ipv4(UDP, udp(dport=25000), ihl=8), True),
        ("below", ipv4(UDP, udp(dport=19999)), False),
        ("above", ipv4(UDP, udp(dport=30000)), False),
        ("other host", ipv4(UDP, udp(dport=25000), dst="192.0.2.9"), False),
        ("source host", ipv4(UDP, udp(dport=25000), src="192.0.2.1", dst="192.0.2.2"), False),
        ("fragment", ipv4(UDP, udp(dport=25000), frag=MORE_FRAGMENTS | 7), False),
        ("tcp", ipv4(TCP, tcp(dport=25000)), False),
        ("v6", ipv6(UDP, udp(dport=25000)), False),
    ],
    "ip6 and udp dst port 53": [
        ("v6", ipv6(UDP, udp(dport=53)), True),
        ("v6 wrong port", ipv6(UDP, udp(dport=54)), False),
        ("v6 tcp", ipv6(TCP, tcp(dport=53)), False),
        ("v4", ipv4(UDP, udp(dport=53)), False),
        ("v6 cut", ipv6(UDP, udp(dport=53))[:42], False),
    ],
    "udp[4:2] = 279 and udp[8] = 1": [
        ("marked", ipv4(UDP, MARKED), True),
        ("marked options", ipv4(UDP, MARKED, ihl=9), True),
        ("other first byte", ipv4(UDP, udp(dport=5000, payload=b"\x02" + b"m" * 270)), False),
        ("other length", ipv4(UDP, udp(dport=5000, payload=b"\x01" + b"m" * 269)), False),
        ("cut before payload", ipv4(UDP, MARKED)[:28], False),
        ("cut after first byte", ipv4(UDP, MARKED)[:29], True),
        ("later fragment", ipv4(UDP, MARKED, frag=1), False),
        ("v6", ipv6(UDP, MARKED), False),
    ],
    "ip6[44:2] = 279": [
        ("v6 udp length", ipv6(UDP, MARKED), True),
        ("v6 cut", ipv6(UDP, MARKED)[:45], False),
        ("v6 other", ipv6(UDP, udp()), False),
        ("v4", ipv4(UDP, MARKED) + b"\x00" * 40, False),
    ],
}


@pytest.mark.parametrize("expression,name,packet,want", [
    pytest.param(expression, name, packet, want, id=f"{expression}: {name}")
    for expression, cases in CASES.items() for name, packet, want in cases
])
def test_libpcap_programs_mean_their_expressions(expression, name, packet, want):
    verdict = run(compile_filter(expression), packet)
    assert (verdict > 0) == want
    if want:
        assert verdict == 65535  # libpcap's ret #snaplen


def test_every_expression_has_cases():
    assert sorted(CASES) == sorted(EXPRESSIONS)
