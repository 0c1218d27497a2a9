"""A ``PACKET_RX_RING`` (TPACKET_V2) on a packet socket: the kernel writes packets into shared memory.

Reading a packet then costs no system call: the capture loop walks the
frames the kernel has handed over (``TP_STATUS_USER``), copies each
packet's bytes out and hands the frame back (``TP_STATUS_KERNEL``). Under a
flood that is what lets one Python thread keep up; at rest it wakes for
each packet as a plain socket does (TPACKET_V2 signals every frame;
TPACKET_V3 would batch them behind a block timeout of a millisecond or
more, which the open latency cannot afford).

Frames are ``frame_size`` bytes (512 by default: 432 bytes of packet after
the frame header); a longer packet is cut to fit and comes out as
``spa.packet.Truncated``: its headers still count as a knock. An SPA v1
datagram is 299 bytes over IPv4 and 319 over IPv6, so it fits with room for
113 bytes of IPv6 extension headers; one cut short is refused as malformed.
Small frames hold more packets for the same memory: the default ring
(8 MiB per socket) buffers 16 384 packets, about 80 ms of the fastest flood
this machine's sender makes.

Layout of ``struct tpacket2_hdr`` (linux/if_packet.h): status, len,
snaplen (u32 each), mac, net (u16 each), sec, nsec (u32), vlan tci, vlan
tpid (u16), 4 bytes of padding.
"""

from __future__ import annotations

import mmap
import socket
import struct

from spa.packet import Truncated

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V2 = 1
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1

_REQ = struct.Struct("=IIII")  # block size, block count, frame size, frame count
_HDR = struct.Struct("=IIIHH")  # status, len, snaplen, mac, net
HEADER = _HDR
DEFAULT_FRAME_SIZE = 512
DEFAULT_RING_BYTES = 8 << 20
_BLOCK = 1 << 16


class Ring:
    """The receive ring of ``sock``; set it up before the socket is bound (no packet missed, none unringed)."""

    def __init__(self, sock: socket.socket, ring_bytes: int = DEFAULT_RING_BYTES,
                 frame_size: int = DEFAULT_FRAME_SIZE) -> None:
        if frame_size % 16 or _BLOCK % frame_size:
            raise ValueError("frame size must be a multiple of 16 that divides 64 KiB")
        blocks = max(1, ring_bytes // _BLOCK)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ.pack(_BLOCK, blocks, frame_size, blocks * _BLOCK // frame_size))
        self._attach(mmap.mmap(sock.fileno(), blocks * _BLOCK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
                     frame_size)

    @classmethod
    def over(cls, memory: mmap.mmap, frame_size: int = DEFAULT_FRAME_SIZE) -> Ring:
        """A ring over memory the caller fills as the kernel would (tests and benchmarks)."""
        ring = cls.__new__(cls)
        ring._attach(memory, frame_size)
        return ring

    def _attach(self, memory: mmap.mmap, frame_size: int) -> None:
        self.frame_size = frame_size
        self.frames = len(memory) // frame_size
        self._mm = memory
        # The frame statuses, as u32 words: read and handed back without struct calls.
        self._words = memoryview(memory).cast("I")
        self._next = 0

    def read(self, max_packets: int) -> list[bytes]:
        """Up to ``max_packets`` packets, oldest first, from their network header on."""
        out: list[bytes] = []
        mm, words, unpack = self._mm, self._words, _HDR.unpack_from
        size, frames, i = self.frame_size, self.frames, self._next
        for _ in range(max_packets):
            base = i * size
            word = base >> 2
            if not words[word] & TP_STATUS_USER:
                break
            _, wire, snap, _, net = unpack(mm, base)
            start = base + net
            data = mm[start:start + snap]
            out.append(data if snap >= wire else Truncated(data, wire))
            words[word] = TP_STATUS_KERNEL
            i += 1
            if i == frames:
                i = 0
        self._next = i
        return out

    def close(self) -> None:
        self._words.release()
        self._mm.close()
