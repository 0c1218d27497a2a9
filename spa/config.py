"""knockd.conf, read as knockd 0.8 reads it, minus its traps.

An unmodified ``/etc/knockd.conf`` parses here. Where knockd silently reads
something other than what was written (``abc`` as port 0, ``syn, ack`` as a
fatal error, ``[Options]`` as a door, ...) this parser either accepts the
evident meaning or reports the line; every such difference is listed in
``docs/knockd-compat.md``.

Everything here is pure: ``parse_config`` takes text. ``load_config`` only
reads the file and hands its text over. Every problem in a file is collected
and raised together as one ``ConfigInvalid`` whose lines read
``path:line: message``; oddities that are accepted become ``Config.warnings``
in the same form.
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from spa.errors import ConfigError, ConfigInvalid, InvalidGrant
from spa.grant import (
    MAX_DURATION,
    Address,
    PortSpec,
    check_door_name,
    normalize_ports,
    parse_address,
)
from spa.knock import FLAG_BITS, TcpFlags

#: knockd's SEQ_MAX: a knock sequence has at most this many entries.
MAX_SEQUENCE = 32
#: Linux IFNAMSIZ less the terminating NUL.
MAX_INTERFACE_NAME = 15
BACKENDS = ("auto", "nft", "iptables")

DEFAULT_SEQ_TIMEOUT = 25.0
DEFAULT_CMD_TIMEOUT = 10.0
DEFAULT_SPA_PORT = 62201
DEFAULT_SPA_WINDOW = 60.0
#: A wider window keeps more replay-cache entries and helps a recorded packet live longer.
MAX_SPA_WINDOW = 3600.0


@dataclass(frozen=True, slots=True)
class Door:
    """One ``[name]`` section: a knock sequence and what a completed knock does."""

    name: str
    #: Line of the ``[section]`` header.
    line: int
    #: In order, repeats kept; empty when ``one_time_sequences`` is used.
    sequence: tuple[PortSpec, ...]
    seq_timeout: float = DEFAULT_SEQ_TIMEOUT
    tcpflags: TcpFlags | None = None
    start_command: str | None = None
    #: ``None`` falls back to ``start_command``; ``""`` means no command for IPv6.
    start_command_6: str | None = None
    stop_command: str | None = None
    stop_command_6: str | None = None
    cmd_timeout: float = DEFAULT_CMD_TIMEOUT
    #: The file's path as written.
    one_time_sequences: str | None = None
    target: Address | None = None
    #: Ports opened natively by the firewall backend (no shell); sorted, no repeats.
    open: tuple[PortSpec, ...] = ()
    #: SPA: the file of client public keys this door accepts (path as written).
    authorized_keys: str | None = None
    #: SPA: grant the packet's source address instead of the address signed
    #: inside the packet (for clients behind NAT; see docs/protocol.md).
    spa_use_source: bool = False
    #: Rotating sequences: shared-key files (paths as written).
    rotating_key: tuple[str, ...] = ()
    #: Rotating sequences: mix the knocking address into the derivation.
    rotating_bind_source: bool = False

    @property
    def triggers(self) -> tuple[str, ...]:
        """What can open this door: ``sequence``, ``spa``, ``rotating`` (in that order)."""
        out = []
        if self.sequence or self.one_time_sequences is not None:
            out.append("sequence")
        if self.authorized_keys is not None:
            out.append("spa")
        if self.rotating_key:
            out.append("rotating")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Options:
    """The ``[options]`` section."""

    use_syslog: bool = False
    logfile: str | None = None
    pidfile: str | None = None
    interfaces: tuple[str, ...] = ()
    backend: str | None = None
    state_dir: str | None = None
    #: SPA: the server's private key file.
    server_key: str | None = None
    #: SPA: the UDP port sniffed for SPA packets (never listened on).
    spa_port: int = DEFAULT_SPA_PORT
    #: SPA: how far a packet's timestamp may be from the server's clock, either way.
    spa_window: float = DEFAULT_SPA_WINDOW


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    options: Options
    doors: tuple[Door, ...]
    #: ``path:line: message`` for each accepted oddity.
    warnings: tuple[str, ...] = ()

    def resolve(self, path: str) -> str:
        """A path named in the file (key files, one-time sequences): relative ones are taken from the file's folder."""
        return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(self.path)), path)


# --------------------------------------------------------------------------
# Keys: upper-case spelling -> (canonical name, section, value kind).

