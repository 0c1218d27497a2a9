"""Logging set-up, and knockd's own log lines for classic doors.

knockd's words are kept exactly (``ADDR: DOOR: Stage N``, ``OPEN SESAME``,
``sequence timeout (stage N)``, ...), and its log file keeps its
``[YYYY-MM-DD HH:MM]`` prefix, so log watchers written for knockd (fail2ban
filters, scripts) keep working. Everything goes through stdlib ``logging``
under the ``spa`` logger.
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from spa.grant import Address

KNOCKD_DATEFMT = "%Y-%m-%d %H:%M"
#: The logger for knockd-compatible event lines.
events = logging.getLogger("spa.server.knockd")


def configure(
    *,
    logfile: str | None = None,
    use_syslog: bool = False,
    verbose: bool = False,
    debug: bool = False,
) -> None:
    """Send the ``spa`` logger's records where the administrator asked (file, syslog, stdout)."""
    root = logging.getLogger("spa")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if logfile:
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", KNOCKD_DATEFMT))
        root.addHandler(fh)
    if use_syslog:
        try:
            sh = logging.handlers.SysLogHandler(address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            sh.ident = "spa-server: "
            root.addHandler(sh)
        except OSError as exc:
            print(f"spa-server: syslog unavailable ({exc}); logging to stderr", file=sys.stderr)
            use_syslog = False
    if verbose or debug:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(out)
    else:
        # Problems always reach stderr (and so the journal under systemd).
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter("spa-server: %(message)s"))
        root.addHandler(err)


class Names:
    """``-l``: ``IP (hostname)`` in event lines, resolved off the capture loop.

    knockd resolves each new knocker with a blocking lookup in its only
    thread; here a lookup runs on a worker and the name appears once known.
    """

    def __init__(self, enabled: bool, limit: int = 4096):
        self.enabled = enabled
        self._names: dict[Address, str | None] = {}
        self._limit = limit
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spa-lookup") if enabled else None

    def __call__(self, addr: Address) -> str:
        if not self.enabled:
            return str(addr)
        with self._lock:
            if addr in self._names:
                name = self._names[addr]
                return f"{addr} ({name})" if name else str(addr)
            if len(self._names) >= self._limit:
                self._names.clear()
            self._names[addr] = None
        assert self._pool is not None
        self._pool.submit(self._resolve, addr)
        return str(addr)

    def _resolve(self, addr: Address) -> None:
        try:
            name = socket.gethostbyaddr(str(addr))[0]
        except OSError:
            return
        with self._lock:
            self._names[addr] = name


class Throttle:
    """A token bucket for per-packet log lines: a flood must not turn into a flood of log writes.

    knockd writes a line per counted knock, so a spoofed flood on the knock
    ports costs it (and would cost us) a disk write per packet. Lines beyond
    the rate are counted, and the daemon logs the count once a second.
    """

    def __init__(self, rate: float = 100.0, burst: float = 500.0):
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None
        self.suppressed = 0
        #: Before this time no token is back: a caller may count the line as suppressed
        #: without calling ``allow`` (the capture loop does, under a flood).
        self.next_ok = float("-inf")

    def allow(self, now: float) -> bool:
        if now < self.next_ok:
            self.suppressed += 1
            return False
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            if self._tokens < 1.0:
                self.next_ok = now + (1.0 - self._tokens) / self.rate
            return True
        self.next_ok = now + (1.0 - self._tokens) / self.rate
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
