"""``spa.server.ring.Ring.read`` over memory laid out as the kernel lays out a TPACKET_V2 ring."""

from __future__ import annotations

import mmap

from spa.packet import Truncated, fields
from spa.server.ring import HEADER, TP_STATUS_KERNEL, TP_STATUS_USER, Ring
from tests.rawip import SYN, TCP, ipv4, tcp

FRAME = 256
NET = 80  # where a SOCK_DGRAM frame's network header starts (TPACKET2_HDRLEN + 16, aligned)


def _ring(frames: int = 4) -> tuple[Ring, mmap.mmap]:
    mem = mmap.mmap(-1, frames * FRAME)
    return Ring.over(mem, FRAME), mem


def _put(mem: mmap.mmap, index: int, pkt: bytes, wire: int | None = None) -> None:
    base = index * FRAME
    snap = min(len(pkt), FRAME - NET)
    mem[base + NET:base + NET + snap] = pkt[:snap]
    HEADER.pack_into(mem, base, TP_STATUS_USER, wire or len(pkt), snap, NET, NET)


def _status(mem: mmap.mmap, index: int) -> int:
    return HEADER.unpack_from(mem, index * FRAME)[0]


def test_reads_what_the_kernel_handed_over_in_order_and_hands_the_frames_back():
    ring, mem = _ring()
    pkts = [ipv4(TCP, tcp(40000 + i, 7000 + i, SYN)) for i in range(3)]
    for i, p in enumerate(pkts):
        _put(mem, i, p)
    assert ring.read(2) == pkts[:2]  # at most what was asked
    assert [_status(mem, i) for i in range(4)] == [TP_STATUS_KERNEL, TP_STATUS_KERNEL, TP_STATUS_USER, 0]
    assert ring.read(10) == pkts[2:]
    assert ring.read(10) == []  # the next frame is still the kernel's


def test_wraps_around_the_end_of_the_ring():
    ring, mem = _ring(frames=2)
    for round_ in range(3):
        a, b = ipv4(TCP, tcp(1, 7000 + round_, SYN)), ipv4(TCP, tcp(2, 8000 + round_, SYN))
        _put(mem, 0, a)
        _put(mem, 1, b)
        assert ring.read(10) == [a, b]


def test_a_packet_longer_than_its_frame_comes_out_truncated_with_its_headers_readable():
    ring, mem = _ring()
    big = ipv4(TCP, tcp(40000, 7000, SYN) + b"x" * 1000)
    _put(mem, 0, big)
    (got,) = ring.read(1)
    assert type(got) is Truncated and got.wire_len == len(big) and big.startswith(got)
    assert fields(got)[4] == 7000
