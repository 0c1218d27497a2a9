"""The interface every firewall backend implements.

One small module per backend (``nft``, ``iptables``, ``command``), chosen by
name or ``auto`` in ``spa.server.firewall``. A backend knows how to open and
close one grant and how to read back what the firewall really holds; the
grant manager (``spa.server.grants``) decides when.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from spa.grant import ActiveGrant


class Backend(ABC):
    """One way of opening the firewall."""

    name: ClassVar[str]
    #: True when the firewall itself closes a grant at its deadline, so a dead
    #: daemon cannot leave it open (nft set timeouts, iptables time match).
    kernel_expiry: ClassVar[bool] = False
    #: True when ``list()`` reads the firewall; False when the backend cannot
    #: see what its commands did (the knockd-style ``command`` backend).
    lists_firewall: ClassVar[bool] = True

    def describe(self) -> str:
        """The backend and how it talks to the firewall, for the start-up log."""
        return self.name

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (missing binary or library), or None."""

    @abstractmethod
    def setup(self) -> None:
        """Create what the backend needs (tables, chains, hooks). Idempotent."""

    @abstractmethod
    def teardown(self) -> None:
        """Remove exactly what ``setup`` and the grants added. Idempotent."""

    @abstractmethod
    def check(self) -> list[str]:
        """Problems with the backend's own structure (missing table or hook), empty when intact."""

    @abstractmethod
    def open(self, grant: ActiveGrant, previous: ActiveGrant | None = None) -> None:
        """Open ``grant`` until its deadline, replacing ``previous`` (same door and address) without a gap."""

    def open_many(self, pairs: list[tuple[ActiveGrant, ActiveGrant | None]]) -> None:
        """Open several (grant, previous) pairs; backends that can do it in one transaction override this."""
        for grant, previous in pairs:
            self.open(grant, previous)

    @property
    def prompt(self) -> bool:
        """True when ``open_new`` is one bounded in-kernel transaction, cheap enough for the capture loop."""
        return False

    def open_new(self, grant: ActiveGrant) -> bool:
        """Open ``grant`` only if the firewall holds none of it; False when it holds some or cannot say.

        The capture loop's prompt opening (``GrantManager.submit(prompt=True)``);
        only a backend whose ``prompt`` is True implements it.
        """
        return False

    @abstractmethod
    def close(self, grant: ActiveGrant) -> None:
        """Close ``grant``; closing what is not open is not an error."""

    @abstractmethod
    def list(self) -> list[ActiveGrant]:
        """The grants the firewall holds now, read from the firewall itself."""

    def close_all(self) -> None:
        for g in self.list():
            self.close(g)
