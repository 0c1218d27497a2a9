"""XChaCha20-Poly1305 tag verification as eBPF instructions (pure: emits into an ``spa.ebpf_asm.Asm``).

A flood of forgeries made under a key hint someone saw on the wire (a
random nonce and body behind a real hint) can only be told from the
client's own packet by its Poly1305 tag. In Python that is ~14 µs a
datagram, so at a flood sender's full rate the capture drops packets and
the client's own is lost among them. Checked in the kernel, before the
packet is queued, a forgery costs a few microseconds of softirq and never
reaches the capture; the client's packet always does (``spa.spa_program``).

Only verification, and only what the SPA packet needs: HChaCha20 to the
subkey, the first ChaCha20 block (counter 0) for the one-time Poly1305
key, then Poly1305 over whole 16-byte blocks (the AEAD's padded message is
whole blocks by construction: RFC 8439 §2.8). Nothing is decrypted.

Working memory is a map value (the stack's 512 bytes are too few), reached
through a base register; every offset below is from that base. The code
is straight-line: no loops for the verifier to walk, no branch on secret
data (the final reduction selects with a mask). Loads of 32- and 64-bit
words are native order, so the host must be little-endian (checked by the
caller: x86_64 and aarch64 are).

Poly1305 uses five 26-bit limbs in 64-bit registers (as poly1305-donna's
32-bit code): a product of a limb (< 2**27) and a coefficient (< 5 * 2**26)
is below 2**56, and a sum of five below 2**59.
"""

from __future__ import annotations

from spa import ebpf_asm as A

__all__ = ["chacha_rounds", "hchacha20", "chacha20_poly_key", "poly1305", "tag_differs", "SIGMA",
           "STATE_SIZE", "POLY_WORK_SIZE"]

#: "expand 32-byte k" as four little-endian words.
SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
STATE_SIZE = 64
#: r (5 limbs), 5r (5), the products (5) and the reduced candidate (5), 8 bytes each.
POLY_WORK_SIZE = 20 * 8

_M26 = 0x3FFFFFF
_CLAMP_LO = 0x0FFFFFFC0FFFFFFF
_CLAMP_HI = 0x0FFFFFFC0FFFFFFC
_QUARTERS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
             (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))


def _rotl32(a: A.Asm, reg: int, n: int, tmp: int) -> None:
    a.alu32_reg(A.MOV, tmp, reg)
    a.alu32_imm(A.LSH, reg, n)
    a.alu32_imm(A.RSH, tmp, 32 - n)
    a.alu32_reg(A.OR, reg, tmp)


def chacha_rounds(a: A.Asm, base: int, state: int) -> None:
    """The 20 ChaCha rounds on the 16 words at ``base + state``, in place (no feed-forward). Uses r1-r5."""
    ra, rb, rc, rd, tmp = A.R1, A.R2, A.R3, A.R4, A.R5
    for _ in range(10):
        for q in _QUARTERS:
            for reg, i in zip((ra, rb, rc, rd), q):
                a.ldx(A.W, reg, base, state + 4 * i)
            for x, y, z, n in ((ra, rb, rd, 16), (rc, rd, rb, 12), (ra, rb, rd, 8), (rc, rd, rb, 7)):
                a.alu32_reg(A.ADD, x, y)  # a += b (or c += d)
                a.alu32_reg(A.XOR, z, x)  # d ^= a (or b ^= c)
                _rotl32(a, z, n, tmp)
            for reg, i in zip((ra, rb, rc, rd), q):
                a.stx(A.W, base, state + 4 * i, reg)


def _copy_words(a: A.Asm, dst_base: int, dst: int, src_base: int, src: int, n: int) -> None:
    for i in range(n):
        a.ldx(A.W, A.R1, src_base, src + 4 * i)
        a.stx(A.W, dst_base, dst + 4 * i, A.R1)


def _init_state(a: A.Asm, base: int, state: int, key_base: int, key: int) -> None:
    for i, w in enumerate(SIGMA):
        a.st_imm(A.W, base, state + 4 * i, w)
    _copy_words(a, base, state + 16, key_base, key, 8)


def hchacha20(a: A.Asm, base: int, state: int, key_base: int, key: int, nonce: int, out: int) -> None:
    """``base + out`` (32 bytes) = HChaCha20(key at ``key_base + key``, the 16 bytes at ``base + nonce``)."""
    _init_state(a, base, state, key_base, key)
    _copy_words(a, base, state + 48, base, nonce, 4)
    chacha_rounds(a, base, state)
    _copy_words(a, base, out, base, state, 4)
    _copy_words(a, base, out + 16, base, state + 48, 4)