_DOOR, _OPTIONS = "door", "options"

_KEYS: dict[str, tuple[str, str, str]] = {
    "SEQUENCE": ("Sequence", _DOOR, "sequence"),
    "ONE_TIME_SEQUENCES": ("One_Time_Sequences", _DOOR, "path"),
    "SEQ_TIMEOUT": ("Seq_Timeout", _DOOR, "seconds"),
    "TIMEOUT": ("Seq_Timeout", _DOOR, "seconds"),
    "TCPFLAGS": ("TCPFlags", _DOOR, "tcpflags"),
    "START_COMMAND": ("Start_Command", _DOOR, "command"),
    "COMMAND": ("Start_Command", _DOOR, "command"),
    "START_COMMAND_6": ("Start_Command_6", _DOOR, "command"),
    "COMMAND_6": ("Start_Command_6", _DOOR, "command"),
    "STOP_COMMAND": ("Stop_Command", _DOOR, "command"),
    "STOP_COMMAND_6": ("Stop_Command_6", _DOOR, "command"),
    "CMD_TIMEOUT": ("Cmd_Timeout", _DOOR, "seconds"),
    "TARGET": ("Target", _DOOR, "address"),
    "OPEN": ("Open", _DOOR, "ports"),
    "AUTHORIZED_KEYS": ("Authorized_Keys", _DOOR, "path"),
    "SPA_USE_SOURCE": ("SPA_Use_Source", _DOOR, "bool"),
    "ROTATING_KEY": ("Rotating_Key", _DOOR, "paths"),
    "ROTATING_BIND_SOURCE": ("Rotating_Bind_Source", _DOOR, "bool"),
    "USESYSLOG": ("UseSyslog", _OPTIONS, "bool"),
    "LOGFILE": ("LogFile", _OPTIONS, "path"),
    "PIDFILE": ("PidFile", _OPTIONS, "path"),
    "INTERFACE": ("Interface", _OPTIONS, "interfaces"),
    "BACKEND": ("Backend", _OPTIONS, "backend"),
    "STATEDIR": ("StateDir", _OPTIONS, "path"),
    "SERVERKEY": ("ServerKey", _OPTIONS, "path"),
    "SPAPORT": ("SpaPort", _OPTIONS, "port"),
    "SPAWINDOW": ("SpaWindow", _OPTIONS, "window"),
}

_DOOR_FIELDS = {
    "Sequence": "sequence",
    "One_Time_Sequences": "one_time_sequences",
    "Seq_Timeout": "seq_timeout",
    "TCPFlags": "tcpflags",
    "Start_Command": "start_command",
    "Start_Command_6": "start_command_6",
    "Stop_Command": "stop_command",
    "Stop_Command_6": "stop_command_6",
    "Cmd_Timeout": "cmd_timeout",
    "Target": "target",
    "Open": "open",
    "Authorized_Keys": "authorized_keys",
    "SPA_Use_Source": "spa_use_source",
    "Rotating_Key": "rotating_key",
    "Rotating_Bind_Source": "rotating_bind_source",
}
_OPTION_FIELDS = {
    "UseSyslog": "use_syslog",
    "LogFile": "logfile",
    "PidFile": "pidfile",
    "Interface": "interfaces",
    "Backend": "backend",
    "StateDir": "state_dir",
    "ServerKey": "server_key",
    "SpaPort": "spa_port",
    "SpaWindow": "spa_window",
}

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}

_SECONDS_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_DIGITS_RE = re.compile(r"[0-9]+")
#: A port written with more significant digits than this is out of range whatever it says.
_PORT_DIGITS = 5
_NEGATIVE_RE = re.compile(r"-[0-9]+")
# Trailing comment on a non-command value: whitespace, then '#', then anything.
_COMMENT_RE = re.compile(r"(?:^|\s)#")

# A value that failed to convert: the key counts as given (no cascade of
# follow-up errors such as "no knock sequence"), and the file is invalid anyway.
_INVALID: Any = object()


class _Problems:
    """Errors and warnings of one file, each located at a line."""

    def __init__(self, path: str):
        self.path = path
        self.errors: list[ConfigError] = []
        self.warnings: list[tuple[int, str]] = []

    def error(self, line: int | None, message: str) -> None:
        self.errors.append(ConfigError(message, self.path, line))

    def warn(self, line: int, message: str) -> None:
        self.warnings.append((line, message))

    def raise_if_any(self) -> None:
        if self.errors:
            self.errors.sort(key=lambda e: e.line or 0)  # stable: same-line errors keep their order
            raise ConfigInvalid(self.errors)


