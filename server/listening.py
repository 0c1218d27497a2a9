"""What listens on this host: read from /proc/net, for check-config's collision warning."""

from __future__ import annotations

from pathlib import Path

from spa.grant import PortSpec

_TCP_LISTEN = "0A"


def listening_ports(proc: Path = Path("/proc/net")) -> set[PortSpec]:
    """TCP ports in LISTEN state and bound UDP ports, IPv4 and IPv6."""
    found: set[PortSpec] = set()
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            if proto == "tcp" and fields[3] != _TCP_LISTEN:
                continue
            try:
                port = int(fields[1].rsplit(":", 1)[1], 16)
            except (IndexError, ValueError):
                continue
            if port:
                found.add(PortSpec(port, proto))  # type: ignore[arg-type]
    return found
