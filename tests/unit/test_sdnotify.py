"""sd_notify against a real datagram socket, and the shipped unit against systemd-analyze."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spa.server.sdnotify import Notifier

UNIT = Path(__file__).resolve().parents[2] / "server" / "systemd" / "spa-server.service"


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def test_messages_reach_the_socket(listener):
    path, s = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("listening on eth0")
    assert s.recv(4096).decode().splitlines() == ["READY=1", "STATUS=listening on eth0", f"MAINPID={os.getpid()}"]
    n.reloading()
    msg = s.recv(4096).decode().splitlines()
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    n.stopping()
    assert s.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_socket():
    name = f"spa-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert s.recv(100) == b"STATUS=hello"
    finally:
        s.close()


def test_watchdog_pings_twice_per_period(listener):
    path, s = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 1.0
    assert n.watchdog(now=100.0) and s.recv(100) == b"WATCHDOG=1"
    assert not n.watchdog(now=100.5)
    assert n.watchdog(now=101.0)
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None, "the watchdog is another process's"


def test_outside_systemd_nothing_happens():
    n = Notifier({})
    assert not n.enabled and not n.send(ready=1) and not n.watchdog()


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian: apt-get install systemd)"
    unit = tmp_path / "spa-server.service"
    # verify insists that ExecStart exists: point it at this interpreter.
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/spa-server", f"{sys.executable} -m spa.server.cli"))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "After=network-online.target",
                 "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF", "SystemCallFilter=bpf",
                 "ProtectSystem=strict", "StateDirectory=spa",
                 "NoNewPrivileges=yes", "AF_PACKET", "AF_NETLINK"):
        assert line in text
