"""The knockd-style command backend, with harmless commands (no root, no firewall)."""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

import pytest

from spa.grant import ActiveGrant, CommandAction, Grant
from spa.server.firewall import backend_class
from spa.server.firewall.command import OUTPUT_LIMIT, CommandBackend
from spa.server.firewall.run import SEARCH_PATH

V4 = "192.0.2.7"
V6 = "2001:db8::7"
# open()/close() only queue work; this bound is generous, not a benchmark.
NON_BLOCKING = 0.2


@pytest.fixture
def backend():
    b = CommandBackend(timeout=5.0)
    try:
        yield b
    finally:
        assert b.shutdown(10.0)


def q(path: Path) -> str:
    return shlex.quote(str(path))


def active(door: str = "ssh", address: str = V4, commands: CommandAction | None = None, duration: float = 10) -> ActiveGrant:
    return ActiveGrant.start(Grant.create(door, address, ports=(), duration=duration, commands=commands), time.time())


def echo_action(log_file: Path) -> CommandAction:
    return CommandAction(start=f"echo start %IP% >> {q(log_file)}", stop=f"echo stop %IP% >> {q(log_file)}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# -- the Backend contract --------------------------------------------------------


def test_backend_properties(backend):
    assert backend_class("command") is CommandBackend
    assert CommandBackend.name == "command"
    assert CommandBackend.lists_firewall is False
    assert CommandBackend.kernel_expiry is False
    assert CommandBackend.unavailable_reason() is None
    backend.setup()
    assert backend.check() == []
    assert backend.list() == []
    backend.close_all()  # lists nothing, so closes nothing
    backend.teardown()
    assert backend.pending == 0


def test_unavailable_without_shell(monkeypatch):
    monkeypatch.setattr("spa.server.firewall.command.SHELL", "/nonexistent/sh")
    assert "/nonexistent/sh" in CommandBackend.unavailable_reason()


def test_bad_arguments():
    with pytest.raises(ValueError):
        CommandBackend(timeout=0)
    with pytest.raises(ValueError):
        CommandBackend(workers=0)


# -- start, re-grant, stop ----------------------------------------------------------


def test_open_runs_start_once(backend, tmp_path):
    out = tmp_path / "log"
    g = active(commands=echo_action(out))
    backend.open(g)
    assert backend.wait(5)
    assert lines(out) == [f"start {V4}"]
    (r,) = backend.results
    assert (r.door, r.address, r.which, r.returncode, r.timed_out) == ("ssh", g.address, "start", 0, False)
    assert r.argv == ("/bin/sh", "-c", f"echo start {V4} >> {q(out)}")
    assert r.ok


def test_regrant_runs_nothing(backend, tmp_path):
    out = tmp_path / "log"
    first = active(commands=echo_action(out))
    backend.open(first)
    assert backend.wait(5)
    again = active(commands=echo_action(out), duration=60)
    for _ in range(3):
        backend.open(again, previous=first)
    assert backend.wait(5)
    assert lines(out) == [f"start {V4}"]
    assert len(backend.results) == 1


def test_close_runs_stop(backend, tmp_path):
    out = tmp_path / "log"
    g = active(commands=echo_action(out))
    backend.open(g)
    backend.close(g)
    assert backend.wait(5)
    assert lines(out) == [f"start {V4}", f"stop {V4}"]
    assert [r.which for r in backend.results] == ["start", "stop"]


def test_close_without_stop_command_is_a_noop(backend, tmp_path):
    out = tmp_path / "log"
    g = active(commands=CommandAction(start=f"echo start >> {q(out)}"))
    backend.open(g)
    assert backend.wait(5)
    backend.close(g)
    assert backend.pending == 0
    assert backend.wait(5)
    assert lines(out) == ["start"]
    assert len(backend.results) == 1


def test_empty_commands_run_nothing(backend):
    g = active(commands=CommandAction(start="", stop=""))
    backend.open(g)
    backend.close(g)
    assert backend.pending == 0
    assert not backend.results


def test_grant_without_commands_runs_nothing(backend):
    g = ActiveGrant.start(Grant.create("web", V4, "443/tcp", 10), time.time())
    backend.open(g)
    backend.close(g)
    assert backend.pending == 0
    assert not backend.results


def test_ip_substituted_v4_and_v6_with_fallback(backend, tmp_path):
    out = tmp_path / "log"
    commands = CommandAction(
        start=f"echo start4 %IP% %IP% >> {q(out)}",
        stop=f"echo stop %IP% >> {q(out)}",
        start6=f"echo start6 %IP% >> {q(out)}",
        # no stop6: IPv6 falls back to stop, as in knockd
    )
    g4 = active(address=V4, commands=commands)
    g6 = active(address=V6, commands=commands)
    backend.open(g4)
    assert backend.wait(5)
    backend.open(g6)
    assert backend.wait(5)
    backend.close(g6)
    assert backend.wait(5)
    backend.close(g4)
    assert backend.wait(5)
    assert lines(out) == [f"start4 {V4} {V4}", f"start6 {V6}", f"stop {V6}", f"stop {V4}"]


def test_start_falls_back_for_v6_and_stop6_used(backend, tmp_path):
    out = tmp_path / "log"
    commands = CommandAction(
        start=f"echo start %IP% >> {q(out)}",
        stop=f"echo stop4 %IP% >> {q(out)}",
        stop6=f"echo stop6 %IP% >> {q(out)}",
    )
    g6 = active(address=V6, commands=commands)
    backend.open(g6)
    backend.close(g6)
    assert backend.wait(5)
    assert lines(out) == [f"start {V6}", f"stop6 {V6}"]


# -- never blocking, time limit, failures ---------------------------------------------


def test_timeout_kills_process_group_and_open_does_not_block(tmp_path, caplog):
    pid_file = tmp_path / "pid"
    b = CommandBackend(timeout=0.3)
    try:
        # The shell leaves a grandchild that must die with it.
        g = active(commands=CommandAction(start=f"sleep 30 & echo $! > {q(pid_file)}; wait"))
        with caplog.at_level(logging.INFO, logger="spa.server.firewall.command"):
            t0 = time.monotonic()
            b.open(g)
            assert time.monotonic() - t0 < NON_BLOCKING
            assert b.wait(5)
        (r,) = b.results
        assert r.timed_out and not r.ok
        assert r.returncode == -9
        assert 0.3 <= r.duration < 3
        grandchild = int(pid_file.read_text())
        deadline = time.monotonic() + 2
        while not _dead(grandchild) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _dead(grandchild)
        assert any("ssh: command timed out after" in m for m in caplog.messages)
    finally:
        assert b.shutdown(10)


def test_open_and_close_return_at_once_while_commands_are_slow(backend):
    grants = [active(door=f"d{i}", commands=CommandAction(start="sleep 0.2", stop="sleep 0.2")) for i in range(6)]
    t0 = time.monotonic()
    for g in grants:
        backend.open(g)
        backend.close(g)
    assert time.monotonic() - t0 < NON_BLOCKING
    assert backend.pending == 12
    assert not backend.wait(0.05)
    assert backend.wait(10)
    assert backend.pending == 0
    assert len(backend.results) == 12


def test_nonzero_status_logged_not_raised(backend, caplog):
    g = active(door="door1", commands=CommandAction(start="echo out; echo err >&2; exit 3"))
    with caplog.at_level(logging.INFO, logger="spa.server.firewall.command"):
        backend.open(g)  # does not raise
        assert backend.wait(5)
    (r,) = backend.results
    assert (r.returncode, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)
    msgs = caplog.messages
    assert "door1: running command: echo out; echo err >&2; exit 3" in msgs
    assert "door1: command returned non-zero status code (3)" in msgs
    assert "door1: command stdout: out" in msgs
    assert "door1: command stderr: err" in msgs
    bad = [rec for rec in caplog.records if "non-zero" in rec.getMessage()]
    assert bad[0].levelno == logging.WARNING


def test_success_logged(backend, caplog):
    g = active(door="door2", address=V4, commands=CommandAction(start="true %IP%"))
    with caplog.at_level(logging.INFO, logger="spa.server.firewall.command"):
        backend.open(g)
        assert backend.wait(5)
    assert f"door2: running command: true {V4}" in caplog.messages
    assert any(m.startswith("door2: command exited with status 0") for m in caplog.messages)


def test_output_truncated(backend):
    g = active(commands=CommandAction(start="head -c 5000 /dev/zero | tr '\\0' x; head -c 5000 /dev/zero | tr '\\0' y >&2"))
    backend.open(g)
    assert backend.wait(5)
    (r,) = backend.results
    assert r.stdout.startswith("x" * OUTPUT_LIMIT) and r.stdout.endswith("(truncated)")
    assert len(r.stdout) < OUTPUT_LIMIT + 50
    assert r.stderr.startswith("y" * OUTPUT_LIMIT) and r.stderr.endswith("(truncated)")


def test_pinned_environment_cwd_and_stdin(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SPA_SECRET_SHOULD_NOT_LEAK", "1")
    g = active(commands=CommandAction(start="echo \"$PATH\"; echo \"$LC_ALL\"; pwd; readlink /proc/self/fd/0; env | sort"))
    backend.open(g)
    assert backend.wait(5)
    (r,) = backend.results
    out = r.stdout.splitlines()
    assert out[:4] == [SEARCH_PATH, "C", "/", "/dev/null"]
    assert "SPA_SECRET_SHOULD_NOT_LEAK=1" not in out


def test_background_process_does_not_hold_the_queue(backend, tmp_path):
    pid_file = tmp_path / "pid"
    g = active(commands=CommandAction(start=f"sleep 30 >/dev/null 2>&1 & echo $! > {q(pid_file)}; echo started"))
    backend.open(g)
    try:
        assert backend.wait(2)
        (r,) = backend.results
        assert (r.returncode, r.stdout, r.timed_out) == (0, "started\n", False)
        assert r.duration < 1
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 9)


def test_background_process_keeping_stdout_does_not_hold_the_queue(backend, tmp_path):
    pid_file = tmp_path / "pid"
    # Like knockd's system(), we wait for the shell, not for its output to end.
    g = active(commands=CommandAction(start=f"sleep 30 & echo $! > {q(pid_file)}"))
    backend.open(g)
    try:
        assert backend.wait(2)
        (r,) = backend.results
        assert r.returncode == 0 and r.duration < 1
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 9)


