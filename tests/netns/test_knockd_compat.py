"""knockd compatibility with real peers: the real knock client against our server, ours against real knockd,
the seed article's two configs run verbatim, and the cases where knockd itself fails."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from spa.server.netns import CLIENT2_V4, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns, sh
from tests.netns.knockd_helpers import VECTORS, Server, knock_client, knock_from, run_client

pytestmark = pytest.mark.netns

SEED_START = "/usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"
SEED_STOP = "/usr/sbin/iptables -D INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"


@pytest.fixture(autouse=True, params=["kernel", "user"])
def knock_matcher(request, monkeypatch):
    """Every test here twice: knocks matched by the kernel's eBPF program, and by the Python matcher."""
    monkeypatch.setenv("SPA_TEST_KNOCK_MATCHER", request.param)
    return request.param


def open_door(name, sequence, duration=1.5, extra=""):
    return f"""[options]
[{name}]
    sequence    = {sequence}
    seq_timeout = 5
    tcpflags    = syn
    open        = 22/tcp
    cmd_timeout = {duration}
{extra}"""


def iptables_rules():
    return subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True).stdout


def test_seed_case1_verbatim_with_the_real_knock_client(lab, tmp_path):
    lab.default_deny("iptables-nft")
    server = Server(lab, tmp_path, config_path=VECTORS / "seed-case1.conf")
    try:
        assert not lab.probe(SERVER_V4)
        r = run_client(lab, "knock", "-v", SERVER_V4, "2222:udp", "3333:tcp", "4444:udp")
        assert r.returncode == 0 and "hitting udp 192.0.2.1:2222" in r.stdout
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert server.wait_log("192.0.2.2: opencloseSSH: OPEN SESAME")
        assert server.wait_log("opencloseSSH: running command: " + SEED_START.replace("%IP%", CLIENT_V4))
        assert not lab.probe(SERVER_V4, source=CLIENT2_V4)
        r = run_client(lab, "knock", SERVER_V4, "2222:udp", "3333:tcp", "4444:udp")  # again: extends, no second rule
        time.sleep(0.3)
        with in_netns(lab.server):
            assert iptables_rules().count("-s 192.0.2.2/32 -p tcp -m tcp --dport 22") == 1
        # cmd_timeout is 10 s in the article: a clean stop must run the pending stop command now.
        assert server.stop() == 0
        assert not lab.probe(SERVER_V4)
        with in_netns(lab.server):
            assert "192.0.2.2" not in iptables_rules()
    finally:
        server.stop()


def test_seed_case2_open_and_close_doors_with_the_real_knock_client(lab, tmp_path):
    lab.default_deny("iptables-nft")
    server = Server(lab, tmp_path, config_path=VECTORS / "seed-case2.conf")
    try:
        for round_ in range(2):  # a door without a stop command fires on every knock, as in knockd
            r = run_client(lab, "knock", "-v", SERVER_V4, "2222", "3333", "4444")
            assert r.stdout.splitlines() == ["hitting tcp 192.0.2.1:2222", "hitting tcp 192.0.2.1:3333",
                                             "hitting tcp 192.0.2.1:4444"]
            assert lab.wait_for(True, SERVER_V4, limit=2) is not None, f"round {round_}: openSSH"
            run_client(lab, "knock", SERVER_V4, "4444", "3333", "2222")
            assert lab.wait_for(False, SERVER_V4, limit=2) is not None, f"round {round_}: closeSSH"
        assert server.wait_log("closeSSH: OPEN SESAME", count=2)
    finally:
        server.stop()


def test_scan_sees_only_the_protected_port_and_only_while_open(lab, tmp_path):
    lab.default_deny("nft")
    # Probed in descending order: probing 7000, 8000, 9000 in turn *is* the knock.
    ports = [22, 9000, 8000, 7000]
    server = Server(lab, tmp_path, open_door("ssh", "7000,8000,9000", duration=1.5))
    try:
        assert [lab.probe(SERVER_V4, p, timeout=0.1) for p in ports] == [False] * 4
        r = knock_client(lab, SERVER_V4, "7000", "8000", "9000")
        assert r.returncode == 0
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert [lab.probe(SERVER_V4, p, timeout=0.1) for p in ports] == [True, False, False, False]
        assert lab.wait_for(False, SERVER_V4, limit=3) is not None
        assert [lab.probe(SERVER_V4, p, timeout=0.1) for p in ports] == [False] * 4
        with in_netns(lab.server):
            listening = subprocess.run(["ss", "-H", "-lntup"], capture_output=True, text=True).stdout
        assert all(f"pid={server.proc.pid}," not in line for line in listening.splitlines()), listening
    finally:
        server.stop()


