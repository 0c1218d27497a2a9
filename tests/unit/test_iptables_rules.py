"""The iptables backend's pure parts: rule text, ``-S`` parsing, datestop; no root, no firewall."""

from __future__ import annotations

import calendar
import ipaddress
import shlex

import pytest

from spa.errors import BackendUnavailable, FirewallError
from spa.grant import ActiveGrant, PortSpec
from spa.server.firewall import iptables as ipt
from spa.server.firewall.iptables import (
    IptablesBackend,
    format_datestop,
    group_rules,
    parse_comment,
    parse_rule_line,
    parse_rules,
    restore_text,
    rule_args,
    rule_comment,
    rule_spec,
)

V4 = ipaddress.ip_address("192.0.2.2")
V6 = ipaddress.ip_address("2001:db8::2")
SSH = PortSpec(22, "tcp")
DNS = PortSpec(53, "udp")
# A line as `iptables -S SPA-GRANTS` prints it (iptables-nft and -legacy 1.8.9 alike);
# 1795847461 is 2026-11-28T06:31:01 UTC.
SAMPLE = (
    '-A SPA-GRANTS -s 192.0.2.2/32 -p tcp -m tcp --dport 22 -m time --datestop 2026-11-28T06:31:01 '
    '-m comment --comment "spa:ssh:1795847461.097" -j ACCEPT'
)


# -- datestop ------------------------------------------------------------------


def test_datestop_is_floor_of_deadline_in_utc():
    t = calendar.timegm((2026, 11, 28, 7, 0, 0))
    assert format_datestop(t) == "2026-11-28T07:00:00"
    assert format_datestop(t + 0.999) == "2026-11-28T07:00:00"
    assert format_datestop(t + 1.0) == "2026-11-28T07:00:01"
    assert format_datestop(t - 0.001) == "2026-11-28T06:59:59"


def test_datestop_ignores_local_timezone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    import time

    time.tzset()
    try:
        assert format_datestop(calendar.timegm((2026, 1, 2, 3, 4, 5))) == "2026-01-02T03:04:05"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_datestop_beyond_xt_time_range_is_none():
    assert format_datestop(ipt.LATEST_DATESTOP) == "2038-12-31T23:59:59"
    assert format_datestop(ipt.LATEST_DATESTOP + 1) is None
    args = rule_args(V4, SSH, "ssh", ipt.LATEST_DATESTOP + 10)
    assert "time" not in args and "--datestop" not in args
    assert parse_rule_line(f"-A SPA-GRANTS {rule_spec(V4, SSH, 'ssh', ipt.LATEST_DATESTOP + 10)}").port == SSH


# -- building ------------------------------------------------------------------


def test_rule_spec_matches_what_iptables_prints():
    assert f"-A SPA-GRANTS {rule_spec(V4, SSH, 'ssh', 1795847461.097)}" == SAMPLE


def test_rule_spec_ipv6_and_udp():
    spec = rule_spec(V6, DNS, "dns door", 1795847461.5)
    assert spec == (
        "-s 2001:db8::2/128 -p udp -m udp --dport 53 -m time --datestop 2026-11-28T06:31:01 "
        '-m comment --comment "spa:dns%20door:1795847461.500" -j ACCEPT'
    )


def test_rule_args_are_argv_without_quotes():
    args = rule_args(V4, SSH, 'we"ird door', 100.0)
    assert args[args.index("--comment") + 1] == "spa:we%22ird%20door:100.000"
    assert shlex.split(rule_spec(V4, SSH, 'we"ird door', 100.0)) == args


@pytest.mark.parametrize("door", ["ssh", "a:b", 'q"uote', "back\\slash", "tab\tx", "ünï cødé", "%41"])
def test_comment_roundtrip(door):
    comment = rule_comment(door, 1700000000.25)
    assert '"' not in comment and "\\" not in comment and " " not in comment
    assert comment.count(":") == 2
    assert parse_comment(comment) == (door, 1700000000.25)


def test_comment_too_long_is_a_firewall_error():
    with pytest.raises(FirewallError, match="too long"):
        rule_comment("é" * 63, 1700000000.0)
    rule_comment("a" * 127, 1700000000.0)  # plain ASCII at the door-name limit fits


@pytest.mark.parametrize("comment", ["spa-gatekeeper", "ssh:1.0", "spa:", "spa:ssh", "spa::1.0", "spa:a:b:1.0", "spa:a:x", "spa:a:inf"])
def test_comments_that_are_not_ours(comment):
    assert parse_comment(comment) is None


def test_restore_text_appends_then_deletes_in_one_commit():
    text = restore_text("SPA-GRANTS", ["NEW1", "NEW2"], ["OLD"])
    assert text == "*filter\n-A SPA-GRANTS NEW1\n-A SPA-GRANTS NEW2\n-D SPA-GRANTS OLD\nCOMMIT\n"
    assert restore_text("C", [], []) == "*filter\nCOMMIT\n"


# -- parsing -------------------------------------------------------------------


