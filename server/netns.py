"""Network-namespace labs: two hosts joined by a veth pair, for the demo, tests and benchmarks.

A ``Lab`` builds a server and a client namespace (documentation addresses,
IPv4 and IPv6), can put a default-deny firewall in the server namespace
(iptables-nft, iptables-legacy or native nftables), run a TCP listener
there, and probe it from the client namespace. ``in_netns`` moves the
calling thread into a namespace and back, so a benchmark can open the
firewall in one namespace and connect from the other in one process, with
no ``ip netns exec`` in the measurement. Everything it creates it removes in
``close()``, which is safe to call twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()

SERVER_V4, CLIENT_V4, CLIENT2_V4 = "192.0.2.1", "192.0.2.2", "192.0.2.3"
SERVER_V6, CLIENT_V6, CLIENT2_V6 = "2001:db8::1", "2001:db8::2", "2001:db8::3"

FIREWALL_STYLES = ("iptables-nft", "iptables-legacy", "nft")

# The service behind the door: accept, close, forever (IPv4 and IPv6).
_LISTENER = """
import socket, sys, threading
port = int(sys.argv[1])
def serve(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen(4096)
    return s
socks = [serve(socket.AF_INET, "0.0.0.0"), serve(socket.AF_INET6, "::")]
def loop(s):
    while True:
        c, _ = s.accept()
        c.close()
threading.Thread(target=loop, args=(socks[1],), daemon=True).start()
print("ready", flush=True)
loop(socks[0])
"""


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name``; sockets made inside stay there."""
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def sh(*argv: str, ns: str | None = None, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a set-up command (in namespace ``ns``); argv only, never shell text."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _default_deny(style: str) -> list[tuple[list[str], str | None]]:
    """Commands that make the server namespace drop every new inbound connection."""
    if style == "nft":
        ruleset = """
table inet filter {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
    meta l4proto ipv6-icmp accept
  }
}
"""
        return [(["nft", "-f", "-"], ruleset)]
    suffix = {"iptables-nft": "-nft", "iptables-legacy": "-legacy"}[style]
    cmds: list[tuple[list[str], str | None]] = []
    for binary in (f"iptables{suffix}", f"ip6tables{suffix}"):
        cmds += [
            ([binary, "-w", "-P", "INPUT", "DROP"], None),
            ([binary, "-w", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"], None),
            ([binary, "-w", "-A", "INPUT", "-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT"], None),
        ]
    # Without neighbour discovery IPv6 cannot work at all.
    cmds.append(([f"ip6tables{suffix}", "-w", "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT"], None))
    return cmds


@dataclass
class Lab:
    """A server and a client namespace joined by one veth pair."""

    tag: str = ""
    server: str = field(init=False)
    client: str = field(init=False)
    _procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    _closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        n = next(_counter)
        base = f"spa{os.getpid()}x{n}{self.tag}"
        self.server = f"{base}-srv"
        self.client = f"{base}-cli"

    # -- life-cycle ----------------------------------------------------------

    def build(self) -> Lab:
        try:
            sh("ip", "netns", "add", self.server)
            sh("ip", "netns", "add", self.client)
            sh("ip", "link", "add", "name", "veth0", "netns", self.server, "type", "veth",
               "peer", "name", "veth0", "netns", self.client)
            for ns, v4s, v6s in (
                (self.server, [SERVER_V4], [SERVER_V6]),
                (self.client, [CLIENT_V4, CLIENT2_V4], [CLIENT_V6, CLIENT2_V6]),
            ):
                sh("ip", "link", "set", "lo", "up", ns=ns)
                for a in v4s:
                    sh("ip", "addr", "add", f"{a}/24", "dev", "veth0", ns=ns)
                for i, a in enumerate(v6s):
                    # Extra addresses are deprecated so the kernel never picks
                    # them as a source by itself: a test binds them on purpose.
                    extra = ["preferred_lft", "0"] if i else []
                    sh("ip", "addr", "add", f"{a}/64", "dev", "veth0", "nodad", *extra, ns=ns)
                sh("ip", "link", "set", "veth0", "up", ns=ns)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait(5)
        for ns in (self.server, self.client):
            # Deleting a namespace kills its veth end, its rules and its sets.
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- firewall, service, probes --------------------------------------------

    def default_deny(self, style: str) -> None:
        if style not in FIREWALL_STYLES:
            raise ValueError(f"unknown firewall style {style!r}")
        for argv, text in _default_deny(style):
            sh(*argv, ns=self.server, input=text)

    def listen(self, port: int = 22) -> None:
        """A TCP service on ``port`` (IPv4 and IPv6) in the server namespace that accepts and closes.

        A process of its own, not a thread: an acceptor starved of the GIL
        lets the accept queue fill, and the kernel then drops SYNs, which a
        probe would read as a closed port.
        """
        proc = self.exec_server([sys.executable, "-c", _LISTENER, str(port)], stdout=subprocess.PIPE)
        self._procs.append(proc)
        line = proc.stdout.readline() if proc.stdout else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"listener on port {port} did not start")

    def client_socket(self, family: int, source: str | None = None) -> socket.socket:
        with in_netns(self.client):
            s = socket.socket(family, socket.SOCK_STREAM)
        if source:
            s.bind((source, 0))
        return s

    def probe(self, address: str, port: int = 22, timeout: float = 0.3, source: str | None = None) -> bool:
        """True when a TCP connect from the client namespace succeeds."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # The client holds two addresses per family; bind the primary one
        # unless told otherwise, so the source is never a guess.
        if source is None:
            source = CLIENT_V6 if family == socket.AF_INET6 else CLIENT_V4
        s = self.client_socket(family, source)
        # Close with a reset: no TIME_WAIT on either side, so a later probe
        # that happens to reuse the source port is never mistaken for an old
        # connection and left unanswered.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.settimeout(timeout)
        try:
            s.connect((address, port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def wait_for(self, want_open: bool, address: str, port: int = 22, limit: float = 5.0,
                 source: str | None = None) -> float | None:
        """Poll until the port is open (or closed); seconds waited, or None when ``limit`` passed."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            # Waiting for "open": short probes, so the answer is ms-accurate (a
            # SYN-ACK over a veth takes microseconds). Waiting for "closed": a
            # probe must time out to say so; 0.2 s is ample for a live port.
            if self.probe(address, port, timeout=0.03 if want_open else 0.2, source=source) == want_open:
                return time.monotonic() - start
        return None

    def exec_server(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process in the server namespace (killed by ``close``)."""
        return subprocess.Popen(["ip", "netns", "exec", self.server, *argv], **kw)
