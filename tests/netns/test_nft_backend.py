"""The nft backend against a real kernel, for each default-deny style and both address families."""

import subprocess
import time

import pytest

from spa.grant import ActiveGrant, Grant
from spa.server.firewall.nft import NftBackend
from spa.server.netns import CLIENT2_V4, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns

pytestmark = pytest.mark.netns

FAMILIES = {"v4": (CLIENT_V4, SERVER_V4), "v6": (CLIENT_V6, SERVER_V6)}


def _active(client, duration, door="ssh", ports="22/tcp"):
    return ActiveGrant.start(Grant.create(door, client, ports, duration), time.time())


def _ruleset():
    return subprocess.run(["nft", "-s", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


def _legacy():
    out = []
    for b in ("iptables-legacy", "ip6tables-legacy"):
        out.append(subprocess.run([b, "-S"], capture_output=True, text=True).stdout)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_open_then_kernel_closes_on_time(lab, deny_style, family):
    client, server = FAMILIES[family]
    lab.default_deny(deny_style)
    with in_netns(lab.server):
        before = (_ruleset(), _legacy())
        backend = NftBackend()
        backend.setup()
        assert backend.check() == []
        assert not lab.probe(server), "default deny must filter the port"
        g = _active(client, 1.5)
        backend.open(g)
        assert lab.probe(server), f"granted port must open ({deny_style}, {family})"
        assert [(x.door, x.address, x.ports) for x in backend.list()] == [("ssh", g.address, g.ports)]
        # No close(): the kernel's timeout alone must close it (daemon dead).
        closed = lab.wait_for(False, server, limit=4)
        assert closed is not None
        assert time.time() <= g.deadline + 1.2, "nft timeout is whole seconds, rounded up"
        assert backend.list() == []
        backend.teardown()
        assert (_ruleset(), _legacy()) == before, "teardown must remove exactly what setup added"
        backend.teardown()  # idempotent


def test_regrant_extends_without_duplicates_and_close_is_idempotent(lab):
    lab.default_deny("nft")
    with in_netns(lab.server):
        backend = NftBackend()
        backend.setup()
        first = _active(CLIENT_V4, 1)
        backend.open(first)
        second = _active(CLIENT_V4, 30, ports="22/tcp 2222/tcp")
        backend.open(second, first)
        listed = backend.list()
        assert len(listed) == 1 and listed[0].ports == second.ports
        assert listed[0].deadline > time.time() + 20, "the re-grant's longer deadline must be in the kernel"
        out = subprocess.run(["nft", "-j", "list", "set", "inet", "spa", "allow4"], capture_output=True, text=True).stdout
        assert out.count('"192.0.2.2"') == 2  # one element per port, not one per grant
        time.sleep(1.3)
        assert lab.probe(SERVER_V4), "still open after the first grant's deadline"
        narrower = _active(CLIENT_V4, 30)
        backend.open(narrower, second)
        assert backend.list()[0].ports == narrower.ports, "ports dropped from a door are closed"
        backend.close(narrower)
        assert not lab.probe(SERVER_V4)
        backend.close(narrower)  # closing what is closed is fine
        backend.teardown()


def test_grant_opens_for_that_address_only(lab):
    lab.default_deny("iptables-nft")
    with in_netns(lab.server):
        backend = NftBackend()
        backend.setup()
        backend.open(_active(CLIENT2_V4, 10))
        assert lab.probe(SERVER_V4, source=CLIENT2_V4)
        assert not lab.probe(SERVER_V4, source=CLIENT_V4)
        assert not lab.probe(SERVER_V6)
        backend.teardown()


def test_check_sees_a_flushed_ruleset_and_setup_repairs_it(lab):
    lab.default_deny("nft")
    with in_netns(lab.server):
        backend = NftBackend()
        backend.setup()
        subprocess.run(["nft", "delete", "table", "inet", "spa"], check=True)
        assert backend.check() == ["table inet spa is missing"]
        subprocess.run(["nft", "flush", "ruleset"], check=True)
        lab.default_deny("nft")  # the admin reloads their own rules
        problems = backend.check()
        assert problems and "missing" in problems[0]
        backend.setup()
        assert backend.check() == []
        backend.open(_active(CLIENT_V4, 5))
        assert lab.probe(SERVER_V4)
        backend.teardown()


def test_nft_process_transport_when_libnftables_is_not_used(lab):
    from spa.server.firewall.libnft import NftProcess

    lab.default_deny("nft")
    with in_netns(lab.server):
        backend = NftBackend(transport=NftProcess())
        assert backend.transport_kind == "nft-process"
        backend.setup()
        g = _active(CLIENT_V6, 10)
        backend.open(g)
        assert lab.probe(SERVER_V6)
        assert [x.address for x in backend.list()] == [g.address]
        backend.close(g)
        assert not lab.probe(SERVER_V6)
        backend.teardown()
