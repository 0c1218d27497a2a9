"""Shared-key files for rotating knock sequences: secrets, versions and grace periods.

One file holds everything client and server must agree on: the derivation
parameters and the secrets. It is plain text, ``key = value`` lines and
``#`` comments::

    version = 1
    interval = 30
    length = 4
    ports = 10000-65000
    proto = tcp
    exclude = 62201
    secret = 158fb7710b5f0ac1 qVbf89h/Mj12vSGloFM8mis1ENEqURGzgRR1GBHG7F8= created=2024-11-21T08:00:00Z until=2024-11-28T08:00:00Z
    secret = e7a758c3b2bd01f5 V9/n6JmxJTXEbgMEds7xo9Gi1Vdccjrq2g+yEdte6nw= created=2024-11-21T08:00:00Z

Secrets are listed oldest first. The last one is the current secret: the
client knocks with it. An older secret carries ``until``: the server still
accepts it up to that moment, so a client holding the previous file is not
locked out while the new one is handed round (``docs/rotating.md``).

The file must be mode 0600 (``spa.keys.secure``); every malformed line is a
``KeyFileError`` naming ``path:line``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace

from spa.config import DEFAULT_SPA_PORT
from spa.errors import InvalidGrant, KeyFileError
from spa.keys.secure import read_private, write_atomic
from spa.rotating import (
    KEY_ID_BYTES,
    MAX_INTERVAL,
    MAX_LENGTH,
    MIN_INTERVAL,
    MIN_LENGTH,
    MIN_SECRET,
    ROTATING_PROTOS,
    Params,
    format_time,
    key_id,
    parse_port_list,
    parse_range,
    parse_time,
)

log = logging.getLogger("spa.keys")

FORMAT_VERSION = 1
SECRET_BYTES = 32
MAX_SECRET = 64
DEFAULT_GRACE = 7 * 24 * 3600.0
#: Longer than a year is a forgotten old secret, not a grace period.
MAX_GRACE = 366 * 24 * 3600.0
#: The default SPA port is never a knock: a rotating knock must not look like an SPA packet.
DEFAULT_EXCLUDE = frozenset({DEFAULT_SPA_PORT})

_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{2 * KEY_ID_BYTES}}}")
_LINE_RE = re.compile(r"([A-Za-z_]+)\s*=\s*(.*)")
_PARAM_KEYS = ("version", "interval", "length", "ports", "proto", "exclude")
_REQUIRED = ("version", "interval", "length", "ports", "proto")


@dataclass(frozen=True, slots=True)
class Secret:
    """One version of the shared secret."""

    key_id: str
    secret: bytes = field(repr=False)  # never in a log line or a traceback
    #: Unix time it was made.
    created: float
    #: Unix time the server stops accepting it; ``None`` for the current secret.
    until: float | None = None

    def valid_at(self, t: float) -> bool:
        return self.until is None or t < self.until


@dataclass(frozen=True, slots=True)
class SharedKey:
    """A shared-key file's content: the parameters and the secrets, oldest first."""

    params: Params
    secrets: tuple[Secret, ...]

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ValueError("a shared key needs at least one secret")

    @property
    def newest(self) -> Secret:
        """The current secret: the one a client knocks with."""
        return self.secrets[-1]

    def valid_at(self, t: float) -> tuple[Secret, ...]:
        """The secrets a server accepts at ``t``: the current one and those whose ``until`` is still ahead."""
        return tuple(s for s in self.secrets if s.valid_at(t))


def new_secret(now: float) -> Secret:
    value = os.urandom(SECRET_BYTES)
    return Secret(key_id(value), value, float(math.floor(now)))


def generate(params: Params, now: float | None = None) -> SharedKey:
    """A new shared key with one fresh secret."""
    return SharedKey(params, (new_secret(time.time() if now is None else now),))


# --------------------------------------------------------------------------
# Text


