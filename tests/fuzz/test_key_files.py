"""Key-file parsers: any text gives a value or a ``KeyFileError`` naming the file (and a line in it).

``spa.keytext`` counts lines with ``str.splitlines`` (so a form feed or
U+2028 starts a line there); ``spa.keys.shared`` and the config split on
``\\n`` only. Each is checked against its own count.
"""

from __future__ import annotations

import base64

from hypothesis import example, given, strategies as st

from spa import rotating
from spa.errors import KeyFileError
from spa.keys.shared import format_key, generate, parse_key
from spa.keytext import (
    PrivateKey,
    PublicKey,
    format_private,
    format_public,
    parse_authorized_keys,
    parse_known_servers,
    parse_private,
    parse_public,
)

PATH = "/etc/spa/key"


def expect(parse, text: str, lines: int):
    """The parse result, or the KeyFileError after checking where it points."""
    try:
        return parse(text)
    except KeyFileError as exc:
        assert exc.path == PATH, exc
        assert exc.line is None or 1 <= exc.line <= lines, (exc.line, lines, str(exc))
        return exc


def keytext_lines(text: str) -> int:
    return max(1, len(text.splitlines()))


def shared_lines(text: str) -> int:
    return text.count("\n") + 1


b64_32 = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
b64_any = st.binary(max_size=70).map(lambda b: base64.b64encode(b).decode())
words = st.one_of(
    b64_32, b64_any, st.text(max_size=20),
    st.sampled_from(["spa-ed25519", "spa-ed25519-private", "type", "role", "seed", "comment", "=", "client", "server",
                     "expires=2030-01-01", "expires=2030-01-01T10:00Z", "expires=", "expires=9999-99-99",
                     "expires=0001-01-01T00:00+14:00", "from=192.0.2.0/24", "from=192.0.2.1/24", "from=::/0,10.0.0.0/8",
                     "from=", "from=,", "from=fe80::1%eth0", "unknown=1", "#", "host,other", ",", "ExPiReS=2030-01-01"]),
)
key_lines = st.lists(words, max_size=8).map(" ".join)
eols = st.sampled_from(["\n", "\r\n", "\r", "\x0c", "\u2028"])


@st.composite
def keytext_files(draw):
    body = draw(st.lists(st.one_of(key_lines, st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(
        ["type", "role", "seed", "comment", "TYPE", "other"]), words)), max_size=10))
    return draw(eols).join(body)


@given(st.one_of(st.text(), keytext_files()))
@example(format_private(PrivateKey(bytes(32), "client", "c")))
def test_private(text):
    expect(lambda t: parse_private(t, PATH), text, keytext_lines(text))


@given(st.one_of(st.text(), keytext_files()))
@example(format_public(PublicKey(bytes(32), "me")))
def test_public(text):
    expect(lambda t: parse_public(t, PATH), text, keytext_lines(text))


@given(st.one_of(st.text(), keytext_files()))
def test_authorized_keys(text):
    result = expect(lambda t: parse_authorized_keys(t, PATH), text, keytext_lines(text))
    if isinstance(result, list):
        for k in result:
            assert len(k.public) == 32 and 1 <= k.line <= keytext_lines(text)


@given(st.one_of(st.text(), keytext_files()))
def test_known_servers(text):
    expect(lambda t: parse_known_servers(t, PATH), text, keytext_lines(text))


# ---------------------------------------------------------------------------
# Shared keys (rotating sequences)

VALID_SHARED = format_key(generate(rotating.Params(), now=1_700_000_000))

digits = st.one_of(st.integers(0, 10**6).map(str), st.integers(1, 6000).map(lambda n: "9" * n),
                   st.sampled_from(["²", "١", "٣٠", "-1", "0", "+3", " 30 ", "3.5", "1e3", ""]))
shared_values = {
    "version": digits,
    "interval": digits,
    "length": digits,
    "ports": st.one_of(st.tuples(digits, digits).map("-".join), st.text(max_size=15),
                       st.sampled_from(["10000-65000", "1-65535", "65000-10000", "²-9", "-", "5"])),
    "proto": st.sampled_from(["tcp", "udp", "mixed", "TCP", "icmp", ""]),
    "exclude": st.one_of(st.lists(digits, max_size=4).map(",".join), st.text(max_size=15)),
    "secret": st.one_of(st.text(max_size=60), st.tuples(
        st.one_of(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16), st.text(max_size=17)),
        b64_any, st.lists(st.one_of(
            st.tuples(st.sampled_from(["created", "until", "other", "created"]),
                      st.one_of(digits, st.sampled_from(["2024-11-21T08:00:00Z", "0001-01-01T00:00:00+14:00",
                                                         "9999-12-31T23:59:59-14:00", "nan", "inf", "-5", "1e400",
                                                         "2024-13-01"]), st.text(max_size=10))).map("=".join),
            st.text(max_size=10)), max_size=3).map(" ".join)).map(" ".join)),
}


@st.composite
def shared_files(draw):
    lines = VALID_SHARED.split("\n") if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(sorted(shared_values) + ["bogus", "Version", "SECRET"]))
        value = draw(shared_values.get(name.lower(), st.text(max_size=10)))
        line = f"{name}{draw(st.sampled_from(['=', ' = ', '  =']))}{value}"
        where = draw(st.integers(0, len(lines)))
        if lines and draw(st.booleans()):
            lines[min(where, len(lines) - 1)] = line  # replace: values of a valid file, one by one
        else:
            lines.insert(where, line)
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text


@given(st.one_of(st.text(), shared_files()))
@example(VALID_SHARED)
@example(VALID_SHARED.replace("interval = 30", "interval = ²"))  # regression: str.isdigit() accepts '²'
@example(VALID_SHARED.replace("length = 4", "length = " + "9" * 5000))  # regression: int() refuses 4300+ digits
@example(VALID_SHARED.replace("length = 4", "length = " + "0" * 5000 + "4"))
@example(VALID_SHARED.replace("ports = 10000-65000", "ports = ²-65000"))
@example(VALID_SHARED.replace("ports = 10000-65000", "ports = 1-" + "9" * 5000))
@example(VALID_SHARED.replace("exclude = 62201", "exclude = 62201,²"))
def test_shared_key(text):
    result = expect(lambda t: parse_key(t, PATH), text, shared_lines(text))
    if text == VALID_SHARED:
        assert not isinstance(result, Exception)
