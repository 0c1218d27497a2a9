"""SPA at the server's edge: key files in, decisions out, counted and logged.

``load_verifier`` reads the server key and each door's authorized_keys (at
start and on SIGHUP); ``SpaReceiver.handle`` runs on the capture loop for
each datagram to the SPA port: the checks themselves are pure
(``spa.authorize``), the replay cache is in memory (``spa.replay``) and its
durable copy is written by the grant manager just before the grant opens.
"""

from __future__ import annotations

import collections
import logging
import time

from spa.authorize import REPLAYED, Accepted, SpaDoor, Verifier
from spa.config import Config
from spa.errors import KeyFileError, PacketRejected
from spa.grant import Address
from spa.keys import ed25519
from spa.keys.secure import read_public
from spa.keytext import AuthorizedKey, parse_authorized_keys
from spa.protocol import HINT_SIZE
from spa.replay import ReplayCache
from spa.server.logs import Throttle

log = logging.getLogger("spa.server.spa")

#: Reasons that mean "not a packet from one of our clients": counted, summarized, never logged one by one
#: (each line would be a disk write an attacker could trigger at line rate).
JUNK = frozenset({"size", "version", "unknown-key", "aead"})


def load_authorized(config: Config) -> dict[str, tuple[str, list[AuthorizedKey]]]:
    """Door name -> (authorized_keys path, its keys), for every door that accepts SPA."""
    out = {}
    for d in config.doors:
        if d.authorized_keys is not None:
            path = config.resolve(d.authorized_keys)
            out[d.name] = (path, parse_authorized_keys(read_public(path), path))
    return out


def load_verifier(config: Config, authorized: dict[str, tuple[str, list[AuthorizedKey]]] | None = None) -> Verifier | None:
    """The verifier for the config's SPA doors, or None when no door accepts SPA.

    ``authorized`` is ``load_authorized(config)`` when the caller has it already.
    """
    if authorized is None:
        authorized = load_authorized(config)
    if not authorized:
        return None
    assert config.options.server_key is not None  # the parser requires it
    server = ed25519.load(config.resolve(config.options.server_key))
    if server.private.role != "server":
        log.warning("%s is a %s key; 'spa keygen --server' makes server keys", server.path, server.private.role)
    doors = []
    for d in config.doors:
        if d.name not in authorized:
            continue
        path, keys = authorized[d.name]
        if not keys:
            log.warning("%s lists no key: door %s accepts no SPA packet", path, d.name)
        doors.append(SpaDoor(d.name, tuple(keys), d.cmd_timeout, d.spa_use_source))
    try:
        return Verifier(server.private.seed, doors, config.options.spa_window)
    except ValueError as exc:
        raise KeyFileError(f"an authorized key cannot be used: {exc}") from None


class SpaReceiver:
    def __init__(self, verifier: Verifier, replay: ReplayCache):
        self.verifier = verifier
        self.replay = replay
        self.rejected: collections.Counter[str] = collections.Counter()
        #: AEAD failures per key hint since the daemon last took them (a flood under one client's hint).
        self.aead_by_hint: collections.Counter[bytes] = collections.Counter()
        self.accepted = 0
        self._throttle = Throttle(rate=20.0, burst=100.0)
        self._junk_reported = 0

    def handle(self, payload: bytes, source: Address, now: float | None = None) -> Accepted | None:
        """Decide on one datagram; the accepted request (nonce already remembered in memory) or None."""
        now = time.time() if now is None else now
        junk = self.verifier.screen(payload, now, self.replay.__contains__)
        if junk is not None:  # most of a flood: counted without an exception
            self.rejected[junk] += 1
            if junk in JUNK:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: SPA packet dropped (%s)", source, junk)
            elif self._throttle.allow(now):
                log.warning("%s: SPA packet rejected (%s): %s", source, junk, REPLAYED)
            return None
        try:
            acc = self.verifier.check_screened(payload, source, now)
        except PacketRejected as exc:
            self.rejected[exc.reason] += 1
            if exc.reason == "aead":
                self.aead_by_hint[payload[1:1 + HINT_SIZE]] += 1
            if exc.reason in JUNK:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: SPA packet dropped (%s): %s", source, exc.reason, exc.message)
            elif self._throttle.allow(now):
                log.warning("%s: SPA packet rejected (%s): %s", source, exc.reason, exc.message)
            return None
        # In memory at once: a copy arriving before the journal commit is a replay too.
        self.replay.add(acc.nonce, acc.remember_until)
        self.accepted += 1
        if abs(acc.skew) > self.verifier.window / 2:
            log.warning("%s: key %s: the client's clock is %.0f s %s (window %.0f s): fix it before it drifts out",
                        source, acc.key_id, abs(acc.skew), "fast" if acc.skew > 0 else "slow", self.verifier.window)
        return acc

    def summary(self) -> str | None:
        """One line for the junk rejected since the last call (per interval, never per packet)."""
        junk = sum(self.rejected[r] for r in JUNK)
        fresh = junk - self._junk_reported
        self._junk_reported = junk
        if fresh <= 0:
            return None
        parts = ", ".join(f"{r} {self.rejected[r]}" for r in sorted(JUNK) if self.rejected[r])
        return f"{fresh} SPA-port datagrams dropped as junk (totals: {parts})"
