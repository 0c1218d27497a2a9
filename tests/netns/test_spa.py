"""SPA end to end: real keys, a real spa-server sniffing in a namespace, nftables, and TCP connects.

Each test starts one server; every packet goes over the lab's veth pair
between documentation addresses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spa import protocol
from spa.grant import parse_address
from spa.keys import ed25519
from spa.server.netns import CLIENT2_V4, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns
from tests.netns.knockd_helpers import ROOT, Server, knock_client, run_client

pytestmark = pytest.mark.netns

SPA_PORT = 62201
DURATION = 1.5


class Keys:
    def __init__(self, tmp: Path):
        self.dir = tmp
        self.server = ed25519.generate(str(tmp / "server.key"), "server", "server")
        self.client = ed25519.generate(str(tmp / "client.key"), "client", "alice")
        self.other = ed25519.generate(str(tmp / "other.key"), "client", "mallory")

    def authorize(self, name: str, *lines: str) -> Path:
        path = self.dir / name
        path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
        return path

    def pub_line(self, pair=None) -> str:
        return Path((pair or self.client).path + ".pub").read_text().strip()


def config(keys: Keys, doors: str, options: str = "") -> str:
    return f"""[options]
    ServerKey = {keys.server.path}
    {options}
{doors}"""


def door(name: str, authorized: Path, extra: str = "") -> str:
    return f"""[{name}]
    authorized_keys = {authorized}
    open = 22/tcp
    cmd_timeout = {DURATION}
    {extra}
"""


def packet(keys: Keys, door_name: str = "ssh", address: str = CLIENT_V4, *, pair=None, server_public=None,
           offset: float = 0.0, duration: int = 0) -> bytes:
    pair = pair or keys.client
    return protocol.build(pair.private.seed, server_public or keys.server.public.public, door_name,
                          parse_address(address), duration, time_ms=int((time.time() + offset) * 1000))


def send(lab, data: bytes, source: str = CLIENT_V4, server: str = SERVER_V4, port: int = SPA_PORT) -> None:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with in_netns(lab.client):
        s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((source, 0))
        s.sendto(data, (server, port))
    finally:
        s.close()


def stays_closed(lab, address: str = SERVER_V4, source: str | None = None, wait: float = 0.4) -> bool:
    time.sleep(wait)
    return not lab.probe(address, source=source)


def screen_counts(tmp_path: Path, want: dict[str, int], limit: float = 8.0) -> tuple[dict[str, int], dict[str, float]]:
    """The eBPF screen's counters for the names in ``want`` (from the metrics file, rewritten every 5 s),
    once they equal ``want`` or ``limit`` seconds have passed; and the whole metrics file."""
    from spa.metrics import parse

    metrics = tmp_path / "state" / "metrics.prom"
    seen: dict[str, int] = {}
    m: dict[str, float] = {}
    end = time.monotonic() + limit
    while time.monotonic() < end and seen != want:
        if metrics.exists():
            m = parse(metrics.read_text())
            seen = {k: int(m.get(f'spa_screen_datagrams_total{{result="{k}"}}', -1)) for k in want}
        time.sleep(0.2)
    return seen, m


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


def test_keygen_trust_knock_client_opens_for_the_client_only_then_closes(lab, tmp_path):
    lab.default_deny("nft")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}

    def spa(*args):
        return subprocess.run([sys.executable, "-m", "spa.cli", *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=30)

    assert spa("keygen", "--server", "-o", str(tmp_path / "server.key")).returncode == 0
    assert spa("keygen", "-o", str(home / "key")).returncode == 0
    assert (os.stat(home / "key").st_mode & 0o777) == 0o600
    r = spa("trust", SERVER_V4, str(tmp_path / "server.key.pub"))
    assert r.returncode == 0, r.stderr
    (tmp_path / "authorized_keys").write_text((home / "key.pub").read_text())
    server = Server(lab, tmp_path, config_text=f"""[options]
    ServerKey = {tmp_path / "server.key"}
[ssh]
    authorized_keys = authorized_keys
    open = 22/tcp
    cmd_timeout = {DURATION}
