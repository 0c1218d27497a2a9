"""Packet capture: AF_PACKET ``SOCK_DGRAM`` sockets with a kernel filter, on named interfaces or ``any``.

One socket per interface and protocol (``ETH_P_IP``, and ``ETH_P_IPV6``
unless ``ipv6=False``). ``SOCK_DGRAM`` packet sockets hand over the packet
from its network header on, on every link type (Ethernet, ppp, tun,
WireGuard, loopback), which is what the filter (compiled for raw IP) and
``spa.packet`` expect. Protocol-specific packet sockets only see packets
*received* by the host: outgoing copies go to ``ETH_P_ALL`` taps alone.

Every socket is opened as ``socket(AF_PACKET, SOCK_DGRAM, 0)`` (protocol 0:
receives nothing), gets its receive ring (``spa.server.ring``: packets are
read from shared memory, no system call each) and the current filter
program, and only then is bound to ``(ifindex, protocol)``: no unfiltered
packet is ever queued. ``any`` binds to ifindex 0 (every interface, present
and future).

Beside them, per interface and protocol, sockets that carry an eBPF program
instead (opened, closed and reopened with the interface's own): the kernel
knock matcher's taps (``set_tap``: never read, the program returns 0) and
the SPA port's screen (``set_screen``: read with ``read_screen``, one
datagram a system call, as only authenticated ones pass).

Unlike knockd, an interface that goes down, disappears or does not exist yet
is not fatal: ``read()`` never raises for a socket error; it logs the outage
once, closes that interface's sockets and ``refresh()`` (called by the
daemon on a ``spa.server.netlink.Monitor`` change and periodically) opens
them again once the interface exists and is up. The set of sockets can thus
change on ``read()`` and ``refresh()``; ``version`` is bumped each time, so
the daemon re-registers ``sockets()`` and ``screens()`` with its selector
when it differs.

All sockets are made in the calling thread's network namespace: construct
the capture and call ``refresh()`` in the same one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from spa.server import ebpf, netlink
from spa.server.bpf import DROP_ALL, FilterError, Insn, attach_filter
from spa.server.ring import DEFAULT_RING_BYTES, Ring

log = logging.getLogger("spa.server.capture")

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ANY = "any"

SOL_PACKET = 263
PACKET_STATISTICS = 6
_TPACKET_STATS = struct.Struct("=II")  # tp_packets (includes drops), tp_drops
_SOCKADDR_LL = struct.Struct("=HHiHBB8s")  # family, protocol (network order), ifindex, hatype, pkttype, halen, addr
IFNAMSIZ = 16

_TAP, _SCREEN = "tap", "screen"
_WHAT = {_TAP: "kernel knock matcher", _SCREEN: "SPA port's kernel screen"}
#: A screened datagram is an SPA packet (271 bytes and its headers); room for any IP packet anyway.
_SCREEN_MAX = 65535

#: ``ret #262144``: accept every packet whole (what libpcap emits for an empty expression).
ACCEPT_ALL: list[Insn] = [(0x06, 0, 0, 0x40000)]

# Ancillary load of skb->pkt_type (linux/filter.h: SKF_AD_OFF + SKF_AD_PKTTYPE).
_SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF
_PACKET_OTHERHOST = 3
#: Prefix that drops frames for another host's MAC (seen when the interface is promiscuous),
#: which the IP stack would drop too: a knock the host never received is not a knock.
_OTHERHOST_GUARD: list[Insn] = [
    (0x20, 0, 0, _SKF_AD_PKTTYPE),  # ld  #pkttype
    (0x15, 0, 1, _PACKET_OTHERHOST),  # jeq #OTHERHOST, next, skip
    (0x06, 0, 0, 0),  # ret #0
]
_BPF_MAXINSNS = 4096

#: Socket errors that mean the interface went away (down, deleted, moved to another namespace).
DOWN_ERRNOS = frozenset({errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.ENETUNREACH, errno.EIO})

_SO_ERROR = socket.SO_ERROR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.bind.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.bind.restype = ctypes.c_int


def _bind(sock: socket.socket, ifindex: int, proto: int) -> None:
    # Python's AF_PACKET address is (ifname, proto) and resolves the name
    # itself; binding by index avoids that race and allows ifindex 0 ("any").
    addr = _SOCKADDR_LL.pack(socket.AF_PACKET, socket.htons(proto), ifindex, 0, 0, 0, b"")
    if _libc.bind(sock.fileno(), addr, len(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind to ifindex {ifindex}: {errno.errorcode.get(err, err)}")


def guard(insns: Sequence[Insn]) -> list[Insn]:
    """``insns`` behind a prefix that drops ``PACKET_OTHERHOST`` frames (unless that overflows the limit)."""
    insns = list(insns)
    if len(insns) + len(_OTHERHOST_GUARD) > _BPF_MAXINSNS:
        return insns
    return _OTHERHOST_GUARD + insns


@dataclass(eq=False)
class _Iface:
    name: str
    #: ifindex the sockets are bound to (0 for "any"), None when closed.
    index: int | None = None
    socks: list[socket.socket] = field(default_factory=list)
    #: Sockets that carry an eBPF program, one per protocol, by kind: the tap (the kernel knock matcher:
    #: never read) and the screen (the SPA port's: read).
    attached: dict[str, list[socket.socket]] = field(default_factory=lambda: {_TAP: [], _SCREEN: []})
    #: "new", "open", "down", "missing", "error"
    state: str = "new"
    ever_open: bool = False
    last_error: str = ""


class Capture:
    """Filtered packet sockets on ``interfaces`` (names, or ``"any"`` for all of them)."""

    def __init__(
        self,
        interfaces: Sequence[str],
        ipv6: bool = True,
        *,
        filter: Sequence[Insn] = DROP_ALL,
        ring_bytes: int = DEFAULT_RING_BYTES,
        drop_otherhost: bool = True,
    ) -> None:
        names: list[str] = []
        for name in interfaces:
            if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
                raise ValueError(f"invalid interface name {name!r}")
            if name not in names:
                names.append(name)
        if not names:
            raise ValueError("no interface to capture on")
        if ANY in names and len(names) > 1:
            # Both would deliver every packet on the named interfaces twice.
            log.info("'any' covers every interface; not opening %s separately", ", ".join(n for n in names if n != ANY))
            names = [ANY]
        self._protos = (ETH_P_IP, ETH_P_IPV6) if ipv6 else (ETH_P_IP,)
        self._ring_bytes = ring_bytes
        self._drop_otherhost = drop_otherhost
        self._probe: socket.socket | None = None
        self._programs: dict[str, ebpf.Program | None] = {_TAP: None, _SCREEN: None}
        # A program the kernel rejects is a configuration error: raise FilterError now, not on every reopen.
        self._insns: list[Insn] = self._checked(filter)
        self._ifaces = {name: _Iface(name) for name in names}
        # socket -> (interface, its receive ring)
        self._by_sock: dict[socket.socket, tuple[_Iface, Ring]] = {}
        #: packets, read_errors, reopens, kernel_packets, kernel_drops
        self.stats: Counter[str] = Counter()
        #: Bumped whenever the set of open sockets changes.
        self.version = 0
        self._closed = False
        self.refresh()

    # -- filter ----------------------------------------------------------------

    def _checked(self, insns: Sequence[Insn]) -> list[Insn]:
        """The program as attached (guarded), after the kernel accepted it on a socket that receives nothing."""
        program = guard(insns) if self._drop_otherhost else list(insns)
        # The probe is kept open: closing a packet socket waits for an RCU grace period
        # (about 10 ms here), which a filter swap at every rotating window
        # boundary would otherwise pay on the capture loop.
        attach_filter(self._probe_socket(), program)  # protocol 0, unbound: no packet ever reaches it
        return program

    def set_filter(self, insns: Sequence[Insn]) -> None:
        """Replace the filter on every socket (atomically per socket) and on sockets opened later.

        Raises ``FilterError`` (and changes nothing) when the kernel rejects the program.
        """
        program = self._checked(insns)
        self._insns = program
        for iface in list(self._ifaces.values()):
            for s in list(iface.socks):
                try:
                    attach_filter(s, program)
                except FilterError as e:
                    log.error("interface %s: cannot replace the capture filter: %s; reopening", iface.name, e)
                    self._close_iface(iface, "error")
                    break

    def set_tap(self, program: ebpf.Program | None) -> None:
        """Run ``program`` (an eBPF socket filter) on every packet of every interface, beside the filter.

        It goes on tap sockets of its own, opened with each interface's
        sockets (and replaced atomically, socket by socket); they are never
        read, so the program should return 0. ``None`` closes them. Raises
        ``ebpf.BpfError`` (and changes nothing) when the kernel refuses it.
        """
        self._set_program(_TAP, program)

    def set_screen(self, program: ebpf.Program | None) -> None:
        """As ``set_tap``, on sockets that are read: what ``program`` passes is ``read_screen``'s.

        The SPA port's kernel screen (``spa.server.spa_kernel``): the capture
        filter then leaves the SPA port out. ``screens()`` lists the sockets;
        ``version`` moves when they change.
        """
        self._set_program(_SCREEN, program)
        self.version += 1

    def _set_program(self, kind: str, program: ebpf.Program | None) -> None:
        if program is not None:
            ebpf.attach(self._probe_socket(), program)
        self._programs[kind] = program
        for iface in list(self._ifaces.values()):
            if program is None or not iface.socks:
                self._close_attached(iface, kind)
                continue
            try:
                if iface.attached[kind]:
                    for t in iface.attached[kind]:
                        ebpf.attach(t, program)
                else:
                    assert iface.index is not None
                    iface.attached[kind] = self._open_attached(iface.index, kind)
            except (OSError, ebpf.BpfError) as e:
                log.error("interface %s: cannot attach the %s: %s; reopening", iface.name, _WHAT[kind], e)
                self._close_iface(iface, "error")

    def _probe_socket(self) -> socket.socket:
        if self._probe is None:
            self._probe = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
        return self._probe

    def _open_attached(self, ifindex: int, kind: str) -> list[socket.socket]:
        program = self._programs[kind]
        assert program is not None
        out: list[socket.socket] = []
        try:
            for proto in self._protos:
                t = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
                out.append(t)
                if kind == _TAP:
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)  # the kernel's minimum: it never queues
                ebpf.attach(t, program)
                _bind(t, ifindex, proto)
        except BaseException:
            for t in out:
                t.close()
            raise
        return out

    def _close_attached(self, iface: _Iface, kind: str) -> None:
        for t in iface.attached[kind]:
            t.close()
        if kind == _SCREEN and iface.attached[kind]:
            self.version += 1
        iface.attached[kind] = []

    def screens(self) -> list[socket.socket]:
        """The screen's sockets (``set_screen``), for a selector."""
        return [t for iface in self._ifaces.values() for t in iface.attached[_SCREEN]]

    def read_screen(self, sock: socket.socket, max_packets: int = 64) -> Iterator[bytes]:
        """Up to ``max_packets`` datagrams the screen passed on ``sock``, each yielded as it is read (never
        raises: a socket error is the interface's, and the capture's own sockets report it).

        One at a time, not read all first: the first datagram is usually the only one, and its door
        should not wait for the read that finds the socket empty.
        """
        for _ in range(max_packets):
            try:
                data = sock.recv(_SCREEN_MAX)
            except OSError:  # BlockingIOError: all read; anything else: the interface went, refresh() reopens
                return
            yield data

    # -- sockets ---------------------------------------------------------------

    def sockets(self) -> list[socket.socket]:
        """Every open socket (for a selector); changes when ``version`` does."""
        return list(self._by_sock)

    def status(self) -> dict[str, str]:
        """Interface name to ``open``, ``down``, ``missing`` or ``error``."""
        return {name: iface.state for name, iface in self._ifaces.items()}

    def _open_socket(self, ifindex: int, proto: int) -> tuple[socket.socket, Ring]:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0)
        ring = None
        try:
            ring = Ring(s, self._ring_bytes)
            attach_filter(s, self._insns)
            _bind(s, ifindex, proto)  # only now does the socket receive, and only through the filter
        except BaseException:
            if ring is not None:
                ring.close()
            s.close()
            raise
        return s, ring

    def _open_iface(self, iface: _Iface, ifindex: int) -> bool:
        opened: list[tuple[socket.socket, Ring]] = []
        attached: dict[str, list[socket.socket]] = {_TAP: [], _SCREEN: []}
        try:
            for proto in self._protos:
                opened.append(self._open_socket(ifindex, proto))
            for kind, program in self._programs.items():
                if program is not None:
                    attached[kind] = self._open_attached(ifindex, kind)
        except (OSError, FilterError, ebpf.BpfError) as e:
            for s, ring in opened:
                ring.close()
                s.close()
            for socks in attached.values():
                for t in socks:
                    t.close()
            message = str(e)
            if iface.state != "error" or iface.last_error != message:
                log.warning("interface %s: cannot capture: %s; will retry", iface.name, message)
            iface.state, iface.last_error = "error", message
            return False
        iface.socks, iface.attached, iface.index = [s for s, _ in opened], attached, ifindex
        for s, ring in opened:
            self._by_sock[s] = (iface, ring)
        if iface.ever_open:
            self.stats["reopens"] += 1
            log.warning("interface %s is back", iface.name)
        else:
            log.info("capturing on interface %s", iface.name if iface.name == ANY else f"{iface.name} (index {ifindex})")
        iface.state, iface.ever_open, iface.last_error = "open", True, ""
        self.version += 1
        return True

    def _close_iface(self, iface: _Iface, state: str) -> None:
        for s in iface.socks:
            self._collect(s)
            entry = self._by_sock.pop(s, None)
            if entry is not None:
                entry[1].close()
            s.close()
        for kind in iface.attached:
            self._close_attached(iface, kind)
        if iface.socks:
            self.version += 1
        iface.socks, iface.index, iface.state = [], None, state

    def refresh(self, links: dict[int, netlink.Interface] | None = None) -> bool:
        """Match the sockets to the interfaces as they are now; True if the set of sockets changed.

        ``links`` is a fresh ``netlink.interfaces()``; dumped here when not given.
        """
        if self._closed:
            return False
        before = self.version
        needs_links = any(name != ANY for name in self._ifaces)
        if links is None and needs_links:
            try:
                links = netlink.interfaces()
            except OSError as e:
                log.warning("cannot list interfaces: %s", e)
                return False
        by_name = {link.name: link for link in (links or {}).values()}
        for iface in self._ifaces.values():
            if iface.name == ANY:
                if not iface.socks:
                    self._open_iface(iface, 0)
                continue
            link = by_name.get(iface.name)
            if iface.socks:
                if link is None:
                    log.warning("interface %s is gone; waiting for it", iface.name)
                    self._close_iface(iface, "missing")
                elif not link.admin_up:
                    log.warning("interface %s went down; waiting for it", iface.name)
                    self._close_iface(iface, "down")
                elif link.index != iface.index:
                    log.warning("interface %s was replaced (index %s -> %d); reopening", iface.name, iface.index, link.index)
                    self._close_iface(iface, "down")
                else:
                    continue
            if link is None:
                if iface.state != "missing":
                    log.warning("interface %s does not exist; waiting for it", iface.name)
                    iface.state = "missing"
            elif not link.admin_up:
                if iface.state != "down":
                    log.warning("interface %s is down; waiting for it", iface.name)
                    iface.state = "down"
            else:
                self._open_iface(iface, link.index)
        return self.version != before

    # -- reading ---------------------------------------------------------------

    def read(
        self, sock: socket.socket, now_fn: Callable[[], float] = time.monotonic, max_packets: int = 1024
    ) -> tuple[float, list[bytes]]:
        """``(time, packets)``: up to ``max_packets`` packets from ``sock``'s ring; never raises.

        ``time`` is ``now_fn()`` once per batch. A socket error (the interface
        went down or away; the selector reports it as readable) is looked for
        when the ring is empty: it is logged once and the interface's sockets
        are closed until ``refresh()`` finds it up again (tried once right
        away: it may be back already).
        """
        now = now_fn()
        entry = self._by_sock.get(sock)
        if entry is None:
            return now, []
        iface, ring = entry
        out = ring.read(max_packets)
        if out:
            self.stats["packets"] += len(out)
            return now, out
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, _SO_ERROR)  # reading it clears it
        except OSError as e:
            err = e.errno or errno.EIO
        if not err:
            return now, out
        failed = OSError(err, os.strerror(err))
        self.stats["read_errors"] += 1
        if err in DOWN_ERRNOS:
            log.warning("interface %s went down: %s; waiting for it", iface.name, failed)
            state = "down"
        else:
            log.warning("interface %s: read error: %s; reopening", iface.name, failed)
            state = "error"
        self._close_iface(iface, state)
        # The interface may be back already (down and up before we looked), and the
        # monitor's notifications may be drained: look once now (an error path, not per packet).
        self.refresh()
        return now, out

    # -- statistics --------------------------------------------------------------

    def _collect(self, s: socket.socket) -> None:
        try:
            raw = s.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        except OSError:
            return
        if len(raw) < _TPACKET_STATS.size:
            return
        packets, drops = _TPACKET_STATS.unpack(raw)
        # The kernel resets its counters on every read: accumulate.
        self.stats["kernel_packets"] += packets
        self.stats["kernel_drops"] += drops

    def kernel_stats(self) -> dict[str, int]:
        """Packets that passed the filter (``packets``, drops included) and those dropped for lack of room."""
        for s in list(self._by_sock):
            self._collect(s)
        return {"packets": self.stats["kernel_packets"], "drops": self.stats["kernel_drops"]}

    # -- life-cycle ----------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        for iface in self._ifaces.values():
            self._close_iface(iface, "closed")
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        self._closed = True

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
