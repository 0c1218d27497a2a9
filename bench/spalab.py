"""Shared by the SPA benchmarks (``spa_latency``, ``spa_flood``): keys, configs, packets, and Debian's fwknopd.

* ``SpaKeys``: a server key, an authorized client key and an unknown one
  (``spa.keys.ed25519.generate``, as ``tests/netns/test_spa.py`` does), the
  authorized_keys file, the daemon's config text, and packets
  (``spa.protocol.build``);
* ``UdpSender``: one UDP socket made in the client namespace, bound to a
  chosen source, that sends a prebuilt datagram to the SPA port;
* ``Fwknopd``: Debian's ``fwknopd`` (fwknop-server) in the lab's server
  namespace, pcap mode or UDP-server mode, with ``FwknopKeys`` and packets
  prebuilt by Debian's ``fwknop`` client (``-T -B``: built, saved, not sent).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.knocklab import REPO, Daemon
from spa import protocol
from spa.grant import parse_address
from spa.keys import ed25519
from spa.server.netns import SERVER_V4, Lab, in_netns, sh

SPA_PORT = 62201


class SpaKeys:
    """Key files in ``directory``: the server's, an authorized client's, and an unknown client's."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.server = ed25519.generate(str(self.dir / "server.key"), "server", "bench-server")
        self.client = ed25519.generate(str(self.dir / "client.key"), "client", "bench-client")
        self.other = ed25519.generate(str(self.dir / "other.key"), "client", "bench-unknown")
        # A second authorized client, whose hint a flood may use while the first one knocks.
        self.bystander = ed25519.generate(str(self.dir / "bystander.key"), "client", "bench-bystander")
        self.authorized = self.dir / "authorized_keys"
        self.authorized.write_text(Path(self.client.path + ".pub").read_text()
                                   + Path(self.bystander.path + ".pub").read_text())
        self.server_public = self.server.public.public
        self.pair = protocol.pair_keys(self.client.private.seed, self.server_public, self.client.public.public,
                                       self.server_public)
        self.bystander_pair = protocol.pair_keys(self.bystander.private.seed, self.server_public,
                                                 self.bystander.public.public, self.server_public)

    def config_text(self, door: str = "ssh", duration: int = 60, options: str = "") -> str:
        """The config's body after ``[options]`` (``bench.knocklab.Daemon`` adds that line)."""
        return (f"    ServerKey = {self.server.path}\n{options}"
                f"[{door}]\n    authorized_keys = {self.authorized}\n    open = 22/tcp\n"
                f"    cmd_timeout = {duration}\n")

    def packet(self, address: str, door: str = "ssh", *, pair=None, offset: float = 0.0) -> bytes:
        """A fresh packet (new nonce) asking to open ``door`` for ``address``; ``pair``: another client's key pair."""
        kp = pair or self.client
        cached = self.pair if kp is self.client else None
        return protocol.build(kp.private.seed, self.server_public, door, parse_address(address), 0,
                              time_ms=int((time.time() + offset) * 1000), pair=cached)


class UdpSender:
    """A UDP socket in the lab's client namespace, bound to ``source``, for prebuilt datagrams to the SPA port."""

    def __init__(self, lab: Lab, source: str, server: str = SERVER_V4, port: int = SPA_PORT):
        with in_netns(lab.client):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.addr = (server, port)

    def send(self, data: bytes) -> float:
        """Send; ``perf_counter()`` read just before ``sendto``.

        Not after: on a veth the receiving side runs inside the sender's
        ``sendto``, and a daemon woken there can run, on this CPU, before the
        call returns, so a clock read after it can miss a millisecond of the
        daemon's work.
        """
        t0 = time.perf_counter()
        self.sock.sendto(data, self.addr)
        return t0

    def close(self) -> None:
        self.sock.close()


# -- fwknop (Debian's fwknop-server and fwknop-client) ------------------------------------------------------


def fwknop_version() -> str:
    """``fwknop-server <version>`` from dpkg, or "" when the package is not installed."""
    if shutil.which("fwknopd") is None:
        return ""
    try:
        v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "fwknop-server"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        v = ""
    return f"fwknop-server {v}" if v else "fwknopd (version unknown)"


