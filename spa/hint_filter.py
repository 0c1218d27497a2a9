"""The kernel's share of SPA screening: classic BPF checks of the key hint and the nonce (pure: instructions in, out).

The capture filter (``spa.filter``, compiled by libpcap) passes to the SPA
port only UDP datagrams of the SPA size that start with the version byte.
Two kinds of flood still reached the capture loop, a few microseconds of
Python each, which at a flood sender's full rate is the whole core:

* forgeries of that size and version with a made-up key hint (the verifier
  drops them after one dictionary lookup, ``Verifier.screen``);
* copies of one real packet someone captured (dropped after one replay-cache
  lookup).

``with_hint_check`` adds to a compiled filter a test of the hint's first four
bytes against the hints the verifier holds, and of the nonce's first four
bytes against the nonces of packets already accepted, so both are dropped in
the kernel, before a copy, a wake-up or a line of Python.

It works on libpcap's program as it is: every accepting ``ret`` becomes a
jump to a postlude that lets through anything that is not a UDP datagram to
the SPA port, and of those only the ones whose hint prefix is listed and
whose nonce prefix is not. A random hint passes with a chance of (hints
listed) / 2**32, and a new packet is refused for a listed nonce prefix with
a chance of (nonces listed) / 2**32 (its client sends another); the verifier
still checks every byte. IPv6 is read at fixed offsets (no extension
headers), as libpcap's own port test does.

Hints change every ``HINT_EPOCH`` seconds and nonces with each accepted
packet: the daemon rebuilds the postlude (no libpcap, microseconds) when
they do. A postlude costs about one instruction a hint or nonce, so the
kernel's 4096-instruction limit bounds how many can be listed (``fits``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from spa.protocol import HINT_SIZE

Insn = tuple[int, int, int, int]

# linux/filter.h (classic BPF)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_W_IND, _LD_H_IND = 0x40, 0x48
_LDX_B_MSH, _LDX_IMM = 0xB1, 0x01
_ALU_RSH_K = 0x74
_JA, _JEQ_K, _JSET_K = 0x05, 0x15, 0x45
_RET_K, _RET_A = 0x06, 0x16
BPF_MAXINSNS = 4096
#: What the capture puts in front of every filter (``spa.server.capture.guard``) must still fit.
_BUDGET = BPF_MAXINSNS - 8
#: Compares per block: a conditional jump reaches at most 255 instructions ahead.
_BLOCK = 250
_UDP = 17
#: Where the hint and the nonce start, counted from the UDP header (8 bytes, then the version byte).
HINT_AT = 8 + 1
NONCE_AT = HINT_AT + HINT_SIZE
#: Instructions of the postlude besides the lists (see ``_postlude``).
_FIXED = 18


def prefixes(values: Iterable[bytes]) -> list[int]:
    """The distinct first four bytes of each value, as the big-endian words the kernel loads."""
    return sorted({int.from_bytes(v[:4], "big") for v in values})


class _Asm:
    """Instructions with symbolic jump targets, resolved to classic BPF's forward offsets."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, object]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: object = 0, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k))

    def resolve(self) -> list[Insn]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            def offset(target: object, limit: int) -> int:
                if isinstance(target, int):
                    return target
                d = self.labels[target] - (i + 1)  # type: ignore[index]
                if not 0 <= d <= limit:
                    raise ValueError(f"jump to {target} out of reach ({d})")
                return d
            if code == _JA:
                out.append((code, 0, 0, offset(k, 2**32 - 1)))
            else:
                out.append((code, offset(jt, 255), offset(jf, 255), k))  # type: ignore[arg-type]
        return out


def _list(asm: _Asm, name: str, words: Sequence[int], on_match: str, otherwise: str) -> None:
    """Compare A with each word: jump to ``on_match`` on one, to ``otherwise`` after the last."""
    for b, start in enumerate(range(0, len(words), _BLOCK)):
        block = words[start:start + _BLOCK]
        hit, nxt = f"{name}-hit-{b}", f"{name}-next-{b}"
        for w in block:
            asm.op(_JEQ_K, w, jt=hit)
        asm.op(_JA, nxt)
        asm.label(hit)
        asm.op(_JA, on_match)  # far: `ja` reaches anywhere ahead
        asm.label(nxt)
    asm.op(_JA, otherwise)


