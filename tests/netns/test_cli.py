"""``spa grants``, ``spa grant`` and the daemon's command line, run as an administrator would."""

import os
import subprocess
import sys

import pytest

from spa.server.netns import CLIENT2_V4, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, in_netns

pytestmark = pytest.mark.netns
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spa(lab, *args, module="spa.cli"):
    return subprocess.run(["ip", "netns", "exec", lab.server, sys.executable, "-m", module, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def ruleset(lab):
    with in_netns(lab.server):
        return (subprocess.run(["nft", "-s", "list", "ruleset"], capture_output=True, text=True).stdout,
                subprocess.run(["iptables-legacy", "-S"], capture_output=True, text=True).stdout)


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_grants_lists_and_revokes(lab, tmp_path, backend):
    lab.default_deny("iptables-nft")
    state = str(tmp_path)
    for addr, port in ((CLIENT_V4, "22/tcp"), (CLIENT_V6, "22"), (CLIENT2_V4, "22/tcp")):
        r = spa(lab, "grant", "--backend", backend, "--state-dir", state, "--door", "ssh door",
                "--address", addr, "--port", port, "--port", "2222/udp", "--duration", "60")
        assert r.returncode == 0, r.stderr
    assert lab.probe(SERVER_V4) and lab.probe(SERVER_V6)
    listing = spa(lab, "grants", "--backend", backend, "--state-dir", state)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["DOOR", "ADDRESS", "PORTS", "LEFT"]
    rows = [line for line in lines[1:] if line.startswith("ssh door")]
    assert len(rows) == 3
    assert any(CLIENT_V6 in r and "22/tcp,2222/udp" in r for r in rows)
    left = int(rows[0].split()[-2].rstrip("s"))
    assert 50 <= left <= 60
    r = spa(lab, "grants", "--backend", backend, "--state-dir", state, "--revoke", CLIENT_V4)
    assert r.returncode == 0 and "closed door ssh door for 192.0.2.2" in r.stdout
    assert not lab.probe(SERVER_V4)
    assert lab.probe(SERVER_V4, source=CLIENT2_V4), "other addresses keep their grants"
    again = spa(lab, "grants", "--backend", backend, "--state-dir", state, "--revoke", CLIENT_V4)
    assert again.returncode == 0 and "no grant open" in again.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["grants", "--backend", "bogus"], 3, "unknown firewall backend 'bogus'"),
        (["grant", "--backend", "nft", "--address", "192.0.2.300", "--port", "22"], 2, "invalid address '192.0.2.300'"),
        (["grant", "--backend", "nft", "--address", CLIENT_V4, "--port", "70000"], 2, "port 70000 is out of range"),
        (["grant", "--backend", "nft", "--address", CLIENT_V4, "--port", "22/sctp"], 2, "invalid protocol"),
        (["grant", "--backend", "nft", "--address", CLIENT_V4, "--port", "22", "--duration", "0"], 2, "duration 0"),
        (["grants", "--backend", "nft", "--revoke", "nonsense"], 2, "invalid address 'nonsense'"),
    ],
)
def test_bad_input_names_the_problem_and_leaves_the_firewall_alone(lab, tmp_path, args, code, message):
    lab.default_deny("nft")
    before = ruleset(lab)
    r = spa(lab, *args[:1], "--state-dir", str(tmp_path), *args[1:])
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert ruleset(lab) == before


def test_server_rejects_unknown_backend(lab, tmp_path):
    before = ruleset(lab)
    config = tmp_path / "empty.conf"
    config.write_text("[options]\n")
    r = spa(lab, "-c", str(config), "--backend", "pf", "--state-dir", str(tmp_path), module="spa.server.cli")
    assert r.returncode == 3 and "unknown firewall backend 'pf'" in r.stderr
    assert ruleset(lab) == before
