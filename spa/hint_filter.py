"""The kernel's share of SPA screening: a classic BPF check of the key hint (pure: instructions in, out).

The capture filter (``spa.filter``, compiled by libpcap) passes to the SPA
port only UDP datagrams of the SPA size that start with the version byte.
A forgery of that size and version still reached the capture loop, where
the verifier drops it after one dictionary lookup of its 8-byte hint
(``Verifier.screen``): a few microseconds of Python, which at a flood
sender's full rate is the whole core. ``with_hint_check`` adds to a
compiled filter a test of the hint's first four bytes against the hints
the verifier holds, so such forgeries are dropped in the kernel, before a
copy, a wake-up or a line of Python.

It works on libpcap's program as it is: every accepting ``ret`` becomes a
jump to a postlude that lets through anything that is not a UDP datagram to
the SPA port, and of those only the ones whose hint prefix is listed. A
random hint passes with a chance of (hints listed) / 2**32; the verifier
still checks all eight bytes. IPv6 is read at fixed offsets (no extension
headers), as libpcap's own port test does.

The hints change every ``HINT_EPOCH`` seconds: the daemon rebuilds the
postlude (microseconds, no libpcap) when the verifier's index moves. A
postlude is about one instruction per hint, so the kernel's 4096-instruction
limit bounds how many can be listed (see ``fits``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Insn = tuple[int, int, int, int]

# linux/filter.h (classic BPF)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_W_IND, _LD_H_IND = 0x40, 0x48
_LDX_B_MSH = 0xB1
_ALU_RSH_K = 0x74
_JA, _JEQ_K, _JSET_K = 0x05, 0x15, 0x45
_RET_K, _RET_A = 0x06, 0x16
BPF_MAXINSNS = 4096
#: Compares per block: a conditional jump reaches at most 255 instructions ahead.
_BLOCK = 250
_UDP = 17


def prefixes(hints: Iterable[bytes]) -> list[int]:
    """The distinct first four bytes of each hint, as the big-endian words the kernel loads."""
    return sorted({int.from_bytes(h[:4], "big") for h in hints})


def _postlude(port: int, words: Sequence[int], snaplen: int) -> list[Insn]:
    # Offsets below are counted by hand: `jt`/`jf` and `ja` skip that many
    # instructions after their own. ACC is index 19, HINTS index 20.
    head: list[Insn] = [
        (_LD_B_ABS, 0, 0, 0),         # 0  A = first byte
        (_ALU_RSH_K, 0, 0, 4),        # 1  A = IP version
        (_JEQ_K, 0, 9, 4),            # 2  IPv4? else V6 (12)
        (_LD_B_ABS, 0, 0, 9),         # 3  protocol
        (_JEQ_K, 0, 14, _UDP),        # 4  not UDP: ACC
        (_LD_H_ABS, 0, 0, 6),         # 5  fragment offset
        (_JSET_K, 12, 0, 0x1FFF),     # 6  a later fragment: ACC (it has no UDP header)
        (_LDX_B_MSH, 0, 0, 0),        # 7  X = IPv4 header length
        (_LD_H_IND, 0, 0, 2),         # 8  destination port
        (_JEQ_K, 0, 9, port),         # 9  not the SPA port: ACC
        (_LD_W_IND, 0, 0, 9),         # 10 A = hint prefix (UDP header 8 + version byte 1)
        (_JA, 0, 0, 8),               # 11 HINTS
        (_JEQ_K, 0, 6, 6),            # 12 V6: not IPv6 either: ACC
        (_LD_B_ABS, 0, 0, 6),         # 13 next header
        (_JEQ_K, 0, 4, _UDP),         # 14 not UDP right behind the header: ACC
        (_LD_H_ABS, 0, 0, 42),        # 15 destination port (40 + 2)
        (_JEQ_K, 0, 2, port),         # 16 not the SPA port: ACC
        (_LD_W_ABS, 0, 0, 49),        # 17 A = hint prefix (40 + 8 + 1)
        (_JA, 0, 0, 1),               # 18 HINTS
        (_RET_K, 0, 0, snaplen),      # 19 ACC
    ]
    body: list[Insn] = []
    for start in range(0, len(words), _BLOCK):
        block = words[start:start + _BLOCK]
        m = len(block)
        # A match jumps to this block's own accept, m - j instructions ahead.
        body += [(_JEQ_K, m - j, 0, w) for j, w in enumerate(block)]
        body += [(_JA, 0, 0, 1), (_RET_K, 0, 0, snaplen)]
    return head + body + [(_RET_K, 0, 0, 0)]


def size(program_length: int, hint_count: int) -> int:
    """Instructions of ``with_hint_check`` for a program of that length and that many distinct prefixes."""
    blocks = -(-hint_count // _BLOCK)
    return program_length + 20 + hint_count + 2 * blocks + 1


def fits(program_length: int, hint_count: int) -> bool:
    return size(program_length, hint_count) <= BPF_MAXINSNS


def with_hint_check(program: Sequence[Insn], port: int, hints: Iterable[bytes]) -> list[Insn]:
    """``program`` with its SPA-port datagrams also required to carry one of ``hints`` (first 4 bytes).

    Raises ``ValueError`` for a program that accepts with ``ret A`` (libpcap
    does not emit it for filters) or that accepts nothing.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range")
    accepts = {k for code, _jt, _jf, k in program if code == _RET_K and k}
    if any(code == _RET_A for code, *_ in program):
        raise ValueError("the program returns A: its accepting returns cannot be told apart")
    if not accepts:
        raise ValueError("the program accepts nothing")
    n = len(program)
    out: list[Insn] = [
        (_JA, 0, 0, n - i - 1) if code == _RET_K and k else (code, jt, jf, k)
        for i, (code, jt, jf, k) in enumerate(program)
    ]
    return out + _postlude(port, prefixes(hints), max(accepts))