# -- ordering ----------------------------------------------------------------------


def test_stop_waits_for_slow_start_of_same_key(backend, tmp_path):
    out = tmp_path / "log"
    g = active(commands=CommandAction(start=f"sleep 0.4; echo start >> {q(out)}", stop=f"echo stop >> {q(out)}"))
    t0 = time.monotonic()
    backend.open(g)
    backend.close(g)
    assert time.monotonic() - t0 < NON_BLOCKING
    assert backend.wait(5)
    assert lines(out) == ["start", "stop"]
    start, stop = backend.results
    assert (start.which, stop.which) == ("start", "stop")


def test_many_cycles_of_one_key_stay_in_order(backend, tmp_path):
    out = tmp_path / "log"
    commands = CommandAction(start=f"sleep 0.02; echo start >> {q(out)}", stop=f"echo stop >> {q(out)}")
    g = active(commands=commands)
    for _ in range(5):
        backend.open(g)
        backend.close(g)
    assert backend.wait(10)
    assert lines(out) == ["start", "stop"] * 5


def test_other_keys_not_held_up_by_a_slow_one(backend, tmp_path):
    out = tmp_path / "log"
    slow = active(door="slow", commands=CommandAction(start=f"sleep 0.6; echo slow >> {q(out)}"))
    fast_other_door = active(door="fast", commands=CommandAction(start=f"echo fast-door >> {q(out)}"))
    fast_other_addr = active(door="slow", address="192.0.2.8",
                             commands=CommandAction(start=f"echo fast-addr >> {q(out)}"))
    backend.open(slow)
    backend.open(fast_other_door)
    backend.open(fast_other_addr)
    assert backend.wait(5)
    assert lines(out)[-1] == "slow"
    assert sorted(lines(out)[:2]) == ["fast-addr", "fast-door"]


def test_results_keep_the_last_n(tmp_path):
    b = CommandBackend(keep=3, workers=1)
    try:
        for i in range(5):
            b.open(active(door=f"d{i}", commands=CommandAction(start="true")))
        assert b.wait(5)
        assert [r.door for r in b.results] == ["d2", "d3", "d4"]
    finally:
        assert b.shutdown(5)


def test_teardown_waits_and_backend_stays_usable(tmp_path):
    out = tmp_path / "log"
    b = CommandBackend()
    g = active(commands=CommandAction(start=f"sleep 0.2; echo start >> {q(out)}", stop=f"echo stop >> {q(out)}"))
    b.open(g)
    b.close(g)
    b.teardown()
    assert lines(out) == ["start", "stop"]
    assert b.pending == 0
    b.open(g)  # a fresh pool
    assert b.shutdown(5)
    assert lines(out) == ["start", "stop", "start"]


def test_shutdown_timeout_reports_unfinished():
    b = CommandBackend(timeout=0.5)
    b.open(active(commands=CommandAction(start="sleep 5")))
    assert b.shutdown(0.05) is False
    assert b.wait(5)
    (r,) = b.results
    assert r.timed_out
