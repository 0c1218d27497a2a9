"""The ``Knock``: one observed packet that may be a knock, and TCP flag tests.

Built by the capture edge from raw headers (``spa.packet``) and consumed by
the matcher (``spa.matcher``); small, immutable, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from spa.grant import Address, Proto

#: Added to an IPv6 address's integer to make its key: IPv4 and IPv6 keys never collide.
V6_KEY = 1 << 128
_V6_MASK = V6_KEY - 1

# Address objects by key: building one costs a microsecond, about as much as
# parsing the packet, and sources repeat. Cleared when full, so a flood of
# spoofed sources costs one clear per _CACHE_MAX new addresses, no growth.
_CACHE_MAX = 4096
_addresses: dict[int, Address] = {}

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
FLAG_BITS = {"fin": FIN, "syn": SYN, "rst": RST, "psh": PSH, "ack": ACK, "urg": URG}


class Knock(NamedTuple):
    """A TCP or UDP packet addressed to this host, reduced to what matching needs.

    A NamedTuple, not a frozen dataclass: one is built per captured packet,
    and a tuple costs a third of the time to build.
    """

    src: Address
    dst: Address
    proto: Proto
    sport: int
    dport: int
    #: TCP flags byte (0 for UDP).
    flags: int = 0
    #: TCP sequence number (0 for UDP): a retransmitted SYN repeats it.
    seq: int = 0
    #: Arrival time in seconds (the capture's monotonic clock).
    time: float = 0.0


@dataclass(frozen=True, slots=True)
class TcpFlags:
    """knockd's TCPFlags: listed flags must be set, ``!``-prefixed ones clear, the rest don't care."""

    must_set: int = 0
    must_clear: int = 0

    def matches(self, flags: int) -> bool:
        return (flags & self.must_set) == self.must_set and (flags & self.must_clear) == 0

    def __str__(self) -> str:
        parts = [n for n, b in FLAG_BITS.items() if self.must_set & b]
        parts += [f"!{n}" for n, b in FLAG_BITS.items() if self.must_clear & b]
        return ",".join(parts)


def key_of(addr: Address) -> int:
    """An address as one int (IPv6 apart from IPv4): what the hot path keys and compares by."""
    return int(addr) | V6_KEY if addr.version == 6 else int(addr)


def address(key: int) -> Address:
    """The address a key stands for (``key_of``'s inverse), from a bounded cache."""
    a = _addresses.get(key)
    if a is None:
        if len(_addresses) >= _CACHE_MAX:
            _addresses.clear()
        a = _addresses[key] = IPv6Address(key & _V6_MASK) if key >= V6_KEY else IPv4Address(key)
    return a