# --------------------------------------------------------------------------
# Lines


def _lines(text: str):
    """(number, line) for each line: split on '\\n' as knockd's fgets, CR of CRLF and a leading BOM dropped."""
    if text.startswith("\ufeff"):
        text = text[1:]
    for number, raw in enumerate(text.split("\n"), 1):
        if raw.endswith("\r"):
            raw = raw[:-1]
        yield number, raw


def _control_char(raw: str) -> str | None:
    for ch in raw:
        if ch != "\t" and unicodedata.category(ch) == "Cc":
            return ch
    return None


def _strip_comment(value: str) -> str:
    """Drop a trailing ``# comment`` (``#`` after whitespace, or at the start) and trim."""
    m = _COMMENT_RE.search(value)
    if m:
        value = value[: m.start()]
    return value.strip()


def _content_lines(text: str, problems: _Problems):
    """(number, stripped line) for each line that is neither blank nor a ``#`` comment.

    A line with a control character (other than tab) is reported and skipped.
    """
    for number, raw in _lines(text):
        ch = _control_char(raw)
        if ch is not None:
            problems.error(number, f"control character U+{ord(ch):04X} in line (only tab is allowed)")
            continue
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


# --------------------------------------------------------------------------
# Values


def _port(token: str, seps: str) -> PortSpec | str:
    """One ``PORT[<sep>PROTO]`` token (already without spaces); a PortSpec or an error message."""
    port_text, proto_text = token, None
    for i, ch in enumerate(token):
        if ch in seps:
            port_text, proto_text = token[:i], token[i + 1 :]
            break
    if _DIGITS_RE.fullmatch(port_text):
        significant = port_text.lstrip("0")
        if len(significant) > _PORT_DIGITS:
            # Not int(): Python refuses to convert more than 4300 digits, and no port has six.
            shown = port_text if len(port_text) <= 40 else f"{port_text[:20]}... ({len(port_text)} digits)"
            return f"port {shown} is out of range (1-65535)"
        port = int(significant or "0")
    elif _NEGATIVE_RE.fullmatch(port_text):
        return f"port {port_text} is out of range (1-65535)"
    elif "/" in port_text and _DIGITS_RE.fullmatch(port_text.split("/", 1)[0]):
        return f"port {port_text!r} is not a number (a knock sequence writes the protocol as PORT:tcp or PORT:udp)"
    elif not port_text:
        return f"port is missing in {token!r}"
    else:
        return f"port {port_text!r} is not a number"
    if not 1 <= port <= 65535:
        return f"port {port} is out of range (1-65535)"
    proto = "tcp"
    if proto_text is not None:
        proto = proto_text.lower()
        if proto not in ("tcp", "udp"):
            return f"unknown protocol {proto_text!r} (tcp or udp)"
    return PortSpec(port, proto)  # type: ignore[arg-type]


def _sequence(text: str, number: int | None, problems: _Problems) -> tuple[PortSpec, ...] | None:
    text = re.sub(r"\s*:\s*", ":", text.strip())
    if not text:
        problems.error(number, "knock sequence is empty")
        return None
    ok = True
    tokens: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            problems.error(number, "empty entry in knock sequence (a comma too many)")
            ok = False
            continue
        tokens.extend(part.split())
    seq: list[PortSpec] = []
    for token in tokens:
        spec = _port(token, ":")
        if isinstance(spec, str):
            problems.error(number, spec)
            ok = False
        else:
            seq.append(spec)
    if len(tokens) > MAX_SEQUENCE:
        problems.error(number, f"too many ports in knock sequence: {len(tokens)} (at most {MAX_SEQUENCE})")
        ok = False
    return tuple(seq) if ok and seq else None


