"""Text forms of SPA keys: private key files, .pub lines, authorized_keys, known_servers.

Pure: text in, typed values out, every problem a ``KeyFileError`` naming the
file and line. Reading the files (and their permissions) is ``spa.keys``'s job.

Formats (docs/protocol.md, "Key files"):

* private key: ``key = value`` lines (``type = spa-ed25519-private``,
  ``role = client|server``, ``seed = <base64 32 bytes>``, ``comment = ...``);
* public key: one line ``spa-ed25519 <base64 32 bytes> [comment]``;
* authorized_keys: public key lines, optionally preceded by options
  ``expires=DATE`` and ``from=CIDR[,CIDR...]``; ``#`` comments;
* known_servers: ``HOST[,HOST...] spa-ed25519 <base64> [comment]``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Union

from spa.errors import KeyFileError
from spa.grant import Address

#: Domain-separation label of the key id (docs/protocol.md).
LABEL_KEY_ID = b"spa-knock/v1 key id"

PUBLIC_TYPE = "spa-ed25519"


def key_id(public: bytes) -> str:
    """A key's short name in logs and files: 16 hex digits derived from its Ed25519 public key.

    Here rather than in ``spa.protocol`` so that reading key files never
    loads the crypto libraries (the client's start-up time).
    """
    if not isinstance(public, (bytes, bytearray)) or len(public) != 32:
        raise ValueError("public key must be 32 bytes")
    return hashlib.sha256(LABEL_KEY_ID + bytes(public)).hexdigest()[:16]
PRIVATE_TYPE = "spa-ed25519-private"
ROLES = ("client", "server")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _b64_32(text: str, what: str, path: str | None, line: int | None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what} is not valid base64", path, line) from None
    if len(raw) != 32:
        raise KeyFileError(f"{what} must be 32 bytes, not {len(raw)}", path, line)
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _content(text: str):
    # Lines end at '\n' only (as in the config parser), so line numbers match an editor's.
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


# --------------------------------------------------------------------------
# Private keys


@dataclass(frozen=True, slots=True)
class PrivateKey:
    seed: bytes
    role: str
    comment: str = ""

    def __repr__(self) -> str:  # never print the seed by accident
        return f"PrivateKey(role={self.role!r}, comment={self.comment!r})"


def format_private(key: PrivateKey) -> str:
    return (
        f"# spa {key.role} private key: keep it secret (mode 0600). Its public half is in the .pub file.\n"
        f"type = {PRIVATE_TYPE}\n"
        f"role = {key.role}\n"
        f"comment = {key.comment}\n"
        f"seed = {_b64(key.seed)}\n"
    )


def file_type(text: str) -> str | None:
    """The ``type = ...`` of a key file (private or shared), or None."""
    for _, line in _content(text):
        name, sep, value = line.partition("=")
        if sep and name.strip().lower() == "type":
            return value.strip()
    return None


def parse_private(text: str, path: str | None = None) -> PrivateKey:
    values: dict[str, tuple[str, int]] = {}
    for number, line in _content(text):
        name, sep, value = line.partition("=")
        name = name.strip().lower()
        if not sep:
            raise KeyFileError(f"line has no '=': {line!r}", path, number)
        if name not in ("type", "role", "seed", "comment"):
            raise KeyFileError(f"unknown key {name!r} in a private key file", path, number)
        if name in values:
            raise KeyFileError(f"{name!r} is given twice", path, number)
        values[name] = (value.strip(), number)
    kind = values.get("type", ("", None))
    if kind[0] != PRIVATE_TYPE:
        raise KeyFileError(f"not an spa private key file (type {kind[0] or 'missing'}, expected {PRIVATE_TYPE})",
                           path, kind[1])
    role, role_line = values.get("role", ("client", None))
    if role not in ROLES:
        raise KeyFileError(f"role must be client or server, not {role!r}", path, role_line)
    if "seed" not in values:
        raise KeyFileError("the key itself ('seed = ...') is missing", path)
    seed = _b64_32(values["seed"][0], "seed", path, values["seed"][1])
    return PrivateKey(seed, role, values.get("comment", ("", 0))[0])


# --------------------------------------------------------------------------
# Public keys


@dataclass(frozen=True, slots=True)
class PublicKey:
    public: bytes
    comment: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.public)


def format_public(key: PublicKey) -> str:
    return f"{PUBLIC_TYPE} {_b64(key.public)} {key.comment}".rstrip() + "\n"


def _public_tokens(tokens: list[str], path: str | None, line: int | None) -> PublicKey:
    if len(tokens) < 2 or tokens[0] != PUBLIC_TYPE:
        raise KeyFileError(f"expected '{PUBLIC_TYPE} <base64 key> [comment]'", path, line)
    return PublicKey(_b64_32(tokens[1], "public key", path, line), " ".join(tokens[2:]))


def parse_public(text: str, path: str | None = None) -> PublicKey:
    """A .pub file: exactly one key line."""
    lines = list(_content(text))
    if len(lines) != 1:
        raise KeyFileError(f"a public key file holds one key line, this one has {len(lines)}", path)
    number, line = lines[0]
    return _public_tokens(line.split(), path, number)


# --------------------------------------------------------------------------
# authorized_keys


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    public: bytes
    comment: str
    line: int
    #: Unix time from which the key is refused; None: never.
    expires: float | None = None
    #: When not empty, both the packet's source and the address to open must be inside one of these.
    sources: tuple[Network, ...] = ()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def allows(self, address: Address) -> bool:
        if not self.sources:
            return True
        bare = ipaddress.ip_address(address.packed)  # drop an IPv6 zone
        return any(bare in net for net in self.sources)


def parse_date(text: str) -> float:
    """``YYYY-MM-DD`` (00:00 UTC that day) or ISO 8601 date and time (UTC when no offset); Unix seconds."""
    try:
        if len(text) == 10:
            d = dt.date.fromisoformat(text)
            stamp = dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc)
        else:
            stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][Z|+HH:MM])") from None
    return stamp.timestamp()


def _option(token: str, path: str, number: int) -> tuple[str, object]:
    name, sep, value = token.partition("=")
    name = name.lower()
    if not sep or not value:
        raise KeyFileError(f"option {token!r} has no value (expires=DATE, from=CIDR[,CIDR...])", path, number)
    if name == "expires":
        try:
            return name, parse_date(value)
        except ValueError as exc:
            raise KeyFileError(f"expires: {exc}", path, number) from None
    if name == "from":
        nets = []
        for item in value.split(","):
            try:
                nets.append(ipaddress.ip_network(item.strip(), strict=True))
            except ValueError as exc:
                raise KeyFileError(f"from: {item.strip()!r} is not an address or network ({exc})", path, number) from None
        return name, tuple(nets)
    # An unknown option is an error, not ignored: a typo must not widen access.
    raise KeyFileError(f"unknown option {name!r} (expires=DATE, from=CIDR[,CIDR...])", path, number)


def parse_authorized_keys(text: str, path: str) -> list[AuthorizedKey]:
    """Every key of an authorized_keys file, in order; a key listed twice is an error."""
    keys: list[AuthorizedKey] = []
    seen: dict[bytes, int] = {}
    for number, line in _content(text):
        tokens = line.split()
        try:
            at = tokens.index(PUBLIC_TYPE)
        except ValueError:
            raise KeyFileError(f"no '{PUBLIC_TYPE}' key on this line", path, number) from None
        options: dict[str, object] = {}
        for token in tokens[:at]:
            name, value = _option(token, path, number)
            if name in options:
                raise KeyFileError(f"option {name!r} is given twice", path, number)
            options[name] = value
        pub = _public_tokens(tokens[at:], path, number)
        if pub.public in seen:
            raise KeyFileError(f"key {pub.key_id} is already listed at line {seen[pub.public]}", path, number)
        seen[pub.public] = number
        keys.append(AuthorizedKey(pub.public, pub.comment, number, options.get("expires"),  # type: ignore[arg-type]
                                  options.get("from", ())))  # type: ignore[arg-type]
    return keys


# --------------------------------------------------------------------------
# known_servers


@dataclass(frozen=True, slots=True)
class KnownServer:
    hosts: tuple[str, ...]
    key: PublicKey
    line: int


def format_known_server(host: str, key: PublicKey) -> str:
    return f"{host} {format_public(key)}"


def parse_known_servers(text: str, path: str) -> list[KnownServer]:
    out = []
    for number, line in _content(text):
        tokens = line.split()
        if len(tokens) < 3:
            raise KeyFileError(f"expected 'HOST {PUBLIC_TYPE} <base64 key> [comment]'", path, number)
        hosts = tuple(h.lower() for h in tokens[0].split(",") if h)
        out.append(KnownServer(hosts, _public_tokens(tokens[1:], path, number), number))
    return out


def find_known_server(servers: list[KnownServer], host: str) -> KnownServer | None:
    """The last entry naming ``host`` (case-insensitive): a later ``spa trust`` wins."""
    host = host.lower()
    found = None
    for s in servers:
        if host in s.hosts:
            found = s
    return found
