"""knockd.conf parsing (spa.config): knockd 0.8 syntax, every key and alias, every error with its line."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools

import pytest

import spa.config
from spa.config import (
    Config,
    Door,
    Options,
    load_config,
    parse_config,
    parse_one_time_sequences,
    parse_sequence,
    parse_tcpflags,
)
from spa.errors import ConfigError, ConfigInvalid
from spa.grant import PortSpec
from spa.knock import ACK, FIN, FLAG_BITS, PSH, RST, SYN, URG, TcpFlags

T, U = "tcp", "udp"


def ports(*items) -> tuple[PortSpec, ...]:
    return tuple(PortSpec(p, proto) if isinstance(p, int) else PortSpec(*p) for p, proto in items)


def errors_of(text: str) -> list[tuple[int | None, str]]:
    with pytest.raises(ConfigInvalid) as info:
        parse_config(text, "k.conf")
    return [(e.line, e.message) for e in info.value.errors]


def one_door(body: str) -> Door:
    cfg = parse_config("[d]\n" + body)
    assert len(cfg.doors) == 1
    return cfg.doors[0]


# --------------------------------------------------------------------------
# Real files, verbatim

# Seed /work/shared/seed/000_fba10ff631fdc3ab.txt, "case. 1" and "case. 2", copied
# byte for byte: the indentation is U+00A0 (NO-BREAK SPACE, from a web page),
# also between the keys and '='. knockd itself rejects these files (line 1: all
# directives must belong to a section); we read NBSP as the whitespace it looks like.
SEED_CASE_1 = """\
 [options]
        logfile = /var/log/knockd.log

[opencloseSSH]
        sequence      = 2222:udp,3333:tcp,4444:udp
        seq_timeout   = 15
        tcpflags      = syn
        start_command = /usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT
        cmd_timeout   = 10
        stop_command  = /usr/sbin/iptables -D INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT
"""

SEED_CASE_2 = """\
 [options]
        logfile = /var/log/knockd.log

[openSSH]
        sequence    = 2222, 3333, 4444
        seq_timeout = 5
        command     = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
        tcpflags    = syn

[closeSSH]
        sequence    = 4444, 3333, 2222
        seq_timeout = 5
        command     = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
        tcpflags    = syn
"""

# Debian 12 knockd 0.8-2: /etc/knockd.conf as shipped (tab indentation).
DEBIAN_KNOCKD_CONF = """\
[options]
\tUseSyslog

[openSSH]
\tsequence    = 7000,8000,9000
\tseq_timeout = 5
\tcommand     = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
\ttcpflags    = syn

[closeSSH]
\tsequence    = 9000,8000,7000
\tseq_timeout = 5
\tcommand     = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
\ttcpflags    = syn

[openHTTPS]
\tsequence    = 12345,54321,24680,13579
\tseq_timeout = 5
\tcommand     = /usr/local/sbin/knock_add -i -c INPUT -p tcp -d 443 -f %IP%
\ttcpflags    = syn

