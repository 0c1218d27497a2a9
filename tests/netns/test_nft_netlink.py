"""The nft backend writing grants over raw nfnetlink, against a real kernel: both families, real connects."""

from __future__ import annotations

import errno
import subprocess
import time

import pytest

from spa.errors import FirewallError
from spa.grant import ActiveGrant, Grant
from spa.server.firewall import nfnetlink as nl
from spa.server.firewall.nft import NftBackend, _Step
from spa.server.netns import CLIENT2_V4, CLIENT2_V6, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns

pytestmark = pytest.mark.netns

FAMILIES = {"v4": (CLIENT_V4, CLIENT2_V4, SERVER_V4), "v6": (CLIENT_V6, CLIENT2_V6, SERVER_V6)}


def _active(client, duration, door="ssh", ports="22/tcp"):
    return ActiveGrant.start(Grant.create(door, client, ports, duration), time.time())


def _set_json(version: int) -> str:
    return subprocess.run(
        ["nft", "-j", "list", "set", "inet", "spa", f"allow{version}"], capture_output=True, text=True, check=True
    ).stdout


def _op(backend: NftBackend, grant: ActiveGrant, op: str) -> nl.ElementOp:
    """What the backend would send to ``op`` the grant's elements, through its own rendering."""
    return backend._netlink_op(_Step(op, grant, grant.ports, grant.deadline - time.time()))


def _held(backend: NftBackend) -> list[tuple]:
    return [(x.door, x.address, x.ports) for x in backend.list()]


@pytest.fixture
def nft_lab(lab):
    """The lab with nftables' default deny and our table set up, inside the server namespace."""
    lab.default_deny("nft")
    with in_netns(lab.server):
        backend = NftBackend()
        backend.setup()
        try:
            yield lab, backend
        finally:
            backend.teardown()
            backend.close_transports()


@pytest.mark.parametrize("family", FAMILIES)
def test_netlink_open_is_read_back_by_list_and_lets_connects_through(nft_lab, family):
    lab, backend = nft_lab
    client, _other, server = FAMILIES[family]
    assert backend.element_kind == "netlink"
    assert not lab.probe(server)
    g = _active(client, 2, door="web door/α", ports="22/tcp 53/udp")
    backend.open(g)
    assert lab.probe(server), "a TCP connect must get through the netlink-written element"
    [listed] = backend.list()
    assert (listed.door, listed.address, listed.ports) == ("web door/α", g.address, g.ports)
    # list() reads whole seconds left, truncated.
    assert g.deadline - 1.1 <= listed.deadline <= g.deadline + 0.1
    backend.close(g)
    assert not lab.probe(server)
    assert backend.list() == []


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_timeout_is_exact_milliseconds(nft_lab, family):
    lab, backend = nft_lab
    client, _other, server = FAMILIES[family]
    g = _active(client, 1.3)
    backend.open(g)
    assert lab.probe(server)
    # No close(): the kernel alone closes it. The JSON path would give 2 s.
    assert lab.wait_for(False, server, limit=3) is not None
    closed_at = time.time()
    assert closed_at <= g.deadline + 0.5, f"closed {closed_at - g.deadline:.2f} s after the deadline"
    assert closed_at >= g.deadline - 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_create_on_an_existing_element_falls_back_to_refresh(nft_lab, family):
    lab, backend = nft_lab
    client, _other, server = FAMILIES[family]
    short = _active(client, 1, door="a")
    backend.open(short)
    g = _active(client, 30, door="b")
    with pytest.raises(nl.NetlinkError) as info:
        backend._writer.apply([_op(backend, g, "create")])
    assert info.value.errno == errno.EEXIST
    backend.open(g)  # a first grant for door b: create fails, refresh renews the element
    [listed] = backend.list()
    assert listed.door == "b" and listed.deadline > time.time() + 25
    time.sleep(1.3)
    assert lab.probe(server), "the renewed timeout must outlive the first grant's"


