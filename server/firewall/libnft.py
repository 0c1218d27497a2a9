"""Talking to nftables through its JSON interface.

In process through libnftables where it loads (Debian's ``nftables`` Python
binding when it imports, else a small ctypes binding of our own, so a
virtualenv needs no system site-packages): about 0.2 ms a command. Otherwise
one ``nft -j -f -`` process per command (about 4 ms).

A libnftables context opens its netlink socket when it is created, so it
talks to the network namespace of the thread that created it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import threading
from typing import Any, Protocol

from spa.errors import BackendUnavailable, FirewallError
from spa.server.firewall import run as runner

log = logging.getLogger(__name__)

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_HANDLE = 1 << 3
_NFT_CTX_OUTPUT_JSON = 1 << 4


class Transport(Protocol):
    kind: str

    def cmd(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Run one JSON document (a transaction) and return the JSON answer (empty dict if none)."""


def _loads(text: str) -> dict[str, Any]:
    text = text.strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FirewallError(f"nft returned output that is not JSON: {exc}") from None


class LibNftables:
    """libnftables through ctypes; one context, serialised by a lock."""

    kind = "libnftables"

    def __init__(self, soname: str = "libnftables.so.1"):
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot load {soname}: {exc}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise BackendUnavailable("nft_ctx_new failed (no netlink access?)")
        lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON | _NFT_CTX_OUTPUT_HANDLE)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib = lib
        self._ctx = ctx
        self._lock = threading.Lock()

    def cmd(self, doc: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(doc).encode()
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text)
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise FirewallError("nftables rejected the transaction", ["libnftables", text.decode()[:400]], rc, err)
        return _loads(out)

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class DebianBinding:
    """Debian's ``python3-nftables`` module (itself a ctypes wrapper of libnftables)."""

    kind = "python3-nftables"

    def __init__(self) -> None:
        import nftables  # type: ignore[import-not-found]

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._lock = threading.Lock()

    def cmd(self, doc: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            rc, out, err = self._nft.json_cmd(doc)
        if rc != 0:
            raise FirewallError("nftables rejected the transaction", ["python3-nftables"], rc, str(err))
        return out if isinstance(out, dict) else _loads(out or "")


class NftProcess:
    """One ``nft -j -f -`` process per command: the fallback when libnftables does not load."""

    kind = "nft-process"

    def __init__(self, nft: str | None = None, timeout: float = runner.DEFAULT_TIMEOUT):
        path = nft or runner.which("nft")
        if path is None:
            raise BackendUnavailable("nft is not installed (Debian: apt-get install nftables)")
        self._argv = [path, "-j", "-f", "-"]
        self._timeout = timeout

    def cmd(self, doc: dict[str, Any]) -> dict[str, Any]:
        proc = runner.run(self._argv, input=json.dumps(doc), timeout=self._timeout)
        return _loads(proc.stdout)


def open_transport(kind: str = "auto") -> Transport:
    """The fastest transport that works here, or the one named."""
    if kind in ("auto", "python3-nftables"):
        try:
            return DebianBinding()
        except Exception as exc:  # noqa: BLE001 - any import or load failure means "not here"
            if kind != "auto":
                raise BackendUnavailable(f"python3-nftables binding unavailable: {exc}") from None
    if kind in ("auto", "libnftables"):
        try:
            return LibNftables()
        except BackendUnavailable:
            if kind != "auto":
                raise
    if kind in ("auto", "nft-process"):
        return NftProcess()
    raise BackendUnavailable(f"unknown nft transport {kind!r} (auto, python3-nftables, libnftables, nft-process)")
