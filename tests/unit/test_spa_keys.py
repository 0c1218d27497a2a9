"""SPA key files: text formats, generation and the permission rule, rotation, known_servers, and the CLI."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import stat

import pytest
from click.testing import CliRunner

from spa import protocol
from spa.cli import main as spa_main
from spa.errors import KeyFileError
from spa.keys import ed25519, trust
from spa.keytext import (
    PrivateKey,
    PublicKey,
    find_known_server,
    format_known_server,
    format_private,
    format_public,
    parse_authorized_keys,
    parse_date,
    parse_known_servers,
    parse_private,
    parse_public,
)

SEED = bytes(range(32))
PUB = protocol.public_of(SEED)
PUB_B64 = base64.b64encode(PUB).decode()
PUB2 = protocol.public_of(bytes(range(1, 33)))
PUB2_B64 = base64.b64encode(PUB2).decode()


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _err(fn, *args) -> KeyFileError:
    with pytest.raises(KeyFileError) as info:
        fn(*args)
    return info.value


# -- private and public key text -------------------------------------------


def test_private_round_trip_and_repr_hides_the_seed():
    key = PrivateKey(SEED, "server", "gate@example")
    text = format_private(key)
    assert parse_private(text, "k") == key
    assert SEED.hex() not in repr(key) and base64.b64encode(SEED).decode() not in repr(key)


def test_private_defaults_and_blank_comment():
    text = f"# c\n\ntype = spa-ed25519-private\nseed = {base64.b64encode(SEED).decode()}\n"
    key = parse_private(text, "k")
    assert (key.role, key.comment) == ("client", "")


@pytest.mark.parametrize("text, line, words", [
    ("type = spa-ed25519-private\nrole = client\nseed\n", 3, "no '='"),
    ("type = spa-ed25519-private\ncolour = blue\n", 2, "unknown key 'colour'"),
    ("type = spa-ed25519-private\nrole = client\nrole = server\n", 3, "given twice"),
    ("type = spa-shared\nseed = AAAA\n", 1, "not an spa private key file"),
    ("type = spa-ed25519-private\nrole = admin\n", 2, "role must be client or server"),
    ("type = spa-ed25519-private\n\nseed = not base64!\n", 3, "not valid base64"),
    ("type = spa-ed25519-private\nseed = AAAA\n", 2, "32 bytes, not 3"),
])
def test_private_bad_lines_name_path_and_line(text, line, words):
    err = _err(parse_private, text, "/etc/spa/client.key")
    assert (err.path, err.line) == ("/etc/spa/client.key", line)
    assert str(err).startswith(f"/etc/spa/client.key:{line}: ") and words in str(err)


def test_private_missing_type_or_seed_names_the_path():
    err = _err(parse_private, "role = client\n", "p")
    assert str(err).startswith("p: ") and "type missing" in str(err)
    assert "missing" in str(_err(parse_private, "type = spa-ed25519-private\n", "p"))


def test_public_round_trip_and_errors():
    key = PublicKey(PUB, "alice laptop")
    assert format_public(key) == f"spa-ed25519 {PUB_B64} alice laptop\n"
    assert parse_public(format_public(key), "a.pub") == key
    assert format_public(PublicKey(PUB)) == f"spa-ed25519 {PUB_B64}\n"
    assert key.key_id == protocol.key_id(PUB)
    assert "one key line, this one has 2" in str(_err(parse_public, format_public(key) * 2, "a.pub"))
    err = _err(parse_public, f"# x\nssh-ed25519 {PUB_B64}\n", "a.pub")
    assert str(err).startswith("a.pub:2: ")
    err = _err(parse_public, f"spa-ed25519 {base64.b64encode(PUB[:31]).decode()}\n", "a.pub")
    assert str(err).startswith("a.pub:1: ") and "32 bytes, not 31" in str(err)


# -- authorized_keys ---------------------------------------------------------


def test_authorized_keys_options_and_comments():
    text = (
        "# door ssh\n"
        f"spa-ed25519 {PUB_B64} alice laptop\n"
        "\n"
        f"expires=2030-01-02 from=203.0.113.0/24,2001:db8::/32 spa-ed25519 {PUB2_B64} bob\n"
    )
    a, b = parse_authorized_keys(text, "ak")
    assert (a.public, a.comment, a.line, a.expires, a.sources) == (PUB, "alice laptop", 2, None, ())
    assert (b.public, b.comment, b.line) == (PUB2, "bob", 4)
    assert b.expires == dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc).timestamp()
    assert b.sources == (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32"))
    assert b.allows(ipaddress.ip_address("203.0.113.200")) and b.allows(ipaddress.ip_address("2001:db8::1"))
    assert not b.allows(ipaddress.ip_address("198.51.100.1"))
    assert b.allows(ipaddress.ip_address("2001:db8::1%eth0"))
    assert a.allows(ipaddress.ip_address("198.51.100.1"))
    assert a.key_id == protocol.key_id(PUB)


def test_authorized_keys_single_address_and_case_of_option_names():
    (k,) = parse_authorized_keys(f"FROM=192.0.2.1 Expires=2030-01-01T00:00:00Z spa-ed25519 {PUB_B64}\n", "ak")
    assert k.sources == (ipaddress.ip_network("192.0.2.1/32"),) and k.comment == ""


@pytest.mark.parametrize("text, words", [
    (f"command=x spa-ed25519 {PUB_B64}", "unknown option 'command'"),
    (f"no-pty spa-ed25519 {PUB_B64}", "has no value"),
    (f"expires= spa-ed25519 {PUB_B64}", "has no value"),
    (f"expires=tomorrow spa-ed25519 {PUB_B64}", "is not a date"),
    (f"expires=2030-02-30 spa-ed25519 {PUB_B64}", "is not a date"),
    (f"from=203.0.113.1/24 spa-ed25519 {PUB_B64}", "from: '203.0.113.1/24'"),
    (f"from=example.com spa-ed25519 {PUB_B64}", "is not an address or network"),
    (f"from=10.0.0.0/8 from=10.1.0.0/16 spa-ed25519 {PUB_B64}", "given twice"),
    (f"ssh-ed25519 {PUB_B64}", "no 'spa-ed25519' key"),
    ("spa-ed25519", "expected 'spa-ed25519 <base64 key>"),
    ("spa-ed25519 ***", "not valid base64"),
])
def test_authorized_keys_bad_lines_name_path_and_line(text, words):
    err = _err(parse_authorized_keys, f"# first\n{text}\n", "/etc/spa/ssh.keys")
    assert str(err).startswith("/etc/spa/ssh.keys:2: "), str(err)
    assert words in str(err)


def test_authorized_keys_duplicate_key_is_refused():
    text = f"spa-ed25519 {PUB_B64} a\nspa-ed25519 {PUB2_B64} b\nfrom=192.0.2.0/24 spa-ed25519 {PUB_B64} again\n"
    err = _err(parse_authorized_keys, text, "ak")
    assert (err.path, err.line) == ("ak", 3)
    assert f"key {protocol.key_id(PUB)} is already listed at line 1" in str(err)


@pytest.mark.parametrize("text, when", [
    ("2030-01-02", dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc)),
    ("2030-01-02T03:04:05Z", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
    ("2030-01-02T03:04:05", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
    ("2030-01-02T03:04Z", dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.timezone.utc)),
    ("2030-01-02T04:04:05+01:00", dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)),
])
def test_dates(text, when):
    assert parse_date(text) == when.timestamp()


@pytest.mark.parametrize("text", ["", "2030", "2030-1-2", "02/01/2030", "2030-01-02 junk", "2030-13-01"])
def test_bad_dates(text):
    with pytest.raises(ValueError):
        parse_date(text)


def test_expired_is_inclusive():
    (k,) = parse_authorized_keys(f"expires=2030-01-01 spa-ed25519 {PUB_B64}\n", "ak")
    assert k.expires is not None
    assert not k.expired(k.expires - 0.001) and k.expired(k.expires) and k.expired(k.expires + 1)


# -- known_servers -------------------------------------------------------------


def test_known_servers_parse_and_find():
    text = (f"# servers\ngate.example,192.0.2.1 spa-ed25519 {PUB_B64} old\n"
            f"Gate.Example spa-ed25519 {PUB2_B64} new\n")
    servers = parse_known_servers(text, "ks")
    assert servers[0].hosts == ("gate.example", "192.0.2.1") and servers[0].line == 2
    assert find_known_server(servers, "GATE.example").key.public == PUB2  # the later line wins
    assert find_known_server(servers, "192.0.2.1").key.public == PUB
    assert find_known_server(servers, "other") is None
    assert format_known_server("h", PublicKey(PUB, "c")) == f"h spa-ed25519 {PUB_B64} c\n"


@pytest.mark.parametrize("line", ["gate.example", f"gate.example {PUB_B64}", f"gate ssh-ed25519 {PUB_B64}"])
def test_known_servers_bad_lines(line):
    err = _err(parse_known_servers, f"\n{line}\n", "ks")
    assert str(err).startswith("ks:2: ")


# -- key files on disk ---------------------------------------------------------


def test_generate_modes_and_contents(tmp_path):
    path = str(tmp_path / "client.key")
    pair = ed25519.generate(path, "client", "me@here")
    assert _mode(path) == 0o600 and _mode(path + ".pub") == 0o644
    loaded = ed25519.load(path)
    assert loaded.private == pair.private and loaded.public == pair.public
    assert ed25519.load_public(path + ".pub") == pair.public
    assert pair.key_id == protocol.key_id(pair.public.public)
    assert ed25519.kind(path) == "spa-ed25519-private"


def test_generate_modes_ignore_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        path = str(tmp_path / "k")
        ed25519.generate(path, "server", "")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600 and _mode(path + ".pub") == 0o644
    assert ed25519.load(path).private.role == "server"


@pytest.mark.parametrize("existing", ["k", "k.pub"])
def test_generate_refuses_to_overwrite_either_file(tmp_path, existing):
    (tmp_path / existing).write_text("keep me")
    path = str(tmp_path / "k")
    err = _err(ed25519.generate, path)
    assert err.path == str(tmp_path / existing) and "--force" in str(err)
    assert (tmp_path / existing).read_text() == "keep me"


def test_generate_force_overwrites(tmp_path):
    path = str(tmp_path / "k")
    first = ed25519.generate(path, "client", "a")
    os.chmod(path, 0o644)
    second = ed25519.generate(path, "client", "b", force=True)
    assert first.public.public != second.public.public
    assert _mode(path) == 0o600
    assert ed25519.load(path).public == second.public


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602, 0o620])
def test_load_refuses_readable_private_keys(tmp_path, mode):
    path = str(tmp_path / "k")
    ed25519.generate(path, "client", "x")
    os.chmod(path, mode)
    err = _err(ed25519.load, path)
    assert err.path == path and str(err).startswith(f"{path}: ")
    assert f"chmod 600 {path}" in str(err) and f"{mode:04o}" in str(err)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only_modes(tmp_path, mode):
    path = str(tmp_path / "k")
    ed25519.generate(path, "client", "x")
    os.chmod(path, mode)
    assert ed25519.load(path).private.role == "client"


def test_load_missing_and_non_regular(tmp_path):
    assert "no such key file" in str(_err(ed25519.load, str(tmp_path / "none")))
    assert "not a regular file" in str(_err(ed25519.load, str(tmp_path)))
    assert "no such file" in str(_err(ed25519.load_public, str(tmp_path / "none.pub")))


def test_rotate_keeps_the_old_key(tmp_path):
    path = str(tmp_path / "client.key")
    old = ed25519.generate(path, "client", "laptop")
    new, old_path = ed25519.rotate(path)
    assert old_path == path + ".old"
    assert new.public.public != old.public.public and new.private.comment == "laptop"
    assert ed25519.load(old_path).public.public == old.public.public
    assert ed25519.load_public(old_path + ".pub").public == old.public.public
    assert ed25519.load(path).public.public == new.public.public
    assert ed25519.load_public(path + ".pub").public == new.public.public
    assert _mode(path) == 0o600 and _mode(old_path) == 0o600
    # a second rotation refuses while PATH.old exists, and changes nothing
    err = _err(ed25519.rotate, path)
    assert "exists from an earlier rotation" in str(err)
    assert ed25519.load(path).public.public == new.public.public
    os.unlink(old_path)
    newer, _ = ed25519.rotate(path, "renamed")
    assert newer.public.public not in (old.public.public, new.public.public)
    assert newer.private.comment == "renamed"


def test_rotate_refuses_server_keys(tmp_path):
    path = str(tmp_path / "server.key")
    ed25519.generate(path, "server", "")
    assert "only client keys rotate" in str(_err(ed25519.rotate, path))
    assert not os.path.exists(path + ".old")


# -- trust -----------------------------------------------------------------------


def test_trust_adds_replaces_and_keeps_others(tmp_path):
    ks = str(tmp_path / "sub" / "known_servers")
    trust.trust("Gate.Example", PublicKey(PUB, "one"), ks)
    trust.trust("other.example", PublicKey(PUB2, "two"), ks)
    assert trust.lookup("gate.example", ks).public == PUB
    trust.trust("gate.example", PublicKey(PUB2, "three"), ks)
    entries = trust.load(ks)
    assert [(e.hosts, e.key.comment) for e in entries] == [(("other.example",), "two"), (("gate.example",), "three")]
    assert trust.lookup("GATE.EXAMPLE", ks).public == PUB2
    assert trust.lookup("other.example", ks).public == PUB2


def test_trust_keeps_comments_and_refuses_bad_hosts(tmp_path):
    ks = tmp_path / "known_servers"
    ks.write_text(f"# mine\n\nkeep.example spa-ed25519 {PUB_B64}\n")
    trust.trust("new.example", PublicKey(PUB2), str(ks))
    assert ks.read_text().startswith(f"# mine\n\nkeep.example spa-ed25519 {PUB_B64}\n")
    for host in ("", "a b", "a,b"):
        with pytest.raises(KeyFileError):
            trust.trust(host, PublicKey(PUB), str(ks))


def test_trust_refuses_to_rewrite_an_unreadable_file(tmp_path):
    ks = tmp_path / "known_servers"
    ks.write_text("garbage\n")
    err = _err(trust.trust, "h", PublicKey(PUB), str(ks))
    assert str(err).startswith(f"{ks}:1: ")
    assert ks.read_text() == "garbage\n"


def test_lookup_without_an_entry_says_how_to_add_one(tmp_path):
    err = _err(trust.lookup, "gate.example", str(tmp_path / "known_servers"))
    assert "spa trust gate.example SERVER.pub" in str(err)


# -- the commands ------------------------------------------------------------------


def _run(*args: str):
    return CliRunner().invoke(spa_main, list(args))


def test_keygen_client_and_server(tmp_path):
    path = str(tmp_path / "c.key")
    result = _run("keygen", "-o", path, "--comment", "me")
    assert result.exit_code == 0, result.output
    pub = ed25519.load_public(path + ".pub")
    assert pub.comment == "me" and pub.key_id in result.output
    assert _mode(path) == 0o600 and _mode(path + ".pub") == 0o644
    server = str(tmp_path / "s.key")
    result = _run("keygen", "--server", "-o", server)
    assert result.exit_code == 0, result.output
    assert ed25519.load(server).private.role == "server" and "spa trust HOST" in result.output


def test_keygen_refuses_an_existing_file_with_exit_2(tmp_path):
    path = tmp_path / "c.key"
    path.write_text("keep")
    result = _run("keygen", "-o", str(path))
    assert result.exit_code == 2
    assert "already exists" in result.output and str(path) in result.output
    assert path.read_text() == "keep"
    assert _run("keygen", "-o", str(path), "--force").exit_code == 0
    assert ed25519.load(str(path)).private.role == "client"


@pytest.mark.parametrize("args", [["keygen"], ["keygen", "-o", "x", "--server", "--shared"],
                                  ["keygen", "--rotate", "x", "-o", "y"]])
def test_keygen_usage_errors_exit_2(tmp_path, args):
    assert _run(*args).exit_code == 2


def test_keygen_rotate(tmp_path):
    path = str(tmp_path / "c.key")
    assert _run("keygen", "-o", path).exit_code == 0
    old = ed25519.load(path).public.public
    result = _run("keygen", "--rotate", path)
    assert result.exit_code == 0, result.output
    assert ed25519.load(path + ".old").public.public == old != ed25519.load(path).public.public
    assert _run("keygen", "--rotate", path).exit_code == 2  # PATH.old exists
    os.chmod(path, 0o644)
    result = _run("keygen", "--rotate", path)
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_trust_command(tmp_path):
    server = str(tmp_path / "s.key")
    assert _run("keygen", "--server", "-o", server).exit_code == 0
    ks = str(tmp_path / "known_servers")
    result = _run("trust", "gate.example", server + ".pub", "--known-servers", ks)
    assert result.exit_code == 0, result.output
    key = ed25519.load_public(server + ".pub")
    assert key.key_id in result.output
    assert trust.lookup("gate.example", ks) == key
    missing = _run("trust", "gate.example", str(tmp_path / "none.pub"), "--known-servers", ks)
    assert missing.exit_code == 2 and "no such file" in missing.output
    (tmp_path / "bad.pub").write_text("not a key\n")
    assert _run("trust", "gate.example", str(tmp_path / "bad.pub"), "--known-servers", ks).exit_code == 2
    assert _run("trust", "a,b", server + ".pub", "--known-servers", ks).exit_code == 2
    assert _run("trust", "gate.example").exit_code == 2
