"""Matching knock sequences: one independent attempt per (source address, door).

knockd keeps one linked list of attempts and, when it removes the head, drops
every other attempt with it: interleaved clients, doors that share a first
port and stray knocks from other hosts all break it. Here every (source,
door) pair is its own small state machine, so none of those can interfere:

* a packet advances an attempt when it is that door's next step (protocol,
  port, TCP flags and destination); a door's TCP flag test that fails makes
  the packet invisible to that door, as in knockd;
* a retransmitted SYN (same source port, sequence number and destination
  port as the knock just counted) is counted once;
* any other knock-port packet from the same source resets the attempt, and
  the very packet that reset it may start a new one;
* ``seq_timeout`` runs from the first knock, at the capture's clock
  resolution (knockd: whole seconds, lazily);
* attempts are capped; the oldest is evicted first, so a spoofed flood costs
  bounded memory.

Pure: no I/O, no clock of its own (times come with the knocks).

The capture loop calls ``feed_fields`` with plain numbers (``spa.packet.fields``):
no address object is built per packet, sources and destinations are compared
as integer keys (``spa.knock.key_of``), and an event's ``source`` address is
made only when someone reads it. ``tests/fuzz/test_matcher.py`` checks this
against the straightforward version it replaced (``tests/fuzz/reference_matcher.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from spa.grant import Address, PortSpec
from spa.knock import Knock, TcpFlags, address, key_of

DEFAULT_MAX_ATTEMPTS = 65536

TCP, UDP = 6, 17
# A (protocol, port) step is one int, protocol << 16 | port: what a packet is looked up by.
_PROTO_NUMBERS = {"tcp": TCP, "udp": UDP}


class DoorLike(Protocol):
    """What the matcher needs of a door (``spa.config.Door`` has it)."""

    name: str
    sequence: tuple[PortSpec, ...]
    seq_timeout: float
    tcpflags: TcpFlags | None
    target: Address | None


@dataclass(frozen=True, slots=True)
class MatchDoor:
    """A door as the matcher sees it; ``sequence`` may differ from the config (one-time sequences)."""

    name: str
    sequence: tuple[PortSpec, ...]
    seq_timeout: float = 25.0
    tcpflags: TcpFlags | None = None
    target: Address | None = None
    #: Ports that are never a step but still reset this source's attempts
    #: (rotating doors: the neighbours of each step, so a port scan never completes one).
    guards: tuple[PortSpec, ...] = ()

    @classmethod
    def of(cls, door: DoorLike, sequence: tuple[PortSpec, ...] | None = None) -> MatchDoor:
        return cls(door.name, sequence if sequence is not None else door.sequence, door.seq_timeout,
                   door.tcpflags, door.target)


EventKind = Literal["stage", "open", "timeout", "reset"]


class MatchEvent(NamedTuple):
    """What a packet did to an attempt (a NamedTuple: several are built per packet under a flood)."""

    kind: EventKind
    door: str
    #: The source's key (``spa.knock.key_of``); ``source`` is its address.
    key: int
    #: Steps matched: the new stage for "stage", the length for "open", the stage reached for "timeout"/"reset".
    stage: int

    @property
    def source(self) -> Address:
        return address(self.key)


# Builds a MatchEvent without NamedTuple's Python-level __new__ (a third cheaper; several per packet).
_event = tuple.__new__


class _Door:
    """A ``MatchDoor`` compiled for the hot path: steps as ints, the flag test and target as plain numbers."""

    __slots__ = ("door", "name", "steps", "length", "timeout", "tcp_test", "must_set", "must_clear", "target")

    def __init__(self, door: MatchDoor) -> None:
        self.door = door
        self.name = door.name
        numbers = _PROTO_NUMBERS
        self.steps = tuple(numbers[s.proto] << 16 | s.port for s in door.sequence)
        self.length = len(self.steps)
        self.timeout = door.seq_timeout
        # knockd: a TCP packet whose flags fail the door's test is invisible to that door.
        self.tcp_test = door.tcpflags is not None
        self.must_set = door.tcpflags.must_set if door.tcpflags is not None else 0
        self.must_clear = door.tcpflags.must_clear if door.tcpflags is not None else 0
        self.target = key_of(door.target) if door.target is not None else None


class Attempt:
    __slots__ = ("door", "stage", "started", "last_sport", "last_seq", "last_dport")

    def __init__(self, door: _Door, stage: int, started: float, sport: int, seq: int, dport: int) -> None:
        self.door = door
        self.stage = stage
        self.started = started
        # The knock counted last, to recognise its retransmission.
        self.last_sport = sport
        self.last_seq = seq
        self.last_dport = dport


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
        self._attempts: OrderedDict[tuple[int, str], Attempt] = OrderedDict()
        # source key -> door name -> attempt, in the order that source's attempts started.
        self._by_source: dict[int, dict[str, Attempt]] = {}
        self._doors: dict[str, MatchDoor] = {}
        self._first: dict[int, tuple[_Door, ...]] = {}
        self._step_keys: frozenset[int] = frozenset()
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
            if new.get(key[1]) != attempt.door.door:
                self._drop(key[0], key[1])
        self._doors = new
        first: dict[int, list[_Door]] = {}
        steps: set[int] = set()
        for d in new.values():
            c = _Door(d)
            steps.update(c.steps)
            if d.guards:
                steps.update(_PROTO_NUMBERS[g.proto] << 16 | g.port for g in d.guards)
            if c.length:
                first.setdefault(c.steps[0], []).append(c)
        self._first = {k: tuple(v) for k, v in first.items()}
        self._step_keys = frozenset(steps)
        self._min_timeout = min((d.seq_timeout for d in new.values()), default=0.0)

    @property
    def doors(self) -> Sequence[MatchDoor]:
        return tuple(self._doors.values())

    @property
    def steps(self) -> frozenset[tuple[str, int]]:
        """Every (protocol, port) some door knocks on: the only packets worth feeding."""
        return frozenset(("tcp" if k >> 16 == TCP else "udp", k & 0xFFFF) for k in self._step_keys)

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
        self._local = frozenset(key_of(a) for a in value) if value is not None else None

    def feed(self, k: Knock) -> list[MatchEvent]:
        """Account one packet; the events it caused (stages, opens, timeouts, resets)."""
        return self.feed_fields(_PROTO_NUMBERS[k.proto], key_of(k.src), key_of(k.dst), k.sport, k.dport,
                                k.flags, k.seq, k.time)

    def feed_fields(self, proto: int, skey: int, dkey: int, sport: int, dport: int, flags: int, seq: int,
                    t: float) -> list[MatchEvent]:
        """``feed`` for the capture loop: the packet as ``spa.packet.fields`` gives it, and its time."""
        step = proto << 16 | dport
        if step not in self._step_keys:
            return []
        events: list[MatchEvent] = []
        local = self._local
        local_ok = local is None or dkey in local
        tcp = proto == TCP
        attempts = self._attempts
        mine = self._by_source.get(skey)
        if mine is not None and len(mine) == 1:
            # The shape of a flood on a door's first port: a source with one attempt
            # knocks that door's first port again. The attempt resets and restarts;
            # done in place, with the events, order and counts the general path gives.
            for name, a in mine.items():
                d = a.door
                if (t - a.started <= d.timeout and d.steps[0] == step and d.steps[a.stage] != step
                        and (local_ok if d.target is None else d.target == dkey)
                        and not (tcp and d.tcp_test and (flags & d.must_set != d.must_set or flags & d.must_clear))
                        and not (tcp and sport == a.last_sport and seq == a.last_seq and dport == a.last_dport)
                        and self._first[step] == (d,)):
                    attempts.move_to_end((skey, name))
                    events.append(_event(MatchEvent, ("reset", name, skey, a.stage)))
                    a.stage, a.started, a.last_sport, a.last_seq, a.last_dport = 1, t, sport, seq, dport
                    events.append(_event(MatchEvent, ("stage", name, skey, 1)))
                    return events
        tried: set[str] | None = None
        # Attempts reset by a packet that is their door's first step: taken out
        # (as a drop would) and put back below, in the first-step loop's order,
        # as the new attempt that packet starts, without building a new one.
        restart: dict[str, Attempt] | None = None
        if mine:
            for name, a in tuple(mine.items()):
                d = a.door
                if t - a.started > d.timeout:
                    del attempts[(skey, name)]
                    del mine[name]
                    events.append(MatchEvent("timeout", name, skey, a.stage))
                    continue  # may start afresh below
                if not (local_ok if d.target is None else d.target == dkey) or (
                        tcp and d.tcp_test and (flags & d.must_set != d.must_set or flags & d.must_clear)):
                    tried = {name} if tried is None else tried | {name}
                    continue
                if tcp and sport == a.last_sport and seq == a.last_seq and dport == a.last_dport:
                    tried = {name} if tried is None else tried | {name}  # the same SYN again: counted once
                    continue
                if d.steps[a.stage] == step:
                    tried = {name} if tried is None else tried | {name}
                    a.stage += 1
                    a.last_sport, a.last_seq, a.last_dport = sport, seq, dport
                    events.append(MatchEvent("stage", name, skey, a.stage))  # knockd logs the last stage too
                    if a.stage == d.length:
                        del attempts[(skey, name)]
                        del mine[name]
                        events.append(MatchEvent("open", name, skey, a.stage))
                    continue
                del attempts[(skey, name)]
                del mine[name]
                events.append(MatchEvent("reset", name, skey, a.stage))
                if d.steps[0] == step:
                    if restart is None:
                        restart = {name: a}
                    else:
                        restart[name] = a
            if not mine:
                del self._by_source[skey]
                mine = None
        for d in self._first.get(step, ()):
            name = d.name
            if (tried is not None and name in tried) or (mine is not None and name in mine):
                continue
            if not (local_ok if d.target is None else d.target == dkey) or (
                    tcp and d.tcp_test and (flags & d.must_set != d.must_set or flags & d.must_clear)):
                continue
            if d.length == 1:
                events.append(MatchEvent("stage", name, skey, 1))
                events.append(MatchEvent("open", name, skey, 1))
                continue
            while len(attempts) >= self.max_attempts:
                (oskey, oname), _ = attempts.popitem(last=False)
                self._drop(oskey, oname)
                self.evictions += 1
                if oskey == skey:
                    mine = self._by_source.get(skey)
            a = restart.get(name) if restart is not None else None
            if a is None or a.door is not d:
                a = Attempt(d, 1, t, sport, seq, dport)
            else:
                a.stage, a.started, a.last_sport, a.last_seq, a.last_dport = 1, t, sport, seq, dport
            attempts[(skey, name)] = a
            if mine is None:
                mine = self._by_source[skey] = {name: a}
            else:
                mine[name] = a
            events.append(MatchEvent("stage", name, skey, 1))
        return events

    def _add(self, skey: int, door: _Door, t: float, sport: int, seq: int, dport: int) -> None:
        attempts = self._attempts
        while len(attempts) >= self.max_attempts:
            (oskey, oname), _ = attempts.popitem(last=False)
            self._drop(oskey, oname)
            self.evictions += 1
        a = Attempt(door, 1, t, sport, seq, dport)
        attempts[(skey, door.name)] = a
        mine = self._by_source.get(skey)
        if mine is None:
            self._by_source[skey] = {door.name: a}
        else:
            mine[door.name] = a

    def _drop(self, skey: int, name: str) -> None:
        self._attempts.pop((skey, name), None)
        mine = self._by_source.get(skey)
        if mine is not None:
            mine.pop(name, None)
            if not mine:
                del self._by_source[skey]

    def expire(self, now: float) -> list[MatchEvent]:
        """Drop attempts whose time ran out (for the log and for memory); call now and then."""
        events = []
        for (skey, name), a in list(self._attempts.items()):
            age = now - a.started
            if age <= self._min_timeout:
                break  # everything after started later still
            if age > a.door.timeout:
                self._drop(skey, name)
                events.append(MatchEvent("timeout", name, skey, a.stage))
        return events

    def forget(self, source: Address | None = None) -> None:
        """Drop every attempt (of one source, or all)."""
        skey = key_of(source) if source is not None else None
        for key in [k for k in self._attempts if skey is None or k[0] == skey]:
            self._drop(*key)
