"""Rotating knock sequences end to end: our client and the real ``knock``, used-once, windows, rotation, scans."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spa import rotating
from spa.keys import shared
from spa.server.netns import CLIENT2_V4, CLIENT_V4, SERVER_V4, in_netns
from tests.netns.knockd_helpers import ROOT, Server, knock_client, knock_from, run_client

pytestmark = pytest.mark.netns

DURATION = 1.5


def make_key(path: Path, interval: int = 30, lo: int = 20000, hi: int = 20999, length: int = 4) -> shared.SharedKey:
    key = shared.generate(rotating.Params(interval=interval, length=length, lo=lo, hi=hi, proto="tcp",
                                          exclude=frozenset({62201})))
    shared.write(str(path), key)
    return key


def conf(*doors: tuple[str, str], extra: str = "") -> str:
    out = "[options]\n"
    for name, key_path in doors:
        out += f"""[{name}]
    rotating_key = {key_path}
    seq_timeout = 5
    tcpflags = syn
    open = 22/tcp
    cmd_timeout = {DURATION}
    {extra}
"""
    return out


def sequence(key: shared.SharedKey, door: str, t: float, secret: shared.Secret | None = None):
    c = rotating.counter(t, key.params.interval)
    return rotating.derive((secret or key.newest).secret, door, c, key.params)


def knock_all(lab, seq, source: str = CLIENT_V4) -> None:
    for step in seq:
        knock_from(lab, source, SERVER_V4, step.port, step.proto)


def test_our_client_and_the_real_knock_open_and_a_used_sequence_never_opens_again(lab, tmp_path):
    lab.default_deny("nft")
    key = make_key(tmp_path / "shared.key")
    server = Server(lab, tmp_path, config_text=conf(("rot", "shared.key"), ("rot2", "shared.key")))
    try:
        assert not lab.probe(SERVER_V4)
        r = knock_client(lab, "-v", "--key", str(tmp_path / "shared.key"), SERVER_V4, "rot")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert server.wait_log("rot: OPEN SESAME (rotating key")
        # The same sequence again, from another address, in the same window: refused.
        used = sequence(key, "rot", time.time())
        knock_all(lab, used, source=CLIENT2_V4)
        assert server.wait_log("was already used: refused")
        assert not lab.probe(SERVER_V4, source=CLIENT2_V4)
        # The real knock binary, given what `spa sequence --format knock` prints.
        spa = subprocess.run([sys.executable, "-m", "spa.cli", "sequence", "--key", str(tmp_path / "shared.key"),
                              "rot2", "--format", "knock"], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert spa.returncode == 0, spa.stderr
        r = run_client(lab, "knock", SERVER_V4, *spa.stdout.split())
        assert r.returncode == 0, r.stderr
        assert server.wait_log("rot2: OPEN SESAME (rotating key")
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
    finally:
        server.stop()


def test_two_windows_ago_is_refused_and_a_knock_straddling_a_boundary_opens(lab, tmp_path):
    lab.default_deny("nft")
    key = make_key(tmp_path / "shared.key", interval=5)
    server = Server(lab, tmp_path, config_text=conf(("rot", "shared.key")))
    try:
        knock_all(lab, sequence(key, "rot", time.time() - 10))  # window -2
        assert not server.wait_log("OPEN SESAME", limit=0.5)
        assert not lab.probe(SERVER_V4)
        # Wait until 0.3 s before a boundary, knock half, cross it, knock the rest.
        t = time.time()
        boundary = (rotating.counter(t, 5) + 1) * 5
        if boundary - t < 0.5:
            boundary += 5
        time.sleep(boundary - t - 0.3)
        seq = sequence(key, "rot", time.time())
        knock_all(lab, seq[:2])
        time.sleep(max(0.0, boundary - time.time()) + 0.3)
        assert rotating.counter(time.time(), 5) == rotating.counter(boundary, 5)  # really across it
        knock_all(lab, seq[2:])
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
    finally:
        server.stop()


def test_rotation_both_secrets_open_in_the_grace_then_only_the_new_one(lab, tmp_path):
    lab.default_deny("nft")
    path = tmp_path / "shared.key"
    old = make_key(path)
    shared.rotate(str(path), grace_seconds=3)
    new = shared.load(str(path))
    assert new.secrets[0].key_id == old.newest.key_id and new.newest.key_id != old.newest.key_id
    server = Server(lab, tmp_path, config_text=conf(("a", "shared.key"), ("b", "shared.key")))
    try:
        knock_all(lab, sequence(old, "a", time.time()))  # a client still holding the old file
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        knock_all(lab, sequence(new, "b", time.time()), source=CLIENT2_V4)  # one with the new file
        assert lab.wait_for(True, SERVER_V4, source=CLIENT2_V4, limit=2) is not None
        until = new.secrets[0].until
        assert until is not None
        time.sleep(max(0.0, until - time.time()) + 0.3)
        assert lab.wait_for(False, SERVER_V4, limit=DURATION + 2) is not None
        knock_all(lab, sequence(old, "b", time.time()))  # the old secret after its grace
        assert not server.wait_log("b: OPEN SESAME", limit=0.5, count=2)
        assert not lab.probe(SERVER_V4)
        knock_all(lab, sequence(new, "a", time.time()))
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
    finally:
        server.stop()


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_a_port_scan_of_the_whole_range_never_opens(lab, tmp_path, order):
    lab.default_deny("nft")
    make_key(tmp_path / "shared.key", lo=20000, hi=20199)
    server = Server(lab, tmp_path, config_text=conf(("rot", "shared.key")))
    ports = range(20000, 20200) if order == "ascending" else range(20199, 19999, -1)
    try:
        with in_netns(lab.client):
            socks = []
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((CLIENT_V4, 0))
                s.setblocking(False)
                s.connect_ex((SERVER_V4, port))
                socks.append(s)
                if len(socks) >= 50:
                    for x in socks:
                        x.close()
                    socks = []
            for x in socks:
                x.close()
        assert server.wait_log("Stage 1")  # the scan was seen ...
        assert not server.wait_log("OPEN SESAME", limit=1.0)  # ... and opened nothing
        assert not lab.probe(SERVER_V4)
    finally:
        server.stop()


def test_a_door_binding_the_source_opens_only_for_the_address_it_was_derived_for(lab, tmp_path):
    lab.default_deny("nft")
    key = make_key(tmp_path / "shared.key", lo=20000, hi=20999)
    server = Server(lab, tmp_path, config_text=conf(("bound", "shared.key"), extra="rotating_bind_source = yes"))
    try:
        r = knock_client(lab, "--key", str(tmp_path / "shared.key"), "--bind-source", CLIENT_V4, SERVER_V4, "bound")
        assert r.returncode == 0, r.stderr
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
        assert server.wait_log("bound: OPEN SESAME (rotating key")
        # The sequence derived for .2, knocked from .3: a different sequence there, nothing opens.
        c = rotating.counter(time.time(), key.params.interval)
        seq = rotating.derive(key.newest.secret, "bound", c, key.params, rotating.source_bytes(CLIENT_V4))
        knock_all(lab, seq, source=CLIENT2_V4)
        assert not server.wait_log("OPEN SESAME", limit=0.5, count=2)
        assert not lab.probe(SERVER_V4, source=CLIENT2_V4)
        # Derived for .3 and knocked from .3: opens (its own first use).
        seq3 = rotating.derive(key.newest.secret, "bound", c, key.params, rotating.source_bytes(CLIENT2_V4))
        knock_all(lab, seq3, source=CLIENT2_V4)
        assert lab.wait_for(True, SERVER_V4, source=CLIENT2_V4, limit=2) is not None
        # The unbound sequence for this door never opens it.
        knock_all(lab, rotating.derive(key.newest.secret, "bound", c, key.params), source=CLIENT_V4)
        assert not server.wait_log("OPEN SESAME", limit=0.5, count=3)
    finally:
        server.stop()


def test_a_hundred_doors_with_two_keys_each_still_open(lab, tmp_path):
    # 100 doors x 2 keys x 3 windows x 4 knocks (plus guard ports): a port-by-port kernel filter
    # would pass 4096 instructions and be refused; the daemon summarizes the ports as ranges.
    lab.default_deny("nft")
    a = make_key(tmp_path / "a.key", lo=10000, hi=65000)
    make_key(tmp_path / "b.key", lo=10000, hi=65000)
    doors = "".join(f"""[d{i}]
    rotating_key = a.key, b.key
    seq_timeout = 5
    tcpflags = syn
    open = 22/tcp
    cmd_timeout = {DURATION}
""" for i in range(100))
    server = Server(lab, tmp_path, config_text="[options]\n" + doors, extra=("-D",))
    try:
        assert server.wait_log("capture filter:")
        assert "cannot install the capture filter" not in server.text()
        knock_all(lab, sequence(a, "d57", time.time()))
        assert lab.wait_for(True, SERVER_V4, limit=3) is not None
        assert server.wait_log("d57: OPEN SESAME (rotating key")
    finally:
        server.stop()
