"""knock-client --tcpflags puts raw TCP packets with exactly the requested flags on the wire, and opens flag doors."""

import subprocess
import sys
import time

import pytest

from spa.knock import ACK, FIN, FLAG_BITS, PSH, RST, SYN, URG
from spa.server.netns import SERVER_V4, SERVER_V6
from tests.netns.knockd_helpers import Server
from tests.netns.test_knock_client import capture, client_run

pytestmark = pytest.mark.netns

FIN_DOOR = """[options]
[fin]
    sequence = 7000,8000,9000
    tcpflags = fin,!ack
    open = 22/tcp
    cmd_timeout = 2
"""


def knock_client(lab, *args):
    return client_run(lab, sys.executable, "-m", "spa.client.cli", *args)


@pytest.mark.parametrize("server", [SERVER_V4, SERVER_V6])
@pytest.mark.parametrize(
    "flags, bits",
    [("fin,urg", FIN | URG), ("fin", FIN), ("Syn, ACK", SYN | ACK),
     ("fin,syn,rst,psh,ack,urg", FIN | SYN | RST | PSH | ACK | URG)],
)
def test_packets_carry_exactly_the_flags(lab, server, flags, bits):
    lab.default_deny("nft")  # the knocks must be seen although the firewall drops them
    run = {}
    argv = ("-v", "--tcpflags", flags, server, "7000", "8000:udp", "9000")
    seen = capture(lab, lambda: run.setdefault("r", knock_client(lab, *argv)))
    r = run["r"]
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert seen == [("tcp", 7000, bits), ("udp", 8000, 1), ("tcp", 9000, bits)], \
        "one raw packet per TCP knock with exactly these flags, one 1-byte datagram per UDP knock, in order, once"
    names = ",".join(n for n, b in FLAG_BITS.items() if bits & b)  # knockd's order, whatever the order given
    assert r.stdout.splitlines() == [f"hitting tcp {server}:7000 ({names})", f"hitting udp {server}:8000",
                                     f"hitting tcp {server}:9000 ({names})"]


def test_fin_urg_is_0x21_on_the_wire(lab):
    seen = capture(lab, lambda: knock_client(lab, "--tcpflags", "fin,urg", SERVER_V4, "7000"))
    assert seen == [("tcp", 7000, 0x21)]


def link_local(ns):
    """The link-local address of veth0 in ``ns``, once duplicate address detection is done with it."""
    end = time.monotonic() + 5
    while True:
        out = subprocess.run(["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", "veth0", "scope", "link"],
                             capture_output=True, text=True, check=True).stdout
        if "inet6 " in out and "tentative" not in out:
            return out.split("inet6 ", 1)[1].split("/", 1)[0]
        assert time.monotonic() < end, out
        time.sleep(0.05)


def test_link_local_with_a_zone(lab):
    link_local(lab.client)  # the client's own link-local address is the source
    server = link_local(lab.server)
    run = {}
    argv = ("--tcpflags", "fin,urg", f"{server}%veth0", "7000")
    seen = capture(lab, lambda: run.setdefault("r", knock_client(lab, *argv)))
    assert run["r"].returncode == 0 and run["r"].stderr == "", run["r"].stderr  # no "using broadcast" from scapy
    assert seen == [("tcp", 7000, FIN | URG)]


def test_scapy_is_imported_only_for_raw_knocks(lab):
    plain = client_run(lab, sys.executable, "-X", "importtime", "-m", "spa.client.cli", SERVER_V4, "7000")
    assert plain.returncode == 0 and "scapy" not in plain.stderr
    flagged = client_run(lab, sys.executable, "-X", "importtime", "-m", "spa.client.cli", "--tcpflags", "fin",
                         SERVER_V4, "7000")
    assert flagged.returncode == 0
    imported = {line.split("|")[-1].strip() for line in flagged.stderr.splitlines() if line.startswith("import time:")}
    assert {"scapy.layers.inet", "scapy.layers.inet6", "scapy.sendrecv"} <= imported
    assert "scapy.all" not in imported


def test_usage_error_and_no_route(lab):
    r = knock_client(lab, "--tcpflags", "fin,bogus", SERVER_V4, "7000")
    assert r.returncode == 2 and "unknown TCP flag 'bogus'" in r.stderr
    r = knock_client(lab, "--tcpflags", "fin", "198.51.100.1", "7000")  # the client namespace has no default route
    assert r.returncode == 1 and "cannot knock tcp 198.51.100.1:7000" in r.stderr, r.stderr


@pytest.mark.parametrize("server", [SERVER_V4, SERVER_V6])
def test_fin_door_opens_for_tcpflags_fin_but_not_for_a_plain_knock(lab, tmp_path, server):
    lab.default_deny("nft")
    spa = Server(lab, tmp_path, FIN_DOOR)
    try:
        assert not lab.probe(server)
        r = knock_client(lab, server, "7000", "8000", "9000")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, server, limit=2) is None, "SYN knocks must not open a fin,!ack door"
        assert "OPEN SESAME" not in spa.text()
        r = knock_client(lab, "--tcpflags", "fin", server, "7000", "8000", "9000")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, server, limit=2) is not None, spa.output()
        assert spa.wait_log("fin: OPEN SESAME")
        assert lab.wait_for(False, server, limit=5) is not None, "closes after cmd_timeout"
    finally:
        spa.stop()


def test_fin_ack_does_not_open_a_fin_not_ack_door(lab, tmp_path):
    lab.default_deny("nft")
    spa = Server(lab, tmp_path, FIN_DOOR)
    try:
        r = knock_client(lab, "--tcpflags", "fin,ack", SERVER_V4, "7000", "8000", "9000")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, SERVER_V4, limit=2) is None, "ack is forbidden by the door"
    finally:
        spa.stop()
