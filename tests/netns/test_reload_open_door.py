"""SIGHUP while a grant is open, for a door the new file no longer has.

What an administrator expects, and what is tested here:

- The grant already open keeps its deadline and closes on time. The journal
  owns it, not the configuration: removing the door neither closes it early
  nor leaves it open for good.
- The removed door's sequence opens nothing after the reload, and the kernel
  filter no longer even passes its ports to the daemon.
- A reload with a broken file (one bad line) keeps the old configuration
  running and logs the error as file:line.
"""

import signal
import time

import pytest

from spa.server.netns import CLIENT2_V4, SERVER_V4, in_netns, sh
from tests.netns.knockd_helpers import Server, knock_client, knock_from

pytestmark = pytest.mark.netns

DURATION = 2.0

BOTH = f"""[options]
[ssh]
    sequence    = 7000,8000,9000
    seq_timeout = 5
    tcpflags    = syn
    open        = 22/tcp
    cmd_timeout = {DURATION:g}

[web]
    sequence    = 7100,8100,9100
    seq_timeout = 5
    tcpflags    = syn
    open        = 80/tcp
    cmd_timeout = 30
"""

WITHOUT_SSH = """[options]
[web]
    sequence    = 7100,8100,9100
    seq_timeout = 5
    tcpflags    = syn
    open        = 80/tcp
    cmd_timeout = 30
"""


def nft_ruleset(lab) -> str:
    with in_netns(lab.server):
        return sh("nft", "list", "table", "inet", "spa", check=False).stdout


def test_removed_door_grant_closes_on_time_and_its_sequence_is_dead(lab, tmp_path):
    lab.default_deny("nft")
    lab.listen(80)
    server = Server(lab, tmp_path, BOTH)
    try:
        assert not lab.probe(SERVER_V4)
        assert knock_client(lab, SERVER_V4, "7000", "8000", "9000").returncode == 0
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None, server.output()
        opened = time.monotonic()
        assert server.wait_log("192.0.2.2: ssh: OPEN SESAME")

        server.config.write_text(WITHOUT_SSH)
        server.signal(signal.SIGHUP)
        assert server.wait_log("re-reading config file")
        time.sleep(0.3)  # the reload is done on the capture loop; give it a moment
        assert "new configuration rejected" not in server.output()
        assert server.proc.poll() is None

        # 1. The grant opened before the reload is still open (not closed early) ...
        assert lab.probe(SERVER_V4), "a reload must not close a grant early, even for a removed door"
        # ... and closes at its deadline (DURATION after the open), with the door gone from the config.
        waited = lab.wait_for(False, SERVER_V4, limit=DURATION + 3)
        assert waited is not None, "the removed door's grant never closed:\n" + server.output()
        closed_after = time.monotonic() - opened
        assert closed_after < DURATION + 1.5, f"closed {closed_after:.2f} s after opening (cmd_timeout {DURATION})"
        assert server.wait_log("closed door 'ssh' for 192.0.2.2", limit=2) or "ssh" not in nft_ruleset(lab), \
            server.output()

        # 2. The removed door's sequence opens nothing any more, from any address.
        for source in (None, CLIENT2_V4):
            if source is None:
                knock_client(lab, SERVER_V4, "7000", "8000", "9000")
            else:
                for p in (7000, 8000, 9000):
                    knock_from(lab, source, SERVER_V4, p)
            time.sleep(0.5)
            assert not lab.probe(SERVER_V4, source=source), f"the removed door opened for {source or 'the client'}"
        assert server.text().count("ssh: OPEN SESAME") == 1, server.output()
        assert "ssh: Stage" not in server.text().split("re-reading config file", 1)[1], \
            "knocks on the removed door's ports still reach the matcher"

        # 3. The door that stayed still works after the reload.
        knock_client(lab, SERVER_V4, "7100", "8100", "9100")
        assert lab.wait_for(True, SERVER_V4, port=80, limit=2) is not None, server.output()
    finally:
        server.stop()


def test_broken_reload_keeps_the_old_config_and_names_file_and_line(lab, tmp_path):
    lab.default_deny("nft")
    server = Server(lab, tmp_path, BOTH)
    try:
        assert knock_client(lab, SERVER_V4, "7000", "8000", "9000").returncode == 0
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None, server.output()

        broken = WITHOUT_SSH + "    this line has no equals sign\n"
        bad_line = broken.count("\n")  # the last line
        server.config.write_text(broken)
        server.signal(signal.SIGHUP)
        assert server.wait_log("new configuration rejected, the old one keeps running")
        assert server.wait_log(f"{server.config}:{bad_line}: line has no '='"), server.output()
        assert server.proc.poll() is None

        # The old configuration runs: the ssh door (absent from the broken file) still opens, on time.
        assert lab.wait_for(False, SERVER_V4, limit=DURATION + 3) is not None
        knock_from(lab, CLIENT2_V4, SERVER_V4, 7000)
        knock_from(lab, CLIENT2_V4, SERVER_V4, 8000)
        knock_from(lab, CLIENT2_V4, SERVER_V4, 9000)
        assert lab.wait_for(True, SERVER_V4, limit=2, source=CLIENT2_V4) is not None, server.output()
        assert lab.wait_for(False, SERVER_V4, limit=DURATION + 3, source=CLIENT2_V4) is not None
    finally:
        server.stop()


def test_a_reload_that_changes_interface_captures_on_the_new_one(lab, tmp_path):
    lab.default_deny("nft")
    door = """[ssh]
    sequence    = 7000,8000,9000
    seq_timeout = 5
    tcpflags    = syn
    open        = 22/tcp
    cmd_timeout = 2
"""
    server = Server(lab, tmp_path, "[options]\n    Interface = lo\n" + door, interface=None)  # no -i: the file decides
    try:
        knock_client(lab, SERVER_V4, "7000", "8000", "9000")
        assert not server.wait_log("OPEN SESAME", limit=0.5)  # deaf on veth0, as configured
        server.config.write_text("[options]\n    Interface = veth0\n" + door)
        server.signal(signal.SIGHUP)
        assert server.wait_log("now listening on veth0 (was lo)")
        knock_client(lab, SERVER_V4, "7000", "8000", "9000")
        assert lab.wait_for(True, SERVER_V4, limit=2) is not None
    finally:
        server.stop()
