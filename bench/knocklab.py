"""Shared by ``bench/knock_latency.py`` and ``bench/flood.py``: a lab with a knock daemon in it, and a knocker.

* ``KnockLab``: a ``Lab`` (server and client namespaces) with iptables-nft
  ``INPUT`` policy DROP in the server namespace (or native nft: ``deny="nft"``), the service on tcp/22, and
  extra client addresses 192.0.2.10 and up, each with a permanent neighbour
  entry on the server side (so no sample waits for an ARP exchange the
  earlier samples did not need);
* ``Daemon``: our ``spa-server`` or Debian's ``knockd`` in the server
  namespace with a given knockd.conf text, its CPU time and RSS read from
  ``/proc``;
* ``Knocker``: knocks from the client namespace in this process, as
  ``knock`` sends them (a non-blocking connect, i.e. one SYN, per TCP port;
  a 1-byte datagram per UDP port), on sockets made before the clock starts;
* ``Prober`` (``client_for``): pre-made connect sockets for one source that
  connect to tcp/22 every millisecond until one completes.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.grant_latency import KNOCKD_START, KNOCKD_STOP, machine as _machine, percentile
from spa.server.netns import SERVER_V4, Lab, in_netns, sh

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "docs" / "benchmarks.md"
PORT = 22
FIRST_EXTRA = 10  # client addresses 192.0.2.10, .11, ... (the lab has .2 and .3)
MAX_EXTRA = 240

__all__ = ["KNOCKD_START", "KNOCKD_STOP", "KnockLab", "Daemon", "Knocker", "door_text", "client_for", "percentile",
           "machine", "write_section", "ms", "utc_now", "parse_sequence", "Prober", "code_id",
           "load_average", "rotating_door_text", "make_shared_key", "schedstat_ns",
           "add_output_args", "log", "need_root"]


def ms(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 1e3:.{digits}f}"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def code_id() -> str:
    """The commit the daemon code comes from (``+`` when server/, spa/ or client/ have uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "server", "spa", "client"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+" if dirty else "")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, now (the machines are shared: record them with each result)."""
    return "%.2f %.2f %.2f" % os.getloadavg()


def machine() -> dict[str, str]:
    info = _machine()
    info.pop("iptables-legacy", None)
    try:
        v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "knockd"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        v = ""
    info["knockd"] = f"Debian package knockd {v}" if v else "unknown"
    info["memory"] = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    info["platform"] = platform.platform()
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "server", "spa", "client"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    if head:
        short = head if len(head) <= 80 else head[:79] + "…"
        info["code measured"] = f"commit {short}" + (" (with uncommitted changes in server/, spa/ or client/)"
                                                         if dirty else "")
    return info


def add_output_args(ap) -> None:
    """The ``--output`` and ``--no-write`` options every benchmark that writes a section takes."""
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="markdown file to update (default docs/benchmarks.md)")
    ap.add_argument("--no-write", action="store_true", help="print only")


def add_only_arg(ap, names) -> None:
    """``--only NAME[,NAME]`` (repeatable) choosing some of a benchmark's rows."""
    ap.add_argument("--only", action="append", default=[], help=f"rows: {', '.join(names)}")


def rows_wanted(ap, only: list[str], names) -> list[str]:
    """The row names given with ``--only`` (empty: all); an unknown one is a usage error."""
    wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return wanted


