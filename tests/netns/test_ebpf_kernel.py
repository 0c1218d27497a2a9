"""spa.server.ebpf against the kernel: maps, the verifier's refusals, test runs, the ring buffer, a live socket.

Programs come from ``spa.ebpf_asm``. The live test attaches a program to an
AF_PACKET socket on ``lo`` in a namespace of its own (nothing else sends
there), so the packets it counts are exactly those the test sends.
"""

from __future__ import annotations

import errno
import mmap
import select
import socket
import struct
import time

import pytest

from spa import ebpf_asm as A
from spa.server import ebpf as E
from spa.server.netns import in_netns
from tests.netns.test_cbpf_kernel import _loopback_namespace
from tests.rawip import TCP, UDP, ipv4, ipv6, tcp, udp

pytestmark = pytest.mark.netns

ETH_P_ALL = 0x0003


def _key(i: int) -> bytes:
    return struct.pack("<I", i)


def _value(i: int) -> bytes:
    return struct.pack("<Q", i)


def _ret(value: int) -> bytes:
    a = A.Asm()
    a.ret(value)
    return a.assemble()


def test_available():
    assert E.available() is None


@pytest.mark.parametrize("map_type", [E.HASH, E.LRU_HASH], ids=["hash", "lru_hash"])
def test_hash_maps(map_type):
    with E.Map.create(map_type, 4, 8, 64, name="spa_test") as m:
        assert m.name == "spa_test" and m.fileno() >= 0
        assert m.lookup(_key(1)) is None
        assert list(m.keys()) == []
        for i in range(10):
            m.update(_key(i), _value(i * 100))
        assert m.lookup(_key(7)) == _value(700)
        assert sorted(m.keys()) == sorted(_key(i) for i in range(10))
        assert dict(m.items()) == {_key(i): _value(i * 100) for i in range(10)}

        with pytest.raises(E.BpfError) as caught:
            m.update(_key(7), _value(1), E.BPF_NOEXIST)
        assert caught.value.errno == errno.EEXIST and "spa_test" in str(caught.value)
        with pytest.raises(E.BpfError) as caught:
            m.update(_key(70), _value(1), E.BPF_EXIST)
        assert caught.value.errno == errno.ENOENT
        m.update(_key(7), _value(701), E.BPF_EXIST)
        m.update(_key(70), _value(7000), E.BPF_NOEXIST)
        assert m.lookup(_key(7)) == _value(701) and m.lookup(_key(70)) == _value(7000)

        assert m.delete(_key(70)) is True
        assert m.delete(_key(70)) is False
        assert m.lookup_and_delete(_key(3)) == _value(300)
        assert m.lookup_and_delete(_key(3)) is None
        assert m.lookup(_key(3)) is None
        for key in list(m.keys()):
            m.delete(key)
        assert list(m.keys()) == []
        with pytest.raises(ValueError):
            m.lookup(b"\x00" * 8)
    m.close()  # twice is fine


def test_a_full_hash_map_says_so():
    with E.Map.create(E.HASH, 4, 8, 4) as m:
        for i in range(4):
            m.update(_key(i), _value(i))
        with pytest.raises(E.BpfError, match=r"full: 4 entries") as caught:
            m.update(_key(9), _value(9))
        assert caught.value.errno == errno.E2BIG
        m.update(_key(2), _value(22))  # replacing a present key still works


def test_lru_hash_evicts_instead_of_refusing():
    with E.Map.create(E.LRU_HASH, 4, 8, 64) as m:
        for i in range(500):
            m.update(_key(i), _value(i))
        assert 0 < len(list(m.keys())) <= 64
        assert m.lookup(_key(499)) == _value(499)


