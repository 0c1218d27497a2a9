"""The grant manager: opens grants, closes them on time, survives crashes.

Every way in hands a ``Grant`` to ``submit()`` (never blocks: the capture
loop calls it) or ``grant()`` (synchronous: the CLI and tests). One worker
thread does the firewall work, closes grants at their deadlines and
periodically checks that the firewall still holds what we put there
(fail2ban's check/repair), putting it back when someone flushed the ruleset.

``submit(prompt=True)`` lets the capture loop open a new grant itself when
the worker is idle and the backend can do it in one bounded in-kernel
transaction (nft through netlink: a set element created with its timeout,
about 0.1 ms); the worker journals it right after. Waking the worker thread
on the other CPU and handing it the GIL cost more than the opening itself.

The journal is the truth about what is open. A command grant is written
there before the firewall is touched; native grants (nft, iptables) right
after, because the kernel holds their deadline anyway (see ``grant_many``).
An SPA grant's nonce is committed before the firewall opens, without waiting
for the disk (``Journal.remember(durable=False)``), or, when the capture loop
opened it, with the grant right after; the daemon's session record covers
the moment in between (``Journal.begin_session``). At start-up ``reconcile()``
closes what is overdue and reschedules the rest, so after ``kill -9`` a grant stays open no
longer than its deadline (nft and iptables: the kernel stops matching at the
deadline) or until the next start (command backend).
"""

from __future__ import annotations

import collections
import heapq
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from spa.errors import FirewallError, SpaError
from spa.grant import ActiveGrant, Address, Grant, regrant
from spa.server.firewall.base import Backend
from spa.server.firewall.command import CommandBackend
from spa.server.journal import Journal, JournalEntry
from spa.server.logs import events

log = logging.getLogger(__name__)

COMMAND = "command"
#: Grants waiting for the worker; beyond this the oldest are dropped (and counted).
MAX_PENDING = 65536
#: Deferred grants (extensions of grants that are open and far from their deadline) wait at most
#: this long (seconds) and then go out together: under a spoofed flood on a knock sequence they are
#: most of the grants, and a few large transactions cost much less than one per few grants.
DEFER_DELAY = 0.5
#: Deferred grants go out this many to a transaction, so that a new grant never waits long behind them.
DEFER_CHUNK = 64


def _held(entry: JournalEntry | None) -> ActiveGrant | None:
    """What the journal holds open for a (door, address): nothing while it is being closed."""
    return entry.grant if entry is not None and not entry.closing else None


def describe(g: ActiveGrant) -> str:
    ports = ",".join(str(p) for p in g.ports) or "commands"
    return f"door {g.door!r} for {g.address} ({ports})"


