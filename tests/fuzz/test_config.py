"""knockd.conf parsing: any text gives a ``Config`` or one ``ConfigError`` (``ConfigInvalid``), nothing else.

Every error names a line of the file (1 up to the number of ``\\n``-separated
lines, as knockd and editors count them), and so does every warning.
"""

from __future__ import annotations

import re

from hypothesis import example, given, strategies as st

from spa.config import _KEYS, Config, parse_config, parse_one_time_sequences
from spa.errors import ConfigError, ConfigInvalid

PATH = "/etc/knockd.conf"


def _line_count(text: str) -> int:
    return text.removeprefix("\ufeff").count("\n") + 1


def check(text: str):
    try:
        config = parse_config(text, PATH)
    except ConfigInvalid as exc:
        assert exc.errors, "ConfigInvalid without an error"
        for e in exc.errors:
            assert isinstance(e, ConfigError) and e.path == PATH
            assert e.line is not None and 1 <= e.line <= _line_count(text), (e.line, str(e))
        return exc
    assert isinstance(config, Config)
    for w in config.warnings:
        m = re.match(re.escape(PATH) + r":(\d+): ", w)
        assert m and 1 <= int(m.group(1)) <= _line_count(text), w
    return config


@given(st.text())
def test_arbitrary_text(text):
    check(text)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_arbitrary_unicode(text):
    check(text)


# The real key table, every alias, in several spellings.
key_names = st.sampled_from(sorted(_KEYS)).flatmap(
    lambda k: st.sampled_from([k, k.lower(), k.title(), f" {k} ", k.replace("_", "")]))
numbers = st.one_of(st.integers(-70000, 70000).map(str), st.integers(0, 10**30).map(str),
                    st.integers(1, 9000).map(lambda n: "1" * n), st.just("0" * 50 + "22"),
                    st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["²", "١٢", "٣:udp", "1e5", ".5", "5.", "-0", "+5", "0x10", "22/tcp"]))
port_items = st.tuples(numbers, st.sampled_from(["", ":tcp", ":udp", ":UDP", "/tcp", ":", ":icmp", " : udp"]))
values = st.one_of(
    st.text(max_size=40),
    numbers,
    st.lists(port_items.map("".join), max_size=40).map(lambda xs: ",".join(xs)),
    st.lists(port_items.map("".join), max_size=5).map(lambda xs: " ".join(xs)),
    st.lists(st.sampled_from(["syn", "ack", "!ack", "fin", "!syn", "urg", "psh", "rst", " ", "", "!", "bogus"]),
             max_size=8).map(",".join),
    st.sampled_from(["yes", "no", "true", "OFF", "1", "0", "maybe", "auto", "nft", "iptables", "eth0", "lo,eth0",
                     "192.0.2.1", "::1", "fe80::1%eth0", "0.0.0.0", "224.0.0.1", "a,b,,c", "/usr/bin/true %IP%",
                     "x" * 20, "eth0 eth0"]),
)
comments = st.sampled_from(["", " # a comment", "# x", "\t#", " #", "#"])
section_names = st.one_of(st.sampled_from(["options", "Options", " options ", "door", "openSSH", "", "a]b",
                                           "x" * 130, "é" * 70, "tab\there"]), st.text(max_size=20))


@st.composite
def lines(draw):
    kind = draw(st.sampled_from(["section", "key", "key", "key", "key", "comment", "blank", "junk", "usesyslog"]))
    if kind == "section":
        close = draw(st.sampled_from(["]", "]", "", "] # c", "]]"]))
        return f"[{draw(section_names)}{close}"
    if kind == "key":
        sep = draw(st.sampled_from(["=", " = ", "\t=\t", "==", " =", "= "]))
        return f"{draw(st.sampled_from(['', '  ', chr(9)]))}{draw(key_names)}{sep}{draw(values)}{draw(comments)}"
    if kind == "comment":
        return "#" + draw(st.text(max_size=30))
    if kind == "blank":
        return draw(st.sampled_from(["", " ", "\t", "\u00a0", "\u2028"]))
    if kind == "usesyslog":
        return draw(st.sampled_from(["UseSyslog", "usesyslog # c", "UseSyslog = yes"]))
    return draw(st.text(max_size=40))


@st.composite
def files(draw):
    body = draw(st.lists(lines(), max_size=40))
    if draw(st.booleans()):
        body.insert(0, "[options]")
    # Sprinkle control characters, NULs and stray CRs.
    for _ in range(draw(st.integers(0, 3))):
        if body:
            i = draw(st.integers(0, len(body) - 1))
            j = draw(st.integers(0, len(body[i])))
            body[i] = body[i][:j] + draw(st.sampled_from(["\0", "\r", "\x0b", "\x0c", "\x1b", "\x7f", "\x85",
                                                          "\u2029", "\ufeff"])) + body[i][j:]
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(body) + draw(st.sampled_from(["", eol]))
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text


@given(files())
@example("[door]\nSequence = " + "1" * 5000 + ":udp\n")  # regression: int() refuses 4300+ digits (ValueError)
@example("[options]\nSpaPort = " + "0" * 4400 + "22\n")
@example("[door]\nOpen = " + "9" * 4301 + "/tcp\n")
def test_structured_knockd_conf(text):
    check(text)


@given(st.lists(st.sampled_from(["syn", "ack", "fin"]), min_size=1, max_size=3), st.integers(1, 65535),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_a_valid_file_parses(flags, port, eol, bom):
    """The generator is not all noise: a valid file from the same pieces is a Config."""
    text = eol.join(["[options]", "  UseSyslog", f"[door{port}]", f"  Sequence = {port}:udp, 7000",
                     f"  TCPFlags = {','.join(sorted(set(flags)))}", "  Start_Command = true %IP%", ""])
    config = check(("\ufeff" if bom else "") + text)
    assert isinstance(config, Config) and config.doors[0].sequence[0].port == port


@given(st.one_of(st.text(), st.lists(st.one_of(values, st.just("# used")), max_size=20).map("\n".join)))
def test_one_time_sequences(text):
    try:
        result = parse_one_time_sequences(text, "/etc/otp")
    except ConfigInvalid as exc:
        for e in exc.errors:
            assert e.path == "/etc/otp" and e.line is not None and 1 <= e.line <= _line_count(text)
        return
    for number, seq in result:
        assert 1 <= number <= _line_count(text) and seq
