"""spa.ebpf_asm: encodings checked against the kernel's documented opcodes (linux/bpf.h, filter.h)."""

from __future__ import annotations

import pytest

from spa import ebpf_asm as A


def _hex(a: A.Asm) -> list[str]:
    code = a.assemble()
    return [code[i:i + 8].hex() for i in range(0, len(code), 8)]


def test_basic_encodings():
    a = A.Asm()
    a.mov64_imm(A.R0, 1)  # BPF_ALU64 | BPF_MOV | BPF_K = 0xb7
    a.mov64_reg(A.R6, A.R1)  # 0xbf, dst 6, src 1
    a.alu64_imm(A.ADD, A.R2, -8)  # 0x07
    a.ldx(A.W, A.R2, A.R1, 4)  # BPF_LDX | BPF_MEM | BPF_W = 0x61
    a.stx(A.DW, A.R10, -8, A.R1)  # BPF_STX | BPF_MEM | BPF_DW = 0x7b
    a.st_imm(A.B, A.R10, -1, 0xFF)  # BPF_ST | BPF_MEM | BPF_B = 0x72
    a.ld_abs(A.B, 9)  # BPF_LD | BPF_ABS | BPF_B = 0x30
    a.ld_ind(A.H, A.R7, 2)  # BPF_LD | BPF_IND | BPF_H = 0x48
    a.to_be(A.R1, 32)  # BPF_ALU | BPF_END | BPF_TO_BE = 0xdc
    a.call(A.FN_ktime_get_ns)  # 0x85
    a.exit()  # 0x95
    assert _hex(a) == [
        "b700000001000000",
        "bf16000000000000",
        "07020000f8ffffff",
        "6112040000000000",
        "7b1af8ff00000000",
        "720affffff000000",
        "3000000009000000",
        "4870000002000000",
        "dc01000020000000",
        "8500000005000000",
        "9500000000000000",
    ]


def test_map_reference_takes_two_slots():
    a = A.Asm()
    a.ld_map_fd(A.R1, 5)
    a.ld_imm64(A.R2, 0x1122334455667788)
    assert _hex(a) == ["1811000005000000", "0000000000000000", "1802000088776655", "0000000044332211"]


def test_jumps_resolve_forward_and_backward_across_wide_instructions():
    a = A.Asm()
    a.label("top")
    a.jmp_imm(A.JEQ, A.R0, 7, "end")  # over ld_imm64 (2 slots) and ja: offset 3
    a.ld_imm64(A.R1, 1)
    a.ja("top")  # at slot 3: back to 0 is -4
    a.label("end")
    a.jmp_reg(A.JGT, A.R1, A.R2, "end")  # to itself: -1
    a.exit()
    assert _hex(a) == ["1500030007000000", "1801000001000000", "0000000000000000", "0500fcff00000000",
                       "2d21ffff00000000", "9500000000000000"]


def test_unsigned_immediates_wrap_to_the_signed_field():
    a = A.Asm()
    a.mov64_imm(A.R1, 0xFFFFFFFF)
    assert _hex(a) == ["b7010000ffffffff"]


@pytest.mark.parametrize("build", [
    lambda a: a.ja("nowhere"),
    lambda a: a.mov64_imm(11, 0),
    lambda a: a.mov64_imm(A.R0, 1 << 32),
    lambda a: a.ldx(A.W, A.R0, A.R1, 1 << 15),
    lambda a: a.ld_abs(A.DW, 0),
    lambda a: a.to_be(A.R0, 8),
])
def test_bad_programs_raise(build):
    a = A.Asm()
    with pytest.raises(A.AsmError):
        build(a)
        a.assemble()


def test_duplicate_label():
    a = A.Asm()
    a.label("x")
    with pytest.raises(A.AsmError):
        a.label("x")


def test_jmp32_and_atomic_add():
    a = A.Asm()
    a.label("x")
    a.jmp32_imm(A.JNE, A.R1, 0xC0000201, "x")  # BPF_JMP32 | BPF_JNE | BPF_K = 0x56
    a.atomic_add(A.DW, A.R0, 0, A.R1)  # BPF_STX | BPF_ATOMIC | BPF_DW = 0xdb, imm BPF_ADD
    assert _hex(a) == ["5601ffff010200c0", "db10000000000000"]


def test_alu32_encodings():
    a = A.Asm()
    a.alu32_imm(A.LSH, A.R4, 16)  # BPF_ALU | BPF_LSH | BPF_K = 0x64
    a.alu32_reg(A.ADD, A.R1, A.R2)  # BPF_ALU | BPF_ADD | BPF_X = 0x0c
    a.alu32_reg(A.MOV, A.R5, A.R4)  # 0xbc: the low half, zero-extended
    a.alu32_imm(A.ADD, A.R0, 0x6B206574)  # 0x04
    assert _hex(a) == ["6404000010000000", "0c21000000000000", "bc45000000000000", "040000007465206b"]


def test_map_call_array_element_and_add_one():
    a = A.Asm()
    a.map_call(A.FN_map_update_elem, 5, -24, -48, flags=0)
    a.label("none")
    a.array_element0(6, -4, "none")
    a.add_one(-8, 16)
    assert _hex(a) == [
        "1811000005000000", "0000000000000000",  # ld_imm64 r1 = map fd 5 (src 1: a pseudo map fd)
        "bfa2000000000000", "07020000e8ffffff",  # r2 = r10 - 24
        "bfa3000000000000", "07030000d0ffffff",  # r3 = r10 - 48
        "b704000000000000", "8500000002000000",  # r4 = 0; call map_update_elem
        "620afcff00000000",  # *(u32 *)(r10 - 4) = 0
        "1811000006000000", "0000000000000000",
        "bfa2000000000000", "07020000fcffffff", "8500000001000000",
        "1500f9ff00000000",  # if r0 == 0 goto none (7 slots back, counted from the next)
        "79a1f8ff00000000", "b702000001000000", "db21100000000000",  # r1 = *(r10 - 8); r2 = 1; lock *(r1 + 16) += r2
    ]
