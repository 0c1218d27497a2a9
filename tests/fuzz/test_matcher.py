"""``Matcher.feed``: random doors, random knock streams; never raises, memory capped, sequences open.

Ports come from a small pool so that doors share steps and streams hit
them; sources and times are arbitrary (times need not even increase).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, strategies as st

from spa.grant import PortSpec
from spa.knock import FLAG_BITS, Knock, TcpFlags
from spa.matcher import MatchDoor, Matcher

HERE = ipaddress.IPv4Address("192.0.2.1")
OTHER = ipaddress.IPv4Address("192.0.2.99")
HERE6 = ipaddress.IPv6Address("2001:db8::1")
POOL = [7000, 7001, 7002, 8000, 9000]

specs = st.builds(PortSpec, st.sampled_from(POOL), st.sampled_from(["tcp", "udp"]))
flag_sets = st.integers(0, 63)


@st.composite
def tcpflags(draw):
    must_set = draw(flag_sets)
    return draw(st.one_of(st.none(), st.just(TcpFlags(must_set, draw(flag_sets) & ~must_set))))


@st.composite
def doors(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5, unique=True))
    return [MatchDoor(n, tuple(draw(st.lists(specs, min_size=1, max_size=6))),
                      draw(st.floats(0.001, 60, allow_nan=False)), draw(tcpflags()),
                      draw(st.sampled_from([None, None, HERE, OTHER, HERE6])),
                      tuple(draw(st.lists(specs, max_size=2))))
            for n in names]


sources = st.one_of(st.integers(1, 20).map(lambda n: ipaddress.IPv4Address(0xC6336400 + n)),
                    st.integers(1, 5).map(lambda n: ipaddress.IPv6Address((0x20010DB8 << 96) + n)),
                    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address))
knocks = st.builds(Knock, sources, st.sampled_from([HERE, OTHER, HERE6]), st.sampled_from(["tcp", "udp"]),
                   st.integers(0, 65535), st.one_of(st.sampled_from(POOL), st.integers(0, 65535)),
                   st.integers(0, 255), st.integers(0, 3), st.floats(-1e3, 1e9, allow_nan=False))


@given(doors(), st.lists(knocks, max_size=200), st.integers(1, 8), st.booleans(), st.data())
def test_feed_never_raises_and_attempts_stay_capped(ds, stream, cap, local, data):
    m = Matcher(ds, local_addresses={HERE, HERE6} if local else None, max_attempts=cap)
    names = {d.name for d in ds}
    for i, k in enumerate(stream):
        for e in m.feed(k):
            assert e.door in names and e.source == k.src
            assert e.kind in ("stage", "open", "timeout", "reset")
        assert len(m) <= cap
        if i % 50 == 49:  # a reload in the middle: attempts of unchanged doors survive, the cap still holds
            m.set_doors(data.draw(st.sampled_from([ds, ds[:1], ds[::-1]])))
            names = {d.name for d in m.doors}
    for e in m.expire(data.draw(st.floats(-1e3, 2e9, allow_nan=False))):
        assert e.kind == "timeout"
    assert len(m) <= cap


@given(doors(), st.lists(knocks, max_size=100), st.data())
def test_a_doors_sequence_alone_from_a_fresh_source_opens_it(ds, noise, data):
    """Whatever came before from other sources, the exact sequence from a new source opens the door.

    ``max_attempts`` is at least the number of doors: one packet can start an
    attempt on every door, and with a smaller cap the source's own attempts
    evict each other (by design: the cap wins).
    """
    m = Matcher(ds, local_addresses={HERE, HERE6}, max_attempts=len(ds) + data.draw(st.integers(0, 3)))
    for k in noise:
        m.feed(k)
    door = data.draw(st.sampled_from(ds))
    fresh = ipaddress.IPv4Address("203.0.113.77") if door.target != HERE6 else ipaddress.IPv6Address("2001:db8::77")
    dst = door.target or (HERE6 if fresh.version == 6 else HERE)
    flags = door.tcpflags.must_set if door.tcpflags else data.draw(st.integers(0, 255))
    t = data.draw(st.floats(0, 1e9, allow_nan=False))
    opened = []
    for i, step in enumerate(door.sequence):
        # A distinct TCP sequence number per knock: a repeated port is a new knock, not a retransmission.
        opened += [e for e in m.feed(Knock(fresh, dst, step.proto, 40000 + i, step.port, flags, 1000 + i, t))
                   if e.kind == "open" and e.door == door.name]
        assert len(m) <= m.max_attempts
    assert len(opened) == 1


# Few sources, source ports and sequence numbers: retransmissions, resets and interleavings come up often.
close_knocks = st.builds(Knock, st.integers(1, 3).map(lambda n: ipaddress.IPv4Address(0xC6336400 + n)),
                         st.sampled_from([HERE, OTHER, HERE6]), st.sampled_from(["tcp", "udp"]),
                         st.integers(1, 2), st.sampled_from(POOL), st.integers(0, 63), st.integers(0, 1))


def _events(evs):
    return [(e.kind, e.door, e.source, e.stage) for e in evs]


@given(doors(), st.lists(st.one_of(knocks, close_knocks), max_size=200), st.integers(1, 8), st.booleans(), st.data())
def test_the_fast_matcher_does_what_the_reference_one_did(ds, stream, cap, local, data):
    """Same doors, same packets, same reloads and expiries: the very same events, in the same order."""
    from tests.fuzz import reference_matcher as ref

    here = {HERE, HERE6} if local else None
    fast = Matcher(ds, local_addresses=here, max_attempts=cap)
    model = ref.Matcher(ds, local_addresses=here, max_attempts=cap)
    t_base = data.draw(st.floats(0, 1e6, allow_nan=False))
    for i, k in enumerate(stream):
        if data.draw(st.booleans()):  # mostly increasing times, so that sequences get somewhere
            k = k._replace(time=t_base + i * data.draw(st.sampled_from([0.0, 0.001, 0.5, 30.0])))
        assert _events(fast.feed(k)) == _events(model.feed(k))
        assert len(fast) == len(model) and fast.evictions == model.evictions
        if i % 40 == 39:
            chosen = data.draw(st.sampled_from([ds, ds[:1], ds[::-1], ds[1:]]))
            fast.set_doors(chosen)
            model.set_doors(chosen)
        if i % 25 == 24:
            now = data.draw(st.floats(-1e3, 2e9, allow_nan=False))
            assert _events(fast.expire(now)) == _events(model.expire(now))
    src = data.draw(sources)
    fast.forget(src)
    model.forget(src)
    assert len(fast) == len(model)
