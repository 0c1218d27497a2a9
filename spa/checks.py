"""Warnings about a configuration that parses but may not protect what the admin thinks.

Pure: the caller supplies what only the host knows (the ports that listen
here). ``spa check-config`` and ``spa-server`` both use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from spa.config import Config, Door
from spa.grant import PortSpec

MIN_KNOCKS = 3


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
