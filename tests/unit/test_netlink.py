"""rtnetlink message parsing on hand-built buffers: values, and no exception on any truncation."""

import errno
import ipaddress
import random
import socket
import struct

import pytest

from spa.server import netlink as nl

# -- builders (independent of the module's own) ------------------------------------


def attr(atype: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, atype) + data + b"\0" * ((-length) % 4)


def msg(mtype: int, payload: bytes, flags: int = 0, seq: int = 0) -> bytes:
    length = 16 + len(payload)
    return struct.pack("=IHHII", length, mtype, flags, seq, 0) + payload + b"\0" * ((-length) % 4)


def link_payload(index: int, name: str | None, flags: int, extra: bytes = b"") -> bytes:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, flags, 0xFFFFFFFF)
    if name is not None:
        body += attr(nl.IFLA_IFNAME, name.encode() + b"\0")
    return body + extra


def addr_payload(family: int, index: int, attrs: bytes, prefixlen: int = 24, scope: int = 0) -> bytes:
    return struct.pack("=BBBBI", family, prefixlen, 0, scope, index) + attrs


V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def sample_dump() -> bytes:
    """A realistic multi-message datagram: links, v4 and v6 addresses, DONE."""
    up = nl.IFF_UP | nl.IFF_RUNNING | nl.IFF_LOWER_UP
    return b"".join([
        msg(nl.RTM_NEWLINK, link_payload(1, "lo", up | nl.IFF_LOOPBACK,
                                         attr(nl.IFLA_OPERSTATE, b"\x00")), nl.NLM_F_MULTI, 7),
        msg(nl.RTM_NEWLINK, link_payload(2, "eth0", up), nl.NLM_F_MULTI, 7),
        msg(nl.RTM_NEWADDR, addr_payload(socket.AF_INET, 2, attr(nl.IFA_ADDRESS, V4("192.0.2.1").packed)
                                         + attr(nl.IFA_LOCAL, V4("192.0.2.1").packed)
                                         + attr(nl.IFA_LABEL, b"eth0\0")), nl.NLM_F_MULTI, 7),
        msg(nl.RTM_NEWADDR, addr_payload(socket.AF_INET6, 2, attr(nl.IFA_ADDRESS, V6("fe80::1").packed),
                                         64, 253), nl.NLM_F_MULTI, 7),
        msg(nl.NLMSG_DONE, struct.pack("=i", 0), nl.NLM_F_MULTI, 7),
    ])


# -- values --------------------------------------------------------------------------


def test_iter_messages_walks_aligned_messages():
    got = [(t, f, s, bytes(p)) for t, f, s, p in nl.iter_messages(sample_dump())]
    assert [t for t, *_ in got] == [nl.RTM_NEWLINK, nl.RTM_NEWLINK, nl.RTM_NEWADDR, nl.RTM_NEWADDR, nl.NLMSG_DONE]
    assert all(f == nl.NLM_F_MULTI and s == 7 for _, f, s, _ in got)
    # The payload excludes the 16-byte header and the trailing alignment padding.
    assert got[-1][3] == struct.pack("=i", 0)


def test_parse_link():
    up = nl.IFF_UP | nl.IFF_RUNNING | nl.IFF_LOWER_UP
    link = nl.parse_link(link_payload(4, "veth0", up))
    assert link == nl.Interface(4, "veth0", up)
    assert link.up and link.admin_up
    # Administratively up but no carrier (a veth whose peer is down): not up.
    no_carrier = nl.parse_link(link_payload(4, "veth0", nl.IFF_UP))
    assert no_carrier.admin_up and not no_carrier.up
    # LOWER_UP alone (without RUNNING) is enough once the interface is up.
    assert nl.parse_link(link_payload(4, "veth0", nl.IFF_UP | nl.IFF_LOWER_UP)).up
    down = nl.parse_link(link_payload(4, "veth0", nl.IFF_RUNNING | nl.IFF_LOWER_UP))
    assert not down.up and not down.admin_up


def test_parse_link_rejects_nameless_and_short():
    assert nl.parse_link(link_payload(4, None, nl.IFF_UP)) is None
    assert nl.parse_link(link_payload(4, "", nl.IFF_UP)) is None
    assert nl.parse_link(link_payload(0, "x", nl.IFF_UP)) is None
    assert nl.parse_link(b"\0" * 15) is None