def test_array_map():
    with E.Map.create(E.ARRAY, 4, 8, 4, name="spa_array") as m:
        assert list(m.keys()) == [_key(i) for i in range(4)]
        assert all(v == bytes(8) for _, v in m.items())  # arrays start zeroed
        m.update(_key(2), _value(42))
        assert m.lookup(_key(2)) == _value(42)
        assert m.lookup(_key(4)) is None  # past the end
        with pytest.raises(E.BpfError) as caught:
            m.delete(_key(2))  # array elements always exist
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(E.BpfError) as caught:
            m.update(_key(1), _value(1), E.BPF_NOEXIST)
        assert caught.value.errno == errno.EEXIST
        with pytest.raises(E.BpfError):
            m.lookup_and_delete(_key(2))  # hash maps (and queues) only
        assert m.lookup(_key(2)) == _value(42)


def test_refused_program_carries_the_verifier_log():
    a = A.Asm()
    a.exit()  # R0 never set
    with pytest.raises(E.BpfError) as caught:
        E.Program.load(a.assemble(), name="spa_bad")
    e = caught.value
    assert e.errno == errno.EACCES
    assert "refused BPF program spa_bad (1 instructions)" in str(e)
    assert "R0 !read_ok" in str(e) and "R0 !read_ok" in e.log

    a = A.Asm()
    a.ldx(A.DW, A.R0, A.R10, 8)  # above the frame
    a.exit()
    with pytest.raises(E.BpfError, match="invalid read from stack"):
        E.Program.load(a.assemble())


def test_constant_program():
    with E.Program.load(_ret(42), name="spa_const") as prog:
        retval, duration = prog.test_run(bytes(14) + ipv4(UDP, udp()))
        assert retval == 42 and duration >= 0
        assert prog.test_run_ip(ipv6(UDP, udp())) == 42
        assert prog.test_run(bytes(14) + ipv4(UDP, udp()), repeat=100)[0] == 42
    with E.Program.load(_ret(-1)) as prog:
        assert prog.test_run_ip(ipv4(UDP, udp())) == 0xFFFFFFFF  # the u32 the socket keeps that many bytes of


def _ld_abs_program(size: int, offset: int) -> bytes:
    a = A.Asm()
    a.mov64_reg(A.R6, A.R1)  # ld_abs reads through the context in R6
    a.ld_abs(size, offset)
    a.exit()
    return a.assemble()


def test_ld_abs_offset_zero_is_the_first_ip_byte():
    """test_run strips the Ethernet header: the program sees the network header, as on a SOCK_DGRAM socket."""
    with E.Program.load(_ld_abs_program(A.B, 0)) as prog:
        assert prog.test_run_ip(ipv4(TCP, tcp())) == 0x45
        assert prog.test_run_ip(ipv4(TCP, tcp(), ihl=6)) == 0x46
        assert prog.test_run_ip(ipv6(UDP, udp())) == 0x60
    with E.Program.load(_ld_abs_program(A.W, 12)) as prog:
        assert prog.test_run_ip(ipv4(UDP, udp(), src="10.1.2.3")) == 0x0A010203  # network order read as a number


def test_ld_abs_protocol_byte():
    with E.Program.load(_ld_abs_program(A.B, 9)) as prog:
        assert prog.test_run_ip(ipv4(TCP, tcp())) == 6
        assert prog.test_run_ip(ipv4(UDP, udp())) == 17
        with pytest.raises(ValueError, match="at least the 20-byte header"):
            prog.test_run_ip(ipv4(UDP, udp())[:19])  # the kernel would say EINVAL
    with E.Program.load(_ld_abs_program(A.B, 28)) as prog:
        assert prog.test_run_ip(ipv4(UDP, udp(payload=b"\x07"))) == 7
        assert prog.test_run_ip(ipv4(UDP, udp())) == 0  # past the end: the program ends with 0
    with E.Program.load(_ld_abs_program(A.B, 6)) as prog:
        assert prog.test_run_ip(ipv6(TCP, tcp())) == 6  # IPv6's next header


def _emit_record(a: A.Asm, ring: E.RingBuffer, off: int, size: int) -> None:
    """bpf_ringbuf_output(ring, r10 + off, size, 0); R0 = its result."""
    a.ld_map_fd(A.R1, ring.map.fileno())
    a.mov64_reg(A.R2, A.R10)
    a.alu64_imm(A.ADD, A.R2, off)
    a.mov64_imm(A.R3, size)
    a.mov64_imm(A.R4, 0)
    a.call(A.FN_ringbuf_output)


