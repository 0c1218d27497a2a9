"""The SPA port's kernel screen: an eBPF socket filter that passes only datagrams whose AEAD tag is right (pure).

Under a flood of forgeries made under a key hint seen on the wire, the
classic filter (``spa.hint_filter``) must pass them all, and the capture
loop pays ~14 µs of Python a datagram to tell them from the real one; at a
flood sender's full rate the capture drops packets, the client's own among
them, and the daemon can only take that hint out of the filter until the
client's next one (``spa.server.spa_filter``). This program checks the
Poly1305 tag itself (``spa.aead_program``): a forgery is dropped in softirq,
before it is queued, and the client's packet is the only one its socket
ever holds.

What it passes, in order (each step counted in ``COUNTERS``):

1. a UDP datagram to the SPA port, received by this host, IPv4 (not a
   fragment) or IPv6 (no extension headers, as the classic filter);
2. of ``PACKET_SIZE`` bytes (the UDP length, and all of it present) whose
   first byte is the version (``size``, ``version``);
3. whose hint is a key in the hints map, which gives that client's AEAD key
   (``unknown``);
4. whose nonce is not a key in the nonces map: packets already accepted
   (``replay``);
5. whose tag is XChaCha20-Poly1305's for that key, nonce, header and
   ciphertext (``forged``); then ``passed``.

The daemon checks every passed datagram again from the start
(``spa.authorize.Verifier``): time, signature and policy are not the
kernel's to decide. The screen only decides what is worth that.

Layouts: hints map key 8 bytes (the hint), value 32 bytes (the AEAD key);
nonces map key 24 bytes, value 4 bytes (unused); scratch: one per-CPU array
element of ``SCRATCH_SIZE`` bytes; counters: one array element, a ``u64``
per name in ``COUNTERS``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from spa import aead_program as P
from spa import ebpf_asm as A
from spa.protocol import HEADER_SIZE, HINT_SIZE, NONCE_SIZE, PACKET_SIZE, TAG_SIZE, VERSION
from spa.socket_filter import ip_start

__all__ = ["Maps", "build", "decode_counters", "COUNTERS", "COUNTERS_VALUE_SIZE", "SCRATCH_SIZE",
           "HINT_KEY_SIZE", "AEAD_KEY_SIZE", "NONCE_KEY_SIZE", "NONCE_VALUE_SIZE", "ACCEPT"]

COUNTERS = ("datagrams", "size", "version", "unknown", "replay", "forged", "passed")
COUNTERS_VALUE_SIZE = 8 * len(COUNTERS)
_COUNTERS = struct.Struct(f"={len(COUNTERS)}Q")
_C = {name: i for i, name in enumerate(COUNTERS)}
HINT_KEY_SIZE = HINT_SIZE
AEAD_KEY_SIZE = 32
NONCE_KEY_SIZE = NONCE_SIZE
NONCE_VALUE_SIZE = 4
#: What the program returns to pass a datagram: "keep up to this many bytes", i.e. all of it.
ACCEPT = 0x40000

_UDP = 17
_CIPHERTEXT = PACKET_SIZE - HEADER_SIZE - TAG_SIZE

# The scratch area (offsets from its base): the Poly1305 message of the AEAD (RFC 8439 §2.8: the
# header zero-padded to 48 bytes, the ciphertext zero-padded to 224, then both lengths as u64),
# the packet's tag, ChaCha's state, the subkey, Poly1305's working space and its result.
_AD_PADDED = (HEADER_SIZE + 15) // 16 * 16
_CT_PADDED = (_CIPHERTEXT + 15) // 16 * 16
_MSG = 0
_CT = _MSG + _AD_PADDED
_LENGTHS = _CT + _CT_PADDED
_BLOCKS = (_AD_PADDED + _CT_PADDED + 16) // 16
_TAG = _LENGTHS + 16
_STATE = _TAG + 16
_SUBKEY = _STATE + P.STATE_SIZE
_WORK = _SUBKEY + 32
_OUT = _WORK + P.POLY_WORK_SIZE
SCRATCH_SIZE = _OUT + 16
_NONCE = _MSG + 1 + HINT_SIZE  # where the nonce sits in the copied header

# Stack: the hint and nonce as map keys, and a u32 array index.
_HINT_KEY = -8
_NONCE_KEY = -32
_SLOT = -36
_CNT = -48  # the counters' address



@dataclass(frozen=True, slots=True)
class Maps:
    hints: int  # hash: hint -> AEAD key
    nonces: int  # (LRU) hash: nonce -> anything
    scratch: int  # per-CPU array, one element of SCRATCH_SIZE bytes
    counters: int  # array, one element of COUNTERS_VALUE_SIZE bytes


def decode_counters(value: bytes) -> dict[str, int]:
    return dict(zip(COUNTERS, _COUNTERS.unpack(value)))


class _Gen:
    def __init__(self, maps: Maps, port: int) -> None:
        self.a = A.Asm()
        self.maps = maps
        self.port = port

    def element0(self, map_fd: int) -> None:
        """r0 = the address of an array's element 0 (on to ``out`` if missing)."""
        self.a.array_element0(map_fd, _SLOT, "out")

    def count(self, name: str) -> None:
        self.a.add_one(_CNT, 8 * _C[name])

    def refuse(self, name: str) -> None:
        self.count(name)
        self.a.ja("out")

    def load(self, at: int, to: int, length: int) -> None:
        """``length`` bytes of the UDP payload from ``at`` to scratch + ``to`` (r8: the payload's offset)."""
        a = self.a
        a.mov64_reg(A.R1, A.R6)
        a.mov64_reg(A.R2, A.R8)
        if at:
            a.alu64_imm(A.ADD, A.R2, at)
        a.mov64_reg(A.R3, A.R9)
        a.alu64_imm(A.ADD, A.R3, to)
        a.mov64_imm(A.R4, length)
        a.call(A.FN_skb_load_bytes)
        a.jmp_imm(A.JNE, A.R0, 0, "out")

    def parse(self) -> None:
        """r8 = where the UDP header starts and r9 = where the IP packet ends, or on to ``out``."""
        a = self.a
        ip_start(a)
        a.mov64_reg(A.R9, A.R0)
        a.ld_abs(A.H, 6)
        a.jmp_imm(A.JSET, A.R0, 0x3FFF, "out")  # a fragment (more to come, or not the first): not whole
        a.ld_abs(A.B, 9)
        a.jmp_imm(A.JNE, A.R0, _UDP, "out")
        a.ja("udp")
        a.label("v6")
        a.jmp_imm(A.JLT, A.R7, 40, "out")
        a.ld_abs(A.B, 6)
        a.jmp_imm(A.JNE, A.R0, _UDP, "out")
        a.ld_abs(A.H, 4)
        a.alu64_imm(A.ADD, A.R0, 40)
        a.jmp_reg(A.JGT, A.R0, A.R7, "out")
        a.mov64_reg(A.R9, A.R0)
        a.mov64_imm(A.R8, 40)
        a.label("udp")
        a.ld_ind(A.H, A.R8, 2)
        a.jmp_imm(A.JNE, A.R0, self.port, "out")

    def screen(self) -> None:
        a = self.a
        # The counters, once; from here every datagram is counted.
        self.element0(self.maps.counters)
        a.stx(A.DW, A.R10, _CNT, A.R0)
        self.count("datagrams")
        a.ld_ind(A.H, A.R8, 4)
        a.jmp_imm(A.JNE, A.R0, 8 + PACKET_SIZE, "size")
        a.mov64_reg(A.R1, A.R8)
        a.alu64_imm(A.ADD, A.R1, 8 + PACKET_SIZE)
        a.jmp_reg(A.JGT, A.R1, A.R9, "size")
        a.ld_ind(A.B, A.R8, 8)
        a.jmp_imm(A.JNE, A.R0, VERSION, "version")
        # The header, the ciphertext and the tag into place.
        self.element0(self.maps.scratch)
        a.mov64_reg(A.R9, A.R0)
        a.alu64_imm(A.ADD, A.R8, 8)
        self.load(0, _MSG, HEADER_SIZE)
        self.load(HEADER_SIZE, _CT, _CIPHERTEXT)
        self.load(HEADER_SIZE + _CIPHERTEXT, _TAG, TAG_SIZE)
        # Known hint? (r7: that client's AEAD key.)
        a.ldx(A.DW, A.R1, A.R9, _MSG + 1)
        a.stx(A.DW, A.R10, _HINT_KEY, A.R1)
        self.a.map_call(A.FN_map_lookup_elem, self.maps.hints, _HINT_KEY)
        a.jmp_imm(A.JEQ, A.R0, 0, "unknown")
        a.mov64_reg(A.R7, A.R0)
        # An accepted packet's nonce again?
        for i in range(0, NONCE_SIZE, 8):
            a.ldx(A.DW, A.R1, A.R9, _NONCE + i)
            a.stx(A.DW, A.R10, _NONCE_KEY + i, A.R1)
        self.a.map_call(A.FN_map_lookup_elem, self.maps.nonces, _NONCE_KEY)
        a.jmp_imm(A.JNE, A.R0, 0, "replay")
        # The padding and lengths of the Poly1305 message (the scratch holds another packet's bytes).
        for off in range(HEADER_SIZE, _AD_PADDED):
            a.st_imm(A.B, A.R9, off, 0)
        for off in range(_CT + _CIPHERTEXT, _LENGTHS):
            a.st_imm(A.B, A.R9, off, 0)
        a.st_imm(A.DW, A.R9, _LENGTHS, HEADER_SIZE)
        a.st_imm(A.DW, A.R9, _LENGTHS + 8, _CIPHERTEXT)
        P.hchacha20(a, A.R9, _STATE, A.R7, 0, _NONCE, _SUBKEY)
        P.chacha20_poly_key(a, A.R9, _STATE, _SUBKEY, _NONCE + 16)
        P.poly1305(a, A.R9, _STATE, _MSG, _BLOCKS, _WORK, _OUT)
        P.tag_differs(a, A.R9, _OUT, _TAG, A.R7)
        a.jmp_imm(A.JNE, A.R7, 0, "forged")
        self.count("passed")
        a.ret(ACCEPT)
        for name in ("size", "version", "unknown", "replay", "forged"):
            a.label(name)
            self.refuse(name)


def build(maps: Maps, port: int) -> bytes:
    """The screen for the SPA port ``port``, using ``maps``."""
    if not 0 < port < 65536:
        raise ValueError(f"SPA port {port} out of range")
    g = _Gen(maps, port)
    g.parse()
    g.screen()
    g.a.label("out")
    g.a.ret(0)
    return g.a.assemble()
