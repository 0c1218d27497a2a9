"""rtnetlink, just enough for the capture: interfaces, their addresses, and change notifications.

A raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket and ``struct``; no pyroute2,
no ``ip`` subprocess. Three entry points:

* ``interfaces()``: an ``RTM_GETLINK`` dump, ``{ifindex: Interface}``;
* ``addresses()``: an ``RTM_GETADDR`` dump, ``{ifname: (address, ...)}``
  with IPv4 and IPv6 addresses, link-local included, without a scope id;
* ``Monitor``: a non-blocking socket subscribed to link and address
  changes, for the daemon's selector; ``drain()`` says whether anything
  changed (a receive-queue overrun counts as a change: state was lost).

Sockets are made in the calling thread's network namespace, so a thread
inside ``in_netns(...)`` sees that namespace. The buffer parsers
(``iter_messages``, ``parse_attrs``, ``parse_link``, ``parse_addr``,
``has_change``) are pure functions over bytes that never raise on
truncated or malformed input: a bad message is skipped, a bad length ends
the walk.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

NETLINK_ROUTE = 0

# linux/netlink.h
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

# linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
CHANGE_TYPES = frozenset((RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR))

# linux/if_link.h, linux/if_addr.h
IFLA_IFNAME = 3
IFLA_OPERSTATE = 16
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3

# linux/if.h
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
_NLMSGERR = struct.Struct("=i")  # error (negative errno), then the offending header

_DUMP_TIMEOUT = 2.0
_DUMP_RETRIES = 3
_RECV_SIZE = 1 << 18
_seq = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Interface:
    """One network interface as the kernel reports it."""

    index: int
    name: str
    #: ``IFF_*`` flags from ``ifinfomsg``.
    flags: int = 0

    @property
    def admin_up(self) -> bool:
        """``IFF_UP``: the interface is enabled (a packet socket bound to it is live)."""
        return bool(self.flags & IFF_UP)

    @property
    def up(self) -> bool:
        """Enabled and carrying traffic: ``IFF_UP`` and (``IFF_RUNNING`` or ``IFF_LOWER_UP``)."""
        return bool(self.flags & IFF_UP) and bool(self.flags & (IFF_RUNNING | IFF_LOWER_UP))


# -- pure parsers -------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def iter_messages(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """Walk a netlink datagram: ``(type, flags, seq, payload)`` per message.

    Stops at the first header that is truncated or whose length is too small
    or runs past the buffer; never raises.
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    end = len(view)
    off = 0
    while off + _NLMSGHDR.size <= end:
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(view, off)
        if length < _NLMSGHDR.size or off + length > end:
            return
        yield mtype, flags, seq, view[off + _NLMSGHDR.size: off + length]
        off += _align(length)


def parse_attrs(buf: bytes | bytearray | memoryview, offset: int = 0) -> dict[int, bytes]:
    """``rtattr`` list starting at ``offset``: ``{type: payload}`` (first of each type wins); never raises."""
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    end = len(view)
    attrs: dict[int, bytes] = {}
    off = offset
    while off + _RTATTR.size <= end:
        length, atype = _RTATTR.unpack_from(view, off)
        if length < _RTATTR.size or off + length > end:
            break
        # Strip NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        attrs.setdefault(atype & 0x3FFF, bytes(view[off + _RTATTR.size: off + length]))
        off += _align(length)
    return attrs


def parse_link(payload: bytes | bytearray | memoryview) -> Interface | None:
    """An ``RTM_NEWLINK``/``RTM_DELLINK`` payload to an ``Interface``; None if truncated or nameless."""
    if len(payload) < _IFINFOMSG.size:
        return None
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload, 0)
    raw = parse_attrs(payload, _IFINFOMSG.size).get(IFLA_IFNAME)
    if not raw or index <= 0:
        return None
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if not name:
        return None
    return Interface(index=index, name=name, flags=flags)


def parse_addr(payload: bytes | bytearray | memoryview) -> tuple[int, Address] | None:
    """An ``RTM_NEWADDR``/``RTM_DELADDR`` payload to ``(ifindex, address)``; None if truncated or not IP.

    Both families take ``IFA_LOCAL`` when present (on a point-to-point
    address set up with ``peer``, ``IFA_ADDRESS`` is the other end), else
    ``IFA_ADDRESS``.
    """
    if len(payload) < _IFADDRMSG.size:
        return None
    family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(payload, 0)
    attrs = parse_attrs(payload, _IFADDRMSG.size)
    if family == socket.AF_INET:
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is None or len(raw) != 4:
            return None
        return index, ipaddress.IPv4Address(raw)
    if family == socket.AF_INET6:
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is None or len(raw) != 16:
            return None
        return index, ipaddress.IPv6Address(raw)
    return None