class FwknopKeys:
    """A Rijndael key and an HMAC key, as ``fwknop --key-gen`` makes them (32 and 64 random bytes)."""

    def __init__(self):
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.hmac = base64.b64encode(os.urandom(64)).decode()

    def packets(self, addresses: list[str], directory: Path, server: str = SERVER_V4) -> list[bytes]:
        """One packet per address (``-A tcp/22 -a ADDRESS``), built by the real client with ``-T -B`` (not sent)."""
        out = []
        for i, address in enumerate(addresses):
            path = directory / f"fwknop-packet-{i}"
            r = subprocess.run(["fwknop", "--no-rc-file", "-A", "tcp/22", "-a", address, "-D", server,
                                "--key-base64-rijndael", self.key, "--key-base64-hmac", self.hmac, "--use-hmac",
                                "-T", "-B", str(path)], capture_output=True, text=True, timeout=30)
            if r.returncode != 0 or not path.exists():
                raise RuntimeError(f"fwknop client failed: {r.stderr.strip() or r.stdout.strip()}")
            out.append(path.read_bytes().strip())
        return out


class Fwknopd(Daemon):
    """Debian's fwknopd in the lab's server namespace, in the foreground, its messages in ``self.log``.

    ``mode``: ``pcap`` (the default capture: libpcap, up to 100 packets per
    loop, 100 ms sleep between loops) or ``udp`` (``ENABLE_UDP_SERVER Y``: a
    UDP socket; it needs an INPUT accept rule for udp/62201, added here).
    Its firewall is iptables (Debian: the nf_tables backend), so the lab's
    default deny must be iptables-nft (an ``inet`` table's drop would win
    over fwknopd's ACCEPT).
    """

    def __init__(self, lab: Lab, mode: str, keys: FwknopKeys, access_timeout: int = 60):
        if mode not in ("pcap", "udp"):
            raise ValueError(mode)
        self.lab = lab
        self.kind = "fwknopd"
        self.mode = mode
        self.code = ""
        self.tmp = Path(tempfile.mkdtemp(prefix="spa-bench-fwknopd-", dir="/var/tmp"))
        conf = self.tmp / "fwknopd.conf"
        access = self.tmp / "access.conf"
        lines = [
            "PCAP_INTF veth0;",
            "ENABLE_PCAP_PROMISC N;",
            f"PCAP_FILTER udp port {SPA_PORT};",
            f"ENABLE_UDP_SERVER {'Y' if mode == 'udp' else 'N'};",
            f"UDPSERV_PORT {SPA_PORT};",
            f"FWKNOP_RUN_DIR {self.tmp};",
            "ENABLE_DIGEST_PERSISTENCE Y;",
        ]
        conf.write_text("\n".join(lines) + "\n")
        os.chmod(conf, 0o600)
        access.write_text(f"SOURCE ANY\nKEY_BASE64 {keys.key}\nHMAC_KEY_BASE64 {keys.hmac}\n"
                          f"FW_ACCESS_TIMEOUT {access_timeout}\n")
        os.chmod(access, 0o600)
        self.config = conf
        self.log = self.tmp / "daemon.log"
        self.output = self.log
        if mode == "udp":
            sh("iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport", str(SPA_PORT), "-j", "ACCEPT", ns=lab.server)
        argv = ["fwknopd", "-f", "-c", str(conf), "-a", str(access), "-d", str(self.tmp / "digest.cache"),
                "-p", str(self.tmp / "fwknopd.pid"), "-i", "veth0"]
        if mode == "udp":
            argv.append("-U")
        with open(self.log, "wb") as out:
            self.proc = lab.exec_server(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.pid = self.proc.pid
        ready = "Kicking off UDP server" if mode == "udp" else "main event loop"
        if not self.wait_log(ready, 15):
            text = self.text()
            self.stop()
            raise RuntimeError(f"fwknopd did not start:\n{text[-2000:]}")
        time.sleep(0.2)  # it sets up its chains right after saying so
        self.clk = os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def scratch_dir(prefix: str):
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
