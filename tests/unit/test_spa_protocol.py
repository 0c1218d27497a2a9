"""SPA protocol v1: known answers, negative vectors for every field, a second reading of the spec, policy.

``tests/vectors/spa-v1.json`` is frozen. It was written once by this module's
generator (``python -m tests.unit.test_spa_protocol > tests/vectors/spa-v1.json``)
and is never regenerated: ``test_generator_still_describes_the_frozen_file``
only checks that the generator's recipe and the file still agree.

The generator builds every packet from docs/protocol.md with its own packing
(``nacl.bindings`` for the primitives), not with ``spa.protocol.build``; the
positive vectors are then checked against ``spa.protocol.build`` byte for
byte, and ``reference_open`` (below) opens them from the document alone.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import nacl.bindings as sodium
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from spa import protocol
from spa.authorize import SKEW_REPORT, SpaDoor, Verifier
from spa.errors import PacketRejected
from spa.keytext import AuthorizedKey

VECTORS = Path(__file__).parent.parent / "vectors" / "spa-v1.json"

# --------------------------------------------------------------------------
# The generator (run once; its output is the frozen file)

LABEL_KEY_ID = b"spa-knock/v1 key id"
LABEL_PAIR = b"spa-knock/v1 pair keys"
LABEL_HINT = b"spa-knock/v1 key hint"
LABEL_SIGN = b"spa-knock/v1 request signature"
PACKET_SIZE = 1 + 8 + 24 + (8 + 1 + 1 + 16 + 4 + 1 + 127) + 64 + 16  # 271

T0 = 1732780800123  # 2024-11-28T08:00:00.123Z
WINDOW = 60
SOURCE = "203.0.113.7"
LONG_DOOR = "d" * 120 + "-é-ü"  # 127 bytes of UTF-8
DOORS = {"ssh": 30, "web-admin": 600, "porte-é": 45, LONG_DOOR: 30}


def _seed(name: str) -> bytes:
    return hashlib.sha256(f"spa-knock/v1 test vector {name} seed".encode()).digest()


def _nonce(name: str) -> bytes:
    return hashlib.sha256(f"spa-knock/v1 test vector nonce {name}".encode()).digest()[:24]


class _Party:
    def __init__(self, name: str):
        self.name = name
        self.seed = _seed(name)
        self.public, self.secret64 = sodium.crypto_sign_seed_keypair(self.seed)


def _hkdf64(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.digest(salt, ikm, "sha256")
    t1 = hmac.digest(prk, info + b"\x01", "sha256")
    t2 = hmac.digest(prk, t1 + info + b"\x02", "sha256")
    return t1 + t2


def _pair(client: _Party, server: _Party) -> tuple[bytes, bytes]:
    """(hint_key, aead_key), computed on the client's side with libsodium's Ed25519 -> X25519 maps."""
    own = sodium.crypto_sign_ed25519_sk_to_curve25519(client.secret64)
    peer = sodium.crypto_sign_ed25519_pk_to_curve25519(server.public)
    okm = _hkdf64(sodium.crypto_scalarmult(own, peer), LABEL_PAIR, client.public + server.public)
    return okm[:32], okm[32:]


def _hint(hint_key: bytes, epoch: int) -> bytes:
    return hmac.digest(hint_key, LABEL_HINT + epoch.to_bytes(8, "big"), "sha256")[:8]


def _addr16(text: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(text)
    return (4, a.packed + bytes(12)) if a.version == 4 else (6, a.packed)


def _packet(
    client: _Party,
    server: _Party,
    *,
    time_ms: int = T0,
    nonce: bytes,
    door: bytes = b"ssh",
    address: str = SOURCE,
    duration: int = 0,
    version: int = 1,
    hint_epoch: int | None = None,
    flags: int = 0,
    family: int | None = None,
    addr16: bytes | None = None,
    door_len: int | None = None,
    door_field: bytes | None = None,
    signer: _Party | None = None,
    signed_for: bytes | None = None,
    signed_header: bytes | None = None,
    body_after_signing: bytes | None = None,
    signature: bytes | None = None,
    aead_key: bytes | None = None,
) -> bytes:
    """One packet, every field overridable; the signature and the AEAD are always computed over what is sent."""
    hint_key, pair_aead = _pair(client, server)
    fam, packed = _addr16(address)
    header = bytes([version]) + _hint(hint_key, time_ms // 30000 if hint_epoch is None else hint_epoch) + nonce
    body = struct.pack(
        "!QBB16sIB", time_ms, flags, fam if family is None else family, packed if addr16 is None else addr16,
        duration, len(door) if door_len is None else door_len,
    ) + (door.ljust(127, b"\0") if door_field is None else door_field)
    signer = signer or client
    message = LABEL_SIGN + (signed_for or server.public) + (signed_header or header) + body
    sig = sodium.crypto_sign(message, signer.secret64)[:64] if signature is None else signature
    if body_after_signing is not None:
        body = body_after_signing
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body + sig, header, nonce, aead_key or pair_aead)
    return header + sealed


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[index] ^= mask
    return bytes(b)


def make_vectors() -> dict:
    client, server = _Party("client"), _Party("server")
    other_client, other_server = _Party("other client"), _Party("other server")
    hint_key, aead_key = _pair(client, server)
    epoch = T0 // 30000

    positive = []
    for name, door, address, duration, expect_duration, expect_address in (
        ("ipv4, door duration", "ssh", "203.0.113.7", 0, 30, "203.0.113.7"),
        ("ipv6, asks more than the door allows", "web-admin", "2001:db8::42", 3600, 600, "2001:db8::42"),
        ("ipv4, asks less than the door allows", "web-admin", "198.51.100.20", 90, 90, "198.51.100.20"),
        ("utf-8 door name", "porte-é", "2001:db8:1:2:3:4:5:6", 1, 1, "2001:db8:1:2:3:4:5:6"),
        ("longest door name, largest duration", LONG_DOOR, "203.0.113.7", 0xFFFFFFFF, 30, "203.0.113.7"),
        ("ipv4-mapped ipv6 address opens for the ipv4 address", "ssh", "::ffff:203.0.113.9", 0, 30, "203.0.113.9"),
    ):
        nonce = _nonce(name)
        packet = _packet(client, server, nonce=nonce, door=door.encode(), address=address, duration=duration)
        positive.append({
            "name": name,
            "time_ms": T0, "epoch": epoch, "hint": _hint(hint_key, epoch).hex(), "nonce": nonce.hex(),
            "door": door, "address": address, "duration": duration,
            "packet": packet.hex(),
            "accepted": {"door": door, "address": expect_address, "duration": expect_duration,
                         "key_id": hashlib.sha256(LABEL_KEY_ID + client.public).hexdigest()[:16]},
        })

    good = bytes.fromhex(positive[0]["packet"])
    body_at = 33  # header size: the sealed body starts here
    n = _nonce  # each negative vector has its own nonce

    def base_body(**kw) -> bytes:
        fields = {"time_ms": T0, "flags": 0, "family": 4, "addr16": bytes.fromhex("cb007107") + bytes(12),
                  "duration": 0, "door_len": 3}
        fields.update(kw)
        return struct.pack("!QBB16sIB", fields["time_ms"], fields["flags"], fields["family"], fields["addr16"],
                           fields["duration"], fields["door_len"]) + b"ssh".ljust(127, b"\0")

    negative: list[dict] = []

    def neg(field: str, how: str, reason: str, packet: bytes, *, now_ms: int = T0, source: str = SOURCE,
            message: str | None = None) -> None:
        item = {"field": field, "how": how, "reason": reason, "now_ms": now_ms, "source": source,
                "packet": packet.hex()}
        if message is not None:
            item["message_contains"] = message
        negative.append(item)

    # size and version: checked on the raw bytes, before anything else
    neg("size", "the first vector without its last byte", "size", good[:-1])
    neg("size", "the first vector with one zero byte appended", "size", good + b"\0")
    neg("size", "empty datagram", "size", b"")
    neg("size", "a 1500-byte datagram of 0x01 bytes", "size", b"\x01" * 1500)
    neg("version", "the first vector with byte 0 set to 0", "version", b"\x00" + good[1:])
    neg("version", "the first vector with byte 0 set to 2", "version", b"\x02" + good[1:])
    neg("version", "a correctly made packet (hint, AEAD, signature) whose header says version 2", "version",
        _packet(client, server, nonce=n("version 2"), version=2))
    # hint
    neg("hint", "the first vector with bit 0 of byte 1 (the hint's first byte) flipped", "unknown-key",
        _flip(good, 1))
    neg("hint", "a correct packet from the same client to another server (other_server_seed)", "unknown-key",
        _packet(client, other_server, nonce=n("other server")))
    neg("hint", "a correct packet from a client that is not authorized (other_client_seed)", "unknown-key",
        _packet(other_client, server, nonce=n("other client")))
    neg("hint", "a correct packet dated 1000 s ahead: its epoch is beyond window + 900 s, so its hint is not indexed",
        "unknown-key", _packet(client, server, nonce=n("far future"), time_ms=T0 + 1_000_000))
    neg("hint", "hint of epoch E+1 while the body's time is in epoch E, re-sealed and signed", "malformed",
        _packet(client, server, nonce=n("hint epoch"), hint_epoch=epoch + 1), message="hint does not match")
    # nonce, AEAD
    neg("nonce", "the first vector with the last nonce byte flipped (the nonce is the AEAD nonce and in the AD)",
        "aead", _flip(good, 32))
    neg("aead tag", "the first vector with the last byte (in the Poly1305 tag) flipped", "aead", _flip(good, -1))
    neg("aead ciphertext", "the first vector with the first ciphertext byte flipped", "aead", _flip(good, body_at))
    neg("aead key", "our client's hint, but sealed with the other client's pair key for this server", "aead",
        _packet(client, server, nonce=n("wrong aead key"), aead_key=_pair(other_client, server)[1]))
    # body fields: every one re-sealed with the pair's AEAD key and correctly signed by the client
    neg("time", "dated 61 s ago (its own epoch's hint)", "stale",
        _packet(client, server, nonce=n("61 s ago"), time_ms=T0 - 61_000), message="made 61.0 s ago (window 60 s)")
    neg("time", "dated 61 s ahead", "future", _packet(client, server, nonce=n("61 s ahead"), time_ms=T0 + 61_000),
        message="dated 61.0 s ahead (window 60 s)")
    neg("time", "dated 600 s ago: within the 900 s skew report, so the offset is told", "stale",
        _packet(client, server, nonce=n("600 s ago"), time_ms=T0 - 600_000), message="600 s slow")
    neg("time", "dated 600 s ahead", "future", _packet(client, server, nonce=n("600 s ahead"), time_ms=T0 + 600_000),
        message="600 s fast")
    neg("time", "time set to 0 while the hint is for the current epoch", "malformed",
        _packet(client, server, nonce=n("time zero"), time_ms=0, hint_epoch=epoch))
    neg("flags", "flags = 0x01", "malformed", _packet(client, server, nonce=n("flags 01"), flags=0x01),
        message="unknown flags 0x01")
    neg("flags", "flags = 0x80", "malformed", _packet(client, server, nonce=n("flags 80"), flags=0x80))
    for fam in (0, 5, 255):
        neg("family", f"family = {fam}", "malformed", _packet(client, server, nonce=n(f"family {fam}"), family=fam),
            message=f"unknown address family {fam}")
    neg("address padding", "family 4, byte 4 of the address field (first padding byte) = 0x01", "malformed",
        _packet(client, server, nonce=n("pad 4"), addr16=bytes.fromhex("cb007107") + b"\x01" + bytes(11)),
        message="padding")
    neg("address padding", "family 4, byte 15 of the address field = 0xff", "malformed",
        _packet(client, server, nonce=n("pad 15"), addr16=bytes.fromhex("cb007107") + bytes(11) + b"\xff"))
    neg("address", "0.0.0.0 (unspecified)", "policy", _packet(client, server, nonce=n("0.0.0.0"), address="0.0.0.0"))
    neg("address", "127.0.0.1 (loopback)", "policy", _packet(client, server, nonce=n("lo4"), address="127.0.0.1"))
    neg("address", "224.0.0.1 (multicast)", "policy", _packet(client, server, nonce=n("mc4"), address="224.0.0.1"))
    neg("address", "240.0.0.1 (reserved)", "policy", _packet(client, server, nonce=n("rsv4"), address="240.0.0.1"))
    neg("address", ":: (unspecified)", "policy", _packet(client, server, nonce=n("::"), address="::"))
    neg("address", "::1 (loopback)", "policy", _packet(client, server, nonce=n("lo6"), address="::1"))
    neg("address", "ff02::1 (multicast)", "policy", _packet(client, server, nonce=n("mc6"), address="ff02::1"))
    neg("duration", "every 32-bit duration is valid (the door caps it): here the duration was changed from 0 "
        "to 1 after signing, then sealed", "signature",
        _packet(client, server, nonce=n("duration after signing"), body_after_signing=base_body(duration=1)))
    for length in (0, 128, 255):
        neg("door length", f"door_len = {length} (door 'ssh')", "malformed",
            _packet(client, server, nonce=n(f"door_len {length}"), door_len=length), message="length")
    neg("door length", "door_len = 2 for 'ssh': the 'h' is then in the padding", "malformed",
        _packet(client, server, nonce=n("door_len 2"), door_len=2))
    neg("door length", "door_len = 4 for 'ssh': the name is then 'ssh\\x00', which the format allows "
        "and no door is called", "policy", _packet(client, server, nonce=n("door_len 4"), door_len=4))
    neg("door padding", "door 'ssh', last byte of the 127-byte field = 0x01", "malformed",
        _packet(client, server, nonce=n("door pad"), door_field=b"ssh".ljust(126, b"\0") + b"\x01"))
    for label, raw in (("lone 0xff", b"s\xffh"), ("overlong '/' (c0 af)", b"\xc0\xaf"),
                       ("UTF-16 surrogate (ed a0 80)", b"\xed\xa0\x80"), ("truncated sequence (c3)", b"ssh\xc3")):
        neg("door utf-8", f"door name bytes with a {label}", "malformed",
            _packet(client, server, nonce=n(f"utf8 {label}"), door=raw), message="not UTF-8")
    neg("door", "a well-formed, signed request for a door that does not exist", "policy",
        _packet(client, server, nonce=n("no door"), door=b"nope"), message="not authorized for door 'nope'")
    # signature: AEAD valid, body well formed, signature wrong
    good_sig_packet = _packet(client, server, nonce=n("sig flip"))
    sig = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(good_sig_packet[33:], good_sig_packet[:33],
                                                           n("sig flip"), aead_key)[-64:]
    neg("signature", "a correct signature with bit 0 of its first byte flipped, sealed", "signature",
        _packet(client, server, nonce=n("sig flip"), signature=_flip(sig, 0)))
    neg("signature", "64 zero bytes", "signature", _packet(client, server, nonce=n("sig zero"), signature=bytes(64)))
    neg("signature", "signed by the other client's key (sealed with our pair key)", "signature",
        _packet(client, server, nonce=n("sig other key"), signer=other_client))
    neg("signature", "signed with the other server's public key in the signed message", "signature",
        _packet(client, server, nonce=n("sig other server"), signed_for=other_server.public))
    neg("signature", "signed over a header with a different nonce", "signature",
        _packet(client, server, nonce=n("sig header"),
                signed_header=b"\x01" + _hint(hint_key, epoch) + n("something else")))

    pair_keys = {"hint_key": hint_key.hex(), "aead_key": aead_key.hex()}
    return {
        "description": "Known answers for SPA protocol v1 (docs/protocol.md). Frozen: written once by "
                       "tests/unit/test_spa_protocol.py (python -m tests.unit.test_spa_protocol), never regenerated.",
        "how": {
            "seeds": "client_seed = SHA256('spa-knock/v1 test vector client seed'), likewise 'server', "
                     "'other client', 'other server' (ASCII, the name between 'vector ' and ' seed')",
            "nonces": "each packet's nonce = SHA256('spa-knock/v1 test vector nonce ' + its name)[0:24]; "
                      "for a negative vector the name is the one used in the generator",
            "positive": "packet = build(client_seed, server_public, door, address, duration, time_ms, nonce); "
                        "spa.protocol.build must reproduce it byte for byte",
            "negative": "each packet is checked by a Verifier with server_seed, window 60 s, the doors of 'doors' "
                        "(each listing the client's key without options) at now = now_ms / 1000 from 'source'; "
                        "it must raise PacketRejected with 'reason'. Body-field vectors are made by a party "
                        "holding the pair key: the body is packed with the field's bad value, signed correctly "
                        "by the client (unless the field is the signature) and sealed with the pair's AEAD key, "
                        "so only that field is wrong. Header-field vectors (size, version, hint, nonce, tag) "
                        "change bytes of a finished packet, except where 'how' says it was made whole.",
        },
        "constants": {"version": 1, "hint_epoch_s": 30, "packet_size": PACKET_SIZE,
                      "labels": {"key_id": LABEL_KEY_ID.decode(), "pair": LABEL_PAIR.decode(),
                                 "hint": LABEL_HINT.decode(), "sign": LABEL_SIGN.decode()}},
        "keys": {
            "client_seed": client.seed.hex(), "client_public": client.public.hex(),
            "client_key_id": hashlib.sha256(LABEL_KEY_ID + client.public).hexdigest()[:16],
            "server_seed": server.seed.hex(), "server_public": server.public.hex(),
            "server_key_id": hashlib.sha256(LABEL_KEY_ID + server.public).hexdigest()[:16],
            "other_client_seed": other_client.seed.hex(), "other_server_seed": other_server.seed.hex(),
            "client_x25519_public": sodium.crypto_sign_ed25519_pk_to_curve25519(client.public).hex(),
            "server_x25519_public": sodium.crypto_sign_ed25519_pk_to_curve25519(server.public).hex(),
            "pair": pair_keys,
            "hints": {str(e): _hint(hint_key, e).hex() for e in (0, epoch - 1, epoch, epoch + 1)},
        },
        "window": WINDOW,
        "doors": DOORS,
        "positive": positive,
        "negative": negative,
    }


# --------------------------------------------------------------------------
# A second implementation, from docs/protocol.md alone (slow and literal)

P = 2**255 - 19


def _hchacha20(key: bytes, nonce16: bytes) -> bytes:
    def rotl(v: int, c: int) -> int:
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    def qr(s: list[int], a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)  # noqa: E702
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)  # noqa: E702
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)  # noqa: E702
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)  # noqa: E702

    s = list(struct.unpack("<4I", b"expand 32-byte k") + struct.unpack("<8I", key) + struct.unpack("<4I", nonce16))
    for _ in range(10):
        qr(s, 0, 4, 8, 12); qr(s, 1, 5, 9, 13); qr(s, 2, 6, 10, 14); qr(s, 3, 7, 11, 15)  # noqa: E702
        qr(s, 0, 5, 10, 15); qr(s, 1, 6, 11, 12); qr(s, 2, 7, 8, 13); qr(s, 3, 4, 9, 14)  # noqa: E702
    return struct.pack("<8I", *s[0:4], *s[12:16])


def _xchacha_open(key: bytes, nonce24: bytes, sealed: bytes, ad: bytes) -> bytes:
    sub = _hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(sub).decrypt(b"\0\0\0\0" + nonce24[16:], sealed, ad)


def _ed_to_x_public(ed_public: bytes) -> bytes:
    y = int.from_bytes(ed_public, "little") & ((1 << 255) - 1)
    u = (1 + y) * pow(1 - y, P - 2, P) % P
    return u.to_bytes(32, "little")


def _ed_to_x_secret(seed: bytes) -> bytes:
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return bytes(h)


def reference_pair(own_seed: bytes, peer_ed_public: bytes, client_public: bytes, server_public: bytes):
    own = X25519PrivateKey.from_private_bytes(_ed_to_x_secret(own_seed))
    shared = own.exchange(X25519PublicKey.from_public_bytes(_ed_to_x_public(peer_ed_public)))
    okm = _hkdf64(shared, LABEL_PAIR, client_public + server_public)
    return okm[:32], okm[32:]


def reference_open(packet: bytes, server_seed: bytes, client_public: bytes) -> dict:
    """Open a v1 packet as docs/protocol.md describes it; raises on anything wrong."""
    server_public = sodium.crypto_sign_seed_keypair(server_seed)[0]
    assert len(packet) == 271 and packet[0] == 1
    header, hint, nonce = packet[:33], packet[1:9], packet[9:33]
    hint_key, aead_key = reference_pair(server_seed, client_public, client_public, server_public)
    body = _xchacha_open(aead_key, nonce, packet[33:], header)
    assert len(body) == 222
    time_ms, flags, family, addr, duration, door_len = struct.unpack("!QBB16sIB", body[:31])
    assert hint == hmac.digest(hint_key, LABEL_HINT + (time_ms // 30000).to_bytes(8, "big"), "sha256")[:8]
    assert flags == 0 and family in (4, 6) and 1 <= door_len <= 127 and not any(body[31 + door_len : 158])
    if family == 4:
        assert not any(addr[4:])
    signed = LABEL_SIGN + server_public + header + body[:158]
    Ed25519PublicKey.from_public_bytes(client_public).verify(body[158:], signed)
    return {
        "time_ms": time_ms,
        "address": str(ipaddress.ip_address(addr[:4] if family == 4 else addr)),
        "duration": duration,
        "door": body[31 : 31 + door_len].decode("utf-8"),
    }


# --------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def vectors() -> dict:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def _keys(v: dict) -> tuple[bytes, bytes, bytes, bytes]:
    k = v["keys"]
    return (bytes.fromhex(k["client_seed"]), bytes.fromhex(k["client_public"]),
            bytes.fromhex(k["server_seed"]), bytes.fromhex(k["server_public"]))


def _verifier(v: dict, **door_options) -> Verifier:
    _, client_public, server_seed, _ = _keys(v)
    key = AuthorizedKey(client_public, "test client", 1)
    doors = [SpaDoor(name, (key,), float(duration), **door_options) for name, duration in v["doors"].items()]
    return Verifier(server_seed, doors, v["window"])


def _never(nonce: bytes) -> bool:
    return False


def test_generator_still_describes_the_frozen_file(vectors):
    assert make_vectors() == vectors


def test_constants_match_the_code(vectors):
    c = vectors["constants"]
    assert c["packet_size"] == protocol.PACKET_SIZE == 271
    assert c["version"] == protocol.VERSION
    assert c["hint_epoch_s"] == protocol.HINT_EPOCH
    assert c["labels"] == {"key_id": protocol.LABEL_KEY_ID.decode(), "pair": protocol.LABEL_PAIR.decode(),
                           "hint": protocol.LABEL_HINT.decode(), "sign": protocol.LABEL_SIGN.decode()}
    assert protocol.HEADER_SIZE == 33 and protocol.SIGNED_BODY_SIZE == 158 and protocol.BODY_SIZE == 222


def test_keys_key_ids_pair_keys_and_hints(vectors):
    client_seed, client_public, server_seed, server_public = _keys(vectors)
    k = vectors["keys"]
    assert protocol.public_of(client_seed) == client_public
    assert protocol.public_of(server_seed) == server_public
    assert protocol.key_id(client_public) == k["client_key_id"]
    assert protocol.key_id(server_public) == k["server_key_id"]
    client_side = protocol.pair_keys(client_seed, server_public, client_public, server_public)
    server_side = protocol.pair_keys(server_seed, client_public, client_public, server_public)
    assert client_side == server_side
    assert client_side.hint_key.hex() == k["pair"]["hint_key"]
    assert client_side.aead_key.hex() == k["pair"]["aead_key"]
    for epoch, hint in k["hints"].items():
        assert client_side.hint(int(epoch)).hex() == hint
    # The reference: X25519 from the Edwards y coordinate, HKDF written out.
    assert _ed_to_x_public(client_public).hex() == k["client_x25519_public"]
    assert reference_pair(server_seed, client_public, client_public, server_public) == (
        client_side.hint_key, client_side.aead_key)
    assert reference_pair(client_seed, server_public, client_public, server_public) == (
        client_side.hint_key, client_side.aead_key)


def test_positive_vectors_reproduce_byte_for_byte(vectors):
    client_seed, _, _, server_public = _keys(vectors)
    assert vectors["positive"]
    for v in vectors["positive"]:
        packet = protocol.build(client_seed, server_public, v["door"], ipaddress.ip_address(v["address"]),
                                v["duration"], time_ms=v["time_ms"], nonce=bytes.fromhex(v["nonce"]))
        assert packet.hex() == v["packet"], v["name"]
        assert len(packet) == protocol.PACKET_SIZE
        assert packet[1:9].hex() == v["hint"] and packet[9:33].hex() == v["nonce"]


def test_positive_vectors_open_with_the_reference_reading_of_the_spec(vectors):
    _, client_public, server_seed, _ = _keys(vectors)
    for v in vectors["positive"]:
        opened = reference_open(bytes.fromhex(v["packet"]), server_seed, client_public)
        assert opened == {"time_ms": v["time_ms"], "address": str(ipaddress.ip_address(v["address"])),
                          "duration": v["duration"], "door": v["door"]}, v["name"]


def test_positive_vectors_are_accepted(vectors):
    verifier = _verifier(vectors)
    for v in vectors["positive"]:
        acc = verifier.check(bytes.fromhex(v["packet"]), ipaddress.ip_address(SOURCE), v["time_ms"] / 1000, _never)
        want = v["accepted"]
        assert (acc.door, str(acc.address), acc.duration, acc.key_id) == (
            want["door"], want["address"], want["duration"], want["key_id"]), v["name"]
        assert acc.nonce.hex() == v["nonce"]
        assert acc.remember_until == v["time_ms"] / 1000 + vectors["window"] + 1.0
        assert acc.skew == 0.0


def test_every_field_has_negative_vectors(vectors):
    fields = {v["field"] for v in vectors["negative"]}
    assert fields >= {"size", "version", "hint", "nonce", "time", "flags", "family", "address padding",
                      "duration", "door length", "door padding", "door utf-8", "signature", "aead tag"}


def _negative_vectors() -> list[dict]:
    return json.loads(VECTORS.read_text(encoding="utf-8"))["negative"]


@pytest.mark.parametrize("v", _negative_vectors(), ids=lambda v: f"{v['field']}: {v['how'][:40]}")
def test_negative_vector(vectors, v):
    with pytest.raises(PacketRejected) as info:
        _verifier(vectors).check(bytes.fromhex(v["packet"]), ipaddress.ip_address(v["source"]),
                                 v["now_ms"] / 1000, _never)
    assert info.value.reason == v["reason"], f"{v['field']}: {v['how']}: {info.value.message}"
    if "message_contains" in v:
        assert v["message_contains"] in info.value.message


def test_body_vectors_fail_only_on_their_field(vectors):
    """A malformed body vector is authentic: the reference opener gets through the AEAD, then refuses the field."""
    _, client_public, server_seed, server_public = _keys(vectors)
    _, aead_key = reference_pair(server_seed, client_public, client_public, server_public)
    for v in vectors["negative"]:
        if v["reason"] in ("malformed", "signature", "policy", "stale", "future"):
            packet = bytes.fromhex(v["packet"])
            _xchacha_open(aead_key, packet[9:33], packet[33:], packet[:33])  # raises if not authentic
            if v["reason"] == "signature":
                with pytest.raises(InvalidSignature):
                    reference_open(packet, server_seed, client_public)


def test_round_trip_v4_and_v6(vectors):
    client_seed, client_public, server_seed, server_public = _keys(vectors)
    verifier = _verifier(vectors)
    now = 1_800_000_000.25
    for address in ("192.0.2.1", "2001:db8::1", "fe80::1"):
        packet = protocol.build(client_seed, server_public, "ssh", ipaddress.ip_address(address), 7,
                                time_ms=int(now * 1000))
        acc = verifier.check(packet, ipaddress.ip_address("192.0.2.99"), now, _never)
        assert (acc.door, str(acc.address), acc.duration) == ("ssh", address, 7)
        assert reference_open(packet, server_seed, client_public)["address"] == address


def test_build_refuses_what_it_cannot_send(vectors):
    client_seed, _, _, server_public = _keys(vectors)
    a = ipaddress.ip_address("192.0.2.1")
    for door in ("", "x" * 128, "é" * 64):
        with pytest.raises(ValueError):
            protocol.build(client_seed, server_public, door, a, time_ms=T0)
    for bad in ({"duration": -1}, {"duration": 2**32}):
        with pytest.raises(ValueError):
            protocol.build(client_seed, server_public, "ssh", a, time_ms=T0, **bad)
    with pytest.raises(ValueError):
        protocol.build(client_seed, server_public, "ssh", a, time_ms=-1)
    with pytest.raises(ValueError):
        protocol.build(client_seed, server_public, "ssh", a, time_ms=T0, nonce=bytes(23))
    with pytest.raises(ValueError):
        protocol.build(client_seed, server_public[:31], "ssh", a, time_ms=T0)
    with pytest.raises(ValueError):
        protocol.build(client_seed, server_public, "ssh", "192.0.2.1", time_ms=T0)  # type: ignore[arg-type]


def test_random_nonces_differ(vectors):
    client_seed, _, _, server_public = _keys(vectors)
    a = ipaddress.ip_address("192.0.2.1")
    one = protocol.build(client_seed, server_public, "ssh", a, time_ms=T0)
    two = protocol.build(client_seed, server_public, "ssh", a, time_ms=T0)
    assert one[9:33] != two[9:33] and one[1:9] == two[1:9]


def test_packet_for_another_server_is_unknown_key(vectors):
    client_seed, _, _, _ = _keys(vectors)
    other = protocol.public_of(_seed("other server"))
    packet = protocol.build(client_seed, other, "ssh", ipaddress.ip_address(SOURCE), time_ms=T0)
    with pytest.raises(PacketRejected) as info:
        _verifier(vectors).check(packet, ipaddress.ip_address(SOURCE), T0 / 1000, _never)
    assert info.value.reason == "unknown-key"


# -- time window -------------------------------------------------------------

T_EXACT = 1732780800000  # a whole second: skews below are exact in floating point


def _at(vectors, offset_ms: int, nonce: bytes | None = None) -> bytes:
    client_seed, _, _, server_public = _keys(vectors)
    return protocol.build(client_seed, server_public, "ssh", ipaddress.ip_address(SOURCE),
                          time_ms=T_EXACT + offset_ms, nonce=nonce)


@pytest.mark.parametrize("offset_ms", [-60_000, 60_000, 0, -59_999, 59_999])
def test_time_window_edges_are_accepted(vectors, offset_ms):
    acc = _verifier(vectors).check(_at(vectors, offset_ms), ipaddress.ip_address(SOURCE), T_EXACT / 1000, _never)
    assert acc.skew == pytest.approx(offset_ms / 1000, abs=1e-6)


@pytest.mark.parametrize("offset_ms, reason, text", [
    (-60_001, "stale", "made 60.0 s ago (window 60 s)"),
    (60_001, "future", "dated 60.0 s ahead (window 60 s)"),
    (-61_000, "stale", "client's clock is 61 s slow"),
    (61_000, "future", "client's clock is 61 s fast"),
    (-900_000, "stale", "made 900.0 s ago"),
    (900_000, "future", "dated 900.0 s ahead"),
    (-SKEW_REPORT * 1000 - 59_000, "stale", "made 959.0 s ago"),
])
def test_time_window_beyond_is_rejected_with_the_offset(vectors, offset_ms, reason, text):
    with pytest.raises(PacketRejected) as info:
        _verifier(vectors).check(_at(vectors, int(offset_ms)), ipaddress.ip_address(SOURCE), T_EXACT / 1000, _never)
    assert info.value.reason == reason
    assert text in info.value.message


@pytest.mark.parametrize("offset_ms", [-(60 + 900 + 31) * 1000, (60 + 900 + 31) * 1000, 10**7])
def test_time_beyond_the_skew_report_is_unknown_key(vectors, offset_ms):
    with pytest.raises(PacketRejected) as info:
        _verifier(vectors).check(_at(vectors, offset_ms), ipaddress.ip_address(SOURCE), T_EXACT / 1000, _never)
    assert info.value.reason == "unknown-key"


def test_hint_index_follows_the_clock(vectors):
    verifier = _verifier(vectors)
    ip = ipaddress.ip_address(SOURCE)
    verifier.check(_at(vectors, 0), ip, T_EXACT / 1000, _never)
    later = T_EXACT + 3_600_000
    packet = protocol.build(_keys(vectors)[0], _keys(vectors)[3], "ssh", ip, time_ms=later)
    assert verifier.check(packet, ip, later / 1000, _never).door == "ssh"
    with pytest.raises(PacketRejected) as info:  # an hour-old packet is no longer indexed
        verifier.check(_at(vectors, 0), ip, later / 1000, _never)
    assert info.value.reason == "unknown-key"


# -- replay ------------------------------------------------------------------


def test_replay_callback_is_honoured(vectors):
    packet = _at(vectors, 0)
    asked: list[bytes] = []

    def seen(nonce: bytes) -> bool:
        asked.append(nonce)
        return True

    with pytest.raises(PacketRejected) as info:
        _verifier(vectors).check(packet, ipaddress.ip_address(SOURCE), T_EXACT / 1000, seen)
    assert info.value.reason == "replay"
    assert asked == [packet[9:33]]


def test_replay_is_refused_from_any_source(vectors):
    packet = _at(vectors, 0)
    remembered: set[bytes] = set()
    verifier = _verifier(vectors)
    acc = verifier.check(packet, ipaddress.ip_address(SOURCE), T_EXACT / 1000, remembered.__contains__)
    remembered.add(acc.nonce)
    for source in (SOURCE, "198.51.100.1", "2001:db8::7"):
        with pytest.raises(PacketRejected) as info:
            verifier.check(packet, ipaddress.ip_address(source), T_EXACT / 1000 + 1, remembered.__contains__)
        assert info.value.reason == "replay"


def test_packets_made_before_not_before_are_refused(vectors):
    # After the machine went down under the daemon, the nonces of the last packets may be lost:
    # anything made before the restart is refused, from the first millisecond before it.
    verifier = _verifier(vectors)
    verifier.not_before = T_EXACT / 1000
    with pytest.raises(PacketRejected) as info:
        verifier.check(_at(vectors, -1), ipaddress.ip_address(SOURCE), T_EXACT / 1000 + 5, _never)
    assert info.value.reason == "restart" and "send a new one" in info.value.message
    assert verifier.check(_at(vectors, 0), ipaddress.ip_address(SOURCE), T_EXACT / 1000 + 5, _never).door == "ssh"


def test_junk_asks_the_replay_cache_once_and_a_known_nonce_is_refused_before_decryption(vectors):
    asked: list[bytes] = []

    def seen(nonce: bytes) -> bool:
        asked.append(nonce)
        return False

    verifier = _verifier(vectors)
    for v in vectors["negative"]:
        if v["reason"] in ("unknown-key", "aead", "malformed", "stale", "future"):
            asked.clear()
            with pytest.raises(PacketRejected):
                verifier.check(bytes.fromhex(v["packet"]), ipaddress.ip_address(v["source"]), v["now_ms"] / 1000,
                               seen)
            # One lookup of the cleartext nonce (a dictionary probe); the cache is only ever written by the caller,
            # for accepted packets, so junk cannot fill it.
            assert asked == [bytes.fromhex(v["packet"])[9:33]]
        if v["reason"] in ("size", "version"):
            asked.clear()
            with pytest.raises(PacketRejected):
                verifier.check(bytes.fromhex(v["packet"]), ipaddress.ip_address(v["source"]), v["now_ms"] / 1000,
                               seen)
            assert asked == []
    # A nonce the cache knows is refused at once, whatever follows it (no decryption, no hint lookup).
    junk = bytes([1]) + bytes(8) + b"N" * 24 + bytes(protocol.PACKET_SIZE - 33)
    with pytest.raises(PacketRejected) as info:
        verifier.check(junk, ipaddress.ip_address("192.0.2.2"), 0.0, lambda n: n == b"N" * 24)
    assert info.value.reason == "replay"


# -- policy ------------------------------------------------------------------


def _one_door(vectors, key: AuthorizedKey, *, duration: float = 30.0, use_source: bool = False) -> Verifier:
    return Verifier(_keys(vectors)[2], [SpaDoor("ssh", (key,), duration, use_source)], vectors["window"])


def _key(vectors, **kw) -> AuthorizedKey:
    return AuthorizedKey(_keys(vectors)[1], "c", 3, **kw)


def _request(vectors, *, door: str = "ssh", address: str = SOURCE, duration: int = 0, seed: bytes | None = None):
    client_seed, _, _, server_public = _keys(vectors)
    return protocol.build(seed or client_seed, server_public, door, ipaddress.ip_address(address), duration,
                          time_ms=T_EXACT)


def _check(verifier: Verifier, packet: bytes, source: str = SOURCE, now: float = T_EXACT / 1000):
    return verifier.check(packet, ipaddress.ip_address(source), now, _never)


def _rejected(verifier: Verifier, packet: bytes, source: str = SOURCE, now: float = T_EXACT / 1000):
    with pytest.raises(PacketRejected) as info:
        _check(verifier, packet, source, now)
    return info.value


def test_key_not_authorized_for_the_door(vectors):
    other_seed = _seed("other client")
    other = AuthorizedKey(protocol.public_of(other_seed), "other", 1)
    verifier = Verifier(_keys(vectors)[2], [SpaDoor("ssh", (_key(vectors),), 30.0),
                                             SpaDoor("db", (other,), 30.0)], 60)
    assert _check(verifier, _request(vectors, door="db", seed=other_seed)).door == "db"
    err = _rejected(verifier, _request(vectors, door="db"))
    assert err.reason == "policy" and "not authorized for door 'db'" in err.message
    assert protocol.key_id(_keys(vectors)[1]) in err.message
    assert _rejected(verifier, _request(vectors, door="ssh", seed=other_seed)).reason == "policy"


def test_expired_key(vectors):
    now = T_EXACT / 1000
    err = _rejected(_one_door(vectors, _key(vectors, expires=now - 1)), _request(vectors))
    assert err.reason == "expired" and "authorized_keys line 3" in err.message
    assert _rejected(_one_door(vectors, _key(vectors, expires=now)), _request(vectors)).reason == "expired"
    assert _check(_one_door(vectors, _key(vectors, expires=now + 1)), _request(vectors)).door == "ssh"


def test_from_restricts_the_packet_source_and_the_address_to_open(vectors):
    key = _key(vectors, sources=(ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32")))
    verifier = _one_door(vectors, key)
    assert str(_check(verifier, _request(vectors, address="203.0.113.8"), "203.0.113.7").address) == "203.0.113.8"
    assert str(_check(verifier, _request(vectors, address="2001:db8::8"), "203.0.113.7").address) == "2001:db8::8"
    err = _rejected(verifier, _request(vectors, address="203.0.113.8"), "198.51.100.1")
    assert err.reason == "from" and "packet source 198.51.100.1" in err.message and "line 3" in err.message
    err = _rejected(verifier, _request(vectors, address="198.51.100.9"), "203.0.113.7")
    assert err.reason == "from" and "address to open 198.51.100.9" in err.message


def test_use_source_door_grants_the_packet_source(vectors):
    verifier = _one_door(vectors, _key(vectors), use_source=True)
    acc = _check(verifier, _request(vectors, address="198.51.100.9"), "203.0.113.50")
    assert str(acc.address) == "203.0.113.50"
    acc = _check(verifier, _request(vectors, address="198.51.100.9"), "2001:db8::50")
    assert str(acc.address) == "2001:db8::50"
    # from= then applies to the source (which is also the address to open)
    key = _key(vectors, sources=(ipaddress.ip_network("203.0.113.0/24"),))
    verifier = _one_door(vectors, key, use_source=True)
    assert str(_check(verifier, _request(vectors, address="198.51.100.9"), "203.0.113.50").address) == "203.0.113.50"
    assert _rejected(verifier, _request(vectors, address="203.0.113.9"), "198.51.100.1").reason == "from"


@pytest.mark.parametrize("asked, door, granted", [
    (0, 30.0, 30.0), (31, 30.0, 30.0), (2**32 - 1, 30.0, 30.0), (29, 30.0, 29.0), (1, 30.0, 1.0), (30, 30.0, 30.0),
    (0, 2.5, 2.5), (3, 2.5, 2.5),
])
def test_duration_capping(vectors, asked, door, granted):
    acc = _check(_one_door(vectors, _key(vectors), duration=door), _request(vectors, duration=asked))
    assert acc.duration == granted


def test_policy_reports_the_key_and_comment(vectors):
    acc = _check(_one_door(vectors, _key(vectors)), _request(vectors))
    assert acc.key_id == protocol.key_id(_keys(vectors)[1]) and acc.comment == "c"


# -- pair keys -----------------------------------------------------------------

LOW_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4, sign bit set
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
]
INVALID = [
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p: not canonical
    "0200000000000000000000000000000000000000000000000000000000000000",  # y = 2: not on the curve
]


@pytest.mark.parametrize("public_hex", LOW_ORDER + INVALID)
def test_pair_keys_refuses_low_order_and_invalid_keys(vectors, public_hex):
    _, _, server_seed, server_public = _keys(vectors)
    bad = bytes.fromhex(public_hex)
    with pytest.raises(ValueError):
        protocol.pair_keys(server_seed, bad, bad, server_public)
    with pytest.raises(ValueError):  # the server refuses such a line in authorized_keys at load
        Verifier(server_seed, [SpaDoor("ssh", (AuthorizedKey(bad, "", 1),), 30.0)], 60)


@pytest.mark.parametrize("length", [0, 31, 33])
def test_pair_keys_refuses_wrong_lengths(vectors, length):
    client_seed, client_public, _, server_public = _keys(vectors)
    with pytest.raises(ValueError):
        protocol.pair_keys(client_seed, bytes(length), client_public, server_public)
    with pytest.raises(ValueError):
        protocol.pair_keys(bytes(length), server_public, client_public, server_public)
    with pytest.raises(ValueError):
        protocol.key_id(bytes(length))


def test_pair_keys_bind_both_public_keys(vectors):
    client_seed, client_public, _, server_public = _keys(vectors)
    right = protocol.pair_keys(client_seed, server_public, client_public, server_public)
    swapped = protocol.pair_keys(client_seed, server_public, server_public, client_public)
    assert right != swapped and right.hint_key != right.aead_key


def test_request_repr_and_sealed_fields(vectors):
    client_seed, client_public, server_seed, server_public = _keys(vectors)
    packet = bytes.fromhex(vectors["positive"][0]["packet"])
    header = protocol.open_header(packet)
    pair = protocol.pair_keys(server_seed, client_public, client_public, server_public)
    sealed = protocol.open_body(packet, header, pair, protocol.epoch_of(T0))
    assert sealed.request.time == T0 / 1000 and sealed.request.door == "ssh"
    assert len(sealed.signature) == 64 and len(sealed.signed_body) == protocol.SIGNED_BODY_SIZE
    protocol.check_signature(sealed, client_public, server_public)
    with pytest.raises(PacketRejected) as info:  # signed for this server only
        protocol.check_signature(sealed, client_public, protocol.public_of(_seed("other server")))
    assert info.value.reason == "signature"
    with pytest.raises(PacketRejected) as info:  # a hint cannot be moved onto another epoch
        protocol.open_body(packet, header, pair, protocol.epoch_of(T0) + 1)
    assert info.value.reason == "malformed"
    assert replace(sealed.request, door="x").door == "x"


if __name__ == "__main__":
    json.dump(make_vectors(), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