def format_key(key: SharedKey) -> str:
    """The file's text (pure)."""
    p = key.params
    lines = [
        "# spa shared key for rotating knock sequences. Keep it secret: mode 0600.",
        "# The client and the server need this same file; rotate it with 'spa keygen --rotate PATH'.",
        f"version = {FORMAT_VERSION}",
        f"interval = {p.interval}",
        f"length = {p.length}",
        f"ports = {p.range_text}",
        f"proto = {p.proto}",
        f"exclude = {','.join(str(x) for x in sorted(p.exclude))}",
        "# One line per secret, oldest first: key id, secret (base64), created, until (older secrets only).",
        "# The last secret is the current one.",
    ]
    for s in key.secrets:
        line = f"secret = {s.key_id} {base64.b64encode(s.secret).decode('ascii')} created={format_time(s.created)}"
        if s.until is not None:
            line += f" until={format_time(s.until)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _int(text: str, what: str, path: str, number: int) -> int:
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
    if not (text.isascii() and text.isdigit()):
        raise KeyFileError(f"'{what}' must be a whole number, not {text!r}", path, number)
    significant = text.lstrip("0")  # int() refuses more than 4300 digits, leading zeros included
    if len(significant) > 9:  # more than any value here
        raise KeyFileError(f"'{what}' {text[:12]}... is out of range", path, number)
    return int(significant or "0")


def _secret(value: str, path: str, number: int) -> Secret:
    tokens = value.split()
    if len(tokens) < 3:
        raise KeyFileError("a secret line needs: KEY_ID BASE64 created=TIME [until=TIME]", path, number)
    kid, b64, attrs = tokens[0], tokens[1], tokens[2:]
    if not _KEY_ID_RE.fullmatch(kid):
        raise KeyFileError(f"key id {kid!r} is not {2 * KEY_ID_BYTES} lower-case hex digits", path, number)
    try:
        secret = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError("the secret is not valid base64", path, number) from None
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise KeyFileError(f"the secret is {len(secret)} bytes (expected {MIN_SECRET} to {MAX_SECRET})", path, number)
    if key_id(secret) != kid:
        # A mistyped or truncated line: refusing it beats knocking with a secret the other side lacks.
        raise KeyFileError(f"key id {kid} does not match its secret (the line was altered)", path, number)
    times: dict[str, float] = {}
    for attr in attrs:
        name, sep, text = attr.partition("=")
        if not sep or name not in ("created", "until"):
            raise KeyFileError(f"unknown item {attr!r} on a secret line (created=TIME, until=TIME)", path, number)
        if name in times:
            raise KeyFileError(f"'{name}' is given twice", path, number)
        try:
            times[name] = parse_time(text)
        except (ValueError, OverflowError) as exc:
            raise KeyFileError(f"'{name}': {exc}", path, number) from None
    if "created" not in times:
        raise KeyFileError("a secret line needs created=TIME", path, number)
    return Secret(kid, secret, times["created"], times.get("until"))


