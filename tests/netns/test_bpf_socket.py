"""A compiled knock filter on a real AF_PACKET SOCK_DGRAM socket: the kernel drops what does not match.

The socket is opened with protocol 0 (it receives nothing), the filter is
attached, and only then is it bound to the interface and protocol: no
unfiltered packet can slip in between.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from spa.filter import knock_filter
from spa.knock import ACK, SYN, TcpFlags
from spa.packet import parse_ip
from spa.server.bpf import DROP_ALL, attach_filter, compile_filter
from spa.server.netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns

pytestmark = pytest.mark.netns

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD


def _capture_socket(lab, ethertype: int, insns) -> socket.socket:
    with in_netns(lab.server):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    attach_filter(sock, insns)
    sock.bind(("veth0", ethertype))
    return sock


def _received(sock: socket.socket, seconds: float = 0.5) -> list[bytes]:
    """Every packet the socket hands up within ``seconds`` (inbound only)."""
    sock.settimeout(0.05)
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if addr[2] != socket.PACKET_OUTGOING:
            out.append(data)
    return out


def _send_udp(lab, family: int, source: str, target: str, ports) -> None:
    with in_netns(lab.client):
        s = socket.socket(family, socket.SOCK_DGRAM)
    with s:
        s.bind((source, 0))
        for port in ports:
            s.sendto(b"knock", (target, port))


@pytest.mark.parametrize("family,ethertype,server,client", [
    (socket.AF_INET, ETH_P_IP, SERVER_V4, CLIENT_V4),
    (socket.AF_INET6, ETH_P_IPV6, SERVER_V6, CLIENT_V6),
])
def test_only_the_knock_port_reaches_user_space(lab, family, ethertype, server, client):
    dst = ipaddress.ip_address(server)
    prog = compile_filter(knock_filter([dst], [("udp", 7000, None)]))
    sock = _capture_socket(lab, ethertype, prog)
    with sock:
        # 7001 first: were it let through, it would be seen before 7000.
        _send_udp(lab, family, client, server, [7001, 7000, 7001])
        packets = _received(sock)
    assert len(packets) == 1, [p.hex() for p in packets]
    knock = parse_ip(packets[0], 1.0)
    assert knock is not None
    assert (knock.proto, knock.dport, knock.src, knock.dst) == ("udp", 7000, ipaddress.ip_address(client), dst)


def test_tcp_flag_test_in_the_kernel(lab):
    """A SYN to a syn,!ack port passes; the server's answer traffic and other ports do not."""
    prog = compile_filter(knock_filter(
        [ipaddress.ip_address(SERVER_V4), ipaddress.ip_address(SERVER_V6)],
        [("tcp", 22, TcpFlags(SYN, ACK))],
    ))
    sock4 = _capture_socket(lab, ETH_P_IP, prog)
    sock6 = _capture_socket(lab, ETH_P_IPV6, prog)
    with sock4, sock6:
        # A full connect to the lab's service on 22: one SYN, then ACKs (and a FIN/ACK) that must not pass.
        assert lab.probe(SERVER_V4, 22)
        assert lab.probe(SERVER_V6, 22)
        _send_udp(lab, socket.AF_INET, CLIENT_V4, SERVER_V4, [22])
        got4, got6 = _received(sock4), _received(sock6, 0.1)
    for got, client in ((got4, CLIENT_V4), (got6, CLIENT_V6)):
        knocks = [parse_ip(p, 0.0) for p in got]
        assert [(k.proto, k.dport, k.flags & (SYN | ACK), str(k.src)) for k in knocks] == [("tcp", 22, SYN, client)]


def test_filter_replaced_on_a_live_socket(lab):
    dst = ipaddress.ip_address(SERVER_V4)
    sock = _capture_socket(lab, ETH_P_IP, DROP_ALL)
    with sock:
        _send_udp(lab, socket.AF_INET, CLIENT_V4, SERVER_V4, [7000])
        assert _received(sock, 0.3) == []
        attach_filter(sock, compile_filter(knock_filter([dst], [("udp", 7000, None)])))
        _send_udp(lab, socket.AF_INET, CLIENT_V4, SERVER_V4, [7001, 7000])
        got = [parse_ip(p, 0.0) for p in _received(sock, 0.3)]
    assert [(k.proto, k.dport) for k in got] == [("udp", 7000)]