def parse_error(payload: bytes | bytearray | memoryview) -> int:
    """The positive errno of an ``NLMSG_ERROR`` payload (0 = an ACK); ``EPROTO`` if truncated."""
    if len(payload) < _NLMSGERR.size:
        return errno.EPROTO
    return -_NLMSGERR.unpack_from(payload, 0)[0]


def has_change(buf: bytes | bytearray | memoryview) -> bool:
    """True if the datagram holds a link or address change (or an overrun notice); never raises."""
    for mtype, _flags, _seq, _payload in iter_messages(buf):
        if mtype in CHANGE_TYPES or mtype == NLMSG_OVERRUN:
            return True
    return False


def build_request(mtype: int, seq: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> bytes:
    """One netlink request message (header + ``body``)."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


# -- dumps --------------------------------------------------------------------


def _socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def _dump(mtype: int, body: bytes) -> list[tuple[int, memoryview]]:
    """Run one dump request; ``[(type, payload), ...]``. Retries when the kernel flags it inconsistent."""
    for attempt in range(_DUMP_RETRIES):
        seq = next(_seq) & 0xFFFFFFFF
        out: list[tuple[int, memoryview]] = []
        interrupted = False
        with _socket() as s:
            s.settimeout(_DUMP_TIMEOUT)
            s.bind((0, 0))
            s.sendto(build_request(mtype, seq, body), (0, 0))
            done = False
            while not done:
                try:
                    data = s.recv(_RECV_SIZE)
                except socket.timeout as e:
                    raise OSError(errno.ETIMEDOUT, f"netlink dump {mtype} timed out") from e
                if not data:
                    break
                for t, flags, mseq, payload in iter_messages(data):
                    if mseq != seq:
                        continue
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if t == NLMSG_DONE:
                        done = True
                        break
                    if t == NLMSG_ERROR:
                        err = parse_error(payload)
                        if err:
                            raise OSError(err, f"netlink dump {mtype}: {os.strerror(err)}")
                        done = True
                        break
                    if t in (NLMSG_NOOP, NLMSG_OVERRUN):
                        continue
                    out.append((t, payload))
        if not interrupted or attempt == _DUMP_RETRIES - 1:
            return out
    return []  # pragma: no cover - the loop always returns


def interfaces() -> dict[int, Interface]:
    """Every interface in this thread's network namespace, by index."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    links: dict[int, Interface] = {}
    for t, payload in _dump(RTM_GETLINK, body):
        if t != RTM_NEWLINK:
            continue
        link = parse_link(payload)
        if link is not None:
            links[link.index] = link
    return links


def addresses(links: dict[int, Interface] | None = None) -> dict[str, tuple[Address, ...]]:
    """Interface name to its IPv4 and IPv6 addresses (link-local included, no scope id).

    ``links`` (from ``interfaces()``) names the indexes; one is dumped when not given.
    Interfaces without an address are absent.
    """
    if links is None:
        links = interfaces()
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    found: dict[str, list[Address]] = {}
    for t, payload in _dump(RTM_GETADDR, body):
        if t != RTM_NEWADDR:
            continue
        parsed = parse_addr(payload)
        if parsed is None:
            continue
        index, addr = parsed
        link = links.get(index)
        if link is None:
            continue
        lst = found.setdefault(link.name, [])
        if addr not in lst:
            lst.append(addr)
    return {name: tuple(lst) for name, lst in found.items()}


# -- change notifications -----------------------------------------------------


class Monitor:
    """Link and address change notifications, for a selector.

    ``fileno()`` becomes readable when something arrived; ``drain()`` reads
    everything pending and says whether a change was among it. The caller
    then re-reads the state it cares about (``interfaces()``,
    ``addresses()``): the messages only say *that* something changed.
    """

    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
    RCVBUF = 1 << 20

    def __init__(self) -> None:
        self._sock: socket.socket | None = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, 33, self.RCVBUF)  # SO_RCVBUFFORCE
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
            self._sock.bind((0, self.GROUPS))
        except BaseException:
            self._sock.close()
            self._sock = None
            raise
        self._buf = bytearray(_RECV_SIZE)
        self._view = memoryview(self._buf)
        #: Receive-queue overruns seen (each one means notifications were lost).
        self.overruns = 0

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def drain(self) -> bool:
        """Read every pending message; True if a link or address changed (or messages were lost)."""
        changed = False
        sock = self._sock
        if sock is None:
            return False
        while True:
            try:
                n = sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return changed
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    # The queue overflowed: some notifications are gone, so assume everything changed.
                    self.overruns += 1
                    changed = True
                    continue
                return changed
            if n == 0:
                return changed
            if not changed and has_change(self._view[:n]):
                changed = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
