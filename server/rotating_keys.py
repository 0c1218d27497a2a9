"""Loading the shared-key files of rotating doors (at start and on SIGHUP)."""

from __future__ import annotations


from spa.config import Config
from spa.keys import shared
from spa.rotating_match import KeyRing, RotatingDoor


def load_rotating(config: Config) -> tuple[RotatingDoor, ...]:
    """Every rotating door with its key files read; a bad file raises ``KeyFileError`` naming it."""
    doors = []
    for d in config.doors:
        if not d.rotating_key:
            continue
        rings = []
        for p in d.rotating_key:
            path = config.resolve(p)
            key = shared.load(path)
            rings.append(KeyRing(path, key.params, tuple((s.key_id, s.secret, s.until) for s in key.secrets)))
        doors.append(RotatingDoor(d.name, tuple(rings), d.seq_timeout, d.tcpflags, d.target, d.rotating_bind_source))
    return tuple(doors)
