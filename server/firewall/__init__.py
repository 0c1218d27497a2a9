"""Firewall backends, chosen by name or ``auto``.

``auto`` picks ``nft`` when nftables is usable here and ``iptables``
otherwise. The ``command`` backend (knockd's start/stop commands) is not a
choice for ``auto``: doors that carry commands use it, doors with ``open =``
use the native backend.
"""

from __future__ import annotations

from spa.errors import BackendUnavailable
from spa.server.firewall.base import Backend

NATIVE_BACKENDS = ("nft", "iptables")
BACKEND_NAMES = ("auto", *NATIVE_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if name == "nft":
        from spa.server.firewall.nft import NftBackend

        return NftBackend
    if name == "iptables":
        from spa.server.firewall.iptables import IptablesBackend

        return IptablesBackend
    if name == "command":
        from spa.server.firewall.command import CommandBackend

        return CommandBackend
    raise BackendUnavailable(f"unknown firewall backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")


def create_backend(name: str = "auto", **options) -> Backend:
    """Build the native backend ``name`` (``auto``, ``nft`` or ``iptables``) or raise ``BackendUnavailable``."""
    if name == "auto":
        reasons = []
        for candidate in NATIVE_BACKENDS:
            reason = backend_class(candidate).unavailable_reason()
            if reason is None:
                return create_backend(candidate, **options)
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailable("no firewall backend is usable here: " + "; ".join(reasons))
    if name not in NATIVE_BACKENDS:
        raise BackendUnavailable(f"unknown firewall backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    cls = backend_class(name)
    reason = cls.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend {name}: {reason}")
    return cls(**options)
