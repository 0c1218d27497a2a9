"""The iptables backend against a real kernel: iptables-nft and iptables-legacy, IPv4 and IPv6.

Every claim is proved with TCP connects from the client namespace to the
server's port 22 behind a default-deny INPUT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from spa.errors import FirewallError
from spa.grant import ActiveGrant, Grant, PortSpec
from spa.server.firewall import run as runner
from spa.server.firewall.iptables import DEFAULT_CHAIN, IptablesBackend
from spa.server.netns import (
    CLIENT2_V4,
    CLIENT2_V6,
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    Lab,
    in_netns,
)

pytestmark = pytest.mark.netns

# The kernel stops matching at floor(deadline) + 1 s; allow for probe granularity.
EXPIRY_SLACK = 1.5


@dataclass(frozen=True)
class Family:
    version: int
    client: str
    client2: str
    server: str


FAMILIES = {"v4": Family(4, CLIENT_V4, CLIENT2_V4, SERVER_V4), "v6": Family(6, CLIENT_V6, CLIENT2_V6, SERVER_V6)}


@dataclass
class Env:
    lab: Lab
    variant: str
    fam: Family
    backend: IptablesBackend
    #: ``-S`` of both families after the default deny, before ``setup``
    before: dict[str, list[str]]

    @property
    def tool(self) -> str:
        return f"{'ip6tables' if self.fam.version == 6 else 'iptables'}-{self.variant}"

    def tools(self) -> tuple[str, str]:
        return (f"iptables-{self.variant}", f"ip6tables-{self.variant}")

    def fw(self, method: str, *args):
        """Call a backend method inside the server namespace."""
        with in_netns(self.lab.server):
            return getattr(self.backend, method)(*args)

    def S(self, tool: str, *chain: str) -> list[str]:
        with in_netns(self.lab.server):
            return runner.run([tool, "-w", "-S", *chain]).stdout.splitlines()

    def snapshot(self) -> dict[str, list[str]]:
        return {t: self.S(t) for t in self.tools()}

    def grant_rules(self) -> list[str]:
        return [line for line in self.S(self.tool, DEFAULT_CHAIN) if line.startswith(f"-A {DEFAULT_CHAIN} ")]

    def active(self, duration: float, ports: str = "22/tcp", door: str = "ssh", address: str | None = None) -> ActiveGrant:
        return ActiveGrant.start(Grant.create(door, address or self.fam.client, ports, duration), time.time())

    def is_open(self, **kw) -> bool:
        return self.lab.probe(self.fam.server, **kw)


@pytest.fixture(params=["nft", "legacy"])
def variant(request) -> str:
    return request.param


@pytest.fixture(params=sorted(FAMILIES))
def fam(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture
def env(lab: Lab, variant: str, fam: Family) -> Iterator[Env]:
    lab.default_deny(f"iptables-{variant}")
    with in_netns(lab.server):
        backend = IptablesBackend(variant)
    e = Env(lab, variant, fam, backend, {})
    e.before = e.snapshot()
    e.fw("setup")
    try:
        yield e
    finally:
        e.fw("teardown")


def test_setup_is_idempotent_and_checks_clean(env: Env):
    env.fw("setup")
    env.fw("setup")
    assert env.fw("check") == []
    for tool in env.tools():
        inp = env.S(tool, "INPUT")
        assert inp.count(f"-A INPUT -j {DEFAULT_CHAIN}") == 1
        assert inp[1] == f"-A INPUT -j {DEFAULT_CHAIN}", "the jump must come before every other INPUT rule"
        assert env.S(tool, DEFAULT_CHAIN) == [f"-N {DEFAULT_CHAIN}"]
    assert env.fw("list") == []


def test_open_regrant_close(env: Env):
    assert not env.is_open(), "the default deny must hold before any grant"

    first = env.active(30, "22/tcp, 2222/tcp")
    env.fw("open", first)
    assert env.lab.wait_for(True, env.fam.server, limit=2) is not None
    assert len(env.grant_rules()) == 2
    [held] = env.fw("list")
    assert (held.key, held.ports) == (first.key, first.ports)
    # The deadline is read back from the rule comment, to the millisecond.
    assert held.deadline == pytest.approx(first.deadline, abs=0.001)
    assert len(held.detail) == 2

    # Re-grant: later deadline, one port fewer. One commit: the port never closes,
    # each port keeps exactly one rule, the dropped port's rule goes.
    second = env.active(60, "22/tcp")
    assert second.deadline > first.deadline
    env.fw("open", second, first)
    assert env.is_open()
    rules = env.grant_rules()
    assert len(rules) == 1 and "--dport 22 " in rules[0]
    [held] = env.fw("list")
    assert held.ports == (PortSpec(22),)
    assert held.deadline == pytest.approx(second.deadline, abs=0.001)

    # The same grant again (a replayed open) still leaves one rule.
    env.fw("open", second, second)
    assert len(env.grant_rules()) == 1

    env.fw("close", second)
    assert env.lab.wait_for(False, env.fam.server, limit=2) is not None
    assert env.grant_rules() == []
    assert env.fw("list") == []
    env.fw("close", second)  # closing what is not open: a no-op, not an error
    env.fw("close", first)
    assert env.grant_rules() == []
    assert env.fw("check") == []


def test_grant_is_for_its_address_only(env: Env):
    other = env.active(30, address=env.fam.client2)
    env.fw("open", other)
    assert env.lab.wait_for(True, env.fam.server, limit=2, source=env.fam.client2) is not None
    assert not env.is_open(), "a grant to another address must not open for this one"
    # Closing this address's (absent) grant of the same door leaves the other one alone.
    env.fw("close", env.active(30))
    assert env.is_open(source=env.fam.client2)
    [held] = env.fw("list")
    assert str(held.address) == env.fam.client2
    env.fw("close", other)
    assert not env.is_open(source=env.fam.client2)


def test_kernel_closes_without_the_daemon(env: Env):
    grant = env.active(1.5)
    env.fw("open", grant)
    assert env.is_open()
    # No close(): the daemon is "dead". The time match alone must end it.
    waited = env.lab.wait_for(False, env.fam.server, limit=grant.deadline + EXPIRY_SLACK - time.time())
    closed_at = time.time()
    assert waited is not None, f"still open {EXPIRY_SLACK} s after the deadline"
    assert closed_at >= grant.deadline - 0.3, "closed before its deadline"
    # The rule is still there (the kernel stops matching, it does not delete):
    # list() reports it, close() removes it.
    assert [g.key for g in env.fw("list")] == [grant.key]
    env.fw("close", grant)
    assert env.grant_rules() == []


def test_regrant_extends_in_the_kernel(env: Env):
    first = env.active(1.0)
    env.fw("open", first)
    assert env.is_open()
    time.sleep(0.3)
    second = env.active(2.5)
    env.fw("open", second, first)
    assert len(env.grant_rules()) == 1
    # Past the latest moment the first rule could still match (floor(deadline) + 1 s),
    # the extension keeps it open...
    time.sleep(max(0.0, math.floor(first.deadline) + 1.1 - time.time()))
    assert time.time() < second.deadline - 0.3
    assert env.is_open(), "the re-grant did not extend the kernel deadline"
    # ...and the kernel ends the extended grant on its own.
    waited = env.lab.wait_for(False, env.fam.server, limit=second.deadline + EXPIRY_SLACK - time.time())
    assert waited is not None
    assert time.time() >= second.deadline - 0.3


def test_teardown_restores_the_ruleset(env: Env):
    env.fw("open", env.active(30))
    env.fw("open", env.active(30, address=env.fam.client2, door="other door"))
    assert env.is_open()
    env.fw("teardown")
    assert env.snapshot() == env.before
    assert not env.is_open()
    env.fw("teardown")  # idempotent
    assert env.snapshot() == env.before
    assert env.fw("list") == []  # no chain: nothing held
    problems = env.fw("check")
    assert any("missing" in p for p in problems) and any("no jump" in p for p in problems)
    env.fw("close", env.active(30))  # no chain: still not an error
    with pytest.raises(FirewallError) as exc:
        env.fw("open", env.active(30))  # no chain: a precise error, nothing half done
    assert exc.value.argv[0].endswith(f"{env.tool}-restore") and exc.value.returncode
    assert exc.value.stderr
    assert env.snapshot() == env.before


def test_check_and_setup_repair(env: Env):
    with in_netns(env.lab.server):
        runner.run([env.tool, "-w", "-D", "INPUT", "-j", DEFAULT_CHAIN])
    problems = env.fw("check")
    assert len(problems) == 1 and "no jump" in problems[0] and env.tool in problems[0]
    env.fw("setup")
    assert env.fw("check") == []
    with in_netns(env.lab.server):
        runner.run([env.tool, "-w", "-A", "INPUT", "-j", DEFAULT_CHAIN])
    assert "2 times" in " ".join(env.fw("check"))
    env.fw("setup")
    assert env.fw("check") == []
    assert env.S(env.tool, "INPUT").count(f"-A INPUT -j {DEFAULT_CHAIN}") == 1


def test_rules_not_ours_are_left_alone(env: Env):
    src = f"{env.fam.client2}/{128 if env.fam.version == 6 else 32}"
    foreign = ["-s", src, "-p", "tcp", "-m", "tcp", "--dport", "22", "-m", "comment", "--comment", "admin", "-j", "ACCEPT"]
    with in_netns(env.lab.server):
        runner.run([env.tool, "-w", "-A", DEFAULT_CHAIN, *foreign])
    grant = env.active(30)
    env.fw("open", grant)
    assert [(g.key, g.ports) for g in env.fw("list")] == [(grant.key, grant.ports)]
    env.fw("close", grant)
    rules = env.grant_rules()
    assert len(rules) == 1 and "--comment admin" in rules[0]
    assert env.is_open(source=env.fam.client2)
    assert not env.is_open()
