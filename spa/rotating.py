"""Rotating knock sequences: the ports come from a shared secret and the clock.

Client and server hold the same secret and the same ``Params``. For each
door and each time window (``counter = floor(t / interval)``) both derive the
same sequence of distinct ports; a sequence someone has observed is useless
once its window (and the one after it, for clock skew) has passed. The
server additionally refuses a (door, key, window) that was already used, so
even within its window a recorded sequence opens nothing for someone else.

The derivation (specified byte for byte in ``docs/rotating.md``)::

    prefix  = F(LABEL) || F(door, UTF-8) || F(counter, 8 bytes BE) || F(source)
    F(x)    = len(x) as 2 bytes BE || x
    source  = b""  |  0x04 || 4 address bytes  |  0x06 || 16 address bytes
    block(purpose, i) = HMAC-SHA256(secret, prefix || purpose (1 byte) || i (4 bytes BE))

Ports are read from the ``0x01`` blocks as 32-bit big-endian words, by
rejection sampling (no modulo bias): a word picks the (word mod usable)-th
port of the range that is not excluded; a repeated port is skipped.
For ``mixed``, knock ``i`` is udp when bit ``i`` (most significant bit
first) of the ``0x02`` block 0 is set.

Pure: no I/O, no clock of its own (times are arguments).
"""

from __future__ import annotations

import hmac
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Literal, NamedTuple, TypeAlias

from spa.errors import InvalidGrant
from spa.grant import Address, PortSpec, check_door_name, parse_address

RotatingProto: TypeAlias = Literal["tcp", "udp", "mixed"]
ROTATING_PROTOS: tuple[RotatingProto, ...] = ("tcp", "udp", "mixed")

#: Domain-separation labels: an HMAC under the shared secret made for one
#: purpose can never be mistaken for one made for another.
LABEL = b"spa-knock/v1 rotating sequence"
KEY_ID_LABEL = b"spa-knock/v1 shared key id"  # not the Ed25519 key id label: one label per derived value
_PURPOSE_PORTS = b"\x01"
_PURPOSE_PROTOS = b"\x02"
_TAG_V4 = b"\x04"
_TAG_V6 = b"\x06"

MIN_INTERVAL = 5
#: A sequence that stays in force longer than a day is hardly rotating.
MAX_INTERVAL = 86400
MIN_LENGTH = 2
#: knockd's SEQ_MAX, as for static sequences.
MAX_LENGTH = 32
#: The range must hold this many usable ports per knock: sampling distinct
#: ports then ends quickly, and a sequence is not trivially guessed.
RANGE_FACTOR = 4
#: Shorter secrets are refused at the boundary; ``spa keygen`` makes 32 bytes.
MIN_SECRET = 16
KEY_ID_BYTES = 8

_WORDS = struct.Struct(">8I")  # one 32-byte HMAC output as eight 32-bit big-endian words
# Bound on the expansion. A word is rejected for bias with probability below
# 2**-16 and as a repeat below 1/RANGE_FACTOR, so needing 256 blocks (2048
# words) for at most 32 ports has probability far below 2**-1000.
_MAX_BLOCKS = 256
_TWO32 = 1 << 32