class GrantManager:
    def __init__(
        self,
        journal: Journal,
        native: Backend | None = None,
        command: Backend | None = None,
        *,
        repair_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        self.journal = journal
        self.native = native
        self.command = command
        self.repair_interval = repair_interval
        self._clock = clock
        self._lock = threading.RLock()  # one firewall operation at a time
        self._cond = threading.Condition()
        # Keyed by (door, address): a flood of completed knocks from one
        # source collapses into one pending grant; bounded, oldest dropped.
        self._pending: collections.OrderedDict[tuple, Grant] = collections.OrderedDict()
        # Extensions that may wait (submit(defer=True)) and when they must go out at the latest.
        self._deferred: collections.OrderedDict[tuple, Grant] = collections.OrderedDict()
        self._flush_at: float | None = None
        # SPA replay-cache entries of the pending grants: committed before they open.
        self._nonces: list[tuple[bytes, float]] = []
        # Replay entries that may follow their grant to disk (used rotating sequences).
        self._late: list[tuple[bytes, float]] = []
        # Grants the capture loop opened itself, waiting to be journaled (with their replay entries).
        self._opened: list[tuple[ActiveGrant, Grant, tuple[bytes, float] | None]] = []
        self._heap: list[tuple[float, str, str]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters: collections.Counter[str] = collections.Counter()

    # -- backends ----------------------------------------------------------

    def _backend_for(self, grant: Grant | ActiveGrant) -> tuple[str, Backend]:
        if grant.commands is not None:
            if self.command is None:
                raise SpaError(f"door {grant.door!r} runs commands but no command backend is configured")
            return COMMAND, self.command
        if self.native is None:
            raise SpaError(f"door {grant.door!r} opens ports but no firewall backend is configured")
        return self.native.name, self.native

    def _backend_named(self, name: str) -> Backend | None:
        if name == COMMAND:
            return self.command
        if self.native is not None and self.native.name == name:
            return self.native
        return None

    # -- life-cycle ----------------------------------------------------------

    def start(self) -> None:
        """Build the firewall structure, reconcile with the journal, start the worker."""
        with self._lock:
            for b in (self.native, self.command):
                if b is not None:
                    b.setup()
            self.reconcile()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="grant-manager", daemon=True)
        self._thread.start()

    def stop(self, close_grants: bool = True, timeout: float = 30.0) -> None:
        """Stop the worker. With ``close_grants`` every grant is closed now (a clean shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            if self._deferred:
                self._flush_at = float("-inf")  # nothing waits any more
        self._drain()
        if close_grants:
            for entry in self.journal.all():
                self._close(entry.grant, entry.backend, reason="shutdown")
            for b in (self.native, self.command):
                if b is not None:
                    try:
                        b.teardown()
                    except FirewallError as exc:
                        log.error("teardown of %s failed: %s", b.name, exc)
                        self.counters["firewall_failures"] += 1

    # -- granting ------------------------------------------------------------

    def submit(self, grant: Grant, nonce: tuple[bytes, float] | None = None, *, nonce_first: bool = True,
               defer: bool = False, prompt: bool = False) -> None:
        """Queue a grant; returns at once (safe from the capture loop).

        ``nonce`` is a replay-cache entry ``(nonce, until)``. With
        ``nonce_first`` (SPA) it is committed before the grant reaches the
        firewall; without (a used rotating sequence, already refused in memory)
        it is written with the grant right after the firewall opens.

        ``defer``: the caller knows the grant extends one that is open and
        ends more than ``DEFER_DELAY`` from now; it goes out ``DEFER_DELAY``
        later at most, with the other deferred ones, ``DEFER_CHUNK`` to a
        transaction. A grant not deferred goes first.

        ``prompt``: open it here and now if that is cheap and nothing waits
        for the worker (``_open_promptly``); queued as above otherwise.
        """
        if prompt and not defer and self._open_promptly(grant, nonce):
            return
        with self._cond:
            if defer and nonce is None:
                if grant.key not in self._pending:
                    self._deferred.pop(grant.key, None)
                    self._deferred[grant.key] = grant
                    while len(self._deferred) > MAX_PENDING:
                        self._deferred.popitem(last=False)
                        self.counters["grants_dropped"] += 1
                    if self._flush_at is None:
                        self._flush_at = time.monotonic() + DEFER_DELAY
                        self._cond.notify()
                return
            self._deferred.pop(grant.key, None)  # this one supersedes it
            if nonce is not None:
                (self._nonces if nonce_first else self._late).append(nonce)
            self._pending.pop(grant.key, None)
            self._pending[grant.key] = grant
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
                self.counters["grants_dropped"] += 1
            self._cond.notify()

    def _open_promptly(self, grant: Grant, nonce: tuple[bytes, float] | None) -> bool:
        """Open a new native grant in the caller's thread; False (nothing done) when it must be queued.

        Only when the worker has nothing waiting and does not hold the
        firewall (so the caller never waits for a batch or an fsync), the
        backend's opening is one bounded kernel transaction, and the firewall
        holds none of the grant (an extension goes through ``regrant`` on the
        worker). The grant's deadline is held by the kernel from this moment;
        it reaches the journal, with its replay entry, when the worker wakes.
        """
        backend = self.native
        if grant.commands is not None or backend is None or not backend.prompt:
            return False
        with self._cond:
            if self._pending or self._opened or self._stopping:
                return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            held = ActiveGrant.start(grant, self._clock())
            if not backend.open_new(held):
                return False  # some of it is open (or the firewall refused): the worker sorts it out
        except Exception:  # noqa: BLE001 - a bug here must not take the capture loop down; the queue still works
            log.exception("opening door %r for %s from the capture loop failed; queued instead", grant.door, grant.address)
            return False
        finally:
            self._lock.release()
        with self._cond:
            self._opened.append((held, grant, nonce))
            self._cond.notify()
        return True

    def _record_opened(self, items: list[tuple[ActiveGrant, Grant, tuple[bytes, float] | None]]) -> None:
        """Journal the grants ``_open_promptly`` opened, their replay entries in the same commit."""
        assert self.native is not None
        with self._lock:
            try:
                entries = self.journal.get_many([(h.door, h.address) for h, _, _ in items])
            except sqlite3.Error as exc:  # still journaled below, as they were opened
                log.error("journal read failed before recording %d grant(s): %s", len(items), exc)
                entries = {}
            opened: list[tuple[ActiveGrant, ActiveGrant | None, Grant]] = []
            for held, grant, _ in items:
                previous = _held(entries.get((held.door, str(held.address))))
                if previous is not None:
                    # Journaled while its elements were missing (a flushed firewall awaiting repair, a grant
                    # the worker or ``spa grant`` made a moment ago): keep the later deadline, drop the ports
                    # no longer granted, as ``grant_many`` would have.
                    merged = regrant(previous, grant, held.deadline - grant.duration)
                    if merged != held or set(previous.ports) - set(held.ports):
                        try:
                            self.native.open(merged, previous)
                            self.counters["firewall_ops"] += 1
                            held = merged
                        except FirewallError as exc:  # what the loop opened stays open, to its own deadline
                            self.counters["firewall_failures"] += 1
                            log.error("extending %s failed: %s", describe(merged), exc)
                opened.append((held, previous, grant))
            self.counters["firewall_ops"] += len(items)
            self.counters["grants_prompt"] += len(items)
            self._journal_opened(opened, [n for _, _, n in items if n is not None])

    def _journal_opened(self, opened: list[tuple[ActiveGrant, ActiveGrant | None, Grant]],
                        nonces: list[tuple[bytes, float]]) -> None:
        """Journal (held, previous, grant) triples the firewall already holds, ``nonces`` in the same commit;
        then schedule and log each. The caller holds ``_lock``."""
        assert self.native is not None
        try:
            self.journal.put_many([h for h, _, _ in opened], self.native.name, nonces)
        except sqlite3.Error as exc:
            # Open already; the kernel still closes each one at its deadline.
            log.error("journal write failed after opening %d grant(s): %s", len(opened), exc)
        for h, previous, g in opened:
            self.counters["grants_total"] += 1
            self._schedule(h)
            log.info("%s %s until %s%s", "extended" if previous is not None else "opened", describe(h),
                     time.strftime("%H:%M:%S", time.localtime(h.deadline)), f" ({g.via})" if g.via else "")

    def grant(self, grant: Grant) -> ActiveGrant:
        """Open (or extend) ``grant`` now; raises ``FirewallError`` if the firewall refuses."""
        with self._lock:
            name, backend = self._backend_for(grant)
            now = self._clock()
            previous = _held(self.journal.get(grant.door, grant.address))
            held = regrant(previous, grant, now)
            self.journal.put(held, name)  # on disk before the firewall changes
            try:
                backend.open(held, previous)
            except FirewallError:
                self.counters["firewall_failures"] += 1
                if previous is not None:
                    self.journal.put(previous, name)
                else:
                    self.journal.delete(grant.door, grant.address)
                raise
            self.counters["firewall_ops"] += 1
            self.counters["grants_total"] += 1
            self._schedule(held)
            log.info(
                "%s %s until %s%s",
                "extended" if previous is not None else "opened",
                describe(held),
                time.strftime("%H:%M:%S", time.localtime(held.deadline)),
                f" ({grant.via})" if grant.via else "",
            )
            return held

    def grant_many(self, grants: list[Grant], nonces: list[tuple[bytes, float]] = (),
                   late: list[tuple[bytes, float]] = ()) -> list[ActiveGrant]:
        """Open a batch: one journal commit and one firewall transaction for all native grants.

        Under a flood of completed knocks this is what keeps the queue short:
        one fsync and one netlink transaction for the lot instead of one each.
        If the batch fails, each grant is tried alone so that one bad grant
        cannot sink the others.
        """
        held_all: list[ActiveGrant] = []
        with self._lock:
            native = [g for g in grants if g.commands is None and self.native is not None]
            if (nonces or late) and len(native) < len(grants):
                self.journal.remember([*nonces, *late])  # before any command runs
                nonces = late = ()
            native = []
            for g in grants:
                if g.commands is None and self.native is not None:
                    native.append(g)
                else:
                    held_all += self._grant_logged(g)
            if not native:
                return held_all
            assert self.native is not None
            now = self._clock()
            pairs: list[tuple[ActiveGrant, ActiveGrant | None]] = []
            entries = self.journal.get_many([(g.door, g.address) for g in native])
            for g in native:
                previous = _held(entries.get((g.door, str(g.address))))
                pairs.append((regrant(previous, g, now), previous))
            # A batch opens first and is journaled right after: the kernel
            # holds each native grant's deadline itself, so a crash in between
            # leaves an element that closes on time and is adopted at the next
            # start, and the fsync does not delay the opening. SPA nonces go
            # first, committed without the fsync (a replay after the process
            # dies must still fail; the grants' commit below syncs them too,
            # and the daemon's session record covers the machine going down).
            if nonces:
                self.journal.remember(list(nonces), durable=False)
            try:
                self.native.open_many(pairs)
            except FirewallError as exc:
                log.warning("batch of %d grants failed (%s); trying them one by one", len(pairs), exc)
                if late:
                    self.journal.remember(list(late))  # the sequences stay used, whatever the firewall said
                for g in native:
                    held_all += self._grant_logged(g)
                return held_all
            self.counters["firewall_ops"] += 1
            self._journal_opened([(h, prev, g) for g, (h, prev) in zip(native, pairs)], list(late))
            held_all += [h for h, _ in pairs]
        return held_all

    def _grant_logged(self, g: Grant) -> list[ActiveGrant]:
        try:
            return [self.grant(g)]
        except (FirewallError, SpaError) as exc:
            log.error("opening door %r for %s failed: %s", g.door, g.address, exc)
            return []

    def _schedule(self, g: ActiveGrant) -> None:
        with self._cond:
            heapq.heappush(self._heap, (g.deadline, g.door, str(g.address)))
            self._cond.notify()

    # -- closing -------------------------------------------------------------

    def _close(self, g: ActiveGrant, backend_name: str, reason: str) -> bool:
        """Close one journaled grant; the caller has claimed it or owns the journal (start-up, shutdown)."""
        self.journal.claim_close(g.door, g.address)  # marks it; already marked when the caller claimed it
        if g.commands is not None and reason == "deadline":
            events.info("%s: %s: command timeout", g.address, g.door)  # knockd's line before the stop command
        backend = self._backend_named(backend_name)
        try:
            if backend is None:
                from spa.server.firewall import backend_class

                backend = backend_class(backend_name)()  # journaled under a backend no longer configured
            if isinstance(backend, CommandBackend):
                # The row goes when the stop command has run, not when it is
                # queued: a crash in between leaves it for the next start.
                backend.close(g, on_done=lambda: self._forget(g, reason))
                self.counters["firewall_ops"] += 1
                return True
            backend.close(g)
        except (FirewallError, SpaError) as exc:
            self.counters["firewall_failures"] += 1
            log.error("closing %s failed (%s): %s", describe(g), reason, exc)
            return False
        self.counters["firewall_ops"] += 1
        self._forget(g, reason)
        self._reopen_overlaps(g)
        return True

    def _forget(self, g: ActiveGrant, reason: str) -> None:
        self.journal.delete(g.door, g.address, only_closing=True)
        log.info("closed %s (%s)", describe(g), reason)

    def _reopen_overlaps(self, closed: ActiveGrant) -> None:
        # Two doors may open the same port for one address; the nft set holds
        # one element for both, so put back what another live grant still needs.
        if not closed.ports:
            return
        for entry in self.journal.all():
            g = entry.grant
            if g.address == closed.address and not entry.closing and set(g.ports) & set(closed.ports):
                backend = self._backend_named(entry.backend)
                if backend is not None and entry.backend != COMMAND:
                    backend.open(g, g)

    def revoke(self, door: str, address: Address, reason: str = "revoked") -> bool:
        """Close one grant early; False when it was not open (idempotent)."""
        with self._lock:
            entry = self.journal.get(door, address)
            if entry is None or not self.journal.claim_close(door, address):
                return False
            return self._close(entry.grant, entry.backend, reason)

    def revoke_address(self, address: Address, reason: str = "revoked") -> list[ActiveGrant]:
        closed = []
        for entry in self.journal.all():
            if entry.grant.address == address and self.revoke(entry.grant.door, address, reason):
                closed.append(entry.grant)
        return closed

    def expire_due(self) -> int:
        """Close every grant whose deadline has passed; the number closed."""
        now = self._clock()
        n = 0
        with self._lock:
            for entry in self.journal.all():
                g = entry.grant
                if g.deadline <= now and self.journal.claim_close(g.door, g.address, deadline=now):
                    n += self._close(g, entry.backend, reason="deadline")
        return n

    # -- start-up and repair ---------------------------------------------------

    def reconcile(self) -> None:
        """Make firewall and journal agree: close overdue grants, reschedule and restore live ones."""
        with self._lock:
            now = self._clock()
            journaled: dict[tuple[str, str], JournalEntry] = {}
            for entry in self.journal.all():
                g = entry.grant
                if entry.closing or g.deadline <= now:
                    self._close(g, entry.backend, reason="overdue at start" if not entry.closing else "unfinished close")
                    continue
                journaled[(g.door, str(g.address))] = entry
                backend = self._backend_named(entry.backend)
                if backend is not None and entry.backend != COMMAND:
                    try:
                        backend.open(g, g)  # idempotent; puts back what a reboot or flush removed
                    except FirewallError as exc:
                        log.error("restoring %s failed: %s", describe(g), exc)
                self._schedule(g)
                log.info("resumed %s, %.1f s left", describe(g), g.seconds_left(now))
            if self.native is not None and self.native.lists_firewall:
                for g in self.native.list():
                    if (g.door, str(g.address)) in journaled:
                        continue
                    if g.deadline <= now:
                        self.native.close(g)
                        log.info("removed overdue %s found in the firewall only", describe(g))
                    else:
                        # The firewall holds it (journal lost or replaced): adopt it.
                        self.journal.put(g, self.native.name)
                        self._schedule(g)
                        log.warning("adopted %s found in the firewall only", describe(g))

    def repair(self) -> list[str]:
        """Check the native backend's structure; rebuild it and restore live grants if broken."""
        if self.native is None:
            return []
        with self._lock:
            try:
                problems = self.native.check()
                if problems:
                    log.warning("firewall changed behind our back (%s); repairing", "; ".join(problems))
                    self.counters["repairs"] += 1
                    self.native.setup()
                    for entry in self.journal.all():
                        if entry.backend == self.native.name and not entry.closing:
                            self.native.open(entry.grant, entry.grant)
                return problems
            except FirewallError as exc:
                self.counters["firewall_failures"] += 1
                log.error("firewall check failed: %s", exc)
                return [str(exc)]

    def active(self) -> list[ActiveGrant]:
        return [e.grant for e in self.journal.all() if not e.closing]

    # -- worker ----------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            with self._cond:
                opened, self._opened = self._opened, []
                if opened:
                    batch = []
                elif self._pending:
                    batch = list(self._pending.values())
                    self._pending.clear()
                elif self._flush_at is not None and time.monotonic() >= self._flush_at:
                    # Deferred extensions in chunks: a new grant arriving meanwhile waits for one chunk at most.
                    batch = [self._deferred.popitem(last=False)[1]
                             for _ in range(min(DEFER_CHUNK, len(self._deferred)))]
                    if not self._deferred:
                        self._flush_at = None
                    if not batch:
                        return
                else:
                    return
                if batch:
                    nonces, late, self._nonces, self._late = self._nonces, self._late, [], []
            try:
                if opened:
                    self._record_opened(opened)
                else:
                    self.grant_many(batch, nonces, late)
            except Exception:  # noqa: BLE001 - the journal or a bug; log and keep the worker alive
                log.exception("journaling or opening a batch of %d grants failed", len(opened or batch))

    def _run(self) -> None:
        next_repair = time.monotonic() + self.repair_interval
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not self._pending and not self._opened:
                    wait = next_repair - time.monotonic()
                    if self._heap:
                        wait = min(wait, self._heap[0][0] - self._clock())
                    if self._flush_at is not None:
                        wait = min(wait, self._flush_at - time.monotonic())
                    if wait > 0:
                        self._cond.wait(wait)
                if self._stopping:
                    return
                now = self._clock()
                due = False
                while self._heap and self._heap[0][0] <= now:
                    heapq.heappop(self._heap)
                    due = True
            try:
                self._drain()
                if due:
                    self.expire_due()
                if time.monotonic() >= next_repair:
                    next_repair = time.monotonic() + self.repair_interval
                    self.repair()
                    self.journal.prune_replay(self._clock())
                    # Grants opened by another process (``spa grant``) are in
                    # the journal but not in our schedule: sweep for them too.
                    self.expire_due()
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure
                log.exception("grant manager: unexpected error; continuing")
