"""Flood robustness: legitimate knocks, CPU and memory of our server and of knockd under packet floods.

Each row is a fresh ``Lab`` (server and client namespaces, one veth pair)
with ``iptables -P INPUT DROP`` (iptables-nft) and a service on tcp/22 in
the server namespace, one daemon under test there and three doors, as in
the reference measurements (knockd.md §7):

* ``ssh``: ``7000,8000,9000``, ``tcpflags = syn``;
* ``udp-fwd``: ``5001:udp,5002:tcp,5003:udp``; ``udp-rev``: the reverse;

all with ``seq_timeout = 5`` and ``cmd_timeout = 10``. Our ``spa-server``
opens them with ``open = 22/tcp`` (nft); knockd runs the seed's iptables
commands (``iptables -A``/``-D ... --dport 22 -j ACCEPT`` through ``/bin/sh``);
``spa-command`` is our server with those same commands (by default on the
spoofed sequence-port and first-port rows up to 50 k pps; ``--daemons`` picks
for all rows). Our server matches knocks in the kernel (its default,
``--knock-matcher auto``); ``spa-user`` is our server matching them in user
space (``--knock-matcher user``), run beside it on the spoofed rows at 100 k
pps and at the maximum. *softirq CPU* is the whole machine's softirq time
per second of the row (``/proc/stat``): receiving the flood, the capture
filters and our kernel matcher run there, charged to no process.

A flood comes from ``bench/flooder.py`` in the client namespace (prebuilt
Ethernet frames to the server veth's MAC through an ``AF_PACKET`` socket,
``sendmmsg`` batches; spoofed sources 198.51.100.1–126 and 203.0.113.1–126,
252 in all), bounded in time and packet count. Kinds:

* ``random``: TCP SYN and UDP to random ports that are in no sequence;
* ``seq``: the six sequence ports (7000, 8000, 9000 and 5002 as TCP SYN,
  5001 and 5003 as UDP);
* ``first``: port 7000 only (the ``ssh`` door's first port).

During the flood the client knocks ``7000,8000,9000`` ten times, 0.6 s
apart plus a random 0–50 ms (a random phase against knockd's 50 ms capture
timeout), in this process as ``knock`` does (one SYN per port), each time from
a fresh client address (192.0.2.10–19, so each knock's door is checked on
its own), then connects to tcp/22 every millisecond from that address:
*served* = a connect completed within 1 s of the last knock; the latency is
last knock to that connect. Daemon CPU = its utime + stime over the flood's
wall time (``/proc/PID/stat``; children not included, as in knockd.md);
RSS from ``/proc/PID/status`` before the flood and after it. Spoofed grants
= firewall changes the daemon made for spoofed sources by the end of the row
(from its log: our grant lines, knockd's ``running command`` lines; our
``OPEN SESAME`` lines are rate-limited under floods, so they are not counted).
The memory
rows flood port 7000 at 50 k pps for 60 s (10 s with ``--quick``) and read
RSS every second.

Run as root from the repository root::

    sudo python -m bench.flood              # about 9 minutes
    sudo python -m bench.flood --quick      # about 2 minutes: fewer rates, a 10 s memory run

It also runs ``bench/capture_cost.py`` (what one flood packet costs our
capture loop, and the nft backend's ``open()`` next to a busy thread), whose
numbers the analysis uses.

Results are printed and written to ``docs/benchmarks.md`` between the
``<!-- knock-flood:start -->`` and ``<!-- knock-flood:end -->`` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import capture_cost  # noqa: E402
from bench.grant_latency import cpu_ticks, markdown_table, text_table  # noqa: E402
from bench.knocklab import (  # noqa: E402
    Daemon, FlooderProcess, KnockLab, Knocker, add_output_args, client_for, door_text, log, machine, need_root,
    parse_sequence, unwind_on_sigterm, utc_now, write_section,
)

START_MARK = "<!-- knock-flood:start -->"
END_MARK = "<!-- knock-flood:end -->"

LEGIT_SEQUENCE = "7000,8000,9000"
SEQ_PORTS = "7000/tcp,8000/tcp,9000/tcp,5001/udp,5002/tcp,5003/udp"
FIRST_PORT = "7000/tcp"
SPOOF_PREFIXES = ("198.51.100.", "203.0.113.")
KNOCKS = 10
KNOCK_GAP = 0.6
KNOCK_JITTER = 0.05  # added to each gap at random: knockd's 50 ms capture timeout is met at a random phase
SERVE_LIMIT = 1.0
WARM = 0.5  # flood runs this long before the first legitimate knock
POOL = 120
MEMORY_RATE = 50_000
MEMORY_SECONDS = 60.0
MEMORY_SECONDS_QUICK = 10.0
MAX_RATE_PROCS = 1  # sender processes for the "max" rows (one core left for the daemons)
FLOOD_SLACK = 3.0


def config_for(daemon: str) -> str:
    action = "open" if daemon in ("spa", "spa-user") else "command"
    return "".join([
        door_text("ssh", LEGIT_SEQUENCE, action),
        door_text("udp-fwd", "5001:udp,5002:tcp,5003:udp", action, tcpflags=None),
        door_text("udp-rev", "5003:udp,5002:tcp,5001:udp", action, tcpflags=None),
    ])


DAEMONS = {
    "spa": ("spa", "spa-server, `open = 22/tcp`"),
    "knockd": ("knockd", "knockd 0.8, iptables commands"),
    "spa-command": ("spa", "spa-server, iptables commands"),
    "spa-user": ("spa", "spa-server, `open = 22/tcp`, knocks matched in user space"),
}
#: Extra command-line arguments per daemon (ours matches knocks in the kernel unless told otherwise).
DAEMON_ARGS = {"spa-user": ("--knock-matcher", "user")}


@dataclass
class Scenario:
    kind: str  # none | random | seq | first
    rate: float  # pps; 0 with kind != none: as fast as the sender goes
    memory: bool = False

    @property
    def label(self) -> str:
        what = {"none": "none", "random": "random ports", "seq": "six sequence ports", "first": "first port (7000)"}[self.kind]
        return what + (" — memory run" if self.memory else "")

    @property
    def rate_label(self) -> str:
        if self.kind == "none":
            return "0"
        return "max" if self.rate == 0 else f"{self.rate / 1000:g} k"


def softirq_seconds() -> float:
    """Seconds every CPU has spent in softirq since boot."""
    return cpu_ticks()[6] / os.sysconf("SC_CLK_TCK")


def daemons_for(sc: Scenario, quick: bool) -> list[str]:
    """Default daemons per row: ours and knockd everywhere; ours with knockd's commands too on the spoofed
    sequence-port and first-port rows up to 50 k pps (not in quick mode: time)."""
    if not quick and not sc.memory and sc.kind in ("seq", "first") and 0 < sc.rate <= 50_000:
        return ["spa", "knockd", "spa-command"]
    if not sc.memory and sc.kind in ("seq", "first") and (sc.rate == 0 or sc.rate >= 100_000):
        return ["spa", "spa-user", "knockd"]  # where the Python matcher ran out: kernel and user side by side
    return ["spa", "knockd"]


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("none", 0), Scenario("random", 0), Scenario("seq", 50_000), Scenario("first", 0),
                Scenario("first", MEMORY_RATE, memory=True)]
    return [
        Scenario("none", 0),
        *(Scenario("random", r) for r in (1_000, 10_000, 50_000, 100_000, 0)),
        *(Scenario("seq", r) for r in (1_000, 10_000, 50_000, 100_000, 0)),
        *(Scenario("first", r) for r in (1_000, 10_000, 50_000, 100_000, 0)),
        Scenario("first", MEMORY_RATE, memory=True),
    ]


# -- the flood process ---------------------------------------------------------------


def flood_process(kl: KnockLab, sc: Scenario, duration: float, procs: int = 1, seed: int = 1) -> FlooderProcess:
    """The flooder for one scenario (``FlooderProcess``)."""
    args = ["--duration", f"{duration:g}", "--rate", f"{sc.rate:g}", "--procs", str(procs), "--seed", str(seed)]
    if sc.kind == "random":
        args += ["--kind", "random", "--exclude", SEQ_PORTS]
    elif sc.kind == "seq":
        args += ["--kind", "ports", "--ports", SEQ_PORTS]
    elif sc.kind == "first":
        args += ["--kind", "ports", "--ports", FIRST_PORT]
    else:
        raise ValueError(sc.kind)
    return FlooderProcess(kl, args)


def sender_max(seconds: float = 2.0) -> dict[int, float]:
    """The sender's own top rate (random-port frames, no daemon listening), with 1 and 2 processes."""
    out = {}
    with KnockLab(extra=0, tag="fc") as kl:
        for procs in (1, 2):
            f = flood_process(kl, Scenario("random", 0), seconds, procs=procs)
            f.wait_ready()
            f.go()
            out[procs] = f.stop(wait=True)["pps"]
    return out