def test_parse_link_name_without_nul_and_other_attrs_first():
    body = struct.pack("=BxHiII", 0, 1, 9, nl.IFF_UP, 0)
    body += attr(nl.IFLA_OPERSTATE, b"\x06") + attr(nl.IFLA_IFNAME, b"wg0")
    assert nl.parse_link(body) == nl.Interface(9, "wg0", nl.IFF_UP)


def test_parse_addr_v4_prefers_local():
    # On a point-to-point link IFA_ADDRESS is the peer, IFA_LOCAL ours.
    p = addr_payload(socket.AF_INET, 3, attr(nl.IFA_ADDRESS, V4("10.0.0.2").packed) + attr(nl.IFA_LOCAL, V4("10.0.0.1").packed), 32)
    assert nl.parse_addr(p) == (3, V4("10.0.0.1"))
    p = addr_payload(socket.AF_INET, 3, attr(nl.IFA_ADDRESS, V4("10.0.0.2").packed))
    assert nl.parse_addr(p) == (3, V4("10.0.0.2"))


def test_parse_addr_v6_link_local_has_no_scope():
    p = addr_payload(socket.AF_INET6, 5, attr(nl.IFA_ADDRESS, V6("fe80::abcd").packed), 64, 253)
    index, addr = nl.parse_addr(p)
    assert (index, addr) == (5, V6("fe80::abcd"))
    assert str(addr) == "fe80::abcd" and "%" not in str(addr)


def test_parse_addr_rejects_bad():
    assert nl.parse_addr(addr_payload(socket.AF_INET, 3, attr(nl.IFA_LOCAL, b"\x01\x02\x03"))) is None
    assert nl.parse_addr(addr_payload(socket.AF_INET6, 3, attr(nl.IFA_ADDRESS, b"\0" * 4))) is None
    assert nl.parse_addr(addr_payload(socket.AF_INET, 3, b"")) is None
    assert nl.parse_addr(addr_payload(socket.AF_PACKET, 3, attr(nl.IFA_ADDRESS, b"\0" * 6))) is None
    assert nl.parse_addr(b"\x02\x18\x00") is None


def test_parse_attrs():
    data = attr(1, b"abc") + attr(2 | 0x8000, b"nested") + attr(1, b"second")
    assert nl.parse_attrs(data) == {1: b"abc", 2: b"nested"}
    # A zero or too-short length ends the walk instead of looping.
    assert nl.parse_attrs(struct.pack("=HH", 0, 1) + attr(2, b"x")) == {}
    assert nl.parse_attrs(struct.pack("=HH", 3, 1)) == {}
    # A length past the end ends it too.
    assert nl.parse_attrs(attr(1, b"ok") + struct.pack("=HH", 64, 2) + b"short") == {1: b"ok"}


def test_iter_messages_stops_at_bad_lengths():
    good = msg(nl.RTM_NEWLINK, link_payload(1, "lo", 1))
    # length 0 and length < header: stop (never an endless loop)
    assert [t for t, *_ in nl.iter_messages(good + struct.pack("=IHHII", 0, 16, 0, 0, 0))] == [nl.RTM_NEWLINK]
    assert [t for t, *_ in nl.iter_messages(good + struct.pack("=IHHII", 8, 16, 0, 0, 0))] == [nl.RTM_NEWLINK]
    # length past the end of the buffer
    assert [t for t, *_ in nl.iter_messages(good + struct.pack("=IHHII", 400, 16, 0, 0, 0))] == [nl.RTM_NEWLINK]
    assert list(nl.iter_messages(b"")) == []


def test_has_change():
    assert nl.has_change(sample_dump())
    for t in (nl.RTM_NEWLINK, nl.RTM_DELLINK, nl.RTM_NEWADDR, nl.RTM_DELADDR, nl.NLMSG_OVERRUN):
        assert nl.has_change(msg(t, b""))
    assert not nl.has_change(msg(nl.NLMSG_NOOP, b"") + msg(nl.NLMSG_DONE, b"\0" * 4))
    assert not nl.has_change(msg(24, b"\0" * 12))  # RTM_NEWROUTE: not subscribed, not a change for us
    assert not nl.has_change(b"\x01\x02")


