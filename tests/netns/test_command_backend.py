"""The command backend running knockd's own iptables commands in a namespace, proved by TCP connects."""

from __future__ import annotations

import time

import pytest

from spa.grant import ActiveGrant, CommandAction, Grant
from spa.server.firewall.command import CommandBackend
from spa.server.netns import CLIENT2_V4, CLIENT2_V6, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns, sh

pytestmark = pytest.mark.netns

# The knockd.conf seed's commands, word for word.
START = "/usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"
STOP = "/usr/sbin/iptables -D INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"
START6 = "/usr/sbin/ip6tables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"
STOP6 = "/usr/sbin/ip6tables -D INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"
KNOCKD = CommandAction(start=START, stop=STOP, start6=START6, stop6=STOP6)


@pytest.fixture
def backend(lab):
    """Torn down before the lab, so no worker thread outlives the namespace it was born in."""
    b = CommandBackend(timeout=10)
    try:
        yield b
    finally:
        assert b.shutdown(15)


def active(address: str, duration: float = 2) -> ActiveGrant:
    return ActiveGrant.start(Grant.create("ssh", address, ports=(), duration=duration, commands=KNOCKD), time.time())


def accept_rules(lab, binary: str, address: str) -> int:
    rules = sh(binary, "-w", "-S", "INPUT", ns=lab.server).stdout.splitlines()
    return sum(1 for r in rules if f"-s {address}/" in r and "--dport 22" in r and r.endswith("-j ACCEPT"))


def run_in_server(lab, backend: CommandBackend, action) -> None:
    """Queue work from inside the server namespace (the pool's threads are born there) and wait for it."""
    with in_netns(lab.server):
        action()
        assert backend.wait(10)
    assert all(r.ok for r in backend.results), list(backend.results)


def test_knockd_iptables_commands_open_and_close_v4(lab, backend):
    lab.default_deny("iptables-nft")
    assert not lab.probe(SERVER_V4)

    g = active(CLIENT_V4)
    run_in_server(lab, backend, lambda: backend.open(g))
    assert backend.results[-1].argv[2] == START.replace("%IP%", CLIENT_V4)
    assert lab.probe(SERVER_V4)
    assert not lab.probe(SERVER_V4, source=CLIENT2_V4)  # only the granted address
    assert accept_rules(lab, "iptables", CLIENT_V4) == 1

    # A re-grant of the same door and address runs nothing: still one rule.
    again = active(CLIENT_V4, duration=5)
    run_in_server(lab, backend, lambda: backend.open(again, previous=g))
    assert len(backend.results) == 1
    assert accept_rules(lab, "iptables", CLIENT_V4) == 1
    assert lab.probe(SERVER_V4)

    run_in_server(lab, backend, lambda: backend.close(again))
    assert [r.which for r in backend.results] == ["start", "stop"]
    assert accept_rules(lab, "iptables", CLIENT_V4) == 0
    assert not lab.probe(SERVER_V4)


def test_knockd_ip6tables_commands_open_and_close_v6(lab, backend):
    lab.default_deny("iptables-nft")
    assert not lab.probe(SERVER_V6)

    g = active(CLIENT_V6)
    run_in_server(lab, backend, lambda: backend.open(g))
    assert backend.results[-1].argv[2] == START6.replace("%IP%", CLIENT_V6)
    assert lab.probe(SERVER_V6)
    assert not lab.probe(SERVER_V6, source=CLIENT2_V6)
    assert not lab.probe(SERVER_V4)  # IPv4 untouched
    assert accept_rules(lab, "ip6tables", CLIENT_V6) == 1
    assert accept_rules(lab, "iptables", CLIENT_V6) == 0

    run_in_server(lab, backend, lambda: backend.close(g))
    assert backend.results[-1].argv[2] == STOP6.replace("%IP%", CLIENT_V6)
    assert accept_rules(lab, "ip6tables", CLIENT_V6) == 0
    assert not lab.probe(SERVER_V6)


def test_close_queued_right_behind_open_never_leaves_a_rule(lab, backend):
    """open() and close() back to back: the stop waits for the start, so no rule is left behind."""
    lab.default_deny("iptables-nft")
    g4, g6 = active(CLIENT_V4), active(CLIENT_V6)

    def both():
        for g in (g4, g6):
            backend.open(g)
            backend.close(g)

    run_in_server(lab, backend, both)
    assert len(backend.results) == 4
    assert accept_rules(lab, "iptables", CLIENT_V4) == 0
    assert accept_rules(lab, "ip6tables", CLIENT_V6) == 0
    assert not lab.probe(SERVER_V4)
    assert not lab.probe(SERVER_V6)


def test_commands_run_in_the_callers_namespace(lab, backend):
    """Processes forked by the pool's threads see the server namespace's interfaces, not the host's."""
    g = ActiveGrant.start(
        Grant.create("where", CLIENT_V4, ports=(), duration=2, commands=CommandAction(start="ip -o addr show dev veth0")),
        time.time(),
    )
    run_in_server(lab, backend, lambda: backend.open(g))
    out = backend.results[-1].stdout
    assert SERVER_V4 in out and CLIENT_V4 not in out
