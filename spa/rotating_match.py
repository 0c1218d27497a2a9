"""Rotating doors as the classic matcher sees them: one ``MatchDoor`` per sequence now in force.

For each rotating door, each secret still valid and each accepted window
(−1, 0, +1) there is one candidate sequence; each becomes a ``MatchDoor``
under an internal name ``DOOR<US>KEYID<US>COUNTER`` (US = U+001F, which a door
name cannot hold), so the matcher keeps one independent attempt per
(source, candidate) and the daemon can tell which candidate opened.

Guard ports: every step's neighbours (port − 1 and port + 1, same protocol,
inside the range) are fed to the matcher as well, but are never a step. A
port scan in ascending or descending order always hits a neighbour right
after a step, which resets the attempt: a scan never completes a sequence.

Used-once: each (door, key id, counter) opens at most once, whatever the
source; the caller keeps the ``Burned`` set (and persists it).

Pure: the time comes from the caller.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from spa import rotating
from spa.errors import InvalidGrant
from spa.grant import Address, PortSpec
from spa.knock import Knock, TcpFlags
from spa.matcher import MatchDoor, MatchEvent, Matcher

SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class KeyRing:
    """One shared-key file of a door: its parameters and the secrets as (key id, secret, until)."""

    path: str
    params: rotating.Params
    secrets: tuple[tuple[str, bytes, float | None], ...]

    def valid_at(self, t: float) -> tuple[tuple[str, bytes], ...]:
        return tuple((kid, s) for kid, s, until in self.secrets if until is None or t < until)


@dataclass(frozen=True, slots=True)
class RotatingDoor:
    name: str
    rings: tuple[KeyRing, ...]
    seq_timeout: float = 25.0
    tcpflags: TcpFlags | None = None
    target: Address | None = None
    bind_source: bool = False


class Candidate(NamedTuple):
    door: str
    key_id: str
    counter: int
    #: For doors that bind the source: the address the sequence was derived for.
    source: str = ""


def internal_name(door: str, key_id: str, counter: int, source: str = "") -> str:
    name = f"{door}{SEP}{key_id}{SEP}{counter}"
    return f"{name}{SEP}{source}" if source else name


def parse_name(name: str) -> Candidate | None:
    """The candidate behind an internal matcher name; None for a classic door's name."""
    if SEP not in name:
        return None
    door, key_id, counter, *source = name.split(SEP)
    return Candidate(door, key_id, int(counter), source[0] if source else "")


def guards(sequence: Sequence[PortSpec], params: rotating.Params) -> tuple[PortSpec, ...]:
    """The neighbours of each step that are not steps themselves (see the module doc)."""
    steps = set(sequence)
    out = set()
    for s in sequence:
        for p in (s.port - 1, s.port + 1):
            if params.lo <= p <= params.hi:
                g = PortSpec(p, s.proto)
                if g not in steps:
                    out.add(g)
    return tuple(sorted(out))


def boundaries(doors: Iterable[RotatingDoor], t: float) -> float:
    """The next time at which some door's set of accepted windows changes (inf without doors)."""
    nxt = float("inf")
    for d in doors:
        for ring in d.rings:
            i = ring.params.interval
            nxt = min(nxt, (rotating.counter(t, i) + 1) * i)
            # A secret's grace ending changes the candidates too.
            for _, _, until in ring.secrets:
                if until is not None and until > t:
                    nxt = min(nxt, until)
    return nxt


# The candidates of the last plan(), by what they were derived from: at a window boundary two of
# the three accepted windows are the same as before, so only a third is derived again. Holds
# exactly the last plan's candidates (each call replaces it), so it never grows.
_planned: dict[tuple, MatchDoor] = {}


def plan(doors: Iterable[RotatingDoor], t: float) -> list[MatchDoor]:
    """Every candidate ``MatchDoor`` in force at ``t``, guard ports included (doors that bind the source excluded)."""
    global _planned
    out = []
    now: dict[tuple, MatchDoor] = {}
    for d in doors:
        if d.bind_source:
            continue
        for ring in d.rings:
            for kid, secret in ring.valid_at(t):
                for c in rotating.accepted_counters(t, ring.params.interval):
                    key = (d.name, kid, c, secret, ring.params, d.seq_timeout, d.tcpflags, d.target)
                    md = _planned.get(key)
                    if md is None:
                        seq = rotating.derive(secret, d.name, c, ring.params)
                        md = MatchDoor(internal_name(d.name, kid, c), seq, d.seq_timeout, d.tcpflags, d.target,
                                       guards(seq, ring.params))
                    now[key] = md
                    out.append(md)
    _planned = now
    return out


