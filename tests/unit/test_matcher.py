"""Every matching case of knockd's semantics, and every case knockd gets wrong (reference §5)."""

import ipaddress

import pytest

from spa.grant import PortSpec
from spa.knock import ACK, FIN, SYN, Knock, TcpFlags
from spa.matcher import MatchDoor, Matcher

HOST = ipaddress.ip_address("192.0.2.1")
X = ipaddress.ip_address("192.0.2.2")
Y = ipaddress.ip_address("192.0.2.3")
Z6 = ipaddress.ip_address("2001:db8::2")


def door(name, seq, timeout=5.0, flags=None, target=None):
    steps = tuple(PortSpec(int(p.split(":")[0]), (p.split(":") + ["tcp"])[1]) for p in seq.split(","))
    return MatchDoor(name, steps, timeout, flags, target)


class Clock:
    def __init__(self):
        self.t = 100.0
        self.seq = 1000

    def knock(self, src, port, proto="tcp", flags=SYN, dt=0.1, dst=HOST, sport=None, seq=None):
        self.t += dt
        self.seq += 1
        return Knock(src, dst, proto, sport if sport is not None else 40000 + self.seq % 20000, port,
                     flags if proto == "tcp" else 0, self.seq if seq is None else seq, self.t)


def opened(events):
    return [(e.door, str(e.source)) for e in events if e.kind == "open"]


def run(m, knocks):
    out = []
    for k in knocks:
        out += opened(m.feed(k))
    return out


@pytest.fixture
def c():
    return Clock()


def test_simple_sequence_logs_stages_then_opens(c):
    m = Matcher([door("ssh", "7000,8000,9000")])
    events = []
    for p in (7000, 8000, 9000):
        events += m.feed(c.knock(X, p))
    assert [(e.kind, e.stage) for e in events] == [("stage", 1), ("stage", 2), ("stage", 3), ("open", 3)]
    assert len(m) == 0


@pytest.mark.parametrize("order", [0, 1])
def test_doors_sharing_a_first_port_both_open_whatever_the_order(c, order):
    doors = [door("A", "1000,2000,3000"), door("B", "1000,4000,5000")]
    m = Matcher(doors if order == 0 else doors[::-1])
    assert run(m, [c.knock(X, p) for p in (1000, 4000, 5000)]) == [("B", "192.0.2.2")]
    assert run(m, [c.knock(X, p) for p in (1000, 2000, 3000)]) == [("A", "192.0.2.2")]


@pytest.mark.parametrize("order", [0, 1])
def test_prefix_doors_all_open_whatever_the_order(c, order):
    doors = [door("short", "1000,2000"), door("long", "1000,2000,3000")]
    m = Matcher(doors if order == 0 else doors[::-1])
    assert run(m, [c.knock(X, p) for p in (1000, 2000, 3000)]) == [("short", "192.0.2.2"), ("long", "192.0.2.2")]


def test_interleaved_clients_both_open(c):
    m = Matcher([door("ssh", "7000,8000,9000")])
    ks = [c.knock(X, 7000), c.knock(Y, 7000), c.knock(X, 8000), c.knock(X, 9000), c.knock(Y, 8000), c.knock(Y, 9000)]
    assert run(m, ks) == [("ssh", "192.0.2.2"), ("ssh", "192.0.2.3")]


def test_stray_first_port_hits_from_other_hosts_never_disturb(c):
    m = Matcher([door("ssh", "7000,8000,9000", timeout=1.0)])
    ks = [c.knock(Y, 7000, dt=0.0), c.knock(X, 7000, dt=0.5)]
    ks += [c.knock(ipaddress.ip_address(f"198.51.100.{i}"), 7000, dt=0.001) for i in range(1, 200)]
    ks += [c.knock(Y, 9000, dt=0.0)]  # Y invalidates its own attempt mid-way through X
    ks += [c.knock(X, 8000, dt=0.4)]  # Y's attempt would have expired by now as well
    ks += [c.knock(X, 9000, dt=0.05)]
    assert run(m, ks) == [("ssh", "192.0.2.2")]


def test_expiry_of_another_hosts_attempt_never_disturbs(c):
    m = Matcher([door("ssh", "7000,8000,9000", timeout=1.0)])
    assert run(m, [c.knock(Y, 7000, dt=0.0), c.knock(X, 7000, dt=0.5), c.knock(X, 8000, dt=0.6)]) == []
    assert [(e.kind, str(e.source)) for e in m.expire(c.t)] == [("timeout", "192.0.2.3")]
    assert run(m, [c.knock(X, 9000, dt=0.1)]) == [("ssh", "192.0.2.2")]


def test_wrong_port_resets_and_may_start_a_new_attempt(c):
    m = Matcher([door("ssh", "7000,8000,9000")])
    events = m.feed(c.knock(X, 7000)) + m.feed(c.knock(X, 9000))
    assert [(e.kind, e.stage) for e in events] == [("stage", 1), ("reset", 1)]
    # 7000 7000 8000 9000: the second 7000 resets, then starts over, and the sequence completes.
    assert run(m, [c.knock(X, p) for p in (7000, 7000, 8000, 9000)]) == [("ssh", "192.0.2.2")]


def test_repeated_ports_in_a_sequence(c):
    m = Matcher([door("seed", "2222,2222,4444")])  # the seed article's knock
    assert run(m, [c.knock(X, p) for p in (2222, 2222, 4444)]) == [("seed", "192.0.2.2")]


