"""The SPA packet, version 1: build, and open in the order the server must check it.

One UDP datagram of exactly ``PACKET_SIZE`` bytes (docs/protocol.md)::

    header  version(1) | hint(8) | nonce(24)                       cleartext, authenticated
    sealed  XChaCha20-Poly1305(pair.aead_key, nonce, body, ad=header)
    body    time_ms(8) | flags(1) | family(1) | address(16) | duration(4)
            | door_len(1) | door(127, zero padded) | signature(64)

* The pair keys come from X25519 between the client's and the server's keys
  (both Ed25519 keys, mapped to X25519), through HKDF with both public keys in
  the info: only that client and that server can compute them, so a packet
  made for one server is noise to another.
* The hint is a MAC of the 30 s time epoch under the pair's hint key: the
  server finds the client by a dictionary lookup, an observer cannot link two
  packets of one client across epochs, and junk is dropped before any
  decryption.
* The signature (Ed25519, under its own label) covers the server's public
  key, the header and the body: a server whose key leaks can read and forge
  the AEAD layer, but still cannot make a packet that passes as a client's.
* Every packet has the same length, so the size says nothing about the door
  or the address family.

Bytes in, checked at the boundary: each ``open_*``/``check_*`` step raises
``PacketRejected`` with a short reason; nothing here returns a bool for
"valid". No I/O: the replay cache and the clock are the caller's.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spa.errors import PacketRejected
from spa.grant import Address
from spa import keytext

try:
    # PyNaCl's own cffi module, under its public bindings. A failed decryption
    # through ``nacl.bindings`` costs about 7 µs (argument checks, an exception
    # object); the call itself about 1 µs. Under a flood of forged packets that
    # carry a real client's hint, this is nearly all the capture loop's work.
    from nacl._sodium import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - a PyNaCl without it: the public binding, slower
    _ffi = _lib = None

VERSION = 1
#: The hint changes every this many seconds.
HINT_EPOCH = 30

# Domain separation: one label per derived value, never reused.
# The key id's label and function live in spa.keytext (read by clients that must not load the crypto libraries).
LABEL_KEY_ID = keytext.LABEL_KEY_ID
key_id = keytext.key_id
LABEL_PAIR = b"spa-knock/v1 pair keys"
LABEL_HINT = b"spa-knock/v1 key hint"
LABEL_SIGN = b"spa-knock/v1 request signature"

HINT_SIZE = 8
NONCE_SIZE = 24
HEADER_SIZE = 1 + HINT_SIZE + NONCE_SIZE
DOOR_MAX = 127  # spa.grant.MAX_DOOR_NAME: every knockd.conf door name fits
SIGNATURE_SIZE = 64
TAG_SIZE = 16
_FIELDS = struct.Struct("!QBB16sIB")  # time_ms, flags, family, address, duration, door_len
SIGNED_BODY_SIZE = _FIELDS.size + DOOR_MAX
BODY_SIZE = SIGNED_BODY_SIZE + SIGNATURE_SIZE
PACKET_SIZE = HEADER_SIZE + BODY_SIZE + TAG_SIZE

#: The largest duration a packet can ask for (the door caps it anyway).
MAX_DURATION = 0xFFFFFFFF

_EPOCH = struct.Struct("!Q")


def _check_len(value: bytes, n: int, what: str) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != n:
        raise ValueError(f"{what} must be {n} bytes")


@dataclass(frozen=True, slots=True)
class PairKeys:
    """The two symmetric keys one client shares with one server."""

    hint_key: bytes
    aead_key: bytes

    def hint(self, epoch: int) -> bytes:
        return hmac.digest(self.hint_key, LABEL_HINT + _EPOCH.pack(epoch), "sha256")[:HINT_SIZE]


def public_of(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte seed."""
    _check_len(seed, 32, "private key seed")
    public, _ = sodium.crypto_sign_seed_keypair(bytes(seed))
    return public