def _tcpflags(text: str, number: int | None, problems: _Problems) -> TcpFlags | None:
    must_set = must_clear = 0
    ok = True
    if not text.strip():
        problems.error(number, "'TCPFlags' needs at least one flag")
        return None
    for item in text.split(","):
        word = item.strip()
        negate = word.startswith("!")
        name = word[1:].strip().lower() if negate else word.lower()
        bit = FLAG_BITS.get(name)
        if not word:
            problems.error(number, "empty entry in 'TCPFlags' (a comma too many)")
            ok = False
        elif bit is None:
            problems.error(
                number,
                f"unknown TCP flag {word!r} (fin, syn, rst, psh, ack or urg, each optionally prefixed with '!')",
            )
            ok = False
        elif negate:
            must_clear |= bit
        else:
            must_set |= bit
    both = must_set & must_clear
    if both:
        names = ", ".join(n for n, b in FLAG_BITS.items() if both & b)
        problems.error(number, f"TCP flag {names} is both required and forbidden")
        ok = False
    return TcpFlags(must_set, must_clear) if ok else None


def _seconds(canonical: str, text: str, number: int, problems: _Problems) -> float | None:
    if not _SECONDS_RE.fullmatch(text) or float(text) <= 0:
        problems.error(number, f"'{canonical}' must be a positive number of seconds, not {text!r}")
        return None
    value = float(text)
    if value > MAX_DURATION:
        problems.error(number, f"'{canonical}' of {text} s is too long (at most {MAX_DURATION:.0f} s)")
        return None
    return value


def _address(text: str, number: int, problems: _Problems) -> Address | None:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        problems.error(number, f"'Target' must be an IP address, not {text!r}")
        return None
    try:
        return parse_address(text)
    except InvalidGrant as exc:
        problems.error(number, f"'Target' {text!r} cannot be used: {exc}")
        return None


def _open_ports(text: str, number: int, problems: _Problems) -> tuple[PortSpec, ...] | None:
    text = re.sub(r"\s*([/:])\s*", r"\1", text)
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    ports: list[PortSpec] = []
    ok = True
    for token in tokens:
        spec = _port(token, "/:")
        if isinstance(spec, str):
            problems.error(number, f"'Open': {spec}")
            ok = False
        else:
            ports.append(spec)
    if not tokens:
        problems.error(number, "'Open' needs at least one port")
        ok = False
    return normalize_ports(ports) if ok else None


def _interfaces(text: str, number: int, problems: _Problems) -> tuple[str, ...] | None:
    names: list[str] = []
    ok = True
    for name in (n for n in re.split(r"[,\s]+", text) if n):
        if len(name.encode()) > MAX_INTERFACE_NAME or "/" in name or name in (".", ".."):
            problems.error(
                number, f"interface name {name!r} is not valid (at most {MAX_INTERFACE_NAME} bytes, no '/')"
            )
            ok = False
        elif name in names:
            problems.warn(number, f"interface {name!r} is listed twice")
        else:
            names.append(name)
    if ok and not names:
        problems.error(number, "'Interface' needs at least one interface name")
        ok = False
    return tuple(names) if ok else None


def _convert(canonical: str, kind: str, value: str, number: int, problems: _Problems) -> Any:
    """The value of one key, or ``_INVALID`` after reporting why it cannot be used."""
    if kind == "command":
        return value
    if not value:
        problems.error(number, f"'{canonical}' needs a value")
        return _INVALID
    result: Any
    if kind == "sequence":
        result = _sequence(value, number, problems)
    elif kind == "seconds":
        result = _seconds(canonical, value, number, problems)
    elif kind == "tcpflags":
        result = _tcpflags(value, number, problems)
    elif kind == "address":
        result = _address(value, number, problems)
    elif kind == "ports":
        result = _open_ports(value, number, problems)
    elif kind == "interfaces":
        result = _interfaces(value, number, problems)
    elif kind == "port":
        significant = value.lstrip("0")  # int() refuses more than 4300 digits, leading zeros included
        result = (int(significant) if _DIGITS_RE.fullmatch(value) and 1 <= len(significant) <= _PORT_DIGITS
                  and 1 <= int(significant) <= 65535 else None)
        if result is None:
            problems.error(number, f"'{canonical}' must be a port number (1-65535), not {value!r}")
    elif kind == "window":
        result = _seconds(canonical, value, number, problems)
        if result is not None and result > MAX_SPA_WINDOW:
            problems.error(number, f"'{canonical}' of {value} s is too wide (at most {MAX_SPA_WINDOW:.0f} s)")
            result = None
    elif kind == "paths":
        result = tuple(p.strip() for p in value.split(",") if p.strip()) or None
        if result is None:
            problems.error(number, f"'{canonical}' needs at least one path")
    elif kind == "backend":
        result = value.lower()
        if result not in BACKENDS:
            problems.error(number, f"unknown backend {value!r} (auto, nft or iptables)")
            result = None
    elif kind == "bool":
        low = value.lower()
        result = True if low in _TRUE else False if low in _FALSE else None
        if result is None:
            problems.error(number, f"'{canonical}' must be yes or no (or true/false, on/off, 1/0), not {value!r}")
    else:  # path
        result = value
    return _INVALID if result is None else result


