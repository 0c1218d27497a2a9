"""Ed25519 key files on disk: ``spa keygen``, ``--rotate``, loading with the permission rule.

A key pair is two files: PATH (the private key, 0600) and PATH.pub (one
public line, 0644). Formats are in ``spa.keytext``; the permission rule and
atomic writes in ``spa.keys.secure``.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass

from spa import protocol
from spa.errors import KeyFileError
from spa.keys.secure import read_private, read_public, write_atomic
from spa.keytext import (
    PRIVATE_TYPE,
    PrivateKey,
    PublicKey,
    file_type,
    format_private,
    format_public,
    parse_private,
    parse_public,
)


@dataclass(frozen=True, slots=True)
class KeyPair:
    private: PrivateKey
    public: PublicKey
    path: str

    @property
    def key_id(self) -> str:
        return self.public.key_id


def default_comment() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    return f"{user}@{socket.gethostname()}"


def public_path(path: str) -> str:
    return f"{path}.pub"


def generate(path: str, role: str = "client", comment: str | None = None, *, force: bool = False) -> KeyPair:
    """Write a new key pair to PATH and PATH.pub; refuses to overwrite either without ``force``."""
    if not force:
        for p in (path, public_path(path)):
            if os.path.lexists(p):
                raise KeyFileError("already exists; refusing to overwrite it (use --force)", p)
    seed = os.urandom(32)
    private = PrivateKey(seed, role, comment if comment is not None else default_comment())
    public = PublicKey(protocol.public_of(seed), private.comment)
    # The private half first: a crash in between leaves a key without its
    # .pub (recoverable), never a .pub whose private key is lost.
    write_atomic(path, format_private(private), 0o600, force=force)
    write_atomic(public_path(path), format_public(public), 0o644, force=force)
    return KeyPair(private, public, path)


def load(path: str) -> KeyPair:
    """A private key file (refused if group or others can read it) and its public half."""
    text = read_private(path)
    private = parse_private(text, path)
    return KeyPair(private, PublicKey(protocol.public_of(private.seed), private.comment), path)


def load_public(path: str) -> PublicKey:
    return parse_public(read_public(path), path)


def kind(path: str) -> str | None:
    """The ``type`` of a key file (checked for permissions first): ``spa-ed25519-private``, a shared key, ..."""
    return file_type(read_private(path))


def rotate(path: str, comment: str | None = None) -> tuple[KeyPair, str]:
    """Make a new client key at PATH; the old one moves to PATH.old (and PATH.old.pub).

    While PATH.old exists, ``knock-client`` sends one packet with each key,
    so the client gets in whether the server lists the old line, the new
    one or both: no lockout in between. Once the server lists only the new
    line, the user deletes PATH.old.
    Returns the new pair and the old key's path.
    """
    old = load(path)
    old_path = f"{path}.old"
    if os.path.lexists(old_path):
        raise KeyFileError(f"{old_path} exists from an earlier rotation; remove it once the server no longer "
                           "lists that key, then rotate again", path)
    if old.private.role != "client":
        raise KeyFileError("only client keys rotate this way (a new server key needs every client to trust it)", path)
    os.link(path, old_path)  # the old key is never absent from disk
    if os.path.exists(public_path(path)):
        write_atomic(public_path(old_path), format_public(old.public), 0o644, force=True)
    new = generate(path, "client", comment if comment is not None else old.private.comment, force=True)
    return new, old_path


__all__ = ["KeyPair", "generate", "load", "load_public", "kind", "rotate", "public_path", "PRIVATE_TYPE"]
