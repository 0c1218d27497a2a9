"""The order of journal and firewall writes in the grant manager, against a recording native backend."""

from __future__ import annotations

import contextlib
import threading
import time

from spa.grant import Grant
from spa.server.firewall.base import Backend
from spa.server.grants import GrantManager
from spa.server.journal import Journal


class Recording(Backend):
    """A native backend that records each open with what the journal held at that moment."""

    name = "recording"
    lists_firewall = False

    def __init__(self, journal_path):
        self.journal_path = journal_path
        self.opens: list[tuple[list, list]] = []

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def check(self) -> list[str]:
        return []

    def list(self):
        return []

    def open(self, grant, previous=None) -> None:
        self.open_many([(grant, previous)])

    def open_many(self, pairs) -> None:
        j = Journal(self.journal_path)  # another connection: sees only what is committed
        try:
            self.opens.append(([e.grant.door for e in j.all()], j.replay_entries(0.0)))
        finally:
            j.close()

    def close(self, grant) -> None: ...


def _manager(tmp_path, kind=None, **kw):
    state = tmp_path / "state"
    backend = (kind or Recording)(state, **kw)
    mgr = GrantManager(Journal(state), backend, None, repair_interval=60)
    return mgr, backend


@contextlib.contextmanager
def _running(mgr):
    mgr.start()
    try:
        yield mgr
    finally:
        mgr.stop()


def _wait(cond, limit=5.0):
    end = time.monotonic() + limit
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def test_a_knock_grant_opens_first_and_is_journaled_right_after(tmp_path):
    mgr, backend = _manager(tmp_path)
    mgr.start()
    try:
        mgr.submit(Grant.create("knock", "192.0.2.2", "22/tcp", 30))
        assert _wait(lambda: mgr.journal.get("knock", Grant.create("knock", "192.0.2.2", "22/tcp", 30).address))
        assert backend.opens == [([], [])]  # the firewall saw an empty journal
    finally:
        mgr.stop()


def test_an_spa_grant_finds_its_nonce_committed_and_is_journaled_right_after(tmp_path):
    mgr, backend = _manager(tmp_path)
    mgr.start()
    try:
        until = time.time() + 60
        g = Grant.create("spa", "192.0.2.2", "22/tcp", 30)
        mgr.submit(g, (b"A" * 24, until))
        assert _wait(lambda: mgr.journal.get("spa", g.address) is not None)
        doors, nonces = backend.opens[0]
        assert [(bytes(n), u) for n, u in nonces] == [(b"A" * 24, until)] and doors == []  # nonce first, grant after
    finally:
        mgr.stop()


def test_a_used_rotating_sequence_follows_its_grant_to_disk(tmp_path):
    mgr, backend = _manager(tmp_path)
    mgr.start()
    try:
        until = time.time() + 60
        g = Grant.create("rot", "192.0.2.2", "22/tcp", 30)
        mgr.submit(g, (b"R" * 32, until), nonce_first=False)
        assert _wait(lambda: [bytes(n) for n, _ in mgr.journal.replay_entries(0.0)] == [b"R" * 32])
        assert backend.opens == [([], [])]  # the firewall opened before the journal held either
        assert mgr.journal.get("rot", g.address) is not None
    finally:
        mgr.stop()



class Prompt(Recording):
    """A backend whose ``open_new`` the capture loop may call: records the thread and the journal then."""

    name = "prompt"

    def __init__(self, journal_path, fail: Exception | None = None):
        super().__init__(journal_path)
        self.fail = fail
        self.created: list[tuple[str, list]] = []

    @property
    def prompt(self) -> bool:
        return True

    def open_new(self, grant) -> bool:
        if self.fail is not None:
            raise self.fail
        j = Journal(self.journal_path)
        try:
            self.created.append((threading.current_thread().name, [e.grant.door for e in j.all()]))
        finally:
            j.close()
        return True


