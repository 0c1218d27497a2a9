"""Capture sockets and netlink against the real kernel, in the lab's namespaces.

Every socket of the capture is made inside ``in_netns(lab.server)``; client
sockets inside ``in_netns(lab.client)``. Waits are bounded by ``select``
timeouts, and "nothing arrived" is proven with a marker packet sent after
the one that must not be seen (or a second, accept-all witness capture),
not with sleeps.
"""

import contextlib
import logging
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from spa.server import netlink
from spa.server.bpf import DROP_ALL, compile_filter
from spa.server.capture import ACCEPT_ALL, Capture
from spa.server.netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns, sh

pytestmark = pytest.mark.netns

LOGGER = "spa.server.capture"
WAIT = 3.0


def udp7000():
    return compile_filter("udp dst port 7000")


def client_udp(lab, family=socket.AF_INET):
    """A UDP socket in the client namespace, bound to the client's primary address of ``family``."""
    with in_netns(lab.client):
        s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((CLIENT_V6 if family == socket.AF_INET6 else CLIENT_V4, 0))
    return s


def collect(cap, until, timeout=WAIT):
    """Read every socket of ``cap`` until ``until(packets)`` holds or ``timeout`` passes; the packets."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        socks = cap.sockets()
        if not socks:
            time.sleep(min(left, 0.01))
            continue
        ready, _, _ = select.select(socks, [], [], min(left, 0.1))
        for s in ready:
            got += cap.read(s)[1]
    return got


def has(token):
    return lambda pkts: any(token in p for p in pkts)


def udp_dport(pkt: bytes) -> int:
    """Destination port of a UDP packet with no IP options/extension headers."""
    off = (pkt[0] & 0x0F) * 4 if pkt[0] >> 4 == 4 else 40
    return struct.unpack_from("!H", pkt, off + 2)[0]


def src_of(pkt: bytes) -> str:
    if pkt[0] >> 4 == 4:
        return socket.inet_ntop(socket.AF_INET, pkt[12:16])
    return socket.inet_ntop(socket.AF_INET6, pkt[8:24])


# -- (a) netlink --------------------------------------------------------------------------


def test_addresses_and_monitor(lab):
    with in_netns(lab.server):
        links = netlink.interfaces()
        veth = [link for link in links.values() if link.name == "veth0"]
        assert veth and veth[0].up and veth[0].admin_up
        addrs = netlink.addresses(links)
        veth_addrs = {str(a) for a in addrs["veth0"]}
        assert {SERVER_V4, SERVER_V6} <= veth_addrs
        assert any(a.startswith("fe80::") and "%" not in a for a in veth_addrs)

        with netlink.Monitor() as mon:
            mon.drain()  # whatever the lab's set-up still announces (DAD, for one)
            sh("ip", "addr", "add", "198.51.100.1/32", "dev", "veth0", ns=lab.server)
            ready, _, _ = select.select([mon], [], [], WAIT)
            assert ready and mon.drain() is True
            assert "198.51.100.1" in {str(a) for a in netlink.addresses()["veth0"]}
            sh("ip", "link", "set", "veth0", "down", ns=lab.server)
            ready, _, _ = select.select([mon], [], [], WAIT)
            assert ready and mon.drain() is True
            assert not [link for link in netlink.interfaces().values() if link.name == "veth0"][0].up


# -- (b) what is read ---------------------------------------------------------------------


def test_reads_incoming_v4_and_v6_from_the_ip_header(lab):
    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap:
        assert len(cap.sockets()) == 2 and cap.status() == {"veth0": "open"}
        c4, c6 = client_udp(lab), client_udp(lab, socket.AF_INET6)
        c4.sendto(b"knock-v4", (SERVER_V4, 7000))
        c6.sendto(b"knock-v6", (SERVER_V6, 7000))
        c4.sendto(b"other-port", (SERVER_V4, 7001))  # filtered out in the kernel
        got = collect(cap, lambda p: has(b"knock-v4")(p) and has(b"knock-v6")(p))
        v4 = [p for p in got if b"knock-v4" in p]
        v6 = [p for p in got if b"knock-v6" in p]
        assert len(v4) == 1 and len(v6) == 1
        assert v4[0][0] >> 4 == 4 and src_of(v4[0]) == CLIENT_V4 and udp_dport(v4[0]) == 7000
        assert v6[0][0] >> 4 == 6 and src_of(v6[0]) == CLIENT_V6 and udp_dport(v6[0]) == 7000
        assert v4[0].endswith(b"knock-v4") and len(v4[0]) == 20 + 8 + 8
        assert not has(b"other-port")(got)
        assert cap.stats["packets"] == len(got)
        assert cap.kernel_stats()["packets"] >= 2 and cap.kernel_stats()["drops"] == 0
        c4.close()
        c6.close()


def test_a_packet_longer_than_a_ring_frame_keeps_its_headers_and_real_length(lab):
    """The ring holds 432 bytes of a packet: a bigger knock still counts; its payload is not read whole."""
    from spa.packet import Truncated, fields, udp_payload

    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap:
        c4, c6 = client_udp(lab), client_udp(lab, socket.AF_INET6)
        c4.sendto(b"big-v4" + b"x" * 1200, (SERVER_V4, 7000))
        c6.sendto(b"big-v6" + b"y" * 1200, (SERVER_V6, 7000))
        got = collect(cap, lambda p: has(b"big-v4")(p) and has(b"big-v6")(p))
        v4 = [p for p in got if b"big-v4" in p]
        v6 = [p for p in got if b"big-v6" in p]
        assert len(v4) == 1 and len(v6) == 1
        assert type(v4[0]) is Truncated and v4[0].wire_len == 20 + 8 + 1206 and len(v4[0]) < v4[0].wire_len
        assert type(v6[0]) is Truncated and v6[0].wire_len == 40 + 8 + 1206
        assert fields(v4[0])[3:5] == (c4.getsockname()[1], 7000)
        assert fields(v6[0])[4] == 7000
        assert udp_payload(v4[0]) is None and udp_payload(v6[0]) is None
        c4.close()
        c6.close()


def test_outgoing_packets_are_not_seen(lab):
    with in_netns(lab.server), Capture(["veth0"], filter=ACCEPT_ALL) as cap:
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s4.sendto(b"from-server", (CLIENT_V4, 7000))
        s6.sendto(b"from-server", (CLIENT_V6, 7000))
        c4 = client_udp(lab)
        c4.sendto(b"marker", (SERVER_V4, 7000))  # sent after: once it is read, the others had their chance
        got = collect(cap, has(b"marker"))
        assert has(b"marker")(got)
        # Nothing the server sent; the client's ICMP port-unreachable (which quotes "from-server") is incoming.
        assert all(src_of(p) not in (SERVER_V4, SERVER_V6) for p in got)
        assert not [p for p in got if b"from-server" in p and p[9 if p[0] >> 4 == 4 else 6] == 17]
        for s in (s4, s6, c4):
            s.close()


# -- (c) the filter is in place before the socket receives ---------------------------------------


# Sends to SERVER_V4:7000 and [SERVER_V6]:7000 as fast as it can, for at most argv[1] seconds.
_FLOOD = """
import socket, sys, time
c4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c4.bind((sys.argv[2], 0))
c6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); c6.bind((sys.argv[3], 0))
dst4, dst6 = (sys.argv[4], 7000), (sys.argv[5], 7000)
end = time.monotonic() + float(sys.argv[1])
print("go", flush=True)
while time.monotonic() < end:
    for _ in range(100):
        try:
            c4.sendto(b"flood", dst4); c6.sendto(b"flood", dst6)
        except OSError:
            pass
