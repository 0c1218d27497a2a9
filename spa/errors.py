"""Exception types shared by every part of the product.

Each carries what an administrator needs to act on it; the CLIs map them to
messages and exit codes in one place (``spa.cli_errors``).
"""

from __future__ import annotations

from collections.abc import Sequence


class SpaError(Exception):
    """Base of every error this product raises on purpose."""


class InvalidGrant(SpaError, ValueError):
    """A grant, address, port or duration that cannot be opened."""


class LocatedError(SpaError):
    """An error about a file, located at a line when known: ``str()`` reads ``path:line: message``."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class ConfigError(LocatedError):
    """A configuration problem, located at a file and line when known."""


class ConfigInvalid(ConfigError):
    """Every problem found in one configuration file, reported together.

    ``errors`` holds each located ``ConfigError``; ``str()`` is one
    ``path:line: message`` per line, in file order.
    """

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = list(errors)
        text = "\n".join(str(e) for e in self.errors) or "invalid configuration"
        super().__init__(text)
        first = self.errors[0] if self.errors else None
        self.path = first.path if first is not None else None
        self.line = first.line if first is not None else None


class FirewallError(SpaError):
    """A firewall operation failed; carries exactly what was run and what it said."""

    def __init__(
        self,
        message: str,
        argv: Sequence[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ):
        self.message = message
        self.argv = list(argv) if argv is not None else None
        self.returncode = returncode
        self.stderr = stderr
        parts = [message]
        if self.argv is not None:
            parts.append(f"command: {' '.join(self.argv)}")
        if returncode is not None:
            parts.append(f"exit status {returncode}")
        if stderr.strip():
            parts.append(f"stderr: {stderr.strip()}")
        super().__init__("; ".join(parts))


class BackendUnavailable(FirewallError):
    """The chosen firewall backend cannot run on this host (binary or library missing)."""


class KeyFileError(LocatedError):
    """A key file that is missing, unreadable, unsafe or malformed; names the file (and line)."""


class PacketRejected(SpaError):
    """An SPA packet or rotating knock that must not open anything.

    ``reason`` is a short stable word for counters (``size``, ``version``,
    ``unknown-key``, ``aead``, ``stale``, ``future``, ``restart``, ``replay``,
    ``signature``, ``policy``, ...); the message says more for the log.
    """

    def __init__(self, reason: str, message: str = ""):
        self.reason = reason
        self.message = message or reason
        super().__init__(self.message)