def test_a_prompt_grant_opens_in_the_callers_thread_and_is_journaled_with_its_nonce(tmp_path):
    mgr, backend = _manager(tmp_path, Prompt)
    with _running(mgr):
        until = time.time() + 60
        g = Grant.create("spa", "192.0.2.2", "22/tcp", 30)
        mgr.submit(g, (b"P" * 24, until), prompt=True)
        assert backend.created == [(threading.current_thread().name, [])]  # before submit returned
        assert _wait(lambda: mgr.journal.get("spa", g.address) is not None)
        assert [(bytes(n), u) for n, u in mgr.journal.replay_entries(0.0)] == [(b"P" * 24, until)]
        assert backend.opens == [] and mgr.counters["grants_prompt"] == 1
        # Without prompt=True, or deferred, the same manager queues as before.
        mgr.submit(Grant.create("spa", "192.0.2.3", "22/tcp", 30), defer=True, prompt=True)
        mgr.submit(Grant.create("knock", "192.0.2.4", "22/tcp", 30))
        assert _wait(lambda: len(backend.opens) == 1) and len(backend.created) == 1


def test_a_prompt_opening_that_raises_falls_back_to_the_queue(tmp_path, caplog):
    mgr, backend = _manager(tmp_path, Prompt, fail=RuntimeError("a bug"))
    with _running(mgr):
        g = Grant.create("spa", "192.0.2.2", "22/tcp", 30)
        mgr.submit(g, (b"Q" * 24, time.time() + 60), prompt=True)  # must not raise into the capture loop
        assert _wait(lambda: mgr.journal.get("spa", g.address) is not None)
        assert len(backend.opens) == 1 and mgr.counters["grants_prompt"] == 0
        assert "from the capture loop failed; queued instead" in caplog.text


def test_a_busy_worker_means_the_grant_is_queued(tmp_path):
    mgr, backend = _manager(tmp_path, Prompt)  # not started: what is submitted stays pending
    mgr.submit(Grant.create("knock", "192.0.2.9", "22/tcp", 30))
    mgr.submit(Grant.create("spa", "192.0.2.2", "22/tcp", 30), prompt=True)
    assert backend.created == [] and len(mgr._pending) == 2


def test_deferred_extensions_wait_for_a_batch_at_most_the_delay(tmp_path):
    """Under a spoofed flood most grants extend open ones: they go out together, not one transaction each."""
    from spa.server.grants import DEFER_CHUNK, DEFER_DELAY

    mgr, backend = _manager(tmp_path)
    mgr.start()
    try:
        first = Grant.create("knock", "192.0.2.2", "22/tcp", 30)
        mgr.submit(first)
        assert _wait(lambda: len(backend.opens) == 1)
        # Alone, deferred grants go out once their delay is up, all in one transaction.
        t0 = time.monotonic()
        for i in range(2, 12):
            mgr.submit(Grant.create("knock", f"192.0.2.{i}", "22/tcp", 30), defer=True)
        assert _wait(lambda: mgr.counters["grants_total"] == 11)
        assert time.monotonic() - t0 >= DEFER_DELAY * 0.9 and len(backend.opens) == 2
        # A grant not deferred goes out at once, alone; the deferred one follows on its own time.
        mgr.submit(Grant.create("knock", "192.0.2.20", "22/tcp", 30), defer=True)
        t0 = time.monotonic()
        mgr.submit(Grant.create("knock", "192.0.2.21", "22/tcp", 30))
        assert _wait(lambda: mgr.counters["grants_total"] == 12)
        assert time.monotonic() - t0 < DEFER_DELAY
        assert _wait(lambda: mgr.counters["grants_total"] == 13) and len(backend.opens) == 4
        # Many deferred ones go out DEFER_CHUNK to a transaction.
        for i in range(DEFER_CHUNK + 5):
            mgr.submit(Grant.create("knock", f"198.51.100.{i + 1}", "22/tcp", 30), defer=True)
        assert _wait(lambda: mgr.counters["grants_total"] == 13 + DEFER_CHUNK + 5) and len(backend.opens) == 6
        # A deferred grant pending at stop still goes out.
        mgr.submit(Grant.create("knock", "192.0.2.30", "22/tcp", 30), defer=True)
    finally:
        mgr.stop(close_grants=False)
    assert mgr.journal.get("knock", Grant.create("knock", "192.0.2.30", "22/tcp", 30).address) is not None
