"""The knock matcher in the kernel, at run time: its maps, its program, its sockets and its events.

``spa.knock_program`` generates the program; this module owns what it
needs: the attempt map (an LRU hash as large as the matcher's cap), the
*opens* and *notes* ring buffers, the counters, the map of this host's
addresses, and one tap socket per capture socket (``spa.server.capture``
opens them beside its own, for the same interface and protocol) with the
program attached. The program returns 0 for every packet, so the taps never
queue anything: a flood on the knock ports costs the kernel a map lookup a
door, and user space only the events.

Opens are always read. Notes (stages, resets, timeouts: log lines) are read
up to ``NOTES_PER_SECOND``; past that they are skipped in one step and
counted, as the log throttle would drop them anyway. The counters map holds
the exact totals by kind.

Door ids: a door keeps its id while its definition stays the same, so its
attempts survive a reload or a one-time sequence moving on elsewhere; a
changed door gets a new id, and its old attempts are never found again
(they age out of the LRU map).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address

from spa import knock_program as KP
from spa.ebpf_asm import AsmError
from spa.matcher import DEFAULT_MAX_ATTEMPTS, MatchDoor, MatchEvent
from spa.server import ebpf

log = logging.getLogger("spa.server.knock_kernel")

OPENS_BYTES = 1 << 18  # 5 000+ opens between two reads
NOTES_BYTES = 1 << 20
#: Notes read (and so logged, within the log throttle) per second; the rest are skipped and counted.
NOTES_PER_SECOND = 2000
#: The daemon reads notes at most this often (opens at once, and the notes with them).
NOTES_INTERVAL = 0.05
#: Doors (as the matcher has them) the kernel matcher takes. With the active bits
#: (``spa.knock_program``) a packet looks up only the attempts its source has, so the cost of a packet
#: stays flat (0.55-1.0 µs here from 16 to 64 doors, against 1.2-2.6 µs at 16 and 2.6-4.8 µs at 64
#: without: ``bench/capture_cost.py``);
#: the kernel's check of the program grows with the square of the doors (32 doors: about 0.4 s to
#: load, at start and on SIGHUP). With rotating doors the program is loaded again at every window
#: boundary, on the capture loop: it is built without the bits and takes up to 16 doors (about 30 ms).
MAX_DOORS = 32
MAX_ROTATING_DOORS = 16
#: Attempt-map entries looked at per ``expire`` call (two or three system calls each).
EXPIRE_BUDGET = 1024
# Names of retired door ids kept, for events still in the rings when a door changes.
_RETIRED_NAMES = 4096
_U32 = struct.Struct("=I")


class KernelMatcher:
    """Everything the kernel matcher needs, made at once (raises ``ebpf.BpfError`` when the kernel refuses)."""

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        reason = ebpf.available()
        if reason is not None:
            raise ebpf.BpfError(reason)
        self._owned: list = []
        try:
            self.attempts = self._own(ebpf.Map.create(ebpf.LRU_HASH, KP.ATTEMPT_KEY_SIZE, KP.ATTEMPT_VALUE_SIZE,
                                                      max_attempts, name="spa_attempts"))
            self.opens = self._own(ebpf.RingBuffer.create(OPENS_BYTES, name="spa_opens"))
            self.notes = self._own(ebpf.RingBuffer.create(NOTES_BYTES, name="spa_notes"))
            self.counters = self._own(ebpf.Map.create(ebpf.ARRAY, 4, KP.COUNTERS_VALUE_SIZE, 1, name="spa_counters"))
            self.local = self._own(ebpf.Map.create(ebpf.HASH, KP.LOCAL_KEY_SIZE, 1, 4096, name="spa_local"))
            # A source with attempts has an entry: as many as attempts at most.
            self.active = self._own(ebpf.Map.create(ebpf.LRU_HASH, KP.LOCAL_KEY_SIZE, KP.ACTIVE_VALUE_SIZE,
                                                    max_attempts, name="spa_active"))
        except BaseException:
            self.close()
            raise
        self.maps = KP.Maps(self.attempts.fileno(), self.opens.map.fileno(), self.notes.map.fileno(),
                            self.counters.fileno(), self.local.fileno(), active=self.active.fileno())
        #: Door id -> its bit in a source's active bits, kept while the id lives (its attempts stay found).
        self.slots: dict[int, int] = {}
        self._rotating = False
        self.program: ebpf.Program | None = None
        self._doors: dict[str, tuple[MatchDoor, int]] = {}
        self._next_id = 1
        self.names: dict[int, str] = {}
        self._local: set[bytes] = set()
        self._notes_budget = float(NOTES_PER_SECOND)
        self._budget_at = time.monotonic()
        #: Notes skipped unread since the last ``take_skipped()``.
        self.skipped_notes = 0
        #: Entries in the attempt map at the end of the last full sweep (``expire``).
        self.attempts_seen = 0
        self._sweep_count = 0
        self._sweep_at: bytes | None = None
        self._atomic_take = True

    def _own(self, thing):
        self._owned.append(thing)
        return thing

    # -- configuration ---------------------------------------------------------------------

    def set_doors(self, doors: Iterable[MatchDoor], *, rotating: bool = False) -> bool:
        """Build and load the program for ``doors``; True when it changed (attach ``program`` again).

        ``rotating``: the configuration has rotating doors, whose program is loaded again at every window
        boundary, on the capture loop: it is built without the active bits, which the kernel takes 2-3
        times longer to check (16 doors: about 30 ms instead of 80). Attempts started under the other kind
        of program are not found by a program with the bits (their bits were never set); they age out.
        """
        wanted: list[tuple[int, MatchDoor]] = []
        doors_now: dict[str, tuple[MatchDoor, int]] = {}
        for d in doors:
            known = self._doors.get(d.name)
            if known is not None and known[0] == d:
                door_id = known[1]
            else:
                door_id, self._next_id = self._next_id, self._next_id + 1
                self.names[door_id] = d.name
            doors_now[d.name] = (d, door_id)
            wanted.append((door_id, d))
        if self.program is not None and doors_now == self._doors and rotating == self._rotating:
            return False
        live = {i for _, i in doors_now.values()}
        slots = {i: b for i, b in self.slots.items() if i in live}
        free = iter(sorted(set(range(KP.MAX_SLOTS)) - set(slots.values())))
        for i in sorted(live - slots.keys()):
            b = next(free, None)
            if b is None:
                raise ebpf.BpfError(f"more than {KP.MAX_SLOTS} doors for the kernel matcher")
            slots[i] = b  # a slot a retired door left: its stale bits cost one lookup, then clear
        try:
            code = (KP.build(wanted, dataclasses.replace(self.maps, active=None)) if rotating
                    else KP.build(wanted, self.maps, slots))
        except AsmError as exc:  # too long for a jump: refuse as the kernel would
            raise ebpf.BpfError(f"the kernel matcher's program cannot be built: {exc}") from exc
        program = ebpf.Program.load(code, name="spa_knocks")
        old, self.program, self._doors, self.slots = self.program, program, doors_now, slots
        self._rotating = rotating
        if old is not None:
            old.close()  # sockets it is attached to keep it until they get the new one
        if len(self.names) > len(live) + _RETIRED_NAMES:
            for i in sorted(self.names)[: len(self.names) - len(live) - _RETIRED_NAMES]:
                if i not in live:
                    del self.names[i]
        return True

    def set_local(self, addresses: Iterable[IPv4Address | IPv6Address]) -> None:
        """This host's addresses: a door without a target sees only knocks to these."""
        # By key: two link-local addresses that differ only in their zone are one key.
        new = {KP.local_key(a) for a in addresses}
        for k in self._local - new:
            self.local.delete(k)
        for k in new - self._local:
            self.local.update(k, b"\1")
        self._local = new

    # -- events ----------------------------------------------------------------------------

    def filenos(self) -> list[int]:
        """The ring buffers' descriptors: readable while events wait."""
        return [self.opens.fileno(), self.notes.fileno()]

    def read(self, now: float | None = None) -> list[tuple[float, MatchEvent]]:
        """Events since the last read, oldest first: ``(time.monotonic() time of the packet, event)``.

        Every open; notes within the budget (the rest skipped, see ``skipped_notes``).
        """
        now = time.monotonic() if now is None else now
        self._notes_budget = min(float(NOTES_PER_SECOND),
                                 self._notes_budget + (now - self._budget_at) * NOTES_PER_SECOND)
        self._budget_at = now
        # Opens first: every note the program wrote before an open read here is then in its ring too.
        records = self._read_ring(self.opens, 1 << 16)
        if self._notes_budget >= 1:
            notes = self._read_ring(self.notes, int(self._notes_budget))
            self._notes_budget -= len(notes)
            records += notes
        if self._notes_budget < 1:
            skipped = self.notes.skip()
            self.skipped_notes += skipped // (KP.EVENT_SIZE + 8)
        out = []
        names = self.names
        for r in records:
            decoded = KP.decode_event(r, names)
            if decoded is not None:
                out.append((decoded[0] / 1e9, decoded[1]))
        # Two rings: put a door's last stage before its open, and each packet's events in time order.
        out.sort(key=lambda te: (te[0], te[1].kind == "open"))
        return out

    @staticmethod
    def _read_ring(ring: ebpf.RingBuffer, most: int) -> list[bytes]:
        try:
            return ring.read(most)
        except ebpf.BpfError as exc:  # a record the walk cannot make sense of: never the loop's end
            log.error("kernel matcher ring %s: %s; skipping what it holds", ring.map.name, exc)
            ring.skip()
            return []

    def expire(self, now: float | None = None, budget: int = EXPIRE_BUDGET) -> list[tuple[float, MatchEvent]]:
        """Timeouts of attempts that simply stopped, as ``Matcher.expire`` gives them; call now and then.

        The program notices a timeout only when the source knocks again; this
        sweep reports (and removes) the others, ``budget`` entries a call, from
        where the last call stopped. An entry seen expired is taken out with
        one lookup-and-delete and put back if the source knocked in between
        (a fresh attempt the program just started). Attempts of doors that
        changed are removed silently, as the Python matcher drops them.
        """
        now_ns = round((time.monotonic() if now is None else now) * 1e9)
        timeouts = {i: round(d.seq_timeout * 1e9) for d, i in self._doors.values()}
        out: list[tuple[float, MatchEvent]] = []
        key = self._sweep_at if self._sweep_at is not None else self.attempts.next_key(None)
        for _ in range(budget):
            if key is None:  # a whole pass: the next call starts over
                self.attempts_seen, self._sweep_count = self._sweep_count, 0
                break
            # The next key before anything is deleted: after a key that is gone the kernel starts over.
            nxt = self.attempts.next_key(key)
            self._sweep_count += 1
            event = self._expired(key, now_ns, timeouts)
            if event is not None:
                out.append(event)
            key = nxt
        self._sweep_at = key
        return out

    def _expired(self, key: bytes, now_ns: int, timeouts: dict[int, int]) -> tuple[float, MatchEvent] | None:
        value = self.attempts.lookup(key)
        if value is None:
            return None
        skey, door_id, started, _ = KP.decode_attempt(key, value)
        limit = timeouts.get(door_id)
        if limit is not None and now_ns - started <= limit:
            return None
        taken = self._take(key, value)
        if taken is None:
            return None
        _, _, started, stage = KP.decode_attempt(key, taken)
        if limit is None:
            return None  # a door that changed: dropped without a word, as the Python matcher does
        if now_ns - started <= limit:
            try:
                self.attempts.update(key, taken, ebpf.BPF_NOEXIST)  # knocked again meanwhile: not ours to end
            except ebpf.BpfError:
                pass  # and again since: the program's attempt is the newer one
            return None
        return (started + limit) / 1e9, MatchEvent("timeout", self.names[door_id], skey, stage)

    def _take(self, key: bytes, seen: bytes) -> bytes | None:
        """Delete ``key`` and return its value; in one call where the kernel has it (5.14), else two."""
        if self._atomic_take:
            try:
                return self.attempts.lookup_and_delete(key)
            except ebpf.BpfError as exc:
                log.info("attempt sweep without lookup-and-delete on this kernel (%s)", exc)
                self._atomic_take = False
        # Two steps: a knock landing between them can lose its fresh attempt (a stage the client resends).
        return seen if self.attempts.delete(key) else None

    def take_skipped(self) -> int:
        n, self.skipped_notes = self.skipped_notes, 0
        return n

    def counts(self) -> dict[str, int]:
        """The counters: packets matched, lost opens and notes, events by kind (totals since the maps were made)."""
        value = self.counters.lookup(_U32.pack(0))
        return KP.decode_counters(value) if value is not None else dict.fromkeys(KP.COUNTERS, 0)

    def close(self) -> None:
        if getattr(self, "program", None) is not None:
            self.program.close()  # type: ignore[union-attr]
            self.program = None
        for thing in reversed(self._owned):
            thing.close()
        self._owned = []


def unsuitable(doors: Sequence[MatchDoor], *, source_bound: bool, spa_port_knocked: bool,
               rotating: bool = False) -> str | None:
    """Why the kernel matcher cannot stand for the Python one with this configuration, or None.

    ``rotating``: the configuration has rotating doors (the program is loaded again at each window).
    """
    if rotating and len(doors) > MAX_ROTATING_DOORS:
        return (f"{len(doors)} doors to match, rotating doors counting once per sequence in force; with rotating"
                f" doors the kernel matcher takes up to {MAX_ROTATING_DOORS}, as its program is loaded again at"
                " each window boundary, on the capture loop, and the kernel's check of it grows with the doors")
    if len(doors) > MAX_DOORS:
        return (f"{len(doors)} doors to match; the kernel matcher takes up to {MAX_DOORS}, as the kernel's check"
                " of its program grows with the square of the doors")
    if source_bound:
        return "rotating doors bound to the source address derive their ports per source, in user space"
    if spa_port_knocked:
        return "a door knocks on the SPA port, whose datagrams user space must also see"
    if not doors:
        return "no door to match"
    return None
