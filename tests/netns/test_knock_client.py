"""knock-client puts on the wire what knockd's own ``knock`` client puts there."""

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from spa.server.netns import SERVER_V4, SERVER_V6, in_netns

pytestmark = pytest.mark.netns
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ETH_P_ALL = 0x0003


def capture(lab, run, seconds=1.3):
    """(proto, dport, tcp flags or udp payload length) of every IP packet the server receives while ``run`` runs."""
    with in_netns(lab.server):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind(("veth0", 0))
    sock.settimeout(0.05)
    run()
    seen = []
    end = time.monotonic() + seconds  # long enough to see a SYN retransmission (1 s) if there were one
    while time.monotonic() < end:
        try:
            frame, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        ethertype = struct.unpack("!H", frame[12:14])[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            proto, l4 = frame[14 + 9], frame[14 + ihl:]
        elif ethertype == 0x86DD:
            proto, l4 = frame[14 + 6], frame[14 + 40:]
        else:
            continue
        if proto == 6:
            seen.append(("tcp", struct.unpack("!H", l4[2:4])[0], l4[13]))
        elif proto == 17:
            seen.append(("udp", struct.unpack("!H", l4[2:4])[0], struct.unpack("!H", l4[4:6])[0] - 8))
    sock.close()
    return [s for s in seen if s[1] != 22]


def client_run(lab, *argv):
    return subprocess.run(["ip", "netns", "exec", lab.client, *argv], capture_output=True, text=True, cwd=ROOT, timeout=30)


@pytest.mark.parametrize("server", [SERVER_V4, SERVER_V6])
def test_same_packets_as_knock(lab, server):
    lab.default_deny("nft")  # knocks must be seen although the firewall drops them
    ports = ["7000", "8000:udp", "9000"]
    want = [("tcp", 7000, 0x02), ("udp", 8000, 1), ("tcp", 9000, 0x02)]
    ours = {}
    theirs = capture(lab, lambda: ours.setdefault("r", client_run(lab, sys.executable, "-m", "spa.client.cli", "-v", server, *ports)))
    assert ours["r"].returncode == 0, ours["r"].stderr
    assert theirs == want, "one SYN per TCP knock, one 1-byte datagram per UDP knock, in order, no retransmission"
    assert ours["r"].stdout.splitlines() == [f"hitting tcp {server}:7000", f"hitting udp {server}:8000", f"hitting tcp {server}:9000"]
    oracle = {}
    reference = capture(lab, lambda: oracle.setdefault("r", client_run(lab, "knock", "-v", server, *ports)))
    assert reference == theirs, "the real knock client sends the same packets"
    assert ours["r"].stdout == oracle["r"].stdout


def test_resolution_failure_exits_non_zero(lab):
    r = client_run(lab, sys.executable, "-m", "spa.client.cli", "no-such-host.invalid", "7000")
    assert r.returncode == 1 and "cannot resolve 'no-such-host.invalid'" in r.stderr
