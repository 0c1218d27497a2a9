"""``Verifier.check``: any datagram is either accepted or rejected with ``PacketRejected``, nothing else.

Inputs go from plain noise to packets that pass every check but one:
arbitrary bytes, bytes of exactly ``PACKET_SIZE`` with version 1, a valid
header (right hint) with a random sealed part, bodies that pass the AEAD but
are malformed (we hold the pair keys, so we can seal anything), and valid
packets from random keys, then damaged. A damaged packet is never accepted
unless the damage changed nothing.
"""

from __future__ import annotations

import ipaddress
import struct

import nacl.bindings as sodium
from hypothesis import assume, given, settings, strategies as st

from spa import protocol
from spa.authorize import SpaDoor, Verifier
from spa.errors import PacketRejected
from spa.keytext import AuthorizedKey

NOW = 1_750_000_000.0
NOW_MS = int(NOW * 1000)
SERVER_SEED = bytes(range(1, 33))
CLIENT_SEED = bytes(range(33, 65))
SERVER_PUBLIC = protocol.public_of(SERVER_SEED)
CLIENT_PUBLIC = protocol.public_of(CLIENT_SEED)
PAIR = protocol.pair_keys(SERVER_SEED, CLIENT_PUBLIC, CLIENT_PUBLIC, SERVER_PUBLIC)
SOURCE = ipaddress.IPv4Address("198.51.100.7")
ADDRESS = ipaddress.IPv4Address("203.0.113.5")

VERIFIER = Verifier(SERVER_SEED, [SpaDoor("door", (AuthorizedKey(CLIENT_PUBLIC, "c", 1),), 30.0)], 60.0)

