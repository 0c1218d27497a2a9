"""spa.server.ebpf without the kernel: ``union bpf_attr`` layouts, argument checks, the ring buffer walk."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from spa.server import ebpf as E

# Offsets from linux/bpf.h (union bpf_attr), by hand: 64-bit fields are __aligned_u64.
LAYOUTS = {
    E._MapCreateAttr: (72, {
        "map_type": 0, "key_size": 4, "value_size": 8, "max_entries": 12, "map_flags": 16, "inner_map_fd": 20,
        "numa_node": 24, "map_name": 28, "map_ifindex": 44, "btf_fd": 48, "btf_vmlinux_value_type_id": 60,
        "map_extra": 64,
    }),
    E._MapElemAttr: (32, {"map_fd": 0, "key": 8, "value": 16, "flags": 24}),
    E._ProgLoadAttr: (144, {
        "prog_type": 0, "insn_cnt": 4, "insns": 8, "license": 16, "log_level": 24, "log_size": 28, "log_buf": 32,
        "kern_version": 40, "prog_flags": 44, "prog_name": 48, "prog_ifindex": 64, "expected_attach_type": 68,
        "prog_btf_fd": 72, "func_info_rec_size": 76, "func_info": 80, "func_info_cnt": 88,
        "line_info_rec_size": 92, "line_info": 96, "line_info_cnt": 104, "attach_btf_id": 108,
        "attach_prog_fd": 112, "core_relo_cnt": 116, "fd_array": 120, "core_relos": 128,
        "core_relo_rec_size": 136, "log_true_size": 140,
    }),
    E._TestRunAttr: (80, {
        "prog_fd": 0, "retval": 4, "data_size_in": 8, "data_size_out": 12, "data_in": 16, "data_out": 24,
        "repeat": 32, "duration": 36, "ctx_size_in": 40, "ctx_size_out": 44, "ctx_in": 48, "ctx_out": 56,
        "flags": 64, "cpu": 68, "batch_size": 72,
    }),
}


@pytest.mark.parametrize("struct_type", list(LAYOUTS), ids=lambda t: t.__name__)
def test_attr_layouts(struct_type):
    size, offsets = LAYOUTS[struct_type]
    assert ctypes.sizeof(struct_type) == size
    assert {name: getattr(struct_type, name).offset for name in offsets} == offsets
    assert size <= E._ATTR_BUFFER_MIN or struct_type is E._ProgLoadAttr


def test_syscall_number_per_machine(monkeypatch):
    for machine, number in (("x86_64", 321), ("aarch64", 280)):
        monkeypatch.setattr(E.platform, "machine", lambda m=machine: m)
        assert E._syscall_number() == number
    monkeypatch.setattr(E.platform, "machine", lambda: "riscv64")
    with pytest.raises(E.BpfError, match="riscv64") as caught:
        E._syscall_number()
    assert caught.value.errno == errno.ENOSYS
    assert "riscv64" in E._unavailable_reason(caught.value)


@pytest.mark.parametrize("name", ["a" * 16, "knock-map", "é", "a b"])
def test_names_the_kernel_would_refuse(name):
    with pytest.raises(ValueError, match="BPF object name"):
        E.Map.create(E.HASH, 4, 4, 1, name=name)


def test_name_limits():
    assert E._kernel_name("a" * 15) == b"a" * 15
    assert E._kernel_name("spa.knock_v4") == b"spa.knock_v4"
    assert E._kernel_name("") == b""


def test_wrong_key_and_value_sizes():
    m = E.Map(-1, E.HASH, 4, 8, 16, "m")  # never opened: the sizes are checked before any call
    with pytest.raises(ValueError, match="key is 3 bytes, not 4"):
        m.lookup(b"abc")
    with pytest.raises(ValueError, match="value is 4 bytes, not 8"):
        m.update(b"abcd", b"abcd")
    with pytest.raises(ValueError, match="key is 5 bytes"):
        m.delete(b"abcde")


def test_closed_objects():
    m = E.Map(-1, E.HASH, 4, 8, 16)
    m.close()
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.fileno()


@pytest.mark.parametrize("code", [b"", b"\x95" * 7, b"\x95" + bytes(8)])
def test_code_must_be_whole_instructions(code):
    with pytest.raises(ValueError, match="multiple of 8"):
        E.Program.load(code)


@pytest.mark.parametrize("packet", [b"", b"\x50" + bytes(19), b"\x00"])
def test_test_run_ip_wants_an_ip_packet(packet):
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 packet"):
        E.Program(-1, E.SOCKET_FILTER).test_run_ip(packet)


def test_refusal_message_keeps_the_log_tail():
    text = "".join(f"line {i}\n" for i in range(100)) + "R0 !read_ok\nprocessed 1 insns\n"
    e = E._refused("knock", 3, errno.EACCES, text)
    assert e.errno == errno.EACCES and e.log == text
    assert str(e).startswith("the kernel refused BPF program knock (3 instructions): Permission denied")
    assert "R0 !read_ok" in str(e) and "line 99" in str(e) and "line 10\n" not in str(e)
    assert str(E._refused("", 1, errno.EINVAL, "")).endswith("(1 instructions): Invalid argument")


def test_unavailable_reasons():
    assert "not permitted" in E._unavailable_reason(E.BpfError("x", errno.EPERM))
    assert "CONFIG_BPF_SYSCALL" in E._unavailable_reason(E.BpfError("x", errno.ENOSYS))
    assert E._unavailable_reason(E.BpfError("creating map: Invalid argument", errno.EINVAL)) == \
        "eBPF unusable: creating map: Invalid argument"


# -- the ring buffer walk, on a fake mapping ---------------------------------------------------------------

BASE = 16  # stands for the producer page in front of the data


def _ring(size: int, records: list[tuple[bytes, int]], start: int = 0) -> tuple[bytearray, int, int]:
    """A fake mapping holding ``records`` (payload, header bits) from ring position ``start``.

    Written modulo ``size`` as the kernel does, then the data area twice in
    a row as the kernel maps it. Returns the mapping and the consumer and
    producer positions.
    """
    area = bytearray(size)
    pos = start
    for payload, bits in records:
        record = struct.pack("<II", len(payload) | bits, 0) + payload
        record += bytes(-len(record) % 8)
        for i, byte in enumerate(record):
            area[(pos + i) % size] = byte
        pos += len(record)
    return bytearray(b"\xee" * BASE) + area + area, start, pos


def _walk(size: int, records: list[tuple[bytes, int]], start: int = 0, max_records: int = 100):
    data, consumer, producer = _ring(size, records, start)
    return E.walk_records(data, BASE, size - 1, consumer, producer, max_records), producer


def test_records_and_padding():
    payloads = [bytes(range(n)) for n in range(10)] + [b"x" * 17]
    (records, pos), producer = _walk(512, [(p, 0) for p in payloads])
    assert records == payloads
    # 8-byte header, payload padded to 8: 0 -> 8, 1..8 -> 16, 9 -> 24, 17 -> 32.
    assert pos == producer == 8 + 8 * 16 + 24 + 32


def test_discarded_records_are_stepped_over():
    (records, pos), producer = _walk(256, [(b"a", 0), (b"secret", E.BPF_RINGBUF_DISCARD_BIT), (b"b", 0)])
    assert records == [b"a", b"b"]
    assert pos == producer == 48


def test_a_busy_record_stops_the_walk():
    (records, pos), producer = _walk(256, [(b"a", 0), (b"writing", E.BPF_RINGBUF_BUSY_BIT), (b"b", 0)])
    assert records == [b"a"]
    assert pos == 16 < producer  # the busy record and the one after wait for the next read


def test_max_records():
    (records, pos), _ = _walk(256, [(bytes([i]), 0) for i in range(5)], max_records=2)
    assert records == [b"\x00", b"\x01"] and pos == 32


def test_nothing_to_read():
    data, consumer, producer = _ring(64, [], start=128)
    assert E.walk_records(data, BASE, 63, consumer, producer, 10) == ([], 128)


def test_a_record_across_the_end_reads_in_one_piece():
    # Positions only grow (u64); the record at 56 of a 64-byte area ends 16 bytes into the second copy.
    start = (5 << 32) + 64 * 3 + 56
    (records, pos), producer = _walk(64, [(b"0123456789ab", 0), (b"next", 0)], start=start)
    assert records == [b"0123456789ab", b"next"]
    assert pos == producer == start + 24 + 16


def test_a_record_past_the_producer_position_is_an_error():
    data, consumer, producer = _ring(64, [(b"abcdefgh", 0)])
    with pytest.raises(E.BpfError, match="runs past the producer position"):
        E.walk_records(data, BASE, 63, consumer, producer - 8, 10)


def test_ring_buffer_size_checked_before_the_kernel():
    for size in (0, 1000, 4096 + 8, 2048):
        with pytest.raises(ValueError, match="power of two"):
            E.RingBuffer.create(size)


@pytest.mark.parametrize("packet, least", [(b"\x45" + bytes(18), 20), (b"\x60" + bytes(38), 40)])
def test_test_run_ip_wants_the_whole_ip_header(packet, least):
    with pytest.raises(ValueError, match=f"at least the {least}-byte header"):
        E.Program(-1, E.SOCKET_FILTER).test_run_ip(packet)