def pair_keys(own_seed: bytes, peer_public: bytes, client_public: bytes, server_public: bytes) -> PairKeys:
    """The pair keys, computed by either side from its own seed and the other's public key.

    Raises ``ValueError`` for a peer key that is not a usable Ed25519 point
    (a low-order point would give an all-zero secret that anyone can compute).
    """
    _check_len(own_seed, 32, "private key seed")
    for value, what in ((peer_public, "peer public key"), (client_public, "client public key"),
                        (server_public, "server public key")):
        _check_len(value, 32, what)
    _, secret64 = sodium.crypto_sign_seed_keypair(bytes(own_seed))
    try:
        own_x = sodium.crypto_sign_ed25519_sk_to_curve25519(secret64)
        peer_x = sodium.crypto_sign_ed25519_pk_to_curve25519(bytes(peer_public))
        shared = sodium.crypto_scalarmult(own_x, peer_x)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
        raise ValueError(f"public key is not a usable Ed25519 key: {exc}") from None
    if not any(shared):
        raise ValueError("public key is a low-order point")
    okm = HKDF(hashes.SHA256(), 64, salt=LABEL_PAIR, info=bytes(client_public) + bytes(server_public)).derive(shared)
    return PairKeys(okm[:32], okm[32:])


def epoch_of(time_ms: int) -> int:
    return time_ms // (HINT_EPOCH * 1000)


# --------------------------------------------------------------------------
# The request


@dataclass(frozen=True, slots=True)
class Request:
    """What one SPA packet asks for, once opened."""

    time_ms: int
    nonce: bytes
    #: The address to open for, as signed by the client.
    address: Address
    #: Seconds; 0 asks for the door's own duration.
    duration: int
    door: str

    @property
    def time(self) -> float:
        return self.time_ms / 1000.0


def _pack_address(address: Address) -> tuple[int, bytes]:
    if isinstance(address, ipaddress.IPv4Address):
        return 4, address.packed + bytes(12)
    if isinstance(address, ipaddress.IPv6Address):
        return 6, ipaddress.IPv6Address(address.packed).packed  # a zone is local to the client: not sent
    raise ValueError(f"address must be an IPv4 or IPv6 address, not {address!r}")


def _signed_part(server_public: bytes, header: bytes, signed_body: bytes) -> bytes:
    return LABEL_SIGN + server_public + header + signed_body


def build(
    client_seed: bytes,
    server_public: bytes,
    door: str,
    address: Address,
    duration: int = 0,
    *,
    time_ms: int,
    nonce: bytes | None = None,
    pair: PairKeys | None = None,
) -> bytes:
    """One SPA packet. ``nonce`` and ``pair`` are for tests and vectors (default: random, computed)."""
    _check_len(server_public, 32, "server public key")
    door_bytes = door.encode("utf-8")
    if not 1 <= len(door_bytes) <= DOOR_MAX:
        raise ValueError(f"door name must be 1 to {DOOR_MAX} bytes of UTF-8")
    if not 0 <= duration <= MAX_DURATION:
        raise ValueError("duration out of range")
    if not 0 <= time_ms < 1 << 64:
        raise ValueError("time out of range")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    _check_len(nonce, NONCE_SIZE, "nonce")
    public, secret64 = sodium.crypto_sign_seed_keypair(bytes(client_seed))
    if pair is None:
        pair = pair_keys(client_seed, server_public, public, server_public)
    family, packed = _pack_address(address)
    header = bytes([VERSION]) + pair.hint(epoch_of(time_ms)) + nonce
    signed_body = _FIELDS.pack(time_ms, 0, family, packed, duration, len(door_bytes)) + door_bytes.ljust(DOOR_MAX, b"\0")
    signature = sodium.crypto_sign(_signed_part(server_public, header, signed_body), secret64)[:SIGNATURE_SIZE]
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(signed_body + signature, header, nonce, pair.aead_key)
    return header + sealed


# --------------------------------------------------------------------------
# Opening, cheapest check first


@dataclass(frozen=True, slots=True)
class Header:
    raw: bytes
    hint: bytes
    nonce: bytes


