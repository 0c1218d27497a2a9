"""The SPA key-hint check in the kernel's filter, run on a classic BPF interpreter (``tests/cbpf.py``).

Programs are the daemon's own: libpcap's compilation of ``spa.filter.capture_expression``
with the SPA port, then ``spa.hint_filter.with_hint_check``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random

import pytest

from spa import hint_filter
from spa.filter import SpaPort, capture_expression
from spa.protocol import HINT_SIZE, PACKET_SIZE, VERSION
from spa.server.bpf import compile_filter
from tests import rawip
from tests.cbpf import run, validate

SERVER4, SERVER6 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")
PORT = 62201
STEPS = {("tcp", 7000, None), ("udp", 9000, None)}


def _program(hints, dests=(SERVER4, SERVER6)) -> list:
    base = compile_filter(capture_expression(list(dests), STEPS, spa=SpaPort(PORT, PACKET_SIZE, VERSION)))
    program = hint_filter.with_hint_check(base, PORT, hints)
    validate(program)
    assert len(program) == hint_filter.size(len(base), len(hint_filter.prefixes(hints)))
    return program


def _spa(hint: bytes, *, v6: bool = False, size: int = PACKET_SIZE, version: int = VERSION, port: int = PORT,
         ihl: int = 5, frag: int = 0) -> bytes:
    payload = (bytes([version]) + hint + os.urandom(PACKET_SIZE))[:size]
    datagram = rawip.udp(40000, port, payload)
    if v6:
        return rawip.ipv6(rawip.UDP, datagram)
    return rawip.ipv4(rawip.UDP, datagram, ihl=ihl, frag=frag)


def _hints(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(HINT_SIZE) for _ in range(n)]


@pytest.mark.parametrize("v6", [False, True])
def test_a_listed_hint_passes_and_any_other_is_dropped(v6):
    hints = _hints(3)
    program = _program(hints)
    for h in hints:
        assert run(program, _spa(h, v6=v6))
    assert not run(program, _spa(b"\x00" * HINT_SIZE, v6=v6))
    assert not run(program, _spa(_hints(1, seed=99)[0], v6=v6))
    # Only the first four bytes are the kernel's: the verifier checks the rest.
    assert run(program, _spa(hints[0][:4] + b"\xff" * 4, v6=v6))


def test_size_version_and_port_are_still_libpcaps():
    h = _hints(1)
    program = _program(h)
    assert not run(program, _spa(h[0], size=PACKET_SIZE - 1))
    assert not run(program, _spa(h[0], version=VERSION + 1))
    assert not run(program, _spa(h[0], port=PORT + 1))
    assert not run(program, rawip.ipv4(rawip.UDP, rawip.udp(40000, PORT, bytes([VERSION]) + h[0]), dst="192.0.2.9"))


def test_ipv4_options_move_the_udp_header_and_the_hint_with_it():
    h = _hints(1)
    program = _program(h)
    assert run(program, _spa(h[0], ihl=7))
    assert not run(program, _spa(_hints(1, seed=5)[0], ihl=7))


def test_knocks_go_through_untouched():
    program = _program(_hints(2))
    assert run(program, rawip.ipv4(rawip.TCP, rawip.tcp(40000, 7000)))
    assert run(program, rawip.ipv4(rawip.UDP, rawip.udp(40000, 9000, b"x")))
    assert run(program, rawip.ipv6(rawip.TCP, rawip.tcp(40000, 7000)))
    assert not run(program, rawip.ipv4(rawip.TCP, rawip.tcp(40000, 7001)))


def test_no_key_means_no_datagram_to_the_spa_port():
    program = _program([])
    assert not run(program, _spa(_hints(1)[0]))
    assert run(program, rawip.ipv4(rawip.TCP, rawip.tcp(40000, 7000)))


def test_many_hints_span_several_blocks_and_every_one_is_found():
    hints = _hints(1300, seed=3)
    program = _program(hints)
    assert hint_filter.fits(len(program) - hint_filter.size(0, 1300), 1300)
    for h in hints[::7] + hints[-3:]:
        assert run(program, _spa(h)) and run(program, _spa(h, v6=True))
    for h in _hints(200, seed=4):
        assert not run(program, _spa(h))


def test_fits_is_the_kernels_limit():
    assert hint_filter.fits(100, 3900) and not hint_filter.fits(100, 4000)
    assert hint_filter.fits(100, 3000, 800) and not hint_filter.fits(100, 3000, 1000)
    for hints in (0, 300, 3000, 3900):
        n = hint_filter.room(100, hints)
        assert hint_filter.fits(100, hints, n) and not hint_filter.fits(100, hints, n + 1)
    assert hint_filter.room(100, 4000) == 0
    for hints, nonces in ((0, 0), (3, 0), (250, 1), (251, 250), (1300, 700)):
        program = [(0x06, 0, 0, 65535)]
        built = hint_filter.with_hint_check(program, PORT, [i.to_bytes(4, "big") for i in range(hints)],
                                            [i.to_bytes(4, "big") + bytes(20) for i in range(nonces)])
        assert len(built) == hint_filter.size(1, hints, nonces)


@pytest.mark.parametrize("v6", [False, True])
def test_a_listed_nonce_is_dropped_in_the_kernel_with_its_hint_still_good(v6):
    hints = _hints(2)
    packets = [_spa(hints[0], v6=v6) for _ in range(3)]
    ip = 40 if v6 else 20  # the nonce follows the UDP header, the version byte and the hint
    refused = [p[ip + 8 + 1 + HINT_SIZE:][:24] for p in packets[:2]]
    program = _program_with(hints, refused)
    assert not run(program, packets[0]) and not run(program, packets[1])  # replays of accepted packets
    assert run(program, packets[2])  # a new packet of the same client
    assert run(program, rawip.ipv4(rawip.TCP, rawip.tcp(40000, 7000)))


def test_many_nonces_span_several_blocks():
    hints = _hints(1)
    packets = [_spa(hints[0]) for _ in range(600)]
    refused = [p[20 + 8 + 1 + HINT_SIZE:][:24] for p in packets[:520]]
    program = _program_with(hints, refused)
    assert not any(run(program, p) for p in packets[:520])
    assert all(run(program, p) for p in packets[520:])


def _program_with(hints, refused) -> list:
    base = compile_filter(capture_expression([SERVER4, SERVER6], STEPS, spa=SpaPort(PORT, PACKET_SIZE, VERSION)))
    program = hint_filter.with_hint_check(base, PORT, hints, refused)
    validate(program)
    return program


def test_refused_programs():
    with pytest.raises(ValueError, match="returns A"):
        hint_filter.with_hint_check([(0x16, 0, 0, 0)], PORT, [])
    with pytest.raises(ValueError, match="accepts nothing"):
        hint_filter.with_hint_check([(0x06, 0, 0, 0)], PORT, [])


def _daemon(tmp_path, monkeypatch, clock: list[float], extra_keys: int = 0, more_doors: str = "",
            screen: str = "classic"):
    """A real Daemon with one SPA door (``extra_keys`` more authorized keys, ``more_doors`` more config),
    a fake capture, our clock."""
    import time
    import types
    from pathlib import Path

    import spa.server.daemon as daemon_module
    from spa import protocol
    from spa.keys import ed25519
    from spa.keys.ed25519 import PublicKey, format_public
    from spa.server.daemon import Daemon, Runtime, Settings
    from tests.daemon_fakes import FakeCapture, FakeManager

    server = ed25519.generate(str(tmp_path / "server.key"), "server", "s")
    client = ed25519.generate(str(tmp_path / "client.key"), "client", "c")
    lines = [Path(client.path + ".pub").read_text().strip()]
    lines += [format_public(PublicKey(protocol.public_of(os.urandom(32)), f"k{i}")).strip() for i in range(extra_keys)]
    (tmp_path / "authorized_keys").write_text("\n".join(lines) + "\n")
    conf = tmp_path / "knockd.conf"
    conf.write_text(f"[options]\n    ServerKey = {server.path}\n[ssh]\n    authorized_keys = "
                    f"{tmp_path / 'authorized_keys'}\n    open = 22/tcp\n    cmd_timeout = 30\n{more_doors}")
    monkeypatch.setattr(daemon_module, "time", types.SimpleNamespace(
        time=lambda: clock[0], monotonic=time.monotonic, strftime=time.strftime, localtime=time.localtime))
    d = Daemon(Settings(spa_screen=screen), Runtime.load(str(conf)), FakeManager())
    d.capture = FakeCapture()
    d.matcher.local_addresses = frozenset({SERVER4})
    return d


def test_the_daemon_moves_the_kernels_hints_with_the_index_at_each_epoch(tmp_path, monkeypatch):
    from spa.authorize import SKEW_REPORT
    from spa.protocol import HINT_EPOCH, epoch_of

    clock = [1_750_000_015.0]  # mid-epoch
    d = _daemon(tmp_path, monkeypatch, clock)
    try:
        pair = next(iter(d.spa.verifier.clients.values())).pair
        reach = d.spa.verifier.window + SKEW_REPORT
        far = epoch_of(int((clock[0] + reach) * 1000)) + 1  # just beyond the index, for now
        old = epoch_of(int((clock[0] - reach) * 1000))  # the oldest epoch the index holds
        d.rebuild_filter()
        first = d.capture.filters[-1]
        assert run(first, _spa(pair.hint(epoch_of(int(clock[0] * 1000)))))
        assert run(first, _spa(pair.hint(old))) and not run(first, _spa(pair.hint(far)))
        d._tick()
        assert len(d.capture.filters) == 1  # the same epoch: nothing to change
        clock[0] += HINT_EPOCH
        d._tick()
        moved = d.capture.filters[-1]
        assert len(d.capture.filters) == 2
        assert run(moved, _spa(pair.hint(far))) and not run(moved, _spa(pair.hint(old)))
    finally:
        d.capture = None
        d.close()


@pytest.mark.parametrize("extra, mode, skewed", [
    (69, "for the time window only", False),  # 70 keys x 65 epochs do not fit: the window's epochs do
    (700, "no key-hint check", True),          # 701 keys x 7 epochs do not fit either: size and version only
])
def test_too_many_keys_narrow_the_kernels_list_then_drop_it(tmp_path, monkeypatch, caplog, extra, mode, skewed):
    from spa.protocol import epoch_of

    clock = [1_750_000_015.0]
    d = _daemon(tmp_path, monkeypatch, clock, extra_keys=extra)
    try:
        with caplog.at_level(logging.INFO, logger="spa.server.spa_filter"):
            d.rebuild_filter()
        assert any(mode in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        program = d.capture.filters[-1]
        validate(program)
        pair = d.spa.verifier.clients[d.spa.verifier.doors["ssh"].keys[0].public].pair  # the real client's
        now = epoch_of(int(clock[0] * 1000))
        assert run(program, _spa(pair.hint(now)))
        # A clock 10 minutes off: its hint is in the index (for the skew report) but not in a narrowed list.
        assert bool(run(program, _spa(pair.hint(now - 20)))) is skewed
    finally:
        d.capture = None
        d.close()


def test_the_daemon_lists_accepted_nonces_in_the_kernel_and_forgets_them_with_the_cache(tmp_path, monkeypatch):
    from spa.protocol import epoch_of

    clock = [1_750_000_015.0]
    d = _daemon(tmp_path, monkeypatch, clock)
    try:
        pair = next(iter(d.spa.verifier.clients.values())).pair
        packet = _spa(pair.hint(epoch_of(int(clock[0] * 1000))))
        nonce = packet[20 + 8 + 1 + HINT_SIZE:][:24]
        d.rebuild_filter()
        assert run(d.capture.filters[-1], packet)
        d.replay.add(nonce, clock[0] + 61)  # the packet was accepted
        d.replay.add(b"R" * 32, clock[0] + 61)  # a used rotating sequence: not an SPA nonce
        d._tick()
        assert len(d.capture.filters) == 2 and not run(d.capture.filters[-1], packet)
        d._tick()
        assert len(d.capture.filters) == 2  # nothing changed since
        clock[0] += 62
        d._tick()  # the window is over: the cache forgets the nonce, and so does the kernel
        assert run(d.capture.filters[-1], packet)
    finally:
        d.capture = None
        d.close()


def test_a_door_knocking_on_the_spa_port_gets_every_datagram_to_it(tmp_path, monkeypatch):
    """knockd semantics first: a UDP knock on the SPA port is a knock, whatever its size or content."""
    d = _daemon(tmp_path, monkeypatch, [1_750_000_015.0],
                more_doors="[knocks]\n    sequence = 62201:udp,7000\n    open = 22/tcp\n")
    try:
        d.rebuild_filter()
        program = d.capture.filters[-1]
        assert run(program, rawip.ipv4(rawip.UDP, rawip.udp(40000, PORT, b"knock")))
        assert run(program, _spa(b"\x00" * HINT_SIZE))
        assert not d.spa_filter.active  # and no nonce list is put back over it later
        d.replay.add(b"n" * 24, 1_750_000_100.0)
        d._tick()
        assert d.capture.filters[-1] == program
    finally:
        d.capture = None
        d.close()


def test_a_hint_flooded_with_forgeries_leaves_the_kernel_while_the_capture_drops(tmp_path, monkeypatch, caplog):
    from spa.protocol import epoch_of
    from spa.server.spa_filter import HINT_FLOOD, HINT_QUARANTINE

    clock = [1_750_000_015.0]
    d = _daemon(tmp_path, monkeypatch, clock, extra_keys=1)
    try:
        pairs = [c.pair for c in d.spa.verifier.clients.values()]
        epoch = epoch_of(int(clock[0] * 1000))
        flooded, other = pairs[0].hint(epoch), pairs[1].hint(epoch)
        d.rebuild_filter()
        # A flood the loop keeps up with (no kernel drops): the hint stays, every packet is decrypted.
        d.spa.aead_by_hint[flooded] = 10 * HINT_FLOOD
        d._tick()
        assert run(d.capture.filters[-1], _spa(flooded)) and not d.spa_filter.quarantine
        # The same with the capture dropping packets: that hint goes, the other key's stays.
        d.spa.aead_by_hint[flooded] = HINT_FLOOD
        d.spa.aead_by_hint[other] = HINT_FLOOD - 1
        d.capture.drops += 500
        with caplog.at_level(logging.WARNING, logger="spa.server.spa_filter"):
            d._tick()
        program = d.capture.filters[-1]
        assert not run(program, _spa(flooded)) and run(program, _spa(other))
        assert any("dropped in the kernel for 30 s" in r.getMessage() for r in caplog.records)
        # Its time up, it comes back; flooded again, it goes for twice as long.
        clock[0] += HINT_QUARANTINE
        d._tick()
        assert run(d.capture.filters[-1], _spa(flooded))
        d.spa.aead_by_hint[flooded] = HINT_FLOOD
        d.capture.drops += 500
        d._tick()
        assert not run(d.capture.filters[-1], _spa(flooded))
        assert d.spa_filter.quarantine[flooded] == clock[0] + 2 * HINT_QUARANTINE
        d.capture = None  # the metrics read no capture here
        assert {m.name: m for m in d.metrics(active=0)}["spa_key_hints_quarantined"].samples == {(): 1}
    finally:
        d.capture = None
        d.close()


@pytest.mark.parametrize("asked, level", [("auto", logging.INFO), ("ebpf", logging.ERROR)])
def test_without_ebpf_the_spa_port_falls_back_to_the_classic_filter(tmp_path, monkeypatch, caplog, asked, level):
    """The eBPF screen refused (no CAP_BPF, an old kernel, lockdown): the classic filter takes the SPA port,
    said once, as an error when the screen was asked for by name."""
    import spa.server.daemon as daemon_module
    from spa.protocol import epoch_of
    from spa.server import ebpf

    def refused(port):
        raise ebpf.BpfError("bpf() not permitted (CAP_BPF missing?)")

    monkeypatch.setattr(daemon_module, "SpaScreen", refused)
    clock = [1_750_000_015.0]
    d = _daemon(tmp_path, monkeypatch, clock, screen=asked)
    try:
        with caplog.at_level(logging.INFO, logger="spa.server"):
            d.rebuild_filter()
            d.rebuild_filter()
        said = [r for r in caplog.records if "bpf() not permitted" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == level, [r.getMessage() for r in caplog.records]
        assert d.screen is None and d.spa_filter.active
        pair = next(iter(d.spa.verifier.clients.values())).pair
        assert run(d.capture.filters[-1], _spa(pair.hint(epoch_of(int(clock[0] * 1000)))))
    finally:
        d.capture = None
        d.close()


def test_the_screens_hint_map_follows_the_index_not_every_rebuild(tmp_path, monkeypatch):
    """With the eBPF screen, the hint map is refilled when the index moves an epoch (at the tick) or the
    verifier changes, and not on every filter rebuild (addresses, rotating windows). A stand-in screen
    records what it is given; the real one is tested against the kernel in tests/netns."""
    import spa.server.daemon as daemon_module
    from spa.protocol import HINT_EPOCH

    given: list[dict] = []

    class Screen:
        def __init__(self, port):
            self.port, self.program = port, object()

        def set_hints(self, hints):
            given.append(dict(hints))

        def refuse(self, nonces):
            pass

        def counts(self):
            return {}

        def close(self):
            pass

    monkeypatch.setattr(daemon_module, "SpaScreen", Screen)
    clock = [1_750_000_015.0]
    d = _daemon(tmp_path, monkeypatch, clock, screen="auto")
    d.capture.set_screen = lambda program: None
    d._sync_sockets = lambda: None  # the fake capture's socket is no file for a selector
    try:
        d.rebuild_filter()
        d.rebuild_filter()
        assert len(given) == 1 and given[0] == d.spa.verifier.hint_keys(clock[0])
        assert not d.spa_filter.active  # the capture filter leaves the SPA port to the screen
        d._tick()
        assert len(given) == 1
        clock[0] += HINT_EPOCH
        d._tick()
        assert len(given) == 2 and given[1] == d.spa.verifier.hint_keys(clock[0]) and given[1] != given[0]
    finally:
        d.capture = None
        d.close()