# Key set-up costs an X25519 and an HKDF per example: fewer of those.
_fewer = settings(max_examples=max(20, settings.default.max_examples // 4))

sources = st.one_of(st.just(SOURCE), st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                    st.binary(min_size=16, max_size=16).map(ipaddress.IPv6Address))


def check(data: bytes, source=SOURCE, now: float = NOW, verifier: Verifier = VERIFIER, seen=lambda n: False):
    """The verdict: the Accepted, or the PacketRejected (any other exception fails the test).

    Every call also holds ``Verifier.screen`` (the capture loop's junk fast
    path) to what ``check`` decides: a datagram it calls junk is rejected
    for that very reason.
    """
    junk = verifier.screen(data, now, seen)
    try:
        verdict = verifier.check(data, source, now, seen)
    except PacketRejected as exc:
        assert exc.reason and isinstance(exc.reason, str)
        verdict = exc
    if junk is not None:
        assert isinstance(verdict, PacketRejected) and verdict.reason == junk, (junk, verdict)
    else:  # the capture loop's path: screen, then the rest
        try:
            rest = verifier.check_screened(data, source, now)
        except PacketRejected as exc:
            rest = exc
        assert type(rest) is type(verdict) and getattr(rest, "reason", None) == getattr(verdict, "reason", None)
    return verdict


def valid(door="door", address=ADDRESS, duration=0, time_ms=NOW_MS, nonce=None) -> bytes:
    return protocol.build(CLIENT_SEED, SERVER_PUBLIC, door, address, duration, time_ms=time_ms, nonce=nonce,
                          pair=PAIR)


def test_the_valid_packet_is_accepted():
    """What the mutation tests damage really passes: otherwise "never accepted" would prove nothing."""
    acc = check(valid())
    assert not isinstance(acc, Exception) and acc.door == "door" and acc.address == ADDRESS


@given(st.binary(max_size=2 * protocol.PACKET_SIZE), sources)
def test_arbitrary_bytes(data, source):
    assert isinstance(check(data, source), PacketRejected)


@given(st.binary(min_size=protocol.PACKET_SIZE - 1, max_size=protocol.PACKET_SIZE - 1), sources,
       st.floats(0, 2**40, allow_nan=False))
def test_right_size_and_version(rest, source, now):
    assert isinstance(check(b"\x01" + rest, source, now), PacketRejected)


@given(st.binary(min_size=protocol.NONCE_SIZE, max_size=protocol.NONCE_SIZE),
       st.binary(min_size=protocol.BODY_SIZE + protocol.TAG_SIZE, max_size=protocol.BODY_SIZE + protocol.TAG_SIZE))
def test_known_hint_random_sealed_part(nonce, sealed):
    """The hint is right (so the AEAD runs): the forged body is refused by the AEAD."""
    header = bytes([protocol.VERSION]) + PAIR.hint(protocol.epoch_of(NOW_MS)) + nonce
    verdict = check(header + sealed)
    assert isinstance(verdict, PacketRejected) and verdict.reason == "aead"


@st.composite
def sealed_bodies(draw):
    """A packet that passes the AEAD (we hold the pair keys) with any body: fields valid, random, or a mix."""
    nonce = draw(st.binary(min_size=protocol.NONCE_SIZE, max_size=protocol.NONCE_SIZE))
    time_ms = draw(st.one_of(st.just(NOW_MS), st.integers(NOW_MS - 120_000, NOW_MS + 120_000),
                             st.integers(0, 2**64 - 1)))
    if draw(st.booleans()):
        body = draw(st.binary(min_size=protocol.BODY_SIZE, max_size=protocol.BODY_SIZE))
    else:
        flags = draw(st.sampled_from([0, 0, 1, 255]))
        family = draw(st.sampled_from([4, 6, 0, 5, 255]))
        packed = draw(st.one_of(st.just(ADDRESS.packed + bytes(12)), st.binary(min_size=16, max_size=16)))
        door = draw(st.one_of(st.just(b"door"), st.binary(max_size=protocol.DOOR_MAX),
                              st.text(max_size=40).map(lambda t: t.encode()[: protocol.DOOR_MAX])))
        door_len = draw(st.one_of(st.just(len(door)), st.integers(0, 255)))
        padding = draw(st.one_of(st.just(bytes(protocol.DOOR_MAX - len(door))),
                                 st.binary(min_size=protocol.DOOR_MAX - len(door),
                                           max_size=protocol.DOOR_MAX - len(door))))
        duration = draw(st.integers(0, 2**32 - 1))
        signed = struct.pack("!QBB16sIB", time_ms, flags, family, packed, duration, door_len) + door + padding
        header = bytes([protocol.VERSION]) + PAIR.hint(protocol.epoch_of(time_ms)) + nonce
        _, secret64 = sodium.crypto_sign_seed_keypair(CLIENT_SEED)
        signature = draw(st.one_of(
            st.just(sodium.crypto_sign(protocol._signed_part(SERVER_PUBLIC, header, signed), secret64)[:64]),
            st.binary(min_size=64, max_size=64)))
        body = signed + signature
    hint_epoch = draw(st.one_of(st.just(protocol.epoch_of(time_ms)), st.just(protocol.epoch_of(NOW_MS)),
                                st.integers(0, 2**40)))
    header = bytes([protocol.VERSION]) + PAIR.hint(hint_epoch) + nonce
    return header + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body, header, nonce, PAIR.aead_key)


@given(sealed_bodies(), sources, st.one_of(st.just(NOW), st.floats(0, 2**34, allow_nan=False)), st.booleans())
def test_authentic_but_malformed_bodies(data, source, now, replayed):
    assert len(data) == protocol.PACKET_SIZE
    check(data, source, now, seen=lambda n: replayed)


@st.composite
def damage(draw, data: bytes) -> bytes:
    b = bytearray(data)
    how = draw(st.sampled_from(["flip", "flips", "truncate", "extend", "byte"]))
    if how == "flip":
        i = draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "flips":
        for i in draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[i] ^= draw(st.integers(0, 255))
    elif how == "truncate":
        del b[draw(st.integers(0, len(b) - 1)):]
    elif how == "extend":
        b += draw(st.binary(min_size=1, max_size=64))
    else:
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    return bytes(b)


@given(st.data(), st.sampled_from(["door", "other", "é" * 63]), st.integers(0, 2**32 - 1),
       st.sampled_from([ADDRESS, ipaddress.IPv6Address("2001:db8::5")]))
def test_damaged_valid_packets_are_never_accepted(data, door, duration, address):
    packet = valid(door, address, duration)
    damaged = data.draw(damage(packet))
    verdict = check(damaged)
    if damaged != packet:
        assert isinstance(verdict, PacketRejected), damaged.hex()
    if damaged == packet and door == "door":
        assert not isinstance(verdict, Exception)


@_fewer
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.data())
def test_random_keys(server_seed, client_seed, data):
    """Any pair of keys: the valid packet passes, its damaged copies do not, a stranger's packet does not."""
    assume(server_seed != client_seed)
    server_public, client_public = protocol.public_of(server_seed), protocol.public_of(client_seed)
    verifier = Verifier(server_seed, [SpaDoor("d", (AuthorizedKey(client_public, "", 1),), 10.0)], 60.0)
    packet = protocol.build(client_seed, server_public, "d", ADDRESS, time_ms=NOW_MS)
    assert not isinstance(check(packet, verifier=verifier), Exception)
    damaged = data.draw(damage(packet))
    if damaged != packet:
        assert isinstance(check(damaged, verifier=verifier), PacketRejected)
    # Made by the same client for another server: noise here.
    stranger = protocol.build(client_seed, protocol.public_of(bytes(reversed(server_seed))), "d", ADDRESS,
                              time_ms=NOW_MS)
    if bytes(reversed(server_seed)) != server_seed:
        assert isinstance(check(stranger, verifier=verifier), PacketRejected)


