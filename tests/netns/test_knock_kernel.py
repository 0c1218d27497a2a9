"""spa.server.knock_kernel: door ids, local addresses, events and their budget, on the real kernel.

Packets go through the loaded program with ``BPF_PROG_TEST_RUN`` (the live
sockets are covered by the daemon tests in namespaces). Needs root.
"""

from __future__ import annotations

import ipaddress
import time

import pytest

from spa import knock_program as KP
from spa.grant import PortSpec
from spa.knock import key_of
from spa.matcher import MatchDoor
from spa.server import knock_kernel
from spa.server.knock_kernel import KernelMatcher, unsuitable
from tests.rawip import ipv4, tcp, udp

pytestmark = pytest.mark.netns

HERE = ipaddress.IPv4Address("192.0.2.1")
SSH = MatchDoor("ssh", (PortSpec(7000), PortSpec(8000), PortSpec(9000)), 5.0)
UDP_DOOR = MatchDoor("dns", (PortSpec(5001, "udp"), PortSpec(5002, "udp")), 5.0)


@pytest.fixture
def km():
    k = KernelMatcher(max_attempts=1024)
    try:
        k.set_local([HERE])
        yield k
    finally:
        k.close()


def knock(k: KernelMatcher, src: str, port: int, proto: str = "tcp", sport: int = 40000) -> None:
    l4 = tcp(sport, port) if proto == "tcp" else udp(sport, port)
    assert k.program is not None
    assert k.program.test_run_ip(ipv4(6 if proto == "tcp" else 17, l4, src, str(HERE))) == 0


def test_a_sequence_gives_its_stages_then_the_open_with_packet_times(km):
    assert km.set_doors([SSH])
    before = time.monotonic()
    for i, p in enumerate((7000, 8000, 9000)):
        knock(km, "198.51.100.5", p, sport=40000 + i)
    got = km.read()
    skey = key_of(ipaddress.ip_address("198.51.100.5"))
    assert [tuple(e) for _, e in got] == [("stage", "ssh", skey, 1), ("stage", "ssh", skey, 2),
                                          ("stage", "ssh", skey, 3), ("open", "ssh", skey, 3)]
    assert all(before <= t <= time.monotonic() for t, _ in got)  # CLOCK_MONOTONIC, as the capture's times
    counts = km.counts()
    assert counts["packets"] == 3 and counts["stage"] == 3 and counts["open"] == 1
    assert km.read() == []


def test_door_ids_follow_definitions(km):
    assert km.set_doors([SSH, UDP_DOOR])
    assert not km.set_doors([SSH, UDP_DOOR])  # nothing changed: the same program
    knock(km, "198.51.100.6", 7000)
    knock(km, "198.51.100.16", 5001, "udp")  # another source: one knock-port packet resets a source's attempts
    # A reload that changes dns but not ssh: ssh's attempt goes on, dns's is forgotten.
    changed = MatchDoor("dns", (PortSpec(5001, "udp"), PortSpec(5003, "udp")), 5.0)
    assert km.set_doors([SSH, changed])
    km.read()
    knock(km, "198.51.100.6", 8000, sport=40001)
    knock(km, "198.51.100.16", 5003, "udp", sport=40002)
    skey = key_of(ipaddress.ip_address("198.51.100.6"))
    assert [tuple(e) for _, e in km.read()] == [("stage", "ssh", skey, 2)]  # 5003 alone: no dns attempt to advance


def test_local_addresses_decide_what_a_door_without_target_sees(km):
    km.set_doors([UDP_DOOR])
    km.set_local([ipaddress.IPv4Address("192.0.2.77")])
    knock(km, "198.51.100.7", 5001, "udp")
    assert km.read() == [] and km.counts()["packets"] == 0  # not to us: not even counted
    km.set_local([HERE])
    knock(km, "198.51.100.7", 5001, "udp")
    assert [e.kind for _, e in km.read()] == ["stage"]
    assert list(km.local.keys()) == [KP.local_key(HERE)]


def test_notes_past_the_budget_are_skipped_and_counted_opens_never(km, monkeypatch):
    monkeypatch.setattr(knock_kernel, "NOTES_PER_SECOND", 5)
    km._notes_budget = 5.0
    km.set_doors([SSH, MatchDoor("one", (PortSpec(6000),), 5.0)])
    for i in range(20):
        knock(km, f"198.51.100.{10 + i}", 7000)  # 20 stage notes
    knock(km, "198.51.100.99", 6000)  # a one-step door: a stage note and an open
    got = km.read(now=km._budget_at)
    kinds = [e.kind for _, e in got]
    assert kinds.count("stage") == 5 and kinds.count("open") == 1
    assert km.take_skipped() == 21 - 5 and km.take_skipped() == 0
    assert km.counts()["stage"] == 21  # the kernel's totals count every event


