"""nftables set elements over raw nfnetlink: one ``sendmsg`` a transaction.

The nft backend writes grants (set elements with a timeout and a comment)
here, and goes through libnftables' JSON for everything else. libnftables
parses JSON and fetches its cache on every call (0.4-0.6 ms an open); an
element batch built with ``struct`` and sent on a socket kept open costs a
few tens of microseconds.

Three layers:

* pure builders (bytes out, no I/O): ``element_key``, ``comment_udata``,
  ``setelem_message`` and ``build_batch``, which lay messages out byte for
  byte as nft 1.0.6 does (tests/vectors/nft-setelem-v1.json holds what nft
  sent, captured with strace; the unit tests compare);
* ``parse_acks``: the ``NLMSG_ERROR`` replies of a datagram; never raises;
* ``SetElementWriter``: one ``NETLINK_NETFILTER`` socket, made in the
  calling thread's network namespace (like a libnftables context), that
  sends a batch and reads every reply under a lock.

A batch is one nftables transaction: the kernel runs it inside
``sendmsg`` and commits all of it or none of it. Every element message asks
for an ACK, so each gets a reply (0 or a negative errno); a batch the
kernel refuses as a whole (no permission, a failed commit) is answered on
the batch-begin's sequence number.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from spa.errors import FirewallError
from spa.server.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, iter_messages, parse_error

NETLINK_NETFILTER = 12
NETLINK_CAP_ACK = 10  # SOL_NETLINK option: errors without a copy of our request

# linux/netfilter/nfnetlink.h, linux/netfilter.h
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_UNSPEC, NFPROTO_INET = 0, 1
# linux/netfilter/nf_tables.h
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_USERDATA = 1, 4, 6
NFTA_DATA_VALUE = 1
# libnftnl/udata.h: the comment nft shows is this TLV in the element's userdata.
NFTNL_UDATA_SET_ELEM_COMMENT = 0
# linux/netlink.h
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLA_F_NESTED = 0x8000

SOL_NETLINK = 270
#: Guard only: the kernel has queued every reply by the time sendmsg returns.
REPLY_TIMEOUT = 1.0

PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

Op = Literal["add", "create", "delete"]
_FLAGS: dict[str, tuple[int, int]] = {
    # op: (message type, flags). "add" of an existing element is a no-op;
    # "create" (EXCL) fails with EEXIST instead.
    "add": (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
    "create": (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
    "delete": (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
}

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, packed by hand)
_NLATTR = struct.Struct("=HH")
_U64BE = struct.Struct(">Q")
_RECV_SIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class Element:
    """One set element: its key bytes, and for adds a timeout (ms) and a comment."""

    key: bytes
    timeout_ms: int | None = None
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class ElementOp:
    """Elements to add, create or delete in one set: one netlink message."""

    op: Op
    set: str
    elements: tuple[Element, ...]

    def describe(self, table: str) -> str:
        return f"{self.op} element inet {table} {self.set} ({len(self.elements)} element(s))"


# -- pure builders --------------------------------------------------------------


def _pad(n: int) -> int:
    return (n + 3) & ~3


def _attr(atype: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, atype) + payload + b"\0" * (_pad(length) - length)


def _nest(atype: int, *parts: bytes) -> bytes:
    return _attr(atype | NLA_F_NESTED, b"".join(parts))


def _strz(text: str) -> bytes:
    return text.encode() + b"\0"


def element_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address, proto: str, port: int) -> bytes:
    """``address . l4proto . port`` as the kernel compares it: each field padded to 4 bytes.

    4 + 4 + 4 = 12 bytes for IPv4, 16 + 4 + 4 = 24 for IPv6; the port is
    big-endian (inet_service), the protocol one byte (inet_proto).
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range")
    return address.packed + struct.pack("=B3x", PROTO_NUMBERS[proto]) + struct.pack(">H2x", port)


def comment_udata(comment: str) -> bytes:
    """The element userdata nft writes for ``comment "..."``: type 0, a length byte (NUL included), the text, NUL."""
    text = _strz(comment)
    if len(text) > 0xFF:
        raise ValueError(f"comment of {len(text) - 1} bytes does not fit nft's one-byte length")
    return struct.pack("=BB", NFTNL_UDATA_SET_ELEM_COMMENT, len(text)) + text


