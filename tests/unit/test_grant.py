import ipaddress

import pytest

from spa.errors import InvalidGrant
from spa.grant import (
    ActiveGrant,
    CommandAction,
    Grant,
    PortSpec,
    decode_label,
    encode_label,
    parse_address,
    parse_ports,
    regrant,
)


@pytest.mark.parametrize(
    "text, want",
    [("22", PortSpec(22, "tcp")), ("22/tcp", PortSpec(22)), ("53:udp", PortSpec(53, "udp")),
     (" 443 / TCP ", PortSpec(443, "tcp")), ("65535/udp", PortSpec(65535, "udp"))],
)
def test_port_parse(text, want):
    assert PortSpec.parse(text) == want
    assert str(PortSpec.parse(str(want))) == str(want)


@pytest.mark.parametrize("text", ["0", "65536", "abc", "-1", "22/sctp", "22/", "", "22/tcp/udp", "1e3"])
def test_port_parse_rejects(text):
    with pytest.raises(InvalidGrant):
        PortSpec.parse(text)


def test_port_list_sorted_without_repeats():
    assert parse_ports("443/tcp, 22 22/tcp 53:udp") == (PortSpec(22), PortSpec(53, "udp"), PortSpec(443))
    with pytest.raises(InvalidGrant, match="empty"):
        parse_ports(" , ")


@pytest.mark.parametrize(
    "text, want",
    [("192.0.2.7", "192.0.2.7"), ("2001:db8::7", "2001:db8::7"), ("fe80::1%eth0", "fe80::1"),
     ("::ffff:192.0.2.9", "192.0.2.9")],
)
def test_address_parse(text, want):
    assert parse_address(text) == ipaddress.ip_address(want)


@pytest.mark.parametrize("text", ["", "192.0.2", "300.1.1.1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "host.example"])
def test_address_rejects(text):
    with pytest.raises(InvalidGrant):
        parse_address(text)


def test_grant_validates_every_field():
    g = Grant.create("ssh", "192.0.2.2", "22/tcp", 10)
    assert g.key == ("ssh", ipaddress.ip_address("192.0.2.2"))
    with pytest.raises(InvalidGrant, match="door name is empty"):
        Grant.create("", "192.0.2.2", "22", 10)
    with pytest.raises(InvalidGrant, match="control"):
        Grant.create("a\nb", "192.0.2.2", "22", 10)
    with pytest.raises(InvalidGrant, match="longer"):
        Grant.create("x" * 128, "192.0.2.2", "22", 10)
    for bad in (0, -1, float("nan"), float("inf"), 10**9, True):
        with pytest.raises(InvalidGrant):
            Grant.create("ssh", "192.0.2.2", "22", bad)
    with pytest.raises(InvalidGrant, match="at least one port"):
        Grant.create("ssh", "192.0.2.2", (), 10)
    assert Grant.create("ssh", "192.0.2.2", (), 10, CommandAction(start="true")).ports == ()


def test_regrant_extends_never_shortens():
    g = Grant.create("ssh", "192.0.2.2", "22", 10)
    first = regrant(None, g, now=100.0)
    assert first.deadline == 110.0
    later = regrant(first, g, now=105.0)
    assert later.deadline == 115.0
    short = Grant.create("ssh", "192.0.2.2", "22 443", 2)
    kept = regrant(later, short, now=106.0)
    assert kept.deadline == 115.0 and kept.ports == (PortSpec(22), PortSpec(443))
    other = Grant.create("web", "192.0.2.2", "443", 1)
    assert regrant(later, other, now=106.0).deadline == 107.0


def test_commands_substitute_ip_and_fall_back_for_v6():
    action = CommandAction(start="add %IP% %IP%", stop="del %IP%")
    assert action.commands_for(ipaddress.ip_address("192.0.2.2")) == ("add 192.0.2.2 192.0.2.2", "del 192.0.2.2")
    assert action.commands_for(ipaddress.ip_address("2001:db8::2")) == ("add 2001:db8::2 2001:db8::2", "del 2001:db8::2")
    six = CommandAction(start="a %IP%", stop="d %IP%", start6="", stop6="d6 %IP%")
    assert six.commands_for(ipaddress.ip_address("2001:db8::2")) == (None, "d6 2001:db8::2")
    assert CommandAction.from_dict(six.to_dict()) == six


@pytest.mark.parametrize("door", ["ssh", "open close", 'q"uote', "ünï", "a%41", "x" * 127])
def test_label_round_trip_is_safe(door):
    label = encode_label(door)
    assert decode_label(label) == door
    assert all(c.isalnum() or c in "%._-~" for c in label) and label.isascii()


def test_active_grant_seconds_left():
    g = ActiveGrant.start(Grant.create("ssh", "192.0.2.2", "22", 5), now=10.0)
    assert g.seconds_left(12.5) == 2.5 and g.seconds_left(99) == 0.0
