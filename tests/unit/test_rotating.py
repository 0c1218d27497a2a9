"""Rotating-sequence derivation: known answers, an independent reading of the spec, and its properties."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from spa.errors import InvalidGrant
from spa.grant import PortSpec
from spa.rotating import (
    Params,
    accepted_counters,
    candidates,
    counter,
    derive,
    key_id,
    parse_port_list,
    parse_range,
    parse_time,
    seconds_left,
    source_bytes,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "rotating-v1.json"
SECRET = hashlib.sha256(b"test secret").digest()
OTHER = hashlib.sha256(b"other secret").digest()


def _params(d: dict) -> Params:
    lo, hi = parse_range(d["ports"])
    return Params(d["interval"], d["length"], lo, hi, d["proto"], frozenset(d["exclude"]))


def _vectors():
    return json.loads(VECTORS.read_text(encoding="utf-8"))["vectors"]


def reference(secret: bytes, door: str, ctr: int, p: Params, source: bytes | None) -> list[str]:
    """docs/rotating.md read literally, as another implementation would: slow and simple."""

    def f(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    src = b"" if source is None else (b"\x04" if len(source) == 4 else b"\x06") + source
    prefix = f(b"spa-knock/v1 rotating sequence") + f(door.encode()) + f(ctr.to_bytes(8, "big")) + f(src)
    allowed = [x for x in range(p.lo, p.hi + 1) if x not in p.exclude]
    n = len(allowed)
    ports: list[int] = []
    i = 0
    while len(ports) < p.length:
        block = hmac.new(secret, prefix + b"\x01" + i.to_bytes(4, "big"), hashlib.sha256).digest()
        for j in range(8):
            w = int.from_bytes(block[4 * j : 4 * j + 4], "big")
            if w >= 2**32 - 2**32 % n:
                continue
            port = allowed[w % n]
            if port not in ports and len(ports) < p.length:
                ports.append(port)
        i += 1
    if p.proto == "mixed":
        bits = hmac.new(secret, prefix + b"\x02" + (0).to_bytes(4, "big"), hashlib.sha256).digest()
        protos = ["udp" if bits[k // 8] & (0x80 >> (k % 8)) else "tcp" for k in range(p.length)]
    else:
        protos = [p.proto] * p.length
    return [f"{port}/{proto}" for port, proto in zip(ports, protos)]


# --------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("v", _vectors(), ids=lambda v: f"{v['door']}-{v['counter']}")
def test_vectors_reproduce(v):
    secret = bytes.fromhex(v["secret"])
    source = bytes.fromhex(v["source"]) if v["source"] else None
    got = derive(secret, v["door"], v["counter"], _params(v["params"]), source)
    assert [str(p) for p in got] == v["sequence"]
    assert key_id(secret) == v["key_id"]


@pytest.mark.parametrize("v", _vectors(), ids=lambda v: f"{v['door']}-{v['counter']}")
def test_the_spec_alone_gives_the_vectors(v):
    secret = bytes.fromhex(v["secret"])
    source = bytes.fromhex(v["source"]) if v["source"] else None
    assert reference(secret, v["door"], v["counter"], _params(v["params"]), source) == v["sequence"]


def test_vectors_cover_what_matters():
    vs = _vectors()
    assert {v["params"]["proto"] for v in vs} == {"tcp", "udp", "mixed"}
    assert {len(bytes.fromhex(v["source"])) for v in vs if v["source"]} == {4, 16}
    assert any(v["params"]["length"] == 32 for v in vs)
    assert any(not v["door"].isascii() for v in vs)
    # Exclusions inside the range, where they shift the mapping.
    assert any(any(_params(v["params"]).lo <= x <= _params(v["params"]).hi for x in v["params"]["exclude"]) for v in vs)


def test_code_and_spec_agree_on_many_inputs():
    p = Params(length=6, lo=1000, hi=1100, proto="mixed", exclude=frozenset({1000, 1001, 1050, 1100, 5}))
    for c in range(300):
        src = source_bytes(f"192.0.2.{c % 7 + 1}") if c % 2 else None
        assert [str(x) for x in derive(SECRET, f"d{c % 5}", c, p, src)] == reference(SECRET, f"d{c % 5}", c, p, src)


# --------------------------------------------------------------------------
# Properties


def test_distinct_in_range_never_excluded_over_many_counters():
    exclude = frozenset({1000, 1002, 1003, 1004, 1040, 1079, 1080, 62201})
    p = Params(length=16, lo=1000, hi=1080, exclude=exclude)
    seen = set()
    for c in range(2000):
        seq = derive(SECRET, "ssh", c, p)
        ports = [x.port for x in seq]
        assert len(seq) == 16
        assert len(set(ports)) == 16
        assert all(1000 <= x <= 1080 and x not in exclude for x in ports)
        seen.update(ports)
    # Every usable port turns up: the excluded ones are skipped, nothing else is.
    assert seen == set(range(1000, 1081)) - exclude


def test_ports_are_not_biased():
    p = Params(length=2, lo=1, hi=100)
    counts = Counter(derive(SECRET, "ssh", c, p)[0].port for c in range(10000))
    # 100 per port expected; a mapping with bias or a stuck port lands far outside.
    assert len(counts) == 100
    assert min(counts.values()) > 50 and max(counts.values()) < 160


def test_proto_tcp_udp_and_mixed():
    for proto in ("tcp", "udp"):
        p = Params(proto=proto)
        assert all(x.proto == proto for c in range(50) for x in derive(SECRET, "ssh", c, p))
    p = Params(length=8, proto="mixed")
    knocks = [x.proto for c in range(200) for x in derive(SECRET, "ssh", c, p)]
    share = knocks.count("udp") / len(knocks)
    assert 0.4 < share < 0.6
    # Same ports whatever the protocol mode: the protocol is drawn apart from them.
    assert [x.port for x in derive(SECRET, "ssh", 7, p)] == [x.port for x in derive(SECRET, "ssh", 7, Params(length=8))]


def test_every_input_changes_the_sequence():
    p = Params()
    base = derive(SECRET, "ssh", 1000, p)
    assert derive(SECRET, "ssh2", 1000, p) != base
    assert derive(SECRET, "ssh", 1001, p) != base
    assert derive(OTHER, "ssh", 1000, p) != base
    v4 = derive(SECRET, "ssh", 1000, p, source_bytes("192.0.2.1"))
    v4b = derive(SECRET, "ssh", 1000, p, source_bytes("192.0.2.2"))
    v6 = derive(SECRET, "ssh", 1000, p, source_bytes("2001:db8::1"))
    assert len({base, v4, v4b, v6}) == 4
    # Deterministic.
    assert derive(SECRET, "ssh", 1000, p) == base
    assert all(isinstance(x, PortSpec) for x in base)


def test_source_is_tagged_so_families_cannot_collide():
    # 16 bytes are an IPv6 address, not four IPv4 ones; a v4-mapped address is the IPv4 one.
    assert source_bytes("::ffff:192.0.2.1") == source_bytes("192.0.2.1") == bytes([192, 0, 2, 1])
    assert len(source_bytes("2001:db8::1")) == 16
    with pytest.raises(ValueError, match="packed IPv4"):
        derive(SECRET, "ssh", 1, Params(), b"\x01\x02\x03")


def test_door_names_are_checked_and_any_difference_counts():
    p = Params()
    assert derive(SECRET, "ab", 1, p) != derive(SECRET, "a", 1, p)
    assert derive(SECRET, "SSH", 1, p) != derive(SECRET, "ssh", 1, p)
    assert derive(SECRET, "tür", 1, p) != derive(SECRET, "tur", 1, p)
    with pytest.raises(InvalidGrant, match="control characters"):
        derive(SECRET, "a\nb", 1, p)


def test_inputs_checked_at_the_boundary():
    p = Params()
    with pytest.raises(ValueError, match="at least 16"):
        derive(b"short", "ssh", 1, p)
    with pytest.raises(TypeError):
        derive("text", "ssh", 1, p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counter"):
        derive(SECRET, "ssh", -1, p)
    with pytest.raises(ValueError, match="counter"):
        derive(SECRET, "ssh", 2**64, p)
    with pytest.raises(InvalidGrant, match="empty"):
        derive(SECRET, "", 1, p)


def test_key_id():
    kid = key_id(SECRET)
    assert len(kid) == 16 and int(kid, 16) >= 0
    assert kid == key_id(SECRET) != key_id(OTHER)
    assert kid not in SECRET.hex()


# --------------------------------------------------------------------------
# Windows


def test_counter_and_seconds_left():
    assert counter(0, 30) == 0
    assert counter(29.999, 30) == 0
    assert counter(30, 30) == 1
    assert counter(1732780800, 30) == 57759360
    assert seconds_left(30, 30) == 30
    assert seconds_left(59.5, 30) == 0.5
    assert 0 < seconds_left(time.time(), 30) <= 30


def test_accepted_counters():
    assert accepted_counters(3000, 30) == (99, 100, 101)
    assert accepted_counters(10, 30) == (0, 1)  # no window before the epoch


def test_candidates_cover_each_secret_and_window():
    p = Params()
    got = candidates([SECRET, OTHER], "ssh", 3000, p)
    assert [(c.key, c.counter) for c in got] == [(0, 99), (0, 100), (0, 101), (1, 99), (1, 100), (1, 101)]
    assert got[1].sequence == derive(SECRET, "ssh", 100, p)


def test_fast_enough_for_the_server():
    p = Params(proto="mixed", exclude=frozenset({62201}))
    secrets = [SECRET, OTHER]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for d in range(100):
            candidates(secrets, f"door{d}", 1732780800, p)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05, f"100 doors x 2 keys x 3 windows took {best * 1000:.1f} ms"


# --------------------------------------------------------------------------
# Parameters and parsing


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"interval": 4}, "interval 4 is out of range"),
        ({"interval": 30.0}, "interval must be an integer"),
        ({"length": 1}, "sequence length 1 is out of range"),
        ({"length": 33}, "sequence length 33 is out of range"),
        ({"lo": 0}, "lowest port 0 is out of range"),
        ({"hi": 70000}, "highest port 70000 is out of range"),
        ({"lo": 2000, "hi": 2000}, "empty or reversed"),
        ({"lo": 3000, "hi": 2000}, "empty or reversed"),
        ({"proto": "icmp"}, "not tcp, udp or mixed"),
        ({"exclude": frozenset({0})}, "excluded port 0"),
        ({"lo": 1000, "hi": 1014, "length": 4}, "leaves 15 usable port(s) for 4 knocks; it needs at least 16"),
        ({"lo": 1000, "hi": 1019, "exclude": frozenset(range(1000, 1005))}, "leaves 15 usable"),
    ],
)
def test_params_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(InvalidGrant) as info:
        Params(**kwargs)
    assert message in str(info.value)


def test_params_defaults_and_derived_values():
    p = Params(exclude={62201, 22, 10000})  # type: ignore[arg-type]
    assert p.exclude == frozenset({62201, 22, 10000})
    assert p.skipped == (10000, 62201)
    assert p.usable == 55001 - 2
    assert 60 < p.bits < 64
    assert Params(exclude=frozenset({1})) == Params(exclude={1})  # type: ignore[arg-type]
    hash(p)


def test_parse_helpers():
    assert parse_range("10000-65000") == (10000, 65000)
    assert parse_range(" 1 - 2 ") == (1, 2)
    for bad in ("10000", "a-b", "-5", "1-2-3"):
        with pytest.raises(InvalidGrant, match="LOW-HIGH"):
            parse_range(bad)
    assert parse_port_list("62201, 22 8080") == frozenset({62201, 22, 8080})
    assert parse_port_list("") == frozenset()
    with pytest.raises(InvalidGrant):
        parse_port_list("22/tcp")


def test_parse_time():
    assert parse_time("1732780800") == 1732780800.0
    assert parse_time("1732780800.5") == 1732780800.5
    assert parse_time("2024-11-28T08:00:00Z") == 1732780800.0
    assert parse_time("2024-11-28T08:00:00") == 1732780800.0  # naive is UTC
    assert parse_time("2024-11-28T09:00:00+01:00") == 1732780800.0
    for bad in ("yesterday", "-5", "nan", ""):
        with pytest.raises(InvalidGrant, match="invalid time"):
            parse_time(bad)
