"""The knock matcher as a kernel program: eBPF generated from the doors (pure: doors in, bytes out).

Under a spoofed flood on the knock ports every packet changes some
attempt, so none can be dropped before matching; at a few hundred thousand
packets a second the Python loop (3–5 µs a packet) cannot match them
all and the kernel drops what the capture ring cannot hold, legitimate
knocks among them. This program does the matching where the packets
arrive: a socket filter (``BPF_PROG_TYPE_SOCKET_FILTER``) that keeps one
attempt per (source, door) in an LRU hash map and reports what happened
through two BPF ring buffers, *opens* and *notes* (stages, resets,
timeouts: the log lines). It returns 0 for every packet, so its socket
never queues anything; user space reads only events.

It is ``spa.matcher.Matcher`` behind the capture's kernel filter, step for
step (``tests/netns/test_knock_program.py`` runs both on the same packets):

* the packets it looks at are those the knock filter passes
  (``spa.filter.capture_expression``): TCP or UDP, IPv4 not a non-first
  fragment, IPv6 without extension headers, to this host or a door's
  target, on a port some door or guard steps on, with one of that port's
  TCP flag tests; and those
  ``spa.packet.fields`` reads (lengths, data offset, a usable source);
* per door, in config order: an attempt past ``seq_timeout`` ends
  (*timeout*); a packet the door cannot see (target, local address, TCP
  flags) or a retransmitted SYN changes nothing; the door's next step
  advances it (*stage*, then *open* at the last); anything else resets it
  (*reset*); then a packet on the door's first step that it can see, for
  which no attempt is left, starts one (a one-step door opens at once).

Differences, all of bookkeeping: attempts are evicted least recently used
rather than oldest first (both bounded); the timeout of an attempt that
simply stops comes from a sweep of the map in user space
(``spa.server.knock_kernel``), not from the program; events of one packet
come door by door rather than attempts first.

Each door is known by a 32-bit id, part of the attempt's key. A door whose
definition changes (a reload, a one-time sequence used up) gets a new id,
so its old attempts are never found again and age out of the LRU, while
attempts of unchanged doors survive a new program.

With an *active* map (``Maps.active``), each door also has a slot, a bit in
a ``u64`` kept per source: set when the source starts an attempt of that
door, cleared when the attempt ends. A packet reads its source's bits once
and looks up only the attempts whose bit is set, so its cost does not grow
with the doors. A bit whose attempt went otherwise (the sweep, the LRU)
costs one lookup and is cleared then; a source with no bit left loses its
entry. Without it, every door's attempt is looked up for every packet: the
program the kernel checks fastest.

Layouts (native byte order; addresses as four 32-bit words each holding
the number a big-endian read of those bytes gives, IPv4 as ``0, 0, 0, a``):

* attempt key, 24 bytes: source words, door id, family (4 or 6);
* attempt value, 24 bytes: start (``u64`` ns), stage, TCP seq, sport, dport;
* local address key, 20 bytes: address words, family (also the active map's key: the source);
* active value: a ``u64``, a bit per door slot;
* event, 40 bytes: time (``u64`` ns), kind, stage, then the attempt key;
* counters: one array element of a ``u64`` per name in ``COUNTERS``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from spa import ebpf_asm as A
from spa.knock import V6_KEY
from spa.matcher import MatchDoor, MatchEvent
from spa.socket_filter import ip_start

__all__ = ["Maps", "build", "decode_event", "decode_attempt", "decode_counters", "local_key",
           "door_steps", "ATTEMPT_KEY_SIZE", "ATTEMPT_VALUE_SIZE", "LOCAL_KEY_SIZE", "EVENT_SIZE", "COUNTERS",
           "COUNTERS_VALUE_SIZE", "KINDS"]

TCP, UDP = 6, 17
_PROTO_NUMBERS = {"tcp": TCP, "udp": UDP}

ATTEMPT_KEY_SIZE = 24
#: Door slots in a source's active bits (one u64).
MAX_SLOTS = 64
ACTIVE_VALUE_SIZE = 8
ATTEMPT_VALUE_SIZE = 24
LOCAL_KEY_SIZE = 20
EVENT_SIZE = 40
#: Event kinds, by the number the program writes.
KINDS: dict[int, str] = {1: "stage", 2: "open", 3: "timeout", 4: "reset"}
_KIND = {v: k for k, v in KINDS.items()}
#: Slots of the counters map: knock packets matched, opens and notes the ring buffers had no room for,
#: then events by kind (all of them: user space may read only some notes).
COUNTERS = ("packets", "lost_opens", "lost_notes", "stage", "open", "timeout", "reset")
_C_PACKETS, _C_LOST_OPENS, _C_LOST_NOTES = range(3)
_C_KIND = {kind: COUNTERS.index(kind) for kind in KINDS.values()}

_EVENT = struct.Struct("=QII4III")
#: The counters map: an array of one element, every counter in it (``decode_counters``).
COUNTERS_VALUE_SIZE = 8 * len(COUNTERS)
_COUNTERS = struct.Struct(f"={len(COUNTERS)}Q")
_KEY = struct.Struct("=4III")
_VALUE = struct.Struct("=QI")
_LOCAL = struct.Struct("=4II")

# Stack layout (offsets from r10). The event record ends with the attempt key, so an
# event is written in place around the key the lookups already use.
_REC = -40  # time u64, kind u32, stage u32, then the key
_KEY_OFF = -24  # source words -24..-9, door id -8, family -4
_DOOR = -8
_FAMILY = -4
_DST = -60  # destination words -60..-45, family -44: a local-address key
_DST_FAMILY = -44
_SPORT, _DPORT, _SEQ, _FLAGS, _PROTO, _LOCAL_OK, _STAGE = -64, -68, -72, -76, -80, -84, -88
_VAL = -112  # a new attempt: start u64, stage, seq, sport, dport
_SLOT = -116  # a u32 array index (counters, clock)
_CNT = -128  # the counters' address, looked up once a packet
_ACT = -148  # the source as an active-map key: words -148..-133, family -132
_BITS = -160  # the source's door bits as the packet leaves them
_BITS0 = -168  # and as it found them

_RB_FLAGS = 0  # ring buffer output flags: adaptive wake-up (only when the reader has caught up)


@dataclass(frozen=True, slots=True)
class Maps:
    """File descriptors of the program's maps, as the kernel knows them."""

    attempts: int  # LRU hash: attempt key -> attempt value
    opens: int  # ring buffer
    notes: int  # ring buffer
    counters: int  # array of one element: COUNTERS_VALUE_SIZE bytes, a u64 per counter
    local: int | None = None  # hash: local-address key -> u8; None: every destination is local
    clock: int | None = None  # array with one u64, "now" in ns, for tests; None: the kernel's monotonic clock
    #: LRU hash: source key (as a local-address key) -> u64, a bit per door slot that may hold an attempt of
    #: that source; None: every door's attempt is looked up for every packet.
    active: int | None = None


