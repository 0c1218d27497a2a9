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


def test_key_warnings_rotating_clashes_stale_secrets_and_expiring_keys():
    from spa import rotating
    from spa.checks import check_keys
    from spa.keytext import AuthorizedKey
    from spa.rotating_match import KeyRing, RotatingDoor

    config = parse_config("""[options]
ServerKey = s
[static]
sequence = 20010,7000,8000
open = 22
[rot]
rotating_key = k
open = 22
[spa]
authorized_keys = a
open = 22
""", "k.conf")
    params = rotating.Params(interval=30, length=4, lo=20000, hi=20999, proto="tcp", exclude=frozenset({20500}))
    ring = KeyRing("k", params, (("old", bytes(32), 50.0), ("new", b"\x01" * 32, None)))
    keys = [AuthorizedKey(b"\x02" * 32, "gone", 1, expires=10.0), AuthorizedKey(b"\x03" * 32, "soon", 2, expires=200.0),
            AuthorizedKey(b"\x04" * 32, "fine", 3)]
    found = check_keys(config, [RotatingDoor("rot", (ring,))], {"spa": ("a", keys)}, now=100.0)
    text = "\n".join(str(f) for f in found)
    assert "can draw 20010/tcp, which door 'static' uses; add 20010 to the key's exclude list" in text
    assert "secret old in k is past its grace" in text
    assert "a:1: warning: key" in text and "(gone) expired on" in text
    assert "a:2: warning: key" in text and "(soon) expires on" in text
    assert "fine" not in text
    assert len(found) == 4