def _field(data: bytes) -> bytes:
    """Length-prefixed: two fields never run into each other, so no two inputs collide."""
    return len(data).to_bytes(2, "big") + data


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidGrant(f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise InvalidGrant(f"{name} {value} is out of range ({lo}-{hi})")
    return value


@dataclass(frozen=True, slots=True)
class Params:
    """How sequences are derived; client and server must hold the same values (the key file carries them)."""

    #: Seconds a sequence stays in force.
    interval: int = 30
    #: Knocks per sequence.
    length: int = 4
    #: Ports are drawn from lo..hi inclusive.
    lo: int = 10000
    hi: int = 65000
    proto: RotatingProto = "tcp"
    #: Ports never used as knocks (for example the SPA port, or a real service).
    exclude: frozenset[int] = frozenset()
    #: Excluded ports inside lo..hi, ascending (derived; what sampling skips).
    skipped: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, MIN_INTERVAL, MAX_INTERVAL)
        _check_int("sequence length", self.length, MIN_LENGTH, MAX_LENGTH)
        _check_int("lowest port", self.lo, 1, 65535)
        _check_int("highest port", self.hi, 1, 65535)
        if self.lo >= self.hi:
            raise InvalidGrant(f"port range {self.lo}-{self.hi} is empty or reversed (the low port comes first)")
        if self.proto not in ROTATING_PROTOS:
            raise InvalidGrant(f"protocol {self.proto!r} is not tcp, udp or mixed")
        if isinstance(self.exclude, (str, bytes)):
            raise InvalidGrant(f"excluded ports must be a set of port numbers, not {self.exclude!r}")
        exclude = frozenset(_check_int("excluded port", p, 1, 65535) for p in self.exclude)
        object.__setattr__(self, "exclude", exclude)
        object.__setattr__(self, "skipped", tuple(sorted(p for p in exclude if self.lo <= p <= self.hi)))
        need = RANGE_FACTOR * self.length
        if self.usable < need:
            raise InvalidGrant(
                f"port range {self.lo}-{self.hi} leaves {self.usable} usable port(s) for {self.length} knocks; "
                f"it needs at least {need} ({RANGE_FACTOR} per knock): widen the range or shorten the sequence"
            )

    @property
    def usable(self) -> int:
        """Ports in the range that can be knocks (the range minus excluded ports)."""
        return self.hi - self.lo + 1 - len(self.skipped)

    @property
    def bits(self) -> float:
        """Bits of a sequence an observer cannot predict without the secret (every sequence equally likely)."""
        n = self.usable
        bits = sum(math.log2(n - i) for i in range(self.length))
        return bits + (self.length if self.proto == "mixed" else 0)

    @property
    def range_text(self) -> str:
        return f"{self.lo}-{self.hi}"


def parse_range(text: str) -> tuple[int, int]:
    """``10000-65000`` as (10000, 65000); checked again by ``Params``."""
    lo_text, sep, hi_text = text.partition("-")
    lo_text, hi_text = lo_text.strip(), hi_text.strip()
    # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
    if not sep or not (lo_text + hi_text).isascii() or not lo_text.isdigit() or not hi_text.isdigit() \
            or len(lo_text) > 5 or len(hi_text) > 5:
        raise InvalidGrant(f"invalid port range {text!r}: expected LOW-HIGH, for example 10000-65000")
    return int(lo_text), int(hi_text)


def parse_port_list(text: str) -> frozenset[int]:
    """``62201, 22 8080`` as a set of port numbers (commas and/or spaces); empty text is no port."""
    ports = set()
    for item in text.replace(",", " ").split():
        if not item.isascii() or not item.isdigit() or len(item) > 5:
            raise InvalidGrant(f"invalid port {item!r} in {text!r}: expected port numbers")
        ports.add(_check_int("port", int(item), 1, 65535))
    return frozenset(ports)


# --------------------------------------------------------------------------
# Time windows