def _step(proto: str, port: int) -> int:
    return _PROTO_NUMBERS[proto] << 16 | port


def _words(addr: IPv4Address | IPv6Address) -> tuple[int, int, int, int]:
    if addr.version == 4:
        return 0, 0, 0, int(addr)
    return struct.unpack(">4I", addr.packed)  # type: ignore[return-value]


def local_key(addr: IPv4Address | IPv6Address) -> bytes:
    """The key of ``addr`` in the local-address map."""
    return _LOCAL.pack(*_words(addr), addr.version)


def decode_event(record: bytes, names: Mapping[int, str]) -> tuple[int, MatchEvent] | None:
    """(kernel time in ns, the event) of one ring-buffer record; None for a door no longer known or a bad record."""
    if len(record) != EVENT_SIZE:
        return None
    t, kind, stage, w0, w1, w2, w3, door_id, family = _EVENT.unpack(record)
    name = names.get(door_id)
    what = KINDS.get(kind)
    if name is None or what is None or family not in (4, 6):
        return None
    return t, MatchEvent(what, name, _source_key(w0, w1, w2, w3, family), stage)  # type: ignore[arg-type]


def decode_counters(value: bytes) -> dict[str, int]:
    """The counters map's one value, by name."""
    return dict(zip(COUNTERS, _COUNTERS.unpack(value)))