def test_parse_error():
    assert nl.parse_error(struct.pack("=i", -errno.EPERM) + b"\0" * 16) == errno.EPERM
    assert nl.parse_error(struct.pack("=i", 0)) == 0
    assert nl.parse_error(b"\0\0") == errno.EPROTO


def test_build_request_round_trip():
    req = nl.build_request(nl.RTM_GETADDR, 42, b"\0" * 8)
    (t, f, s, p), = nl.iter_messages(req)
    assert (t, s, bytes(p)) == (nl.RTM_GETADDR, 42, b"\0" * 8)
    assert f == nl.NLM_F_REQUEST | nl.NLM_F_DUMP
    assert struct.unpack_from("=I", req)[0] == len(req) == 24


# -- robustness ------------------------------------------------------------------------


def _parse_everything(buf) -> None:
    nl.has_change(buf)
    for t, _f, _s, payload in nl.iter_messages(buf):
        nl.parse_link(payload)
        nl.parse_addr(payload)
        nl.parse_attrs(payload, 16)
        if t == nl.NLMSG_ERROR:
            nl.parse_error(payload)


def test_every_truncation_is_harmless():
    data = sample_dump()
    for cut in range(len(data) + 1):
        _parse_everything(data[:cut])
        _parse_everything(memoryview(data)[cut:])
        _parse_everything(bytearray(data[:cut]))
    # Truncating a message's *payload* (its header claiming less) never raises either.
    for t, _f, _s, payload in nl.iter_messages(data):
        for cut in range(len(payload) + 1):
            nl.parse_link(payload[:cut])
            nl.parse_addr(payload[:cut])
            nl.parse_attrs(payload[:cut], 8)


def test_random_bytes_and_bit_flips_are_harmless():
    rng = random.Random(1234)
    data = bytearray(sample_dump())
    for _ in range(3000):
        _parse_everything(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80))))
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
        _parse_everything(flipped)


# -- the monitor's error handling (fake socket) ------------------------------------------


class _FakeSock:
    def __init__(self, script):
        self.script = list(script)

    def recv_into(self, buf):
        item = self.script.pop(0) if self.script else BlockingIOError(errno.EAGAIN, "again")
        if isinstance(item, BaseException):
            raise item
        buf[: len(item)] = item
        return len(item)

    def close(self):
        pass


@pytest.fixture
def monitor():
    m = nl.Monitor()  # an unprivileged netlink socket; replaced by the fake below
    m._sock.close()
    yield m
    m._sock = None


def test_monitor_overrun_is_a_change(monitor):
    monitor._sock = _FakeSock([OSError(errno.ENOBUFS, "No buffer space available")])
    assert monitor.drain() is True
    assert monitor.overruns == 1


def test_monitor_reads_everything_and_reports_changes(monitor):
    monitor._sock = _FakeSock([msg(nl.NLMSG_NOOP, b""), msg(nl.RTM_NEWADDR, b"\0" * 8), msg(nl.RTM_NEWLINK, b"")])
    assert monitor.drain() is True
    assert monitor._sock.script == []
    monitor._sock = _FakeSock([msg(nl.NLMSG_NOOP, b""), b"\x07"])
    assert monitor.drain() is False
    monitor._sock = _FakeSock([OSError(errno.EBADF, "bad")])
    assert monitor.drain() is False


def test_monitor_close_is_idempotent():
    m = nl.Monitor()
    assert m.fileno() >= 0
    m.close()
    m.close()
    assert m.fileno() == -1 and m.drain() is False


# -- the real kernel, unprivileged --------------------------------------------------------


def test_dumps_see_loopback():
    links = nl.interfaces()
    (lo,) = [link for link in links.values() if link.name == "lo"]
    addrs = nl.addresses(links)
    assert all(isinstance(a, (V4, V6)) for tup in addrs.values() for a in tup)
    if lo.admin_up:  # every namespace has lo; a fresh one has it down and without addresses
        assert V4("127.0.0.1") in addrs["lo"]
