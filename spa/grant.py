"""The grant: what every way in hands to the grant module.

A grant says: open these ports, for this address, on behalf of this door,
for this long. Everything here is pure: parsing, validation and the policy
for granting the same door twice. The firewall I/O lives in
``spa.server.firewall`` and the scheduling in ``spa.server.grants``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias
from urllib.parse import quote, unquote

from spa.errors import InvalidGrant

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Proto: TypeAlias = Literal["tcp", "udp"]

PROTOCOLS: tuple[Proto, ...] = ("tcp", "udp")
# knockd limits door names to 127 bytes; we keep the same bound so every
# knockd.conf door name fits, and labels stay inside nft's 128-byte comments.
MAX_DOOR_NAME = 127
# A grant longer than a year is a configuration mistake, not a door.
MAX_DURATION = 366 * 24 * 3600.0

_PORT_RE = re.compile(r"^\s*(\d{1,5})\s*(?:[/:]\s*([A-Za-z]+)\s*)?$")


@dataclass(frozen=True, slots=True, order=True)
class PortSpec:
    """One port and its transport protocol."""

    port: int
    proto: Proto = "tcp"

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InvalidGrant(f"port must be an integer, not {self.port!r}")
        if not 1 <= self.port <= 65535:
            raise InvalidGrant(f"port {self.port} is out of range (1-65535)")
        if self.proto not in PROTOCOLS:
            raise InvalidGrant(f"protocol {self.proto!r} is not tcp or udp")

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        """Parse ``22``, ``22/tcp`` or ``22:udp`` (protocol defaults to tcp)."""
        m = _PORT_RE.match(text)
        if not m:
            raise InvalidGrant(f"invalid port {text!r}: expected PORT[/tcp|/udp]")
        proto = (m.group(2) or "tcp").lower()
        if proto not in PROTOCOLS:
            raise InvalidGrant(f"invalid protocol {m.group(2)!r} in {text!r}: expected tcp or udp")
        return cls(int(m.group(1)), proto)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


def parse_ports(text: str) -> tuple[PortSpec, ...]:
    """Parse a list such as ``22/tcp, 443/tcp`` (commas and/or spaces)."""
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not items:
        raise InvalidGrant("empty port list")
    return normalize_ports(PortSpec.parse(t) for t in items)


def normalize_ports(ports) -> tuple[PortSpec, ...]:
    """Sorted and without repeats: one rule per port, never two."""
    return tuple(sorted(set(ports)))


def parse_address(text: str | Address) -> Address:
    """An IPv4 or IPv6 address; an IPv6 zone (``%eth0``) is dropped, as firewalls match without it."""
    if isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr: Address = text
    else:
        raw = text.strip()
        try:
            addr = ipaddress.ip_address(raw.split("%", 1)[0])
        except ValueError:
            raise InvalidGrant(f"invalid address {text!r}: expected an IPv4 or IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # A v4-mapped source is an IPv4 client seen through a dual-stack socket.
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_multicast:
        raise InvalidGrant(f"address {addr} cannot be granted (unspecified or multicast)")
    return addr


def check_door_name(name: str) -> str:
    if not name or not name.strip():
        raise InvalidGrant("door name is empty")
    if len(name.encode()) > MAX_DOOR_NAME:
        raise InvalidGrant(f"door name {name[:20]!r}... is longer than {MAX_DOOR_NAME} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidGrant(f"door name {name!r} contains control characters")
    return name


def check_duration(seconds: float) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise InvalidGrant(f"duration must be a number of seconds, not {seconds!r}")
    if not 0 < seconds <= MAX_DURATION:
        raise InvalidGrant(f"duration {seconds} s is out of range (0 < duration <= {MAX_DURATION:.0f} s)")
    return float(seconds)


@dataclass(frozen=True, slots=True)
class CommandAction:
    """knockd's start/stop commands for a door (shell text, ``%IP%`` substituted).

    The ``_6`` variants fall back to the plain ones, as in knockd. Kept with the
    grant (and journaled with it) so that the stop command that runs after a
    restart is the one that matches the start command that ran.
    """

    start: str | None = None
    stop: str | None = None
    start6: str | None = None
    stop6: str | None = None

    def commands_for(self, address: Address) -> tuple[str | None, str | None]:
        """The (start, stop) shell texts for this address, ``%IP%`` substituted."""
        if address.version == 6:
            start = self.start6 if self.start6 is not None else self.start
            stop = self.stop6 if self.stop6 is not None else self.stop
        else:
            start, stop = self.start, self.stop
        # knockd treats an empty command as no command.
        start = start or None
        stop = stop or None
        ip = str(address)
        return (
            start.replace("%IP%", ip) if start else None,
            stop.replace("%IP%", ip) if stop else None,
        )

    def to_dict(self) -> dict[str, str | None]:
        return {"start": self.start, "stop": self.stop, "start6": self.start6, "stop6": self.stop6}

    @classmethod
    def from_dict(cls, d: dict) -> CommandAction:
        return cls(d.get("start"), d.get("stop"), d.get("start6"), d.get("stop6"))


@dataclass(frozen=True, slots=True)
class Grant:
    """A request: open ``ports`` (or run ``commands``) for ``address``, for ``duration`` seconds."""

    door: str
    address: Address
    ports: tuple[PortSpec, ...]
    duration: float
    commands: CommandAction | None = None
    #: How it was earned, for the log: "knock", "SPA key 1a2b... (alice)", "rotating key ..., window N", "by hand".
    via: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        check_door_name(self.door)
        object.__setattr__(self, "address", parse_address(self.address))
        object.__setattr__(self, "ports", normalize_ports(self.ports))
        check_duration(self.duration)
        if not self.ports and self.commands is None:
            raise InvalidGrant(f"door {self.door!r}: a grant must open at least one port or run a command")

    @classmethod
    def create(
        cls,
        door: str,
        address: str | Address,
        ports: str | tuple[PortSpec, ...] | list[PortSpec],
        duration: float,
        commands: CommandAction | None = None,
        via: str = "",
    ) -> Grant:
        """Build a grant from text or values, validating every field."""
        if isinstance(ports, str):
            ports = parse_ports(ports)
        return cls(door, parse_address(address), tuple(ports), duration, commands, via)

    @property
    def key(self) -> tuple[str, Address]:
        return (self.door, self.address)


@dataclass(frozen=True, slots=True)
class ActiveGrant:
    """A grant as held: by the firewall, the journal, or both. ``deadline`` is Unix time."""

    door: str
    address: Address
    ports: tuple[PortSpec, ...]
    deadline: float
    commands: CommandAction | None = None
    # Backend-specific bookkeeping (for example the iptables rule texts); not compared.
    detail: tuple = field(default=(), compare=False)

    @property
    def key(self) -> tuple[str, Address]:
        return (self.door, self.address)

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    @classmethod
    def start(cls, grant: Grant, now: float) -> ActiveGrant:
        return cls(grant.door, grant.address, grant.ports, now + grant.duration, grant.commands)


def regrant(current: ActiveGrant | None, grant: Grant, now: float) -> ActiveGrant:
    """The grant to hold after ``grant`` arrives while ``current`` is held for the same door and address.

    Granting again never shortens what is open and never stacks a second
    rule: the deadline becomes the later of the two, the ports those of the
    newest grant (a reload may have changed the door), the commands those
    that ran at the start.
    """
    fresh = ActiveGrant.start(grant, now)
    if current is None or current.key != grant.key:
        return fresh
    # Commands stay those of the start that ran: the stop must undo exactly it,
    # even if a reload changed the door's commands meanwhile.
    commands = current.commands if current.commands is not None else fresh.commands
    return replace(fresh, deadline=max(current.deadline, fresh.deadline), commands=commands)


def encode_label(door: str) -> str:
    """The door name as a firewall comment: ASCII letters, digits and ``_.-~`` kept, the rest %-escaped.

    Comments go through iptables-restore lines and nft JSON; escaping keeps
    quotes, spaces and newlines out of both.
    """
    return quote(door, safe="")


def decode_label(label: str) -> str:
    return unquote(label)