@given(st.integers(0, 2**64 - 1), st.floats(0, 2**40, allow_nan=False))
def test_any_packet_time_against_any_clock(time_ms, now):
    verdict = check(valid(time_ms=time_ms), now=now)
    if not isinstance(verdict, Exception):
        assert abs(time_ms / 1000 - now) <= VERIFIER.window


@_fewer
@given(st.floats(1e6, 2**40, allow_nan=False), st.lists(st.floats(0, 45), min_size=1, max_size=30))
def test_the_hint_index_skips_its_arithmetic_only_while_it_would_not_change(start, steps):
    """``_refresh`` returns early inside a span where neither end of the index moves: the index is
    always the one a fresh verifier builds for that moment, epoch boundaries included."""
    moving = Verifier(SERVER_SEED, [SpaDoor("door", (AuthorizedKey(CLIENT_PUBLIC, "c", 1),), 30.0)], 60.0)
    now = start
    for step in steps:
        now += step
        moving._refresh(now)
        fresh = Verifier(SERVER_SEED, [SpaDoor("door", (AuthorizedKey(CLIENT_PUBLIC, "c", 1),), 30.0)], 60.0)
        fresh._refresh(now)
        assert moving._epochs == fresh._epochs and set(moving._hints) == set(fresh._hints)


def test_the_hint_index_at_the_millisecond_around_each_end_moving():
    reach = 60.0 + 900.0
    moving = Verifier(SERVER_SEED, [SpaDoor("door", (AuthorizedKey(CLIENT_PUBLIC, "c", 1),), 30.0)], 60.0)
    for k in range(3):
        for edge in (NOW // 30 * 30 + 30 * k + reach, NOW // 30 * 30 + 30 * k - reach + 30 * 64):
            for d in (-0.002, -0.001, -0.0005, 0.0, 0.0005, 0.001, 0.002):
                moving._refresh(edge + d)
                fresh = Verifier(SERVER_SEED, [SpaDoor("door", (AuthorizedKey(CLIENT_PUBLIC, "c", 1),), 30.0)], 60.0)
                fresh._refresh(edge + d)
                assert moving._epochs == fresh._epochs, (edge, d)


@given(st.binary(min_size=0, max_size=300), st.binary(max_size=64), st.binary(min_size=24, max_size=24),
       st.binary(min_size=32, max_size=32), st.integers(-1, 400), st.booleans())
def test_aead_open_is_the_public_binding(plain, ad, nonce, key, flip, public):
    """``protocol.aead_open`` (PyNaCl's cffi module straight) decides exactly as ``nacl.bindings`` does."""
    import unittest.mock

    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, ad, nonce, key)
    if 0 <= flip < len(sealed):
        sealed = sealed[:flip] + bytes([sealed[flip] ^ 0x40]) + sealed[flip + 1:]
    try:
        want = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, ad, nonce, key)
    except Exception:  # noqa: BLE001 - CryptoError
        want = None
    if public:  # the fallback for a PyNaCl without its cffi module
        with unittest.mock.patch.object(protocol, "_lib", None):
            assert protocol.aead_open(sealed, ad, nonce, key) == want
    else:
        assert protocol.aead_open(sealed, ad, nonce, key) == want
    assert (want is None) == (0 <= flip < len(sealed))


def test_the_hint_index_after_a_clock_near_zero_comes_back():
    """A moment near time 0 (its index clamped) must not leave a stale span behind for later moments."""
    v = Verifier(SERVER_SEED, [SpaDoor("door", (AuthorizedKey(CLIENT_PUBLIC, "c", 1),), 30.0)], 60.0)
    assert not isinstance(check(valid(), verifier=v), Exception)
    check(valid(), now=5.0, verifier=v)
    assert not isinstance(check(valid(), verifier=v), Exception)
