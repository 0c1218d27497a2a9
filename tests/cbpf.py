"""An exact interpreter of Linux classic BPF socket filters, for tests (stdlib only).

A program is a list of ``(code, jt, jf, k)`` tuples, as ``spa.server.bpf``
compiles them. ``run`` executes it as the kernel does after converting it to
eBPF (net/core/filter.c: ``bpf_convert_filter``, ``convert_bpf_ld_abs``) and
returns the accept length (0 = drop); ``validate`` refuses what
``bpf_check_classic`` refuses (``SO_ATTACH_FILTER`` fails with EINVAL).

The packet is the socket's view of it: for an AF_PACKET ``SOCK_DGRAM``
socket, the bytes from the network (IP) header on. Choices, where the
classic BPF text leaves room, follow Linux:

* A, X and the scratch words start at 0 (``validate`` already refuses a read
  of a scratch word that some path has not written).
* A packet load past the end returns 0 from the program, for ABS, IND and
  MSH alike (the load helpers fail and the program exits with A = 0).
* IND loads use ``(X + k) mod 2**32`` as a signed 32-bit offset (the helper
  takes an ``int``). A negative offset from ``SKF_NET_OFF`` up reads relative
  to the network header, which is the packet's start here; from
  ``SKF_LL_OFF`` up it would read the link-layer header, which this
  interpreter does not have (``NotImplementedError``); below, the program
  drops. ABS loads with ``k >= SKF_AD_OFF`` are ancillary (``skb`` metadata):
  ``NotImplementedError``.
* ``DIV``/``MOD`` by X = 0 return 0 from the program (K = 0 is refused).
* ``LSH``/``RSH`` by X shift by ``X & 31``: the eBPF interpreter masks 32-bit
  shift amounts so, and the x86-64 and arm64 JITs' 32-bit shifts do the same
  in hardware. Shifts by K >= 32 are refused by ``validate``.
* ``RSH`` is logical and comparisons are unsigned 32-bit (the kernel moves
  a K with the top bit set into a register rather than sign-extend it).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

Insn = tuple[int, int, int, int]

# linux/bpf_common.h and linux/filter.h.
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_A = 0x10  # RET's A source (BPF_RVAL)
BPF_TAX, BPF_TXA = 0x00, 0x80

BPF_MEMWORDS = 16
BPF_MAXINSNS = 4096
SKF_AD_OFF, SKF_NET_OFF, SKF_LL_OFF = -0x1000, -0x100000, -0x200000
# SKF_AD_PROTOCOL (0) ... SKF_AD_VLAN_TPID (60): the ancillary offsets the kernel knows.
SKF_AD_MAX = 64
_ANCILLARY = frozenset(range(0, SKF_AD_MAX, 4))

_U32 = 0xFFFFFFFF
_SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}

_ALU_OPS: dict[int, Callable[[int, int], int]] = {
    BPF_ADD: operator.add, BPF_SUB: operator.sub, BPF_MUL: operator.mul,
    BPF_DIV: operator.floordiv, BPF_MOD: operator.mod,
    BPF_OR: operator.or_, BPF_AND: operator.and_, BPF_XOR: operator.xor,
    BPF_LSH: lambda a, n: a << (n & 31), BPF_RSH: lambda a, n: a >> (n & 31),
}
_JUMP_TESTS: dict[int, Callable[[int, int], bool]] = {
    BPF_JEQ: operator.eq, BPF_JGT: operator.gt, BPF_JGE: operator.ge,
    BPF_JSET: lambda a, b: bool(a & b),
}
_CONDITIONAL = frozenset(BPF_JMP | op | src for op in _JUMP_TESTS for src in (BPF_K, BPF_X))
_MEMORY = frozenset({BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM, BPF_ST, BPF_STX})
_LD_ABS = frozenset(BPF_LD | size | BPF_ABS for size in _SIZES)

# net/core/filter.c chk_code_allowed(): every other code is refused.
ALLOWED_CODES = frozenset(
    {BPF_ALU | op | src for op in _ALU_OPS for src in (BPF_K, BPF_X)}
    | {BPF_ALU | BPF_NEG}
    | {BPF_LD | size | mode for size in _SIZES for mode in (BPF_ABS, BPF_IND)}
    | {BPF_LD | BPF_W | BPF_LEN, BPF_LD | BPF_IMM, BPF_LD | BPF_MEM}
    | {BPF_LDX | BPF_W | BPF_LEN, BPF_LDX | BPF_B | BPF_MSH, BPF_LDX | BPF_IMM, BPF_LDX | BPF_MEM}
    | {BPF_ST, BPF_STX, BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA, BPF_RET | BPF_K, BPF_RET | BPF_A}
    | {BPF_JMP | BPF_JA}
    | _CONDITIONAL
)


def stmt(code: int, k: int = 0) -> Insn:
    """``BPF_STMT``: an instruction that does not branch."""
    return (code, 0, 0, k & _U32)


def jump(code: int, k: int, jt: int = 0, jf: int = 0) -> Insn:
    """``BPF_JUMP``: a conditional jump (or ``BPF_JA`` with ``k`` as its offset)."""
    return (code, jt, jf, k & _U32)


def validate(program: Sequence[Insn]) -> None:
    """Raise ``ValueError`` for a program ``SO_ATTACH_FILTER`` would refuse (``bpf_check_classic``)."""
    n = len(program)
    if n == 0:
        raise ValueError("empty program")
    if n > BPF_MAXINSNS:
        raise ValueError(f"{n} instructions, over BPF_MAXINSNS ({BPF_MAXINSNS})")
    for pc, (code, jt, jf, k) in enumerate(program):
        where = f"instruction {pc} {(code, jt, jf, k)}"
        # The fields of struct sock_filter: u16 code, u8 jt, u8 jf, u32 k.
        if not (0 <= code <= 0xFFFF and 0 <= jt <= 0xFF and 0 <= jf <= 0xFF and 0 <= k <= _U32):
            raise ValueError(f"{where}: a field is out of range for struct sock_filter")
        if code not in ALLOWED_CODES:
            raise ValueError(f"{where}: unknown opcode {code:#x}")
        if code in (BPF_ALU | BPF_DIV | BPF_K, BPF_ALU | BPF_MOD | BPF_K) and k == 0:
            raise ValueError(f"{where}: division by constant zero")
        if code in (BPF_ALU | BPF_LSH | BPF_K, BPF_ALU | BPF_RSH | BPF_K) and k >= 32:
            raise ValueError(f"{where}: shift by {k}")
        if code in _MEMORY and k >= BPF_MEMWORDS:
            raise ValueError(f"{where}: scratch word {k} (there are {BPF_MEMWORDS})")
        if code == BPF_JMP | BPF_JA and k >= n - pc - 1:
            raise ValueError(f"{where}: jumps past the end")
        if code in _CONDITIONAL and pc + max(jt, jf) + 1 >= n:
            raise ValueError(f"{where}: jumps past the end")
        if code in _LD_ABS and k >= SKF_AD_OFF & _U32 and k - (SKF_AD_OFF & _U32) not in _ANCILLARY:
            raise ValueError(f"{where}: unknown ancillary load")
    if program[-1][0] not in (BPF_RET | BPF_K, BPF_RET | BPF_A):
        raise ValueError("the last instruction is not a RET")
    _check_scratch_written(program)


def _check_scratch_written(program: Sequence[Insn]) -> None:
    """Refuse a scratch read that some path reaches before a write (the kernel's check_load_and_stores).

    Mirrors the kernel to the letter, conservatism included: the words known
    written are intersected over the jumps into an instruction and over
    falling through, even from a RET.
    """
    every = (1 << BPF_MEMWORDS) - 1
    masks = [every] * len(program)
    written = 0
    for pc, (code, jt, jf, k) in enumerate(program):
        written &= masks[pc]
        if code in (BPF_ST, BPF_STX):
            written |= 1 << k
        elif code in (BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM):
            if not written & (1 << k):
                raise ValueError(f"instruction {pc} reads scratch word {k} before any write on some path")
        elif code == BPF_JMP | BPF_JA:
            masks[pc + 1 + k] &= written
            written = every
        elif code in _CONDITIONAL:
            masks[pc + 1 + jt] &= written
            masks[pc + 1 + jf] &= written
            written = every


class _Drop(Exception):
    """A load the kernel fails: the program returns 0."""


def _load(packet: bytes, offset: int, size: int) -> int:
    """``size`` bytes big-endian at ``offset`` (a signed 32-bit value, as the kernel's helpers take it)."""
    if offset < 0:
        if offset >= SKF_NET_OFF:
            offset -= SKF_NET_OFF  # relative to the network header: the packet's first byte here
        elif offset >= SKF_LL_OFF:
            raise NotImplementedError("link-layer relative load (SKF_LL_OFF): no link-layer header here")
        else:
            raise _Drop
    if offset + size > len(packet):
        raise _Drop
    return int.from_bytes(packet[offset:offset + size], "big")


def _register_load(mode: int, k: int, mem: list[int], packet: bytes) -> int:
    """The loads LD and LDX share: IMM, MEM and LEN."""
    if mode == BPF_IMM:
        return k
    if mode == BPF_MEM:
        return mem[k]
    return len(packet)


def _signed32(value: int) -> int:
    value &= _U32
    return value - (1 << 32) if value >> 31 else value


def run(program: Sequence[Insn], packet: bytes) -> int:
    """The program's verdict on ``packet``: the bytes to keep, 0 to drop.

    Raises ``ValueError`` for a program the kernel would refuse and
    ``NotImplementedError`` for an ancillary or link-layer load.
    """
    validate(program)
    try:
        return _execute(program, packet)
    except _Drop:
        return 0


def _execute(program: Sequence[Insn], packet: bytes) -> int:
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    pc = 0
    # Every jump goes forward, so len(program) steps reach a RET; the budget
    # and the assertion hold that even if validate() were wrong.
    for _ in range(len(program)):
        code, jt, jf, k = program[pc]
        cls, size, mode, op = code & 0x07, code & 0x18, code & 0xE0, code & 0xF0
        src = x if code & BPF_X else k
        nxt = pc + 1
        if cls == BPF_LD:
            if mode == BPF_ABS and k >= SKF_AD_OFF & _U32:
                raise NotImplementedError(f"ancillary load SKF_AD_OFF + {k - (SKF_AD_OFF & _U32)}")
            if mode == BPF_ABS:
                a = _load(packet, _signed32(k), _SIZES[size])
            elif mode == BPF_IND:
                a = _load(packet, _signed32(x + k), _SIZES[size])
            else:
                a = _register_load(mode, k, mem, packet)
        elif cls == BPF_LDX:
            if mode == BPF_MSH:  # ldxb 4*([k]&0xf): an IPv4 header's length
                x = (_load(packet, _signed32(k), 1) & 0x0F) << 2
            else:
                x = _register_load(mode, k, mem, packet)
        elif cls in (BPF_ST, BPF_STX):
            mem[k] = a if cls == BPF_ST else x
        elif cls == BPF_ALU:
            if op == BPF_NEG:
                a = -a & _U32
            elif op in (BPF_DIV, BPF_MOD) and src == 0:
                return 0
            else:
                a = _ALU_OPS[op](a, src) & _U32
        elif cls == BPF_JMP:
            if op == BPF_JA:
                nxt += k
            else:
                nxt += jt if _JUMP_TESTS[op](a, src) else jf
        elif cls == BPF_RET:
            return a if code & BPF_A else k
        else:  # MISC
            if op == BPF_TAX:
                x = a
            else:
                a = x
        assert nxt > pc, "classic BPF only jumps forward"
        pc = nxt
    raise AssertionError("ran past the step budget without a RET")