def used_token(c: Candidate) -> bytes:
    """The replay-cache key of a used rotating sequence (its own label: never equal to an SPA nonce)."""
    fields = (c.door, c.key_id, str(c.counter)) + ((c.source,) if c.source else ())
    return hashlib.sha256(b"spa-knock/v1 rotating used" + SEP.join(fields).encode()).digest()


def candidates_for(doors: Iterable[RotatingDoor], t: float, source: Address) -> list[MatchDoor]:
    """The candidates of doors that bind the source, derived for one source address."""
    packed = rotating.source_bytes(source)
    label = str(source)
    out = []
    for d in doors:
        for ring in d.rings:
            for kid, secret in ring.valid_at(t):
                for c in rotating.accepted_counters(t, ring.params.interval):
                    seq = rotating.derive(secret, d.name, c, ring.params, packed)
                    out.append(MatchDoor(internal_name(d.name, kid, c, label), seq, d.seq_timeout, d.tcpflags,
                                         d.target, guards(seq, ring.params)))
    return out


class SourceBound:
    """Matching for doors that bind the source: per-source candidates, derived on a source's first packet.

    The sequence depends on the knocking address, so the server cannot know
    the ports in advance: the kernel filter passes these doors' whole port
    ranges, and the first packet from a source into a range derives that
    source's candidates (one HMAC per secret and window). Sources are kept in
    a bounded LRU (oldest dropped first), so spoofed floods cost bounded memory;
    each source gets its own ``Matcher`` with the usual rules.
    """

    def __init__(self, doors: Iterable[RotatingDoor], *, max_sources: int = 4096,
                 local_addresses: frozenset[Address] | None = None):
        self.doors = tuple(d for d in doors if d.bind_source)
        self.max_sources = max_sources
        self.local_addresses = local_addresses
        self.evictions = 0
        self._sources: OrderedDict[Address, tuple[int, Matcher]] = OrderedDict()
        self._generation = 0
        self._ranges: dict[str, list[tuple[int, int]]] = {}
        for d in self.doors:
            for ring in d.rings:
                p = ring.params
                for proto in (("tcp", "udp") if p.proto == "mixed" else (p.proto,)):
                    self._ranges.setdefault(proto, []).append((p.lo, p.hi))

    def __bool__(self) -> bool:
        return bool(self.doors)

    def ranges(self) -> list[tuple[str, int, int, TcpFlags | None]]:
        """What the kernel filter must pass for these doors: their whole port ranges, as (proto, lo, hi, flags).

        Excluded ports inside a range pass too (one ``portrange`` term is far
        cheaper than thousands of ports); the matcher never uses them.
        """
        out = []
        for d in self.doors:
            for ring in d.rings:
                p = ring.params
                for proto in (("tcp", "udp") if p.proto == "mixed" else (p.proto,)):
                    out.append((proto, p.lo, p.hi, d.tcpflags))
        return out

    def rotate(self, now: float) -> None:
        """A window boundary (or a grace end): candidates are derived afresh on each source's next packet."""
        self._generation += 1

    def _in_range(self, k: Knock) -> bool:
        for lo, hi in self._ranges.get(k.proto, ()):
            if lo <= k.dport <= hi:
                return True
        return False

    def feed(self, k: Knock, now: float) -> list[MatchEvent]:
        """Account one packet (``now``: wall-clock time, for the windows; matching uses ``k.time``)."""
        if not self._in_range(k):
            return []
        entry = self._sources.get(k.src)
        if entry is None or entry[0] != self._generation:
            try:
                doors = candidates_for(self.doors, now, k.src)
            except InvalidGrant:
                return []  # a source no grant can go to (unspecified, multicast): never a knock
            if entry is None:
                matcher = Matcher(doors, local_addresses=self.local_addresses)
            else:
                matcher = entry[1]
                matcher.set_doors(doors)  # attempts of candidates still in force survive
            self._sources[k.src] = (self._generation, matcher)
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
                self.evictions += 1
        else:
            matcher = entry[1]
        self._sources.move_to_end(k.src)
        return matcher.feed(k)

    def expire(self, now: float) -> list[MatchEvent]:
        """Time out attempts (``now`` on the knocks' clock) and forget sources with none left."""
        events: list[MatchEvent] = []
        for src, (_, matcher) in list(self._sources.items()):
            events += matcher.expire(now)
            if not len(matcher):
                del self._sources[src]  # no attempt left: the next packet derives afresh
        return events

    def __len__(self) -> int:
        return sum(len(m) for _, m in self._sources.values())


def used_until(c: Candidate, interval: int) -> float:
    """When a used sequence can be forgotten: once its window can no longer be accepted."""
    return float((c.counter + 2) * interval + 1)