"""


@contextlib.contextmanager
def flood(lab, limit=20.0):
    """A process in the client namespace flooding the server (true concurrency, unlike a thread)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.client, sys.executable, "-c", _FLOOD, str(limit),
         CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline().strip() == b"go"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


def test_no_unfiltered_packet_before_the_filter(lab):
    with in_netns(lab.server), Capture(["veth0"], filter=ACCEPT_ALL) as witness, flood(lab):
        # The witness proves the traffic is there while the DROP_ALL captures open.
        assert has(b"flood")(collect(witness, has(b"flood")))
        caps = []
        try:
            for _ in range(40):  # many binds under traffic: bind-before-attach would let packets in
                cap = Capture(["veth0"], filter=DROP_ALL)
                caps.append(cap)
                assert cap.status() == {"veth0": "open"}
            # More traffic, seen by the witness, reached every capture's filter too.
            seen = witness.stats["packets"]
            collect(witness, lambda p: witness.stats["packets"] > seen + 100)
            assert witness.stats["packets"] > seen + 100
            for cap in caps:
                ready, _, _ = select.select(cap.sockets(), [], [], 0)
                assert ready == []
                assert all(cap.read(s)[1] == [] for s in cap.sockets())
                assert cap.kernel_stats() == {"packets": 0, "drops": 0}
            # Swapping the program on live sockets lets packets in.
            cap = caps[-1]
            cap.set_filter(udp7000())
            got = collect(cap, lambda p: {x[0] >> 4 for x in p if b"flood" in x} == {4, 6})
            assert {p[0] >> 4 for p in got if b"flood" in p} == {4, 6}
            assert cap.kernel_stats()["packets"] > 0
        finally:
            for cap in caps:
                cap.close()