def test_our_client_opens_the_real_knockd(lab, tmp_path):
    lab.default_deny("iptables-nft")
    config = f"""[options]
[opencloseSSH]
    sequence      = 2222:udp,3333:tcp,4444:udp
    seq_timeout   = 15
    tcpflags      = syn
    start_command = {SEED_START}
    cmd_timeout   = 2
    stop_command  = {SEED_STOP}
"""
    knockd = Server(lab, tmp_path, config, real_knockd=True)
    try:
        r = knock_client(lab, "-v", SERVER_V4, "2222:udp", "3333:tcp", "4444:udp")
        assert r.returncode == 0
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None, knockd.output()
        assert lab.wait_for(False, SERVER_V4, limit=5) is not None
    finally:
        knockd.stop()


def test_ipv6_knocks_open_for_the_ipv6_address(lab, tmp_path):
    lab.default_deny("iptables-nft")
    server = Server(lab, tmp_path, open_door("ssh", "7000,8000:udp,9000"))
    try:
        r = run_client(lab, "knock", "-6", SERVER_V6, "7000", "8000:udp", "9000")
        assert r.returncode == 0
        assert lab.wait_for(True, SERVER_V6, limit=2) is not None
        assert not lab.probe(SERVER_V4)
        assert server.wait_log(f"{CLIENT_V6}: ssh: OPEN SESAME")
    finally:
        server.stop()


def test_interleaved_clients_both_open(lab, tmp_path):
    """X1 Y1 X2 X3 Y2 Y3: knockd opens only for X (its attempt list drops Y's)."""
    lab.default_deny("nft")
    server = Server(lab, tmp_path, open_door("ssh", "7000,8000,9000", duration=5))
    try:
        X, Y = CLIENT_V4, CLIENT2_V4
        for src, port in ((X, 7000), (Y, 7000), (X, 8000), (X, 9000), (Y, 8000), (Y, 9000)):
            knock_from(lab, src, SERVER_V4, port)
            time.sleep(0.02)
        assert lab.wait_for(True, SERVER_V4, limit=2, source=X) is not None
        assert lab.wait_for(True, SERVER_V4, limit=2, source=Y) is not None
    finally:
        server.stop()


def test_doors_sharing_a_first_port_both_open(lab, tmp_path):
    """knockd: only the door listed first can ever open."""
    lab.default_deny("nft")
    lab.listen(2222)
    config = """[options]
[first]
    sequence = 1000,2000,3000
    open = 22/tcp
    cmd_timeout = 5
[second]
    sequence = 1000,4000,5000
    open = 2222/tcp
    cmd_timeout = 5
"""
    server = Server(lab, tmp_path, config)
    try:
        knock_client(lab, SERVER_V4, "1000", "4000", "5000")
        assert lab.wait_for(True, SERVER_V4, 2222, limit=2) is not None, server.output()
        assert not lab.probe(SERVER_V4, 22)
        knock_client(lab, SERVER_V4, "1000", "2000", "3000")
        assert lab.wait_for(True, SERVER_V4, 22, limit=2) is not None
    finally:
        server.stop()


def test_a_retransmitted_first_syn_counts_once(lab, tmp_path):
    """knockd #92: a SYN retransmission (or nc -z) on the first port stalls the sequence."""
    lab.default_deny("nft")
    server = Server(lab, tmp_path, open_door("ssh", "7000,8000,9000", duration=5))
    try:
        with in_netns(lab.client):
            s = socket.socket()
        s.settimeout(1.3)  # the kernel retransmits the dropped SYN after 1 s
        with pytest.raises(OSError):
            s.connect((SERVER_V4, 7000))
        s.close()
        assert server.wait_log("ssh: Stage 1")
        knock_client(lab, SERVER_V4, "8000", "9000")
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None, server.output()
    finally:
        server.stop()