def parse_key(text: str, path: str) -> SharedKey:
    """A shared-key file's text (pure); ``path`` only names the file in errors."""
    values: dict[str, tuple[str, int]] = {}
    secrets: list[tuple[Secret, int]] = []
    if text.startswith("\ufeff"):
        text = text[1:]
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r").strip()
        if not line or line.startswith("#"):
            continue
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in line):
            raise KeyFileError("control character in line", path, number)
        m = _LINE_RE.fullmatch(line)
        if m is None:
            raise KeyFileError(f"expected 'key = value', not {line[:40]!r}", path, number)
        name, value = m.group(1).lower(), m.group(2).strip()
        if name == "secret":
            secret = _secret(value, path, number)
            for other, other_line in secrets:
                if other.key_id == secret.key_id:
                    raise KeyFileError(f"secret {secret.key_id} is listed twice (first at line {other_line})",
                                       path, number)
            secrets.append((secret, number))
        elif name in _PARAM_KEYS:
            if name in values:
                raise KeyFileError(f"'{name}' is set again (first at line {values[name][1]})", path, number)
            values[name] = (value, number)
        else:
            raise KeyFileError(f"unknown key {name!r} ({', '.join(_PARAM_KEYS)} or secret)", path, number)

    for name in _REQUIRED:
        if name not in values:
            raise KeyFileError(f"no '{name}' line: not a complete shared-key file", path)
    if not secrets:
        raise KeyFileError("no 'secret' line: not a complete shared-key file", path)

    version, number = values["version"]
    if _int(version, "version", path, number) != FORMAT_VERSION:
        raise KeyFileError(f"key file version {version} is not supported (this program reads {FORMAT_VERSION})",
                           path, number)
    interval = _int(values["interval"][0], "interval", path, values["interval"][1])
    length = _int(values["length"][0], "length", path, values["length"][1])
    ports, ports_line = values["ports"]
    proto, proto_line = values["proto"][0].lower(), values["proto"][1]
    if proto not in ROTATING_PROTOS:
        raise KeyFileError(f"'proto' must be tcp, udp or mixed, not {proto!r}", path, proto_line)
    exclude_text, exclude_line = values.get("exclude", ("", 0))
    try:
        lo, hi = parse_range(ports)
    except ValueError as exc:  # InvalidGrant, or int()'s own ValueError ('²' passes isdigit(); 4300+ digits)
        raise KeyFileError(f"invalid port range {ports[:40]!r}: {exc}" if type(exc) is ValueError else str(exc),
                           path, ports_line) from None
    try:
        exclude = parse_port_list(exclude_text)
    except ValueError as exc:
        raise KeyFileError(f"'exclude': {exc}", path, exclude_line) from None
    for name, value, lo_bound, hi_bound in (
        ("interval", interval, MIN_INTERVAL, MAX_INTERVAL),
        ("length", length, MIN_LENGTH, MAX_LENGTH),
    ):
        if not lo_bound <= value <= hi_bound:
            raise KeyFileError(f"'{name}' {value} is out of range ({lo_bound}-{hi_bound})", path, values[name][1])
    try:
        params = Params(interval, length, lo, hi, proto, exclude)  # type: ignore[arg-type]
    except InvalidGrant as exc:
        # What is left is the range: out of bounds, reversed, or too small for the knocks.
        raise KeyFileError(str(exc), path, ports_line) from None

    # The last secret is the current one; every older one must say when it ends.
    for i, (secret, number) in enumerate(secrets):
        last = i == len(secrets) - 1
        if last and secret.until is not None:
            raise KeyFileError(
                f"the last secret ({secret.key_id}) is the current one and cannot have an 'until'", path, number
            )
        if not last and secret.until is None:
            raise KeyFileError(
                f"secret {secret.key_id} is not the last one, so it needs until=TIME (when its grace ends)",
                path,
                number,
            )
    return SharedKey(params, tuple(s for s, _ in secrets))


# --------------------------------------------------------------------------
# Files


def load(path: str) -> SharedKey:
    """Read a shared-key file; refused unless only its owner can read it."""
    return parse_key(read_private(path), path)


def write(path: str, key: SharedKey, force: bool = False) -> None:
    """Write ``key`` to ``path``, mode 0600, atomically; an existing file only with ``force``."""
    write_atomic(path, format_key(key), 0o600, force=force)


def rotate(path: str, grace_seconds: float, now: float | None = None) -> SharedKey:
    """Add a new current secret; the previous one stays valid for ``grace_seconds``.

    Secrets whose grace has already ended are dropped. The file is replaced
    atomically: a reader sees either the old content or the new, never a mix.
    """
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float)) \
            or not math.isfinite(grace_seconds) or not 0 < grace_seconds <= MAX_GRACE:
        raise InvalidGrant(f"grace of {grace_seconds!r} s is out of range (0 < grace <= {MAX_GRACE:.0f} s)")
    now = time.time() if now is None else now
    key = load(path)
    kept = [s for s in key.secrets[:-1] if s.valid_at(now)]
    dropped = [s.key_id for s in key.secrets[:-1] if not s.valid_at(now)]
    # Rounded up: the grace given is the least the previous secret gets.
    previous = replace(key.newest, until=float(math.ceil(now + grace_seconds)))
    rotated = SharedKey(key.params, (*kept, previous, new_secret(now)))
    write(path, rotated, force=True)
    if dropped:
        log.info("%s: dropped secret(s) past their grace: %s", path, ", ".join(dropped))
    log.info("%s: new secret %s; %s valid until %s", path, rotated.newest.key_id, previous.key_id,
             format_time(previous.until or 0))
    return rotated