def test_retransmitted_syn_counts_once(c):
    m = Matcher([door("ssh", "7000,8000,9000")])
    first = c.knock(X, 7000)
    again = Knock(first.src, first.dst, "tcp", first.sport, 7000, SYN, first.seq, first.time + 1.0)
    second = c.knock(X, 8000, dt=1.1)
    again2 = Knock(second.src, second.dst, "tcp", second.sport, 8000, SYN, second.seq, second.time + 0.2)
    assert run(m, [first, again, second, again2, c.knock(X, 9000, dt=0.3)]) == [("ssh", "192.0.2.2")]


def test_seq_timeout_from_the_first_knock_with_sub_second_precision(c):
    m = Matcher([door("ssh", "7000,8000,9000", timeout=1.5)])
    assert run(m, [c.knock(X, 7000), c.knock(X, 8000, dt=0.7), c.knock(X, 9000, dt=0.79)]) == [("ssh", "192.0.2.2")]
    ev = m.feed(c.knock(X, 7000)) + m.feed(c.knock(X, 8000, dt=0.7)) + m.feed(c.knock(X, 9000, dt=0.81))
    assert [(e.kind, e.stage) for e in ev] == [("stage", 1), ("stage", 2), ("timeout", 2)]


def test_expire_sweeps_for_the_log_and_memory(c):
    m = Matcher([door("fast", "7000,8000", timeout=1.0), door("slow", "7000,9000", timeout=10.0)])
    m.feed(c.knock(X, 7000))
    assert len(m) == 2
    ev = m.expire(c.t + 1.5)
    assert [(e.kind, e.door) for e in ev] == [("timeout", "fast")] and len(m) == 1
    assert m.expire(c.t + 11)[0].door == "slow" and len(m) == 0


def test_tcpflags_mismatch_is_ignored_not_reset(c):
    m = Matcher([door("fin", "7000,8000", flags=TcpFlags(FIN, ACK))])
    ks = [c.knock(X, 7000, flags=FIN), c.knock(X, 8000, flags=SYN), c.knock(X, 8000, flags=FIN | ACK),
          c.knock(X, 8000, flags=FIN)]
    assert run(m, ks) == [("fin", "192.0.2.2")]
    assert run(m, [c.knock(Y, 7000, flags=SYN), c.knock(Y, 8000, flags=FIN)]) == []


def test_without_tcpflags_any_tcp_packet_counts(c):
    m = Matcher([door("any", "7000,8000")])
    assert run(m, [c.knock(X, 7000, flags=ACK), c.knock(X, 8000, flags=FIN)]) == [("any", "192.0.2.2")]


def test_protocol_is_part_of_the_step(c):
    m = Matcher([door("mixed", "2222:udp,3333:tcp,4444:udp")])
    assert run(m, [c.knock(X, 2222, "tcp"), c.knock(X, 3333), c.knock(X, 4444, "udp")]) == []
    assert run(m, [c.knock(X, 2222, "udp"), c.knock(X, 3333), c.knock(X, 4444, "udp")]) == [("mixed", "192.0.2.2")]


def test_ports_outside_every_sequence_are_invisible(c):
    m = Matcher([door("ssh", "7000,8000")])
    assert m.feed(c.knock(X, 7000)) and m.feed(c.knock(X, 22)) == []
    assert run(m, [c.knock(X, 8000)]) == [("ssh", "192.0.2.2")]


def test_one_port_door_fires_on_each_hit(c):
    m = Matcher([door("one", "5000:udp")])
    assert run(m, [c.knock(X, 5000, "udp"), c.knock(X, 5000, "udp")]) == [("one", "192.0.2.2")] * 2


def test_target_and_local_addresses(c):
    vip = ipaddress.ip_address("198.51.100.10")
    m = Matcher([door("vip", "7000,8000", target=vip), door("host", "7000,9000")], local_addresses=[HOST])
    assert run(m, [c.knock(X, 7000, dst=vip), c.knock(X, 8000, dst=vip)]) == [("vip", "192.0.2.2")]
    assert run(m, [c.knock(X, 7000), c.knock(X, 8000)]) == []
    assert run(m, [c.knock(X, 7000, dst=vip), c.knock(X, 9000, dst=vip)]) == []
    assert run(m, [c.knock(X, 7000), c.knock(X, 9000)]) == [("host", "192.0.2.2")]


def test_ipv6_sources(c):
    m = Matcher([door("ssh", "7000,8000")], local_addresses=None)
    assert run(m, [c.knock(Z6, 7000, dst=ipaddress.ip_address("2001:db8::1")),
                   c.knock(Z6, 8000, dst=ipaddress.ip_address("2001:db8::1"))]) == [("ssh", "2001:db8::2")]


def test_attempts_are_capped_oldest_first(c):
    m = Matcher([door("ssh", "7000,8000,9000", timeout=600)], max_attempts=100)
    m.feed(c.knock(X, 7000))
    for i in range(150):
        m.feed(c.knock(ipaddress.ip_address(f"198.51.{i // 250}.{i % 250 + 1}"), 7000, dt=0.0001))
    assert len(m) == 100 and m.evictions == 51
    assert run(m, [c.knock(X, 8000), c.knock(X, 9000)]) == [], "the oldest attempt went first"
    young = ipaddress.ip_address("198.51.0.150")
    assert run(m, [c.knock(young, 8000), c.knock(young, 9000)]) == [("ssh", "198.51.0.150")]


def test_set_doors_keeps_attempts_of_unchanged_doors(c):
    a, b = door("a", "7000,8000,9000"), door("b", "7000,8001,9001")
    m = Matcher([a, b])
    m.feed(c.knock(X, 7000))
    m.set_doors([a, door("b", "7000,8002,9002")])
    assert len(m) == 1
    assert run(m, [c.knock(X, 8000), c.knock(X, 9000)]) == [("a", "192.0.2.2")]
    assert m.steps == {("tcp", 7000), ("tcp", 8000), ("tcp", 9000), ("tcp", 8002), ("tcp", 9002)}