def test_sighup_reload_keeps_running_on_a_bad_file_and_swaps_in_a_good_one(lab, tmp_path):
    lab.default_deny("nft")
    server = Server(lab, tmp_path, open_door("ssh", "7000,8000,9000", duration=5))
    try:
        good = server.config.read_text()
        server.config.write_text(good.replace("sequence    = 7000,8000,9000", "sequence    = 7000,abc,9000"))
        server.signal(signal.SIGHUP)
        assert server.wait_log("new configuration rejected")
        assert "port 'abc' is not a number" in server.output()
        assert server.proc.poll() is None, "knockd exits here; we keep the old configuration"
        knock_client(lab, SERVER_V4, "7000", "8000", "9000")
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        server.config.write_text(good.replace("7000,8000,9000", "7100,8100,9100"))
        server.signal(signal.SIGHUP)
        assert server.wait_log("re-reading config file", count=2)
        time.sleep(0.3)
        lab.probe(SERVER_V4, source=CLIENT2_V4)
        knock_from(lab, CLIENT2_V4, SERVER_V4, 7000)
        knock_from(lab, CLIENT2_V4, SERVER_V4, 8000)
        knock_from(lab, CLIENT2_V4, SERVER_V4, 9000)
        time.sleep(0.3)
        assert not lab.probe(SERVER_V4, source=CLIENT2_V4), "the old sequence is gone"
        for p in (7100, 8100, 9100):
            knock_from(lab, CLIENT2_V4, SERVER_V4, p)
        assert lab.wait_for(True, SERVER_V4, limit=2, source=CLIENT2_V4) is not None
        assert lab.probe(SERVER_V4), "grants opened before the reload stay open"
    finally:
        server.stop()


def test_interface_down_and_up_does_not_kill_the_daemon(lab, tmp_path):
    """knockd #69: the capture fails and knockd exits."""
    lab.default_deny("nft")
    server = Server(lab, tmp_path, open_door("ssh", "7000,8000,9000", duration=5))
    try:
        for ns in (lab.server, lab.client):
            sh("ip", "link", "set", "veth0", "down", ns=ns)
        time.sleep(0.5)
        for ns in (lab.server, lab.client):
            sh("ip", "link", "set", "veth0", "up", ns=ns)
        assert server.wait_log("interface veth0 is back") or server.wait_log("capturing on interface veth0", count=2), \
            server.output()
        assert server.proc.poll() is None
        knock_client(lab, SERVER_V4, "7000", "8000", "9000")
        assert lab.wait_for(True, SERVER_V4, limit=3) is not None, server.output()
    finally:
        server.stop()


def test_one_time_sequences_are_used_once_and_the_last_one_disables_the_door(lab, tmp_path):
    lab.default_deny("nft")
    otp = tmp_path / "otp"
    otp.write_text("# one per line\n3001,3002,3003\n 4001,4002,4003\n")
    config = f"""[options]
[otp]
    one_time_sequences = {otp}
    seq_timeout = 5
    tcpflags = syn
    open = 22/tcp
    cmd_timeout = 0.7
"""
    server = Server(lab, tmp_path, config)
    try:
        knock_client(lab, SERVER_V4, "3001", "3002", "3003")
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert server.wait_log("new sequence for door otp: 4001:tcp,4002:tcp,4003:tcp")
        assert otp.read_text() == "# one per line\n#3001,3002,3003\n 4001,4002,4003\n"
        assert lab.wait_for(False, SERVER_V4, limit=3) is not None
        knock_client(lab, SERVER_V4, "3001", "3002", "3003")
        time.sleep(0.3)
        assert not lab.probe(SERVER_V4), "a used sequence never opens again"
        knock_client(lab, SERVER_V4, "4001", "4002", "4003")
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert server.wait_log("no more sequences left in the one time sequences file for door otp")
        assert otp.read_text() == "# one per line\n#3001,3002,3003\n# 4001,4002,4003\n"
        assert server.proc.poll() is None, "knockd aborts with a double free here"
    finally:
        server.stop()


def test_bad_config_names_file_and_line_and_touches_nothing(lab, tmp_path):
    lab.default_deny("nft")
    with in_netns(lab.server):
        before = subprocess.run(["nft", "-s", "list", "ruleset"], capture_output=True, text=True).stdout
    config = tmp_path / "bad.conf"
    config.write_text("[options]\n[ssh]\n    sequence = 7000,abc\n    open = 22/tcp\n    tcpflags = syn,bogus\n")
    r = subprocess.run(["ip", "netns", "exec", lab.server, "python3", "-m", "spa.server.cli", "-c", str(config),
                        "--state-dir", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{config}:3:" in r.stderr and f"{config}:5:" in r.stderr
    with in_netns(lab.server):
        assert subprocess.run(["nft", "-s", "list", "ruleset"], capture_output=True, text=True).stdout == before
