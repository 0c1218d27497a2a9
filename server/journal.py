"""The grant journal: every grant on disk, with its deadline (and SPA replay-cache entries).

SQLite in WAL mode with ``synchronous=FULL``: a grant is on disk before its
firewall change (command and SPA grants) or right after it (knock grants,
classic or rotating, whose deadline the kernel holds anyway), so the next start can
close it on time even after a power loss (fail2ban runs its database with
``synchronous=OFF``; we do not).

An SPA nonce reaches the disk either ahead of its grant without waiting for
the disk (``remember(..., durable=False)``: committed to the write-ahead log,
it survives the process but not the machine going down in the next moments),
or with its grant, a moment after the capture loop opened it itself. The
daemon's session record covers both gaps: ``begin_session`` says whether the
previous daemon ended without a clean stop, and the daemon then refuses SPA
packets made before it started (their nonces may be lost); ``end_session``
flushes everything to disk.
One row per (door, address). A row whose ``closing`` flag is set is being
closed; whoever sets the flag (the daemon at the deadline, or ``spa grants
--revoke`` from another process) runs the close, so a stop command never
runs twice for one grant.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spa.grant import ActiveGrant, CommandAction, parse_address, parse_ports

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    door     TEXT NOT NULL,
    address  TEXT NOT NULL,
    ports    TEXT NOT NULL,
    deadline REAL NOT NULL,
    commands TEXT,
    backend  TEXT NOT NULL,
    created  REAL NOT NULL,
    closing  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (door, address)
);
CREATE TABLE IF NOT EXISTS replay (
    nonce BLOB PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    grant: ActiveGrant
    backend: str
    closing: bool


class Journal:
    """Durable record of open grants, safe to share between the daemon and the CLI."""

    FILENAME = "grants.db"

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.state_dir / self.FILENAME
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write
        # from the CLI and one from the daemon never interleave.
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _entry(row: tuple) -> JournalEntry:
        door, address, ports, deadline, commands, backend, closing = row
        cmd = CommandAction.from_dict(json.loads(commands)) if commands else None
        return JournalEntry(
            ActiveGrant(door, parse_address(address), parse_ports(ports) if ports else (), float(deadline), cmd),
            backend,
            bool(closing),
        )

    _COLUMNS = "door, address, ports, deadline, commands, backend, closing"

    def put(self, grant: ActiveGrant, backend: str) -> None:
        """Record (or update) a grant; durable when this returns."""
        self.put_many([grant], backend)

    def put_many(self, grants: list[ActiveGrant], backend: str, nonces: list[tuple[bytes, float]] = (),
                 durable: bool = True) -> None:
        """Record several grants in one transaction (one fsync); durable when this returns.

        ``nonces`` are SPA replay-cache entries ``(nonce, until)`` committed in
        the same transaction: a packet's nonce is on disk before its grant
        reaches the firewall, at no extra fsync. ``durable=False`` commits
        without the fsync (see the module's docstring for what covers that).
        """
        now = time.time()
        rows = [
            (g.door, str(g.address), ",".join(str(p) for p in g.ports), g.deadline,
             json.dumps(g.commands.to_dict()) if g.commands else None, backend, now)
            for g in grants
        ]
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")  # per connection, between transactions
            try:
                self._write(rows, nonces)
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _write(self, rows: list[tuple], nonces: list[tuple[bytes, float]]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if nonces:
                self._db.executemany("INSERT OR REPLACE INTO replay (nonce, until) VALUES (?, ?)", nonces)
            self._db.executemany(
                "INSERT INTO grants (door, address, ports, deadline, commands, backend, created, closing)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 0)"
                " ON CONFLICT (door, address) DO UPDATE SET ports=excluded.ports, deadline=excluded.deadline,"
                " commands=excluded.commands, backend=excluded.backend, closing=0",
                rows,
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def remember(self, nonces: list[tuple[bytes, float]], durable: bool = True) -> None:
        """Record SPA replay-cache entries alone (durable when this returns, unless ``durable=False``)."""
        self.put_many([], "", nonces, durable=durable)

    def begin_session(self) -> bool:
        """Record that a daemon now runs (until ``end_session`` says it stopped cleanly).

        True when replay-cache entries may have been lost: the previous
        daemon did not stop cleanly (a crash, ``kill -9``, the machine going
        down), so a grant it opened in its last moments may have no nonce on
        disk. A first start, an older journal without a session record, and
        a clean stop give False.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = dict(self._db.execute("SELECT key, value FROM session").fetchall())
                self._db.execute("INSERT OR REPLACE INTO session (key, value) VALUES ('clean', '0')")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if not before:
            return False
        return before.get("clean") != "1"

    def end_session(self) -> None:
        """A clean stop: flush every commit made without an fsync, and say so for the next start."""
        with self._lock:
            # A FULL commit syncs the whole write-ahead log, earlier unsynced commits included.
            self._db.execute("INSERT OR REPLACE INTO session (key, value) VALUES ('clean', '1')")

    def replay_entries(self, now: float) -> list[tuple[bytes, float]]:
        """The replay-cache entries still in force (loaded at start: replays stay refused across restarts)."""
        with self._lock:
            return self._db.execute("SELECT nonce, until FROM replay WHERE until > ?", (now,)).fetchall()

    def prune_replay(self, now: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM replay WHERE until <= ?", (now,)).rowcount

    def get(self, door: str, address) -> JournalEntry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._COLUMNS} FROM grants WHERE door=? AND address=?", (door, str(address))
            ).fetchone()
        return self._entry(row) if row else None

    def get_many(self, keys: list[tuple[str, object]]) -> dict[tuple[str, str], JournalEntry]:
        """The entries of several (door, address) pairs in a few queries, keyed by (door, str(address))."""
        wanted = sorted({(door, str(address)) for door, address in keys})
        out: dict[tuple[str, str], JournalEntry] = {}
        with self._lock:
            for i in range(0, len(wanted), 400):  # well under SQLite's bound on parameters
                chunk = wanted[i:i + 400]
                # A join on the listed pairs: one primary-key search each (an IN over row values scans).
                columns = ", ".join(f"g.{c.strip()}" for c in self._COLUMNS.split(","))
                rows = self._db.execute(
                    f"SELECT {columns} FROM (VALUES {','.join(['(?, ?)'] * len(chunk))}) AS w"
                    " JOIN grants AS g ON g.door = w.column1 AND g.address = w.column2",
                    [x for pair in chunk for x in pair],
                ).fetchall()
                for row in rows:
                    out[(row[0], row[1])] = self._entry(row)
        return out

    def all(self) -> list[JournalEntry]:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM grants ORDER BY deadline").fetchall()
        return [self._entry(r) for r in rows]

    def claim_close(self, door: str, address, deadline: float | None = None) -> bool:
        """Mark a grant as closing; True for the one caller that gets to close it.

        With ``deadline``, only a row that still ends then is claimed: a grant
        extended meanwhile is left alone.
        """
        sql = "UPDATE grants SET closing=1 WHERE door=? AND address=? AND closing=0"
        args: tuple = (door, str(address))
        if deadline is not None:
            sql += " AND deadline<=?"
            args += (deadline,)
        with self._lock:
            cur = self._db.execute(sql, args)
        return cur.rowcount == 1

    def delete(self, door: str, address, only_closing: bool = False) -> None:
        """Forget a grant. With ``only_closing``, a grant opened again meanwhile is kept."""
        sql = "DELETE FROM grants WHERE door=? AND address=?" + (" AND closing=1" if only_closing else "")
        with self._lock:
            self._db.execute(sql, (door, str(address)))
