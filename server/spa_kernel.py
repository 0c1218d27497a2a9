"""The SPA port's kernel screen at run time: its maps, its program, and what the daemon tells it.

``spa.spa_program`` generates the program; this module owns its maps:

* *hints*: each key hint the verifier's index holds, with that client's
  AEAD key (kept in step with the index as its epochs move: ``set_hints``);
* *nonces*: the nonces of packets already accepted (``refuse``), so that
  copies of a captured packet stop in the kernel from the moment it is
  accepted (least recently used evicted past ``NONCES``: an evicted nonce
  is still refused by the replay cache, a dictionary lookup);
* a per-CPU scratch area and the counters.

The capture (``spa.server.capture.Capture.set_screen``) puts the program on
sockets of its own, one per interface and protocol, which the daemon reads:
only datagrams whose Poly1305 tag is right ever reach them.

The AEAD keys in the hints map are readable by whoever can read the
daemon's memory anyway (root, or ``CAP_BPF`` with ``CAP_SYS_ADMIN`` for a
map by id): the trust boundary does not move (``docs/threat-model.md``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

from spa import spa_program as SP
from spa.server import ebpf

#: Hint map entries: hints are (clients x epochs indexed), about 65 epochs per client by default.
#: Allocated as used (BPF_F_NO_PREALLOC), so the bound costs nothing until it is reached.
HINTS = 1 << 20
#: Accepted nonces kept in the kernel (preallocated: about 100 bytes each).
NONCES = 1 << 14
_NO_PREALLOC = 1  # BPF_F_NO_PREALLOC


class SpaScreen:
    """Maps and program for SPA port ``port`` (raises ``ebpf.BpfError`` when the kernel refuses)."""

    def __init__(self, port: int) -> None:
        if sys.byteorder != "little":  # the generated code reads ChaCha's words in native order
            raise ebpf.BpfError("the SPA screen's ChaCha20 code needs a little-endian machine")
        reason = ebpf.available()
        if reason is not None:
            raise ebpf.BpfError(reason)
        self.port = port
        self._owned: list = []
        try:
            self.hints = self._own(ebpf.Map.create(ebpf.HASH, SP.HINT_KEY_SIZE, SP.AEAD_KEY_SIZE, HINTS,
                                                   flags=_NO_PREALLOC, name="spa_hints"))
            self.nonces = self._own(ebpf.Map.create(ebpf.LRU_HASH, SP.NONCE_KEY_SIZE, SP.NONCE_VALUE_SIZE, NONCES,
                                                    name="spa_nonces"))
            self.scratch = self._own(ebpf.Map.create(ebpf.PERCPU_ARRAY, 4, SP.SCRATCH_SIZE, 1, name="spa_scratch"))
            self.counters = self._own(ebpf.Map.create(ebpf.ARRAY, 4, SP.COUNTERS_VALUE_SIZE, 1, name="spa_screen_n"))
            maps = SP.Maps(self.hints.fileno(), self.nonces.fileno(), self.scratch.fileno(), self.counters.fileno())
            self.program = self._own(ebpf.Program.load(SP.build(maps, port), name="spa_screen"))
        except BaseException:
            self.close()
            raise
        self._hints: dict[bytes, bytes] = {}
        self._nonce_value = bytes(SP.NONCE_VALUE_SIZE)

    def _own(self, thing):
        self._owned.append(thing)
        return thing

    def set_hints(self, hints: Mapping[bytes, bytes]) -> None:
        """The hints to pass (hint -> AEAD key): the verifier's index now.

        What the map holds is tracked entry by entry, so a refusal part way
        (``ebpf.BpfError``) leaves the next call a true picture to diff from.
        """
        for h in self._hints.keys() - hints.keys():
            self.hints.delete(h)
            del self._hints[h]
        for h, key in hints.items():
            if self._hints.get(h) != key:
                self.hints.update(h, key)
                self._hints[h] = key

    def refuse(self, nonces: Iterable[bytes]) -> None:
        """Nonces of packets accepted: their copies stop in the kernel."""
        for n in nonces:
            self.nonces.update(n, self._nonce_value)

    def counts(self) -> dict[str, int]:
        value = self.counters.lookup(bytes(4))
        return SP.decode_counters(value) if value is not None else dict.fromkeys(SP.COUNTERS, 0)

    def close(self) -> None:
        for thing in reversed(self._owned):
            thing.close()
        self._owned = []
