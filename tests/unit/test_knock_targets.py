import pytest

from spa.client.knock import KnockTarget, parse_target
from spa.errors import InvalidGrant


def fake_services(name, proto):
    if name == "ssh":
        return 22
    raise OSError("unknown")


@pytest.mark.parametrize(
    "text, udp, want",
    [
        ("7000", False, KnockTarget(7000, "tcp")),
        ("7000:udp", False, KnockTarget(7000, "udp")),
        ("7000:UDP", False, KnockTarget(7000, "udp")),
        ("7000:tcp", True, KnockTarget(7000, "udp")),  # -u overrides, as in knock
        ("7000:sctp", False, KnockTarget(7000, "tcp")),  # knock: any other suffix is TCP
        ("ssh", False, KnockTarget(22, "tcp")),
    ],
)
def test_parse_target_like_knock(text, udp, want):
    assert parse_target(text, force_udp=udp, lookup=fake_services) == want


@pytest.mark.parametrize("text", ["0", "65536", "nosuchservice", ""])
def test_parse_target_rejects(text):
    with pytest.raises(InvalidGrant):
        parse_target(text, lookup=fake_services)