# --------------------------------------------------------------------------
# Sections


class _Section:
    """Values given in one section (or in all [options] sections): canonical key -> (value, line)."""

    def __init__(self, name: str, line: int, kind: str, keep: bool = True):
        self.name = name
        self.line = line
        self.kind = kind
        #: False for a section that is only checked, never used (a repeated door name).
        self.keep = keep
        self.values: dict[str, tuple[Any, int]] = {}

    def set(self, canonical: str, value: Any, number: int, problems: _Problems) -> None:
        previous = self.values.get(canonical)
        if previous is not None:
            problems.warn(number, f"'{canonical}' is set again (first at line {previous[1]}); the last value is used")
        self.values[canonical] = (value, number)

    def get(self, canonical: str, default: Any = None) -> Any:
        value = self.values.get(canonical, (default, 0))[0]
        return default if value is _INVALID else value

    def line_of(self, canonical: str) -> int | None:
        entry = self.values.get(canonical)
        return entry[1] if entry else None


def _door(section: _Section, problems: _Problems) -> Door | None:
    name, line = section.name, section.line
    seq_line = section.line_of("Sequence")
    ots_line = section.line_of("One_Time_Sequences")
    other = section.line_of("Authorized_Keys") or section.line_of("Rotating_Key")
    if seq_line is None and ots_line is None and other is None:
        problems.error(
            line,
            f"door {name!r} has no knock sequence (give 'Sequence' or 'One_Time_Sequences', "
            "or 'Authorized_Keys' for SPA, or 'Rotating_Key' for rotating sequences)",
        )
    elif seq_line is not None and ots_line is not None:
        problems.error(
            max(seq_line, ots_line),
            f"door {name!r} has both 'Sequence' (line {seq_line}) and 'One_Time_Sequences' "
            f"(line {ots_line}); use one of them",
        )
    start, stop = section.get("Start_Command"), section.get("Stop_Command")
    start6, stop6 = section.get("Start_Command_6"), section.get("Stop_Command_6")
    if not start and not start6 and not section.get("Open"):
        problems.warn(line, f"door {name!r} has no 'Start_Command' and no 'Open': a completed knock is only logged")
    if (stop and not start) or (stop6 and not (start6 if start6 is not None else start)):
        problems.warn(line, f"door {name!r} has a stop command but no start command: it never runs (as in knockd)")
    for key, needs in (("SPA_Use_Source", "Authorized_Keys"), ("Rotating_Bind_Source", "Rotating_Key")):
        at = section.line_of(key)
        if at is not None and section.line_of(needs) is None:
            problems.warn(at, f"'{key}' has no effect in door {name!r}: it has no '{needs}'")
    if any(v is _INVALID for v, _ in section.values.values()):
        return None
    fields: dict[str, Any] = {_DOOR_FIELDS[k]: v for k, (v, _) in section.values.items()}
    fields.setdefault("sequence", ())
    return Door(name=name, line=line, **fields)