def decode_attempt(key: bytes, value: bytes) -> tuple[int, int, int, int]:
    """(source key, door id, start in ns, stage) of one entry of the attempt map."""
    w0, w1, w2, w3, door_id, family = _KEY.unpack(key)
    started, stage = _VALUE.unpack_from(value)
    return _source_key(w0, w1, w2, w3, family), door_id, started, stage


def _source_key(w0: int, w1: int, w2: int, w3: int, family: int) -> int:
    """``spa.knock.key_of`` of the address in an attempt key's words."""
    return w3 if family == 4 else (w0 << 96 | w1 << 64 | w2 << 32 | w3) | V6_KEY


def door_steps(doors: Iterable[MatchDoor]) -> dict[int, list[tuple[int, int] | None]]:
    """Step -> the TCP flag tests ``(must_set, must_clear)`` that let a packet through (None: any)."""
    out: dict[int, list[tuple[int, int] | None]] = {}
    for d in doors:
        test = (d.tcpflags.must_set, d.tcpflags.must_clear) if d.tcpflags is not None else None
        for s in (*d.sequence, *d.guards):
            tests = out.setdefault(_step(s.proto, s.port), [])
            if test not in tests:
                tests.append(test)
    return out


class _Gen:
    def __init__(self, maps: Maps) -> None:
        self.a = A.Asm()
        self.maps = maps
        self._n = 0

    def fresh(self, what: str) -> str:
        self._n += 1
        return f"{what}_{self._n}"

    # -- pieces ------------------------------------------------------------------

    def first_element(self, map_fd: int) -> None:
        """r0 = the address of an array map's element 0 (on to ``out`` if missing)."""
        self.a.array_element0(map_fd, _SLOT, "out")

    def counters(self) -> None:
        """Look the counters up once and keep their address on the stack."""
        self.first_element(self.maps.counters)
        self.a.stx(A.DW, A.R10, _CNT, A.R0)

    def count(self, slot: int) -> None:
        self.a.add_one(_CNT, 8 * slot)

    def emit(self, kind: str, *, stage: int | None = None) -> None:
        """One event: ``stage`` given, or the one saved at ``_STAGE``."""
        a = self.a
        opens = kind == "open"
        a.stx(A.DW, A.R10, _REC, A.R9)
        a.st_imm(A.W, A.R10, _REC + 8, _KIND[kind])
        if stage is None:
            a.ldx(A.W, A.R1, A.R10, _STAGE)
            a.stx(A.W, A.R10, _REC + 12, A.R1)
        else:
            a.st_imm(A.W, A.R10, _REC + 12, stage)
        self.count(_C_KIND[kind])
        a.ld_map_fd(A.R1, self.maps.opens if opens else self.maps.notes)
        a.mov64_reg(A.R2, A.R10)
        a.alu64_imm(A.ADD, A.R2, _REC)
        a.mov64_imm(A.R3, EVENT_SIZE)
        a.mov64_imm(A.R4, _RB_FLAGS)
        a.call(A.FN_ringbuf_output)
        done = self.fresh("emitted")
        a.jmp_imm(A.JEQ, A.R0, 0, done)
        self.count(_C_LOST_OPENS if opens else _C_LOST_NOTES)
        a.label(done)

    def delete_attempt(self, slot: int | None) -> None:
        self.a.map_call(A.FN_map_delete_elem, self.maps.attempts, _KEY_OFF)
        if slot is not None:
            self.bit(slot, False)

    def bit(self, slot: int, on: bool) -> None:
        """Set or clear the door's bit in the source's active bits (on the stack until the packet is done)."""
        a = self.a
        mask = 1 << slot
        a.ldx(A.DW, A.R1, A.R10, _BITS)
        a.ld_imm64(A.R2, mask if on else ~mask & (1 << 64) - 1)
        a.alu64_reg(A.OR if on else A.AND, A.R1, A.R2)
        a.stx(A.DW, A.R10, _BITS, A.R1)

    def load_bits(self) -> None:
        """The source's active bits (0 without an entry), to ``_BITS`` and ``_BITS0``."""
        a = self.a
        assert self.maps.active is not None
        for i in range(4):
            a.ldx(A.W, A.R1, A.R10, _KEY_OFF + 4 * i)
            a.stx(A.W, A.R10, _ACT + 4 * i, A.R1)
        a.ldx(A.W, A.R1, A.R10, _FAMILY)
        a.stx(A.W, A.R10, _ACT + 16, A.R1)
        a.map_call(A.FN_map_lookup_elem, self.maps.active, _ACT)
        none = self.fresh("no_bits")
        a.mov64_imm(A.R1, 0)
        a.jmp_imm(A.JEQ, A.R0, 0, none)
        a.ldx(A.DW, A.R1, A.R0, 0)
        a.label(none)
        a.stx(A.DW, A.R10, _BITS, A.R1)
        a.stx(A.DW, A.R10, _BITS0, A.R1)

    def store_bits(self) -> None:
        """The source's active bits back to the map if the packet changed them (none left: the entry goes)."""
        a = self.a
        assert self.maps.active is not None
        a.ldx(A.DW, A.R1, A.R10, _BITS)
        a.ldx(A.DW, A.R2, A.R10, _BITS0)
        a.jmp_reg(A.JEQ, A.R1, A.R2, "out")
        gone = self.fresh("bits_gone")
        a.jmp_imm(A.JEQ, A.R1, 0, gone)
        a.map_call(A.FN_map_update_elem, self.maps.active, _ACT, _BITS, flags=0)  # BPF_ANY
        a.ja("out")
        a.label(gone)
        a.map_call(A.FN_map_delete_elem, self.maps.active, _ACT)

    def visible(self, d: MatchDoor, invisible: str) -> None:
        """Fall through when door ``d`` can see the packet, else jump to ``invisible``."""
        a = self.a
        if d.target is None:
            a.ldx(A.W, A.R1, A.R10, _LOCAL_OK)
            a.jmp_imm(A.JEQ, A.R1, 0, invisible)
        else:
            self.destination_is(d.target, invisible)
        if d.tcpflags is not None:
            seen = self.fresh("flags_ok")
            a.ldx(A.W, A.R1, A.R10, _PROTO)
            a.jmp_imm(A.JNE, A.R1, TCP, seen)
            self.flags_pass(d.tcpflags.must_set, d.tcpflags.must_clear, invisible)
            a.label(seen)

    def destination_is(self, addr: IPv4Address | IPv6Address, other: str) -> None:
        """Fall through when the packet is to ``addr``, else jump to ``other``."""
        a = self.a
        a.ldx(A.W, A.R1, A.R10, _DST_FAMILY)
        a.jmp32_imm(A.JNE, A.R1, addr.version, other)
        for i, w in enumerate(_words(addr)):
            a.ldx(A.W, A.R1, A.R10, _DST + 4 * i)
            a.jmp32_imm(A.JNE, A.R1, w, other)

    def flags_pass(self, must_set: int, must_clear: int, fails: str) -> None:
        """Fall through when the TCP flags pass knockd's test, else jump to ``fails``."""
        a = self.a
        a.ldx(A.W, A.R1, A.R10, _FLAGS)
        a.alu64_imm(A.AND, A.R1, must_set)
        a.jmp_imm(A.JNE, A.R1, must_set, fails)
        a.ldx(A.W, A.R1, A.R10, _FLAGS)
        a.alu64_imm(A.AND, A.R1, must_clear)
        a.jmp_imm(A.JNE, A.R1, 0, fails)

    def copy_last(self, base: int, off: int) -> None:
        """The packet's seq, sport and dport to ``base + off`` (+12, +16, +20 of an attempt value)."""
        a = self.a
        for src, dst in ((_SEQ, 12), (_SPORT, 16), (_DPORT, 20)):
            a.ldx(A.W, A.R1, A.R10, src)
            a.stx(A.W, base, off + dst, A.R1)

    # -- the program ---------------------------------------------------------------

    def parse(self) -> None:
        """The packet's fields to the stack and r8 = its step, or on to ``out``; ``spa.packet.fields``'s checks."""
        a = self.a
        ip_start(a)
        a.jmp_reg(A.JLT, A.R0, A.R8, "out")
        a.mov64_reg(A.R9, A.R0)  # r9 = where the packet ends
        a.ld_abs(A.H, 6)
        a.jmp_imm(A.JSET, A.R0, 0x1FFF, "out")  # not the first fragment: no ports
        a.ld_abs(A.B, 9)
        a.stx(A.W, A.R10, _PROTO, A.R0)
        a.ld_abs(A.W, 12)
        a.jmp_imm(A.JEQ, A.R0, 0, "out")  # unspecified or multicast source: no grant possible
        a.mov64_reg(A.R1, A.R0)
        a.alu64_imm(A.RSH, A.R1, 28)
        a.jmp_imm(A.JEQ, A.R1, 0xE, "out")
        a.stx(A.W, A.R10, _KEY_OFF + 12, A.R0)
        a.ld_abs(A.W, 16)
        a.stx(A.W, A.R10, _DST + 12, A.R0)
        for i in range(3):
            a.st_imm(A.W, A.R10, _KEY_OFF + 4 * i, 0)
            a.st_imm(A.W, A.R10, _DST + 4 * i, 0)
        a.st_imm(A.W, A.R10, _FAMILY, 4)
        a.st_imm(A.W, A.R10, _DST_FAMILY, 4)
        a.ja("l4")

        a.label("v6")
        a.jmp_imm(A.JLT, A.R7, 40, "out")
        a.ld_abs(A.H, 4)
        a.jmp_imm(A.JEQ, A.R0, 0, "out")  # a jumbogram, or garbage
        a.alu64_imm(A.ADD, A.R0, 40)
        a.jmp_reg(A.JGT, A.R0, A.R7, "out")
        a.mov64_reg(A.R9, A.R0)
        a.mov64_imm(A.R8, 40)  # no extension headers: the knock filter's reach
        a.ld_abs(A.B, 6)
        a.stx(A.W, A.R10, _PROTO, A.R0)
        for i in range(4):
            a.ld_abs(A.W, 8 + 4 * i)
            a.stx(A.W, A.R10, _KEY_OFF + 4 * i, A.R0)
            a.ld_abs(A.W, 24 + 4 * i)
            a.stx(A.W, A.R10, _DST + 4 * i, A.R0)
        a.st_imm(A.W, A.R10, _FAMILY, 6)
        a.st_imm(A.W, A.R10, _DST_FAMILY, 6)
        # Unusable sources: multicast, unspecified, IPv4-mapped unspecified or multicast.
        a.ldx(A.W, A.R1, A.R10, _KEY_OFF)
        a.mov64_reg(A.R2, A.R1)
        a.alu64_imm(A.RSH, A.R2, 24)
        a.jmp_imm(A.JEQ, A.R2, 0xFF, "out")
        a.jmp_imm(A.JNE, A.R1, 0, "l4")
        a.ldx(A.W, A.R1, A.R10, _KEY_OFF + 4)
        a.jmp_imm(A.JNE, A.R1, 0, "l4")
        a.ldx(A.W, A.R1, A.R10, _KEY_OFF + 8)
        a.ldx(A.W, A.R2, A.R10, _KEY_OFF + 12)
        a.jmp_imm(A.JEQ, A.R1, 0, "v6_zero_prefix")
        a.jmp_imm(A.JNE, A.R1, 0xFFFF, "l4")
        a.jmp_imm(A.JEQ, A.R2, 0, "out")  # ::ffff:0.0.0.0
        a.alu64_imm(A.RSH, A.R2, 28)
        a.jmp_imm(A.JEQ, A.R2, 0xE, "out")  # ::ffff:224.0.0.0/4
        a.ja("l4")
        a.label("v6_zero_prefix")
        a.jmp_imm(A.JEQ, A.R2, 0, "out")  # ::

        a.label("l4")  # r8 = transport offset, r9 = end
        a.ldx(A.W, A.R1, A.R10, _PROTO)
        a.jmp_imm(A.JEQ, A.R1, TCP, "tcp")
        a.jmp_imm(A.JEQ, A.R1, UDP, "udp")
        a.ja("out")
        a.label("tcp")
        a.mov64_reg(A.R1, A.R8)
        a.alu64_imm(A.ADD, A.R1, 20)
        a.jmp_reg(A.JGT, A.R1, A.R9, "out")
        a.ld_ind(A.B, A.R8, 12)
        a.jmp_imm(A.JLT, A.R0, 0x50, "out")  # data offset under five words
        for size, off, slot in ((A.H, 0, _SPORT), (A.H, 2, _DPORT), (A.W, 4, _SEQ), (A.B, 13, _FLAGS)):
            a.ld_ind(size, A.R8, off)
            a.stx(A.W, A.R10, slot, A.R0)
        a.ja("step")
        a.label("udp")
        a.mov64_reg(A.R1, A.R8)
        a.alu64_imm(A.ADD, A.R1, 8)
        a.jmp_reg(A.JGT, A.R1, A.R9, "out")
        for off, slot in ((0, _SPORT), (2, _DPORT)):
            a.ld_ind(A.H, A.R8, off)
            a.stx(A.W, A.R10, slot, A.R0)
        a.st_imm(A.W, A.R10, _SEQ, 0)
        a.st_imm(A.W, A.R10, _FLAGS, 0)

        a.label("step")
        a.ldx(A.W, A.R8, A.R10, _PROTO)
        a.alu64_imm(A.LSH, A.R8, 16)
        a.ldx(A.W, A.R1, A.R10, _DPORT)
        a.alu64_reg(A.OR, A.R8, A.R1)

    def prefilter(self, doors: Sequence[MatchDoor]) -> None:
        """On to ``matched`` when the knock filter would pass the packet, else to ``out``."""
        a = self.a
        for step, tests in sorted(door_steps(doors).items()):
            other = self.fresh("not_step")
            a.jmp_imm(A.JNE, A.R8, step, other)
            if None in tests or step >> 16 != TCP:
                a.ja("matched")
            else:
                for must_set, must_clear in tests:  # type: ignore[misc]
                    fails = self.fresh("flags_fail")
                    self.flags_pass(must_set, must_clear, fails)
                    a.ja("matched")
                    a.label(fails)
                a.ja("out")
            a.label(other)
        a.ja("out")
        a.label("matched")
        # r8 again, from the stack: after the chain above the verifier knows it as one constant per step
        # and would walk every door once per step; reloaded, it is one unknown and the paths merge.
        a.ldx(A.W, A.R8, A.R10, _PROTO)
        a.alu64_imm(A.LSH, A.R8, 16)
        a.ldx(A.W, A.R1, A.R10, _DPORT)
        a.alu64_reg(A.OR, A.R8, A.R1)

    def clock(self) -> None:
        """r9 = now, in ns."""
        a = self.a
        if self.maps.clock is None:
            a.call(A.FN_ktime_get_ns)
        else:
            self.first_element(self.maps.clock)
            a.ldx(A.DW, A.R0, A.R0, 0)
        a.mov64_reg(A.R9, A.R0)

    def destination(self, doors: Sequence[MatchDoor]) -> None:
        """_LOCAL_OK = whether the packet is for this host; on to ``out`` if for neither it nor a door's target."""
        a = self.a
        if self.maps.local is None:
            a.st_imm(A.W, A.R10, _LOCAL_OK, 1)
            return
        self.a.map_call(A.FN_map_lookup_elem, self.maps.local, _DST)
        a.mov64_imm(A.R1, 0)
        not_local = self.fresh("not_local")
        a.jmp_imm(A.JEQ, A.R0, 0, not_local)
        a.mov64_imm(A.R1, 1)
        a.label(not_local)
        a.stx(A.W, A.R10, _LOCAL_OK, A.R1)
        # The knock filter's `dst host` test: our addresses and the doors' targets.
        ours = self.fresh("ours")
        a.jmp_imm(A.JNE, A.R1, 0, ours)
        for target in sorted({d.target for d in doors if d.target is not None}, key=lambda t: (t.version, int(t))):
            other = self.fresh("not_target")
            self.destination_is(target, other)
            a.ja(ours)
            a.label(other)
        a.ja("out")
        a.label(ours)

    def door(self, door_id: int, d: MatchDoor, slot: int | None) -> None:
        """Door ``d``'s part; ``slot``: its bit in the source's active bits (None: no active map)."""
        a = self.a
        steps = [_step(s.proto, s.port) for s in d.sequence]
        n = len(steps)
        first, done = self.fresh("first"), self.fresh("done")
        timeout, reset, advance = self.fresh("timeout"), self.fresh("reset"), self.fresh("advance")
        a.st_imm(A.W, A.R10, _DOOR, door_id)
        if n == 1:  # opens at its first step: never an attempt to look up
            a.jmp_imm(A.JNE, A.R8, steps[0], done)
            self.visible(d, done)
            self.emit("stage", stage=1)
            self.emit("open", stage=1)
            a.label(done)
            return
        missing = first
        if slot is not None:
            # Bit clear: this source has no attempt of this door, so no lookup (the cost that grew with doors).
            has, missing = self.fresh("has_bit"), self.fresh("stale_bit")
            a.ldx(A.DW, A.R1, A.R10, _BITS)
            if slot:
                a.alu64_imm(A.RSH, A.R1, slot)
            a.alu64_imm(A.AND, A.R1, 1)
            a.jmp_imm(A.JNE, A.R1, 0, has)
            a.ja(first)
            a.label(missing)  # a bit whose attempt went (the sweep, the LRU): cleared on the way
            self.bit(slot, False)
            a.ja(first)
            a.label(has)
        self.a.map_call(A.FN_map_lookup_elem, self.maps.attempts, _KEY_OFF)
        a.jmp_imm(A.JEQ, A.R0, 0, missing)
        a.mov64_reg(A.R7, A.R0)
        a.ldx(A.W, A.R1, A.R7, 8)
        a.stx(A.W, A.R10, _STAGE, A.R1)
        # Past seq_timeout, counted from the first knock (signed, as the matcher's float test).
        a.ldx(A.DW, A.R1, A.R7, 0)
        a.mov64_reg(A.R2, A.R9)
        a.alu64_reg(A.SUB, A.R2, A.R1)
        a.ld_imm64(A.R3, max(0, round(d.seq_timeout * 1e9)))
        a.jmp_reg(A.JSGT, A.R2, A.R3, timeout)
        self.visible(d, done)
        # The same SYN again (a retransmission): counted once.
        fresh = self.fresh("not_again")
        a.ldx(A.W, A.R1, A.R10, _PROTO)
        a.jmp_imm(A.JNE, A.R1, TCP, fresh)
        for field, off in ((_SEQ, 12), (_SPORT, 16), (_DPORT, 20)):
            a.ldx(A.W, A.R1, A.R10, field)
            a.ldx(A.W, A.R2, A.R7, off)
            a.jmp_reg(A.JNE, A.R1, A.R2, fresh)
        a.ja(done)
        a.label(fresh)
        a.ldx(A.W, A.R1, A.R10, _STAGE)
        for k in range(1, n):
            other = self.fresh("stage")
            a.jmp_imm(A.JNE, A.R1, k, other)
            a.jmp_imm(A.JEQ, A.R8, steps[k], advance)
            a.ja(reset)
            a.label(other)
        a.ja(reset)

        a.label(advance)
        a.alu64_imm(A.ADD, A.R1, 1)
        a.stx(A.W, A.R7, 8, A.R1)
        a.stx(A.W, A.R10, _STAGE, A.R1)
        self.copy_last(A.R7, 0)
        self.emit("stage")
        a.ldx(A.W, A.R1, A.R10, _STAGE)
        a.jmp_imm(A.JNE, A.R1, n, done)
        self.delete_attempt(slot)
        self.emit("open", stage=n)
        a.ja(done)

        a.label(timeout)
        self.delete_attempt(slot)
        self.emit("timeout")
        a.ja(first)

        a.label(reset)
        # On the door's first step (which the door sees: checked above) the attempt restarts in
        # place: the events and state of a delete and a new attempt, without the map's delete and insert.
        gone = self.fresh("reset_gone")
        a.jmp_imm(A.JNE, A.R8, steps[0], gone)
        self.emit("reset")
        a.stx(A.DW, A.R7, 0, A.R9)
        a.st_imm(A.W, A.R7, 8, 1)
        self.copy_last(A.R7, 0)
        self.emit("stage", stage=1)
        a.ja(done)
        a.label(gone)
        self.delete_attempt(slot)
        self.emit("reset")
        a.ja(done)  # not a first step the door sees: nothing starts

        a.label(first)
        a.jmp_imm(A.JNE, A.R8, steps[0], done)
        self.visible(d, done)
        a.stx(A.DW, A.R10, _VAL, A.R9)
        a.st_imm(A.W, A.R10, _VAL + 8, 1)
        self.copy_last(A.R10, _VAL)
        self.a.map_call(A.FN_map_update_elem, self.maps.attempts, _KEY_OFF, _VAL, flags=0)  # BPF_ANY
        if slot is not None:
            self.bit(slot, True)
        self.emit("stage", stage=1)
        a.label(done)


