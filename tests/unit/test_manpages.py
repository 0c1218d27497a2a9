"""The man pages in docs/man/ render, and cannot silently fall behind the code.

Each page is rendered with groff when it is installed (``./run`` installs
``groff-base``); without groff only its roff structure is checked. Every
click option of ``spa-server``, ``knock-client``, ``spa`` and each ``spa``
subcommand must be documented as a tagged paragraph (``.TP``) in the right
section of the right page, with its default and its choices; an option the
page documents that the code no longer has fails too. The configuration page
must name every key and alias the parser reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import click
import pytest

import spa.cli
import spa.cli_errors
import spa.client.cli
import spa.config
import spa.server.cli

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "docs" / "man"
PAGES = {"spa-server.8": "spa-server", "knock-client.1": "knock-client", "spa.1": "spa",
         "spa-gatekeeper.conf.5": "spa-gatekeeper.conf"}
#: man(7) and the groff an-ext macros these pages may use; anything else is a typo that renders as nothing.
MACROS = {"TH", "SH", "SS", "TP", "IP", "PP", "LP", "P", "RS", "RE", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI",
          "nf", "fi", "br", "sp", "EX", "EE", "UR", "UE", "MT", "ME", "\\\""}
#: Pages outside this package that SEE ALSO may name.
EXTERNAL = {"knockd(1)", "knock(1)", "nft(8)", "iptables(8)", "systemd.service(5)", "systemd(1)", "ip(8)"}


# --------------------------------------------------------------------------
# Reading roff


def plain(text: str) -> str:
    """Roff source with escapes reduced to what a reader sees: ``\\-`` is ``-``, font changes vanish."""
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\\||\\\^", "", text)
    return text.replace("\\-", "-").replace("\\(bu", "*").replace("\\e", "\\")


def macro_args(line: str) -> str:
    """The text a macro line (``.BR \\-c ", " \\-\\-config``) shows: arguments joined, quotes dropped."""
    macro, _, body = line.partition(" ")
    args = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', body)]
    # .B and .I join their arguments with spaces; .BR, .IR and the like alternate fonts without one.
    return plain((" " if macro in (".B", ".I", ".SH", ".SS") else "").join(args))


def lines_of(page: str) -> list[str]:
    return (MAN / page).read_text(encoding="utf-8").splitlines()


def section(page: str, heading: str, level: str = "SH") -> list[str]:
    """The lines under ``.SH heading`` (or ``.SS``) up to the next heading of that level or above."""
    out: list[str] | None = None
    stops = ("SH",) if level == "SH" else ("SH", "SS")
    for line in lines_of(page):
        m = re.match(r"\.(SH|SS)\s+(.*)", line)
        if m:
            if out is not None and m.group(1) in stops:
                break
            if m.group(1) == level and m.group(2).strip('"') == heading:
                out = []
                continue
        if out is not None:
            out.append(line)
    assert out is not None, f"{page}: no .{level} {heading}"
    return out


def tagged(lines: list[str]) -> list[tuple[str, str]]:
    """(tag, paragraph) for each ``.TP`` in ``lines``: the tag as shown, the paragraph as plain text."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith(".TP"):
            tag_line = lines[i + 1]
            tag = macro_args(tag_line) if tag_line.startswith(".") else plain(tag_line)
            body: list[str] = []
            i += 2
            while i < len(lines) and not re.match(r"\.(TP|SS|SH)\b", lines[i]):
                body.append(macro_args(lines[i]) if lines[i].startswith(".") else plain(lines[i]))
                i += 1
            out.append((tag, " ".join(body)))
            continue
        i += 1
    return out


