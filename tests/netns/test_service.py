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


def test_metrics_file_and_spa_status_after_a_scripted_scenario(lab, tmp_path):
    from spa.metrics import parse
    from spa.server.netns import SERVER_V4
    from tests.netns.knockd_helpers import Server, knock_client, knock_from
    from spa.server.netns import CLIENT2_V4

    from tests.netns.test_spa import Keys, packet, send

    lab.default_deny("nft")
    keys = Keys(tmp_path)
    authorized = keys.authorize("authorized_keys", keys.pub_line())
    server = Server(lab, tmp_path, f"[options]\n    ServerKey = {keys.server.path}\n"
                                   "[ssh]\n    sequence = 7000,9000,8000\n    seq_timeout = 0.5\n"
                                   "    open = 22/tcp\n    cmd_timeout = 30\n"
                                   f"[spa]\n    authorized_keys = {authorized}\n    open = 22/tcp\n    cmd_timeout = 30\n")
    state = tmp_path / "state"
    try:
        knock_client(lab, SERVER_V4, "7000", "9000", "8000")  # opens
        knock_from(lab, CLIENT2_V4, SERVER_V4, 7000)          # times out
        send(lab, packet(keys, "spa", address=CLIENT2_V4), source=CLIENT2_V4)  # SPA: accepted
        send(lab, b"junk")                                    # SPA port: wrong size, dropped by the kernel
        send(lab, packet(keys, "spa", offset=-300))           # SPA: stale
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        server.config.write_text("[ssh]\nsequence = 7000,abc\n")
        server.signal(signal.SIGHUP)                            # rejected reload
        assert server.wait_log("new configuration rejected")
        deadline = time.monotonic() + 12
        m = {}
        while time.monotonic() < deadline:
            try:
                m = parse((state / "metrics.prom").read_text())
            except FileNotFoundError:
                m = {}
            if m.get('spa_knock_events_total{kind="timeout"}') == 1 and m.get('spa_reloads_total{result="rejected"}') == 1:
                break
            time.sleep(0.2)
        assert m.get('spa_knock_events_total{kind="open"}') == 1, m
        assert m['spa_knock_events_total{kind="stage"}'] == 4
        assert m['spa_knock_events_total{kind="timeout"}'] == 1
        assert m["spa_grants_active"] == 2 and m["spa_grants_total"] == 2
        assert m['spa_packets_total{result="parsed"}'] == 6  # the junk never reached the daemon
        assert m['spa_spa_packets_total{result="accepted"}'] == 1
        assert 'spa_spa_packets_total{result="size"}' not in m
        assert m['spa_spa_packets_total{result="stale"}'] == 1
        assert m["spa_replay_cache_entries"] == 1
        assert m['spa_reloads_total{result="rejected"}'] == 1
        assert m['spa_interface_up{interface="veth0"}'] == 1
        assert m["spa_firewall_failures_total"] == 0
        r = subprocess.run([sys.executable, "-m", "spa.cli", "status", "--state-dir", str(state)],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "spa-server running" in r.stdout and "veth0 (open)" in r.stdout and "doors:      ssh" in r.stdout
        assert "1 opens, 1 timeouts" in r.stdout and "ssh" in r.stdout and "192.0.2.2" in r.stdout
        assert "matched in the kernel" in r.stdout  # the timeout above came from the sweep of its map
        assert "SPA:        1 accepted, rejected: 1 stale; 1 nonces remembered" in r.stdout
    finally:
        server.stop()
    r = subprocess.run([sys.executable, "-m", "spa.cli", "status", "--state-dir", str(state)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 3 and "not running" in r.stdout