# -- one row --------------------------------------------------------------------------


@dataclass
class Row:
    scenario: Scenario
    daemon: str
    sent_pps: float = 0.0
    sent: int = 0
    delivered: int = 0
    latencies: list[float | None] = field(default_factory=list)
    cpu: float = 0.0
    cpu_loop: float = 0.0  # the main thread's share (ours: the capture loop)
    #: The whole machine's softirq time per second: receiving the flood, the capture filters
    #: and our kernel matcher run there (accounted to no process).
    softirq: float = 0.0
    rss0: int = 0
    rss1: int = 0
    rss_series: list[tuple[float, int]] = field(default_factory=list)
    spoofed_grants: int = 0  # firewall changes made for spoofed sources by the end of the row
    legit_granted: int = 0  # legitimate knocks whose firewall change was made by the end of the row
    log_lines_per_s: float = 0.0
    firewall_entries: int = 0  # spoofed addresses in the ruleset at the end of the row
    code: str = ""  # commit of the daemon code the row ran (ours; the code changes under long runs)
    seconds: float = 0.0
    error: str = ""
    alive: bool = True

    @property
    def served(self) -> int:
        return sum(1 for x in self.latencies if x is not None)

    @property
    def median(self) -> float | None:
        ok = [x for x in self.latencies if x is not None]
        return statistics.median(ok) if ok else None


# Firewall changes in the daemons' logs, by address: our grant manager's "opened/extended door ... for ADDR"
# lines (never rate-limited), knockd's (and our command backend's) "running command: ... -A INPUT -s ADDR ".
_OUR_GRANT = re.compile(r"\] (?:opened|extended) door '[^']*' for (\S+) ")
_START_COMMAND = re.compile(r": running command: .* -A INPUT -s (\S+) ")


def grants_by_address(d: Daemon, daemon_name: str) -> Counter[str]:
    pattern = _START_COMMAND if daemon_name == "knockd" else _OUR_GRANT
    out: Counter[str] = Counter()
    with contextlib.suppress(FileNotFoundError):
        with open(d.log, errors="replace") as f:
            for line in f:
                if "door '" in line or "running command" in line:
                    m = pattern.search(line)
                    if m:
                        out[m.group(1)] += 1
    return out


