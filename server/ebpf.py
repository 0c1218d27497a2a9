"""The ``bpf(2)`` system call through ctypes: maps, socket-filter programs, test runs, ring buffers.

The knock matcher runs in the kernel as an eBPF socket filter
(``BPF_PROG_TYPE_SOCKET_FILTER``, ``spa.knock_program``, on tap sockets
beside the capture's: ``spa.server.knock_kernel``) that keeps per-source
attempts in a BPF map and reports events through BPF ring buffers. This
module is the thin layer under it: create maps and read
or change their elements, load a program (``spa.ebpf_asm`` makes the
bytes), run it on a packet without a socket (``BPF_PROG_TEST_RUN``),
attach it to a socket, and consume a ring buffer through its shared
memory.

Why ctypes: the calls are few and their argument layouts (``union
bpf_attr``, linux/bpf.h) are stable ABI, so libc's ``syscall()`` is enough;
libbpf or bcc would be a new dependency (and a compiler toolchain) for
what is a few hundred lines.

Kernel versions: socket filters with maps and ``SO_ATTACH_BPF`` since
3.19, ``BPF_PROG_TEST_RUN`` on socket filters 4.12, map and program names
4.15, the ring buffer (map type, ``bpf_ringbuf_output``, mmap) 5.8,
``BPF_MAP_LOOKUP_AND_DELETE_ELEM`` on hash maps 5.14. Before 5.11 BPF
memory counts against ``RLIMIT_MEMLOCK``, which this module leaves alone.
Only x86_64 and aarch64 are supported (the system call number is per
machine).

Values go in and out as ``bytes`` of exactly the map's key and value size;
per-CPU map types (one value per CPU) are not supported. Objects hold their
file descriptor until ``close()`` (or the end of a ``with`` block); there
is no ``__del__``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import platform
import re
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Self

from spa.errors import SpaError

log = logging.getLogger(__name__)

# asm/unistd.h: bpf(2) has a different number on each machine.
_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280}

# enum bpf_cmd
_MAP_CREATE, _MAP_LOOKUP_ELEM, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _MAP_GET_NEXT_KEY, _PROG_LOAD = range(6)
_PROG_TEST_RUN = 10
_MAP_LOOKUP_AND_DELETE_ELEM = 21

# enum bpf_map_type
HASH, ARRAY, LRU_HASH, RINGBUF = 1, 2, 9, 27
#: One value per CPU: a program's scratch space (created here, never read or written from user space).
PERCPU_ARRAY = 6
# enum bpf_prog_type
SOCKET_FILTER = 1
# Update flags.
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

# asm-generic/socket.h
SO_ATTACH_BPF = 50
SO_DETACH_BPF = 27  # the same option as SO_DETACH_FILTER: either kind of filter goes

BPF_OBJ_NAME_LEN = 16
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8

# The attr is copied into a zeroed buffer at least this large (the size passed stays the struct's).
_ATTR_BUFFER_MIN = 128
# A refused program is loaded again with a log this large (the kernel keeps the tail since 6.4).
_LOG_SIZE = 4 << 20
_LOG_TAIL_LINES = 20
# IP version: (ethertype, smallest packet the test run takes)
_IP_VERSIONS = {4: (0x0800, 20), 6: (0x86DD, 40)}
_NAME = re.compile(r"[A-Za-z0-9_.]*")

_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64


class _MapCreateAttr(ctypes.Structure):
    """``union bpf_attr`` for BPF_MAP_CREATE, up to ``map_extra`` (5.16; zero is fine before)."""

    _fields_ = [
        ("map_type", _u32), ("key_size", _u32), ("value_size", _u32), ("max_entries", _u32),
        ("map_flags", _u32), ("inner_map_fd", _u32), ("numa_node", _u32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("map_ifindex", _u32), ("btf_fd", _u32), ("btf_key_type_id", _u32), ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32), ("map_extra", _u64),
    ]


class _MapElemAttr(ctypes.Structure):
    """``union bpf_attr`` for BPF_MAP_*_ELEM and GET_NEXT_KEY (``value`` is ``next_key`` there)."""

    _fields_ = [("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class _ProgLoadAttr(ctypes.Structure):
    """``union bpf_attr`` for BPF_PROG_LOAD, up to ``log_true_size`` (6.4; the kernel fills it in)."""

    _fields_ = [
        ("prog_type", _u32), ("insn_cnt", _u32), ("insns", _u64), ("license", _u64),
        ("log_level", _u32), ("log_size", _u32), ("log_buf", _u64),
        ("kern_version", _u32), ("prog_flags", _u32), ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("prog_ifindex", _u32), ("expected_attach_type", _u32), ("prog_btf_fd", _u32),
        ("func_info_rec_size", _u32), ("func_info", _u64), ("func_info_cnt", _u32),
        ("line_info_rec_size", _u32), ("line_info", _u64), ("line_info_cnt", _u32),
        ("attach_btf_id", _u32), ("attach_prog_fd", _u32), ("core_relo_cnt", _u32),
        ("fd_array", _u64), ("core_relos", _u64), ("core_relo_rec_size", _u32), ("log_true_size", _u32),
    ]


class _TestRunAttr(ctypes.Structure):
    """``union bpf_attr`` for BPF_PROG_TEST_RUN (``test``); ``retval`` and ``duration`` come back."""

    _fields_ = [
        ("prog_fd", _u32), ("retval", _u32), ("data_size_in", _u32), ("data_size_out", _u32),
        ("data_in", _u64), ("data_out", _u64), ("repeat", _u32), ("duration", _u32),
        ("ctx_size_in", _u32), ("ctx_size_out", _u32), ("ctx_in", _u64), ("ctx_out", _u64),
        ("flags", _u32), ("cpu", _u32), ("batch_size", _u32),
    ]


class BpfError(SpaError):
    """A ``bpf(2)`` call that failed; ``errno`` is the kernel's, ``log`` the verifier's for a refused program."""

    def __init__(self, message: str, err: int = 0, log: str = ""):
        self.message = message
        self.errno = err
        self.log = log
        super().__init__(message)


def _syscall_number() -> int:
    machine = platform.machine()
    try:
        return _SYSCALL_NUMBERS[machine]
    except KeyError:
        raise BpfError(f"eBPF is not supported on this machine ({machine}): no bpf() system call number "
                       f"for it (known: {', '.join(sorted(_SYSCALL_NUMBERS))})", errno.ENOSYS) from None


@functools.cache
def _syscall() -> Callable[..., int]:
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    return fn


def _sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    """``bpf(cmd, attr, sizeof attr)``: the result (>= 0) or ``-errno``; output fields land back in ``attr``."""
    size = ctypes.sizeof(attr)
    buf = ctypes.create_string_buffer(max(_ATTR_BUFFER_MIN, size))
    ctypes.memmove(buf, ctypes.addressof(attr), size)
    nr = _syscall_number()
    while True:
        # syscall() is variadic: every argument is passed as a long (no argtypes).
        rc = _syscall()(ctypes.c_long(nr), ctypes.c_long(cmd), buf, ctypes.c_long(size))
        if rc >= 0:
            break
        err = ctypes.get_errno()
        if err != errno.EINTR:
            rc = -err
            break
    ctypes.memmove(ctypes.addressof(attr), buf, size)
    return rc


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise BpfError(f"{what}: {os.strerror(-rc)}", -rc)
    return rc


def _kernel_name(name: str) -> bytes:
    if len(name) >= BPF_OBJ_NAME_LEN or not _NAME.fullmatch(name):
        raise ValueError(f"BPF object name {name!r}: at most {BPF_OBJ_NAME_LEN - 1} of [A-Za-z0-9_.]")
    return name.encode()


class _FdOwner:
    """Holds one kernel file descriptor; ``close()`` may be called any number of times."""

    _fd: int

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Map(_FdOwner):
    """A BPF map, by its file descriptor. Keys and values are ``bytes`` of exactly the declared sizes."""

    def __init__(self, fd: int, map_type: int, key_size: int, value_size: int, max_entries: int, name: str = ""):
        self._fd = fd
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.name = name

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int = 0,
               name: str = "") -> Map:
        attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                              max_entries=max_entries, map_flags=flags, map_name=_kernel_name(name))
        what = f"creating BPF map {name or '(unnamed)'} (type {map_type}, key {key_size} B, value {value_size} B, " \
               f"{max_entries} entries)"
        fd = _check(_sys_bpf(_MAP_CREATE, attr), what)
        log.debug("BPF map %s: fd %d (type %d, %d entries)", name, fd, map_type, max_entries)
        return cls(fd, map_type, key_size, value_size, max_entries, name)

    def __repr__(self) -> str:
        return f"<Map {self.name or '(unnamed)'} type={self.map_type} fd={self._fd}>"

    def _buffer(self, data: bytes, size: int, what: str) -> ctypes.Array:
        if len(data) != size:
            raise ValueError(f"map {self.name or '(unnamed)'}: {what} is {len(data)} bytes, not {size}")
        return ctypes.create_string_buffer(bytes(data), size)

    def _elem(self, cmd: int, key: ctypes.Array | None, value: ctypes.Array | None, flags: int = 0) -> int:
        attr = _MapElemAttr(map_fd=self.fileno(), key=ctypes.addressof(key) if key is not None else 0,
                            value=ctypes.addressof(value) if value is not None else 0, flags=flags)
        return _sys_bpf(cmd, attr)

    def _what(self, op: str) -> str:
        return f"{op} in BPF map {self.name or '(unnamed)'}"

    def _value_of(self, cmd: int, key: bytes, op: str) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        rc = self._elem(cmd, self._buffer(key, self.key_size, "key"), value)
        if rc == -errno.ENOENT:
            return None
        _check(rc, self._what(op))
        return value.raw

    def lookup(self, key: bytes) -> bytes | None:
        return self._value_of(_MAP_LOOKUP_ELEM, key, "lookup")

    def update(self, key: bytes, value: bytes, flag: int = BPF_ANY) -> None:
        """Set ``key`` to ``value``; ``BPF_NOEXIST`` fails (EEXIST) on a present key, ``BPF_EXIST`` (ENOENT) on a new one."""
        rc = self._elem(_MAP_UPDATE_ELEM, self._buffer(key, self.key_size, "key"),
                        self._buffer(value, self.value_size, "value"), flag)
        what = self._what("update")
        if rc == -errno.E2BIG:
            what += f" (full: {self.max_entries} entries)"
        _check(rc, what)

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False when it was not there. Array elements cannot be deleted (EINVAL)."""
        rc = self._elem(_MAP_DELETE_ELEM, self._buffer(key, self.key_size, "key"), None)
        if rc == -errno.ENOENT:
            return False
        _check(rc, self._what("delete"))
        return True

    def lookup_and_delete(self, key: bytes) -> bytes | None:
        """The value of ``key``, removed in the same call (hash maps, kernel 5.14); None when absent."""
        return self._value_of(_MAP_LOOKUP_AND_DELETE_ELEM, key, "lookup-and-delete")

    def keys(self) -> Iterator[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY. On a hash map changed meanwhile a key may come twice or not at all."""
        prev: ctypes.Array | None = None  # none: the kernel starts at the first key
        while True:
            nxt = ctypes.create_string_buffer(self.key_size)
            rc = self._elem(_MAP_GET_NEXT_KEY, prev, nxt)
            if rc == -errno.ENOENT:
                return
            _check(rc, self._what("next key"))
            yield nxt.raw
            prev = nxt

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first with None, or when ``key`` is gone), None after the last."""
        prev = self._buffer(key, self.key_size, "key") if key is not None else None
        nxt = ctypes.create_string_buffer(self.key_size)
        rc = self._elem(_MAP_GET_NEXT_KEY, prev, nxt)
        if rc == -errno.ENOENT:
            return None
        _check(rc, self._what("next key"))
        return nxt.raw

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` pairs; a key removed between the two calls is left out."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value


class Program(_FdOwner):
    """A loaded eBPF program, by its file descriptor."""

    def __init__(self, fd: int, prog_type: int, name: str = "", insn_count: int = 0):
        self._fd = fd
        self.prog_type = prog_type
        self.name = name
        self.insn_count = insn_count

    @classmethod
    def load(cls, code: bytes, *, prog_type: int = SOCKET_FILTER, name: str = "", license: str = "GPL") -> Program:
        """Load ``code`` (8 bytes per instruction); a refused program raises BpfError with the verifier's log."""
        if not code or len(code) % 8:
            raise ValueError(f"eBPF code is {len(code)} bytes, not a non-zero multiple of 8")
        insns = ctypes.create_string_buffer(bytes(code), len(code))
        lic = ctypes.create_string_buffer(license.encode())
        attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(code) // 8, insns=ctypes.addressof(insns),
                             license=ctypes.addressof(lic), prog_name=_kernel_name(name))
        # Without a log first: the verifier's text costs time and memory only a refusal needs.
        rc = _sys_bpf(_PROG_LOAD, attr)
        text = ""
        if rc < 0:
            logbuf = ctypes.create_string_buffer(_LOG_SIZE)
            attr.log_level, attr.log_size, attr.log_buf = 1, _LOG_SIZE, ctypes.addressof(logbuf)
            retry = _sys_bpf(_PROG_LOAD, attr)
            text = logbuf.value.decode(errors="replace")
            if retry >= 0:  # the first refusal was transient (EAGAIN, ENOMEM)
                rc = retry
        if rc < 0:
            raise _refused(name, len(code) // 8, -rc, text)
        log.debug("BPF program %s: fd %d (%d instructions)", name, rc, len(code) // 8)
        return cls(rc, prog_type, name, len(code) // 8)

    def __repr__(self) -> str:
        return f"<Program {self.name or '(unnamed)'} type={self.prog_type} fd={self._fd}>"

    def test_run(self, data: bytes, repeat: int = 1) -> tuple[int, int]:
        """Run on ``data`` (BPF_PROG_TEST_RUN): the program's return value and its mean duration in ns.

        For a socket filter ``data`` starts with a 14-byte Ethernet header,
        which the kernel strips: the program sees what follows, as on an
        AF_PACKET SOCK_DGRAM socket (see ``test_run_ip``).
        """
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        attr = _TestRunAttr(prog_fd=self.fileno(), data_size_in=len(data), data_in=ctypes.addressof(buf),
                            repeat=repeat)
        _check(_sys_bpf(_PROG_TEST_RUN, attr), f"test run of BPF program {self.name or '(unnamed)'}")
        return attr.retval, attr.duration

    def test_run_ip(self, ip_packet: bytes) -> int:
        """The return value for an IP packet (from its network header on, as the live socket filter sees it).

        The kernel's test run refuses (EINVAL) a packet shorter than its IP
        header (20 bytes for IPv4, 40 for IPv6): that is a ValueError here.
        """
        version = ip_packet[0] >> 4 if ip_packet else None
        ethertype, least = _IP_VERSIONS.get(version, (None, 0))  # type: ignore[arg-type]
        if ethertype is None:
            raise ValueError(f"not an IPv4 or IPv6 packet (version nibble {version})")
        if len(ip_packet) < least:
            raise ValueError(f"an IPv{version} packet of {len(ip_packet)} bytes: the kernel's test run needs "
                             f"at least the {least}-byte header")
        # Destination zero = loopback's address: the kernel's test device takes it as for this host.
        header = bytes(12) + struct.pack("!H", ethertype)
        return self.test_run(header + ip_packet)[0]


def _refused(name: str, count: int, err: int, text: str) -> BpfError:
    lines = [line for line in text.splitlines() if line.strip()]
    message = f"the kernel refused BPF program {name or '(unnamed)'} ({count} instructions): {os.strerror(err)}"
    if lines:
        message += "; verifier log, last lines:\n" + "\n".join(lines[-_LOG_TAIL_LINES:])
    return BpfError(message, err, text)


def attach(sock: socket.socket, prog: Program) -> None:
    """Put ``prog`` on ``sock`` as its filter (SO_ATTACH_BPF), replacing any filter there, atomically."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog.fileno())
    except OSError as e:
        raise BpfError(f"attaching BPF program {prog.name or '(unnamed)'} to a socket: {e.strerror}", e.errno or 0) from e


def detach(sock: socket.socket) -> bool:
    """Take ``sock``'s filter off (classic or eBPF); False when it had none."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_BPF, 0)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise BpfError(f"detaching a socket's filter: {e.strerror}", e.errno or 0) from e
    return True


def walk_records(data: bytes | bytearray | mmap.mmap, base: int, mask: int, consumer_pos: int, producer_pos: int,
                 max_records: int) -> tuple[list[bytes], int]:
    """The committed records between two ring positions, and the position after the last one taken (pure).

    ``data`` is the mapping (anything ``struct.unpack_from`` and slicing
    take) whose data area starts at ``base`` and appears twice in a row, so
    a record that passes the end is read in one piece. A record is an
    8-byte header (u32 length with the busy and discard bits, u32 page
    offset), the payload, padding to 8 bytes. The walk stops at a busy
    record (still being written: it and those after it wait for the next
    read); a discarded one is stepped over.
    """
    records: list[bytes] = []
    pos = consumer_pos
    while pos < producer_pos and len(records) < max_records:
        at = base + (pos & mask)
        header = struct.unpack_from("<I", data, at)[0]
        if header & BPF_RINGBUF_BUSY_BIT:
            break
        length = header & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
        step = (BPF_RINGBUF_HDR_SZ + length + 7) & ~7
        if pos + step > producer_pos:
            raise BpfError(f"ring buffer record at {pos} ({length} bytes) runs past the producer position {producer_pos}")
        if not header & BPF_RINGBUF_DISCARD_BIT:
            records.append(bytes(data[at + BPF_RINGBUF_HDR_SZ:at + BPF_RINGBUF_HDR_SZ + length]))
        pos += step
    return records, pos


class RingBuffer:
    """The consumer side of a BPF_MAP_TYPE_RINGBUF map, through its shared memory (no system call per read).

    Takes over ``ring_map``: ``close()`` closes it too. The map's fd
    (``fileno()``) polls readable while records wait, so it can go into a
    selector.
    """

    def __init__(self, ring_map: Map):
        if ring_map.map_type != RINGBUF:
            raise ValueError(f"map {ring_map.name or '(unnamed)'} is of type {ring_map.map_type}, not a ring buffer")
        self.map = ring_map
        self.closed = False
        self.size = ring_map.max_entries
        self._mask = self.size - 1
        self._page = mmap.PAGESIZE
        fd = ring_map.fileno()
        try:
            # The consumer page is ours to write; the producer page and the data (mapped twice by
            # the kernel, so no record wraps) are read-only: the kernel refuses them writable.
            self._consumer = mmap.mmap(fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except OSError as e:
            raise BpfError(f"mapping the consumer page of ring buffer {ring_map.name}: {e.strerror}", e.errno or 0) from e
        try:
            self._producer = mmap.mmap(fd, self._page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                       offset=self._page)
        except OSError as e:
            self._consumer.close()
            raise BpfError(f"mapping the data of ring buffer {ring_map.name}: {e.strerror}", e.errno or 0) from e

    @classmethod
    def create(cls, size: int, *, name: str = "") -> RingBuffer:
        """A new ring buffer of ``size`` data bytes (a power of two, a multiple of the page size)."""
        if size < mmap.PAGESIZE or size & (size - 1):
            raise ValueError(f"ring buffer size {size}: a power of two of at least the page size ({mmap.PAGESIZE})")
        ring_map = Map.create(RINGBUF, 0, 0, size, name=name)
        try:
            return cls(ring_map)
        except BaseException:
            ring_map.close()
            raise

    def fileno(self) -> int:
        return self.map.fileno()

    @property
    def consumer_pos(self) -> int:
        return struct.unpack_from("<Q", self._consumer, 0)[0]

    def read(self, max_records: int = 4096) -> list[bytes]:
        """The records written since the last read (at most ``max_records``), oldest first; their space is given back."""
        if self.closed:
            raise ValueError("RingBuffer is closed")
        consumer = self.consumer_pos
        # Read once: every record before it is committed or marked busy.
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        records, pos = walk_records(self._producer, self._page, self._mask, consumer, producer, max_records)
        if pos != consumer:
            struct.pack_into("<Q", self._consumer, 0, pos)
        return records

    def skip(self) -> int:
        """Give back every record written so far without reading it; how many bytes that freed."""
        if self.closed:
            raise ValueError("RingBuffer is closed")
        consumer = self.consumer_pos
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        # A record still being written is skipped too: its writer commits into space already given back,
        # which only means it is never read (the kernel checks positions, not who owns the bytes).
        if producer > consumer:
            struct.pack_into("<Q", self._consumer, 0, producer)
        return max(0, producer - consumer)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._producer.close()
            self._consumer.close()
        self.map.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: ``mov64 r0, 0; exit``: a program that only returns (the probe, and a benchmark's baseline).
RETURN_ZERO = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


@functools.cache
def available() -> str | None:
    """None when this process can create a map and load a socket filter; else why not, for an administrator."""
    try:
        with Map.create(ARRAY, 4, 4, 1, name="spa_probe"):
            pass
        Program.load(RETURN_ZERO, name="spa_probe").close()
    except BpfError as e:
        return _unavailable_reason(e)
    return None


def _unavailable_reason(e: BpfError) -> str:
    if e.errno == errno.ENOSYS:
        if "machine" in e.message:
            return e.message
        return "the kernel has no bpf() system call (CONFIG_BPF_SYSCALL off), or a seccomp filter hides it"
    if e.errno == errno.EPERM:
        why = ["bpf() not permitted: needs root (CAP_BPF with CAP_NET_ADMIN, or CAP_SYS_ADMIN)"]
        if os.geteuid() != 0:
            why.append(f"kernel.unprivileged_bpf_disabled = {_read('/proc/sys/kernel/unprivileged_bpf_disabled')}")
        lockdown = _read("/sys/kernel/security/lockdown")
        if lockdown and "[none]" not in lockdown:
            why.append(f"kernel lockdown is on ({lockdown})")
        why.append("or a seccomp filter (container) or RLIMIT_MEMLOCK (kernels before 5.11) refuses it")
        return "; ".join(why)
    return f"eBPF unusable: {e.message.splitlines()[0]}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