def chacha20_poly_key(a: A.Asm, base: int, state: int, key: int, nonce8: int) -> None:
    """``base + state`` (its first 32 bytes) = the Poly1305 key of RFC 8439 §2.6: the first half of
    ChaCha20 block 0 for the key at ``base + key`` and the nonce ``0 || the 8 bytes at base + nonce8``."""
    _init_state(a, base, state, base, key)
    a.st_imm(A.W, base, state + 48, 0)  # block counter
    a.st_imm(A.W, base, state + 52, 0)  # XChaCha's nonce: four zero bytes, then the last eight
    _copy_words(a, base, state + 56, base, nonce8, 2)
    chacha_rounds(a, base, state)
    for i in range(8):  # the feed-forward, for the words the key needs
        a.ldx(A.W, A.R1, base, state + 4 * i)
        if i < 4:
            a.alu32_imm(A.ADD, A.R1, SIGMA[i])
        else:
            a.ldx(A.W, A.R2, base, key + 4 * (i - 4))
            a.alu32_reg(A.ADD, A.R1, A.R2)
        a.stx(A.W, base, state + 4 * i, A.R1)


#: How each 26-bit limb of a 128-bit number hi:lo is cut: (lo >> a) | (hi << b), or hi >> b when a is None.
_SPLIT = ((0, None), (26, None), (52, 12), (None, 14), (None, 40))


def _limb(a: A.Asm, dst: int, lo: int, hi: int, k: int, tmp: int) -> None:
    """Limb ``k`` of ``hi:lo`` into ``dst`` (26 bits; limb 4, the top 24, needs no mask). ``tmp``: scratch."""
    lo_shift, hi_shift = _SPLIT[k]
    if lo_shift is None:
        a.mov64_reg(dst, hi)
        a.alu64_imm(A.RSH, dst, hi_shift)
    else:
        a.mov64_reg(dst, lo)
        if lo_shift:
            a.alu64_imm(A.RSH, dst, lo_shift)
        if hi_shift is not None:  # limb 2 straddles the halves
            a.mov64_reg(tmp, hi)
            a.alu64_imm(A.LSH, tmp, hi_shift)
            a.alu64_reg(A.OR, dst, tmp)
    if k < 4:
        a.alu64_imm(A.AND, dst, _M26)


def _limbs(a: A.Asm, lo: int, hi: int, out: tuple[int, ...], tmp: int) -> None:
    """The 128-bit number ``hi:lo`` as five 26-bit limbs into the registers ``out`` (``lo`` and ``hi`` are kept)."""
    for k, limb in enumerate(out):
        _limb(a, limb, lo, hi, k, tmp)


def poly1305(a: A.Asm, base: int, key: int, msg: int, blocks: int, work: int, out: int) -> None:
    """``base + out`` (16 bytes) = Poly1305(the key at ``base + key``, ``blocks`` whole 16-byte blocks at
    ``base + msg``), with ``POLY_WORK_SIZE`` bytes at ``base + work``. Uses r0-r8."""
    r_off, s_off, d_off, g_off = work, work + 40, work + 80, work + 120
    h = (A.R1, A.R2, A.R3, A.R4, A.R5)
    # r, clamped, as limbs; and 5r (the coefficient of a limb that wraps past 2**130).
    a.ldx(A.DW, A.R6, base, key)
    a.ld_imm64(A.R0, _CLAMP_LO)
    a.alu64_reg(A.AND, A.R6, A.R0)
    a.ldx(A.DW, A.R7, base, key + 8)
    a.ld_imm64(A.R0, _CLAMP_HI)
    a.alu64_reg(A.AND, A.R7, A.R0)
    _limbs(a, A.R6, A.R7, h, A.R0)
    for i, reg in enumerate(h):
        a.stx(A.DW, base, r_off + 8 * i, reg)
        a.mov64_reg(A.R0, reg)
        a.alu64_imm(A.MUL, A.R0, 5)
        a.stx(A.DW, base, s_off + 8 * i, A.R0)
    for reg in h:
        a.mov64_imm(reg, 0)  # the accumulator
    for b in range(blocks):
        # h += the block, with the 2**128 bit of a whole block.
        a.ldx(A.DW, A.R6, base, msg + 16 * b)
        a.ldx(A.DW, A.R7, base, msg + 16 * b + 8)
        _add_block(a, h, A.R6, A.R7)
        # d_k = sum over j of h_j * (r_{k-j} or 5 r_{k-j+5}); then carried back to 26-bit limbs.
        for k in range(5):
            a.mov64_imm(A.R0, 0)
            for j in range(5):
                coef = r_off + 8 * (k - j) if j <= k else s_off + 8 * (k - j + 5)
                a.ldx(A.DW, A.R6, base, coef)
                a.alu64_reg(A.MUL, A.R6, h[j])
                a.alu64_reg(A.ADD, A.R0, A.R6)
            a.stx(A.DW, base, d_off + 8 * k, A.R0)
        for k in range(5):
            a.ldx(A.DW, h[k], base, d_off + 8 * k)
        _carry(a, h, A.R0)
    _finish(a, base, h, key, g_off, out)


def _add_block(a: A.Asm, h: tuple[int, ...], lo: int, hi: int) -> None:
    """h += hi:lo + 2**128 (limb by limb, for want of registers; r0 and r8 as scratch)."""
    for k, limb in enumerate(h):
        _limb(a, A.R0, lo, hi, k, A.R8)
        if k == 4:
            a.alu64_imm(A.OR, A.R0, 1 << 24)  # the 2**128 bit; hi >> 40 is already below 2**24
        a.alu64_reg(A.ADD, limb, A.R0)