"""


def test_seed_strings_keep_their_no_break_spaces():
    # Guard against an editor "fixing" the copies: they must stay verbatim.
    for text in (SEED_CASE_1, SEED_CASE_2):
        assert text.startswith("\u00a0[options]\n")
        assert "\u00a0" * 7 + " logfile = /var/log/knockd.log\n" in text


SSH_A = "/usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"
SSH_D = "/usr/sbin/iptables -D INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT"


def test_seed_case_1():
    cfg = parse_config(SEED_CASE_1, "case1.conf")
    assert cfg.options == Options(logfile="/var/log/knockd.log")
    assert cfg.warnings == ()
    assert cfg.doors == (
        Door(
            name="opencloseSSH",
            line=4,
            sequence=ports((2222, U), (3333, T), (4444, U)),
            seq_timeout=15.0,
            tcpflags=TcpFlags(must_set=SYN),
            start_command=SSH_A,
            stop_command=SSH_D,
            cmd_timeout=10.0,
        ),
    )


def test_seed_case_2():
    cfg = parse_config(SEED_CASE_2, "case2.conf")
    assert cfg.options == Options(logfile="/var/log/knockd.log")
    assert cfg.warnings == ()
    opened, closed = cfg.doors
    assert (opened.name, opened.line, closed.name, closed.line) == ("openSSH", 4, "closeSSH", 10)
    assert opened.sequence == ports((2222, T), (3333, T), (4444, T))
    assert closed.sequence == ports((4444, T), (3333, T), (2222, T))
    assert opened.start_command == "/sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT"
    assert closed.start_command == "/sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT"
    for door in cfg.doors:
        assert door.seq_timeout == 5.0 and door.tcpflags == TcpFlags(SYN, 0)
        assert door.stop_command is None and door.start_command_6 is None and door.cmd_timeout == 10.0


def test_debian_default_knockd_conf():
    cfg = parse_config(DEBIAN_KNOCKD_CONF, "/etc/knockd.conf")
    assert cfg.options == Options(use_syslog=True)
    assert cfg.warnings == ()
    assert [(d.name, d.line) for d in cfg.doors] == [("openSSH", 4), ("closeSSH", 10), ("openHTTPS", 16)]
    assert [d.sequence for d in cfg.doors] == [
        ports((7000, T), (8000, T), (9000, T)),
        ports((9000, T), (8000, T), (7000, T)),
        ports((12345, T), (54321, T), (24680, T), (13579, T)),
    ]
    assert cfg.doors[2].start_command == "/usr/local/sbin/knock_add -i -c INPUT -p tcp -d 443 -f %IP%"
    assert all(d.tcpflags == TcpFlags(SYN, 0) and d.seq_timeout == 5.0 for d in cfg.doors)


def test_model_is_frozen_with_slots():
    for cls in (Door, Options, Config):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen and hasattr(cls, "__slots__")
    door = one_door("sequence = 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        door.name = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------
# Every key and alias

IP6 = ipaddress.ip_address("2001:db8::5")


@pytest.mark.parametrize(
    "line, field, want",
    [
        ("Sequence = 7000,8000:udp", "sequence", ports((7000, T), (8000, U))),
        ("SEQUENCE=1", "sequence", ports((1, T))),
        ("Seq_Timeout = 7", "seq_timeout", 7.0),
        ("Timeout = 2.5", "seq_timeout", 2.5),
        ("seq_timeout = .5", "seq_timeout", 0.5),
        ("seq_timeout = 3.", "seq_timeout", 3.0),
        ("TCPFlags = syn,!ack", "tcpflags", TcpFlags(SYN, ACK)),
        ("Start_Command = /bin/true %IP%", "start_command", "/bin/true %IP%"),
        ("Command = /bin/true", "start_command", "/bin/true"),
        ("Start_Command_6 = /bin/six", "start_command_6", "/bin/six"),
        ("Command_6 = /bin/six", "start_command_6", "/bin/six"),
        ("Command_6 =", "start_command_6", ""),
        ("Stop_Command = /bin/false", "stop_command", "/bin/false"),
        ("Stop_Command_6 = /bin/false6", "stop_command_6", "/bin/false6"),
        ("Cmd_Timeout = 30", "cmd_timeout", 30.0),
        ("cmd_timeout = 0.25", "cmd_timeout", 0.25),
        ("Target = 192.0.2.1", "target", ipaddress.ip_address("192.0.2.1")),
        ("target = 2001:DB8::5", "target", IP6),
        ("Open = 22/tcp, 443/tcp", "open", ports((22, T), (443, T))),
        ("open = 443:tcp 53/udp 22 22/tcp", "open", ports((22, T), (53, U), (443, T))),
        ("open = 53 / UDP", "open", ports((53, U))),
    ],
)
def test_door_key(line, field, want):
    body = line + "\n"
    if field not in ("sequence",):
        body = "sequence = 9\n" + body
    if field != "start_command":
        body += "start_command = x\n"
    door = one_door(body)
    assert getattr(door, field) == want


def test_one_time_sequences_path_kept_as_written():
    door = one_door("One_Time_Sequences = ./otp/ssh.txt # per-door file\ncommand = x")
    assert door.one_time_sequences == "./otp/ssh.txt"
    assert door.sequence == ()


def test_door_defaults():
    door = one_door("sequence = 1")
    assert door == Door(name="d", line=1, sequence=ports((1, T)))
    assert (door.seq_timeout, door.cmd_timeout, door.tcpflags, door.open) == (25.0, 10.0, None, ())
    assert door.start_command is door.start_command_6 is door.stop_command is door.stop_command_6 is None


@pytest.mark.parametrize(
    "lines, want",
    [
        ("UseSyslog", Options(use_syslog=True)),
        ("usesyslog", Options(use_syslog=True)),
        ("UseSyslog # log via syslog", Options(use_syslog=True)),
        ("UseSyslog = yes", Options(use_syslog=True)),
        ("UseSyslog = On", Options(use_syslog=True)),
        ("UseSyslog = 1", Options(use_syslog=True)),
        ("UseSyslog = TRUE", Options(use_syslog=True)),
        ("UseSyslog = no", Options(use_syslog=False)),
        ("UseSyslog = off", Options(use_syslog=False)),
        ("UseSyslog = false", Options(use_syslog=False)),
        ("UseSyslog = 0", Options(use_syslog=False)),
        ("LogFile = /var/log/knockd.log", Options(logfile="/var/log/knockd.log")),
        ("logfile = /var/log/knock d.log  # comment", Options(logfile="/var/log/knock d.log")),
        ("logfile = /var/log/knock#1.log", Options(logfile="/var/log/knock#1.log")),
        ("PidFile = /run/knockd.pid", Options(pidfile="/run/knockd.pid")),
        ("Interface = eth0", Options(interfaces=("eth0",))),
        ("interface = eth0, wg0 ens3", Options(interfaces=("eth0", "wg0", "ens3"))),
        ("Backend = auto", Options(backend="auto")),
        ("backend = NFT", Options(backend="nft")),
        ("Backend = iptables", Options(backend="iptables")),
        ("StateDir = /var/lib/spa", Options(state_dir="/var/lib/spa")),
        ("statedir = /var/lib/spa", Options(state_dir="/var/lib/spa")),
    ],
)
def test_options_key(lines, want):
    cfg = parse_config(f"[options]\n\t{lines}\n[d]\nsequence = 1\ncommand = x\n")
    assert cfg.options == want
    assert cfg.warnings == ()


@pytest.mark.parametrize("header", ["[options]", "[Options]", "[OPTIONS]", "[ options ]"])
def test_options_section_any_case(header):
    cfg = parse_config(f"{header}\nlogfile = /l\n")
    assert cfg.options.logfile == "/l" and cfg.doors == ()


def test_several_options_sections_merge():
    cfg = parse_config("[options]\nlogfile = /l\n[d]\nsequence = 1\ncommand = x\n[options]\npidfile = /p\n")
    assert cfg.options == Options(logfile="/l", pidfile="/p")
    assert [d.name for d in cfg.doors] == ["d"]


# --------------------------------------------------------------------------
# Syntax: comments, whitespace, names


@pytest.mark.parametrize(
    "text",
    [
        "[d]\nsequence = 1,2\n",
        "# top comment\n\n[d]\n   # indented comment\n\tsequence=1,2\n",
        "[d]\r\nsequence = 1,2\r\n",  # CRLF
        "\ufeff[d]\nsequence = 1,2\n",  # UTF-8 byte order mark
        "\u00a0[d]\n\u00a0\u00a0sequence\u00a0= 1,2\u00a0\n",  # no-break spaces
        "[d]\nsequence = 1,2 # trailing comment\n",
        "[d]\nsequence = 1,2\t# trailing comment\n",
        "[d] # a comment after the header\nsequence = 1,2\n",
        "[d]\nSeQuEnCe = 1,2\n",
        "[d]\nsequence = 1 , 2\n",
        "[d]\nsequence = 1 2\n",
    ],
)
def test_syntax_variants(text):
    cfg = parse_config(text + "command = x\n")
    assert cfg.doors[0].name == "d" and cfg.doors[0].sequence == ports((1, T), (2, T))


def test_commands_are_verbatim():
    door = one_door("sequence = 1\ncommand =  echo a=b # goes to the shell  \nstop_command = x\n")
    assert door.start_command == "echo a=b # goes to the shell"
    assert door.stop_command == "x"


@pytest.mark.parametrize(
    "header, name",
    [("[openSSH]", "openSSH"), ("[ open SSH ]", "open SSH"), ("[a]b]", "a]b"), ("[door #1]", "door #1"),
     ("[" + "x" * 127 + "]", "x" * 127), ("[ñandú]", "ñandú")],
)
def test_door_names(header, name):
    cfg = parse_config(f"{header}\nsequence = 1\ncommand = x\n")
    assert cfg.doors[0].name == name


def test_doors_keep_file_order_and_header_lines():
    cfg = parse_config("[b]\nsequence=1\ncommand=x\n\n[a]\nsequence=2\ncommand=x\n")
    assert [(d.name, d.line) for d in cfg.doors] == [("b", 1), ("a", 5)]


# --------------------------------------------------------------------------
# Sequences


@pytest.mark.parametrize(
    "text, want",
    [
        ("7000,8000,9000", ports((7000, T), (8000, T), (9000, T))),
        ("7000 , 8000 : UDP", ports((7000, T), (8000, U))),
        ("2222:udp,3333:tcp,4444:udp", ports((2222, U), (3333, T), (4444, U))),
        ("1:Tcp 2:uDp", ports((1, T), (2, U))),
        ("5,5,5", ports((5, T), (5, T), (5, T))),  # repeats kept
        ("9,1,5", ports((9, T), (1, T), (5, T))),  # order kept, never sorted
        ("  1\t2 ,3  ", ports((1, T), (2, T), (3, T))),
        ("022", ports((22, T),)),
        ("65535:udp", ports((65535, U),)),
        (",".join(["1"] * 32), ports(*[(1, T)] * 32)),
    ],
)
def test_parse_sequence(text, want):
    assert parse_sequence(text, "k.conf", 3) == want


@pytest.mark.parametrize(
    "text, message",
    [
        ("abc", "port 'abc' is not a number"),
        ("-1", "port -1 is out of range (1-65535)"),
        ("0", "port 0 is out of range (1-65535)"),
        ("70000", "port 70000 is out of range (1-65535)"),
        ("99999999999999999999", "port 99999999999999999999 is out of range (1-65535)"),
        ("22:sctp", "unknown protocol 'sctp' (tcp or udp)"),
        ("22:", "unknown protocol '' (tcp or udp)"),
        ("22:tcp:udp", "unknown protocol 'tcp:udp' (tcp or udp)"),
        (":tcp", "port is missing in ':tcp'"),
        ("22/udp", "port '22/udp' is not a number (a knock sequence writes the protocol as PORT:tcp or PORT:udp)"),
        ("1,,2", "empty entry in knock sequence (a comma too many)"),
        ("1,2,", "empty entry in knock sequence (a comma too many)"),
        ("", "knock sequence is empty"),
        ("+22", "port '+22' is not a number"),
        ("1e3", "port '1e3' is not a number"),
        ("\u0661\u0662", "port '\u0661\u0662' is not a number"),  # Arabic-Indic digits are not ASCII digits
        (",".join(["1"] * 33), "too many ports in knock sequence: 33 (at most 32)"),
    ],
)
def test_parse_sequence_rejects(text, message):
    with pytest.raises(ConfigInvalid) as info:
        parse_sequence(text, "k.conf", 3)
    assert str(info.value) == f"k.conf:3: {message}"
    assert isinstance(info.value, ConfigError)


def test_parse_sequence_reports_every_bad_port():
    with pytest.raises(ConfigInvalid) as info:
        parse_sequence("abc, 1, 0:udp, 2:icmp", "k.conf", 7)
    assert [(e.line, e.message) for e in info.value.errors] == [
        (7, "port 'abc' is not a number"),
        (7, "port 0 is out of range (1-65535)"),
        (7, "unknown protocol 'icmp' (tcp or udp)"),
    ]


def test_parse_sequence_without_line():
    with pytest.raises(ConfigInvalid, match=r"^k\.conf: port 'x' is not a number$"):
        parse_sequence("x", "k.conf")


# --------------------------------------------------------------------------
# TCPFlags


@pytest.mark.parametrize(
    "text, want",
    [
        ("syn", TcpFlags(SYN, 0)),
        ("SYN,!ACK", TcpFlags(SYN, ACK)),
        ("syn, ack", TcpFlags(SYN | ACK, 0)),  # knockd: fatal "unrecognized flag"
        ("fin , !ack", TcpFlags(FIN, ACK)),
        ("! rst", TcpFlags(0, RST)),
        ("fin,syn,rst,psh,ack,urg", TcpFlags(FIN | SYN | RST | PSH | ACK | URG, 0)),
        ("!fin,!syn,!rst,!psh,!ack,!urg", TcpFlags(0, FIN | SYN | RST | PSH | ACK | URG)),
        ("syn,syn", TcpFlags(SYN, 0)),
    ],
)
def test_parse_tcpflags(text, want):
    assert parse_tcpflags(text, "k.conf", 1) == want


@pytest.mark.parametrize(
    "text, message",
    [
        ("sin", "unknown TCP flag 'sin' (fin, syn, rst, psh, ack or urg, each optionally prefixed with '!')"),
        ("syn ack", "unknown TCP flag 'syn ack' (fin, syn, rst, psh, ack or urg, each optionally prefixed with '!')"),
        ("ece", "unknown TCP flag 'ece' (fin, syn, rst, psh, ack or urg, each optionally prefixed with '!')"),
        ("syn,", "empty entry in 'TCPFlags' (a comma too many)"),
        ("syn,!syn", "TCP flag syn is both required and forbidden"),
        ("!ack,ack,fin,!fin", "TCP flag fin, ack is both required and forbidden"),
        ("", "'TCPFlags' needs at least one flag"),
    ],
)
def test_parse_tcpflags_rejects(text, message):
    with pytest.raises(ConfigInvalid) as info:
        parse_tcpflags(text, "k.conf", 4)
    assert str(info.value) == f"k.conf:4: {message}"


def test_tcpflags_str_round_trip_every_combination():
    bits = list(FLAG_BITS.values())
    seen = 0
    for states in itertools.product((None, "set", "clear"), repeat=len(bits)):
        must_set = sum(b for b, s in zip(bits, states) if s == "set")
        must_clear = sum(b for b, s in zip(bits, states) if s == "clear")
        flags = TcpFlags(must_set, must_clear)
        if not must_set and not must_clear:
            continue
        assert parse_tcpflags(str(flags)) == flags
        assert parse_tcpflags(str(flags).upper().replace(",", ", ")) == flags
        seen += 1
    assert seen == 3**6 - 1


# --------------------------------------------------------------------------
# Errors, each at its line

UNKNOWN_FLAG = "(fin, syn, rst, psh, ack or urg, each optionally prefixed with '!')"


@pytest.mark.parametrize(
    "text, want",
    [
        ("sequence = 1\n", [(1, "directive before the first [section]")]),
        ("UseSyslog\n", [(1, "directive before the first [section]")]),
        ("[d]\nsequnce = 1\n",
         [(2, "unknown key 'sequnce'"), (1, "door 'd' has no knock sequence (give 'Sequence' or 'One_Time_Sequences', "
                                            "or 'Authorized_Keys' for SPA, or 'Rotating_Key' for rotating sequences)")]),
        ("[d]\nsequence = 1\nSequnce = 2\n", [(3, "unknown key 'Sequnce'")]),
        ("[d]\nsequence = 1\nfoo bar\n", [(3, "line has no '=': 'foo bar'")]),
        ("[d]\nsequence = 1\n= 5\n", [(3, "line has no key before '=': '= 5'")]),
        ("[d]\ncommand = x\n", [(1, "door 'd' has no knock sequence (give 'Sequence' or 'One_Time_Sequences', "
                                            "or 'Authorized_Keys' for SPA, or 'Rotating_Key' for rotating sequences)")]),
        ("[d]\nsequence = abc\n", [(2, "port 'abc' is not a number")]),
        ("[d]\nsequence = -1\n", [(2, "port -1 is out of range (1-65535)")]),
        ("[d]\nsequence = 0\n", [(2, "port 0 is out of range (1-65535)")]),
        ("[d]\nsequence = 70000\n", [(2, "port 70000 is out of range (1-65535)")]),
        ("[d]\nsequence = 1:sctp\n", [(2, "unknown protocol 'sctp' (tcp or udp)")]),
        ("[d]\nsequence =\n", [(2, "'Sequence' needs a value")]),
        ("[d]\nsequence = # nothing\n", [(2, "'Sequence' needs a value")]),
        ("[d]\nsequence = 1\nseq_timeout = abc\n",
         [(3, "'Seq_Timeout' must be a positive number of seconds, not 'abc'")]),
        ("[d]\nsequence = 1\ntimeout = 0\n", [(3, "'Seq_Timeout' must be a positive number of seconds, not '0'")]),
        ("[d]\nsequence = 1\nseq_timeout = 5s\n",
         [(3, "'Seq_Timeout' must be a positive number of seconds, not '5s'")]),
        ("[d]\nsequence = 1\nseq_timeout = -3\n",
         [(3, "'Seq_Timeout' must be a positive number of seconds, not '-3'")]),
        ("[d]\nsequence = 1\nseq_timeout = inf\n",
         [(3, "'Seq_Timeout' must be a positive number of seconds, not 'inf'")]),
        ("[d]\nsequence = 1\ncmd_timeout = 1e3\n",
         [(3, "'Cmd_Timeout' must be a positive number of seconds, not '1e3'")]),
        ("[d]\nsequence = 1\ncmd_timeout = 99999999\n",
         [(3, "'Cmd_Timeout' of 99999999 s is too long (at most 31622400 s)")]),
        ("[d]\nsequence = 1\ntcpflags = syn,bogus\n", [(3, f"unknown TCP flag 'bogus' {UNKNOWN_FLAG}")]),
        ("[d]\nsequence = 1\ntcpflags = syn,!syn\n", [(3, "TCP flag syn is both required and forbidden")]),
        ("[d]\nsequence = 1\ntarget = host.example\n", [(3, "'Target' must be an IP address, not 'host.example'")]),
        ("[d]\nsequence = 1\ntarget = 192.0.2.0/24\n", [(3, "'Target' must be an IP address, not '192.0.2.0/24'")]),
        ("[d]\nsequence = 1\ntarget = 224.0.0.1\n",
         [(3, "'Target' '224.0.0.1' cannot be used: address 224.0.0.1 cannot be granted (unspecified or multicast)")]),
        ("[d]\nsequence = 1\nopen = 22/sctp\n", [(3, "'Open': unknown protocol 'sctp' (tcp or udp)")]),
        ("[d]\nsequence = 1\nopen = 22, 0\n", [(3, "'Open': port 0 is out of range (1-65535)")]),
        ("[d]\nsequence = 1\nopen = ssh\n", [(3, "'Open': port 'ssh' is not a number")]),
        ("[d]\nsequence = 1\nopen = ,\n", [(3, "'Open' needs at least one port")]),
        ("[d]\nsequence = 1\none_time_sequences = /x\n",
         [(3, "door 'd' has both 'Sequence' (line 2) and 'One_Time_Sequences' (line 3); use one of them")]),
        ("[d]\none_time_sequences = /x\nsequence = 1\n",
         [(3, "door 'd' has both 'Sequence' (line 3) and 'One_Time_Sequences' (line 2); use one of them")]),
        ("[d]\nsequence = 1\ninterface = eth0\n", [(3, "'Interface' belongs in [options], not in door 'd'")]),
        ("[d]\nsequence = 1\nlogfile = /l\n", [(3, "'LogFile' belongs in [options], not in door 'd'")]),
        ("[options]\nsequence = 1\n", [(2, "'Sequence' belongs in a door section, not in [options]")]),
        ("[options]\ncommand = x\n", [(2, "'Start_Command' belongs in a door section, not in [options]")]),
        ("[options]\nUseSyslog = maybe\n",
         [(2, "'UseSyslog' must be yes or no (or true/false, on/off, 1/0), not 'maybe'")]),
        ("[options]\nbackend = pf\n", [(2, "unknown backend 'pf' (auto, nft or iptables)")]),
        ("[options]\nbackend =\n", [(2, "'Backend' needs a value")]),
        ("[options]\nlogfile =\n", [(2, "'LogFile' needs a value")]),
        ("[options]\ninterface = averyveryverylongname0\n",
         [(2, "interface name 'averyveryverylongname0' is not valid (at most 15 bytes, no '/')")]),
        ("[options]\ninterface = a/b\n", [(2, "interface name 'a/b' is not valid (at most 15 bytes, no '/')")]),
        ("[options]\ninterface = ,\n", [(2, "'Interface' needs at least one interface name")]),
        ("[]\nsequence = 1\n", [(1, "empty section name '[]'")]),
        ("[d\nsequence = 1\n", [(1, "section header has no closing ']': '[d'")]),
        ("[" + "x" * 128 + "]\nsequence = 1\n", [(1, "door name 'xxxxxxxxxxxxxxxxxxxx'... is longer than 127 bytes")]),
        ("[d]\nsequence = 1\n[d]\nsequence = 2\n",
         [(3, "door 'd' is already defined at line 1 (door names must be unique)")]),
        ("[d]\nsequence = 1\ncommand = a\x00b\n", [(3, "control character U+0000 in line (only tab is allowed)")]),
        ("[d]\nsequence = 1\ncommand = a\rb\n", [(3, "control character U+000D in line (only tab is allowed)")]),
        ("[d]\nsequence = 1\ncommand = a\x1bb\n", [(3, "control character U+001B in line (only tab is allowed)")]),
        ("[d]\nsequence = 1\ncommand = a\x85b\n", [(3, "control character U+0085 in line (only tab is allowed)")]),
    ],
)
def test_error_at_line(text, want):
    assert sorted(errors_of(text)) == sorted(want)


def test_errors_come_in_line_order_with_path():
    text = (
        "logfile = /early\n"  # 1
        "[options]\n"  # 2
        "Backend = pf\n"  # 3
        "[A]\n"  # 4
        "command = x\n"  # 5
        "[B]\n"  # 6
        "sequence = 1, abc, 70000:udp\n"  # 7
        "tcpflags = syn, ack, sin\n"  # 8
        "Sequnce = 3\n"  # 9
        "seq_timeout = abc\n"  # 10
        "target = nowhere\n"  # 11
        "[C]\n"  # 12
        "sequence = 1\n"  # 13
        "[B]\n"  # 14
        "sequence = 0\n"  # 15
    )
    with pytest.raises(ConfigInvalid) as info:
        parse_config(text, "/etc/knockd.conf")
    exc = info.value
    want = [
        (1, "directive before the first [section]"),
        (3, "unknown backend 'pf' (auto, nft or iptables)"),
        (4, "door 'A' has no knock sequence (give 'Sequence' or 'One_Time_Sequences', "
        "or 'Authorized_Keys' for SPA, or 'Rotating_Key' for rotating sequences)"),
        (7, "port 'abc' is not a number"),
        (7, "port 70000 is out of range (1-65535)"),
        (8, f"unknown TCP flag 'sin' {UNKNOWN_FLAG}"),
        (9, "unknown key 'Sequnce'"),
        (10, "'Seq_Timeout' must be a positive number of seconds, not 'abc'"),
        (11, "'Target' must be an IP address, not 'nowhere'"),
        (14, "door 'B' is already defined at line 6 (door names must be unique)"),
        (15, "port 0 is out of range (1-65535)"),  # a repeated door is still checked
    ]
    assert [(e.line, e.message) for e in exc.errors] == want
    assert all(isinstance(e, ConfigError) and e.path == "/etc/knockd.conf" for e in exc.errors)
    assert str(exc) == "\n".join(f"/etc/knockd.conf:{line}: {msg}" for line, msg in want)
    assert isinstance(exc, ConfigError) and (exc.path, exc.line) == ("/etc/knockd.conf", 1)


def test_a_bad_sequence_does_not_also_say_no_sequence():
    assert errors_of("[d]\nsequence = abc\ncommand = x\n") == [(2, "port 'abc' is not a number")]


# --------------------------------------------------------------------------
# Warnings


@pytest.mark.parametrize(
    "text, want",
    [
        ("[d]\nsequence = 1\ncommand = a\ncommand = b\n",
         ["k.conf:4: 'Start_Command' is set again (first at line 3); the last value is used"]),
        ("[d]\nsequence = 1\ncommand = a\nstart_command = b\n",
         ["k.conf:4: 'Start_Command' is set again (first at line 3); the last value is used"]),
        ("[d]\nsequence = 1\ntimeout = 3\nseq_timeout = 4\ncommand = x\n",
         ["k.conf:4: 'Seq_Timeout' is set again (first at line 3); the last value is used"]),
        ("[options]\nlogfile = /a\n[options]\nlogfile = /b\n",
         ["k.conf:4: 'LogFile' is set again (first at line 2); the last value is used"]),
        ("[d]\nUseSyslog\nsequence = 1\ncommand = x\n",
         ["k.conf:2: 'UseSyslog' in door 'd' sets syslog for the whole daemon (it belongs in [options])"]),
        ("[d]\nUseSyslog = yes\nsequence = 1\ncommand = x\n",
         ["k.conf:2: 'UseSyslog' in door 'd' sets syslog for the whole daemon (it belongs in [options])"]),
        ("[Options]\nlogfile = /l\n", ["k.conf:1: '[Options]' is read as [options] (knockd would read it as a door)"]),
        ("[ options ]\nlogfile = /l\n", ["k.conf:1: '[ options ]' is read as [options] (knockd would read it as a door)"]),
        ("[d]\nsequence = 1\n",
         ["k.conf:1: door 'd' has no 'Start_Command' and no 'Open': a completed knock is only logged"]),
        ("[d]\nsequence = 1\ncommand =\n",
         ["k.conf:1: door 'd' has no 'Start_Command' and no 'Open': a completed knock is only logged"]),
        ("[d]\nsequence = 1\nopen = 22\nstop_command = x\n",
         ["k.conf:1: door 'd' has a stop command but no start command: it never runs (as in knockd)"]),
        ("[d]\nsequence = 1\ncommand = a\ncommand_6 =\nstop_command_6 = x\n",
         ["k.conf:1: door 'd' has a stop command but no start command: it never runs (as in knockd)"]),
        ("[options]\ninterface = eth0 eth0\n", ["k.conf:2: interface 'eth0' is listed twice"]),
    ],
)
def test_warnings(text, want):
    cfg = parse_config(text, "k.conf")
    assert list(cfg.warnings) == want


def test_repeated_key_last_wins():
    door = one_door("sequence = 1\nsequence = 2:udp\ntcpflags = syn\ntcpflags = ack\ncommand = x\n")
    assert door.sequence == ports((2, U))
    assert door.tcpflags == TcpFlags(ACK, 0)  # knockd would OR the two lines: syn and ack


def test_usesyslog_in_door_turns_syslog_on():
    cfg = parse_config("[d]\nsequence = 1\ncommand = x\nUseSyslog\n")
    assert cfg.options.use_syslog is True
    assert [d.name for d in cfg.doors] == ["d"]


def test_command_6_fallback_and_explicit_empty():
    door = one_door("sequence = 1\ncommand = four\n")
    assert door.start_command == "four" and door.start_command_6 is None
    door = one_door("sequence = 1\ncommand = four\ncommand_6 =\n")
    assert door.start_command_6 == ""


# --------------------------------------------------------------------------
# One_Time_Sequences files


def test_one_time_sequences_file():
    text = (
        "# sequences for door ssh\n"  # 1
        "#001,3002,3003\n"  # 2: used (knockd marked it)
        "\n"  # 3
        "  4001, 4002:udp ,4003\n"  # 4
        "5001 5002 5003  # next\r\n"  # 5
        "   \n"  # 6
        "6001:UDP,6001:udp\n"  # 7
    )
    assert parse_one_time_sequences(text, "otp.txt") == [
        (4, ports((4001, T), (4002, U), (4003, T))),
        (5, ports((5001, T), (5002, T), (5003, T))),
        (7, ports((6001, U), (6001, U))),
    ]


def test_one_time_sequences_empty_file_has_no_sequences():
    assert parse_one_time_sequences("# all used\n#001\n\n", "otp.txt") == []


def test_one_time_sequences_bad_lines_are_errors():
    with pytest.raises(ConfigInvalid) as info:
        parse_one_time_sequences("1,2\nabc\n3,4\n5,70000\n6:sctp\n", "otp.txt")
    assert str(info.value).splitlines() == [
        "otp.txt:2: port 'abc' is not a number",
        "otp.txt:4: port 70000 is out of range (1-65535)",
        "otp.txt:5: unknown protocol 'sctp' (tcp or udp)",
    ]


# --------------------------------------------------------------------------
# load_config: the only I/O


def test_load_config_reads_the_file(tmp_path):
    path = tmp_path / "knockd.conf"
    path.write_text(DEBIAN_KNOCKD_CONF, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.path == str(path) and len(cfg.doors) == 3
    assert load_config(str(path)) == cfg


def test_load_config_errors_name_the_path(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("[d]\nsequence = 1\nSequnce = 2\n")
    with pytest.raises(ConfigInvalid, match=rf"^{path}:3: unknown key 'Sequnce'$"):
        load_config(path)


def test_load_config_missing_file(tmp_path):
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: no such file" and info.value.path == str(missing)


def test_load_config_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_load_config_not_readable(tmp_path, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(spa.config, "open", deny, raising=False)  # tests run as root: simulate
    with pytest.raises(ConfigError, match=r"permission denied"):
        load_config(tmp_path / "k.conf")


def test_load_config_not_utf8(tmp_path):
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[d]\nsequence = 1\ncommand = echo caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:3: not valid UTF-8 (byte 0xe9)"
    assert info.value.line == 3
