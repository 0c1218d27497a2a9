"""Rotating candidates for the matcher: names, guards against port scans, boundaries, used-once tokens."""

from __future__ import annotations

import ipaddress

from spa import rotating
from spa.knock import Knock
from spa.matcher import MatchDoor, Matcher
from spa.rotating_match import (
    KeyRing,
    RotatingDoor,
    boundaries,
    guards,
    internal_name,
    parse_name,
    plan,
    used_token,
    used_until,
)

SECRET = bytes(range(32))
PARAMS = rotating.Params(interval=30, length=4, lo=20000, hi=20199, proto="tcp")
SRC = ipaddress.ip_address("192.0.2.2")
DST = ipaddress.ip_address("192.0.2.1")


def door(**kw) -> RotatingDoor:
    ring = KeyRing("k", PARAMS, (("aaaa", SECRET, None),))
    return RotatingDoor("rot", (ring,), **kw)


def scan(matcher: Matcher, ports) -> list:
    events = []
    for i, p in enumerate(ports):
        events += matcher.feed(Knock(SRC, DST, "tcp", 40000 + i, p, 0x02, i, float(i) * 0.001))
    return events


def ascending_counter() -> int:
    for c in range(100000):
        seq = rotating.derive(SECRET, "rot", c, PARAMS)
        if all(a.port < b.port for a, b in zip(seq, seq[1:])):
            return c
    raise AssertionError("no ascending sequence found")


def test_names_round_trip_and_classic_names_are_not_candidates():
    name = internal_name("my door", "abcd", 42)
    assert parse_name(name) == ("my door", "abcd", 42, "")
    assert parse_name(internal_name("d", "k", 1, "192.0.2.2")) == ("d", "k", 1, "192.0.2.2")
    assert parse_name("my door") is None


def test_guards_are_the_neighbours_inside_the_range_that_are_not_steps():
    seq = rotating.derive(SECRET, "rot", 7, PARAMS)
    g = guards(seq, PARAMS)
    assert not set(g) & set(seq)
    for s in seq:
        for p in (s.port - 1, s.port + 1):
            if PARAMS.lo <= p <= PARAMS.hi and all(x.port != p for x in seq):
                assert any(x.port == p for x in g)
    assert all(PARAMS.lo <= x.port <= PARAMS.hi for x in g)


def test_a_scan_completes_an_ascending_sequence_without_guards_but_never_with_them():
    c = ascending_counter()
    seq = rotating.derive(SECRET, "rot", c, PARAMS)
    bare = Matcher([MatchDoor("x", seq, 5.0)])
    assert any(e.kind == "open" for e in scan(bare, range(PARAMS.lo, PARAMS.hi + 1)))  # why guards exist
    guarded = Matcher([MatchDoor("x", seq, 5.0, guards=guards(seq, PARAMS))])
    assert not any(e.kind == "open" for e in scan(guarded, range(PARAMS.lo, PARAMS.hi + 1)))
    reverse = Matcher([MatchDoor("x", tuple(reversed(seq)), 5.0, guards=guards(seq, PARAMS))])
    assert not any(e.kind == "open" for e in scan(reverse, range(PARAMS.hi, PARAMS.lo - 1, -1)))


def test_the_sequence_itself_still_opens_with_guards():
    seq = rotating.derive(SECRET, "rot", 3, PARAMS)
    m = Matcher([MatchDoor("x", seq, 5.0, guards=guards(seq, PARAMS))])
    assert any(e.kind == "open" for e in scan(m, [s.port for s in seq]))


def test_plan_holds_three_windows_per_valid_secret_and_skips_expired_secrets():
    t = 30 * 1000 + 10.0
    ring = KeyRing("k", PARAMS, (("old", bytes(32), t - 1), ("mid", b"\x01" * 32, t + 100), ("new", SECRET, None)))
    doors = plan([RotatingDoor("rot", (ring,))], t)
    names = sorted(parse_name(d.name) for d in doors)
    assert [(n.key_id, n.counter) for n in names] == [(k, c) for k in ("mid", "new") for c in (999, 1000, 1001)]
    assert all(d.guards for d in doors)
    assert plan([RotatingDoor("rot", (ring,), bind_source=True)], t) == []


