"""What one flood packet costs our capture loop, piece by piece, in this process (no namespaces, no root).

The daemon's loop (``spa.server.daemon.Daemon._read``) does, per packet:
``recv_into`` (kernel), ``spa.packet.parse_ip``, ``Matcher.feed`` and, per
event, ``Daemon._log_event`` (knockd's ``Stage``/``OPEN SESAME`` lines through
stdlib ``logging`` to the log file, flushed per line). This measures the last
three on the frames ``bench/flooder.py`` sends, for the sequence-port and the
first-port floods of ``bench/flood.py``, with the daemon's doors and log set-up::

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

FRAMES = 65536


def measure(doors_text: str, floods: dict[str, str], frames: int = FRAMES) -> dict[str, dict[str, float]]:
    """Per flood kind: µs per packet for parse and feed, events and log lines per packet, µs per log line."""
    from spa.matcher import Matcher
    from spa.packet import parse_ip
    from spa.server import logs
    from spa.server.daemon import Runtime
    from spa.server.logs import Names, events

    tmp = Path(tempfile.mkdtemp(prefix="spa-capture-cost-"))
    saved = list(logging.getLogger("spa").handlers)
    out: dict[str, dict[str, float]] = {}
    try:
        conf = tmp / "knockd.conf"
        conf.write_text("[options]\n" + doors_text)
        runtime = Runtime.load(str(conf))
        logs.configure(logfile=str(tmp / "events.log"))
        names = Names(False)
        for kind, ports in floods.items():
            args = SimpleNamespace(dst_mac="02:00:00:00:00:01", dst_ip="192.0.2.1", sources=252, kind="ports",
                                   ports=ports, exclude="", frames=frames)
            raw = [f[14:] for f in build_frames(args, random.Random(1), b"\x02" * 6)]  # from the IP header on
            t = time.perf_counter()
            knocks = [parse_ip(f, 0.0) for f in raw]
            parse = (time.perf_counter() - t) / len(raw)
            knocks = [k._replace(time=i * 2e-5) for i, k in enumerate(knocks)]  # 50 k pps worth of clock
            m = Matcher(runtime.match_doors(), local_addresses=[ipaddress.ip_address("192.0.2.1")])
            evs = stages = opens = 0
            t = time.perf_counter()
            for k in knocks:
                for e in m.feed(k):
                    evs += 1
                    stages += e.kind == "stage"
                    opens += e.kind == "open"
            feed = (time.perf_counter() - t) / len(knocks)
            src = knocks[0].src
            n = 20000
            t = time.perf_counter()
            for _ in range(n):
                events.info("%s: %s: Stage %d", names(src), "ssh", 1)
            line = (time.perf_counter() - t) / n
            lines = (stages + opens) / len(knocks)
            out[kind] = {
                "parse_us": parse * 1e6, "feed_us": feed * 1e6, "events_per_packet": evs / len(knocks),
                "lines_per_packet": lines, "line_us": line * 1e6, "opens_per_packet": opens / len(knocks),
                "total_us": (parse + feed + lines * line) * 1e6,
            }
    finally:
        root = logging.getLogger("spa")
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
        print(f"{kind}: parse {v['parse_us']:.2f} µs, feed {v['feed_us']:.2f} µs, {v['events_per_packet']:.2f} events"
              f" and {v['lines_per_packet']:.2f} log lines per packet at {v['line_us']:.1f} µs a line; {opens}")
        print(f"  total {v['total_us']:.1f} µs per packet without recv: {1e6 / v['total_us']:,.0f} packets/s at most")
    import os

    if os.geteuid() == 0:
        g = nft_open_with_busy_thread()
        print(f"nft open(): median {g['alone']:.2f} ms alone, {g['busy_thread']:.2f} ms next to a busy Python thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
