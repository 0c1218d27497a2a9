"""The grant manager's scheduling and journal, driven through the command backend (no root needed)."""

import time

from spa.grant import CommandAction, Grant
from spa.server.firewall.command import CommandBackend
from spa.server.grants import GrantManager
from spa.server.journal import Journal


def _manager(tmp_path):
    mgr = GrantManager(Journal(tmp_path / "state"), None, CommandBackend(timeout=5), repair_interval=60)
    mgr.start()
    return mgr


def _grant(marker, duration, stop_delay=0.0):
    return Grant.create(
        "door", "192.0.2.2", (), duration,
        CommandAction(start=f"echo start %IP% >> {marker}", stop=f"sleep {stop_delay}; echo stop %IP% >> {marker}"),
    )


def test_stop_runs_at_the_deadline_and_regrant_runs_no_second_start(tmp_path):
    marker = tmp_path / "log"
    mgr = _manager(tmp_path)
    try:
        t0 = time.monotonic()
        mgr.grant(_grant(marker, 0.6))
        mgr.submit(_grant(marker, 0.6))  # the capture loop's way in: queued, never blocking
        deadline = time.monotonic() + 5
        while "stop" not in (marker.read_text() if marker.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert marker.read_text() == "start 192.0.2.2\nstop 192.0.2.2\n"
        assert 0.5 <= elapsed <= 1.5, f"stop ran {elapsed:.2f} s after a 0.6 s grant"
        time.sleep(0.1)
        assert mgr.journal.all() == []
    finally:
        mgr.stop()


def test_journal_keeps_a_grant_until_its_stop_command_has_run(tmp_path):
    marker = tmp_path / "log"
    mgr = _manager(tmp_path)
    try:
        g = _grant(marker, 30, stop_delay=0.5)
        mgr.grant(g)
        assert mgr.revoke("door", g.address)
        entry = Journal(tmp_path / "state").get("door", g.address)
        assert entry is not None and entry.closing, "a crash now must leave the stop for the next start"
        assert mgr.command.wait(5)
        assert Journal(tmp_path / "state").get("door", g.address) is None
        assert not mgr.revoke("door", g.address)
    finally:
        mgr.stop()


def test_next_start_runs_the_stop_a_crash_left_behind(tmp_path):
    marker = tmp_path / "log"
    journal = Journal(tmp_path / "state")
    g = _grant(marker, 0.2)
    first = GrantManager(journal, None, CommandBackend(timeout=5))
    first.grant(g)  # no start(): as if the process died before its worker ever ran
    first.command.wait(5)
    time.sleep(0.3)
    second = _manager(tmp_path)
    try:
        assert second.command.wait(5)
        assert marker.read_text() == "start 192.0.2.2\nstop 192.0.2.2\n"
        assert second.journal.all() == []
    finally:
        second.stop()


def test_clean_stop_runs_every_pending_stop_command(tmp_path):
    marker = tmp_path / "log"
    mgr = _manager(tmp_path)
    for addr in ("192.0.2.2", "2001:db8::2"):
        mgr.grant(Grant.create("door", addr, (), 60, CommandAction(start="true", stop=f"echo stop %IP% >> {marker}")))
    mgr.stop()
    assert sorted(marker.read_text().split("\n")[:-1]) == ["stop 192.0.2.2", "stop 2001:db8::2"]
    assert mgr.journal.all() == []


def test_submit_collapses_repeats_and_bounds_the_queue(tmp_path, monkeypatch):
    import spa.server.grants as grants_module

    monkeypatch.setattr(grants_module, "MAX_PENDING", 3)
    mgr = GrantManager(Journal(tmp_path / "state"), None, CommandBackend())  # not started: nothing drains
    for addr in ("198.51.100.1", "198.51.100.2", "198.51.100.1", "198.51.100.3", "198.51.100.4"):
        mgr.submit(Grant.create("ssh", addr, (), 30, CommandAction(start="true")))
    assert [str(k[1]) for k in mgr._pending] == ["198.51.100.1", "198.51.100.3", "198.51.100.4"]
    assert mgr.counters["grants_dropped"] == 1
