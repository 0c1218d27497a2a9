"""Warnings about a configuration that parses but may not protect what the admin thinks.

Pure: the caller supplies what only the host knows (the ports that listen
here). ``spa check-config`` and ``spa-server`` both use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from spa.config import Config, Door
from spa.grant import PortSpec
from spa.keytext import AuthorizedKey
from spa.rotating_match import RotatingDoor

MIN_KNOCKS = 3
#: An authorized key that expires sooner than this is worth a warning.
EXPIRY_NOTICE = 7 * 86400


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: warning: {self.message}"


def _ascending(seq: tuple[PortSpec, ...]) -> bool:
    return all(a.proto == b.proto and a.port < b.port for a, b in zip(seq, seq[1:]))


def _descending(seq: tuple[PortSpec, ...]) -> bool:
    return all(a.proto == b.proto and a.port > b.port for a, b in zip(seq, seq[1:]))


def check(config: Config, listening: Iterable[PortSpec] = ()) -> list[Finding]:
    """Every warning for ``config``; ``listening`` is what listens on this host (tcp and udp ports)."""
    found: list[Finding] = []
    path = config.path
    listening = set(listening)
    seen: dict[tuple[PortSpec, ...], Door] = {}
    for d in config.doors:
        seq = d.sequence
        if seq and d.one_time_sequences is None:
            if seq in seen:
                found.append(Finding(path, d.line, f"door {d.name!r} has the same sequence as door {seen[seq].name!r}: "
                                                   "one knock opens both"))
            else:
                seen[seq] = d
            if len(seq) > 1 and (_ascending(seq) or _descending(seq)):
                order = "ascending" if _ascending(seq) else "descending"
                found.append(Finding(path, d.line, f"door {d.name!r}: its ports are in {order} order, so a port "
                                                   f"scan in {order} order knocks the whole sequence"))
            if len(seq) < MIN_KNOCKS:
                found.append(Finding(path, d.line, f"door {d.name!r} has {len(seq)} knock(s); use at least {MIN_KNOCKS}"))
            elif len(set(seq)) < MIN_KNOCKS:
                found.append(Finding(path, d.line, f"door {d.name!r} knocks on only {len(set(seq))} distinct ports; "
                                                   "repeats add little to guess"))
            for step in seq:
                if step in listening:
                    found.append(Finding(path, d.line, f"door {d.name!r}: knock port {step} is a listening service on "
                                                       "this host; its own traffic can knock or reset the sequence"))
    return found


def check_keys(
    config: Config,
    rotating: Sequence[RotatingDoor] = (),
    authorized: Mapping[str, tuple[str, Sequence[AuthorizedKey]]] = {},
    now: float | None = None,
) -> list[Finding]:
    """Warnings that need the key files: rotating ranges that can draw a port in use, expired or expiring keys."""
    now = time.time() if now is None else now
    found: list[Finding] = []
    path = config.path
    lines = {d.name: d.line for d in config.doors}
    spa_port = config.options.spa_port
    for rd in rotating:
        taken: dict[PortSpec, str] = {}
        for d in config.doors:
            if d.name != rd.name:
                for step in d.sequence:
                    taken.setdefault(step, f"door {d.name!r}")
        for ring in rd.rings:
            p = ring.params
            clashes = [(s, who) for s, who in sorted(taken.items())
                       if p.lo <= s.port <= p.hi and s.port not in p.exclude
                       and (p.proto == "mixed" or s.proto == p.proto)]
            if authorized and p.lo <= spa_port <= p.hi and spa_port not in p.exclude and p.proto != "tcp":
                clashes.append((PortSpec(spa_port, "udp"), "the SPA port"))
            for step, who in clashes:
                found.append(Finding(path, lines[rd.name], f"door {rd.name!r}: rotating key {ring.path} can draw "
                                     f"{step}, which {who} uses; add {step.port} to the key's exclude list"))
            for kid, _, until in ring.secrets:
                if until is not None and until <= now:
                    found.append(Finding(path, lines[rd.name], f"door {rd.name!r}: secret {kid} in {ring.path} is "
                                         "past its grace and no longer accepted; 'spa keygen --rotate' drops it"))
    for name, (file, keys) in authorized.items():
        for k in keys:
            if k.expires is None:
                continue
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(k.expires))
            if k.expires <= now:
                found.append(Finding(file, k.line, f"key {k.key_id} ({k.comment or 'no comment'}) expired on {when}; "
                                     f"door {name!r} refuses it"))
            elif k.expires - now < EXPIRY_NOTICE:
                found.append(Finding(file, k.line, f"key {k.key_id} ({k.comment or 'no comment'}) expires on {when}"))
    return found
