"""The client's known_servers file (``~/.knock/known_servers``) and ``spa trust``."""

from __future__ import annotations

import os

from spa.errors import KeyFileError
from spa.keys.secure import read_public, write_atomic
from spa.keytext import KnownServer, PublicKey, find_known_server, format_known_server, parse_known_servers

DEFAULT_DIR = "~/.knock"


def default_path() -> str:
    return os.path.join(os.path.expanduser(DEFAULT_DIR), "known_servers")


def load(path: str | None = None) -> list[KnownServer]:
    path = path or default_path()
    if not os.path.exists(path):
        return []
    return parse_known_servers(read_public(path), path)


def lookup(host: str, path: str | None = None) -> PublicKey:
    """The trusted key of ``host``; a clear error naming the file and ``spa trust`` when there is none."""
    path = path or default_path()
    found = find_known_server(load(path), host)
    if found is None:
        raise KeyFileError(f"no key for server {host!r}; add it with 'spa trust {host} SERVER.pub' "
                           "or pass --server-key FILE", path)
    return found.key


def trust(host: str, key: PublicKey, path: str | None = None) -> str:
    """Record ``key`` for ``host``, replacing an earlier entry for exactly that host. Returns the file's path."""
    path = path or default_path()
    if not host or any(c.isspace() or c == "," for c in host):
        raise KeyFileError(f"host {host!r} must be one name or address, without spaces or commas")
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    kept = []
    if os.path.exists(path):
        text = read_public(path)
        parse_known_servers(text, path)  # refuse to rewrite a file we cannot read
        for line in text.splitlines(keepends=True):
            first = line.split(None, 1)[0].lower() if line.strip() and not line.lstrip().startswith("#") else None
            if first != host.lower():
                kept.append(line if line.endswith("\n") else line + "\n")
    kept.append(format_known_server(host.lower(), key))
    write_atomic(path, "".join(kept), 0o644, force=True)
    return path
