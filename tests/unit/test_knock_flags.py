"""knock-client --tcpflags: the flag list, the usage errors, root, and what is handed to the raw sender (no network)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

import spa.client.raw as raw
from spa.client.cli import main
from spa.client.knock import KnockTarget
from spa.client.raw import ROOT_NEEDED, flag_names, parse_flags
from spa.errors import SpaError
from spa.knock import ACK, FIN, FLAG_BITS, PSH, RST, SYN, URG


@pytest.mark.parametrize(
    "text, want",
    [
        ("fin", FIN),
        ("fin,urg", FIN | URG),
        ("FIN,Urg", FIN | URG),
        ("fin, urg", FIN | URG),
        ("  syn ,  ack  ", SYN | ACK),
        ("urg,fin", FIN | URG),
        ("fin,fin", FIN),
        ("fin,syn,rst,psh,ack,urg", FIN | SYN | RST | PSH | ACK | URG),
        ("psh", PSH),
    ],
)
def test_parse_flags(text, want):
    assert parse_flags(text) == want


def test_fin_urg_is_0x21():
    assert parse_flags("fin,urg") == 0x21


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "at least one"),
        ("  ", "at least one"),
        ("fin,", "comma too many"),
        ("fin,,urg", "comma too many"),
        ("bogus", "unknown TCP flag 'bogus'"),
        ("fin,ece", "unknown TCP flag 'ece'"),
        ("fin urg", "unknown TCP flag 'fin urg'"),
        ("!ack", "no '!' here"),
        ("fin,!ack", "no '!' here"),
    ],
)
def test_parse_flags_rejects(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_flags(text)


def test_flag_names_round_trip():
    for bits in range(1, 64):
        assert parse_flags(flag_names(bits)) == bits
    assert flag_names(FIN | URG) == "fin,urg"
    assert flag_names(FLAG_BITS["urg"] | FLAG_BITS["ack"] | FLAG_BITS["fin"]) == "fin,ack,urg"


@pytest.mark.parametrize("value", ["bogus", "fin,!ack", "", "fin,,syn"])
def test_cli_unknown_flag_is_a_usage_error(value):
    r = CliRunner().invoke(main, ["--tcpflags", value, "192.0.2.1", "7000"])
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--tcpflags'" in r.output


def test_cli_not_root_exits_1_before_importing_scapy(monkeypatch):
    monkeypatch.setattr(raw.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(raw, "_Sender", lambda: pytest.fail("scapy must not be loaded without root"))
    r = CliRunner().invoke(main, ["--tcpflags", "fin", "192.0.2.1", "7000"])
    assert r.exit_code == 1
    assert ROOT_NEEDED in r.output
    assert ROOT_NEEDED == "--tcpflags needs root (raw sockets)"


class FakeSender:
    def __init__(self):
        self.sent = []
        self.closed = False

    def send(self, family, address, dport, flags, sport, seq, scope_id=0):
        self.sent.append((family, address, dport, flags, sport, seq, scope_id))

    def close(self):
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    sender = FakeSender()
    udp = []
    monkeypatch.setattr(raw.os, "geteuid", lambda: 0)
    monkeypatch.setattr(raw, "_Sender", lambda: sender)
    monkeypatch.setattr(raw, "send_knock", lambda fam, sockaddr, t: udp.append((sockaddr, t.port)))
    monkeypatch.setattr(raw, "resolve", lambda host, family: (socket.AF_INET, ("192.0.2.1", 0)))
    sender.udp = udp
    return sender


def test_tcp_knocks_raw_udp_knocks_plain(fake):
    lines = []
    targets = [KnockTarget(7000, "tcp"), KnockTarget(8000, "udp"), KnockTarget(9000, "tcp")]
    raw.knock_raw("server", targets, FIN | URG, verbose=lines.append, rng=random.Random(1))
    assert [(s[2], s[3]) for s in fake.sent] == [(7000, 0x21), (9000, 0x21)]
    assert fake.udp == [(("192.0.2.1", 0), 8000)]  # send_knock gets resolve()'s socket address
    assert lines == ["hitting tcp 192.0.2.1:7000 (fin,urg)", "hitting udp 192.0.2.1:8000",
                     "hitting tcp 192.0.2.1:9000 (fin,urg)"]
    assert fake.closed


def test_ipv6_zone_reaches_the_sender(fake, monkeypatch):
    monkeypatch.setattr(raw, "resolve", lambda host, family: (socket.AF_INET6, ("fe80::1", 0, 0, 3)))
    lines = []
    raw.knock_raw("fe80::1%eth0", [KnockTarget(7000, "tcp")], FIN, verbose=lines.append)
    assert fake.sent[0][:4] == (socket.AF_INET6, "fe80::1", 7000, FIN) and fake.sent[0][6] == 3
    assert lines == ["hitting tcp fe80::1:7000 (fin)"]


def test_source_ports_and_sequence_numbers_are_random(fake):
    raw.knock_raw("server", [KnockTarget(7000 + i, "tcp") for i in range(20)], FIN, rng=random.Random(7))
    sports = [s[4] for s in fake.sent]
    seqs = [s[5] for s in fake.sent]
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(v) for v in f.read().split())
    assert all(low <= p <= high for p in sports)
    assert len(set(sports)) > 15 and len(set(seqs)) == 20
    assert all(0 <= s < 2**32 for s in seqs)


def test_only_udp_knocks_need_neither_root_nor_scapy(monkeypatch):
    udp = []
    monkeypatch.setattr(raw.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(raw, "_Sender", lambda: pytest.fail("no raw packet to send"))
    monkeypatch.setattr(raw, "send_knock", lambda fam, sockaddr, t: udp.append(t.port))
    monkeypatch.setattr(raw, "resolve", lambda host, family: (socket.AF_INET, ("192.0.2.1", 0)))
    raw.knock_raw("server", [KnockTarget(8000, "udp")], FIN)
    assert udp == [8000]


def test_send_errors_are_knock_errors(fake, monkeypatch):
    def refuse(*a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fake, "send", refuse)
    with pytest.raises(SpaError, match="needs root"):
        raw.knock_raw("server", [KnockTarget(7000, "tcp")], FIN)
    assert fake.closed


def test_ephemeral_port_falls_back_when_the_range_cannot_be_read(monkeypatch):
    def no_proc(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr("builtins.open", no_proc)
    assert all(32768 <= raw.ephemeral_port(random.Random(i)) <= 60999 for i in range(50))


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "spa.client.cli", "--help"],
        ["-c", "import spa.client.cli, spa.client.raw; spa.client.raw.parse_flags('fin,urg')"],
    ],
)
def test_scapy_is_not_imported_unless_a_raw_packet_is_sent(argv):
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "scapy" not in r.stderr
