"""pcap filter expressions for the capture sockets (pure: text in, text out).

The kernel filter is knockd's: it passes only TCP and UDP packets addressed
to one of our destinations on a port that some door's sequence uses, with
the door's TCP flag test where it has one, so floods to any other port never
reach user space. It is a pre-filter, the union over every door: the matcher
still checks each packet against each door (flags included).

The expressions are compiled for raw IP (``spa.server.bpf.compile_filter``),
which is what AF_PACKET ``SOCK_DGRAM`` sockets hand to the filter.

Limits of libpcap's code generator, shared with knockd:

- ``tcp dst port`` on IPv6 reads the TCP header at the fixed offset 40, so it
  only matches TCP/UDP right behind the IPv6 header: a knock behind IPv6
  extension headers is dropped in the kernel, although ``spa.packet`` could
  read it.
- ``tcp[13]`` is IPv4 only (``ip6 and tcp[13] ...`` rejects every packet),
  so the IPv6 flag test reads ``ip6[53]`` (40 + 13), valid under the same
  no-extension-header assumption that the port test already makes.

An expression that matches nothing cannot be compiled (libpcap: "expression
rejects all packets"), so with no destination or no usable step the
builders return ``None``: attach ``spa.server.bpf.DROP_ALL`` instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from spa.grant import Address
from spa.knock import TcpFlags

__all__ = ["knock_filter", "udp_port_filter", "port_expression", "coarse_ranges", "capture_expression",
           "spa_term", "knocks_on", "SpaPort", "MAX_PRECISE_PORTS"]

# Contiguous runs at least this long become one `portrange`.
_RANGE_MIN = 3


@dataclass(frozen=True, slots=True)
class SpaPort:
    """The SPA port, and what every SPA datagram carries: its payload size and first byte (the version)."""

    port: int
    size: int
    version: int


def _destinations(destinations: Iterable[Address]) -> list[Address]:
    out: set[Address] = set()
    for a in destinations:
        if isinstance(a, str):
            a = ipaddress.ip_address(a.split("%", 1)[0])
        if isinstance(a, ipaddress.IPv6Address):
            # A zone (fe80::1%eth0) is no part of the packet: match the bare address.
            a = ipaddress.IPv6Address(a.packed)
        elif not isinstance(a, ipaddress.IPv4Address):
            raise TypeError(f"destination must be an IP address, not {a!r}")
        out.add(a)
    return sorted(out, key=lambda a: (a.version, int(a)))


def _dst_expression(addrs: list[Address]) -> str:
    # The literal's family decides the test (`ip` or `ip6`): no separate version test needed.
    return _or([f"dst host {a}" for a in addrs])


def _or(terms: list[str]) -> str:
    return terms[0] if len(terms) == 1 else "(" + " or ".join(terms) + ")"


def _runs(ports: Iterable[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in sorted(set(ports)):
        if runs and runs[-1][1] == p - 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def port_expression(proto: str, ports: Iterable[int]) -> str:
    """``tcp dst port 7000``, or several ORed, contiguous runs as ``portrange``."""
    terms: list[str] = []
    for lo, hi in _runs(ports):
        if hi - lo + 1 >= _RANGE_MIN:
            terms.append(f"{proto} dst portrange {lo}-{hi}")
        else:
            terms.extend(f"{proto} dst port {p}" for p in range(lo, hi + 1))
    if not terms:
        raise ValueError("no ports")
    return _or(terms)


def _flag_test(mask: int, value: int, v4: bool, v6: bool) -> str:
    tests = []
    if v4:
        tests.append(f"(ip and (tcp[13] & 0x{mask:02x}) = 0x{value:02x})")
    if v6:
        # tcp[] cannot be used on IPv6; 53 = 40 (fixed header) + 13, behind `tcp dst port` only.
        tests.append(f"(ip6 and (ip6[53] & 0x{mask:02x}) = 0x{value:02x})")
    return _or(tests)


def _check_port(proto: str, port: int) -> None:
    if proto not in ("tcp", "udp"):
        raise ValueError(f"protocol {proto!r} is not tcp or udp")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port {port!r} is out of range (0-65535)")


def spa_term(spa: SpaPort, v4: bool, v6: bool) -> str:
    """UDP datagrams to the SPA port of exactly the SPA size, with the version byte: anything else is junk.

    ``udp[]`` is IPv4 only (as ``tcp[]``, see the module doc); IPv6 reads
    the UDP header at 40, under the no-extension-header assumption the port
    test already makes.
    """
    _check_port("udp", spa.port)
    length = 8 + spa.size
    tests = []
    if v4:
        tests.append(f"(ip and udp[4:2] = {length} and udp[8] = {spa.version})")
    if v6:
        tests.append(f"(ip6 and ip6[44:2] = {length} and ip6[48] = {spa.version})")
    return f"(udp dst port {spa.port} and {_or(tests)})"


def knock_filter(
    destinations: Iterable[Address],
    steps: Iterable[tuple[str, int, TcpFlags | None]],
    ranges: Iterable[tuple[str, int, int, TcpFlags | None]] = (),
    spa: SpaPort | None = None,
) -> str | None:
    """The expression passing TCP/UDP packets to ``destinations`` whose (proto, dport[, flags]) is a step.

    ``steps`` are ``(proto, port, flags)``, with flags ``None`` (or empty) for
    "any flags" and ignored for UDP. A port with an any-flags step needs no
    flag test; flag tests that can never hold (a flag both set and clear) are
    dropped. ``ranges`` are whole port ranges ``(proto, lo, hi, flags)`` (rotating
    doors that bind the source), each one ``portrange`` term. ``spa`` adds the
    SPA port, passing only datagrams of the SPA size and version (``spa_term``);
    a door that knocks on that UDP port still gets every datagram to it.
    Returns ``None`` when nothing can match (see the module doc).
    """
    addrs = _destinations(destinations)
    udp: set[int] = set()
    tcp_any: set[int] = set()
    tcp_flagged: dict[tuple[int, int], set[int]] = {}
    for proto, port, flags in steps:
        _check_port(proto, port)
        if proto == "udp":
            udp.add(port)
        elif flags is None or (flags.must_set | flags.must_clear) == 0:
            tcp_any.add(port)
        elif flags.must_set & flags.must_clear == 0:
            mask = (flags.must_set | flags.must_clear) & 0xFF
            tcp_flagged.setdefault((mask, flags.must_set & 0xFF), set()).add(port)
    if not addrs:
        return None
    v4 = any(a.version == 4 for a in addrs)
    v6 = any(a.version == 6 for a in addrs)
    terms: list[str] = []
    if udp:
        terms.append(port_expression("udp", udp))
    if tcp_any:
        terms.append(port_expression("tcp", tcp_any))
    for (mask, value), ports in sorted(tcp_flagged.items()):
        ports = ports - tcp_any  # already passed with any flags
        if ports:
            terms.append(f"({port_expression('tcp', ports)} and {_flag_test(mask, value, v4, v6)})")
    for proto, lo, hi, flags in sorted(set(ranges), key=lambda r: (r[0], r[1], r[2], str(r[3]))):
        _check_port(proto, lo)
        _check_port(proto, hi)
        term = f"{proto} dst portrange {lo}-{hi}"
        if proto == "tcp" and flags is not None and (flags.must_set | flags.must_clear) \
                and not flags.must_set & flags.must_clear:
            mask = (flags.must_set | flags.must_clear) & 0xFF
            term = f"({term} and {_flag_test(mask, flags.must_set & 0xFF, v4, v6)})"
        terms.append(term)
    if spa is not None:
        terms.append(spa_term(spa, v4, v6))
    if not terms:
        return None
    return f"{_dst_expression(addrs)} and {_or(terms)}"


def udp_port_filter(destinations: Iterable[Address], port: int) -> str | None:
    """UDP datagrams to ``port`` on one of ``destinations`` (the SPA port); ``None`` without destinations."""
    _check_port("udp", port)
    addrs = _destinations(destinations)
    if not addrs:
        return None
    return f"{_dst_expression(addrs)} and udp dst port {port}"


#: Above this many distinct ports a precise filter grows past what libpcap
#: compiles quickly and the kernel accepts (4096 instructions): ``coarse_ranges``
#: summarizes the ports instead.
MAX_PRECISE_PORTS = 200
#: How many port ranges per protocol a summarized filter keeps.
COARSE_RANGES = 8


def coarse_ranges(
    steps: Iterable[tuple[str, int, TcpFlags | None]],
    max_ranges: int = COARSE_RANGES,
) -> list[tuple[str, int, int, TcpFlags | None]]:
    """Steps summarized as at most ``max_ranges`` port ranges per protocol, split at the widest gaps.

    A superset of the steps: the kernel passes a few more packets, the
    matcher still decides. TCP flag tests survive only where every TCP step
    shares the same one.
    """
    ports: dict[str, set[int]] = {}
    flags: set[TcpFlags | None] = set()
    for proto, port, f in steps:
        _check_port(proto, port)
        ports.setdefault(proto, set()).add(port)
        if proto == "tcp":
            flags.add(f if f is not None and (f.must_set | f.must_clear) else None)
    tcp_flags = next(iter(flags)) if len(flags) == 1 else None
    out: list[tuple[str, int, int, TcpFlags | None]] = []
    for proto in sorted(ports):
        ordered = sorted(ports[proto])
        gaps = sorted(range(1, len(ordered)), key=lambda i: ordered[i] - ordered[i - 1], reverse=True)
        cuts = sorted(gaps[: max_ranges - 1])
        start = 0
        for cut in (*cuts, len(ordered)):
            out.append((proto, ordered[start], ordered[cut - 1], tcp_flags if proto == "tcp" else None))
            start = cut
    return out


def capture_expression(
    destinations: Iterable[Address],
    steps: Iterable[tuple[str, int, TcpFlags | None]],
    ranges: Iterable[tuple[str, int, int, TcpFlags | None]] = (),
    coarse: int | None = None,
    spa: SpaPort | None = None,
) -> str | None:
    """The daemon's filter: precise port by port, or, past ``MAX_PRECISE_PORTS`` ports, a few ranges.

    Many rotating doors make thousands of ports: a port-by-port filter then
    compiles slowly (on the capture loop, at every window boundary) and past
    4096 instructions the kernel refuses it. The ranges pass a few more
    packets; the matcher still decides. ``coarse`` forces ranges (that many
    per protocol), for a filter that still does not fit.
    """
    steps = set(steps)
    ranges = list(ranges)
    if coarse is None and len({(p, n) for p, n, _ in steps}) > MAX_PRECISE_PORTS:
        coarse = COARSE_RANGES
    if coarse is not None:
        return knock_filter(destinations, (), [*coarse_ranges(steps, coarse), *ranges], spa)
    return knock_filter(destinations, steps, ranges, spa)


def knocks_on(proto: str, port: int, steps: Iterable[tuple[str, int, TcpFlags | None]],
              ranges: Iterable[tuple[str, int, int, TcpFlags | None]] = ()) -> bool:
    """Whether a door's step or range covers ``proto``/``port`` (then every packet to it must reach the matcher)."""
    return any(p == proto and n == port for p, n, _ in steps) or \
        any(p == proto and lo <= port <= hi for p, lo, hi, _ in ranges)
