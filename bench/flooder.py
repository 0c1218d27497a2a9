"""A fast, bounded packet flood from a lab's client namespace: prebuilt Ethernet frames through AF_PACKET.

Used by ``bench/flood.py``; runnable on its own (root, inside a client
namespace made by ``spa.server.netns.Lab``)::

    ip netns exec <client-ns> python -m bench.flooder --iface veth0 \\
        --dst-mac 02:..:.. --kind random --rate 100000 --duration 5

Every frame is built before the clock starts: Ethernet (to ``--dst-mac``,
the server end of the veth pair), IPv4 with a valid header checksum, then a
TCP SYN (valid checksum, random sequence number) or a UDP datagram with one
byte of payload, as ``knock`` sends them. Sources are spoofed, and only from
the documentation ranges 198.51.100.0/24 and 203.0.113.0/24; the destination
must be in 192.0.2.0/24 (the lab's). Frames go out through one
``AF_PACKET``/``SOCK_RAW`` socket bound to the interface, in batches of up to
1024 per ``sendmmsg(2)`` call (through ``ctypes``: Python's socket module has
no ``sendmmsg``), with ``PACKET_QDISC_BYPASS`` set. ``--procs N`` forks N
senders, each with its own frames and an Nth of the rate.

Kinds (what each frame is):

* ``random``: TCP SYN or UDP (half each) to a random port that is neither a
  sequence port (``--exclude``) nor the protected port;
* ``ports``: uniformly one of ``--ports`` (``7000/tcp,5001/udp,...``),
  TCP ones as SYNs;
* ``payloads``: UDP datagrams to ``--dport`` carrying the payloads of
  ``--payloads FILE`` (records of a 2-byte big-endian length and the bytes;
  frame ``i`` carries record ``i`` modulo their number): the SPA floods of
  ``bench/spa_flood.py``;

each from one of ``--sources`` spoofed addresses (252 by default), chosen at
random per frame. The list of frames (``--frames``, 65536 by default) is
sent in a loop, so a source's packet order repeats every cycle.

The flood is bounded twice: ``--duration`` (at most 300 s) and ``--count``
(at most 100 million; by default rate × duration, or 50 million at full
speed). It refuses to run in the initial network namespace. At the end one
JSON line goes to stdout: packets sent, seconds, rate reached, errors.
``--rate 0`` means as fast as possible.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import time

MAX_DURATION = 300.0
MAX_COUNT = 100_000_000
BATCH = 1024  # UIO_MAXIOV: the most sendmmsg takes per call
FRAME_LEN = 60  # Ethernet minimum without FCS; shorter frames are padded
SPOOF_NETS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("203.0.113.0/24"))
LAB_NET = ipaddress.ip_network("192.0.2.0/24")
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
PROTECTED_PORT = 22


def spoofed_sources(n: int) -> list[str]:
    """``n`` (≤ 252) documentation addresses: 198.51.100.1–126, then 203.0.113.1–126."""
    if not 1 <= n <= 252:
        raise ValueError("between 1 and 252 spoofed sources")
    first = [f"198.51.100.{i}" for i in range(1, 127)]
    second = [f"203.0.113.{i}" for i in range(1, 127)]
    return (first + second)[:n]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, proto: str, sport: int, dport: int,
                seq: int, ident: int, payload: bytes = b"\0") -> bytes:
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    if proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pnum = 6
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        pnum = 17
    pseudo = s + d + struct.pack("!BBH", 0, pnum, len(l4))
    csum = _checksum(pseudo + l4)
    if pnum == 17 and csum == 0:
        csum = 0xFFFF
    off = 16 if pnum == 6 else 6
    l4 = l4[:off] + struct.pack("!H", csum) + l4[off + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, pnum, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    frame = dst_mac + src_mac + b"\x08\x00" + ip + l4
    return frame.ljust(FRAME_LEN, b"\0")


MAX_PAYLOAD = 1400


def read_payloads(path: str) -> list[bytes]:
    """Records of a 2-byte big-endian length and that many bytes (``write_payloads``)."""
    data = open(path, "rb").read()
    out, i = [], 0
    while i + 2 <= len(data):
        (n,) = struct.unpack_from("!H", data, i)
        if n > MAX_PAYLOAD or i + 2 + n > len(data):
            raise SystemExit(f"flooder: bad payload record at byte {i} of {path}")
        out.append(data[i + 2:i + 2 + n])
        i += 2 + n
    if not out:
        raise SystemExit(f"flooder: no payloads in {path}")
    return out


def write_payloads(path: str, payloads: list[bytes]) -> None:
    with open(path, "wb") as f:
        for p in payloads:
            if len(p) > MAX_PAYLOAD:
                raise ValueError(f"payload of {len(p)} bytes: at most {MAX_PAYLOAD}")
            f.write(struct.pack("!H", len(p)) + p)


def parse_ports(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        port, _, proto = item.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise ValueError(f"bad protocol in {item!r}")
        out.append((proto, int(port)))
    return out


def build_frames(args, rng: random.Random, src_mac: bytes) -> list[bytes]:
    dst_mac = bytes.fromhex(args.dst_mac.replace(":", ""))
    sources = spoofed_sources(args.sources)
    for a in sources:
        if not any(ipaddress.ip_address(a) in n for n in SPOOF_NETS):
            raise SystemExit(f"flooder: refusing source {a}: not a documentation address")
    if ipaddress.ip_address(args.dst_ip) not in LAB_NET:
        raise SystemExit(f"flooder: refusing destination {args.dst_ip}: not in {LAB_NET}")
    if args.kind == "payloads":
        if not args.payloads or not 1 <= args.dport <= 65535:
            raise SystemExit("flooder: --kind payloads needs --payloads FILE and --dport")
        payloads = read_payloads(args.payloads)
        return [build_frame(dst_mac, src_mac, rng.choice(sources), args.dst_ip, "udp", rng.randint(1024, 65535),
                            args.dport, 0, rng.getrandbits(16), payloads[i % len(payloads)])
                for i in range(args.frames)]
    if args.kind == "ports":
        targets = parse_ports(args.ports)
        if not targets:
            raise SystemExit("flooder: --kind ports needs --ports")
    else:
        excluded = {p for _, p in parse_ports(args.exclude)} | {PROTECTED_PORT}
    frames = []
    for _ in range(args.frames):
        if args.kind == "ports":
            proto, port = rng.choice(targets)
        else:
            proto = rng.choice(("tcp", "udp"))
            port = rng.randint(1, 65535)
            while port in excluded:
                port = rng.randint(1, 65535)
        frames.append(build_frame(dst_mac, src_mac, rng.choice(sources), args.dst_ip, proto,
                                  rng.randint(1024, 65535), port, rng.getrandbits(32), rng.getrandbits(16)))
    return frames


# -- sendmmsg through ctypes ------------------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = getattr(_libc, "sendmmsg", None)
if _sendmmsg is not None:
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _sendmmsg.restype = ctypes.c_int


class Sender:
    """Frames laid out once for ``sendmmsg``; ``send(n)`` sends the next ``n`` (cycling), returns how many went."""

    def __init__(self, sock: socket.socket, frames: list[bytes]):
        self.sock = sock
        self.fd = sock.fileno()
        self.n = len(frames)
        self.frames = frames
        joined = b"".join(frames)
        self.buf = ctypes.create_string_buffer(joined, len(joined))
        base = ctypes.addressof(self.buf)
        self.iov = (_Iovec * self.n)()
        self.msgs = (_Mmsghdr * self.n)()
        iov_base = ctypes.addressof(self.iov)
        isz = ctypes.sizeof(_Iovec)
        offset = 0
        for i in range(self.n):  # frames may differ in length (payload floods); each at least FRAME_LEN
            self.iov[i].iov_base = base + offset
            self.iov[i].iov_len = len(frames[i])
            offset += len(frames[i])
            h = self.msgs[i].msg_hdr
            h.msg_iov = iov_base + i * isz
            h.msg_iovlen = 1
        self.msgs_base = ctypes.addressof(self.msgs)
        self.msz = ctypes.sizeof(_Mmsghdr)
        self.pos = 0
        self.errors = 0
        self.last_error = ""

    def send(self, n: int) -> int:
        """Send ``n`` frames (callers pass at most ``BATCH``: one or two ``sendmmsg`` calls)."""
        done = 0
        while done < n:
            k = min(n - done, BATCH, self.n - self.pos)
            if _sendmmsg is not None:
                r = _sendmmsg(self.fd, self.msgs_base + self.pos * self.msz, k, 0)
                if r < 0:
                    err = ctypes.get_errno()
                    self.errors += 1
                    self.last_error = os.strerror(err)
                    if err in (11, 105):  # EAGAIN, ENOBUFS: the device is busy; let it drain
                        time.sleep(0.0002)
                        return done
                    raise OSError(err, f"sendmmsg: {os.strerror(err)}")
            else:  # no sendmmsg in this libc: one send per frame
                r = 0
                for f in self.frames[self.pos:self.pos + k]:
                    self.sock.send(f)
                    r += 1
            done += r
            self.pos = (self.pos + r) % self.n
        return done


def _in_lab_netns() -> bool:
    """True when this process runs in a named network namespace (``ip netns``), not the initial one."""
    try:
        here = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False
    try:
        if here == os.stat("/proc/1/ns/net").st_ino:
            return False
    except OSError:
        pass  # PID 1 not readable here (a sandbox): the named-namespace test below decides
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return False
    for name in names:
        try:
            if os.stat(os.path.join("/run/netns", name)).st_ino == here:
                return True
        except OSError:
            continue
    return False


def flood(sender: Sender, rate: float, duration: float, count: int, stop: list[bool]) -> tuple[int, float]:
    """Send until ``duration`` or ``count``; ``rate`` packets/s (0: as fast as possible). (sent, seconds)."""
    sent = 0
    start = time.perf_counter()
    end = start + duration
    while not stop[0]:
        now = time.perf_counter()
        if now >= end or sent >= count:
            break
        if rate > 0:
            due = min(int((now - start) * rate) - sent, count - sent)
            if due <= 0:
                # Sleep to the next packet (at least 0.2 ms, at most 1 ms): small bursts, even spacing.
                time.sleep(min(0.001, max(0.0002, (sent + 1) / rate - (now - start))))
                continue
            # At most one batch per pass, so that the deadline and a stop request are checked between
            # batches even when the receiver is slower than the rate and a backlog builds up.
            sent += sender.send(min(due, BATCH))
        else:
            sent += sender.send(min(BATCH, count - sent))
    return sent, time.perf_counter() - start


def _worker(args, index: int, out_fd: int | None) -> dict:
    rng = random.Random(args.seed * 1000 + index)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((args.iface, 0))  # protocol 0: this socket receives nothing
    try:
        sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    except OSError:
        pass
    src_mac = sock.getsockname()[4]
    frames = build_frames(args, rng, src_mac)
    sender = Sender(sock, frames)
    stop = [False]

    def on_signal(*_):
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if out_fd is not None:  # ready: wait for the parent's go
        os.write(out_fd, b"r")
    rate = args.rate / args.procs
    count = args.count // args.procs + (1 if index < args.count % args.procs else 0)
    if args.go_fd is not None:
        os.read(args.go_fd, 1)
    sent, secs = flood(sender, rate, args.duration, count, stop)
    sock.close()
    return {"sent": sent, "seconds": secs, "errors": sender.errors, "last_error": sender.last_error}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flooder", description=__doc__.splitlines()[0])
    ap.add_argument("--iface", default="veth0")
    ap.add_argument("--dst-mac", required=True, help="the server end's MAC address")
    ap.add_argument("--dst-ip", default="192.0.2.1")
    ap.add_argument("--kind", choices=("random", "ports", "payloads"), required=True)
    ap.add_argument("--payloads", default="", help="for --kind payloads: the file of payload records")
    ap.add_argument("--dport", type=int, default=0, help="for --kind payloads: the destination UDP port")
    ap.add_argument("--ports", default="", help="for --kind ports: 7000/tcp,5001/udp,...")
    ap.add_argument("--exclude", default="", help="for --kind random: ports never hit (the sequence ports)")
    ap.add_argument("--sources", type=int, default=252)
    ap.add_argument("--rate", type=float, default=0.0, help="packets per second, all senders together (0: max)")
    ap.add_argument("--duration", type=float, required=True, help=f"seconds (at most {MAX_DURATION:g})")
    ap.add_argument("--count", type=int, default=0, help="packets at most (default: rate × duration)")
    ap.add_argument("--procs", type=int, default=1, help="sender processes")
    ap.add_argument("--frames", type=int, default=65536, help="frames built per sender, sent in a loop")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait-start", action="store_true",
                    help="print 'ready' when the frames are built, start on a line on stdin")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("flooder: needs root", file=sys.stderr)
        return 2
    if not _in_lab_netns():
        print("flooder: refusing to run outside a named network namespace (run it in a lab's client namespace)",
              file=sys.stderr)
        return 2
    if not 0 < args.duration <= MAX_DURATION:
        ap.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if args.count <= 0:
        args.count = int(args.rate * args.duration) + 1 if args.rate > 0 else 50_000_000
    args.count = min(args.count, MAX_COUNT)
    if not 1 <= args.procs <= 8:
        ap.error("--procs must be 1..8")
    if not 1 <= args.frames <= 1 << 20:
        ap.error("--frames must be 1..1048576")
    args.go_fd = None

    # Fork the senders; each builds its frames, says ready, waits for go (one byte per sender on a pipe).
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    results_r, results_w = os.pipe()
    children = []
    for i in range(args.procs):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os.close(go_w)
            os.close(results_r)
            args.go_fd = go_r
            code = 0
            try:
                res = _worker(args, i, ready_w)
                os.write(results_w, (json.dumps(res) + "\n").encode())
            except BaseException as exc:  # noqa: BLE001 - report, never return into the parent's code
                os.write(results_w, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
                os.write(ready_w, b"r")
                code = 1
            os._exit(code)
        children.append(pid)
    os.close(ready_w)
    os.close(go_r)
    os.close(results_w)
    got = 0
    while got < args.procs:
        b = os.read(ready_r, args.procs - got)
        if not b:
            break
        got += len(b)
    forward = [False]

    def on_signal(*_):
        forward[0] = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.wait_start:
        print("ready", flush=True)
        sys.stdin.readline()
    os.write(go_w, b"g" * args.procs)
    t0 = time.perf_counter()
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    wall = time.perf_counter() - t0
    raw = b""
    while True:
        b = os.read(results_r, 65536)
        if not b:
            break
        raw += b
    parts = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    errors = [p["error"] for p in parts if "error" in p]
    sent = sum(p.get("sent", 0) for p in parts)
    secs = max((p.get("seconds", 0.0) for p in parts), default=wall)
    out = {
        "sent": sent, "seconds": secs, "pps": sent / secs if secs > 0 else 0.0, "procs": args.procs,
        "target_pps": args.rate, "send_errors": sum(p.get("errors", 0) for p in parts),
        "last_send_error": next((p["last_error"] for p in parts if p.get("last_error")), ""),
        "errors": errors,
    }
    print(json.dumps(out), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