def open_header(data: bytes) -> Header:
    """Step 1: size and version. Costs nothing; most junk stops here."""
    if len(data) != PACKET_SIZE:
        raise PacketRejected("size", f"{len(data)} bytes, an SPA packet has {PACKET_SIZE}")
    if data[0] != VERSION:
        raise PacketRejected("version", f"protocol version {data[0]}, this server speaks {VERSION}")
    return Header(bytes(data[:HEADER_SIZE]), bytes(data[1 : 1 + HINT_SIZE]), bytes(data[1 + HINT_SIZE : HEADER_SIZE]))


@dataclass(frozen=True, slots=True)
class Sealed:
    """A body that passed the AEAD: authentic for the pair, signature not yet checked."""

    header: Header
    request: Request
    signed_body: bytes
    signature: bytes


def aead_open(sealed: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """XChaCha20-Poly1305 (IETF) decryption: the plaintext, or None if the tag does not verify."""
    if len(nonce) != NONCE_SIZE or len(key) != 32 or len(sealed) < TAG_SIZE:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce, a 32-byte key and at least the tag")
    if _lib is None:
        try:
            return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, ad, nonce, key)
        except nacl.exceptions.CryptoError:
            return None
    out = _ffi.new("unsigned char[]", len(sealed))
    size = _ffi.new("unsigned long long *")
    if _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(out, size, _ffi.NULL, sealed, len(sealed), ad, len(ad),
                                                       nonce, key) != 0:
        return None
    return _ffi.buffer(out, size[0])[:]


def open_body(data: bytes, header: Header, pair: PairKeys, epoch: int) -> Sealed:
    """Step 3: AEAD (a cheap symmetric check), then the body's own rules.

    ``epoch`` is the one whose hint matched (step 2): the packet's time must
    fall in it, so a hint cannot be lifted onto a packet of another time.
    """
    body = aead_open(bytes(data[HEADER_SIZE:]), header.raw, header.nonce, pair.aead_key)
    if body is None:
        raise PacketRejected("aead", "authentication failed (not made with this client's and this server's keys)")
    time_ms, flags, family, packed, duration, door_len = _FIELDS.unpack_from(body)
    door_field = body[_FIELDS.size : SIGNED_BODY_SIZE]
    # Authentic but malformed means a broken client: reject exactly, never guess.
    if flags != 0:
        raise PacketRejected("malformed", f"unknown flags 0x{flags:02x}")
    if family == 4:
        if any(packed[4:]):
            raise PacketRejected("malformed", "IPv4 address padding is not zero")
        address: Address = ipaddress.IPv4Address(packed[:4])
    elif family == 6:
        address = ipaddress.IPv6Address(packed)
    else:
        raise PacketRejected("malformed", f"unknown address family {family}")
    if not 1 <= door_len <= DOOR_MAX or any(door_field[door_len:]):
        raise PacketRejected("malformed", "bad door name length or padding")
    try:
        door = door_field[:door_len].decode("utf-8")
    except UnicodeDecodeError:
        raise PacketRejected("malformed", "door name is not UTF-8") from None
    if epoch_of(time_ms) != epoch:
        raise PacketRejected("malformed", "hint does not match the packet's time")
    request = Request(time_ms, header.nonce, address, duration, door)
    return Sealed(header, request, body[:SIGNED_BODY_SIZE], body[SIGNED_BODY_SIZE:])


def check_time(request: Request, now: float, window: float) -> float:
    """Step 4: the packet's time against ours; returns the skew (packet minus server, seconds)."""
    skew = request.time - now
    if skew < -window:
        raise PacketRejected("stale", f"made {-skew:.1f} s ago (window {window:.0f} s): replayed, or the client's clock is {-skew:.0f} s slow")
    if skew > window:
        raise PacketRejected("future", f"dated {skew:.1f} s ahead (window {window:.0f} s): the client's clock is {skew:.0f} s fast")
    return skew


def check_signature(sealed: Sealed, client_public: bytes, server_public: bytes) -> None:
    """Step 6: the client's Ed25519 signature (the one public-key operation, done last)."""
    message = _signed_part(server_public, sealed.header.raw, sealed.signed_body)
    try:
        sodium.crypto_sign_open(sealed.signature + message, client_public)
    except nacl.exceptions.BadSignatureError:
        raise PacketRejected("signature", "signature does not verify") from None