def _options(section: _Section) -> Options:
    fields = {_OPTION_FIELDS[k]: v for k, (v, _) in section.values.items() if v is not _INVALID}
    return Options(**fields)


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse knockd.conf text; raise ``ConfigInvalid`` listing every problem in it."""
    problems = _Problems(path)
    options = _Section("options", 0, _OPTIONS)
    doors: list[_Section] = []
    by_name: dict[str, _Section] = {}
    current: _Section | None = None
    syslog_in_door: list[tuple[int, str]] = []

    for number, line in _content_lines(text, problems):

        if line.startswith("["):
            header = line if line.endswith("]") else _strip_comment(line)
            if not header.endswith("]"):
                problems.error(number, f"section header has no closing ']': {line!r}")
                current = _Section(header[1:].strip(), number, _DOOR, keep=False)
                continue
            written = header[1:-1]
            name = written.strip()
            if not name:
                problems.error(number, "empty section name '[]'")
                current = _Section("", number, _DOOR, keep=False)
            elif name.lower() == "options":
                if written != "options":
                    problems.warn(number, f"'[{written}]' is read as [options] (knockd would read it as a door)")
                current = options
            else:
                current = _Section(name, number, _DOOR)
                try:
                    check_door_name(name)
                except InvalidGrant as exc:
                    problems.error(number, str(exc))
                    current.keep = False
                first = by_name.get(name)
                if first is not None:
                    problems.error(
                        number,
                        f"door {name!r} is already defined at line {first.line} (door names must be unique)",
                    )
                    current.keep = False
                elif current.keep:
                    by_name[name] = current
                    doors.append(current)
            continue

        if current is None:
            problems.error(number, "directive before the first [section]")
            continue

        if "=" not in line:
            word = _strip_comment(line)
            if word.upper() == "USESYSLOG":
                options.set("UseSyslog", True, number, problems)
                if current.kind == _DOOR:
                    syslog_in_door.append((number, current.name))
            else:
                problems.error(number, f"line has no '=': {line!r}")
            continue

        key, _, value = line.partition("=")
        key = key.strip()
        if not key:
            problems.error(number, f"line has no key before '=': {line!r}")
            continue
        spec = _KEYS.get(key.upper())
        if spec is None:
            problems.error(number, f"unknown key {key!r}")
            continue
        canonical, scope, kind = spec
        if kind != "command":
            value = _strip_comment(value)
        value = value.strip()

        target = current
        if scope != current.kind:
            if canonical == "UseSyslog":
                syslog_in_door.append((number, current.name))
                target = options
            elif scope == _OPTIONS:
                problems.error(number, f"'{canonical}' belongs in [options], not in door {current.name!r}")
                continue
            else:
                problems.error(number, f"'{canonical}' belongs in a door section, not in [options]")
                continue
        target.set(canonical, _convert(canonical, kind, value, number, problems), number, problems)

    for number, door_name in syslog_in_door:
        problems.warn(
            number, f"'UseSyslog' in door {door_name!r} sets syslog for the whole daemon (it belongs in [options])"
        )

    built = [_door(section, problems) for section in doors]
    if options.line_of("ServerKey") is None:
        for section in doors:
            at = section.line_of("Authorized_Keys")
            if at is not None:
                problems.error(at, f"door {section.name!r} accepts SPA but [options] has no 'ServerKey'")
    problems.raise_if_any()
    warnings = tuple(f"{path}:{line}: {message}" for line, message in sorted(problems.warnings, key=lambda w: w[0]))
    return Config(
        path=path,
        options=_options(options),
        doors=tuple(d for d in built if d is not None),
        warnings=warnings,
    )


# --------------------------------------------------------------------------
# Public helpers for single values


def parse_sequence(text: str, path: str = "<config>", line: int | None = None) -> tuple[PortSpec, ...]:
    """A knockd sequence (``port[:tcp|udp]`` separated by commas and/or spaces), in order, repeats kept."""
    problems = _Problems(path)
    seq = _sequence(text, line, problems)
    problems.raise_if_any()
    assert seq is not None
    return seq


def parse_tcpflags(text: str, path: str = "<config>", line: int | None = None) -> TcpFlags:
    """knockd's TCPFlags list: ``syn,!ack`` (case-insensitive, spaces after commas allowed)."""
    problems = _Problems(path)
    flags = _tcpflags(text, line, problems)
    problems.raise_if_any()
    assert flags is not None
    return flags


def parse_one_time_sequences(text: str, path: str) -> list[tuple[int, tuple[PortSpec, ...]]]:
    """Every usable line of a One_Time_Sequences file as (line number, sequence), in file order.

    Blank lines and ``#`` lines (comments, and sequences knockd marked used)
    are skipped. A line that does not parse is an error, not skipped.
    """
    problems = _Problems(path)
    result: list[tuple[int, tuple[PortSpec, ...]]] = []
    for number, line in _content_lines(text, problems):
        seq = _sequence(_strip_comment(line), number, problems)
        if seq is not None:
            result.append((number, seq))
    problems.raise_if_any()
    return result


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a knockd.conf file and parse it; unreadable files are a ``ConfigError`` naming the path."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError("no such file", name) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a file", name) from None
    except PermissionError:
        raise ConfigError("permission denied (cannot read the file)", name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", name) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", name, line) from None
    return parse_config(text, name)
