from click.testing import CliRunner

from spa.checks import check
from spa.cli import main
from spa.config import parse_config
from spa.grant import PortSpec


def findings(text, listening=()):
    return [f.message for f in check(parse_config(text, "k.conf"), listening)]


def test_a_good_door_has_no_findings():
    assert findings("[ssh]\nsequence = 7000,9000,8000:udp\nopen = 22/tcp\n") == []


def test_each_warning():
    text = """[a]
sequence = 7000,8000,9000
open = 22
[b]
sequence = 7000,8000,9000
open = 22
[c]
sequence = 9000,5000
open = 22
[d]
sequence = 2222,2222,4444
open = 22
[e]
sequence = 22,9000:udp,1000
open = 22
"""
    got = findings(text, listening={PortSpec(22, "tcp")})
    assert any("'a': its ports are in ascending order" in m for m in got)
    assert any("'b' has the same sequence as door 'a'" in m for m in got)
    assert any("'c': its ports are in descending order" in m for m in got)
    assert any("'c' has 2 knock(s)" in m for m in got)
    assert any("'d' knocks on only 2 distinct ports" in m for m in got)
    assert any("'e': knock port 22/tcp is a listening service" in m for m in got)
    assert not any("'e': its ports" in m for m in got), "mixed protocols are no ascending scan"


def test_check_config_exit_codes(tmp_path):
    runner = CliRunner()
    good = tmp_path / "good.conf"
    good.write_text("[ssh]\nsequence = 7100,9100,8100:udp\nopen = 22/tcp\n")
    r = runner.invoke(main, ["check-config", str(good)])
    assert r.exit_code == 0 and "1 door, 0 warnings" in r.output
    warn = tmp_path / "warn.conf"
    warn.write_text("[ssh]\nsequence = 7100,8100,9100\nopen = 22/tcp\n")
    r = runner.invoke(main, ["check-config", str(warn)])
    assert r.exit_code == 1 and f"{warn}:1: warning: door 'ssh': its ports are in ascending order" in r.output
    bad = tmp_path / "bad.conf"
    bad.write_text("[ssh]\nsequence = 7100,abc\nopen = 22/tcp\ntcpflags = syn,nope\n")
    r = runner.invoke(main, ["check-config", str(bad)])
    assert r.exit_code == 2
    assert f"{bad}:2: error: port 'abc' is not a number" in r.output and f"{bad}:4: error:" in r.output
    r = runner.invoke(main, ["check-config", str(tmp_path / "missing.conf")])
    assert r.exit_code == 2 and "error" in r.output
