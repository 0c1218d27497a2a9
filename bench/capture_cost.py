"""What one flood packet costs our capture loop, before and after the fast path, in this process (no root).

The daemon's loop (``spa.server.daemon.Daemon._read``) takes a batch of
packets from the capture's ring (``spa.server.ring.Ring.read``), and per
packet: ``spa.packet.fields`` (numbers only), ``Matcher.feed_fields``, and
per packet with events ``Daemon._log_events`` (knockd's ``Stage`` and
``OPEN SESAME`` lines through stdlib ``logging``, rate-limited). This
measures, on the frames ``bench/flooder.py`` sends for the sequence-port and
first-port floods of ``bench/flood.py``, with the daemon's doors and log set-up:

* *before*: ``spa.packet.parse_ip`` (a ``Knock`` with address objects) and the
  matcher as it was before the fast path (``tests/fuzz/reference_matcher.py``,
  kept as the model the fast one is checked against);
* *after*: ``fields`` and ``feed_fields`` alone, then the whole ``Daemon._read``
  over a ring in memory laid out as the kernel lays it out (``Ring.over``),
  grants going to a recorder instead of the firewall (``tests/daemon_fakes.py``).

Each is timed ``REPS`` times, interleaved, and the best kept (as ``timeit`` does: noise only adds): the ratio
*before / after* comes from one process on one machine at one time::

    python -m bench.capture_cost

``nft_open_with_busy_thread()`` (root) times the nft backend's ``open()`` in a
lab, alone and next to a Python thread that never blocks (what the capture
loop is under a flood): every call that releases the GIL (libnftables through
``ctypes``, sqlite) must win it back, which takes up to the interpreter's
switch interval (5 ms).
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flooder import build_frames  # noqa: E402

FRAMES = 16384
REPS = 5
_NET = 80  # where a SOCK_DGRAM frame's network header starts in a TPACKET_V2 ring


class _RingCapture:
    """``Capture.read`` over one ring in memory, refilled (statuses set to the user's) before each batch."""

    def __init__(self, packets: list[bytes]) -> None:
        from spa.server.ring import DEFAULT_FRAME_SIZE, HEADER, TP_STATUS_USER, Ring

        self.frame = DEFAULT_FRAME_SIZE  # as the daemon's rings
        self.mem = mmap.mmap(-1, len(packets) * self.frame)
        for i, p in enumerate(packets):
            base = i * self.frame
            self.mem[base + _NET:base + _NET + len(p)] = p
            HEADER.pack_into(self.mem, base, 0, len(p), len(p), _NET, _NET)
        self.ring = Ring.over(self.mem, self.frame)
        self.words = memoryview(self.mem).cast("I")
        self.user = TP_STATUS_USER
        self.sock = object()

    def hand_over(self) -> None:
        for i in range(self.ring.frames):
            self.words[i * self.frame >> 2] = self.user

    def read(self, sock, max_packets: int = 1024):
        return time.monotonic(), self.ring.read(max_packets)

    def sockets(self) -> list:
        return [self.sock]

    def set_filter(self, insns) -> None: ...

    def close(self) -> None:
        self.words.release()
        self.ring.close()  # closes the memory too


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(doors_text: str, floods: dict[str, str], frames: int = FRAMES, reps: int = REPS) -> dict[str, dict[str, float]]:
    """Per flood kind: µs per packet before and after, the pieces, and events, opens and log lines per packet."""
    from spa.matcher import Matcher
    from spa.packet import fields, parse_ip
    from spa.server import logs
    from spa.server.daemon import Daemon, Runtime, Settings
    from tests.daemon_fakes import FakeManager
    from tests.fuzz import reference_matcher

    tmp = Path(tempfile.mkdtemp(prefix="spa-capture-cost-"))
    saved = list(logging.getLogger("spa").handlers)
    here = ipaddress.ip_address("192.0.2.1")
    out: dict[str, dict[str, float]] = {}
    try:
        conf = tmp / "knockd.conf"
        conf.write_text("[options]\n" + doors_text)
        runtime = Runtime.load(str(conf))
        logfile = tmp / "events.log"
        logs.configure(logfile=str(logfile))
        for kind, ports in floods.items():
            args = SimpleNamespace(dst_mac="02:00:00:00:00:01", dst_ip="192.0.2.1", sources=252, kind="ports",
                                   ports=ports, exclude="", frames=frames)
            raw = [bytes(f[14:]) for f in build_frames(args, random.Random(1), b"\x02" * 6)]  # from the IP header on
            stamps = [i * 2e-5 for i in range(len(raw))]  # 50 k pps worth of clock
            doors = runtime.match_doors()
            counts = {"events": 0, "opens": 0}

            def before() -> None:
                m = reference_matcher.Matcher(doors, local_addresses=[here])
                for f, t in zip(raw, stamps):
                    m.feed(parse_ip(f, t))

            def parse() -> None:
                for f in raw:
                    fields(f)

            parsed = [fields(f) for f in raw]

            def feed() -> None:
                m = Matcher(doors, local_addresses=[here])
                for x, t in zip(parsed, stamps):
                    m.feed_fields(*x, t)

            m = Matcher(doors, local_addresses=[here])
            for x, t in zip(parsed, stamps):  # counted apart: the counting is not the matcher's cost
                evs = m.feed_fields(*x, t)
                counts["events"] += len(evs)
                counts["opens"] += sum(1 for e in evs if e.kind == "open")

            cap = _RingCapture(raw)
            daemon = Daemon(Settings(), runtime, FakeManager())
            daemon.capture = cap  # type: ignore[assignment]
            daemon.matcher.local_addresses = frozenset({here})

            def ring_only() -> None:
                cap.hand_over()
                while cap.ring.read(1024):
                    pass

            def loop() -> None:
                cap.hand_over()
                for _ in range(0, len(raw), 1024):
                    daemon._read(cap.sock)  # type: ignore[arg-type]

            times: dict[str, list[float]] = {k: [] for k in ("before", "parse", "feed", "ring", "loop", "handover")}
            size0 = logfile.stat().st_size
            for _ in range(reps):
                times["before"].append(_timed(before))
                times["parse"].append(_timed(parse))
                times["feed"].append(_timed(feed))
                times["handover"].append(_timed(cap.hand_over))
                times["ring"].append(_timed(ring_only))
                times["loop"].append(_timed(loop))
            lines = logfile.read_bytes()[size0:].count(b"\n") if logfile.stat().st_size > size0 else 0
            cap.close()
            med = {k: min(v) / len(raw) * 1e6 for k, v in times.items()}  # best of REPS, as timeit does: noise only adds
            # The hand-over (our stand-in for the kernel filling the ring) is not the loop's work.
            ring_us = max(0.0, med["ring"] - med["handover"])
            loop_us = max(0.0, med["loop"] - med["handover"])
            out[kind] = {
                "before_us": med["before"], "parse_us": med["parse"], "feed_us": med["feed"],
                "after_us": med["parse"] + med["feed"], "speedup": med["before"] / (med["parse"] + med["feed"]),
                "ring_us": ring_us, "loop_us": loop_us,
                "events_per_packet": counts["events"] / len(raw), "opens_per_packet": counts["opens"] / len(raw),
                "lines_per_packet": lines / (len(raw) * reps), "grants": len(daemon.manager.submitted) / reps,
            }
            daemon.capture = None
            daemon.close()
    finally:
        root = logging.getLogger("spa")
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_frames(km, floor_prog, frames: list[bytes]) -> tuple[int, int]:
    """Each frame once through the kernel matcher's program and through a return-only one, in order (the
    attempts evolve as under the flood): the two total run times in ns. The rings are emptied every 512
    frames, untimed."""
    assert km.program is not None
    total = floor = 0
    for i, f in enumerate(frames):
        total += km.program.test_run(f)[1]
        floor += floor_prog.test_run(f)[1]
        if i % 512 == 511:
            km.read(now=time.monotonic() + 1e6)  # make room; not timed
    return total, floor


def kernel_cost(doors_text: str, floods: dict[str, str], frames: int = 4096) -> dict[str, dict[str, float]]:
    """Per flood kind: ns per packet of the kernel knock matcher's program alone (root).

    Each of the flooder's frames goes once through the daemon's program for
    these doors (``BPF_PROG_TEST_RUN``, which times the run in the kernel),
    in order, so the attempts evolve as under the flood; the ring buffers are
    emptied between batches (not timed). The same run of a program that only
    returns is taken off (``floor_ns``: the test run's own cost, about 100 ns).
    Each run is a system call of its own, on cold caches: a flood's packets
    come in batches, on warm ones, so this is an upper bound. The receive
    path around the program (the veth, the packet sockets) is not in it:
    ``bench/flood.py``'s softirq column has the whole.
    """
    from spa.server import ebpf
    from spa.server.daemon import Runtime
    from spa.server.knock_kernel import KernelMatcher

    # A program that only returns: what a test run costs around any program, taken off the figure.
    floor_prog = ebpf.Program.load(ebpf.RETURN_ZERO, name="spa_floor")

    tmp = Path(tempfile.mkdtemp(prefix="spa-kernel-cost-"))
    out: dict[str, dict[str, float]] = {}
    try:
        conf = tmp / "knockd.conf"
        conf.write_text("[options]\n" + doors_text)
        doors = Runtime.load(str(conf)).match_doors()
        for kind, ports in floods.items():
            args = SimpleNamespace(dst_mac="02:00:00:00:00:01", dst_ip="192.0.2.1", sources=252, kind="ports",
                                   ports=ports, exclude="", frames=frames)
            # Ethernet frames, to the test device's (all-zero) MAC: another MAC would make them PACKET_OTHERHOST.
            raw = [bytes(6) + bytes(f[6:]) for f in build_frames(args, random.Random(1), b"\x02" * 6)]
            km = KernelMatcher()
            try:
                km.set_local([ipaddress.ip_address("192.0.2.1")])
                km.set_doors(doors)
                total, floor = _run_frames(km, floor_prog, raw)
                counts = km.counts()
            finally:
                km.close()
            out[kind] = {"ns": max(0.0, total - floor) / len(raw), "floor_ns": floor / len(raw),
                         "events_per_packet": sum(counts[k] for k in ("stage", "open", "timeout", "reset")) / len(raw)}
    finally:
        floor_prog.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def kernel_doors_cost(counts: tuple[int, ...] = (3, 16, 64), frames: int = 4000) -> list[dict[str, float]]:
    """The kernel knock matcher's program against the number of doors, with and without the per-source door
    bits (root): ns per packet on spoofed first-port and sequence-port frames (``BPF_PROG_TEST_RUN``, one
    system call a frame, cold: an upper bound, a return-only program's time taken off), and the time
    ``KernelMatcher.set_doors`` takes to build the program and have the kernel check it. Doors of three TCP
    steps each; without the bits is the program a configuration with rotating doors gets."""
    from spa.grant import PortSpec
    from spa.matcher import MatchDoor
    from spa.server import ebpf
    from spa.server.knock_kernel import KernelMatcher
    from tests.rawip import ipv4, tcp

    here = "192.0.2.1"
    rng = random.Random(1)
    floor = ebpf.Program.load(ebpf.RETURN_ZERO, name="spa_floor")
    out = []
    try:
        for n in counts:
            doors = [MatchDoor(f"d{i}", tuple(PortSpec(20000 + 3 * i + k) for k in range(3)), 5.0) for i in range(n)]
            floods = {"first": [20000], "seq": [20000 + k for k in range(9)]}
            frames_by = {kind: [bytes(12) + b"\x08\x00" + ipv4(6, tcp(40000 + i % 1000, rng.choice(ports), seq=i),
                                                              f"198.51.{100 + i % 2}.{i % 250 + 1}", here)
                                for i in range(frames)] for kind, ports in floods.items()}
            for bits in (False, True):
                km = KernelMatcher(max_attempts=1 << 16)
                try:
                    km.set_local([ipaddress.ip_address(here)])
                    t = time.perf_counter()
                    km.set_doors(doors, rotating=not bits)
                    row = {"doors": n, "bits": bits, "load_ms": (time.perf_counter() - t) * 1e3}
                    for kind, fs in frames_by.items():
                        total, fl = _run_frames(km, floor, fs)
                        row[kind] = max(0.0, total - fl) / len(fs)
                    out.append(row)
                finally:
                    km.close()
    finally:
        floor.close()
    return out


def screen_cost(n: int = 2048) -> dict[str, float]:
    """What one forgery under a known key hint costs (root): the daemon's Python checks against the SPA
    port's eBPF screen, on the same datagrams, in this process.

    *python*: ``Verifier.screen`` then ``check_screened`` up to the AEAD's refusal (what the capture loop
    runs per datagram with the classic filter), best of ``REPS``. *kernel*: the screen's program on each
    datagram (``BPF_PROG_TEST_RUN``, one system call each, cold caches: an upper bound), less the floor
    of a program that only returns. *valid*: the screen on a valid packet (it computes the same tag).
    """
    import os

    from spa import protocol
    from spa.authorize import SpaDoor, Verifier
    from spa.errors import PacketRejected
    from spa.grant import parse_address
    from spa.keytext import AuthorizedKey
    from spa.server import ebpf
    from spa.server.spa_kernel import SpaScreen
    from tests.rawip import UDP, ipv4, udp

    server, client = os.urandom(32), os.urandom(32)
    verifier = Verifier(server, [SpaDoor("ssh", (AuthorizedKey(protocol.public_of(client), "bench", 1),), 30)], 60)
    now = time.time()
    good = protocol.build(client, verifier.server_public, "ssh", parse_address("192.0.2.2"), time_ms=int(now * 1000))
    rng = random.Random(1)
    forged = [good[:9] + rng.randbytes(len(good) - 9) for _ in range(n)]
    source = parse_address("198.51.100.1")
    seen = set().__contains__

    def python_pass() -> float:
        t0 = time.perf_counter()
        for data in forged:
            if verifier.screen(data, now, seen) is None:
                try:
                    verifier.check_screened(data, source, now)
                except PacketRejected:
                    pass
        return (time.perf_counter() - t0) / n

    python_us = min(python_pass() for _ in range(REPS)) * 1e6
    frame = bytes(12) + b"\x08\x00"
    screen = SpaScreen(62201)
    floor_prog = ebpf.Program.load(ebpf.RETURN_ZERO, name="spa_floor")
    try:
        screen.set_hints(verifier.hint_keys(now))
        total = floor = 0
        for data in forged:
            f = frame + ipv4(UDP, udp(40000, 62201, data))
            total += screen.program.test_run(f)[1]
            floor += floor_prog.test_run(f)[1]
        valid_frame = frame + ipv4(UDP, udp(40000, 62201, good))
        ret, valid = screen.program.test_run(valid_frame, repeat=n)
        assert ret != 0 and screen.counts()["forged"] == n
        valid_floor = floor_prog.test_run(valid_frame, repeat=n)[1]
    finally:
        floor_prog.close()
        screen.close()
    return {"python_us": python_us, "kernel_ns": max(0.0, total - floor) / n, "floor_ns": floor / n,
            "valid_ns": max(0.0, valid - valid_floor)}


def nft_open_with_busy_thread(n: int = 100) -> dict[str, float]:
    """Median ms of ``NftBackend.open()`` for new elements: alone, and with a CPU-bound Python thread running."""
    import statistics
    import threading

    from spa.grant import ActiveGrant, Grant
    from spa.server.firewall.nft import NftBackend
    from spa.server.netns import Lab, in_netns

    out = {}
    with Lab(tag="cc") as lab:
        with in_netns(lab.server):
            b = NftBackend()
            b.setup()
            try:
                for label, spin in (("alone", False), ("busy_thread", True)):
                    stop = False

                    def busy() -> None:
                        x = 0
                        while not stop:
                            x += 1

                    th = threading.Thread(target=busy) if spin else None
                    if th is not None:
                        th.start()
                    ts = []
                    try:
                        for i in range(n):
                            g = ActiveGrant.start(Grant.create("d", f"198.51.100.{i % 250 + 1}", "22/tcp", 600),
                                                  time.time())
                            t = time.perf_counter()
                            b.open(g)
                            ts.append(time.perf_counter() - t)
                            b.close(g)
                            time.sleep(0.002)
                    finally:
                        stop = True
                        if th is not None:
                            th.join()
                    out[label] = statistics.median(ts) * 1e3
            finally:
                b.teardown()
                if hasattr(b._nft, "close"):
                    b._nft.close()
    return out


def main() -> int:
    from bench.flood import FIRST_PORT, SEQ_PORTS, config_for

    res = measure(config_for("spa"), {"six sequence ports": SEQ_PORTS, "first port": FIRST_PORT})
    for kind, v in res.items():
        opens = f"one open per {1 / v['opens_per_packet']:.0f} packets" if v["opens_per_packet"] else "no opens"
        print(f"{kind}: before (parse_ip + old matcher) {v['before_us']:.2f} µs, after (fields + feed_fields)"
              f" {v['after_us']:.2f} µs ({v['parse_us']:.2f} + {v['feed_us']:.2f}): {v['speedup']:.2f}× faster;"
              f" {v['events_per_packet']:.2f} events per packet; {opens}")
        print(f"  whole loop (ring {v['ring_us']:.2f} µs, parse, match, grants, log lines): {v['loop_us']:.2f} µs per"
              f" packet: {1e6 / v['loop_us']:,.0f} packets/s at most; {v['lines_per_packet']:.4f} log lines per packet")
    import os

    if os.geteuid() == 0:
        for kind, v in kernel_cost(config_for("spa"), {"six sequence ports": SEQ_PORTS, "first port": FIRST_PORT}).items():
            print(f"{kind}: the kernel matcher's program alone: {v['ns']:.0f} ns per packet"
                  f" ({v['events_per_packet']:.2f} events per packet; test-run floor {v['floor_ns']:.0f} ns taken off)")
        for r in kernel_doors_cost():
            print(f"kernel matcher, {r['doors']} doors, {'per-source door bits' if r['bits'] else 'a lookup per door'}:"
                  f" first port {r['first']:.0f} ns, sequence ports {r['seq']:.0f} ns a packet;"
                  f" built and checked by the kernel in {r['load_ms']:.0f} ms")
        c = screen_cost()
        print(f"forgery under a known key hint: {c['python_us']:.1f} µs in the daemon's Python checks (classic"
              f" filter), {c['kernel_ns']:.0f} ns in the eBPF screen ({c['python_us'] * 1e3 / c['kernel_ns']:.1f}×);"
              f" a valid packet {c['valid_ns']:.0f} ns (test-run floor {c['floor_ns']:.0f} ns taken off)")
        g = nft_open_with_busy_thread()
        print(f"nft open(): median {g['alone']:.2f} ms alone, {g['busy_thread']:.2f} ms next to a busy Python thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