def test_boundaries_are_the_next_window_or_grace_end():
    ring = KeyRing("k", PARAMS, (("old", bytes(32), 1010.0), ("new", SECRET, None)))
    assert boundaries([RotatingDoor("rot", (ring,))], 1000.0) == 1010.0
    assert boundaries([RotatingDoor("rot", (ring,))], 1011.0) == 1020.0
    assert boundaries([], 5.0) == float("inf")


def test_used_tokens_differ_per_door_key_and_window_and_last_past_the_window():
    a = used_token(parse_name(internal_name("rot", "k", 5)))
    assert a != used_token(parse_name(internal_name("rot", "k", 6)))
    assert a != used_token(parse_name(internal_name("rot2", "k", 5)))
    assert a != used_token(parse_name(internal_name("rot", "j", 5)))
    # window 5 is accepted while the current window is 4, 5 or 6: until the end of window 6
    assert used_until(parse_name(internal_name("rot", "k", 5)), 30) >= 7 * 30


def test_source_bound_doors_derive_per_source_and_stay_bounded():
    from spa.rotating_match import SourceBound

    t = 30 * 1000 + 10.0
    bound = SourceBound([door(bind_source=True)], max_sources=8)
    assert bound and not SourceBound([door()])
    seq = rotating.derive(SECRET, "rot", 1000, PARAMS, rotating.source_bytes(SRC))
    events = []
    for i, s in enumerate(seq):
        events += bound.feed(Knock(SRC, DST, "tcp", 40000 + i, s.port, 0x02, i, float(i)), t)
    opened = [e for e in events if e.kind == "open"]
    assert len(opened) == 1 and parse_name(opened[0].door).source == str(SRC)
    other = ipaddress.ip_address("192.0.2.3")
    events = []
    for i, s in enumerate(seq):  # .2's sequence from .3 is not .3's
        events += bound.feed(Knock(other, DST, "tcp", 41000 + i, s.port, 0x02, i, float(i)), t)
    assert not any(e.kind == "open" for e in events)
    for n in range(100):  # a spoofed flood into the range: the source table stays at its cap
        src = ipaddress.ip_address(f"198.51.100.{n}")
        bound.feed(Knock(src, DST, "tcp", 1234, PARAMS.lo + n, 0x02, n, 10.0), t)
    assert len(bound._sources) <= 8 and bound.evictions > 0
    assert all(lo == PARAMS.lo and hi == PARAMS.hi for lo, hi in bound._ranges["tcp"])
    assert bound.ranges() == [("tcp", PARAMS.lo, PARAMS.hi, None)]


def test_source_bound_ignores_sources_no_grant_can_go_to():
    from spa.rotating_match import SourceBound

    bound = SourceBound([door(bind_source=True)])
    for bad in ("0.0.0.0", "224.0.0.1", "::", "ff02::1"):
        src = ipaddress.ip_address(bad)
        dst = DST if src.version == 4 else ipaddress.ip_address("2001:db8::1")
        assert bound.feed(Knock(src, dst, "tcp", 1, PARAMS.lo, 0x02, 1, 1.0), 30000.0) == []


def test_plan_reuses_the_windows_still_accepted_and_matches_a_fresh_derivation():
    import spa.rotating_match as rm

    d = door()
    t = 1_800_000_000.0
    first = plan([d], t)
    later = plan([d], t + PARAMS.interval)  # one window on: two of the three candidates carry over
    kept = {id(m) for m in first} & {id(m) for m in later}
    assert len(first) == len(later) == 3 and len(kept) == 2
    rm._planned = {}  # nothing to reuse: everything derived afresh
    assert plan([d], t + PARAMS.interval) == later
    assert len(rm._planned) == 3  # holds the last plan only
