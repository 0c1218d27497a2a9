"""Classic BPF for the capture sockets: libpcap's filter compiler through ctypes, and attaching to a socket.

The capture reads AF_PACKET ``SOCK_DGRAM`` sockets, where the kernel hands
both the filter and ``recv`` the packet from its network header on, on
every link type. So expressions are compiled for ``DLT_RAW`` (raw IP: the
first byte's high nibble is the IP version), whatever the interface.

Only the compiler comes from libpcap (``pcap_open_dead`` + ``pcap_compile``:
no capture handle, no privileges); scapy is not involved. The resulting
program is a list of ``(code, jt, jf, k)`` tuples, which ``attach_filter``
puts on a socket with ``SO_ATTACH_FILTER``.

To never see an unfiltered packet, open the socket with protocol 0 (it
receives nothing), attach the filter, then ``bind((ifname, ETH_P_IP))``.
Replacing the filter later is one ``setsockopt``, atomic in the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import threading
from collections.abc import Sequence

from spa.errors import SpaError

Insn = tuple[int, int, int, int]

# pcap/dlt.h: DLT_RAW is 12 everywhere but OpenBSD (14). LINKTYPE_RAW (101)
# is the value written in capture *files*; pcap_open_dead takes a DLT_ value
# and rejects 101 on Linux ("unknown data link type 101"), as it does 14.
# With DLT_RAW, `ip` and `ip6` test the version nibble of byte 0.
DLT_RAW = 12
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# The kernel refuses longer classic programs (BPF_MAXINSNS).
BPF_MAXINSNS = 4096
# pcap_compile's "netmask unknown" (only matters for `ip broadcast`).
_PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
_SNAPLEN = 65535

#: ``ret #0``: a program that accepts nothing.
DROP_ALL: list[Insn] = [(0x06, 0, 0, 0)]
#: The message libpcap's optimizer gives for a valid expression that can match nothing.
_REJECTS_ALL = "expression rejects all packets"


class FilterError(SpaError):
    """A capture filter could not be compiled or attached."""


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    # struct bpf_program { u_int bf_len; struct bpf_insn *bf_insns; }
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


class _SockFprog(ctypes.Structure):
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_lib: ctypes.CDLL | None = None
# pcap_compile has been thread-safe since libpcap 1.8; the lock keeps older ones safe too.
_lock = threading.Lock()


def _libpcap() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    names = ["libpcap.so.0.8", "libpcap.so.1"]
    found = ctypes.util.find_library("pcap")
    if found:
        names.append(found)
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
            continue
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32,
        ]
        lib.pcap_freecode.restype = None
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_close.restype = None
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        _lib = lib
        return lib
    raise FilterError(
        "libpcap is not installed (needed to compile capture filters): "
        f"apt-get install libpcap0.8 ({'; '.join(errors)})"
    )


def compile_filter(expression: str, linktype: int = DLT_RAW, snaplen: int = _SNAPLEN) -> list[Insn]:
    """Compile a pcap filter expression to classic BPF instructions ``(code, jt, jf, k)``.

    An accepted packet is kept up to ``snaplen`` bytes (the ``ret #snaplen``).

    A valid expression that can match no packet at all (libpcap's "expression
    rejects all packets") compiles to ``DROP_ALL`` rather than failing.
    Raises ``FilterError`` with libpcap's message for anything else.
    """
    lib = _libpcap()
    with _lock:
        handle = lib.pcap_open_dead(linktype, snaplen)
        if not handle:
            raise FilterError(f"pcap_open_dead({linktype}, {snaplen}) failed")
        try:
            prog = _BpfProgram()
            rc = lib.pcap_compile(handle, ctypes.byref(prog), expression.encode(), 1, _PCAP_NETMASK_UNKNOWN)
            if rc != 0:
                message = (lib.pcap_geterr(handle) or b"unknown error").decode(errors="replace")
                if _REJECTS_ALL in message:
                    return list(DROP_ALL)
                raise FilterError(f"invalid capture filter: {message}; expression: {expression}")
            try:
                insns = [(i.code, i.jt, i.jf, i.k) for i in prog.bf_insns[: prog.bf_len]]
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
    if len(insns) > BPF_MAXINSNS:
        raise FilterError(
            f"capture filter is {len(insns)} instructions, over the kernel's limit of {BPF_MAXINSNS}; "
            f"expression: {expression[:200]}..."
        )
    return insns


def attach_filter(sock: socket.socket, insns: Sequence[Insn]) -> None:
    """Attach (or atomically replace) the classic BPF program on ``sock``."""
    n = len(insns)
    if not 0 < n <= BPF_MAXINSNS:
        raise FilterError(f"a BPF program must have 1 to {BPF_MAXINSNS} instructions, not {n}")
    array = (_BpfInsn * n)(*(_BpfInsn(c, jt, jf, k) for c, jt, jf, k in insns))
    fprog = _SockFprog(n, ctypes.addressof(array))
    try:
        # The kernel copies the program during the call; ``array`` lives until then.
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    except OSError as e:
        raise FilterError(f"cannot attach capture filter ({n} instructions): {e}") from e


def dump(insns: Sequence[Insn]) -> str:
    """The program as ``tcpdump -dd`` prints it (for logs and debugging)."""
    return "\n".join(f"{{ 0x{c:x}, {jt}, {jf}, 0x{k:08x} }}," for c, jt, jf, k in insns)
