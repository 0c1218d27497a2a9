"""Shared-key files: format, permissions, rotation and grace; ``spa sequence``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from spa.cli_rotating import keygen_shared, parse_grace, rotate_shared, sequence
from spa.errors import InvalidGrant, KeyFileError
from spa.keys import shared
from spa.rotating import Params, counter, derive, key_id, parse_time, source_bytes

NOW = 1732780800.0  # 2024-11-28T08:00:00Z
DAY = 86400.0


@pytest.fixture
def keyfile(tmp_path):
    path = str(tmp_path / "door.key")
    key = shared.generate(Params(exclude=shared.DEFAULT_EXCLUDE), now=NOW)
    shared.write(path, key)
    return path, key


def test_round_trip(keyfile):
    path, key = keyfile
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = shared.load(path)
    assert loaded == key
    assert loaded.newest.secret == key.newest.secret
    assert loaded.params.exclude == frozenset({62201})
    assert loaded.newest.key_id == key_id(loaded.newest.secret)
    assert loaded.valid_at(NOW) == (loaded.newest,)


def test_every_parameter_survives(tmp_path):
    path = str(tmp_path / "k")
    params = Params(interval=60, length=7, lo=2000, hi=9000, proto="mixed", exclude=frozenset({22, 2222, 62201}))
    key = shared.generate(params, now=NOW)
    shared.write(path, key)
    assert shared.load(path).params == params


def test_the_secret_never_shows_in_a_repr(keyfile):
    _, key = keyfile
    assert key.newest.secret.hex() not in repr(key)
    assert repr(key.newest.secret)[2:20] not in repr(key)


def test_group_readable_file_refused(keyfile):
    path, _ = keyfile
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as info:
        shared.load(path)
    assert path in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="no such key file"):
        shared.load(str(tmp_path / "nope"))


def test_overwrite_needs_force(keyfile):
    path, key = keyfile
    other = shared.generate(key.params, now=NOW)
    with pytest.raises(KeyFileError, match="already exists"):
        shared.write(path, other)
    assert shared.load(path) == key
    shared.write(path, other, force=True)
    assert shared.load(path) == other


def test_rotate_keeps_the_previous_secret_through_its_grace(keyfile):
    path, key = keyfile
    old = key.newest
    rotated = shared.rotate(path, 7 * DAY, now=NOW + 100)
    assert shared.load(path) == rotated
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(os.path.dirname(path)) == ["door.key"]  # no temporary file left behind
    new = rotated.newest
    assert new.key_id != old.key_id and new.until is None
    assert rotated.secrets[0].key_id == old.key_id
    until = rotated.secrets[0].until
    assert until == NOW + 100 + 7 * DAY
    # The server accepts both until the grace ends, then only the new one.
    assert {s.key_id for s in rotated.valid_at(until - 1)} == {old.key_id, new.key_id}
    assert [s.key_id for s in rotated.valid_at(until)] == [new.key_id]
    assert rotated.params == key.params


def test_no_moment_in_a_rotation_locks_out_either_file(keyfile):
    """A client with the old file or the new one gets in, at any time up to the end of the grace."""
    path, before = keyfile
    after = shared.rotate(path, DAY, now=NOW)
    p = after.params
    for t in range(int(NOW) - 60, int(NOW + DAY), 997):
        accepted = {
            derive(s.secret, "ssh", c, p)
            for s in after.valid_at(t)
            for c in (counter(t, p.interval) + d for d in (-1, 0, 1))
        }
        for client in (before, after):
            assert derive(client.newest.secret, "ssh", counter(t, p.interval), p) in accepted


def test_rotate_drops_secrets_past_their_grace(keyfile):
    path, key = keyfile
    first = shared.rotate(path, DAY, now=NOW)
    second = shared.rotate(path, DAY, now=NOW + DAY / 2)
    assert len(second.secrets) == 3  # the first secret is still in its grace
    third = shared.rotate(path, DAY, now=NOW + 2 * DAY)
    # The first two secrets' graces have ended: only the previous one and the new one remain.
    assert [s.key_id for s in third.secrets] == [second.newest.key_id, third.newest.key_id]
    assert key.newest.key_id not in {s.key_id for s in third.secrets}
    assert first.newest.key_id not in {s.key_id for s in third.secrets}


def test_rotate_refuses_a_bad_grace(keyfile):
    path, key = keyfile
    for grace in (0, -1, float("inf"), 400 * DAY):
        with pytest.raises(InvalidGrant, match="grace"):
            shared.rotate(path, grace, now=NOW)
    assert shared.load(path) == key


def test_rotate_refuses_an_unsafe_file(keyfile):
    path, _ = keyfile
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        shared.rotate(path, DAY, now=NOW)


# --------------------------------------------------------------------------
# Malformed files


def _text(key: shared.SharedKey) -> list[str]:
    return shared.format_key(key).splitlines()


def _line_of(lines: list[str], start: str) -> int:
    return next(i for i, line in enumerate(lines, 1) if line.startswith(start))


@pytest.mark.parametrize(
    "start, replacement, message",
    [
        ("interval", "interval = 30s", "'interval' must be a whole number"),
        ("interval", "interval = 2", "'interval' 2 is out of range (5-86400)"),
        ("length", "length = 99", "'length' 99 is out of range (2-32)"),
        ("ports", "ports = 10000-70000", "highest port 70000 is out of range"),
        ("ports", "ports = 10000", "expected LOW-HIGH"),
        ("ports", "ports = 10000-10010", "usable port(s)"),
        ("proto", "proto = sctp", "'proto' must be tcp, udp or mixed"),
        ("exclude", "exclude = 22/tcp", "'exclude': invalid port"),
        ("version", "version = 2", "key file version 2 is not supported"),
        ("version", "colour = blue", "unknown key 'colour'"),
        ("version", "just words", "expected 'key = value'"),
        ("secret", "secret = 0123", "a secret line needs"),
        ("secret", "secret = XYZ AAAA created=2024-11-28T08:00:00Z", "is not 16 lower-case hex digits"),
        ("secret", "secret = 0123456789abcdef !!!! created=2024-11-28T08:00:00Z", "not valid base64"),
        ("secret", "secret = 0123456789abcdef AAAA created=2024-11-28T08:00:00Z", "the secret is 3 bytes"),
    ],
)
def test_malformed_line_named_by_path_and_line(tmp_path, keyfile, start, replacement, message):
    _, key = keyfile
    lines = _text(key)
    number = _line_of(lines, start)
    lines[number - 1] = replacement
    path = str(tmp_path / "bad.key")
    shared.write(path, key)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(KeyFileError) as info:
        shared.load(path)
    assert info.value.line == number
    assert str(info.value).startswith(f"{path}:{number}: ")
    assert message in str(info.value)


def test_secret_line_checks(keyfile):
    _, key = keyfile
    lines = _text(key)
    number = _line_of(lines, "secret")
    good = lines[number - 1]
    kid, b64 = good.split()[2:4]

    def fails(line: str, message: str) -> None:
        text = "\n".join(lines[: number - 1] + [line] + lines[number:]) + "\n"
        with pytest.raises(KeyFileError) as info:
            shared.parse_key(text, "k")
        assert info.value.line == number, info.value
        assert message in str(info.value)

    other = "f" * 16 if kid != "f" * 16 else "e" * 16
    fails(f"secret = {other} {b64} created=2024-11-28T08:00:00Z", "does not match its secret")
    fails(f"secret = {kid} {b64}", "a secret line needs")
    fails(f"secret = {kid} {b64} until=2024-11-28T08:00:00Z", "needs created=TIME")
    fails(f"secret = {kid} {b64} created=soon", "'created': invalid time")
    fails(f"secret = {kid} {b64} created=2024-11-28T08:00:00Z created=2024-11-28T08:00:00Z", "given twice")
    fails(f"secret = {kid} {b64} created=2024-11-28T08:00:00Z colour=blue", "unknown item 'colour=blue'")
    fails(f"secret = {kid} {b64} created=2024-11-28T08:00:00Z until=2024-12-01T00:00:00Z",
          "is the current one and cannot have an 'until'")


def test_order_of_secrets_is_checked(tmp_path, keyfile):
    path, _ = keyfile
    shared.rotate(path, DAY, now=NOW)
    lines = open(path).read().splitlines()
    first = _line_of(lines, "secret")
    # Without until the older secret would be valid for ever.
    lines[first - 1] = lines[first - 1].split(" until=")[0]
    with pytest.raises(KeyFileError, match=f"k:{first}: .*needs until=TIME"):
        shared.parse_key("\n".join(lines), "k")
    # The same secret twice.
    lines = open(path).read().splitlines()
    lines.append(lines[-1])
    with pytest.raises(KeyFileError, match=f"k:{len(lines)}: .*listed twice \\(first at line {len(lines) - 1}\\)"):
        shared.parse_key("\n".join(lines), "k")


def test_repeated_and_missing_keys(keyfile):
    _, key = keyfile
    lines = _text(key)
    n = _line_of(lines, "length")
    with pytest.raises(KeyFileError, match=f"k:{len(lines) + 1}: 'length' is set again \\(first at line {n}\\)"):
        shared.parse_key("\n".join(lines + ["length = 5"]), "k")
    without = [line for line in lines if not line.startswith("proto")]
    with pytest.raises(KeyFileError) as info:
        shared.parse_key("\n".join(without), "k")
    assert str(info.value) == "k: no 'proto' line: not a complete shared-key file"
    without = [line for line in lines if not line.startswith("secret")]
    with pytest.raises(KeyFileError, match="no 'secret' line"):
        shared.parse_key("\n".join(without), "k")


def test_comments_blank_lines_crlf_and_no_exclude(keyfile):
    _, key = keyfile
    lines = [line for line in _text(key) if not line.startswith("exclude")]
    text = "\ufeff# a comment\r\n\r\n" + "\r\n".join("  " + line for line in lines) + "\r\n"
    loaded = shared.parse_key(text, "k")
    assert loaded.params.exclude == frozenset()
    assert loaded.newest == key.newest


def test_control_character_refused(keyfile):
    _, key = keyfile
    lines = _text(key)
    lines.insert(3, "interval\x00 = 30")
    with pytest.raises(KeyFileError, match="k:4: control character"):
        shared.parse_key("\n".join(lines), "k")


# --------------------------------------------------------------------------
# CLI


@click.command()
@click.argument("output")
@click.option("--exclude", multiple=True)
@click.option("--force", is_flag=True)
def _keygen(output, exclude, force):
    keygen_shared(output, 30, 4, "10000-65000", "mixed", force, exclude)


@click.command()
@click.argument("path")
@click.option("--grace", default="7d")
def _rotate(path, grace):
    rotate_shared(path, grace)


def test_keygen_and_rotate_helpers(tmp_path):
    path = str(tmp_path / "k")
    runner = CliRunner()
    result = runner.invoke(_keygen, [path, "--exclude", "22,2222", "--exclude", "8080"])
    assert result.exit_code == 0, result.output
    key = shared.load(path)
    assert key.params.exclude == frozenset({22, 2222, 8080, 62201})
    assert key.params.proto == "mixed"
    assert path in result.output and key.newest.key_id in result.output
    assert "ports 10000-65000" in result.output and "excluding 22,2222,8080,62201" in result.output
    # Refused without --force: the helper raises, the command's handle_errors reports it.
    result = runner.invoke(_keygen, [path])
    assert isinstance(result.exception, KeyFileError)
    result = runner.invoke(_rotate, [path, "--grace", "2d"])
    assert result.exit_code == 0, result.output
    rotated = shared.load(path)
    assert rotated.newest.key_id in result.output
    assert f"previous key id {key.newest.key_id} stays valid until" in result.output
    assert rotated.secrets[0].until - rotated.newest.created == pytest.approx(2 * DAY, abs=2)


def test_parse_grace():
    assert parse_grace("7d") == 7 * DAY
    assert parse_grace("36h") == 36 * 3600
    assert parse_grace("90m") == 5400
    assert parse_grace("600") == parse_grace("600s") == 600
    assert parse_grace("1w") == 7 * DAY
    with pytest.raises(InvalidGrant, match="invalid grace"):
        parse_grace("a week")


def test_sequence_knock_format_with_at_in_both_forms(keyfile):
    path, key = keyfile
    runner = CliRunner()
    want = derive(key.newest.secret, "ssh", counter(NOW, 30), key.params)
    line = " ".join(f"{p.port}:{p.proto}" for p in want)
    for at in ("1732780810", "2024-11-28T08:00:10Z", "2024-11-28T08:00:10", "2024-11-28T09:00:10+01:00"):
        result = runner.invoke(sequence, ["--key", path, "ssh", "--at", at, "--format", "knock"])
        assert result.exit_code == 0, result.output
        assert result.stdout == line + "\n"
        assert result.stderr == "changes in 20 s\n"


def test_sequence_text_format(keyfile):
    path, key = keyfile
    result = CliRunner().invoke(sequence, ["--key", path, "ssh", "--at", "1732780829.5"])
    assert result.exit_code == 0, result.output
    want = derive(key.newest.secret, "ssh", counter(NOW, 30), key.params)
    assert result.stdout.splitlines() == [
        f"door ssh, key {key.newest.key_id}, window {counter(NOW, 30)} (30 s)",
        " ".join(str(p) for p in want),
        "changes in 1 s (at 2024-11-28T08:00:30Z)",
    ]


def test_sequence_uses_the_newest_secret_and_binds_the_source(keyfile):
    path, _ = keyfile
    rotated = shared.rotate(path, DAY, now=NOW)
    runner = CliRunner()
    args = ["--key", path, "ssh", "--at", str(NOW), "--format", "knock"]
    plain = runner.invoke(sequence, args).stdout.split()
    assert plain == [f"{p.port}:{p.proto}" for p in derive(rotated.newest.secret, "ssh", counter(NOW, 30),
                                                           rotated.params)]
    bound = runner.invoke(sequence, args + ["--bind-source", "2001:db8::7"]).stdout.split()
    assert bound != plain
    assert bound == [f"{p.port}:{p.proto}" for p in derive(rotated.newest.secret, "ssh", counter(NOW, 30),
                                                           rotated.params, source_bytes("2001:db8::7"))]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--at", "tomorrow"], "invalid time 'tomorrow'"),
        (["--at", "1960-01-01T00:00:00Z"], "before 1970"),
        (["--bind-source", "example.org"], "invalid address"),
    ],
)
def test_sequence_bad_input_exits_2(keyfile, args, message):
    path, _ = keyfile
    result = CliRunner().invoke(sequence, ["--key", path, "ssh", *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_sequence_refuses_an_unsafe_key_file(keyfile):
    path, _ = keyfile
    os.chmod(path, 0o644)
    result = CliRunner().invoke(sequence, ["--key", path, "ssh"])
    assert result.exit_code == 2
    assert f"chmod 600 {path}" in result.stderr


def test_parse_time_used_by_the_cli_agrees(keyfile):
    assert parse_time("2024-11-28T08:00:10Z") == NOW + 10


def test_the_documented_example_parses():
    doc = (Path(__file__).parent.parent.parent / "docs" / "rotating.md").read_text(encoding="utf-8")
    example = doc.split("## The key file", 1)[1].split("```", 2)[1]
    key = shared.parse_key(example, "docs/rotating.md")
    assert [s.key_id for s in key.secrets] == ["158fb7710b5f0ac1", "e7a758c3b2bd01f5"]
    assert key.valid_at(parse_time("2024-11-27T00:00:00Z")) == key.secrets
    assert key.valid_at(parse_time("2024-11-28T08:00:00Z")) == (key.newest,)
    assert shared.parse_key(shared.__doc__.split("::", 1)[1].split("Secrets are", 1)[0], "doc") == key