def _carry(a: A.Asm, h: tuple[int, ...], c: int, start: int = 0) -> None:
    """Carry h[start] -> ... -> h4 -> 5 * h0 -> h1 (h1 may end just above 26 bits, as in donna)."""
    for k in range(start, 4):
        a.mov64_reg(c, h[k])
        a.alu64_imm(A.RSH, c, 26)
        a.alu64_imm(A.AND, h[k], _M26)
        a.alu64_reg(A.ADD, h[k + 1], c)
    a.mov64_reg(c, h[4])
    a.alu64_imm(A.RSH, c, 26)
    a.alu64_imm(A.AND, h[4], _M26)
    a.alu64_imm(A.MUL, c, 5)
    a.alu64_reg(A.ADD, h[0], c)
    a.mov64_reg(c, h[0])
    a.alu64_imm(A.RSH, c, 26)
    a.alu64_imm(A.AND, h[0], _M26)
    a.alu64_reg(A.ADD, h[1], c)


def _finish(a: A.Asm, base: int, h: tuple[int, ...], key: int, g_off: int, out: int) -> None:
    """h fully reduced mod 2**130 - 5, plus s (the key's second half), mod 2**128, to ``base + out``."""
    c, g, mask, notmask = A.R0, A.R6, A.R7, A.R8
    _carry(a, h, c, start=1)  # once more from h1 on, so that every limb is below 2**26
    # g = h + 5 - 2**130: when it does not borrow, h was at least p and g is h mod p.
    a.mov64_imm(c, 5)
    for k in range(5):
        a.mov64_reg(g, h[k])
        a.alu64_reg(A.ADD, g, c)
        if k < 4:
            a.mov64_reg(c, g)
            a.alu64_imm(A.RSH, c, 26)
            a.alu64_imm(A.AND, g, _M26)
        else:
            a.alu64_imm(A.SUB, g, 1 << 26)
        a.stx(A.DW, base, g_off + 8 * k, g)
    # mask: all ones when g4 did not borrow (keep g), zero when it did (keep h). No branch on h.
    a.mov64_reg(mask, g)
    a.alu64_imm(A.RSH, mask, 63)
    a.alu64_imm(A.SUB, mask, 1)
    a.mov64_reg(notmask, mask)
    a.alu64_imm(A.XOR, notmask, -1)
    for k in range(5):
        a.ldx(A.DW, g, base, g_off + 8 * k)
        a.alu64_reg(A.AND, g, mask)
        a.alu64_reg(A.AND, h[k], notmask)
        a.alu64_reg(A.OR, h[k], g)
    # h as 128 bits: lo (r6) and hi (r7); the bits above 2**128 fall away.
    lo, hi = A.R6, A.R7
    a.mov64_reg(lo, h[1])
    a.alu64_imm(A.LSH, lo, 26)
    a.alu64_reg(A.OR, lo, h[0])
    a.mov64_reg(c, h[2])
    a.alu64_imm(A.LSH, c, 52)
    a.alu64_reg(A.OR, lo, c)
    a.mov64_reg(hi, h[2])
    a.alu64_imm(A.RSH, hi, 12)
    a.mov64_reg(c, h[3])
    a.alu64_imm(A.LSH, c, 14)
    a.alu64_reg(A.OR, hi, c)
    a.mov64_reg(c, h[4])
    a.alu64_imm(A.LSH, c, 40)
    a.alu64_reg(A.OR, hi, c)
    # + s, 32 bits at a time so that each carry is the bits above 32.
    carry = A.R8
    a.mov64_imm(carry, 0)
    for i, (src, upper) in enumerate(((lo, False), (lo, True), (hi, False), (hi, True))):
        t = A.R1
        a.mov64_reg(t, src)
        if upper:
            a.alu64_imm(A.RSH, t, 32)
        else:
            a.alu32_reg(A.MOV, t, t)  # the low half, zero-extended
        a.ldx(A.W, A.R2, base, key + 16 + 4 * i)
        a.alu64_reg(A.ADD, t, A.R2)
        a.alu64_reg(A.ADD, t, carry)
        a.stx(A.W, base, out + 4 * i, t)
        a.mov64_reg(carry, t)
        a.alu64_imm(A.RSH, carry, 32)


def tag_differs(a: A.Asm, base: int, one: int, other: int, result: int) -> None:
    """``result`` = 0 when the 16 bytes at ``base + one`` and ``base + other`` are equal, else not 0
    (no early exit). Uses ``result``, r1 and r2."""
    a.mov64_imm(result, 0)
    for i in (0, 8):
        a.ldx(A.DW, A.R1, base, one + i)
        a.ldx(A.DW, A.R2, base, other + i)
        a.alu64_reg(A.XOR, A.R1, A.R2)
        a.alu64_reg(A.OR, result, A.R1)
