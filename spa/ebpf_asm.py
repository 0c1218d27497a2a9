"""A small eBPF assembler: instructions in, the kernel's ``struct bpf_insn`` bytes out (pure).

The knock matcher's kernel program (``spa.knock_program``) is generated per
configuration, with each door's steps as constants, and the SPA port's
screen (``spa.spa_program``) per SPA port, so they are written here in
Python rather than compiled from C: no compiler, no libbpf, no new
dependency. Only what those programs need is here: 64- and 32-bit ALU,
loads and stores, legacy packet loads (``ld_abs``/``ld_ind``: they read
network-order values as host numbers and end the program with 0 when out of
bounds), map references, helper calls, jumps to named labels, and the few
sequences both generators repeat (``map_call``, ``array_element0``,
``add_one``).

Encoding (linux/bpf.h): 8 bytes a slot, ``code``, ``dst | src << 4``, a
signed 16-bit offset and a signed 32-bit immediate, little-endian; a jump's
offset counts slots from the one after it; ``ld_imm64`` takes two slots.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["Asm", "AsmError"]

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# Instruction classes.
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# Sizes.
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
_SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
# Modes.
IMM, ABS, IND, MEM, ATOMIC = 0x00, 0x20, 0x40, 0x60, 0xC0
# Source operand.
K, X = 0x00, 0x08
# ALU operations.
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH, END = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)
TO_BE = 0x08
# Jump operations.
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE, JSLT, JSLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)
PSEUDO_MAP_FD = 1

# Helper functions (linux/bpf.h ``enum bpf_func_id``).
FN_map_lookup_elem = 1
FN_map_update_elem = 2
FN_map_delete_elem = 3
FN_ktime_get_ns = 5
FN_skb_load_bytes = 26
FN_ringbuf_output = 130

_INSN = struct.Struct("<BBhi")


class AsmError(ValueError):
    """A program that cannot be encoded: unknown or duplicate label, jump out of range, bad operand."""


@dataclass(slots=True)
class _Slot:
    code: int
    dst: int
    src: int
    off: int
    imm: int
    target: str | None = None  # a label, resolved by assemble()


def _reg(r: int) -> int:
    if not 0 <= r <= 10:
        raise AsmError(f"no register r{r}")
    return r


def _imm32(v: int) -> int:
    if not -(1 << 31) <= v < (1 << 32):
        raise AsmError(f"immediate {v} does not fit 32 bits")
    return v - (1 << 32) if v >= (1 << 31) else v


def _off16(v: int) -> int:
    if not -(1 << 15) <= v < (1 << 15):
        raise AsmError(f"offset {v} does not fit 16 bits")
    return v


class Asm:
    """Collects instructions; ``assemble()`` resolves labels and returns the bytes."""

    def __init__(self) -> None:
        self._slots: list[_Slot] = []
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
              target: str | None = None) -> None:
        self._slots.append(_Slot(code, _reg(dst), _reg(src), _off16(off), _imm32(imm), target))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = len(self._slots)

    # -- ALU ---------------------------------------------------------------------------

    def alu64_imm(self, op: int, dst: int, imm: int) -> None:
        self._emit(ALU64 | op | K, dst, imm=imm)

    def alu64_reg(self, op: int, dst: int, src: int) -> None:
        self._emit(ALU64 | op | X, dst, src)

    def alu32_imm(self, op: int, dst: int, imm: int) -> None:
        """A 32-bit operation: the low halves, the result zero-extended (``imm`` is not sign-extended past 32 bits)."""
        self._emit(ALU | op | K, dst, imm=imm)

    def alu32_reg(self, op: int, dst: int, src: int) -> None:
        self._emit(ALU | op | X, dst, src)

    def mov64_imm(self, dst: int, imm: int) -> None:
        self.alu64_imm(MOV, dst, imm)

    def mov64_reg(self, dst: int, src: int) -> None:
        self.alu64_reg(MOV, dst, src)

    def to_be(self, dst: int, bits: int) -> None:
        """Host order to big-endian (a byte swap on little-endian hosts) of the low ``bits`` bits."""
        if bits not in (16, 32, 64):
            raise AsmError(f"byte swap of {bits} bits")
        self._emit(ALU | END | TO_BE, dst, imm=bits)

    def ld_imm64(self, dst: int, value: int, *, src: int = 0) -> None:
        if not 0 <= value < (1 << 64):
            raise AsmError(f"{value} does not fit 64 bits")
        self._emit(LD | DW | IMM, dst, src, imm=_imm32(value & 0xFFFFFFFF))
        self._emit(0, imm=_imm32(value >> 32))

    def ld_map_fd(self, dst: int, fd: int) -> None:
        """``dst`` = the map whose file descriptor is ``fd`` (the kernel swaps in its address at load)."""
        self.ld_imm64(dst, fd, src=PSEUDO_MAP_FD)

    # -- memory ------------------------------------------------------------------------

    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(LDX | MEM | size, dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(STX | MEM | size, dst, src, off)

    def st_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(ST | MEM | size, dst, off=off, imm=imm)

    def atomic_add(self, size: int, dst: int, off: int, src: int) -> None:
        """``*(dst + off) += src``, atomically (``size`` ``W`` or ``DW``)."""
        if size not in (W, DW):
            raise AsmError("atomic add is 4 or 8 bytes")
        self._emit(STX | ATOMIC | size, dst, src, off, imm=ADD)

    def ld_abs(self, size: int, off: int) -> None:
        """R0 = the packet's ``size`` bytes at ``off``, network order read as a number (R6 must hold the context)."""
        if size == DW:
            raise AsmError("ld_abs has no 8-byte form")
        self._emit(LD | ABS | size, imm=off)

    def ld_ind(self, size: int, src: int, off: int) -> None:
        """R0 = the packet's ``size`` bytes at ``src + off`` (as ``ld_abs``)."""
        if size == DW:
            raise AsmError("ld_ind has no 8-byte form")
        self._emit(LD | IND | size, src=src, imm=off)

    # -- control -----------------------------------------------------------------------

    def jmp_imm(self, op: int, dst: int, imm: int, target: str) -> None:
        self._emit(JMP | op | K, dst, imm=imm, target=target)

    def jmp_reg(self, op: int, dst: int, src: int, target: str) -> None:
        self._emit(JMP | op | X, dst, src, target=target)

    def jmp32_imm(self, op: int, dst: int, imm: int, target: str) -> None:
        """A jump on the low 32 bits of ``dst`` (no sign extension of ``imm`` against a 64-bit value)."""
        self._emit(JMP32 | op | K, dst, imm=imm, target=target)

    def ja(self, target: str) -> None:
        self._emit(JMP | JA, target=target)

    def call(self, helper: int) -> None:
        self._emit(JMP | CALL, imm=helper)

    def exit(self) -> None:
        self._emit(JMP | EXIT)

    def ret(self, value: int) -> None:
        """R0 = ``value``; exit."""
        self.mov64_imm(R0, value)
        self.exit()

    # -- common sequences (the generators' map calls and counters) ----------------------

    def map_call(self, helper: int, map_fd: int, key: int, value: int | None = None, flags: int | None = None) -> None:
        """``helper(map, r10 + key[, r10 + value[, flags]])``: a map lookup, update or delete; result in r0."""
        self.ld_map_fd(R1, map_fd)
        self.mov64_reg(R2, R10)
        self.alu64_imm(ADD, R2, key)
        if value is not None:
            self.mov64_reg(R3, R10)
            self.alu64_imm(ADD, R3, value)
        if flags is not None:
            self.mov64_imm(R4, flags)
        self.call(helper)

    def array_element0(self, map_fd: int, slot: int, missing: str) -> None:
        """r0 = the address of an array map's element 0 (the index goes in the stack's u32 at ``r10 + slot``);
        on to ``missing`` if there is none."""
        self.st_imm(W, R10, slot, 0)
        self.map_call(FN_map_lookup_elem, map_fd, slot)
        self.jmp_imm(JEQ, R0, 0, missing)

    def add_one(self, pointer: int, off: int) -> None:
        """``*(u64 *)(p + off) += 1``, atomically, where ``p`` is the address saved at ``r10 + pointer``
        (r1, r2 used)."""
        self.ldx(DW, R1, R10, pointer)
        self.mov64_imm(R2, 1)
        self.atomic_add(DW, R1, off, R2)

    # -- output ------------------------------------------------------------------------

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, s in enumerate(self._slots):
            off = s.off
            if s.target is not None:
                where = self._labels.get(s.target)
                if where is None:
                    raise AsmError(f"jump to undefined label {s.target!r}")
                off = _off16(where - pc - 1)
            out += _INSN.pack(s.code, s.dst | s.src << 4, off, s.imm)
        return bytes(out)


def size_bytes(size: int) -> int:
    """How many bytes a load or store of ``size`` (``W``, ``H``, ``B``, ``DW``) moves."""
    return _SIZE_BYTES[size]
