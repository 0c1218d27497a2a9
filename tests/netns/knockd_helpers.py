"""Running spa-server (or the real knockd) in a lab's server namespace, and knocking from its client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from spa.server.netns import Lab, in_netns

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"


class Server:
    """spa-server in the server namespace, logging to a file we can wait on."""

    def __init__(self, lab: Lab, tmp: Path, config_text: str | None = None, config_path: Path | None = None,
                 extra: tuple[str, ...] = (), real_knockd: bool = False, interface: str | None = "veth0"):
        self.lab = lab
        self.log = tmp / "server.log"
        self.config = config_path or tmp / "knockd.conf"
        if config_text is not None:
            self.config.write_text(config_text)
        if real_knockd:
            argv = ["knockd", "-c", str(self.config), "-i", "veth0", "-g", str(self.log)]
        else:
            # Tests run in both matchers by setting SPA_TEST_KNOCK_MATCHER (see test_knockd_compat.py).
            matcher = os.environ.get("SPA_TEST_KNOCK_MATCHER")
            argv = [sys.executable, "-m", "spa.server.cli", "-c", str(self.config),
                    *(("-i", interface) if interface else ()), "-g", str(self.log),
                    "--state-dir", str(tmp / "state"), *(("--knock-matcher", matcher) if matcher else ()), *extra]
        ready = "listening on" if real_knockd else "starting up"
        before = self.text().count(ready)  # a restarted server appends to the same log
        self.proc = lab.exec_server(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        if not self.wait_log(ready, 10, count=before + 1):
            self.stop()
            raise RuntimeError(f"server did not start:\n{self.output()}")
        if not real_knockd and os.environ.get("SPA_TEST_KNOCK_MATCHER") == "kernel":
            # Asked for by name, the kernel matcher falls back with an error line: make that a failure here.
            assert "knock matching in the kernel" in self.text(), self.text()

    def text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, limit: float = 5.0, count: int = 1) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.text().count(needle) >= count:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def output(self) -> str:
        return self.text()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def run_client(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", lab.client, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=30)


def knock_client(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return run_client(lab, sys.executable, "-m", "spa.client.cli", *args)


def knock_from(lab: Lab, source: str, server: str, port: int, proto: str = "tcp") -> None:
    """One knock as knock sends it (one SYN, or one 1-byte datagram), from a chosen client address."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with in_netns(lab.client):
        s = socket.socket(family, kind)
    try:
        s.bind((source, 0))
        if proto == "udp":
            s.sendto(b"\0", (server, port))
        else:
            s.setblocking(False)
            s.connect_ex((server, port))
    finally:
        s.close()
