"""The in-memory side of the SPA replay cache: O(1) lookups, entries forgotten when stale.

A nonce only needs remembering while a packet carrying it could still pass
the time window, so every entry has an end (``remember_until``) and the
cache holds at most the packets accepted in one window: it cannot grow
without bound (fwknop's never forgets and is scanned linearly). The durable
copy lives in the grant journal (``spa.server.journal``), committed just
before the grant opens; the daemon also hands the latest nonces to the
kernel's capture filter (``spa.hint_filter``), so replays stop there.
"""

from __future__ import annotations

import heapq


class ReplayCache:
    def __init__(self) -> None:
        self._until: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        #: Bumped by every change: the kernel's copy of the recent nonces follows it.
        self.version = 0

    def __contains__(self, nonce: bytes) -> bool:
        return nonce in self._until

    def __len__(self) -> int:
        return len(self._until)

    def add(self, nonce: bytes, until: float) -> None:
        if until > self._until.get(nonce, float("-inf")):
            self._until[nonce] = until
            heapq.heappush(self._heap, (until, nonce))
            self.version += 1

    def prune(self, now: float) -> int:
        """Forget entries whose time has passed; the number forgotten."""
        n = 0
        heap, until = self._heap, self._until
        while heap and heap[0][0] <= now:
            t, nonce = heapq.heappop(heap)
            if until.get(nonce) == t:
                del until[nonce]
                n += 1
        self.version += n
        return n

    def latest(self, count: int, size: int | None = None) -> list[bytes]:
        """Up to ``count`` nonces, those remembered longest first (the packets made last); ``size``: of that length only."""
        items = ((u, n) for n, u in self._until.items() if size is None or len(n) == size)
        return [n for _u, n in heapq.nlargest(count, items)]