@pytest.mark.parametrize("family", FAMILIES)
def test_open_new_creates_from_its_template_or_says_no(nft_lab, family):
    lab, backend = nft_lab
    client, other, server = FAMILIES[family]
    assert backend.prompt
    g = _active(client, 30, door="web door/α", ports="22/tcp 53/udp")
    assert backend.open_new(g)
    assert lab.probe(server)
    assert not backend.open_new(_active(client, 5, door="web door/α", ports="22/tcp 53/udp")), "it exists"
    assert not backend.open_new(_active(client, 5, door="other", ports="22/tcp")), "one of its elements exists"
    assert backend.open_new(_active(other, 30, door="web door/α", ports="22/tcp 53/udp"))  # the same template
    held = sorted(_held(backend), key=lambda h: str(h[1]))
    assert held == sorted([("web door/α", g.address, g.ports), ("web door/α", _active(other, 1).address, g.ports)],
                          key=lambda h: str(h[1]))
    [mine] = [x for x in backend.list() if x.address == g.address]
    assert g.deadline - 1.1 <= mine.deadline <= g.deadline + 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_open_many_is_one_transaction_for_two_addresses(nft_lab, family):
    lab, backend = nft_lab
    client, other, server = FAMILIES[family]
    a, b = _active(client, 2), _active(other, 2)
    backend.open_many([(a, None), (b, None)])
    assert {x.address for x in backend.list()} == {a.address, b.address}
    assert lab.probe(server, source=client)
    # The client's second IPv6 address may need a neighbour exchange first: wait, do not probe once.
    assert lab.wait_for(True, server, source=other, limit=2) is not None


@pytest.mark.parametrize("bad", ["no-such-set", "short-key"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_bad_element_fails_the_whole_transaction(nft_lab, family, bad):
    lab, backend = nft_lab
    client, other, server = FAMILIES[family]
    held = _active(client, 2)
    backend.open(held)
    before = _held(backend)
    version = held.address.version
    new = _active(other, 2)
    ops = [_op(backend, new, "add"), _op(backend, held, "delete")]
    if bad == "no-such-set":
        ops.append(nl.ElementOp("add", "nosuch", ops[0].elements))
    else:
        ops.append(nl.ElementOp("add", f"allow{version}", (nl.Element(b"\x01\x02\x03\x04\x05", 1000, "x"),)))
    with pytest.raises(FirewallError) as info:
        backend._writer.apply(ops)
    assert isinstance(info.value, nl.NetlinkError) and info.value.errno in (errno.ENOENT, errno.EINVAL)
    assert _held(backend) == before, "nothing of a failed transaction may stay"
    assert _set_json(version).count(str(new.address)) == 0
    assert lab.probe(server, source=client) and not lab.probe(server, source=other)


def test_a_missing_table_is_a_firewall_error_naming_the_operation(lab):
    with in_netns(lab.server):
        backend = NftBackend(elements="netlink")  # no setup(): there is no table
        try:
            with pytest.raises(FirewallError, match=r"create element inet spa allow4 .*No such file"):
                backend._writer.apply([_op(backend, _active(CLIENT_V4, 1), "create")])
        finally:
            backend.close_transports()


@pytest.mark.parametrize("family", FAMILIES)
def test_json_elements_still_open_and_close(lab, family):
    client, _other, server = FAMILIES[family]
    lab.default_deny("nft")
    with in_netns(lab.server):
        backend = NftBackend(elements="json")
        assert backend.element_kind == backend.transport_kind != "netlink"
        backend.setup()
        try:
            g = _active(client, 2)
            backend.open(g)
            assert lab.probe(server)
            assert [(x.door, x.address, x.ports) for x in backend.list()] == [("ssh", g.address, g.ports)]
            backend.close(g)
            assert not lab.probe(server)
        finally:
            backend.teardown()
            backend.close_transports()