def precise_sleeps() -> None:
    """A 1 µs timer slack for this thread (Linux's default is 50 µs): a prober's short sleeps end on time."""
    import ctypes

    PR_SET_TIMERSLACK = 29
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def log(msg: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def need_root(prog: str, why: str = "network namespaces and firewalls") -> bool:
    """False (and a message) when not root."""
    if os.geteuid() != 0:
        print(f"{prog}: needs root ({why})", file=sys.stderr)
        return False
    return True


def unwind_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so every ``finally`` runs: daemons stopped, labs (namespaces, processes) removed."""

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Replace the text between ``start`` and ``end`` in ``path`` (append the section when they are missing)."""
    if path.exists():
        text = path.read_text()
        a, b = text.find(start), text.find(end)
        if a != -1 and b != -1 and b > a:
            new = text[:a] + section.rstrip("\n") + text[b + len(end):]
        else:
            new = text.rstrip("\n") + "\n\n" + section
    else:
        new = "# Benchmarks\n\nMeasured by the scripts in `bench/`; each section is rewritten by its own script.\n\n" + section
    if not new.endswith("\n"):
        new += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# -- configuration ---------------------------------------------------------------------


def door_text(name: str, sequence: str, action: str, *, seq_timeout: int = 5, tcpflags: str | None = "syn",
              cmd_timeout: int = 10) -> str:
    """One knockd.conf door; ``action`` is ``open`` (our ``open = 22/tcp``) or ``command`` (the seed's iptables commands)."""
    lines = [f"[{name}]", f"    sequence      = {sequence}", f"    seq_timeout   = {seq_timeout}"]
    if tcpflags:
        lines.append(f"    tcpflags      = {tcpflags}")
    if action == "open":
        lines.append(f"    open          = {PORT}/tcp")
    elif action == "command":
        lines += [f"    start_command = {KNOCKD_START}", f"    stop_command  = {KNOCKD_STOP}"]
    else:
        raise ValueError(action)
    lines.append(f"    cmd_timeout   = {cmd_timeout}")
    return "\n".join(lines) + "\n"


def rotating_door_text(name: str, key_paths: str | list[str], *, seq_timeout: int = 5, tcpflags: str | None = "syn",
                       cmd_timeout: int = 60) -> str:
    """One rotating door (``rotating_key = PATH[, PATH...]``) with ``open = 22/tcp``, as tests/netns/test_rotating.py."""
    paths = [key_paths] if isinstance(key_paths, str) else list(key_paths)
    lines = [f"[{name}]", f"    rotating_key  = {', '.join(str(x) for x in paths)}", f"    seq_timeout   = {seq_timeout}"]
    if tcpflags:
        lines.append(f"    tcpflags      = {tcpflags}")
    lines += [f"    open          = {PORT}/tcp", f"    cmd_timeout   = {cmd_timeout}"]
    return "\n".join(lines) + "\n"


def make_shared_key(path: Path, *, interval: int = 30, length: int = 4, lo: int = 20000, hi: int = 29999):
    """A shared key (``spa.keys.shared.generate``) written to ``path``; tcp knocks, the SPA port excluded."""
    from spa import rotating
    from spa.keys import shared

    key = shared.generate(rotating.Params(interval=interval, length=length, lo=lo, hi=hi, proto="tcp",
                                          exclude=frozenset({62201})))
    shared.write(str(path), key)
    return key


def schedstat_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in nanoseconds (``/proc/PID/task/*/schedstat``: ns resolution,
    unlike the clock ticks of ``/proc/PID/stat``); threads that exited are not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


# -- the lab -----------------------------------------------------------------------------


class KnockLab:
    """A ``Lab`` with iptables-nft default deny, tcp/22 served, and ``extra`` more client addresses."""

    def __init__(self, extra: int, tag: str = "kb", deny: str = "iptables-nft"):
        if not 0 <= extra <= MAX_EXTRA:
            raise ValueError(f"at most {MAX_EXTRA} extra client addresses")
        self.lab = Lab(tag=tag)
        self.extra = extra
        self.deny = deny  # the default-deny style: iptables-nft, or nft (an inet table of its own)
        self.sources: list[str] = []
        self.server_mac = ""
        self.client_mac = ""

    def __enter__(self) -> KnockLab:
        lab = self.lab.build()
        try:
            lab.default_deny(self.deny)
            lab.listen(PORT)
            self.server_mac = self._mac(lab.server)
            self.client_mac = self._mac(lab.client)
            self.sources = [f"192.0.2.{FIRST_EXTRA + i}" for i in range(self.extra)]
            batch_c = "".join(f"addr add {a}/24 dev veth0\n" for a in self.sources)
            batch_s = "".join(f"neigh replace {a} lladdr {self.client_mac} dev veth0 nud permanent\n" for a in self.sources)
            if batch_c:
                sh("ip", "-n", lab.client, "-batch", "-", input=batch_c)
                sh("ip", "-n", lab.server, "-batch", "-", input=batch_s)
            # The client side learns the server's MAC once, now.
            lab.probe(SERVER_V4, PORT, timeout=0.05)
        except BaseException:
            lab.close()
            raise
        return self

    @staticmethod
    def _mac(ns: str) -> str:
        return json.loads(sh("ip", "-j", "link", "show", "veth0", ns=ns).stdout)[0]["address"]

    def __exit__(self, *exc) -> None:
        self.lab.close()

    def veth_rx(self) -> dict[str, int]:
        """The server veth's receive counters (packets, dropped)."""
        j = json.loads(sh("ip", "-j", "-s", "link", "show", "veth0", ns=self.lab.server).stdout)[0]
        rx = j.get("stats64", j.get("stats", {})).get("rx", {})
        return {"packets": int(rx.get("packets", 0)), "dropped": int(rx.get("dropped", 0))}


# -- the flood sender ----------------------------------------------------------------------


class FlooderProcess:
    """``bench.flooder`` in the lab's client namespace: frames built on start, sent on ``go()``, ended by ``stop()``.

    ``args`` are the flooder's own options after the interface and MAC
    (``--kind ...``, ``--duration``, ``--rate`` and the like).
    """

    def __init__(self, kl: KnockLab, args: list[str]):
        argv = [sys.executable, "-m", "bench.flooder", "--iface", "veth0", "--dst-mac", kl.server_mac, *args,
                "--wait-start"]
        self.proc = subprocess.Popen(["ip", "netns", "exec", kl.lab.client, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"flooder did not start: {line!r} {err[-1000:]}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def stop(self, wait: bool = False) -> dict:
        """The flooder's result; stops it first unless ``wait`` (then it runs out its duration or count)."""
        if not wait and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=60 if wait else 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=5)
            raise RuntimeError(f"flooder did not stop when told: {err[-500:]}")
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"flooder gave no result: {err[-1000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- the daemon under test ---------------------------------------------------------------


class Daemon:
    """``spa-server`` (``kind="spa"``) or Debian's ``knockd`` (``kind="knockd"``) in the lab's server namespace."""

    def __init__(self, lab: Lab, kind: str, config_text: str, extra: tuple[str, ...] = ()):
        self.lab = lab
        self.kind = kind
        self.tmp = Path(tempfile.mkdtemp(prefix=f"spa-bench-{kind}-", dir="/var/tmp"))
        self.config = self.tmp / "knockd.conf"
        self.config.write_text("[options]\n" + config_text)
        self.log = self.tmp / "daemon.log"
        if kind == "knockd":
            argv = ["knockd", "-c", str(self.config), "-i", "veth0", "-g", str(self.log)]
            ready = "listening on"
        elif kind == "spa":
            argv = [sys.executable, "-m", "spa.server.cli", "-c", str(self.config), "-i", "veth0", "-g", str(self.log),
                    "--state-dir", str(self.tmp / "state"), *extra]
            ready = "starting up"
        else:
            raise ValueError(kind)
        self.output = self.tmp / "stdout.txt"
        self.code = code_id()
        with open(self.output, "wb") as out:
            # ``ip netns exec`` execs the program: this pid is the daemon's own.
            self.proc = lab.exec_server(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.pid = self.proc.pid
        if not self.wait_log(ready, 15):
            text = self.text() + "\n" + self.output.read_text(errors="replace")
            self.stop()
            raise RuntimeError(f"{kind} did not start:\n{text[-2000:]}")
        self.clk = os.sysconf("SC_CLK_TCK")

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon (all its threads; not its children)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.clk

    def main_thread_cpu_seconds(self) -> float:
        """utime + stime of the daemon's main thread (ours: the capture loop; knockd has only that one)."""
        fields = Path(f"/proc/{self.pid}/task/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.clk

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def count_lines(self, needle: str, sources_prefixes: tuple[str, ...] = ()) -> int:
        n = 0
        with contextlib.suppress(FileNotFoundError):
            with open(self.log, errors="replace") as f:
                for line in f:
                    if needle in line and (not sources_prefixes or any(f"] {p}" in line for p in sources_prefixes)):
                        n += 1
        return n

    def count_newlines(self, offset: int = 0) -> int:
        """Lines the log gained after byte ``offset``."""
        n = 0
        with contextlib.suppress(FileNotFoundError):
            with open(self.log, "rb") as f:
                f.seek(offset)
                while chunk := f.read(1 << 20):
                    n += chunk.count(b"\n")
        return n

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        """Our server: SIGTERM (it runs pending stop commands, closes its grants). knockd: SIGKILL (it would wait
        for a child sleeping out a cmd_timeout); the lab's close() kills its children."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if self.kind == "knockd" else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cleanup(self, settle: float = 15.0) -> float:
        """Stop the daemon, then kill what it started in the namespace (knockd's command children, often
        hundreds of ``iptables`` processes after a flood) and wait until they are gone, so that they do not
        run on into the next measurement. Seconds that took."""
        self.stop()
        t0 = time.monotonic()
        while time.monotonic() - t0 < settle:
            out = subprocess.run(["ip", "netns", "pids", self.lab.server], capture_output=True, text=True).stdout
            pids = [int(x) for x in out.split() if x.isdigit()]
            ours = [p for p in pids if p not in {pr.pid for pr in self.lab._procs}]  # the tcp/22 listener stays
            if not ours:
                break
            for pid in ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return time.monotonic() - t0


# -- knocking and connecting --------------------------------------------------------------


def parse_sequence(sequence: str) -> list[tuple[str, int]]:
    out = []
    for item in sequence.split(","):
        port, _, proto = item.strip().partition(":")
        out.append(((proto or "tcp").strip().lower(), int(port)))
    return out


class Knocker:
    """Knocks from the client namespace, on sockets made beforehand (``prepare``), sent by ``fire``."""

    def __init__(self, lab: Lab, server: str = SERVER_V4):
        self.lab = lab
        self.server = server

    def prepare(self, source: str, steps: list[tuple[str, int]]) -> list[tuple[socket.socket, str, int]]:
        with in_netns(self.lab.client):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM if p == "udp" else socket.SOCK_STREAM)
                     for p, _ in steps]
        out = []
        for s, (proto, port) in zip(socks, steps):
            s.bind((source, 0))
            s.setblocking(False)
            out.append((s, proto, port))
        return out

    def fire(self, prepared: list[tuple[socket.socket, str, int]]) -> float:
        """Send the knocks; ``perf_counter()`` read just before the last one. Sockets stay open (``close``).

        Before the last send, not after: on a veth the daemon can be woken and run
        inside that send (see ``spalab.UdpSender.send``).
        """
        server = self.server
        t0 = 0.0
        for s, proto, port in prepared:
            t0 = time.perf_counter()
            if proto == "udp":
                s.sendto(b"\0", (server, port))
            else:
                s.connect_ex((server, port))
        return t0

    @staticmethod
    def close(prepared) -> None:
        for s, _, _ in prepared:
            s.close()


class Prober:
    """Connect attempts to tcp/22 from one client address, each on a fresh socket made ahead of time.

    Like ``bench.grant_latency.Client``, but attempts are spaced with ``time.sleep`` (high resolution)
    rather than ``epoll`` timeouts, which round up to whole milliseconds (a 1 ms step there is about
    1.1 ms); completions are checked every 0.1 ms at most (with a 1 µs timer slack).
    """

    CHECK = 0.0001

    def __init__(self, lab: Lab, source: str, pool: int = 120, server: str = SERVER_V4):
        precise_sleeps()
        self.lab = lab
        self.source = source
        self.addr = (server, PORT)
        self.pool: list[socket.socket] = []
        self.late = 0  # sockets made inside a timed window (the pool ran dry)
        self.fill(pool)

    def _make(self, n: int) -> list[socket.socket]:
        with in_netns(self.lab.client):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
        for s in socks:
            # Close with a reset: no TIME_WAIT, no stale connection a reused port could meet.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.bind((self.source, 0))
            s.setblocking(False)
        return socks

    def fill(self, n: int) -> None:
        if len(self.pool) < n:
            self.pool += self._make(n - len(self.pool))

    def _take(self) -> socket.socket:
        if self.pool:
            return self.pool.pop()
        self.late += 1
        return self._make(1)[0]

    def until_open(self, start: float, limit: float, interval: float = 0.001) -> tuple[float | None, int]:
        """A new connect every ``interval`` from ``start`` until one completes: (perf_counter then, attempts)."""
        ep = select.epoll()
        inflight: dict[int, socket.socket] = {}
        attempts = 0
        next_at = start
        end = start + limit
        try:
            while True:
                now = time.perf_counter()
                if now >= end:
                    return None, attempts
                if now >= next_at:
                    s = self._take()
                    attempts += 1
                    err = s.connect_ex(self.addr)
                    if err == 0:
                        t = time.perf_counter()
                        s.close()
                        return t, attempts
                    if err in (errno.EINPROGRESS, errno.EAGAIN):
                        ep.register(s.fileno(), select.EPOLLOUT)
                        inflight[s.fileno()] = s
                    else:
                        s.close()
                    next_at += interval
                    if next_at < now:
                        next_at = now + interval
                for fd, ev in ep.poll(0):
                    s = inflight.pop(fd)
                    ep.unregister(fd)
                    ok = ev & select.EPOLLOUT and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    s.close()
                    if ok:
                        return time.perf_counter(), attempts
                wait = min(next_at, end) - time.perf_counter()
                if wait > 0:
                    time.sleep(min(wait, self.CHECK))
        finally:
            for s in inflight.values():
                s.close()
            ep.close()

    def connect_once(self, timeout: float) -> float | None:
        """One connect: seconds it took, or None when nothing answered within ``timeout``."""
        s = self._take()
        ep = select.epoll()
        try:
            t0 = time.perf_counter()
            err = s.connect_ex(self.addr)
            if err == 0:
                return time.perf_counter() - t0
            if err not in (errno.EINPROGRESS, errno.EAGAIN):
                return None
            ep.register(s.fileno(), select.EPOLLOUT)
            for _fd, ev in ep.poll(timeout):
                if ev & select.EPOLLOUT and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return time.perf_counter() - t0
            return None
        finally:
            ep.close()
            s.close()

    def close(self) -> None:
        for s in self.pool:
            s.close()
        self.pool.clear()


def client_for(lab: Lab, source: str, pool: int = 120) -> Prober:
    return Prober(lab, source, pool)


def knock_sample(lab: Lab, knocker: Knocker, source: str, steps: list[tuple[str, int]], rng, *, limit: float,
                 interval: float, pool: int) -> tuple[float | None, int, float, Prober]:
    """One knock-latency sample (the method of ``bench/knock_latency.py``): sockets made beforehand, a random
    50–150 ms pause, the knocks, then a connect every ``interval`` until one completes.

    Returns (latency or None, connect attempts, seconds the knocks took to send, the prober: the caller
    closes it, and may use it for a baseline connect first).
    """
    import gc

    prepared = knocker.prepare(source, steps)
    client = client_for(lab, source, pool)
    try:
        if client.connect_once(0.02) is not None:
            raise RuntimeError(f"tcp/22 answers {source} before any knock: the default deny is not filtering")
        client.fill(pool)
        gc.collect()
        time.sleep(rng.uniform(0.05, 0.15))
        t_first = time.perf_counter()
        t0 = knocker.fire(prepared)
        t1, attempts = client.until_open(t0, limit, interval)
    except BaseException:
        client.close()
        raise
    finally:
        knocker.close(prepared)
    return (None if t1 is None else t1 - t0), attempts, t0 - t_first, client
