"""The server's SPA decision: from a datagram to "open door D for address A for N seconds".

Pure apart from the clock and the replay cache, which the caller passes in.
Checks run cheapest first, so junk and forgeries cost microseconds and never
reach the one public-key operation:

1. size and version                      (``spa.protocol.open_header``)
   and the cleartext nonce against the replay cache (a dictionary lookup)
2. key hint known                        (a dictionary lookup)
3. AEAD                                  (XChaCha20-Poly1305, constant time)
4. time window                           (tells how far off the client's clock is)
5. (the replay cache was asked in step 1; the AEAD has now authenticated that nonce)
6. Ed25519 signature
7. policy: the key is authorized for the door, not expired, ``from=`` allows
   both the packet's source and the address to open.

The replay cache is keyed by the 192-bit nonce, which the AEAD has
authenticated: only packets that passed steps 1-6 are ever remembered (the
caller remembers them), so junk cannot fill the cache (fwknop's does).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from spa import protocol
from spa.errors import InvalidGrant, PacketRejected
from spa.grant import Address, parse_address
from spa.keytext import AuthorizedKey


@dataclass(frozen=True, slots=True)
class SpaDoor:
    """What the verifier needs to know of one door that accepts SPA."""

    name: str
    keys: tuple[AuthorizedKey, ...]
    #: The door's duration: the default, and the cap on what a client asks for.
    duration: float
    use_source: bool = False


@dataclass(frozen=True, slots=True)
class Client:
    public: bytes
    key_id: str
    pair: protocol.PairKeys


@dataclass(frozen=True, slots=True)
class Accepted:
    """A packet that may open: the grant's parts plus what the replay cache must keep."""

    door: str
    key_id: str
    comment: str
    address: Address
    duration: float
    nonce: bytes
    #: Unix time after which the nonce can be forgotten (the packet is stale by then anyway).
    remember_until: float
    #: Packet time minus server time, seconds.
    skew: float


#: Hints are indexed this far beyond the time window, so that a client whose
#: clock is off by up to this much is told so (with the offset) instead of
#: being indistinguishable from junk. Such packets still fail the time check.
SKEW_REPORT = 900.0


#: What a replayed packet is told (the log line names the reason too).
REPLAYED = "this packet was already used"