def build(doors: Sequence[tuple[int, MatchDoor]], maps: Maps, slots: Mapping[int, int] | None = None) -> bytes:
    """The program for ``doors`` (``(id, door)`` in config order), using ``maps``.

    With ``maps.active``, ``slots`` gives each door id its bit (0-63) in a
    source's active bits: a door whose bit is clear costs a packet no
    attempt lookup. Keep a door's slot while its id lives, so that its
    attempts stay found across programs. Doors without steps are left out
    (as the matcher: nothing starts them).
    """
    doors = [(i, d) for i, d in doors if d.sequence]
    if maps.active is not None:
        if slots is None or any(not 0 <= slots.get(i, -1) < MAX_SLOTS for i, _ in doors):
            raise ValueError(f"each door needs a slot from 0 to {MAX_SLOTS - 1} with an active map")
        if len({slots[i] for i, _ in doors}) != len(doors):
            raise ValueError("two doors share a slot")
    g = _Gen(maps)
    a = g.a
    g.parse()
    g.prefilter([d for _, d in doors])
    g.destination([d for _, d in doors])
    g.counters()
    g.count(_C_PACKETS)
    g.clock()
    if maps.active is not None:
        g.load_bits()
    for door_id, d in doors:
        g.door(door_id, d, slots[door_id] if maps.active is not None else None)  # type: ignore[index]
    if maps.active is not None:
        g.store_bits()
    a.label("out")
    a.ret(0)  # never queue the packet: events are all user space gets
    return a.assemble()