def _element_attrs(index: int, elem: Element) -> bytes:
    # nft's order: timeout, key, userdata. libnftnl numbers the list entries
    # 1, 2, ... (the kernel ignores the number); we do the same so our bytes
    # are nft's.
    parts = []
    if elem.timeout_ms is not None:
        parts.append(_attr(NFTA_SET_ELEM_TIMEOUT, _U64BE.pack(elem.timeout_ms)))
    parts.append(_nest(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, elem.key)))
    if elem.comment is not None:
        parts.append(_attr(NFTA_SET_ELEM_USERDATA, comment_udata(elem.comment)))
    return _nest(1 + index % 0x3FFF, *parts)


def _message(mtype: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = _NFGENMSG.pack(family, 0, socket.htons(res_id)) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def setelem_message(table: str, op: ElementOp, seq: int) -> bytes:
    """One ``NFT_MSG_NEWSETELEM``/``DELSETELEM`` message (family inet) for ``op``."""
    if not op.elements:
        raise ValueError("an element message needs at least one element")
    msg, flags = _FLAGS[op.op]
    attrs = (
        _attr(NFTA_SET_ELEM_LIST_TABLE, _strz(table))
        + _attr(NFTA_SET_ELEM_LIST_SET, _strz(op.set))
        + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, *(_element_attrs(i, e) for i, e in enumerate(op.elements)))
    )
    return _message((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, NFPROTO_INET, 0, attrs)


def build_batch(table: str, ops: Sequence[ElementOp], seq: int) -> bytes:
    """BATCH_BEGIN (``seq``), one message per op (``seq + 1`` ...), BATCH_END: one transaction."""
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")]
    out += [setelem_message(table, op, seq + 1 + i) for i, op in enumerate(ops)]
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1 + len(ops), NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(out)


class CreateTemplate:
    """``build_batch`` of one "create" op on one set, laid out once; ``render`` fills in what varies.

    The elements share one address (a grant's ports for one client); per use
    only that address, the timeout and the three sequence numbers change. The
    capture loop opens grants through this: a few slice assignments instead
    of some forty Python calls, which after an idle spell (cold caches) cost
    about 0.2 ms.
    """

    def __init__(self, table: str, set_name: str, address_size: int, tails: Sequence[bytes], comment: str | None):
        """``tails``: per element, the key after the address (``element_key`` without the address: 8 bytes)."""
        if not tails:
            raise ValueError("a create needs at least one element")
        self.address_size = address_size
        self.op = ElementOp("create", set_name,
                            tuple(Element(b"\0" * address_size + t, 1, comment) for t in tails))
        self._bytes = build_batch(table, [self.op], 0)
        # Layout (see setelem_message): BATCH_BEGIN (20 bytes); the element message's header and
        # nfgenmsg (20), the table and set attributes, the list's nest header (4); then per element
        # its nest header (4), the timeout attribute (4 + 8), the key nest (4), the data attribute (4), the key.
        first = 20 + 20 + _pad(_NLATTR.size + len(_strz(table))) + _pad(_NLATTR.size + len(_strz(set_name))) + 4
        self._elements: list[int] = []
        for i, e in enumerate(self.op.elements):
            self._elements.append(first)
            first += len(_element_attrs(i, e))
        self._seq_at = (8, 20 + 8, len(self._bytes) - 20 + 8)

    def render(self, address: bytes, timeout_ms: int, seq: int) -> bytes:
        """The batch for ``address`` (packed), ``timeout_ms`` and sequence numbers ``seq``..``seq + 2``."""
        if len(address) != self.address_size:
            raise ValueError(f"a {len(address)}-byte address where the set takes {self.address_size}")
        buf = bytearray(self._bytes)
        timeout = _U64BE.pack(timeout_ms)
        end = self.address_size + 24
        for at in self._elements:
            buf[at + 8:at + 16] = timeout
            buf[at + 24:at + end] = address
        for i, at in enumerate(self._seq_at):
            struct.pack_into("=I", buf, at, seq + i)
        return bytes(buf)


# -- replies --------------------------------------------------------------------


def parse_acks(buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """``(seq, errno)`` of each ``NLMSG_ERROR`` in a datagram (errno 0 = an ACK); never raises.

    A truncated error payload reads as ``EPROTO``; anything else is skipped.
    """
    return [(seq, parse_error(payload)) for mtype, _f, seq, payload in iter_messages(buf) if mtype == NLMSG_ERROR]


@dataclass
class BatchOutcome:
    """What the replies of one batch said so far."""

    begin: int
    count: int
    pending: set[int]
    #: (seq, errno) of the first failure, if any
    failed: tuple[int, int] | None = None

    @classmethod
    def expect(cls, begin: int, count: int) -> BatchOutcome:
        return cls(begin, count, {begin + 1 + i for i in range(count)})

    def feed(self, acks: Iterable[tuple[int, int]]) -> None:
        for seq, err in acks:
            if seq == self.begin and err:
                self.failed = self.failed or (seq, err)
                self.pending.clear()  # refused as a whole: the element replies may never come
            elif seq in self.pending:
                self.pending.discard(seq)
                if err and self.failed is None:
                    self.failed = (seq, err)
            # Anything else is a late reply to an earlier batch: ignore it.

    @property
    def done(self) -> bool:
        return not self.pending


class NetlinkError(FirewallError):
    """nftables refused an element batch; ``errno`` says why."""

    def __init__(self, message: str, err: int, what: str):
        super().__init__(message, ["nfnetlink", what], None, os.strerror(err))
        self.errno = err


def outcome_error(outcome: BatchOutcome, table: str, ops: Sequence[ElementOp]) -> NetlinkError | None:
    """The error to raise for a finished batch, or None if every message was acknowledged."""
    if outcome.failed is None:
        return None
    seq, err = outcome.failed
    index = seq - outcome.begin - 1
    what = ops[index].describe(table) if 0 <= index < len(ops) else f"batch of {len(ops)} element message(s)"
    name = errno.errorcode.get(err, str(err))
    return NetlinkError(f"nftables refused the transaction ({what}): {os.strerror(err)} ({name})", err, what)


# -- the socket -----------------------------------------------------------------


class SetElementWriter:
    """Adds and deletes set elements of ``inet <table>`` in batches, on one socket; thread-safe."""

    kind = "netlink"

    def __init__(self, table: str, timeout: float = REPLY_TIMEOUT, sock: socket.socket | None = None):
        """``sock``: an already set-up socket (tests); by default one is made in this thread's namespace."""
        self.table = table
        self._sock: socket.socket | None = sock if sock is not None else self._open(timeout)
        self._buf = bytearray(_RECV_SIZE)
        self._next_seq = 1
        self._lock = threading.Lock()

    @staticmethod
    def _open(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            # Errors without a copy of the request: replies stay small.
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def apply(self, ops: Sequence[ElementOp]) -> None:
        """Run ``ops`` as one transaction; ``NetlinkError`` (all undone) if the kernel refused any of it."""
        if ops:
            self._run(ops, lambda begin: build_batch(self.table, ops, begin))

    def create(self, template: CreateTemplate, address: bytes, timeout_ms: int) -> None:
        """``apply`` of ``template``'s create for ``address`` (packed); ``NetlinkError`` if any element exists."""
        self._run([template.op], lambda begin: template.render(address, timeout_ms, begin))

    def _run(self, ops: Sequence[ElementOp], build: Callable[[int], bytes]) -> None:
        """Send the batch ``build(begin)`` makes for ``ops`` and read every reply."""
        with self._lock:
            sock = self._sock
            if sock is None:
                raise FirewallError("nfnetlink element writer is closed")
            # Sequence numbers tell this batch's replies from stale ones; wrap
            # well before 2**32 so begin..end never straddles the wrap.
            begin = self._next_seq
            self._next_seq = (begin + len(ops) + 2) % 0x7FFF0000 or 1
            outcome = BatchOutcome.expect(begin, len(ops))
            data = build(begin)
            try:
                sock.sendto(data, (0, 0))
                while not outcome.done:
                    n = sock.recv_into(self._buf)
                    outcome.feed(parse_acks(memoryview(self._buf)[:n]))
            except socket.timeout:
                raise FirewallError(
                    f"nftables did not answer an element batch within {sock.gettimeout():g} s",
                    ["nfnetlink", f"{len(ops)} element message(s)"],
                ) from None
            except OSError as exc:
                raise FirewallError(
                    f"nfnetlink element batch failed: {exc.strerror or exc}", ["nfnetlink", f"{len(ops)} element message(s)"]
                ) from None
        err = outcome_error(outcome, self.table, ops)
        if err is not None:
            raise err

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