def test_parse_sample_line():
    r = parse_rule_line(SAMPLE)
    assert r is not None
    assert (r.door, r.address, r.port, r.deadline) == ("ssh", V4, SSH, 1795847461.097)
    assert r.spec == SAMPLE[len("-A SPA-GRANTS "):]


def test_parse_roundtrip_v6_escaped_door():
    spec = rule_spec(V6, DNS, "my door/ü", 1795847461.0)
    r = parse_rule_line(f"-A SPA-GRANTS {spec}")
    assert r == ipt.ParsedRule("my door/ü", V6, DNS, 1795847461.0, spec)


@pytest.mark.parametrize(
    "line",
    [
        "-N SPA-GRANTS",
        "-P INPUT DROP",
        "-A INPUT -j SPA-GRANTS",
        "-A SPA-GRANTS -s 192.0.2.9/32 -p tcp -m tcp --dport 22 -j ACCEPT",
        '-A SPA-GRANTS -s 192.0.2.9/32 -p tcp -m tcp --dport 22 -m comment --comment "admin" -j ACCEPT',
        # ours in shape but in another chain
        SAMPLE.replace("-A SPA-GRANTS", "-A OTHER"),
        # an spa comment on a rule we would never write
        '-A SPA-GRANTS -s 192.0.2.0/24 -p tcp -m tcp --dport 22 -m comment --comment "spa:x:1.000" -j ACCEPT',
        '-A SPA-GRANTS -p tcp -m tcp --dport 22 -m comment --comment "spa:x:1.000" -j ACCEPT',
        '-A SPA-GRANTS -s 192.0.2.2/32 -p tcp -m comment --comment "spa:x:1.000" -j ACCEPT',
        '-A SPA-GRANTS ! -s 192.0.2.2/32 -p tcp -m tcp --dport 22 -m comment --comment "spa:x:1.000" -j ACCEPT',
        '-A SPA-GRANTS -s 192.0.2.2/32 -p tcp -m tcp --dport 22 -m comment --comment "spa:x:1.000" -j DROP',
        '-A SPA-GRANTS -s 192.0.2.2/32 -p tcp -m tcp --dport 22 -m comment --comment "spa:x:1.000 -j ACCEPT',
        "# Warning: iptables-legacy tables present, use iptables-legacy to see them",
        "",
    ],
)
def test_lines_that_are_not_ours_are_ignored(line):
    assert parse_rule_line(line) is None


def test_parse_custom_chain():
    line = SAMPLE.replace("SPA-GRANTS", "MY-CHAIN")
    assert parse_rule_line(line) is None
    assert parse_rule_line(line, "MY-CHAIN").port == SSH


def test_group_rules_by_door_and_address():
    lines = [
        "-N SPA-GRANTS",
        f"-A SPA-GRANTS {rule_spec(V4, PortSpec(443), 'web', 200.0)}",
        f"-A SPA-GRANTS {rule_spec(V4, SSH, 'ssh', 100.0)}",
        f"-A SPA-GRANTS {rule_spec(V4, PortSpec(80), 'web', 200.0)}",
        "-A SPA-GRANTS -s 192.0.2.9/32 -j ACCEPT",
        f"-A SPA-GRANTS {rule_spec(V6, SSH, 'ssh', 150.0)}",
        # a leftover older rule of the same grant: the latest deadline wins, both specs kept
        f"-A SPA-GRANTS {rule_spec(V4, SSH, 'ssh', 90.0)}",
    ]
    grants = group_rules(parse_rules(lines))
    assert grants == [
        ActiveGrant("ssh", V4, (SSH,), 100.0),
        ActiveGrant("ssh", V6, (SSH,), 150.0),
        ActiveGrant("web", V4, (PortSpec(80), PortSpec(443)), 200.0),
    ]
    assert grants[0].detail == (rule_spec(V4, SSH, "ssh", 100.0), rule_spec(V4, SSH, "ssh", 90.0))
    assert len(grants[2].detail) == 2


# -- construction --------------------------------------------------------------


def _fake_which(present):
    return lambda name: f"/usr/sbin/{name}" if name in present else None


