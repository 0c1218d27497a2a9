"""Running firewall programs: argv lists, a pinned environment, a time limit.

Never shell text (the knockd-compatible ``command`` backend aside, which has
its own runner). A failure raises ``FirewallError`` carrying argv, exit status
and stderr, so the caller can log it precisely and keep running.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

from spa.errors import BackendUnavailable, FirewallError

log = logging.getLogger(__name__)

# What firewall programs see: a fixed PATH, so a hostile PATH cannot swap
# iptables for something else, and the C locale, so their messages parse.
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PINNED_ENV = {"PATH": SEARCH_PATH, "LC_ALL": "C"}
DEFAULT_TIMEOUT = 10.0


def which(name: str) -> str | None:
    """Absolute path of a firewall program on the pinned PATH, or None."""
    return shutil.which(name, path=SEARCH_PATH)


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and return the completed process; raise ``FirewallError`` on failure."""
    argv = [str(a) for a in argv]
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=PINNED_ENV,
            timeout=timeout,
            close_fds=True,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise BackendUnavailable(f"{argv[0]} is not installed", argv) from None
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise FirewallError(f"timed out after {timeout:g} s", argv, None, err) from None
    if check and proc.returncode != 0:
        raise FirewallError("firewall command failed", argv, proc.returncode, proc.stderr)
    return proc
