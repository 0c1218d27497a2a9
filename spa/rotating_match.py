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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from spa import rotating
from spa.grant import Address, PortSpec
from spa.knock import TcpFlags
from spa.matcher import MatchDoor

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


def internal_name(door: str, key_id: str, counter: int) -> str:
    return f"{door}{SEP}{key_id}{SEP}{counter}"


def parse_name(name: str) -> Candidate | None:
    """The candidate behind an internal matcher name; None for a classic door's name."""
    if SEP not in name:
        return None
    door, key_id, counter = name.split(SEP)
    return Candidate(door, key_id, int(counter))


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


def plan(doors: Iterable[RotatingDoor], t: float) -> list[MatchDoor]:
    """Every candidate ``MatchDoor`` in force at ``t``, guard ports included (doors that bind the source excluded)."""
    out = []
    for d in doors:
        if d.bind_source:
            continue
        for ring in d.rings:
            for kid, secret in ring.valid_at(t):
                for c in rotating.accepted_counters(t, ring.params.interval):
                    seq = rotating.derive(secret, d.name, c, ring.params)
                    out.append(MatchDoor(internal_name(d.name, kid, c), seq, d.seq_timeout, d.tcpflags, d.target,
                                         guards(seq, ring.params)))
    return out


def used_token(c: Candidate) -> bytes:
    """The replay-cache key of a used rotating sequence (its own label: never equal to an SPA nonce)."""
    return hashlib.sha256(b"spa-knock/v1 rotating used" + SEP.join((c.door, c.key_id, str(c.counter))).encode()).digest()


def used_until(c: Candidate, interval: int) -> float:
    """When a used sequence can be forgotten: once its window can no longer be accepted."""
    return float((c.counter + 2) * interval + 1)