def option_words(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", text))


# --------------------------------------------------------------------------
# What the code defines


def _ctx(cmd: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
    return cmd.make_context(name, [], parent=parent, resilient_parsing=True)


def options_of(cmd: click.Command, ctx: click.Context, with_help: bool) -> list[click.Option]:
    opts = [p for p in cmd.params if isinstance(p, click.Option)]
    if with_help:
        opts.append(cmd.get_help_option(ctx))
    return opts


def commands() -> list[tuple[str, str, list[str], click.Command, list[click.Option]]]:
    """(label, page, section path, command, options) for every command the pages must document."""
    out = []
    for label, page, cmd in (("spa-server", "spa-server.8", spa.server.cli.main),
                             ("knock-client", "knock-client.1", spa.client.cli.main)):
        out.append((label, page, ["OPTIONS"], cmd, options_of(cmd, _ctx(cmd, label), True)))
    top = _ctx(spa.cli.main, "spa")
    out.append(("spa", "spa.1", ["GLOBAL OPTIONS"], spa.cli.main, options_of(spa.cli.main, top, True)))
    for name, sub in sorted(spa.cli.main.commands.items()):
        out.append((f"spa {name}", "spa.1", ["COMMANDS", f"spa {name}"], sub, options_of(sub, top, False)))
    return out


COMMANDS = commands()


def scope(page: str, path: list[str]) -> list[str]:
    lines = section(page, path[0])
    if len(path) > 1:
        wrapped = [f".SH {path[0]}"] + lines
        lines = []
        inside = False
        for line in wrapped:
            m = re.match(r'\.SS\s+"?([^"]*)"?', line)
            if m:
                inside = plain(m.group(1)) == path[1]
                continue
            if inside:
                lines.append(line)
        assert lines, f"{page}: no .SS {path[1]!r} under {path[0]}"
    return lines


def _default_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------
# Rendering and structure


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_structure(page):
    name, section_no = PAGES[page], page.rsplit(".", 1)[1]
    text = (MAN / page).read_text(encoding="utf-8")
    lines = text.splitlines()
    th = [line for line in lines if line.startswith(".TH ")]
    assert len(th) == 1, f"{page}: one .TH"
    th_args = re.findall(r'"[^"]*"|\S+', th[0])[1:]
    assert plain(th_args[0]).lower() == name and th_args[1] == section_no, th[0]
    headings = [plain(line[4:]).strip('"') for line in lines if line.startswith(".SH ")]
    assert headings[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"], headings
    assert "SEE ALSO" in headings and headings[-1] == "SEE ALSO", headings
    name_line = section(page, "NAME")[0]
    assert re.fullmatch(rf"{re.escape(name.replace('-', chr(92) + '-'))} \\- \S.*", name_line), name_line
    for number, line in enumerate(lines, 1):
        if line.startswith(".") and line != ".":
            macro = re.match(r"\.(\S+)", line).group(1)
            assert macro in MACROS, f"{page}:{number}: unknown macro .{macro}"
        assert not line.startswith("'"), f"{page}:{number}: a line starting with ' is a control line in roff"
        assert not re.search(r"(?<!\\)--", line) or line.startswith('.\\"'), \
            f"{page}:{number}: write \\- for each dash of an option (a bare - may render as a hyphen)"
    requests = [line.split()[0] for line in lines if line.startswith(".")]
    assert requests.count(".RS") == requests.count(".RE") and requests.count(".nf") == requests.count(".fi"), page


@pytest.mark.parametrize("page", sorted(PAGES))
def test_see_also_names_real_pages(page):
    refs = re.findall(r"\.BR\s+(\S+)\s+\((\d)\)", "\n".join(section(page, "SEE ALSO")))
    assert refs
    ours = {f"{n}({s})" for n, s in ((PAGES[p], p.rsplit(".", 1)[1]) for p in PAGES)}
    for name, sec in refs:
        ref = f"{plain(name)}({sec})"
        assert ref in ours | EXTERNAL, f"{page}: SEE ALSO {ref} is neither ours nor a known page"
        assert ref != f"{PAGES[page]}({page.rsplit('.', 1)[1]})", f"{page} refers to itself"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (./run installs groff-base)")
@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_renders_without_warnings(page):
    check = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    out = subprocess.run(["groff", "-man", "-Tascii", "-P-c", "-P-b", "-P-u", "-P-o", "-rLL=300n", "-rHY=0",
                          str(MAN / page)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rendered = out.stdout
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
        assert re.search(rf"^{heading}$", rendered, re.M), f"{page}: {heading} missing in the rendered page"
    assert re.search(rf"^\s+{re.escape(PAGES[page])} - \S", rendered, re.M), rendered[:400]
    if page != "spa-gatekeeper.conf.5":  # the options survive rendering as typed, whole
        for label, p, path, cmd, opts in COMMANDS:
            if p == page:
                for o in opts:
                    for flag in o.opts:
                        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", rendered), (label, flag)


# --------------------------------------------------------------------------
# Options: the pages follow the code


@pytest.mark.parametrize("label,page,path,cmd,opts", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_option_is_documented(label, page, path, cmd, opts):
    paragraphs = tagged(scope(page, path))
    documented = {w: (tag, body) for tag, body in paragraphs for w in option_words(tag)}
    for o in opts:
        for flag in (*o.opts, *o.secondary_opts):
            assert flag in documented, f"{page}: {label} option {flag} has no .TP paragraph in {' / '.join(path)}"
        tag, body = documented[o.opts[0]]
        assert set(o.opts) <= option_words(tag), f"{page}: {label}: {o.opts} belong in one tag, not {tag!r}"
        if isinstance(o.type, click.Choice):
            for choice in o.type.choices:
                assert re.search(rf"\b{re.escape(choice)}\b", tag + " " + body), \
                    f"{page}: {label} {o.opts[0]}: choice {choice!r} is not documented"
        if o.show_default and not o.is_flag and o.default not in (None, ""):
            want = _default_text(o.default)
            assert re.search(rf"Default:\s+{re.escape(want)}\b", body), \
                f"{page}: {label} {o.opts[0]}: the default {want!r} is not documented as 'Default: {want}'"


@pytest.mark.parametrize("label,page,path,cmd,opts", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_no_documented_option_is_gone_from_the_code(label, page, path, cmd, opts):
    real = {flag for o in opts for flag in (*o.opts, *o.secondary_opts)}
    for tag, _ in tagged(scope(page, path)):
        for word in option_words(tag):
            assert word in real, f"{page}: {label} documents {word}, which the code does not have"


def test_every_spa_subcommand_has_a_section():
    documented = {plain(re.match(r'\.SS\s+"?spa ([^"]*)"?', line).group(1))
                  for line in section("spa.1", "COMMANDS") if line.startswith(".SS")}
    assert documented == set(spa.cli.main.commands), "spa.1: one .SS per subcommand, no more"


@pytest.mark.parametrize("label,page,path,cmd,opts", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_options_appear_in_the_synopsis(label, page, path, cmd, opts):
    synopsis = plain(" ".join(macro_args(line) if line.startswith(".") else line
                              for line in section(page, "SYNOPSIS")))
    for o in opts:
        if o.name in ("help", "version"):
            continue
        assert any(f in option_words(synopsis) for f in o.opts), f"{page}: {label} {o.opts} not in SYNOPSIS"


# --------------------------------------------------------------------------
# Exit codes, signals, the configuration keys, installation


@pytest.mark.parametrize("page", ["spa-server.8", "knock-client.1", "spa.1"])
def test_exit_status_lists_the_documented_codes(page):
    codes = [tag for tag, _ in tagged(section(page, "EXIT STATUS"))]
    want = [spa.cli_errors.EXIT_OK, spa.cli_errors.EXIT_FAILURE, spa.cli_errors.EXIT_BAD_INPUT,
            spa.cli_errors.EXIT_BACKEND_UNAVAILABLE, spa.cli_errors.EXIT_FIREWALL]
    assert codes == [str(c) for c in want]


def test_spa_server_documents_signals_and_files():
    signals = " ".join(tag for tag, _ in tagged(section("spa-server.8", "SIGNALS")))
    for sig in ("SIGHUP", "SIGTERM", "SIGINT"):
        assert sig in signals
    files = " ".join(tag for tag, _ in tagged(section("spa-server.8", "FILES")))
    assert "/etc/knockd.conf" in files and spa.server.cli.DEFAULT_PIDFILE in files
    assert spa.server.cli.DEFAULT_STATE_DIR in files


def test_the_config_page_names_every_key_and_alias():
    text = plain((MAN / "spa-gatekeeper.conf.5").read_text(encoding="utf-8"))
    tags = " ".join(tag for tag, _ in tagged(section("spa-gatekeeper.conf.5", "[OPTIONS] KEYS"))
                    + tagged(section("spa-gatekeeper.conf.5", "DOOR KEYS")))
    for upper, (canonical, _, _) in spa.config._KEYS.items():
        assert re.search(rf"\b{re.escape(canonical)}\b", tags), f"key {canonical} has no .TP paragraph"
        if upper != canonical.upper():  # an alias: named next to its key
            assert re.search(rf"\b{upper}\b", tags, re.I), f"alias {upper} of {canonical} is not documented"
    for default in (f"{spa.config.DEFAULT_SPA_PORT}", f"{spa.config.DEFAULT_SPA_WINDOW:g}",
                    f"{spa.config.DEFAULT_SEQ_TIMEOUT:g}", f"{spa.config.DEFAULT_CMD_TIMEOUT:g}"):
        assert f"Default: {default}" in text


def test_the_config_page_describes_every_key_file():
    headings = [line for line in lines_of("spa-gatekeeper.conf.5") if line.startswith(".SS")]
    for kind in ("Private key", "Public key", "authorized_keys", "known_servers", "Shared key", "One_Time_Sequences"):
        assert any(kind in h for h in headings), f"no .SS for {kind}"
    text = plain((MAN / "spa-gatekeeper.conf.5").read_text(encoding="utf-8"))
    from spa.keytext import PRIVATE_TYPE, PUBLIC_TYPE

    assert f"type = {PRIVATE_TYPE}" in text and PUBLIC_TYPE in text
    for word in ("expires=", "from=", "created=", "until=", "interval", "length", "ports", "proto", "exclude"):
        assert word in text


def test_pyproject_installs_every_page():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    files = data["tool"]["setuptools"]["data-files"]
    installed = {Path(f).name: target for target, fs in files.items() for f in fs}
    assert set(installed) == {p.name for p in MAN.iterdir()}
    for name, target in installed.items():
        assert target == f"share/man/man{name.rsplit('.', 1)[1]}", (name, target)
