"""A door completed again by the same source soon after it opened: counted, not acted on, not logged.

The daemon is built for real; its edges are fakes: a capture whose ``read``
hands over the packets under test and a grant manager that records what it
is handed. No socket is read and no firewall touched.
"""

from __future__ import annotations

import ipaddress
import logging

import pytest

from spa.config import parse_config
from spa.server.daemon import REPEAT_SHARE, Daemon, Runtime, Settings
from tests.daemon_fakes import FakeCapture, FakeManager
from tests.rawip import SYN, TCP, ipv4, tcp

HERE = ipaddress.ip_address("192.0.2.1")
CONF = """
[options]
[long]
    Sequence = 7000,8000,9000
    Open = 22/tcp
    Cmd_Timeout = 30
[short]
    Sequence = 7100,8100,9100
    Open = 22/tcp
    Cmd_Timeout = 5
[oneshot]
    Sequence = 7200,8200,9200
    Start_Command = true %IP%
"""


@pytest.fixture
def daemon():
    config = parse_config(CONF, "/nonexistent/knockd.conf")
    d = Daemon(Settings(), Runtime(config, {x.name: x for x in config.doors}, {}, None, ()), FakeManager())
    d.capture = FakeCapture()
    d.matcher.local_addresses = frozenset({HERE})
    yield d
    d.capture = None
    d.close()


def _knock(d: Daemon, src: str, ports: tuple[int, ...], t: float, seq0: int = 0) -> None:
    d.capture.packets = [(ipv4(TCP, tcp(40000, p, SYN, seq=seq0 + i), src=src, dst=str(HERE)), t)
                         for i, p in enumerate(ports)]
    d._read(d.capture.sock)


def test_a_repeat_within_the_holdoff_is_counted_not_granted_nor_logged(daemon, caplog):
    caplog.set_level(logging.INFO)
    seq = (7000, 8000, 9000)
    holdoff = 30 * REPEAT_SHARE  # [long] lasts 30 s: a re-knock within 3 s would move its deadline by less
    _knock(daemon, "198.51.100.7", seq, 100.0)
    _knock(daemon, "198.51.100.7", seq, 100.0 + holdoff * 0.9, seq0=10)
    assert [str(g.address) for g, _ in daemon.manager.submitted] == ["198.51.100.7"]
    assert daemon.stats["opens_repeated"] == 1 and daemon.event_counts["open"] == 2
    assert caplog.text.count("OPEN SESAME") == 1
    # Another source is another open; the same source after the holdoff opens again.
    _knock(daemon, "198.51.100.8", seq, 100.0 + holdoff * 0.9, seq0=20)
    _knock(daemon, "198.51.100.7", seq, 100.0 + holdoff * 1.1, seq0=30)
    assert [str(g.address) for g, _ in daemon.manager.submitted] == ["198.51.100.7", "198.51.100.8", "198.51.100.7"]
    # The third extends a grant with most of its 30 s left: it may wait for the grant worker's next batch.
    assert daemon.manager.deferred == [False, False, True]
    assert caplog.text.count("OPEN SESAME") == 3
    daemon._tick()
    assert "1 repeated open(s) not acted on" in caplog.text


def test_short_grants_and_one_shot_commands_act_on_every_open(daemon):
    """A grant shorter than REPEAT_MIN_DURATION could close within the holdoff; knockd runs a
    command with no stop command at every open."""
    for ports in ((7100, 8100, 9100), (7200, 8200, 9200)):
        _knock(daemon, "198.51.100.9", ports, 200.0)
        _knock(daemon, "198.51.100.9", ports, 200.1, seq0=10)
    assert [g.door for g, _ in daemon.manager.submitted] == ["short", "short", "oneshot", "oneshot"]
    assert daemon.stats["opens_repeated"] == 0


def test_the_record_of_last_opens_stays_bounded(daemon):
    """A flood of completions from ever-new sources cannot grow the holdoff record past its bound."""
    seq = (7000, 8000, 9000)
    for i in range(3):
        _knock(daemon, f"198.51.100.{i + 1}", seq, 300.0)
    daemon._last_open.update({("long", k): 300.0 for k in range(65536)})  # as if that many had opened
    _knock(daemon, "198.51.100.50", seq, 300.5)
    assert len(daemon._last_open) <= 1 and len(daemon.manager.submitted) == 4
