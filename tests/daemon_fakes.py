"""The edges of ``spa.server.daemon.Daemon`` for tests of its packet path: no socket read, no firewall touched.

The daemon itself is built for real; ``FakeCapture`` hands ``_read`` the
packets under test and ``FakeManager`` records what the daemon hands the
grant manager.
"""

from __future__ import annotations


class FakeManager:
    """What the daemon's packet path uses of ``GrantManager``: ``submit`` and ``journal.remember``."""

    def __init__(self) -> None:
        #: (grant, nonce) per submit, and whether it was deferred.
        self.submitted: list = []
        self.deferred: list[bool] = []
        self.remembered: list = []
        self.journal = self
        self.native = None
        self.counters = {"grants_total": 0, "grants_prompt": 0, "firewall_ops": 0, "firewall_failures": 0,
                         "repairs": 0}

    def submit(self, grant, nonce=None, *, nonce_first=True, defer=False, prompt=False) -> None:
        self.submitted.append((grant, nonce))
        self.deferred.append(defer)

    def remember(self, entries) -> None:
        self.remembered.extend(entries)

    def active(self) -> list:
        return []


class FakeCapture:
    """Hands ``_read`` the packets under test as ``Capture.read`` would: one batch, one time (the first one's)."""

    def __init__(self) -> None:
        self.packets: list[tuple[bytes, float]] = []
        self.sock = object()
        #: Each program handed to ``set_filter``, in order.
        self.filters: list[list] = []
        #: What ``kernel_stats`` reports as dropped for lack of room (a test raises it).
        self.drops = 0

    def read(self, sock):
        out, self.packets = self.packets, []
        return (out[0][1] if out else 0.0), [p for p, _t in out]

    def sockets(self):
        return [self.sock]

    def set_filter(self, insns) -> None:
        self.filters.append(list(insns))

    def kernel_stats(self) -> dict[str, int]:
        return {"packets": 0, "drops": self.drops}

    def refresh(self) -> bool:
        return False

    def close(self) -> None: ...