def _head_and_hints(port: int, hints: Sequence[int], snaplen: int) -> list[Insn]:
    # Ends where the nonce section begins ("nonce"), so that section can change alone.
    a = _Asm()
    a.op(_LD_B_ABS, 0)
    a.op(_ALU_RSH_K, 4)                      # A = IP version
    a.op(_JEQ_K, 4, jf="v6")
    a.op(_LD_B_ABS, 9)
    a.op(_JEQ_K, _UDP, jf="accept")          # not UDP: not ours to judge
    a.op(_LD_H_ABS, 6)
    a.op(_JSET_K, 0x1FFF, jt="accept")       # a later fragment has no UDP header
    a.op(_LDX_B_MSH, 0)                      # X = the IPv4 header's length
    a.op(_JA, "udp")
    a.label("v6")
    a.op(_JEQ_K, 6, jf="accept")
    a.op(_LD_B_ABS, 6)
    a.op(_JEQ_K, _UDP, jf="accept")          # UDP right behind the header only
    a.op(_LDX_IMM, 40)
    a.label("udp")
    a.op(_LD_H_IND, 2)
    a.op(_JEQ_K, port, jf="accept")          # not the SPA port
    a.op(_LD_W_IND, HINT_AT)
    a.op(_JA, "hints")
    a.label("accept")
    a.op(_RET_K, snaplen)
    a.label("hints")
    _list(a, "hint", hints, on_match="nonce", otherwise="unknown")
    a.label("unknown")
    a.op(_RET_K, 0)
    a.label("nonce")
    return a.resolve()


def nonce_section(refused: Iterable[bytes], snaplen: int) -> list[Insn]:
    """The end of the postlude: drop a datagram whose nonce prefix is one of ``refused`` (X: the UDP header)."""
    a = _Asm()
    a.op(_LD_W_IND, NONCE_AT)
    _list(a, "nonce", prefixes(refused), on_match="drop", otherwise="pass")
    a.label("pass")
    a.op(_RET_K, snaplen)
    a.label("drop")
    a.op(_RET_K, 0)
    return a.resolve()


def _list_size(n: int) -> int:
    return n + 2 * -(-n // _BLOCK) + 1


def size(program_length: int, hint_count: int, nonce_count: int = 0) -> int:
    """Instructions of ``with_hint_check`` for a program of that length and that many distinct prefixes."""
    # the head, the hint list, its miss; the nonce load, the nonce list, pass and drop
    return program_length + _FIXED + _list_size(hint_count) + 1 + 1 + _list_size(nonce_count) + 2


def fits(program_length: int, hint_count: int, nonce_count: int = 0) -> bool:
    return size(program_length, hint_count, nonce_count) <= _BUDGET


def room(program_length: int, hint_count: int) -> int:
    """The most nonces that fit beside a program of that length and that many hints."""
    n = max(0, _BUDGET - size(program_length, hint_count))
    while n and not fits(program_length, hint_count, n):
        n -= 1  # a few steps: each block of 250 costs 2 more
    return n


def accept_length(program: Sequence[Insn]) -> int:
    """What ``program`` returns to accept a packet (libpcap: the snap length).

    Raises ``ValueError`` for a program that accepts with ``ret A`` (libpcap
    does not emit it for filters) or that accepts nothing.
    """
    if any(code == _RET_A for code, *_ in program):
        raise ValueError("the program returns A: its accepting returns cannot be told apart")
    accepts = {k for code, _jt, _jf, k in program if code == _RET_K and k}
    if not accepts:
        raise ValueError("the program accepts nothing")
    return max(accepts)


def hint_section(program: Sequence[Insn], port: int, hints: Iterable[bytes]) -> list[Insn]:
    """``program`` with every accept rerouted through the SPA-port test and the hint list; a
    ``nonce_section`` must follow it."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range")
    snaplen = accept_length(program)
    n = len(program)
    out: list[Insn] = [
        (_JA, 0, 0, n - i - 1) if code == _RET_K and k else (code, jt, jf, k)
        for i, (code, jt, jf, k) in enumerate(program)
    ]
    return out + _head_and_hints(port, prefixes(hints), snaplen)


def with_hint_check(program: Sequence[Insn], port: int, hints: Iterable[bytes],
                    refused: Iterable[bytes] = ()) -> list[Insn]:
    """``program`` with its SPA-port datagrams also required to carry one of ``hints`` and none of
    the ``refused`` nonces (first four bytes of each)."""
    return hint_section(program, port, hints) + nonce_section(refused, accept_length(program))