def spoofed_in_firewall(kl: KnockLab) -> int:
    """Rules (knockd's iptables commands) or set elements (our nft backend) for spoofed sources, right now."""
    out = subprocess.run(["ip", "netns", "exec", kl.lab.server, "nft", "-j", "list", "ruleset"], capture_output=True,
                         text=True, timeout=60).stdout
    return sum(out.count(f'"{p}') for p in SPOOF_PREFIXES)


def knock_series(kl: KnockLab, n: int, seed: int = 1) -> list[float | None]:
    lab = kl.lab
    rng = random.Random(seed)
    knocker = Knocker(lab)
    steps = parse_sequence(LEGIT_SEQUENCE)
    out: list[float | None] = []
    next_at = time.perf_counter()
    for i in range(n):
        source = kl.sources[i]
        prepared = knocker.prepare(source, steps)
        client = client_for(lab, source, POOL)
        gc.collect()
        while (wait := next_at - time.perf_counter()) > 0:
            time.sleep(wait)
        t0 = knocker.fire(prepared)
        next_at = t0 + KNOCK_GAP + rng.uniform(0, KNOCK_JITTER)
        t1, _ = client.until_open(t0, SERVE_LIMIT)
        knocker.close(prepared)
        client.close()
        out.append(None if t1 is None else t1 - t0)
    return out


def run_row(sc: Scenario, daemon_name: str, quick: bool, log) -> Row:
    kind, _ = DAEMONS[daemon_name]
    row = Row(sc, daemon_name)
    memory_secs = MEMORY_SECONDS_QUICK if quick else MEMORY_SECONDS
    with KnockLab(extra=KNOCKS, tag="fl") as kl:
        flood = None
        if sc.kind != "none":  # frames are built while the daemon starts
            length = memory_secs if sc.memory else WARM + KNOCKS * KNOCK_GAP + SERVE_LIMIT + FLOOD_SLACK
            flood = flood_process(kl, sc, length, procs=MAX_RATE_PROCS if sc.rate == 0 else 1)
        try:
            d = Daemon(kl.lab, kind, config_for(daemon_name), extra=DAEMON_ARGS.get(daemon_name, ()))
            row.code = d.code if kind == "spa" else ""
        except BaseException:
            if flood is not None:
                flood.kill()
            raise
        try:
            if flood is not None:
                flood.wait_ready()
            time.sleep(0.3)  # let the daemon settle after start-up
            row.rss0 = d.rss_kb()
            cpu0, loop0 = d.cpu_seconds(), d.main_thread_cpu_seconds()
            soft0 = softirq_seconds()
            rx0 = kl.veth_rx()
            size0 = d.log_size()
            t0 = time.perf_counter()
            if flood is not None:
                flood.go()
            if sc.memory:
                end = t0 + memory_secs
                while time.perf_counter() < end and d.alive():
                    time.sleep(min(1.0, max(0.0, end - time.perf_counter())))
                    row.rss_series.append((time.perf_counter() - t0, d.rss_kb()))
            else:
                time.sleep(WARM)
                row.latencies = knock_series(kl, KNOCKS)
            result = flood.stop() if flood is not None else {"sent": 0, "pps": 0.0}
            t1 = time.perf_counter()
            row.alive = d.alive()
            if row.alive:
                row.cpu = (d.cpu_seconds() - cpu0) / (t1 - t0)
                row.cpu_loop = (d.main_thread_cpu_seconds() - loop0) / (t1 - t0)
                row.softirq = (softirq_seconds() - soft0) / (t1 - t0)
                row.rss1 = d.rss_kb()
            else:
                row.error = f"{kind} died during the flood"
            rx1 = kl.veth_rx()
            row.firewall_entries = spoofed_in_firewall(kl)
            row.sent, row.sent_pps = int(result["sent"]), float(result["pps"])
            row.delivered = rx1["packets"] - rx0["packets"]
            row.seconds = t1 - t0
            time.sleep(0.3)  # let the log catch up
            by_addr = grants_by_address(d, daemon_name)
            row.spoofed_grants = sum(n for a, n in by_addr.items() if a.startswith(SPOOF_PREFIXES))
            row.legit_granted = sum(1 for a in kl.sources if by_addr.get(a))
            row.log_lines_per_s = d.count_newlines(size0) / row.seconds
        except Exception as exc:  # noqa: BLE001 - report the row, keep going
            row.error = f"{type(exc).__name__}: {exc}"
            if flood is not None:
                flood.kill()
        finally:
            settle = d.cleanup()
            if settle > 0.5:
                log(f"  ({daemon_name}: {settle:.1f} s to kill what it left running in the namespace)")
    log(f"  {sc.label} {sc.rate_label} / {daemon_name}: sent {row.sent_pps:,.0f} pps, served {row.served}/{len(row.latencies)},"
        f" median {_ms(row.median)} ms, CPU {row.cpu * 100:.1f} % (softirq {row.softirq * 100:.0f} %), RSS {row.rss0 / 1024:.1f}->{row.rss1 / 1024:.1f} MB,"
        f" spoofed grants {row.spoofed_grants} (in firewall {row.firewall_entries}), legit granted {row.legit_granted},"
        f" log {row.log_lines_per_s:,.0f} lines/s{', ' + row.error if row.error else ''}")
    return row


# -- report -------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def _cpu(r: Row) -> str:
    if not r.alive:
        return "died"
    if r.daemon == "knockd":
        return f"{r.cpu * 100:.1f} %"
    return f"{r.cpu * 100:.1f} % ({r.cpu_loop * 100:.0f} % loop)"


def _rate(r: Row) -> str:
    if r.scenario.kind == "none":
        return "0"
    if r.scenario.rate == 0:
        return f"max: {r.sent_pps / 1000:.0f} k"
    return f"{r.sent_pps / 1000:.1f} k"


