"""What the two generated socket filters (``spa.knock_program``, ``spa.spa_program``) share (pure).

Both run on packet sockets that see a packet from its network header on
(``AF_PACKET``, ``SOCK_DGRAM``) and start the same way: the context kept in
r6 for the legacy packet loads, frames for another host's MAC refused (the
capture's own guard, ``spa.server.capture.guard``), and the IP version
dispatched.
"""

from __future__ import annotations

from spa import ebpf_asm as A

__all__ = ["ip_start"]

_SKB_LEN = 0  # offsetof(struct __sk_buff, len)
_SKB_PKT_TYPE = 4  # offsetof(struct __sk_buff, pkt_type)
_PACKET_OTHERHOST = 3


def ip_start(a: A.Asm) -> None:
    """r6 = the context, r7 = the bytes received; on to ``v6`` for IPv6; for IPv4 fall through with r8 =
    its header length (at least 20) and r0 = its total length (not past what was received); anything
    else, and a frame for another host, on to ``out``."""
    a.mov64_reg(A.R6, A.R1)
    # A frame for another host's MAC (a promiscuous interface): the host never received it.
    a.ldx(A.W, A.R1, A.R6, _SKB_PKT_TYPE)
    a.jmp_imm(A.JEQ, A.R1, _PACKET_OTHERHOST, "out")
    a.ldx(A.W, A.R7, A.R6, _SKB_LEN)  # what was received: the bound for the length fields
    a.ld_abs(A.B, 0)
    a.mov64_reg(A.R8, A.R0)
    a.alu64_imm(A.RSH, A.R8, 4)
    a.jmp_imm(A.JEQ, A.R8, 4, "v4")
    a.jmp_imm(A.JEQ, A.R8, 6, "v6")
    a.ja("out")
    a.label("v4")
    a.mov64_reg(A.R8, A.R0)
    a.alu64_imm(A.AND, A.R8, 0x0F)
    a.alu64_imm(A.LSH, A.R8, 2)  # r8 = header length: where TCP/UDP starts
    a.jmp_imm(A.JLT, A.R8, 20, "out")
    a.ld_abs(A.H, 2)
    a.jmp_reg(A.JGT, A.R0, A.R7, "out")  # total length past what arrived