def _field_and_length(size: int, offset: int, at: int) -> A.Asm:
    """A program that starts by storing the packet's field (``ld_abs``) at r10 + at, its length at r10 + at + 4."""
    a = A.Asm()
    a.mov64_reg(A.R6, A.R1)
    a.ld_abs(size, offset)
    a.stx(A.W, A.R10, at, A.R0)
    a.ldx(A.W, A.R0, A.R6, 0)  # __sk_buff.len
    a.stx(A.W, A.R10, at + 4, A.R0)
    return a


def _source_and_length_program(ring: E.RingBuffer) -> bytes:
    """Writes a 12-byte record: the IPv4 source address (as a number), the packet length, 0x5ba5ba; returns 0."""
    a = _field_and_length(A.W, 12, -16)
    a.st_imm(A.W, A.R10, -8, 0x5BA5BA)
    _emit_record(a, ring, -16, 12)
    a.ret(0)
    return a.assemble()


def test_ring_buffer_records_from_test_runs():
    with E.RingBuffer.create(mmap.PAGESIZE, name="spa_events") as ring:
        assert ring.map.name == "spa_events" and ring.fileno() == ring.map.fileno()
        assert ring.read() == [] and ring.consumer_pos == 0
        with E.Program.load(_source_and_length_program(ring), name="spa_emit", license="GPL") as prog:
            sources = ["192.0.2.7", "198.51.100.200", "203.0.113.1"]
            packets = [ipv4(UDP, udp(payload=b"k" * i), src=s) for i, s in enumerate(sources)]
            for p in packets:
                assert prog.test_run_ip(p) == 0
            assert select.select([ring], [], [], 0)[0] == [ring]  # the map fd polls readable
            expected = [struct.pack("<III", int.from_bytes(p[12:16], "big"), len(p), 0x5BA5BA) for p in packets]
            assert ring.read(max_records=2) == expected[:2]
            assert ring.consumer_pos == 2 * 24  # 8-byte header + 12 bytes, padded to 8
            assert ring.read() == expected[2:]
            assert ring.consumer_pos == 3 * 24
            assert ring.read() == []
            assert select.select([ring], [], [], 0)[0] == []

            # Around the ring several times: positions grow past the size, records still read whole.
            got = []
            for i in range(600):
                prog.test_run_ip(ipv4(UDP, udp(), src=f"10.0.{i // 256}.{i % 256}"))
                if i % 50 == 49:
                    got += ring.read()
            assert len(got) == 600
            assert [r[:4] for r in got] == [struct.pack("<I", 0x0A000000 + i) for i in range(600)]
            assert ring.consumer_pos == 603 * 24 > 3 * ring.size
    ring.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        ring.read()