HEAD = ["flood", "rate sent, pps", "daemon", "served", "granted by the end", "median open ms", "max open ms",
        "daemon CPU", "softirq CPU", "RSS start→end MB", "spoofed grants", "spoofed in firewall", "log lines/s"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.scenario.memory:
            continue
        ok = [x for x in r.latencies if x is not None]
        out.append([
            r.scenario.label, _rate(r), DAEMONS[r.daemon][1],
            f"{r.served}/{len(r.latencies)}" if r.latencies else ("-" if not r.error else "error"),
            f"{r.legit_granted}/{len(r.latencies)}" if r.latencies else "-",
            _ms(r.median), _ms(max(ok)) if ok else "-",
            _cpu(r), f"{r.softirq * 100:.0f} %" if r.alive else "-",
            f"{_mb(r.rss0)}→{_mb(r.rss1)}" if r.rss1 else "-",
            str(r.spoofed_grants), str(r.firewall_entries), f"{r.log_lines_per_s:,.0f}",
        ])
    return out


MEM_HEAD = ["daemon", "rate sent, pps", "seconds", "RSS start MB", "RSS after 1/6 MB", "RSS end MB", "RSS max MB",
            "growth", "growth MB/min", "daemon CPU", "log lines/s"]


def memory_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        if not r.scenario.memory:
            continue
        series = r.rss_series
        if not series:
            out.append([DAEMONS[r.daemon][1], _rate(r), "-", _mb(r.rss0), "-", "-", "-", "-", "-", "-",
                        r.error or "-"])
            continue
        end = series[-1][1]
        early = series[max(0, len(series) // 6 - 1)][1]
        mx = max(v for _, v in series)
        secs = series[-1][0]
        growth = (end - r.rss0) / r.rss0 * 100 if r.rss0 else 0.0
        # Growth rate after the first sixth (start-up allocations are not a leak): MB per minute.
        late = series[len(series) // 6:]
        slope = ((late[-1][1] - late[0][1]) / 1024) / ((late[-1][0] - late[0][0]) / 60) if len(late) > 1 and late[-1][0] > late[0][0] else 0.0
        out.append([DAEMONS[r.daemon][1], _rate(r), f"{secs:.0f}", _mb(r.rss0), _mb(early), _mb(end), _mb(mx),
                    f"{growth:+.1f} %", f"{slope:+.2f}", f"{r.cpu * 100:.1f} %" if r.alive else "died",
                    f"{r.log_lines_per_s:,.0f}"])
    return out


def find(rows: list[Row], daemon: str, kind: str, rate: float | None = None, memory: bool = False) -> Row | None:
    for r in rows:
        if r.daemon == daemon and r.scenario.kind == kind and r.scenario.memory == memory and (
                rate is None or r.scenario.rate == rate):
            return r
    return None


def _rates(rows: list[Row], kind: str) -> list[float]:
    return sorted({r.scenario.rate for r in rows if r.scenario.kind == kind and not r.scenario.memory},
                  key=lambda x: (x == 0, x))


def _served(r: Row | None) -> str:
    return "-" if r is None or not r.latencies else f"{r.served}/{len(r.latencies)}"


def _growth(r: Row | None) -> float | None:
    if r is None or not r.rss_series or not r.rss0:
        return None
    return (r.rss_series[-1][1] - r.rss0) / r.rss0 * 100


def findings(rows: list[Row]) -> list[str]:
    """What this run's numbers say, side by side; each point only for rows that ran."""
    out = []
    s0, k0 = find(rows, "spa", "none"), find(rows, "knockd", "none")
    s_max, k_max = find(rows, "spa", "random", 0), find(rows, "knockd", "random", 0)
    if s0 and k0:
        out.append(f"- **No flood**: ours {_served(s0)} served, {_ms(s0.median)} ms median open; knockd {_served(k0)},"
                   f" {_ms(k0.median)} ms.")
    if s_max and k_max:
        out.append(
            f"- **Random ports cost neither daemon anything, up to the sender's maximum**: at"
            f" {s_max.sent_pps / 1000:.0f} k pps ours served {_served(s_max)} at {_ms(s_max.median)} ms median with"
            f" {s_max.cpu * 100:.1f} % CPU, knockd {_served(k_max)} at {_ms(k_max.median)} ms with {k_max.cpu * 100:.1f} %."
        )
    for kind, what in (("seq", "the six sequence ports"), ("first", "the first port")):
        parts = []
        for rate in _rates(rows, kind):
            cells = []
            for d, name in (("spa", "ours"), ("spa-user", "ours matching in user space"), ("knockd", "knockd"),
                            ("spa-command", "ours with commands")):
                r = find(rows, d, kind, rate)
                if r is not None:
                    cells.append(f"{name} {_served(r)} ({_ms(r.median)} ms, {r.cpu * 100:.0f} % CPU)")
            if cells:
                parts.append(f"{'max' if rate == 0 else f'{rate / 1000:g} k'} pps: " + ", ".join(cells))
        if parts:
            out.append(f"- **Spoofed floods on {what}**, served (median open, daemon CPU): " + "; ".join(parts) + ".")
    for d, name in (("spa", "our server"), ("knockd", "knockd")):
        r = find(rows, d, "first", MEMORY_RATE, True)
        g = _growth(r)
        if r is not None and g is not None:
            out.append(f"- **Memory, {name}**: {_mb(r.rss0)} → {_mb(r.rss_series[-1][1])} MB over"
                       f" {r.rss_series[-1][0]:.0f} s of a {r.sent_pps / 1000:.0f} k pps first-port flood ({g:+.1f} %).")
    return out


def analysis(rows: list[Row], cost: dict) -> list[str]:
    """Why: the mechanisms behind the rows, with this run's numbers (and the cost measurements it made)."""
    out = ["**Why.**", ""]
    s0, k0 = find(rows, "spa", "none"), find(rows, "knockd", "none")
    if s0 and k0 and s0.median and k0.median:
        out.append(
            f"- *Where we win: latency.* {_ms(s0.median)} against {_ms(k0.median)} ms without a flood, and the gap"
            " holds under every flood: the kernel matcher wakes our loop for an open at once, libpcap hands"
            " knockd its packets when its 50 ms buffer timeout ends. Random-port floods never reach either process:"
            " both filter in the kernel (ours: BPF programs on AF_PACKET sockets; knockd: libpcap's)."
        )
    cap = cost.get("capture", {})
    seq, first = cap.get("six sequence ports"), cap.get("first port")
    sm, km = find(rows, "spa", "seq", 0), find(rows, "knockd", "seq", 0)
    if seq and seq["opens_per_packet"]:
        out.append(
            "- *Spurious opens are part of the method.* With six ports flooded at random, three 3-step doors and one"
            f" independent attempt per (source, door), one packet in about {1 / seq['opens_per_packet']:.0f} completes"
            " a door for its (spoofed) source in our matcher (measured on the flooder's own frames by"
            " `bench/capture_cost.py`); knockd's attempt list loses attempts and completes fewer. Either way tcp/22"
            " opens for addresses the attacker picked (*spoofed grants*): a spoofed sequence-port flood is a way to"
            " open the door for any address, with knockd as with us."
        )
    if sm and km:
        out.append(
            f"- *Where we win: what those opens do to the firewall.* knockd's commands append one iptables rule per"
            f" spurious open ({km.firewall_entries} rules for spoofed sources at the end of the sequence-port max row),"
            " and every packet to the host then walks them: the flood's own receive path slowed so much that the"
            f" sender reached only {km.sent_pps / 1000:.0f} k pps against knockd, against {sm.sent_pps / 1000:.0f} k"
            " against ours, whose grants are elements of one nft set (a hash lookup; at most one per source and"
            " port, so the 252 spoofed sources leave at most 252). knockd's CPU column also leaves out its fork per"
            " open (the shell and iptables run in children). Our server running the same commands"
            " (*spa-server, iptables commands*) pays the same per-rule cost."
        )
    ms_, mk = find(rows, "spa", "first", MEMORY_RATE, True), find(rows, "knockd", "first", MEMORY_RATE, True)
    gs, gk = _growth(ms_), _growth(mk)
    if gs is not None:
        out.append(
            f"- *Where we win: memory.* Ours {gs:+.1f} % (start-up allocation in the first seconds, then flat): one"
            " attempt per (source, door), capped at 65 536 (in the kernel matcher's map, allocated whole at start and"
            " not in RSS; in user space the oldest evicted first), and a bounded address cache"
            + (f"; knockd {gk:+.0f} %, the attempt-list leak of knockd.md §5/§7.4." if gk is not None else ".")
        )
    s50, k50 = find(rows, "spa", "seq", 50_000), find(rows, "knockd", "seq", 50_000)
    if s50 and k50:
        nft = cost.get("nft", {})
        text = (
            f"- *Grants under a flood.* At 50 k pps on the sequence ports ours served {_served(s50)}"
            f" ({_ms(s50.median)} ms median) and knockd {_served(k50)} ({_ms(k50.median)} ms). The grant manager"
            " takes every pending grant at once, collapsed per (door, address), and applies them with one journal"
            " commit and one nft transaction, so spurious opens cannot queue up in front of a legitimate one. (Until"
            " commit eda3647 it applied them one at a time, each a journal write with fsync and an nft"
            " transaction, about 1.3 ms of CPU and much more wall time next to the busy capture thread, since every"
            " call that releases the GIL must win it back"
        )
        if nft:
            text += (f": the nft backend's `open()` took {nft['alone']:.2f} ms alone and {nft['busy_thread']:.2f} ms"
                     " next to a CPU-bound Python thread")
        text += (". This script, run on the commit before it, measured 0/10 served at 50 k pps and a median of"
                 " 300–350 ms at 10 k pps, with thousands of grants still queued at the end of the row.)")
        out.append(text)
    if seq and first:
        sf_rows = [r for r in (find(rows, "spa-user", "first", 100_000), find(rows, "spa-user", "first", 0),
                               find(rows, "spa-user", "seq", 100_000), find(rows, "spa-user", "seq", 0))
                   if r is not None and r.latencies]
        text = (
            "- *In user space (`--knock-matcher user`) the capture loop's cost per packet* sets the ceiling."
            " Measured on the flooder's own frames"
            " (`bench/capture_cost.py`, table below), the whole loop costs"
            f" {first['loop_us']:.1f} µs per first-port packet and {seq['loop_us']:.1f} µs per sequence-port packet"
            " (reading the packet ring, parsing, matching, rate-limited log lines), so one core handles about"
            f" {1e6 / first['loop_us'] / 1000:.0f} k and {1e6 / seq['loop_us'] / 1000:.0f} k such packets a second."
            f" Parsing and matching alone went from {first['before_us']:.1f} to {first['after_us']:.1f} µs"
            f" ({first['speedup']:.1f}× faster) on first-port frames and from {seq['before_us']:.1f} to"
            f" {seq['after_us']:.1f} µs ({seq['speedup']:.1f}×) on sequence-port frames, measured in the same process"
            " against the matcher this code replaced."
        )
        text += (" Past the ceiling the kernel drops packets, legitimate knocks among them (*granted by the end*"
                 " below 10), and the packet ring (4096 frames) holds up to tens of milliseconds of flood in front of"
                 " a knock")
        if sf_rows:
            text += " (" + "; ".join(
                f"{r.scenario.label} at {r.sent_pps / 1000:.0f} k pps: {_served(r)} served,"
                f" {_ms(r.median) + ' ms median, ' if r.median is not None else ''}the loop at {r.cpu_loop * 100:.0f} % CPU"
                for r in sf_rows) + ")"
        hot = [r for r in (find(rows, "spa-user", "seq", 100_000), find(rows, "spa-user", "seq", 0))
               if r is not None and r.cpu - r.cpu_loop > 0.15]
        if hot:
            r = hot[0]
            text += (f". On sequence-port floods the loop is not alone: at {r.sent_pps / 1000:.0f} k pps the grant"
                     f" worker took {(r.cpu - r.cpu_loop) * 100:.0f} % more ({r.spoofed_grants} spoofed grants, each a"
                     " journal row, an nft element and an `opened`/`extended` log line; a spoofed source completing a"
                     " door again within a second of its last open is only counted), and both threads share one GIL,"
                     f" so the process tops out near one core ({r.cpu * 100:.0f} %)")
        kf = find(rows, "knockd", "first", 0)
        if kf:
            text += (f". knockd at the first-port maximum ({kf.sent_pps / 1000:.0f} k pps) served {_served(kf)} at"
                     f" {kf.cpu * 100:.0f} % CPU")
        out.append(text + ".")
    kern = cost.get("kernel", {})
    kcells = [f"{r.scenario.label} at {r.sent_pps / 1000:.0f} k pps: {_served(r)} served, daemon at"
              f" {r.cpu * 100:.1f} % CPU, softirq {r.softirq * 100:.0f} %"
              + (f" (matching in user space: {_served(u)}, daemon {u.cpu * 100:.0f} %, softirq {u.softirq * 100:.0f} %"
                 f" at {u.sent_pps / 1000:.0f} k pps)" if u is not None else "")
              for r, u in ((find(rows, "spa", kind, 0), find(rows, "spa-user", kind, 0)) for kind in ("first", "seq"))
              if r is not None and r.latencies]
    if kcells:
        text = ("- *Where we win: the knock matcher in the kernel* (the default). The daemon generates an eBPF program"
                " from its doors that matches every knock where it arrives and reports only events, so the daemon's"
                " CPU is the grants' and the log's, whatever the flood: " + "; ".join(kcells) + ".")
        if kern:
            text += (" The program itself costs " + " and ".join(
                f"{v['ns']:.0f} ns a {'first-port' if k.startswith('first') else 'sequence-port'} packet"
                for k, v in kern.items()) + " (`BPF_PROG_TEST_RUN`), inside the softirq time that receiving the"
                     " flood costs the kernel anyway; the sender, which shares the two vCPUs with that softirq"
                     " work, sets the maximum rate.")
        out.append(text)
    s1, k1 = find(rows, "spa", "seq", 1_000), find(rows, "knockd", "seq", 1_000)
    if s1 and k1:
        out.append(
            f"- *Where we lose: CPU at low rates.* {s1.cpu * 100:.1f} % at 1 k pps of sequence-port traffic against"
            f" knockd's {k1.cpu * 100:.1f} %: the matching is in the kernel, but the {s1.spoofed_grants} spoofed"
            " opens of the row each cost a grant (journal row, nft element) and log lines."
        )
    ideas = [
        "on sequence-port floods the daemon's CPU is the spoofed grants' (a spoofed source completes a door about"
        " once in 74 packets): that is the method's (a spoofed success opens only for the spoofed address), but a"
        " per-source rate limit on opens would cut the firewall work",
    ]
    out += ["", "**What would help next** (proposed; not done here): " + "; ".join(ideas) + "."]
    return out


def render_section(rows: list[Row], info: dict[str, str], when: str, elapsed: float, quick: bool,
                   calib: dict[int, float], cost: dict) -> str:
    machine_lines = "\n".join(f"- {k}: {v}" for k, v in info.items())
    mem_secs = MEMORY_SECONDS_QUICK if quick else MEMORY_SECONDS
    cal = ", ".join(f"{v / 1000:.0f} k pps with {p} process{'es' if p > 1 else ''}" for p, v in sorted(calib.items()))
    ms_ = find(rows, "spa", "first", MEMORY_RATE, True)
    goal = "not measured in this run"
    if ms_ and ms_.rss_series and ms_.rss0:
        g = (ms_.rss_series[-1][1] - ms_.rss0) / ms_.rss0 * 100
        mx = (max(v for _, v in ms_.rss_series) - ms_.rss0) / ms_.rss0 * 100
        goal = (f"**{'met' if abs(g) <= 10 and mx <= 10 else 'NOT met'}**: {g:+.1f} % at the end, {mx:+.1f} % at the"
                f" highest, over {ms_.rss_series[-1][0]:.0f} s")
    errors = [f"- {r.scenario.label} {r.scenario.rate_label} / {r.daemon}: {r.error}" for r in rows if r.error]
    codes: dict[str, list[Row]] = {}
    for r in rows:
        if r.code:
            codes.setdefault(r.code, []).append(r)
    short = [r for r in rows if r.delivered and r.sent and r.delivered < r.sent]
    parts = [
        START_MARK,
        "## Floods: legitimate knocks, CPU and memory under packet floods",
        "",
        f"Run {when} by `bench/flood.py`{' --quick' if quick else ''} ({elapsed / 60:.1f} min in all).",
        "",
        machine_lines,
        "",
        "**Method.** Every row is a fresh pair of network namespaces (`Lab`) with `iptables -P INPUT DROP`",
        "(iptables-nft) and a service on tcp/22 in the server namespace, and one daemon there (`-i veth0`) with",
        "the reference measurements' three doors (knockd.md §7): `7000,8000,9000` with `tcpflags = syn`, and",
        "`5001:udp,5002:tcp,5003:udp` and its reverse; `seq_timeout = 5`, `cmd_timeout = 10`. Our `spa-server`",
        "opens `open = 22/tcp` (nft set elements) and matches knocks in the kernel (*knocks matched in user space*:",
        "`--knock-matcher user`); knockd runs the seed's commands",
        "(`/usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT`, `-D` after `cmd_timeout`), and",
        "so does *spa-server, iptables commands*. The flood comes from `bench/flooder.py` in the client",
        "namespace: frames built beforehand (Ethernet to the server veth's MAC, IPv4 with valid checksums, TCP",
        "SYN or 1-byte UDP), sent through an `AF_PACKET` socket on the client veth in `sendmmsg` batches of up to",
        "1024 (through `ctypes`), paced to the target rate and never above it (when the receiving side cannot",
        "take that rate it gets what it can: *rate sent*); spoofed sources 198.51.100.1–126 and",
        "203.0.113.1–126 (252), one chosen at random per frame from a list of 65 536 frames sent in a loop.",
        "*random ports*: TCP SYN and UDP, half each, to ports in no sequence (and not 22). *six sequence ports*:",
        "7000, 8000, 9000, 5002 as TCP SYN and 5001, 5003 as UDP. *first port*: 7000 (TCP SYN) only. Every flood",
        f"is bounded in time and in packets and stays between the two namespaces. The sender alone (no daemon,",
        f"random ports) reaches {cal}; the *max* rows use one sender process so that a core is left for the",
        "daemon (the kernel's receive path for the flood runs in the sender's context).",
        "",
        f"During each flood the client knocks `{LEGIT_SEQUENCE}` {KNOCKS} times, {KNOCK_GAP:g} s apart (plus a random",
        f"0–{KNOCK_JITTER * 1e3:.0f} ms, so that knockd's 50 ms capture timeout is met at a random phase), from this",
        "process as `knock` does (one SYN per port), each time from a fresh client address (192.0.2.10–19, so",
        "every knock's door is checked on its own; knockd.md's runs used one address and the command log), then",
        "connects to tcp/22 from that address every millisecond. *served*: a connect completed within",
        f"{SERVE_LIMIT:g} s of the last knock; *granted by the end*: the daemon had made that address's firewall",
        "change by the end of the row, late or not (from its log: our `opened door` lines, knockd's `running",
        "command` lines); *open ms*: last knock to the first completed connect. *daemon CPU*: its utime +",
        "stime over the flood's wall time (`/proc/PID/stat`; commands run as children are not counted, as in",
        "knockd.md); for ours, *loop* is the main thread, the capture loop (the rest is the grant worker). *RSS*:",
        "`VmRSS` just before and just after the flood. *spoofed grants*: firewall changes made for spoofed",
        "sources (the same log lines; ours collapses repeats per door and address while they wait, knockd runs",
        "its command every time); *spoofed in firewall*: spoofed addresses in the ruleset at the end (`nft list",
        "ruleset`: our set elements, or iptables rules). *log lines/s*: how fast the daemon's log grew (knockd",
        "writes a `Stage` line per counted knock; ours rate-limits those lines and logs a count of the rest",
        "once a second). *rate sent*: what the sender achieved.",
        "",
        markdown_table(HEAD, table_rows(rows)),
        "",
    ]
    parts += [
        "The machine is shared with other jobs (see the load average above); a single slow sample, a *max* far",
        "above its row's median, is as likely to be one of them as the daemon: rerun the row (`--only`) to check.",
        "",
    ]
    if short:
        parts += ["The server veth received fewer packets than were sent in: " + ", ".join(
            f"{r.scenario.label} {r.scenario.rate_label} / {r.daemon} ({r.delivered}/{r.sent})" for r in short) + ".", ""]
    else:
        parts += ["The server veth's receive counter matched the packets sent in every row.", ""]
    mem = memory_rows(rows)
    if mem:
        parts += [
            f"**Memory over time**: port 7000 only, {MEMORY_RATE / 1000:g} k pps from the 252 spoofed sources for"
            f" {mem_secs:g} s{' (`--quick`; 60 s without it)' if quick else ''}, RSS read every second. *growth MB/min*",
            "is measured after the first sixth of the run (start-up allocations are not a leak).",
            "",
            markdown_table(MEM_HEAD, mem),
            "",
            f"**Goal: our RSS flat within 10 %** — {goal}. knockd.md §7.4 measured knockd at +126 MB/min at this rate.",
            "",
        ]
    cap = cost.get("capture", {})
    nft = cost.get("nft", {})
    if cap:
        parts += [
            "**Cost per packet in our capture loop** (`bench/capture_cost.py`, run by this script: the flooder's",
            "frames, the daemon's doors and log set-up, in this process, one core, best of 5). *before*: `parse_ip`",
            "and the matcher this code replaced (kept in `tests/fuzz/reference_matcher.py`); *after*: `fields` and",
            "`Matcher.feed_fields`; *whole loop*: `Daemon._read` over a packet ring in memory (ring walk, parse, match,",
            "grants handed to a recorder, rate-limited log lines):",
            "",
            markdown_table(
                ["flood frames", "before µs", "after µs (parse + match)", "speed-up", "ring µs", "whole loop µs",
                 "packets/s at most", "events / packet", "log lines / packet", "opens / packet"],
                [[k, f"{v['before_us']:.2f}", f"{v['after_us']:.2f} ({v['parse_us']:.2f} + {v['feed_us']:.2f})",
                  f"{v['speedup']:.2f}×", f"{v['ring_us']:.2f}", f"{v['loop_us']:.2f}", f"{1e6 / v['loop_us']:,.0f}",
                  f"{v['events_per_packet']:.2f}", f"{v['lines_per_packet']:.4f}",
                  f"1 in {1 / v['opens_per_packet']:.0f}" if v["opens_per_packet"] else "0"]
                 for k, v in cap.items()],
            ),
            "",
        ]
        if nft:
            parts += [f"nft backend `open()` of a new element, median: {nft['alone']:.2f} ms alone, "
                      f"{nft['busy_thread']:.2f} ms with a CPU-bound Python thread in the same process.", ""]
    kern = cost.get("kernel", {})
    if kern:
        parts += ["**The kernel matcher's program alone** (the default; `bench/capture_cost.py`: each of the",
                  "flooder's frames once through the program for these doors with `BPF_PROG_TEST_RUN`, which times",
                  "the run in the kernel, less the same run of a program that only returns; one system call a",
                  "packet, on cold caches, so an upper bound): " + "; ".join(
                      f"{k}: {v['ns']:.0f} ns a packet ({v['events_per_packet']:.2f} events a packet)"
                      for k, v in kern.items())
                  + ". The receive path around it (veth, packet sockets) is in the *softirq CPU* column.", ""]
    if len(codes) > 1:
        parts += ["**The code changed during this run**; our server's rows ran: " + "; ".join(
            f"commit {c}: " + ", ".join(f"{r.scenario.label} {r.scenario.rate_label} / {r.daemon}" for r in rs)
            for c, rs in codes.items()) + ".", ""]
    if errors:
        parts += ["Rows with errors:", "", *errors, ""]
    found = findings(rows)
    if found:
        parts += ["**The numbers, side by side.**", "", *found, ""]
    why = analysis(rows, cost)
    if len(why) > 2:
        parts += [*why, ""]
    parts += [
        "**Reference** (knockd.md §7.2, 2-vCPU Debian 12 VM, knockd only, their sender topped out at 150–170 k",
        "pps): random ports up to 169 k pps 10/10 served at 0.2 % CPU; six sequence ports 10/10 up to 50 k pps",
        "(38.5 % CPU), 7/10 and 90 ms median at 84.9 k pps (55.8 % CPU, 1989 spurious command runs); first port",
        "8/10 at 131 k pps (77.1 % CPU, RSS 12→53 MB); memory +126 MB/min at 50 k pps (§7.4).",
        "",
        "**Re-run** (root, from the repository root):",
        "",
        "```",
        "sudo python -m bench.flood                  # about 9 minutes; or: sudo python bench/flood.py",
        "sudo python -m bench.flood --quick          # about 2 minutes: fewer rates and daemons, 10 s memory run",
        "sudo python -m bench.flood --only seq,first --daemons spa,spa-command",
        "python -m bench.capture_cost                # the per-packet costs alone",
        "```",
        "",
        "The run rewrites only this section of `docs/benchmarks.md` (between the `knock-flood` markers).",
        END_MARK,
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rates and a 10 s memory run (about 2 minutes)")
    ap.add_argument("--daemons", default="",
                    help=f"comma list of {', '.join(DAEMONS)} for every row (default: spa and knockd everywhere, and"
                         " spa-command on the spoofed sequence-port and first-port rows unless --quick)")
    ap.add_argument("--only", default="", help="flood kinds to run: none,random,seq,first,memory (default all)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if not need_root("flood", "network namespaces, firewalls, raw sockets"):
        return 2
    daemons = [d.strip() for d in args.daemons.split(",") if d.strip()]
    bad = [d for d in daemons if d not in DAEMONS]
    if bad:
        ap.error(f"unknown daemon(s) {', '.join(bad)}")
    only = {k.strip() for k in args.only.split(",") if k.strip()}

    unwind_on_sigterm()

    info = machine()
    when = utc_now()
    start = time.perf_counter()
    log("sender calibration (no daemon)")
    calib = sender_max()
    log("  " + ", ".join(f"{p} proc: {v:,.0f} pps" for p, v in calib.items()))
    log("cost per packet of our capture loop (bench/capture_cost.py)")
    cost: dict = {}
    try:
        cost["capture"] = capture_cost.measure(config_for("spa"), {"six sequence ports": SEQ_PORTS,
                                                                   "first port": FIRST_PORT})
        cost["nft"] = capture_cost.nft_open_with_busy_thread()
        cost["kernel"] = capture_cost.kernel_cost(config_for("spa"), {"six sequence ports": SEQ_PORTS,
                                                                      "first port": FIRST_PORT})
    except Exception as exc:  # noqa: BLE001 - the rows matter more
        log(f"  failed: {type(exc).__name__}: {exc}")
    rows: list[Row] = []
    for sc in scenarios(args.quick):
        key = "memory" if sc.memory else sc.kind
        if only and key not in only:
            continue
        for d in daemons or daemons_for(sc, args.quick):
            rows.append(run_row(sc, d, args.quick, log))
    elapsed = time.perf_counter() - start
    print()
    print(text_table(HEAD, table_rows(rows)))
    mem = memory_rows(rows)
    if mem:
        print()
        print(text_table(MEM_HEAD, mem))
    for line in findings(rows):
        print(line)
    for line in analysis(rows, cost):
        print(line)
    if not args.no_write:
        out = Path(args.output)
        write_section(out, START_MARK, END_MARK, render_section(rows, info, when, elapsed, args.quick, calib, cost))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