@pytest.mark.parametrize(
    "variant, names",
    [
        ("auto", ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore")),
        ("nft", ("iptables-nft", "ip6tables-nft", "iptables-nft-restore", "ip6tables-nft-restore")),
        ("legacy", ("iptables-legacy", "ip6tables-legacy", "iptables-legacy-restore", "ip6tables-legacy-restore")),
    ],
)
def test_variant_binaries(monkeypatch, variant, names):
    monkeypatch.setattr(ipt.runner, "which", _fake_which(names))
    b = IptablesBackend(variant)
    assert b._families[4].tool == f"/usr/sbin/{names[0]}"
    assert b._families[6].tool == f"/usr/sbin/{names[1]}"
    assert b._families[4].restore == f"/usr/sbin/{names[2]}"
    assert b._families[6].restore == f"/usr/sbin/{names[3]}"


def test_unknown_variant_and_bad_chain():
    with pytest.raises(ValueError):
        IptablesBackend("ebtables")
    for chain in ("", "has space", "-X", "A" * 29, "INPUT"):
        with pytest.raises(ValueError):
            IptablesBackend(chain=chain)


def test_unavailable_reason(monkeypatch):
    monkeypatch.setattr(ipt.runner, "which", _fake_which(()))
    reason = IptablesBackend.unavailable_reason()
    assert "iptables" in reason and "apt-get install iptables" in reason
    with pytest.raises(BackendUnavailable, match="apt-get install iptables"):
        IptablesBackend("nft")
    monkeypatch.setattr(ipt.runner, "which", _fake_which(("iptables",)))
    assert IptablesBackend.unavailable_reason() is None


def test_missing_ip6tables_refuses_v6_only(monkeypatch):
    monkeypatch.setattr(ipt.runner, "which", _fake_which(("iptables", "iptables-restore")))
    calls = []
    monkeypatch.setattr(ipt.runner, "run", lambda argv, **kw: calls.append(argv))
    b = IptablesBackend()
    with pytest.raises(BackendUnavailable, match="ip6tables.*IPv6"):
        b.open(ActiveGrant("ssh", V6, (SSH,), 100.0))
    assert calls == []
    b.close(ActiveGrant("ssh", V6, (SSH,), 100.0))  # nothing can be open: a no-op
    assert calls == []


class _FakeRun:
    """Stands in for ``runner.run``: answers ``-S`` from a list of chain states, records restores."""

    def __init__(self, listings, restore_fails=0):
        self.listings = list(listings)
        self.restore_fails = restore_fails
        self.restores: list[str] = []

    def __call__(self, argv, *, input=None, check=True, **kw):
        import subprocess

        if argv[0].endswith("-restore"):
            self.restores.append(input)
            if self.restore_fails:
                self.restore_fails -= 1
                raise FirewallError("firewall command failed", argv, 1, "line 3 failed")
            return subprocess.CompletedProcess(argv, 0, "", "")
        assert argv[1:] == ["-w", "-S", "SPA-GRANTS"], argv
        lines = self.listings.pop(0) if len(self.listings) > 1 else self.listings[0]
        return subprocess.CompletedProcess(argv, 0, "\n".join(["-N SPA-GRANTS", *lines]) + "\n", "")


def _backend(monkeypatch, fake):
    monkeypatch.setattr(ipt.runner, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(ipt.runner, "run", fake)
    return IptablesBackend("nft")


def test_open_appends_new_and_deletes_old_of_same_door_and_address(monkeypatch):
    old22 = rule_spec(V4, SSH, "ssh", 100.0)
    old80 = rule_spec(V4, PortSpec(80), "ssh", 100.0)
    other_door = rule_spec(V4, SSH, "web", 100.0)
    other_addr = rule_spec(ipaddress.ip_address("192.0.2.3"), SSH, "ssh", 100.0)
    lines = [f"-A SPA-GRANTS {s}" for s in (old22, other_door, old80, other_addr)]
    fake = _FakeRun([lines])
    b = _backend(monkeypatch, fake)
    new = ActiveGrant("ssh", V4, (SSH,), 200.0)
    b.open(new, ActiveGrant("ssh", V4, (SSH, PortSpec(80)), 100.0))
    assert fake.restores == [restore_text("SPA-GRANTS", [rule_spec(V4, SSH, "ssh", 200.0)], [old22, old80])]


def test_close_of_nothing_runs_no_restore(monkeypatch):
    fake = _FakeRun([[f"-A SPA-GRANTS {rule_spec(V4, SSH, 'web', 100.0)}"]])
    b = _backend(monkeypatch, fake)
    b.close(ActiveGrant("ssh", V4, (SSH,), 100.0))
    assert fake.restores == []


def test_vanished_rule_is_retried_once_with_a_fresh_listing(monkeypatch):
    old = rule_spec(V4, SSH, "ssh", 100.0)
    fake = _FakeRun([[f"-A SPA-GRANTS {old}"], []], restore_fails=1)
    b = _backend(monkeypatch, fake)
    b.open(ActiveGrant("ssh", V4, (SSH,), 200.0))
    new = rule_spec(V4, SSH, "ssh", 200.0)
    assert fake.restores == [restore_text("SPA-GRANTS", [new], [old]), restore_text("SPA-GRANTS", [new], [])]


def test_failure_with_unchanged_listing_raises_firewall_error(monkeypatch):
    old = rule_spec(V4, SSH, "ssh", 100.0)
    fake = _FakeRun([[f"-A SPA-GRANTS {old}"]], restore_fails=5)
    b = _backend(monkeypatch, fake)
    with pytest.raises(FirewallError) as exc:
        b.close(ActiveGrant("ssh", V4, (SSH,), 100.0))
    assert exc.value.argv == ["/usr/sbin/iptables-nft-restore", "-w", "--noflush"]
    assert exc.value.returncode == 1 and "line 3" in exc.value.stderr
    assert len(fake.restores) == 1
