"""The matcher as it was before its fast path (commit a92e15a), kept as the model the fast one is checked against.

``tests/fuzz/test_matcher.py`` feeds both the same doors and packets and
requires the same events. Not imported by the product.

Its semantics are the ones ``spa/matcher.py``'s docstring describes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from spa.grant import Address
from spa.knock import Knock, key_of as _key
from spa.matcher import DEFAULT_MAX_ATTEMPTS, EventKind, MatchDoor


class MatchEvent(NamedTuple):
    """What a packet did to an attempt (a NamedTuple: several are built per packet under a flood)."""

    kind: EventKind
    door: str
    source: Address
    #: Steps matched: the new stage for "stage", the length for "open", the stage reached for "timeout"/"reset".
    stage: int


@dataclass(slots=True)
class Attempt:
    door: MatchDoor
    source: Address
    stage: int
    started: float
    # The knock counted last, to recognise its retransmission.
    last_sport: int
    last_seq: int
    last_dport: int


class Matcher:
    def __init__(
        self,
        doors: Iterable[MatchDoor] = (),
        *,
        local_addresses: Iterable[Address] | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        # (source key, door name) -> attempt, in the order the attempts started:
        # the front is both the oldest (evicted first) and the first to expire.
        # Sources are keyed by integer (``_key``): hashing an ipaddress object
        # costs a Python call each time, and a packet needs several lookups.
        self._attempts: OrderedDict[tuple[int, str], Attempt] = OrderedDict()
        self._by_source: dict[int, dict[str, Attempt]] = {}
        self._doors: dict[str, MatchDoor] = {}
        self._first: dict[tuple[str, int], list[MatchDoor]] = {}
        self._steps: frozenset[tuple[str, int]] = frozenset()
        self._min_timeout = 0.0
        self._local: frozenset[int] | None = None
        self.local_addresses = frozenset(local_addresses) if local_addresses is not None else None
        self.evictions = 0
        self.set_doors(doors)

    # -- doors -----------------------------------------------------------------

    def set_doors(self, doors: Iterable[MatchDoor]) -> None:
        """Replace the doors; attempts of doors that did not change survive (reloads, one-time sequences)."""
        new = {d.name: d for d in doors}
        for key, attempt in list(self._attempts.items()):
            if new.get(key[1]) != attempt.door:
                self._drop(key)
        self._doors = new
        first: dict[tuple[str, int], list[MatchDoor]] = {}
        for d in new.values():
            if d.sequence:
                first.setdefault((d.sequence[0].proto, d.sequence[0].port), []).append(d)
        self._first = first
        self._steps = frozenset((s.proto, s.port) for d in new.values() for s in (*d.sequence, *d.guards))
        self._min_timeout = min((d.seq_timeout for d in new.values()), default=0.0)

    @property
    def doors(self) -> Sequence[MatchDoor]:
        return tuple(self._doors.values())

    @property
    def steps(self) -> frozenset[tuple[str, int]]:
        """Every (protocol, port) some door knocks on: the only packets worth feeding."""
        return self._steps

    def __len__(self) -> int:
        return len(self._attempts)

    # -- matching ----------------------------------------------------------------

    @property
    def local_addresses(self) -> frozenset[Address] | None:
        """This host's addresses: knocks to others count only for doors whose ``target`` they are."""
        return self._local_addresses

    @local_addresses.setter
    def local_addresses(self, value: frozenset[Address] | None) -> None:
        self._local_addresses = value
        self._local = frozenset(_key(a) for a in value) if value is not None else None

    def _dst_ok(self, door: MatchDoor, dst: Address, dkey: int) -> bool:
        if door.target is not None:
            return dst == door.target
        return self._local is None or dkey in self._local

    @staticmethod
    def _step_ok(door: MatchDoor, step: PortSpec, k: Knock) -> bool:
        return step.port == k.dport and step.proto == k.proto

    @staticmethod
    def _visible(door: MatchDoor, k: Knock) -> bool:
        # knockd: a TCP packet whose flags fail the door's test is ignored by that door.
        return k.proto != "tcp" or door.tcpflags is None or door.tcpflags.matches(k.flags)

    def feed(self, k: Knock) -> list[MatchEvent]:
        """Account one packet; the events it caused (stages, opens, timeouts, resets)."""
        if (k.proto, k.dport) not in self._steps:
            return []
        events: list[MatchEvent] = []
        skey, dkey = _key(k.src), _key(k.dst)
        mine = self._by_source.get(skey)
        tried: set[str] = set()
        if mine:
            for name, a in list(mine.items()):
                door = a.door
                if k.time - a.started > door.seq_timeout:
                    self._drop((skey, name))
                    events.append(MatchEvent("timeout", name, k.src, a.stage))
                    continue  # may start afresh below
                if not self._dst_ok(door, k.dst, dkey) or not self._visible(door, k):
                    tried.add(name)
                    continue
                if k.proto == "tcp" and k.sport == a.last_sport and k.seq == a.last_seq and k.dport == a.last_dport:
                    tried.add(name)  # the same SYN again: counted once
                    continue
                if self._step_ok(door, door.sequence[a.stage], k):
                    tried.add(name)
                    a.stage += 1
                    a.last_sport, a.last_seq, a.last_dport = k.sport, k.seq, k.dport
                    events.append(MatchEvent("stage", name, k.src, a.stage))  # knockd logs the last stage too
                    if a.stage == len(door.sequence):
                        self._drop((skey, name))
                        events.append(MatchEvent("open", name, k.src, a.stage))
                    continue
                self._drop((skey, name))
                events.append(MatchEvent("reset", name, k.src, a.stage))
        for door in self._first.get((k.proto, k.dport), ()):
            if door.name in tried or (skey, door.name) in self._attempts:
                continue
            if not self._dst_ok(door, k.dst, dkey) or not self._visible(door, k):
                continue
            if len(door.sequence) == 1:
                events.append(MatchEvent("stage", door.name, k.src, 1))
                events.append(MatchEvent("open", door.name, k.src, 1))
                continue
            self._add(k, skey, door)
            events.append(MatchEvent("stage", door.name, k.src, 1))
        return events

    def _add(self, k: Knock, skey: int, door: MatchDoor) -> None:
        while len(self._attempts) >= self.max_attempts:
            oldest = next(iter(self._attempts))
            self._drop(oldest)
            self.evictions += 1
        a = Attempt(door, k.src, 1, k.time, k.sport, k.seq, k.dport)
        self._attempts[(skey, door.name)] = a
        self._by_source.setdefault(skey, {})[door.name] = a

    def _drop(self, key: tuple[int, str]) -> None:
        self._attempts.pop(key, None)
        mine = self._by_source.get(key[0])
        if mine is not None:
            mine.pop(key[1], None)
            if not mine:
                del self._by_source[key[0]]

    def expire(self, now: float) -> list[MatchEvent]:
        """Drop attempts whose time ran out (for the log and for memory); call now and then."""
        events = []
        for key, a in list(self._attempts.items()):
            age = now - a.started
            if age <= self._min_timeout:
                break  # everything after started later still
            if age > a.door.seq_timeout:
                self._drop(key)
                events.append(MatchEvent("timeout", key[1], a.source, a.stage))
        return events

    def forget(self, source: Address | None = None) -> None:
        """Drop every attempt (of one source, or all)."""
        for key in [k for k in self._attempts if source is None or k[0] == _key(source)]:
            self._drop(key)