def test_unsuitable_configurations_say_why():
    assert unsuitable([SSH], source_bound=False, spa_port_knocked=False) is None
    assert "source" in unsuitable([SSH], source_bound=True, spa_port_knocked=False)
    assert "SPA port" in unsuitable([SSH], source_bound=False, spa_port_knocked=True)
    assert "no door" in unsuitable([], source_bound=False, spa_port_knocked=False)
    many = [MatchDoor(f"d{i}", (PortSpec(10000 + i),), 5.0) for i in range(knock_kernel.MAX_DOORS + 1)]
    assert "takes up to 32" in unsuitable(many, source_bound=False, spa_port_knocked=False)
    assert unsuitable(many[:-1], source_bound=False, spa_port_knocked=False) is None
    # With rotating doors the program is loaded again at each window: fewer doors.
    rotating = many[:knock_kernel.MAX_ROTATING_DOORS + 1]
    assert "window boundary" in unsuitable(rotating, source_bound=False, spa_port_knocked=False, rotating=True)
    assert unsuitable(rotating[:-1], source_bound=False, spa_port_knocked=False, rotating=True) is None


def test_the_most_doors_it_takes_load(km):
    doors = [MatchDoor(f"d{i}", (PortSpec(10000 + 3 * i), PortSpec(10001 + 3 * i, "udp"), PortSpec(10002 + 3 * i)),
                       5.0, guards=(PortSpec(20000 + i),)) for i in range(knock_kernel.MAX_DOORS)]
    assert km.set_doors(doors)
    assert sorted(km.slots.values()) == list(range(knock_kernel.MAX_DOORS))
    for i in (15, 31):
        knock(km, "198.51.100.60", 10000 + 3 * i)
        knock(km, "198.51.100.60", 10001 + 3 * i, "udp")
        knock(km, "198.51.100.60", 10002 + 3 * i)
        assert [(e.kind, e.door, e.stage) for _, e in km.read()] == [
            ("stage", f"d{i}", 1), ("stage", f"d{i}", 2), ("stage", f"d{i}", 3), ("open", f"d{i}", 3)]


def test_a_door_keeps_its_slot_and_its_attempts_when_doors_come_and_go(km):
    """Slots (bits in a source's active record) stay with a door's id: its attempts are still found after
    doors are added in front of it or removed; a retired door's slot goes to a new door."""
    a = MatchDoor("a", (PortSpec(7000), PortSpec(8000), PortSpec(9000)), 5.0)
    b = MatchDoor("b", (PortSpec(7100), PortSpec(7200)), 5.0)
    assert km.set_doors([b, a])
    slot_a = km.slots[next(i for i, n in km.names.items() if n == "a")]
    knock(km, "198.51.100.70", 7000)
    extra = [MatchDoor(f"x{i}", (PortSpec(11000 + i), PortSpec(12000 + i)), 5.0) for i in range(5)]
    assert km.set_doors([*extra, a])  # b retired, five new doors in front of a
    assert km.slots[next(i for i, n in km.names.items() if n == "a" and i in km.slots)] == slot_a
    assert len(set(km.slots.values())) == 6
    knock(km, "198.51.100.70", 8000)
    knock(km, "198.51.100.70", 9000)
    skey = key_of(ipaddress.ip_address("198.51.100.70"))
    assert [tuple(e) for _, e in km.read()] == [("stage", "a", skey, 1), ("stage", "a", skey, 2),
                                               ("stage", "a", skey, 3), ("open", "a", skey, 3)]
    assert list(km.active.keys()) == []  # the source has no attempt left: its entry went with the open


def test_an_attempt_the_sweep_took_leaves_a_bit_that_clears_on_the_next_packet(km):
    short = MatchDoor("short", (PortSpec(7100), PortSpec(7200), PortSpec(7300)), 0.05)
    assert km.set_doors([short])
    knock(km, "198.51.100.71", 7100)
    km.read()
    assert len(list(km.active.keys())) == 1
    [(_, e)] = km.expire(now=time.monotonic() + 1.0)
    assert e.kind == "timeout" and list(km.attempts.keys()) == [] and len(list(km.active.keys())) == 1
    knock(km, "198.51.100.71", 7200)  # not the first step, and no attempt: nothing, as the Python matcher
    assert km.read() == [] and list(km.active.keys()) == []  # the stale bit cleared, and the entry with it


