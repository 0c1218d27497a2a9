"""Knocking the rotating sequence in force: ``knock-client --key SHARED_KEY HOST DOOR``.

The sequence comes from the key file's newest secret and the current window
(``spa.rotating``); the knocks go out exactly as static ones do.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from spa import rotating
from spa.client.knock import KnockTarget, resolve, send_knock
from spa.keys import shared


def knock_rotating(
    host: str,
    door: str,
    key_path: str,
    *,
    family: int = 0,
    delay_ms: int = 0,
    verbose: Callable[[str], None] | None = None,
    now: float | None = None,
    bind_source: str | None = None,
) -> tuple[KnockTarget, ...]:
    """Knock the current sequence of ``door``; returns what was knocked.

    ``bind_source``: for a door with ``Rotating_Bind_Source``, this client's
    address as the server sees it (its public address behind NAT).
    """
    key = shared.load(key_path)
    t = time.time() if now is None else now
    c = rotating.counter(t, key.params.interval)
    source = rotating.source_bytes(bind_source) if bind_source is not None else None
    seq = rotating.derive(key.newest.secret, door, c, key.params, source)
    targets = tuple(KnockTarget(s.port, s.proto) for s in seq)
    fam, sockaddr = resolve(host, family)
    if verbose is not None:
        verbose(f"rotating sequence for door {door!r} (key {key.newest.key_id}, window {c}, "
                f"{rotating.seconds_left(t, key.params.interval):.0f} s left)")
    for target in targets:
        if verbose is not None:
            verbose(f"hitting {target.proto} {sockaddr[0]}:{target.port}")
        send_knock(fam, sockaddr, target)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000.0)
    return targets