def test_set_filter_rejects_a_bad_program_and_keeps_the_old(lab):
    from spa.server.bpf import FilterError

    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap:
        with pytest.raises(FilterError):
            cap.set_filter([(0x06, 0, 0, 0)] * 5000)  # over BPF_MAXINSNS
        with pytest.raises(FilterError):
            cap.set_filter([(0x15, 5, 5, 0)])  # jumps out of the program, no return
        with pytest.raises(FilterError):
            Capture(["veth0"], filter=[(0x15, 5, 5, 0)])
        c4 = client_udp(lab)
        c4.sendto(b"still", (SERVER_V4, 7000))
        assert has(b"still")(collect(cap, has(b"still")))
        c4.close()


# -- (d) interface down and up ------------------------------------------------------------


def _wait_link(lab, name, up, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        links = [x for x in netlink.interfaces().values() if x.name == name]
        if links and links[0].up == up:
            return
        time.sleep(0.01)
    raise AssertionError(f"{name} did not become {'up' if up else 'down'}")


def test_interface_down_then_up(lab, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap, netlink.Monitor() as mon:
        c4 = client_udp(lab)
        c4.sendto(b"before", (SERVER_V4, 7000))
        assert has(b"before")(collect(cap, has(b"before")))

        old = cap.sockets()
        version = cap.version
        sh("ip", "link", "set", "veth0", "down", ns=lab.server)
        # The kernel reports the outage on every socket: readable, and read() does not raise.
        ready, _, _ = select.select(old, [], [], WAIT)
        assert ready
        for s in old:
            assert cap.read(s)[1] == []
        assert cap.status() == {"veth0": "down"} and cap.sockets() == [] and cap.version > version
        assert cap.stats["read_errors"] == 1
        assert "interface veth0 went down: [Errno 100] Network is down; waiting for it" in caplog.text
        # refresh() while it is down: nothing to open, nothing logged again.
        assert cap.refresh() is False
        assert caplog.text.count("went down") == 1

        # Both ends up (a veth has no carrier while its peer is down), then what the daemon does.
        sh("ip", "link", "set", "veth0", "up", ns=lab.server)
        sh("ip", "link", "set", "veth0", "up", ns=lab.client)
        ready, _, _ = select.select([mon], [], [], WAIT)
        assert ready and mon.drain() is True
        assert cap.refresh() is True
        assert cap.status() == {"veth0": "open"} and len(cap.sockets()) == 2
        assert "interface veth0 is back" in caplog.text and cap.stats["reopens"] == 1
        _wait_link(lab, "veth0", up=True)
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while not has(b"after")(got) and time.monotonic() < deadline:
            c4.sendto(b"after", (SERVER_V4, 7000))  # ARP/ND may need a moment after carrier returns
            got += collect(cap, has(b"after"), timeout=0.2)
        assert has(b"after")(got)
        c4.close()


def test_refresh_first_closes_a_down_interface(lab, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap:
        old = cap.sockets()
        sh("ip", "link", "set", "veth0", "down", ns=lab.server)
        assert cap.refresh() is True  # the monitor's news came before the socket error was read
        assert cap.status() == {"veth0": "down"} and cap.sockets() == []
        assert all(cap.read(s)[1] == [] for s in old)  # stale sockets: ignored, no raise
        assert caplog.text.count("interface veth0 went down") == 1


def test_down_and_up_before_read_recovers_without_refresh(lab, caplog):
    """The error is read after the interface is back: read() reopens at once."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap:
        old = cap.sockets()
        sh("ip", "link", "set", "veth0", "down", ns=lab.server)
        sh("ip", "link", "set", "veth0", "up", ns=lab.server)
        ready, _, _ = select.select(old, [], [], WAIT)
        for s in ready:
            assert cap.read(s)[1] == []
        assert cap.status() == {"veth0": "open"} and cap.stats["reopens"] == 1
        assert "went down" in caplog.text and "is back" in caplog.text
        _wait_link(lab, "veth0", up=True)
        # IPv4 only: down flushes the interface's IPv6 addresses (keep_addr_on_down=0), 2001:db8::1 is gone.
        c4 = client_udp(lab)
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while not has(b"again")(got) and time.monotonic() < deadline:
            c4.sendto(b"again", (SERVER_V4, 7000))
            got += collect(cap, has(b"again"), timeout=0.2)
        assert has(b"again")(got)
        c4.close()


# -- (e) an interface that is not there yet ---------------------------------------------------


def add_link(lab, name):
    """A dummy interface, or (kernels without the dummy driver) a veth whose peer stays down."""
    if sh("ip", "link", "add", name, "type", "dummy", ns=lab.server, check=False).returncode != 0:
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", name + "p", ns=lab.server)


def test_missing_interface_is_not_fatal(lab, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with in_netns(lab.server), Capture(["veth0", "nosuch0"], filter=ACCEPT_ALL) as cap:
        assert cap.status() == {"veth0": "open", "nosuch0": "missing"}
        assert "interface nosuch0 does not exist; waiting for it" in caplog.text
        assert cap.refresh() is False and caplog.text.count("nosuch0 does not exist") == 1

        add_link(lab, "nosuch0")
        assert cap.refresh() is False and cap.status()["nosuch0"] == "down"  # exists, not up yet
        sh("ip", "link", "set", "nosuch0", "up", ns=lab.server)
        assert cap.refresh() is True
        assert cap.status() == {"veth0": "open", "nosuch0": "open"} and len(cap.sockets()) == 4
        assert "capturing on interface nosuch0" in caplog.text

        # Deleted and made again under the same name: a new index, so new sockets.
        first = set(cap.sockets())
        sh("ip", "link", "del", "nosuch0", ns=lab.server)
        assert cap.refresh() is True and cap.status()["nosuch0"] == "missing"
        assert "interface nosuch0 is gone; waiting for it" in caplog.text
        add_link(lab, "nosuch0")
        sh("ip", "link", "set", "nosuch0", "up", ns=lab.server)
        assert cap.refresh() is True and cap.status()["nosuch0"] == "open"
        assert len(set(cap.sockets()) - first) == 2 and cap.stats["reopens"] == 1


def test_late_interface_receives(lab):
    """An interface made after start (a second veth to the client) is captured once it is up."""
    with in_netns(lab.server), Capture(["late0"], filter=udp7000()) as cap:
        assert cap.sockets() == [] and cap.status() == {"late0": "missing"}
        sh("ip", "link", "add", "late0", "netns", lab.server, "type", "veth", "peer", "name", "late0", "netns", lab.client)
        for ns, addr in ((lab.server, "203.0.113.1/24"), (lab.client, "203.0.113.2/24")):
            sh("ip", "addr", "add", addr, "dev", "late0", ns=ns)
            sh("ip", "link", "set", "late0", "up", ns=ns)
        assert cap.refresh() is True
        c4 = client_udp(lab)
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while not has(b"late")(got) and time.monotonic() < deadline:
            c4.sendto(b"late", ("203.0.113.1", 7000))
            got += collect(cap, has(b"late"), timeout=0.2)
        assert has(b"late")(got) and src_of(got[0]) == CLIENT_V4  # only late0 is captured
        c4.close()


# -- (f) any -------------------------------------------------------------------------------


def test_any_receives_on_every_interface(lab, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with in_netns(lab.server), Capture(["any", "veth0"], filter=udp7000()) as cap:
        assert cap.status() == {"any": "open"} and len(cap.sockets()) == 2
        assert "'any' covers every interface" in caplog.text
        c4, c6 = client_udp(lab), client_udp(lab, socket.AF_INET6)
        c4.sendto(b"any-veth-v4", (SERVER_V4, 7000))
        c6.sendto(b"any-veth-v6", (SERVER_V6, 7000))
        # Loopback: sent and received by this host; the receive side is seen, once.
        lo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        lo.sendto(b"any-lo", ("127.0.0.1", 7000))
        tokens = (b"any-veth-v4", b"any-veth-v6", b"any-lo")
        got = collect(cap, lambda p: all(has(t)(p) for t in tokens))
        for t in tokens:
            assert sum(t in p for p in got) == 1, t
        # A second interface, made after start, needs no refresh with "any".
        sh("ip", "link", "add", "late1", "netns", lab.server, "type", "veth", "peer", "name", "late1", "netns", lab.client)
        for ns, addr in ((lab.server, "203.0.113.1/24"), (lab.client, "203.0.113.2/24")):
            sh("ip", "addr", "add", addr, "dev", "late1", ns=ns)
            sh("ip", "link", "set", "late1", "up", ns=ns)
        deadline = time.monotonic() + WAIT
        while not has(b"any-late")(got) and time.monotonic() < deadline:
            c4.sendto(b"any-late", ("203.0.113.1", 7000))
            got += collect(cap, has(b"any-late"), timeout=0.2)
        assert has(b"any-late")(got)
        # ip link set down on one interface does not disturb "any".
        sh("ip", "link", "set", "late1", "down", ns=lab.server)
        c4.sendto(b"any-still", (SERVER_V4, 7000))
        assert has(b"any-still")(collect(cap, has(b"any-still")))
        assert cap.status() == {"any": "open"} and cap.stats["read_errors"] == 0
        for s in (c4, c6, lo):
            s.close()


# -- frames for another host's MAC ----------------------------------------------------------------


def _mac(lab, ns, dev):
    out = sh("ip", "-o", "link", "show", dev, ns=ns).stdout
    return out.split("link/ether", 1)[1].split()[0]


def test_frames_for_another_mac_are_dropped(lab):
    """A frame with our IP but another host's MAC (promiscuous capture) is no knock: the IP stack drops it too."""
    with in_netns(lab.server), Capture(["veth0"], filter=udp7000()) as cap, \
            Capture(["veth0"], filter=udp7000(), drop_otherhost=False) as witness:
        c4 = client_udp(lab)
        sh("ip", "neigh", "replace", SERVER_V4, "lladdr", "02:00:00:00:00:99", "dev", "veth0", "nud", "permanent",
           ns=lab.client)
        c4.sendto(b"wrong-mac", (SERVER_V4, 7000))
        assert has(b"wrong-mac")(collect(witness, has(b"wrong-mac")))
        sh("ip", "neigh", "replace", SERVER_V4, "lladdr", _mac(lab, lab.server, "veth0"), "dev", "veth0", "nud",
           "permanent", ns=lab.client)
        c4.sendto(b"right-mac", (SERVER_V4, 7000))
        got = collect(cap, has(b"right-mac"))
        assert has(b"right-mac")(got) and not has(b"wrong-mac")(got)
        c4.close()


def test_ipv4_only(lab):
    with in_netns(lab.server), Capture(["veth0"], ipv6=False, filter=udp7000()) as cap:
        assert len(cap.sockets()) == 1
        c4, c6 = client_udp(lab), client_udp(lab, socket.AF_INET6)
        c6.sendto(b"six", (SERVER_V6, 7000))
        c4.sendto(b"four", (SERVER_V4, 7000))
        got = collect(cap, has(b"four"))
        assert has(b"four")(got) and not has(b"six")(got)
        c4.close()
        c6.close()