def test_the_sweep_reports_attempts_that_stopped_and_keeps_the_others(km):
    short = MatchDoor("short", (PortSpec(7100), PortSpec(7200)), 0.05)
    assert km.set_doors([short, SSH])
    knock(km, "198.51.100.40", 7100)
    knock(km, "198.51.100.41", 7000)
    km.read()
    t = time.monotonic()
    assert km.expire(now=t) == [] and km.attempts_seen == 2  # nothing expired yet; a whole pass counted
    got = km.expire(now=t + 1.0)
    skey = key_of(ipaddress.ip_address("198.51.100.40"))
    assert [e for _, e in got] == [("timeout", "short", skey, 1)]
    assert len(list(km.attempts.keys())) == 1  # ssh's 5 s attempt stays
    # A door that changed: its attempts go without a word.
    assert km.set_doors([short, MatchDoor("ssh", (PortSpec(7000), PortSpec(9999)), 5.0)])
    assert km.expire(now=t + 1.0) == [] and list(km.attempts.keys()) == []


def test_the_sweep_goes_on_where_it_stopped(km):
    km.set_doors([MatchDoor("short", (PortSpec(7100), PortSpec(7200)), 0.05)])
    for i in range(10):
        knock(km, f"198.51.100.{50 + i}", 7100)
    later = time.monotonic() + 1.0
    seen = [km.expire(now=later, budget=3) for _ in range(4)]
    assert [len(s) for s in seen] == [3, 3, 3, 1]
    assert len({e.key for s in seen for _, e in s}) == 10


def test_a_spoofed_flood_is_matched_in_the_kernel_and_the_client_gets_in(lab, tmp_path):
    """The daemon with the kernel matcher, real packets: 3 000 spoofed SYNs on the sequence ports
    (126 sources, each always on the same port: no spoofed open), then the real knock client.
    The kernel counts every packet, the client's door opens, and nothing else does."""
    import json
    import socket

    from spa.metrics import parse
    from spa.server.netns import SERVER_V4, in_netns
    from tests.netns.knockd_helpers import Server, knock_client
    from tests.rawip import SYN

    lab.default_deny("nft")
    server = Server(lab, tmp_path, "[ssh]\n    sequence = 7000,8000,9000\n    seq_timeout = 5\n    tcpflags = syn\n"
                                   "    open = 22/tcp\n    cmd_timeout = 30\n", extra=("--knock-matcher", "kernel"))
    state = tmp_path / "state"
    flood = 3000
    try:
        assert "knock matching in the kernel" in server.text(), server.text()
        with in_netns(lab.client):
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            for i in range(flood):  # bounded; to the server namespace only
                packet = ipv4(6, tcp(40000 + i % 1000, (7000, 8000, 9000)[i % 3], SYN, seq=i),
                              f"198.51.100.{i % 126 + 1}", SERVER_V4)
                raw.sendto(packet, (SERVER_V4, 0))
        finally:
            raw.close()
        assert knock_client(lab, SERVER_V4, "7000", "8000", "9000").returncode == 0
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None, server.output()
        assert server.wait_log("192.0.2.2: ssh: OPEN SESAME")
        deadline, m = time.monotonic() + 8, {}
        while time.monotonic() < deadline:
            try:
                m = parse((state / "metrics.prom").read_text())
            except FileNotFoundError:
                m = {}
            if m.get('spa_packets_total{result="parsed"}', 0) >= flood + 3:
                break
            time.sleep(0.2)
        assert m.get('spa_packets_total{result="parsed"}') == flood + 3, m
        assert m['spa_knock_events_total{kind="open"}'] == 1  # the client's, no spoofed one
        # Every third packet is on 7000 (from the 42 sources that only ever knock there): it starts an attempt,
        # or resets and restarts its source's; 8000 and 9000 from sources without an attempt do nothing.
        assert m['spa_knock_events_total{kind="stage"}'] == flood // 3 + 3
        assert m['spa_knock_events_total{kind="reset"}'] == flood // 3 - 42
        status = json.loads((state / "status.json").read_text())
        assert status["knock_matcher"] == "kernel"
        assert "198.51.100." not in server.text().split("OPEN SESAME")[-1].split("\n", 1)[0]
    finally:
        server.stop()


