"""spa-server as systemd sees it: READY, WATCHDOG, RELOADING, STOPPING on a real notify socket."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.netns.knockd_helpers import ROOT

pytestmark = pytest.mark.netns


def _messages(sock, until, limit=8.0):
    got = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until(got):
            break
    return got


def test_notify_protocol_from_start_to_stop(lab, tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    config = tmp_path / "knockd.conf"
    config.write_text("[options]\n[ssh]\n    sequence = 7000,9000,8000\n    open = 22/tcp\n")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.server, sys.executable, "-m", "spa.server.cli", "-c", str(config), "-i", "veth0",
         "--state-dir", str(tmp_path / "state")], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        got = _messages(sock, lambda m: any("READY=1" in x for x in m))
        ready = [m for m in got if "READY=1" in m]
        assert ready, got
        assert "STATUS=listening on veth0: 1 door, 0 open" in ready[0]
        assert f"MAINPID={proc.pid}" in ready[0]
        pings = _messages(sock, lambda m: sum(x == "WATCHDOG=1" for x in m) >= 2, limit=4)
        assert sum(m == "WATCHDOG=1" for m in pings) >= 2, "the main loop pings twice per WATCHDOG_USEC"
        proc.send_signal(signal.SIGHUP)
        got = _messages(sock, lambda m: any("READY=1" in x for x in m))
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in got), got
        assert any("READY=1" in m for m in got)
        proc.send_signal(signal.SIGTERM)
        got = _messages(sock, lambda m: "STOPPING=1" in m)
        assert "STOPPING=1" in got
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