class Verifier:
    """Holds the pair keys of every authorized client and the hint index for the current epochs."""

    def __init__(self, server_seed: bytes, doors: Iterable[SpaDoor], window: float):
        self.server_public = protocol.public_of(server_seed)
        self.window = float(window)
        self.doors: dict[str, SpaDoor] = {}
        self.clients: dict[bytes, Client] = {}
        for door in doors:
            self.doors[door.name] = door
            for k in door.keys:
                if k.public not in self.clients:
                    pair = protocol.pair_keys(server_seed, k.public, k.public, self.server_public)
                    self.clients[k.public] = Client(k.public, k.key_id, pair)
        # door -> public -> its authorized_keys entry (options differ per door)
        self._grants: dict[str, dict[bytes, AuthorizedKey]] = {
            d.name: {k.public: k for k in d.keys} for d in self.doors.values()
        }
        self._hints: dict[bytes, tuple[Client, int]] = {}
        self._epochs: tuple[int, int] = (1, 0)  # empty range: built on first use
        self._steady: tuple[float, float] = (0.0, 0.0)  # times during which the index stays as it is
        #: Packets made before this Unix time are refused ("restart"): set when
        #: the machine went down with the daemon running, so that the nonces
        #: of the last packets accepted may not have reached the disk.
        self.not_before = 0.0

    def __len__(self) -> int:
        return len(self.clients)

    def _refresh(self, now: float) -> None:
        if self._steady[0] <= now < self._steady[1]:
            return  # the common case, per packet: no epoch arithmetic
        reach = self.window + SKEW_REPORT
        lo = protocol.epoch_of(max(0, math.floor((now - reach) * 1000)))
        hi = protocol.epoch_of(max(0, math.floor((now + reach) * 1000)))
        # Neither end of the index moves inside this span (a millisecond inside, for rounding); none
        # near time 0, where the low end is clamped.
        e = protocol.HINT_EPOCH
        self._steady = (max(lo * e + reach, hi * e - reach) + 0.001,
                        min((lo + 1) * e + reach, (hi + 1) * e - reach) - 0.001) if now - reach > 0 else (0.0, 0.0)
        if (lo, hi) == self._epochs:
            return
        old_lo, old_hi = self._epochs
        hints = {h: v for h, v in self._hints.items() if lo <= v[1] <= hi}
        for epoch in range(lo, hi + 1):
            if old_lo <= epoch <= old_hi:
                continue  # still indexed
            for c in self.clients.values():
                hints[c.pair.hint(epoch)] = (c, epoch)
        self._hints = hints
        self._epochs = (lo, hi)

    def index(self, now: float) -> tuple[int, int]:
        """The first and last epoch whose hints the index holds at ``now``."""
        self._refresh(now)
        return self._epochs

    def hints_at(self, now: float, span: float | None = None) -> list[bytes]:
        """The hints the index holds at ``now`` (for the kernel's filter).

        ``span``: only those of epochs within ``span`` seconds of ``now``.
        """
        self._refresh(now)
        if span is None:
            return list(self._hints)
        lo = protocol.epoch_of(max(0, math.floor((now - span) * 1000)))
        hi = protocol.epoch_of(max(0, math.floor((now + span) * 1000)))
        return [h for h, (_c, e) in self._hints.items() if lo <= e <= hi]

    def hint_keys(self, now: float) -> dict[bytes, bytes]:
        """Each hint the index holds at ``now``, with its client's AEAD key (for the kernel's SPA screen)."""
        self._refresh(now)
        return {h: c.pair.aead_key for h, (c, _e) in self._hints.items()}

    def key_of_hint(self, hint: bytes) -> str | None:
        """The key id of the client whose hint this is (in the index as it stands), or None."""
        found = self._hints.get(hint)
        return found[0].key_id if found is not None else None

    def screen(self, data: bytes, now: float, seen: Callable[[bytes], bool]) -> str | None:
        """The junk reason (``size``, ``version``, ``replay``, ``unknown-key``) of a datagram, or None: then ``check`` it.

        The first steps of ``check``, in its order, without an exception: for
        the capture loop under a flood of junk or replays. Where ``screen``
        names a reason, ``check`` raises ``PacketRejected`` with that reason.
        """
        if len(data) != protocol.PACKET_SIZE:
            return "size"
        if data[0] != protocol.VERSION:
            return "version"
        if seen(data[1 + protocol.HINT_SIZE:protocol.HEADER_SIZE]):
            return "replay"
        self._refresh(now)
        if data[1:1 + protocol.HINT_SIZE] not in self._hints:
            return "unknown-key"
        return None

    def check(self, data: bytes, source: Address, now: float, seen: Callable[[bytes], bool]) -> Accepted:
        """Decide on one datagram from ``source``; raises ``PacketRejected`` with the reason."""
        header = protocol.open_header(data)
        # The cache holds only nonces of packets that passed every check, so a
        # hit here can never refuse a packet that would have been accepted:
        # a flood of replayed packets is dropped for a dictionary lookup,
        # before any decryption.
        if seen(header.nonce):
            raise PacketRejected("replay", REPLAYED)
        return self.check_screened(data, source, now, header)

    def check_screened(self, data: bytes, source: Address, now: float,
                       header: protocol.Header | None = None) -> Accepted:
        """``check`` for a datagram ``screen`` has passed: size, version and replay are not asked again."""
        if header is None:
            header = protocol.open_header(data)
        self._refresh(now)
        found = self._hints.get(header.hint)
        if found is None:
            raise PacketRejected("unknown-key", "no authorized key matches (junk, another server's packet, or stale)")
        client, epoch = found
        sealed = protocol.open_body(data, header, client.pair, epoch)
        request = sealed.request
        skew = protocol.check_time(request, now, self.window)
        if request.time < self.not_before:
            raise PacketRejected("restart", "made before the server restarted after an unclean stop "
                                 "(its nonce may be lost, so it could be a replay): send a new one")
        # No second replay lookup: the AEAD has just authenticated the very
        # nonce looked up in step 1, and the cache has not changed since.
        protocol.check_signature(sealed, client.public, self.server_public)
        return self._policy(client, request, source, skew, now)

    def _remember_until(self, request: protocol.Request) -> float:
        return request.time + self.window + 1.0

    def _policy(self, client: Client, request: protocol.Request, source: Address, skew: float,
                now: float) -> Accepted:
        door = self.doors.get(request.door)
        entry = self._grants.get(request.door, {}).get(client.public) if door is not None else None
        if door is None or entry is None:
            raise PacketRejected("policy", f"key {client.key_id} is not authorized for door {request.door!r}")
        if entry.expired(now):
            raise PacketRejected("expired", f"key {client.key_id} expired (authorized_keys line {entry.line})")
        try:
            source = parse_address(source)  # an IPv4-mapped source counts as the IPv4 address, for from= too
            address = parse_address(source if door.use_source else request.address)
        except InvalidGrant as exc:
            raise PacketRejected("policy", f"key {client.key_id}: {exc}") from None
        if address.is_loopback or (isinstance(address, ipaddress.IPv4Address) and address.is_reserved):
            raise PacketRejected("policy", f"key {client.key_id}: address {address} cannot be opened for")
        for what, a in (("packet source", source), ("address to open", address)):
            if not entry.allows(a):
                raise PacketRejected("from", f"key {client.key_id}: {what} {a} is outside from= "
                                     f"(authorized_keys line {entry.line})")
        duration = door.duration if request.duration == 0 else min(float(request.duration), door.duration)
        return Accepted(
            door=door.name,
            key_id=client.key_id,
            comment=entry.comment,
            address=address,
            duration=duration,
            nonce=request.nonce,
            remember_until=self._remember_until(request),
            skew=skew,
        )