def test_reloads_move_matching_between_kernel_and_user_space(lab, tmp_path):
    """SIGHUP to more doors than the kernel matcher takes, then back: each side opens the door in turn."""
    import signal

    from spa.server.netns import SERVER_V4
    from tests.netns.knockd_helpers import Server, knock_client

    def config(doors: int) -> str:
        extra = "".join(f"[d{i}]\n    sequence = {20000 + 3 * i},{20001 + 3 * i},{20002 + 3 * i}\n"
                        "    open = 22/tcp\n    cmd_timeout = 30\n" for i in range(doors - 1))
        return "[ssh]\n    sequence = 7000,8000,9000\n    seq_timeout = 5\n    open = 22/tcp\n    cmd_timeout = 1\n" + extra

    lab.default_deny("nft")
    server = Server(lab, tmp_path, config(1), extra=("--knock-matcher", "auto"))
    try:
        for doors, where in ((knock_kernel.MAX_DOORS + 1, "knock matching in user space"),
                             (1, "knock matching in the kernel")):
            server.config.write_text(config(doors))
            server.signal(signal.SIGHUP)
            assert server.wait_log(where, count=2 if doors == 1 else 1), server.text()
            assert lab.wait_for(False, SERVER_V4, limit=3) is not None  # the last grant (1 s) is over
            opens = server.text().count("ssh: OPEN SESAME")
            assert knock_client(lab, SERVER_V4, "7000", "8000", "9000").returncode == 0
            assert lab.wait_for(True, SERVER_V4, limit=2) is not None, server.text()
            assert server.wait_log("ssh: OPEN SESAME", count=opens + 1), server.text()
    finally:
        server.stop()


def test_the_units_capabilities_are_enough_and_needed():
    """The systemd unit keeps CAP_NET_ADMIN, CAP_NET_RAW and CAP_BPF: with exactly those the knock matcher
    and the SPA screen load and attach; without CAP_BPF the daemon is told why (and falls back)."""
    import subprocess
    import sys

    probe = ("import socket\n"
             "from spa.server import ebpf\n"
             "from spa.server.knock_kernel import KernelMatcher\n"
             "from spa.matcher import MatchDoor\n"
             "from spa.grant import PortSpec\n"
             "why = ebpf.available()\n"
             "if why: print('refused:', why); raise SystemExit(0)\n"
             "k = KernelMatcher()\n"
             "k.set_doors([MatchDoor('a', (PortSpec(7000), PortSpec(8000)), 5.0)])\n"
             "s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)\n"
             "ebpf.attach(s, k.program)\n"
             "from spa.server.spa_kernel import SpaScreen\n"
             "screen = SpaScreen(62201)\n"
             "screen.set_hints({bytes(8): bytes(32)})\n"
             "screen.refuse([bytes(24)])\n"
             "ebpf.attach(s, screen.program)\n"
             "print('loaded and attached')\n")

    def run(caps: str) -> str:
        r = subprocess.run(["setpriv", f"--bounding-set=-all,{caps}", sys.executable, "-c", probe],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert run("+net_admin,+net_raw,+bpf").strip() == "loaded and attached"
    assert "refused: bpf() not permitted" in run("+net_admin,+net_raw")


def test_the_sweep_works_without_lookup_and_delete(km, monkeypatch):
    """Kernels before 5.14 have no lookup-and-delete on hash maps: the sweep deletes in two steps."""
    from spa.server import ebpf

    def refuse(key):
        raise ebpf.BpfError("lookup and delete: Invalid argument", 22)

    monkeypatch.setattr(km.attempts, "lookup_and_delete", refuse)
    km.set_doors([MatchDoor("short", (PortSpec(7100), PortSpec(7200)), 0.05)])
    knock(km, "198.51.100.70", 7100)
    got = km.expire(now=time.monotonic() + 1.0)
    assert [e.kind for _, e in got] == ["timeout"] and list(km.attempts.keys()) == []


def test_a_ring_that_cannot_be_read_is_skipped_not_raised(km, monkeypatch):
    from spa.server import ebpf

    def broken(most):
        raise ebpf.BpfError("ring buffer record at 0 (4096 bytes) runs past the producer position 48")

    km.set_doors([SSH])
    knock(km, "198.51.100.71", 7000)
    monkeypatch.setattr(km.notes, "read", broken)
    assert km.read() == []  # logged, skipped
    monkeypatch.undo()
    knock(km, "198.51.100.71", 7000, sport=40001)
    assert [e.kind for _, e in km.read()] == ["reset", "stage"]


def test_with_rotating_doors_the_program_does_without_active_bits(km):
    """Loaded again at every window boundary, the program for a configuration with rotating doors is the
    one the kernel checks fastest: every door's attempt looked up, no active bits kept."""
    assert km.set_doors([SSH], rotating=True)
    knock(km, "198.51.100.72", 7000)
    assert [e.kind for _, e in km.read()] == ["stage"] and list(km.active.keys()) == []
    assert not km.set_doors([SSH], rotating=True)  # nothing changed
    assert km.set_doors([SSH])  # the other kind of program
    knock(km, "198.51.100.73", 7000)
    assert [e.kind for _, e in km.read()] == ["stage"] and len(list(km.active.keys())) == 1
