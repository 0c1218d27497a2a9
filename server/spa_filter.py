"""The SPA port's part of the capture filter, between builds: which key hints and nonces the kernel checks.

``spa.hint_filter`` lays out the instructions (pure). This keeps what the
daemon needs from one build to the next: the program up to its nonce list
(rebuilt when the doors, the addresses or the key hints change; the nonce
list alone after each accepted packet), the room left for nonces, the key
hints taken out under a flood of forgeries, and what the log has been told.
"""

from __future__ import annotations

import collections
import logging

from spa import hint_filter
from spa.authorize import Verifier
from spa.protocol import HINT_EPOCH, NONCE_SIZE
from spa.replay import ReplayCache

log = logging.getLogger(__name__)

#: AEAD failures in one second under one key hint, while the capture is dropping packets, that take
#: the hint out of the kernel's filter: someone floods with a hint they saw (each such datagram must be
#: decrypted to be told from the real thing). A client never sends packets that fail the AEAD.
HINT_FLOOD = 1000
#: Seconds a flooded hint stays out, doubled each time the flood is still there when it comes back
#: (never longer than the index holds a hint).
HINT_QUARANTINE = 30.0
HINT_QUARANTINE_MAX = 960.0


class SpaPortFilter:
    def __init__(self) -> None:
        self._section: list | None = None  # the program up to the nonce list
        self._room = 0  # nonces the kernel's limit leaves room for
        self._accept = 0  # what the program returns to accept
        self._epochs: tuple[int, int] | None = None  # the hint index the section was built from
        self._replay_version = -1  # the replay cache's version the nonce list was built from
        self._mode = ""
        #: Key hints taken out of the kernel's filter: hint -> until.
        self.quarantine: dict[bytes, float] = {}
        self._strikes: dict[bytes, int] = {}
        self._drops_seen = 0

    @property
    def active(self) -> bool:
        """Whether the installed program checks hints and nonces (so its nonce list can be refreshed)."""
        return self._section is not None

    def clear(self) -> None:
        """The compiled filter has no SPA-port clause (no SPA door, or a door knocks on that port)."""
        self._section = None

    def build(self, program: list, port: int, verifier: Verifier, replay: ReplayCache, now: float) -> list:
        """``program`` with the key-hint check: the whole index, else the epochs a packet can be accepted
        in, else none (said once in the log); and the accepted packets' nonces."""
        self._epochs = verifier.index(now)
        hints = [h for h in verifier.hints_at(now) if h not in self.quarantine]
        level, mode = logging.INFO, f"the key hints of {len(verifier)} key(s) over the index"
        if not hint_filter.fits(len(program), len(hints)):
            hints = [h for h in verifier.hints_at(now, verifier.window + HINT_EPOCH) if h not in self.quarantine]
            level, mode = logging.WARNING, (
                f"the key hints of {len(verifier)} key(s) for the time window only: packets "
                "from clocks off by more are dropped unseen, without the skew report")
        self._section = None
        if hint_filter.fits(len(program), len(hints)):
            self._section = hint_filter.hint_section(program, port, hints)
            self._room = hint_filter.room(len(program), len(hints))
            self._accept = hint_filter.accept_length(program)
        else:
            level, mode = logging.WARNING, f"no key-hint check: too many keys ({len(verifier)}) for the kernel's filter"
        if mode != self._mode:  # said once; the hint count moves with the epochs
            log.log(level, "SPA port %d, kernel filter: %s (%d hints)", port, mode, len(hints))
            self._mode = mode
        return self.with_nonces(replay) if self._section is not None else program

    def with_nonces(self, replay: ReplayCache) -> list:
        """The section and, after it, the nonces of packets already accepted: a flood of one captured
        packet stops in the kernel too (as many of the latest as the kernel's limit has room for)."""
        assert self._section is not None
        self._replay_version = replay.version
        refused = replay.latest(self._room, NONCE_SIZE)
        return self._section + hint_filter.nonce_section(refused, self._accept)

    def nonces_stale(self, replay: ReplayCache) -> bool:
        return self._section is not None and replay.version != self._replay_version

    def hints_moved(self, verifier: Verifier, now: float) -> bool:
        return verifier.index(now) != self._epochs

    def watch_floods(self, counts: collections.Counter[bytes], drops: int, now: float, verifier: Verifier) -> bool:
        """Once a second, with the AEAD failures per hint and the capture's drop count: take a flooded
        hint out of the kernel's filter, put it back when its time is up. True when that set changed.

        Only while the capture is dropping packets: below that the loop decrypts the flood and
        lets every legitimate packet through, the flooded client's included. Above it, the flood
        would crowd out every client; without the hint it crowds out only the one whose hint it
        is, and that client gets through again with a packet made under a later hint.
        """
        dropping, self._drops_seen = drops > self._drops_seen, drops
        changed = False
        for hint, until in list(self.quarantine.items()):
            if until <= now:
                del self.quarantine[hint]
                changed = True
                log.info("SPA: the key hint of key %s is back in the kernel's filter",
                         verifier.key_of_hint(hint) or "(no longer indexed)")
        if dropping:
            for hint, n in counts.items():
                if n < HINT_FLOOD or hint in self.quarantine:
                    continue
                strikes = self._strikes[hint] = self._strikes.get(hint, 0) + 1
                hold = min(HINT_QUARANTINE * 2 ** (strikes - 1), HINT_QUARANTINE_MAX)
                self.quarantine[hint] = now + hold
                changed = True
                key = verifier.key_of_hint(hint) or "?"
                log.warning("SPA: %d forged packets in a second under the key hint of key %s while the capture "
                            "drops packets: that hint is dropped in the kernel for %.0f s. Other keys are not "
                            "affected; key %s gets through again with a packet made in a later 30 s epoch",
                            n, key, hold, key)
        if len(self._strikes) > 4096:  # hints long out of the index
            self._strikes = {h: n for h, n in self._strikes.items() if h in self.quarantine}
        return changed