""")
    try:
        assert not lab.probe(SERVER_V4)
        r = run_client(lab, "env", f"HOME={home}", sys.executable, "-m", "spa.client.cli", "-v",
                       "--key", str(home / "key"), SERVER_V4, "ssh")
        assert r.returncode == 0, r.stderr
        assert f"opening for {CLIENT_V4}" in r.stdout
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert not lab.probe(SERVER_V4, source=CLIENT2_V4)  # the client's address only
        assert server.wait_log("ssh: OPEN SESAME (SPA key")
        assert lab.wait_for(False, SERVER_V4, limit=DURATION + 2) is not None
    finally:
        server.stop()


@pytest.mark.parametrize("stop", ["clean", "kill-9"])
def test_replay_is_refused_from_any_address_and_after_a_restart(lab, tmp_path, keys, stop):
    lab.default_deny("nft")
    text = config(keys, door("ssh", keys.authorize("authorized_keys", keys.pub_line())))
    server = Server(lab, tmp_path, config_text=text)
    captured = packet(keys)
    try:
        send(lab, captured)
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        if stop == "kill-9":
            # Killed the moment the door opens: the nonce may still be on its way to the journal
            # (the capture loop opened the door itself), so the next start refuses every packet
            # made before it, and the replay is refused either way.
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(5)
        assert lab.wait_for(False, SERVER_V4, limit=DURATION + 2) is not None  # kill -9: the kernel closed it
        # By now the accepted nonce is in the kernel's filter (rebuilt within a second): replays stop
        # there, and never reach the daemon. A stale packet sent after them is the daemon's marker.
        if stop == "clean":
            send(lab, captured)  # the same bytes, same source
            send(lab, captured, source=CLIENT2_V4)  # another source
            send(lab, packet(keys, offset=-120))
            assert server.wait_log("rejected (stale)")
            assert "rejected (replay)" not in server.text()
            assert stays_closed(lab) and stays_closed(lab, source=CLIENT2_V4, wait=0)
            server.stop()
        server = Server(lab, tmp_path, config_text=text, extra=("-D",))
        # Only after an unclean stop does the start refuse what was made before it.
        assert ("SPA packets made before" in server.text()) == (stop == "kill-9")
        send(lab, captured)  # the restarted daemon read the nonce from the journal into its filter
        send(lab, packet(keys, offset=-120))
        assert server.wait_log("rejected (stale)", count=2 if stop == "clean" else 1)
        assert "rejected (replay)" not in server.text()
        assert stays_closed(lab)
        send(lab, packet(keys))  # a fresh packet still works
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
    finally:
        server.stop()


def test_after_the_machine_went_down_under_it_packets_made_before_the_start_are_refused(lab, tmp_path, keys):
    # The journal says: a daemon ran and never stopped cleanly (here, a power loss).
    # Any nonce it committed in its last millisecond may be lost, so nothing older than this start counts.
    from spa.server.journal import Journal

    j = Journal(tmp_path / "state")
    j.begin_session()
    j.close()
    lab.default_deny("nft")
    text = config(keys, door("ssh", keys.authorize("authorized_keys", keys.pub_line())))
    older = packet(keys, offset=-0.5)
    server = Server(lab, tmp_path, config_text=text)
    try:
        assert server.wait_log("SPA packets made before")
        assert "firewall backend: nft (table inet spa; grants through netlink" in server.text()
        send(lab, older)
        assert server.wait_log("rejected (restart)")
        assert stays_closed(lab)
        send(lab, packet(keys))
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        server.stop()
        server = Server(lab, tmp_path, config_text=text)  # after a clean stop: no refusal
        assert server.text().count("SPA packets made before") == 1  # only the first start said it
    finally:
        server.stop()


@pytest.mark.parametrize("screen", ["ebpf", "classic"])
def test_every_bad_packet_is_rejected_and_nothing_opens(lab, tmp_path, keys, screen):
    lab.default_deny("nft")
    authorized = keys.authorize("authorized_keys", keys.pub_line())
    expired = keys.authorize("expired_keys", "expires=2020-01-01 " + keys.pub_line())
    fenced = keys.authorize("fenced_keys", "from=198.51.100.0/24 " + keys.pub_line())
    other_only = keys.authorize("other_keys", keys.pub_line(keys.other))
    text = config(keys, door("ssh", authorized) + door("old", expired) + door("fenced", fenced)
                  + door("others", other_only))
    server = Server(lab, tmp_path, config_text=text, extra=("-D", "--spa-screen", screen))
    another_server = protocol.public_of(os.urandom(32))
    good = packet(keys)
    try:
        # What the kernel drops either way (wrong size or version, a hint no key has): sent first,
        # they must never reach the daemon.
        kernel = [bytes([good[0] ^ 1]) + good[1:], good[:1] + bytes([good[1] ^ 8]) + good[2:], good[:-1],
                  good + b"\0", packet(keys, server_public=another_server)]
        for data in kernel:
            send(lab, data)
        forged = []
        for bit in (8 * 20, 8 * 40 + 7, 8 * 100, 8 * (len(good) - 1)):  # nonce, body, tag: the AEAD fails
            flipped = bytearray(good)
            flipped[bit // 8] ^= 1 << (bit % 8)
            forged.append(bytes(flipped))
        # The eBPF screen drops these in the kernel too; the classic filter passes them to the daemon.
        cases = [] if screen == "ebpf" else [(data, "dropped (aead)") for data in forged]
        for data in forged if screen == "ebpf" else ():
            send(lab, data)
        cases += [
            (packet(keys, offset=-120), "rejected (stale)"),
            (packet(keys, offset=+120), "rejected (future)"),
            (packet(keys, "others"), "rejected (policy)"),
            (packet(keys, "nosuchdoor"), "rejected (policy)"),
            (packet(keys, "old"), "rejected (expired)"),
            (packet(keys, "fenced"), "rejected (from)"),
        ]
        for i, (data, reason) in enumerate(cases):
            send(lab, data)
            assert server.wait_log(reason, count=sum(1 for _, r in cases[: i + 1] if r == reason)), (i, reason)
        for reason in ("size", "version", "unknown-key", *(("aead",) if screen == "ebpf" else ())):
            assert f"dropped ({reason})" not in server.text()
        mode = ("eBPF screen (a datagram reaches user space only with a valid AEAD tag under a key hint of 2 key(s))"
                if screen == "ebpf" else "the key hints of 2 key(s) over the index")
        assert f"SPA port 62201, kernel filter: {mode}" in server.text()
        assert stays_closed(lab)
        assert server.text().count("OPEN SESAME") == 0
        send(lab, good)  # the untouched original is still good: nothing above consumed it
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert f"udp: {CLIENT_V4}:" in server.text() and f"-> {SERVER_V4}:{SPA_PORT} 299 bytes" in server.text()  # -D
        if screen == "ebpf":  # the screen counted each drop by kind
            want = {"forged": 4, "unknown": 2, "size": 2, "version": 1, "replay": 0, "passed": len(cases) + 1}
            assert screen_counts(tmp_path, want)[0] == want
    finally:
        server.stop()


def test_forgeries_under_the_clients_own_hint_and_replays_stop_in_the_kernel(lab, tmp_path, keys):
    """A bounded flood of forgeries made under the client's real key hint (what an observer of the
    wire can make), with the client's own packet in the middle, then copies of that packet: the
    eBPF screen drops every forgery and copy in the kernel, counts them, and the door opens once."""
    lab.default_deny("nft")
    text = config(keys, door("ssh", keys.authorize("authorized_keys", keys.pub_line())))
    server = Server(lab, tmp_path, config_text=text, extra=("--spa-screen", "ebpf"))
    good = packet(keys)
    forgeries, copies = 4000, 200
    try:
        assert "kernel filter: eBPF screen" in server.text(), server.text()
        with in_netns(lab.client):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((CLIENT_V4, 0))
            for i in range(forgeries):  # bounded; to the server namespace only
                if i == forgeries // 2:
                    s.sendto(good, (SERVER_V4, SPA_PORT))
                s.sendto(good[:9] + os.urandom(len(good) - 9), (SERVER_V4, SPA_PORT))
            assert lab.wait_for(True, SERVER_V4, limit=2) is not None, server.output()
            assert server.wait_log("OPEN SESAME")
            for _ in range(copies):
                s.sendto(good, (SERVER_V4, SPA_PORT))
        finally:
            s.close()
        want = {"forged": forgeries, "replay": copies, "passed": 1, "unknown": 0, "size": 0, "version": 0}
        seen, m = screen_counts(tmp_path, want)
        assert seen == want
        # None of it reached the daemon's checks: one datagram seen, accepted.
        assert {k: v for k, v in m.items() if k.startswith("spa_spa_packets_total{")} == {
            'spa_spa_packets_total{result="accepted"}': 1}
        assert server.text().count("OPEN SESAME") == 1
        r = subprocess.run([sys.executable, "-m", "spa.cli", "status", "--state-dir", str(tmp_path / "state")],
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert (f"SPA screen: eBPF, in the kernel; dropped there: {forgeries} forged, {copies} replay; "
                "1 passed to the checks") in r.stdout, r.stdout
    finally:
        server.stop()


def test_reloads_move_the_spa_port_and_switch_between_the_ebpf_screen_and_the_classic_filter(lab, tmp_path, keys):
    """SIGHUP to another SpaPort (a new screen for the new port), then to a config where a door also knocks
    on that port (the classic filter: every datagram to it goes to user space): SPA opens in each."""
    import json

    lab.default_deny("nft")
    spa = door("ssh", keys.authorize("authorized_keys", keys.pub_line()))
    server = Server(lab, tmp_path, config_text=config(keys, spa))
    status = tmp_path / "state" / "status.json"

    def screen_mode(want: str) -> bool:
        end = time.monotonic() + 8  # status.json is rewritten every 5 s
        while time.monotonic() < end:
            if status.exists() and json.loads(status.read_text()).get("spa_screen") == want:
                return True
            time.sleep(0.2)
        return False

    try:
        assert "kernel filter: eBPF screen" in server.text()
        send(lab, packet(keys))
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        server.config.write_text(config(keys, spa, "SpaPort = 62202"))
        server.signal(signal.SIGHUP)
        assert server.wait_log("re-reading config file")
        time.sleep(0.3)
        send(lab, packet(keys, address=CLIENT2_V4), source=CLIENT2_V4)  # the old port: nothing listens there now
        assert stays_closed(lab, source=CLIENT2_V4)
        send(lab, packet(keys, address=CLIENT2_V4), source=CLIENT2_V4, port=62202)
        assert lab.wait_for(True, SERVER_V4, source=CLIENT2_V4, limit=2) is not None
        assert screen_mode("ebpf")
        knocks_there = "[knock]\n    sequence = 7000,62202:udp\n    seq_timeout = 5\n    open = 22/tcp\n    cmd_timeout = 5\n"
        server.config.write_text(config(keys, spa + knocks_there, "SpaPort = 62202"))
        server.signal(signal.SIGHUP)
        assert server.wait_log("SPA port: classic kernel filter: a door knocks on the SPA port")
        time.sleep(0.3)
        send(lab, packet(keys, address=CLIENT_V6), source=CLIENT_V6, server=SERVER_V6, port=62202)
        assert lab.wait_for(True, SERVER_V6, limit=2) is not None
        assert screen_mode("classic")
        assert server.text().count("OPEN SESAME (SPA") == 3
    finally:
        server.stop()


def test_the_screen_comes_back_with_its_interface(lab, tmp_path, keys):
    """The interface goes down and up: the screen's sockets are closed with the capture's and reopened with
    them, and SPA opens again (a knock-only daemon has the same test in test_knockd_compat.py)."""
    from spa.server.netns import sh

    lab.default_deny("nft")
    server = Server(lab, tmp_path, config_text=config(keys, door("ssh", keys.authorize("authorized_keys",
                                                                                          keys.pub_line()))))
    try:
        assert "kernel filter: eBPF screen" in server.text()
        for ns in (lab.server, lab.client):
            sh("ip", "link", "set", "veth0", "down", ns=ns)
        assert server.wait_log("interface veth0 went down")
        for ns in (lab.server, lab.client):
            sh("ip", "link", "set", "veth0", "up", ns=ns)
        assert server.wait_log("interface veth0 is back"), server.text()
        time.sleep(0.3)  # the addresses come back too (IPv6 after DAD; this one is IPv4)
        send(lab, packet(keys))
        assert lab.wait_for(True, SERVER_V4, limit=3) is not None, server.text()
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_ipv6_end_to_end_and_allow_ip_opens_only_that_address(lab, tmp_path, keys):
    lab.default_deny("nft")
    text = config(keys, door("ssh", keys.authorize("authorized_keys", keys.pub_line())))
    server = Server(lab, tmp_path, config_text=text)
    common = ("--key", keys.client.path, "--server-key", keys.server.path + ".pub")
    try:
        r = knock_client(lab, *common, "-6", SERVER_V6, "ssh")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, SERVER_V6, limit=2) is not None
        assert not lab.probe(SERVER_V4)
        r = knock_client(lab, *common, "--allow-ip", CLIENT2_V4, SERVER_V4, "ssh")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, SERVER_V4, source=CLIENT2_V4, limit=2) is not None
        assert not lab.probe(SERVER_V4, source=CLIENT_V4)
    finally:
        server.stop()


def test_source_address_door_grants_the_sender_not_the_signed_address(lab, tmp_path, keys):
    lab.default_deny("nft")
    text = config(keys, door("nat", keys.authorize("authorized_keys", keys.pub_line()), "spa_use_source = yes"))
    server = Server(lab, tmp_path, config_text=text)
    try:
        send(lab, packet(keys, "nat", address=CLIENT2_V4), source=CLIENT_V4)
        assert lab.wait_for(True, SERVER_V4, source=CLIENT_V4, limit=2) is not None
        assert not lab.probe(SERVER_V4, source=CLIENT2_V4)
    finally:
        server.stop()


def test_rotation_without_lockout_then_revocation_by_sighup(lab, tmp_path, keys):
    lab.default_deny("nft")
    old_line = keys.pub_line()
    new, old_path = ed25519.rotate(keys.client.path)
    old = ed25519.load(old_path)
    assert old.public == keys.client.public and new.public != old.public
    authorized = keys.authorize("authorized_keys", old_line, keys.pub_line(new))
    server = Server(lab, tmp_path, config_text=config(keys, door("ssh", authorized)), extra=("-D",))
    try:
        for pair, source in ((old, CLIENT_V4), (new, CLIENT2_V4)):  # both work during the rotation
            send(lab, packet(keys, address=source, pair=pair), source=source)
            assert lab.wait_for(True, SERVER_V4, source=source, limit=2) is not None
        keys.authorize("authorized_keys", keys.pub_line(new))  # the old line removed ...
        server.signal(signal.SIGHUP)  # ... and the server told
        assert server.wait_log("re-reading config file")
        time.sleep(0.3)
        assert lab.wait_for(False, SERVER_V4, limit=DURATION + 2) is not None
        send(lab, packet(keys, pair=old))
        send(lab, packet(keys, pair=new, offset=-120))  # a marker that reaches the daemon, sent after it
        assert server.wait_log("rejected (stale)")
        # The server no longer knows the old key at all: the reload took its hints out of the
        # kernel's filter, so its packet never reached the daemon.
        assert "dropped (unknown-key)" not in server.text()
        assert stays_closed(lab)
        send(lab, packet(keys, pair=new))
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
    finally:
        server.stop()


def test_a_bad_authorized_keys_line_refuses_to_start_with_file_and_line(lab, tmp_path, keys):
    authorized = keys.authorize("authorized_keys", keys.pub_line(), "form=192.0.2.0/24 " + keys.pub_line(keys.other))
    (tmp_path / "knockd.conf").write_text(config(keys, door("ssh", authorized)))
    r = subprocess.run([sys.executable, "-m", "spa.server.cli", "-c", str(tmp_path / "knockd.conf"),
                        "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2
    assert f"{authorized}:2: unknown option 'form'" in r.stderr


def test_client_rotation_never_locks_out_whichever_line_the_server_lists(lab, tmp_path, keys):
    lab.default_deny("nft")
    old_line = keys.pub_line()
    new, _ = ed25519.rotate(keys.client.path)  # the client rotated; the server has not heard yet
    authorized = keys.authorize("authorized_keys", old_line)
    server = Server(lab, tmp_path, config_text=config(keys, door("ssh", authorized)))
    common = ("--key", keys.client.path, "--server-key", keys.server.path + ".pub")
    try:
        r = knock_client(lab, "-v", *common, SERVER_V4, "ssh")  # one packet per key: the old one gets in
        assert r.returncode == 0, r.stderr
        assert "old key, rotation in progress" in r.stdout
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        keys.authorize("authorized_keys", keys.pub_line(new))  # the admin swaps the line
        server.signal(signal.SIGHUP)
        assert server.wait_log("re-reading config file")
        time.sleep(0.3)
        r = knock_client(lab, *common, "--allow-ip", CLIENT2_V4, SERVER_V4, "ssh")  # now the new one gets in
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, SERVER_V4, source=CLIENT2_V4, limit=2) is not None
        assert server.wait_log(f"OPEN SESAME (SPA key {new.key_id}")
    finally:
        server.stop()