def test_a_full_ring_buffer_refuses_records():
    size = mmap.PAGESIZE
    with E.RingBuffer.create(size) as ring, E.Program.load(_source_and_length_program(ring)) as prog:
        for _ in range(size // 24 + 5):
            prog.test_run_ip(ipv4(UDP, udp()))
        records = ring.read()
        assert len(records) == size // 24  # the rest found no room (bpf_ringbuf_output gave -EAGAIN)
        prog.test_run_ip(ipv4(UDP, udp()))
        assert len(ring.read()) == 1  # read() gave the room back


def test_license_does_not_matter_for_the_matchers_helpers():
    """None of ktime_get_ns, map lookup/update/delete, ringbuf_output is GPL-only: a non-GPL program may call them."""
    with (E.Map.create(E.HASH, 4, 8, 4) as m, E.RingBuffer.create(mmap.PAGESIZE) as ring):
        a = A.Asm()
        a.call(A.FN_ktime_get_ns)
        a.stx(A.DW, A.R10, -8, A.R0)
        a.st_imm(A.W, A.R10, -12, 1)
        for helper, args in ((A.FN_map_delete_elem, 2), (A.FN_map_update_elem, 4), (A.FN_map_lookup_elem, 2)):
            a.ld_map_fd(A.R1, m.fileno())
            a.mov64_reg(A.R2, A.R10)
            a.alu64_imm(A.ADD, A.R2, -12)
            if args == 4:  # key 1 = the time, BPF_ANY
                a.mov64_reg(A.R3, A.R10)
                a.alu64_imm(A.ADD, A.R3, -8)
                a.mov64_imm(A.R4, E.BPF_ANY)
            a.call(helper)
        _emit_record(a, ring, -8, 8)
        a.ret(0)
        before = time.monotonic_ns()
        with E.Program.load(a.assemble(), name="spa_nongpl", license="Proprietary") as prog:
            assert prog.test_run_ip(ipv4(UDP, udp())) == 0
        stamp = m.lookup(_key(1))
        assert stamp is not None and ring.read() == [stamp]
        assert abs(struct.unpack("<Q", stamp)[0] - before) < 10**9  # ktime_get_ns is CLOCK_MONOTONIC


def _counting_program(counts: E.Map, ring: E.RingBuffer) -> bytes:
    """Counts every packet in ``counts[0]``, writes (protocol, length) to ``ring``, keeps the whole packet."""
    a = _field_and_length(A.B, 9, -8)
    _emit_record(a, ring, -8, 8)
    a.st_imm(A.W, A.R10, -12, 0)
    a.ld_map_fd(A.R1, counts.fileno())
    a.mov64_reg(A.R2, A.R10)
    a.alu64_imm(A.ADD, A.R2, -12)
    a.call(A.FN_map_lookup_elem)
    a.jmp_imm(A.JNE, A.R0, 0, "found")
    a.ret(-1)
    a.label("found")
    a.mov64_imm(A.R1, 1)
    a.atomic_add(A.DW, A.R0, 0, A.R1)  # atomic: the outgoing and incoming copies may race
    a.ret(-1)
    return a.assemble()


def test_live_socket_counts_packets():
    """On a real AF_PACKET socket: the count, the records and what the socket receives all agree."""
    payloads = [b"knock%d" % i * (i + 1) for i in range(20)]
    with (_loopback_namespace() as ns, E.Map.create(E.ARRAY, 4, 8, 1, name="spa_count") as counts,
          E.RingBuffer.create(16384, name="spa_live") as ring,
          E.Program.load(_counting_program(counts, ring), name="spa_live") as prog):
        with in_netns(ns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock, sink, sender:
            E.attach(sock, prog)  # before bind: no packet reaches the socket unfiltered
            sock.bind(("lo", ETH_P_ALL))
            sock.setblocking(False)
            sink.bind(("127.0.0.1", 0))
            for p in payloads:
                sender.sendto(p, sink.getsockname())
            for _ in payloads:
                sink.recv(4096)  # every datagram has been through lo (and the filter) by now
            received = []
            deadline = time.monotonic() + 2
            while len(received) < 2 * len(payloads) and time.monotonic() < deadline:
                try:
                    received.append(sock.recv(4096))
                except BlockingIOError:
                    time.sleep(0.002)
            assert E.detach(sock) is True
            assert E.detach(sock) is False
        # lo shows the packet socket each datagram twice: once outgoing, once incoming.
        lengths = sorted(28 + len(p) for p in payloads for _ in (0, 1))
        assert sorted(len(r) for r in received) == lengths
        assert struct.unpack("<Q", counts.lookup(_key(0)))[0] == 2 * len(payloads)
        records = [struct.unpack("<II", r) for r in ring.read()]
        assert sorted(length for _, length in records) == lengths
        assert {proto for proto, _ in records} == {UDP}


def test_attach_refuses_a_closed_program():
    prog = E.Program.load(_ret(0))
    prog.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(ValueError, match="closed"):
        E.attach(s, prog)