def counter(t: float, interval: int) -> int:
    """The window holding time ``t`` (Unix seconds): ``floor(t / interval)``."""
    # Floor division is exact for floats too; t / interval could round up
    # across a window boundary.
    return int(t // interval)


def seconds_left(t: float, interval: int) -> float:
    """Seconds from ``t`` until the next window starts (in ``(0, interval]``)."""
    return (counter(t, interval) + 1) * interval - t


def accepted_counters(t: float, interval: int) -> tuple[int, ...]:
    """The windows a server accepts at ``t``: the previous, the current and the next (clock skew either way)."""
    c = counter(t, interval)
    return tuple(x for x in (c - 1, c, c + 1) if x >= 0)


# --------------------------------------------------------------------------
# Derivation


def source_bytes(address: str | Address) -> bytes:
    """The packed address ``derive`` binds to; an IPv4-mapped IPv6 address counts as the IPv4 one."""
    return parse_address(address).packed


def _source_field(source: bytes | None) -> bytes:
    if source is None:
        return _field(b"")
    if len(source) == 4:
        return _field(_TAG_V4 + source)
    if len(source) == 16:
        return _field(_TAG_V6 + source)
    raise ValueError(f"source must be a packed IPv4 (4 bytes) or IPv6 (16 bytes) address, not {len(source)} bytes")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET:
        raise ValueError(f"secret is {len(secret)} bytes; at least {MIN_SECRET} are needed")


@lru_cache(maxsize=4096)
def _spec(port: int, proto: str) -> PortSpec:
    # PortSpec is frozen: sharing instances saves re-validating them on every derivation.
    return PortSpec(port, proto)  # type: ignore[arg-type]


def derive(
    secret: bytes,
    door: str,
    counter: int,
    params: Params,
    source: bytes | None = None,
) -> tuple[PortSpec, ...]:
    """The knock sequence of ``door`` in window ``counter``: ``params.length`` distinct ports, in knock order."""
    _check_secret(secret)
    check_door_name(door)
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter < 1 << 64:
        raise ValueError(f"window counter must be an integer in 0..2**64-1, not {counter!r}")
    prefix = (
        _field(LABEL)
        + _field(door.encode("utf-8"))
        + _field(counter.to_bytes(8, "big"))
        + _source_field(source)
    )
    # The HMAC state after the prefix is computed once and copied per block.
    mac = hmac.new(bytes(secret), prefix, "sha256")
    lo, usable, skipped, length = params.lo, params.usable, params.skipped, params.length
    limit = _TWO32 - _TWO32 % usable  # words at or above it would favour the first ports
    ports: list[int] = []
    for i in range(_MAX_BLOCKS):
        h = mac.copy()
        h.update(_PURPOSE_PORTS + i.to_bytes(4, "big"))
        for word in _WORDS.unpack(h.digest()):
            if word >= limit:
                continue
            # The (word mod usable)-th port of lo..hi, counting only ports not excluded.
            port = lo + word % usable
            for e in skipped:
                if e > port:
                    break
                port += 1
            if port in ports:
                continue
            ports.append(port)
            if len(ports) == length:
                return tuple(map(_spec, ports, _protos(mac, params)))
    # Unreachable in practice (see _MAX_BLOCKS); failing beats looping forever.
    raise ValueError(f"door {door!r}, window {counter}: no sequence within {_MAX_BLOCKS} blocks")


def _protos(mac: hmac.HMAC, params: Params) -> list[str]:
    if params.proto != "mixed":
        return [params.proto] * params.length
    h = mac.copy()
    h.update(_PURPOSE_PROTOS + (0).to_bytes(4, "big"))
    bits = h.digest()
    return ["udp" if (bits[i >> 3] >> (7 - (i & 7))) & 1 else "tcp" for i in range(params.length)]


def key_id(secret: bytes) -> str:
    """A short public name for a secret (16 hex digits); its own label, so it reveals nothing of any sequence."""
    _check_secret(secret)
    return hmac.digest(bytes(secret), _field(KEY_ID_LABEL), "sha256")[:KEY_ID_BYTES].hex()


class Candidate(NamedTuple):
    """One sequence the server accepts at a moment: which secret, which window."""

    sequence: tuple[PortSpec, ...]
    #: Index into the secrets given to ``candidates``.
    key: int
    counter: int


def candidates(
    secrets: Iterable[bytes],
    door: str,
    t: float,
    params: Params,
    source: bytes | None = None,
) -> tuple[Candidate, ...]:
    """Every sequence that opens ``door`` at ``t``: each secret still valid, windows -1, 0 and +1.

    The caller passes only the secrets valid at ``t`` (``SharedKey.valid_at``)
    and must refuse a (door, key, counter) already used: a sequence seen on
    the wire is then worthless even inside its own window.
    """
    windows = accepted_counters(t, params.interval)
    return tuple(
        Candidate(derive(secret, door, c, params, source), k, c)
        for k, secret in enumerate(secrets)
        for c in windows
    )


def parse_time(text: str) -> float:
    """Unix seconds (``1732780800`` or ``1732780800.5``) or ISO 8601; an ISO time without a zone is UTC."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise InvalidGrant(f"invalid time {text!r}: Unix seconds must be a finite number, 0 or more")
        return value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidGrant(
            f"invalid time {text!r}: expected Unix seconds or ISO 8601 (2024-11-28T09:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def format_time(t: float) -> str:
    """``t`` as ISO 8601 UTC to the second, for example ``2024-11-28T09:00:00Z``."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
