"""SPA latency: from the SPA datagram sent to the first TCP connect that gets through, ours and fwknopd's.

Method of fwknop.md §13(a): a prebuilt packet, then a connect retried every
few milliseconds (here every 1 ms) until one completes. Rows, each in a fresh
``KnockLab`` (server and client namespaces, one veth pair, a service on
tcp/22 in the server namespace, default deny):

* ``spa-nft``: our ``spa-server``, one SPA door with ``open = 22/tcp``; the
  server namespace's default deny is native nftables (an ``inet`` table with
  ``policy drop``, as in ``tests/netns/test_spa.py``);
* ``spa-ipt``: the same server and door, with the iptables-nft default deny
  (``INPUT`` policy DROP) that fwknopd needs;
* ``fwknopd-udp``: Debian's fwknopd in UDP-server mode (``-U``; plus an INPUT
  accept rule for udp/62201, which that mode needs);
* ``fwknopd-pcap``: Debian's fwknopd with its default libpcap capture.

The fwknopd rows run only when ``fwknopd`` is installed (Debian's
``fwknop-server``); their packets come from Debian's ``fwknop`` client (Rijndael
+ HMAC-SHA256, ``-A tcp/22 -a SOURCE``, ``-T -B``: built and saved, not sent).

Per sample: a source address no earlier sample used (192.0.2.10 and up; the
server namespace has a permanent neighbour entry for each), a fresh packet
asking to open tcp/22 for that address, built before the clock starts
(ours: ``spa.protocol.build``), a UDP socket bound to the source and
connect sockets made beforehand; a random pause of 50–150 ms (a random phase
against fwknopd's 100 ms loop sleep); ``t0`` just before ``sendto``; then a
new non-blocking connect to 192.0.2.1:22 every 1 ms, each on a fresh pre-made
socket, until one completes: ``t1`` (``bench.knocklab.Prober``). Latency =
``t1 − t0``; nothing within 2 s is a failure. Two warm-up samples per row
are not counted.

Run as root from the repository root::

    sudo python -m bench.spa_latency                  # about a minute
    sudo python -m bench.spa_latency --samples 20 --only spa-nft,fwknopd-udp

Results are printed and written to ``docs/benchmarks.md`` between the
``<!-- spa-latency:start -->`` and ``<!-- spa-latency:end -->`` markers.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.grant_latency import markdown_table, text_table  # noqa: E402
from bench.knocklab import (  # noqa: E402
    Daemon, KnockLab, add_only_arg, add_output_args, client_for, load_average, log, machine, ms, need_root,
    percentile, rows_wanted, unwind_on_sigterm, utc_now, write_section,
)
from bench.spalab import Fwknopd, FwknopKeys, SpaKeys, UdpSender, fwknop_version, scratch_dir  # noqa: E402

START_MARK = "<!-- spa-latency:start -->"
END_MARK = "<!-- spa-latency:end -->"

WARMUP = 2
SAMPLE_LIMIT = 2.0
DURATION = 60  # door / FW_ACCESS_TIMEOUT: never closes within a row
POOL = 250  # fwknopd's pcap mode needs up to ~190 attempts at 1 ms
ATTEMPT_INTERVAL = 0.001
GOAL_MS = 3.0
# fwknop.md §13(a): n=30, pre-built packet, connect retried every 5 ms (median, mean, min, p90, max).
REFERENCE = [
    ("fwknopd 2.6.10, UDP server (fwknop.md §13(a))", "16.3", "10.8", "16.9", "18.8"),
    ("fwknopd 2.6.10, pcap defaults (fwknop.md §13(a))", "139.6", "32.1", "150.5", "152.4"),
]


@dataclass
class RowSpec:
    name: str
    kind: str  # spa | fwknopd
    mode: str  # spa: nft | iptables-nft (the default deny); fwknopd: udp | pcap
    label: str
    firewall: str


ROWS = [
    RowSpec("spa-nft", "spa", "nft", "spa-server, SPA door, `open = 22/tcp`",
            "nft default deny (inet table); grant = nft set element (netlink)"),
    RowSpec("spa-ipt", "spa", "iptables-nft", "spa-server, SPA door, `open = 22/tcp`",
            "iptables-nft default deny; grant = nft set element (netlink)"),
    RowSpec("fwknopd-udp", "fwknopd", "udp", "fwknopd, UDP server (`-U`)",
            "iptables-nft default deny + udp/62201 accept; grant = 5 `iptables` execs"),
    RowSpec("fwknopd-pcap", "fwknopd", "pcap", "fwknopd, pcap (defaults)",
            "iptables-nft default deny; grant = 5 `iptables` execs"),
]
ROW_NAMES = [r.name for r in ROWS]


@dataclass
class RowResult:
    spec: RowSpec
    latencies: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    failures: int = 0
    late_sockets: int = 0
    baseline: list[float] = field(default_factory=list)
    load: str = ""
    granted: int = 0  # accept lines in the daemon's log (warm-up included)
    error: str = ""

    @property
    def samples(self) -> int:
        return len(self.latencies) + self.failures


def run_row(spec: RowSpec, samples: int, log, interval: float = ATTEMPT_INTERVAL) -> RowResult:
    res = RowResult(spec)
    rng = random.Random(11)
    deny = spec.mode if spec.kind == "spa" else "iptables-nft"
    with scratch_dir("spa-bench-lat-") as tmp, KnockLab(extra=samples + WARMUP, tag="sl", deny=deny) as kl:
        lab = kl.lab
        if spec.kind == "spa":
            keys = SpaKeys(tmp)
            daemon = Daemon(lab, "spa", keys.config_text(duration=DURATION))
            make = lambda source: keys.packet(source)  # noqa: E731
            accepted = "OPEN SESAME (SPA"
        else:
            fk = FwknopKeys()
            prebuilt = dict(zip(kl.sources, fk.packets(kl.sources, tmp)))
            daemon = Fwknopd(lab, spec.mode, fk, access_timeout=DURATION)
            make = prebuilt.__getitem__
            accepted = "Added access rule"
        try:
            for i, source in enumerate(kl.sources):
                packet = make(source)
                sender = UdpSender(lab, source)
                client = client_for(lab, source, POOL)
                if client.connect_once(0.02) is not None:
                    raise RuntimeError(f"tcp/22 answers {source} before any SPA: the default deny is not filtering")
                client.fill(POOL)
                gc.collect()
                time.sleep(rng.uniform(0.05, 0.15))
                t0 = sender.send(packet)
                t1, attempts = client.until_open(t0, SAMPLE_LIMIT, interval)
                sender.close()
                if i >= WARMUP:
                    if t1 is None:
                        res.failures += 1
                    else:
                        res.latencies.append(t1 - t0)
                        res.attempts.append(attempts)
                    res.late_sockets += client.late
                    if (i - WARMUP + 1) % 10 == 0:
                        log(f"  {spec.name}: {i - WARMUP + 1}/{samples}")
                if i == len(kl.sources) - 1 and t1 is not None:
                    for _ in range(20):  # a connect through a door already open, same sockets and path
                        client.fill(4)
                        d = client.connect_once(0.5)
                        if d is not None:
                            res.baseline.append(d)
                client.close()
            res.load = load_average()
            time.sleep(0.2)
            res.granted = daemon.count_lines(accepted)
            if not daemon.alive():
                res.error = f"{spec.kind} exited during the row"
        finally:
            daemon.cleanup()
    return res


HEAD = ["row", "daemon", "firewall", "samples", "failures", "min ms", "median ms", "p90 ms", "max ms",
        "connect attempts, median / max", "baseline connect, median ms", "load average after the row"]


def summary_rows(results: list[RowResult]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.latencies:
            lat = r.latencies
            stats = [ms(min(lat)), ms(statistics.median(lat)), ms(percentile(lat, 90)), ms(max(lat))]
            att = f"{statistics.median(r.attempts):g} / {max(r.attempts)}"
        else:
            stats, att = ["-"] * 4, "-"
        base = f"{statistics.median(r.baseline) * 1e3:.3f}" if r.baseline else "-"
        rows.append([f"`{r.spec.name}`", r.spec.label, r.spec.firewall, str(r.samples), str(r.failures), *stats, att,
                     base, r.load or "-"])
    return rows


def med(by: dict[str, RowResult], name: str) -> float | None:
    r = by.get(name)
    return statistics.median(r.latencies) * 1e3 if r is not None and r.latencies else None


def findings(by: dict[str, RowResult], interval: float = ATTEMPT_INTERVAL) -> list[str]:
    out = []
    n, i, u, p = med(by, "spa-nft"), med(by, "spa-ipt"), med(by, "fwknopd-udp"), med(by, "fwknopd-pcap")
    if n is not None:
        out.append(f"- **spa-server: {n:.2f} ms median** from the datagram to a completed connect (nft default deny)"
                   + (f"; {i:.2f} ms with the iptables-nft default deny fwknopd uses." if i is not None else ".")
                   + " The path: the packet socket wakes the capture loop at once, the verifier runs its checks"
                   " (hint lookup, XChaCha20-Poly1305, time, replay cache, one Ed25519 verify: about 0.1 ms in all,"
                   " see the SPA costs section, three to four times that on a CPU that was idle), then the loop"
                   " adds the nft set element itself (one netlink batch; the grant manager's worker does it when"
                   " busy), and the worker journals the grant and its nonce right after (`synchronous=FULL`).")
    if u is not None:
        out.append(f"- **fwknopd, UDP server: {u:.1f} ms median**: its socket gets the datagram at once; then"
                   " base64, HMAC, AES, the digest cache, and five `iptables` processes (list the chain, create it,"
                   " check the jump, check the rule, append it), about 2 ms each.")
    if p is not None:
        r = by["fwknopd-pcap"]
        out.append(f"- **fwknopd, pcap (its default): {p:.1f} ms median, max {max(r.latencies) * 1e3:.1f} ms**: the"
                   " capture loop takes up to 100 packets, then sleeps 100 ms (`PCAP_LOOP_SLEEP`), so a packet waits"
                   " 0–100 ms for the loop, then the same five `iptables` processes.")
    best = n if n is not None else i
    if best is not None and (u is not None or p is not None):
        parts = []
        if u is not None:
            parts.append(f"{u / best:.0f}× faster than fwknopd's UDP-server mode")
        if p is not None:
            parts.append(f"{p / best:.0f}× faster than its default pcap mode")
        out.append("- **Side by side**: " + ", ".join(parts) + ", same lab, same client method.")
    if best is not None and best > GOAL_MS:
        out.append(
            f"- **Why the {GOAL_MS:g} ms goal is missed**: the SPA checks take about 0.1 ms (*SPA costs*), three"
            " to ten times that on caches an idle spell left cold; the capture loop's wake-up and the client's"
            " own connect take the rest. On this VM client and server share two vCPUs: the daemon is woken on"
            " the sender's vCPU and the client's next connect waits for it.")
    for name in ("spa-nft", "spa-ipt"):
        r = by.get(name)
        if r is not None and r.attempts and statistics.median(r.attempts) > 1:
            out.append(f"- **Resolution** (`{name}`): the median sample got through on connect attempt"
                       f" {statistics.median(r.attempts):g}, one attempt per {interval * 1e3:g} ms, so each"
                       f" sample is rounded up by up to {interval * 1e3:g} ms (`--interval 0.25` for a finer step).")
            break
    return out


def render_section(results: list[RowResult], info: dict[str, str], samples: int, when: str, elapsed: float,
                   fw_version: str, interval: float = ATTEMPT_INTERVAL) -> str:
    by = {r.spec.name: r for r in results}
    goals = []
    for name in ("spa-nft", "spa-ipt"):
        r = by.get(name)
        if r is not None and r.latencies:
            m = statistics.median(r.latencies) * 1e3
            goals.append(f"`{name}` **{'met' if m <= GOAL_MS else 'NOT met'}**, median {m:.2f} ms"
                         f" (p90 {percentile(r.latencies, 90) * 1e3:.2f} ms, {r.failures} failures)")
    goal = "; ".join(goals) if goals else "not measured in this run"
    notes = []
    for r in results:
        if r.error:
            notes.append(f"- `{r.spec.name}`: {r.error}.")
        if r.late_sockets:
            notes.append(f"- `{r.spec.name}`: {r.late_sockets} connect socket(s) were made inside a timed window.")
        if r.samples and r.granted < r.samples:
            notes.append(f"- `{r.spec.name}`: the daemon logged {r.granted} grants for {r.samples + WARMUP} packets.")
    machine_lines = "\n".join(f"- {k}: {v}" for k, v in info.items())
    machine_lines += f"\n- fwknop: {fw_version or 'not installed'}"
    ref_rows = [["reference", lbl, "iptables-nft default deny (their lab)", "30", "0", mn, med_, p90, mx, "-", "-", "-"]
                for lbl, med_, mn, p90, mx in REFERENCE]
    parts = [
        START_MARK,
        "## SPA latency: SPA datagram sent to first TCP connect",
        "",
        f"Run {when} by `bench/spa_latency.py` ({samples} samples per row after {WARMUP} warm-up samples,"
        f" {elapsed:.0f} s in all).",
        "",
        machine_lines,
        "",
        "**Method** (fwknop.md §13(a), with a finer connect step). Each row is a fresh pair of network namespaces",
        "with a service on tcp/22 in the server namespace behind a default deny, and the daemon under test there",
        "(`-i veth0`). Ours: one SPA door, `authorized_keys` with one client key, `open = 22/tcp`,",
        f"`cmd_timeout = {DURATION}`; default deny either native nftables (an `inet` table with `policy drop`:",
        "`spa-nft`) or iptables-nft (`INPUT` policy DROP: `spa-ipt`, the lab fwknopd needs, since an `inet`",
        "table's drop would override fwknopd's iptables ACCEPT). fwknopd (Debian's fwknop-server): `SOURCE ANY`,",
        f"Rijndael and HMAC keys, `FW_ACCESS_TIMEOUT {DURATION}`, either `-U` (UDP server; plus an INPUT accept for",
        "udp/62201, which it needs) or its default pcap capture; its packets come from Debian's `fwknop` client",
        "(`-A tcp/22 -a SOURCE --use-hmac -T -B file`: built and saved, then sent by this script). Every sample",
        "uses a source address no earlier sample used (192.0.2.10 and up; permanent neighbour entries on the",
        "server side), so no door has to close between samples. Per sample, before the clock: a fresh packet",
        "asking for tcp/22 for that source (ours: `spa.protocol.build`, new nonce), a UDP socket bound to the",
        "source, connect sockets; then a random pause of 50–150 ms (random phase against fwknopd's 100 ms loop",
        f"sleep); `t0` just before `sendto` (on a veth the daemon can run inside it); a new non-blocking connect every {interval * 1e3:g} ms on a fresh",
        f"pre-made socket until one completes: `t1`. Latency = `t1 − t0`; nothing within {SAMPLE_LIMIT:g} s is a",
        "failure. p90 is nearest-rank. *Baseline connect*: a connect to a door already open, timed the same way.",
        "",
        markdown_table(HEAD, [*summary_rows(results), *ref_rows]),
        "",
        "The *reference* rows are not measured by this script: they are fwknop.md §13(a) (the same Debian package",
        "on a 2-vCPU Debian 12 VM with namespaces, connect retried every 5 ms).",
        "",
    ]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    found = findings(by, interval)
    if found:
        parts += ["**What the numbers say.**", "", *found, ""]
    parts += [
        f"**Goal: SPA sent → TCP connect median ≤ {GOAL_MS:g} ms** — {goal}.",
        "",
        "**Re-run** (root, from the repository root; about a minute):",
        "",
        "```",
        "sudo python -m bench.spa_latency            # or: sudo python bench/spa_latency.py",
        "sudo python -m bench.spa_latency --samples 20 --only spa-nft,fwknopd-udp",
        "```",
        "",
        f"Rows for `--only`: {', '.join(f'`{n}`' for n in ROW_NAMES)}. The fwknopd rows are skipped (and said so",
        "here) when `fwknopd` is not installed (`apt-get install fwknop-server fwknop-client`). The run rewrites",
        "only this section of `docs/benchmarks.md` (between the `spa-latency` markers).",
        END_MARK,
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.spa_latency", description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=30, help="samples per row (default 30)")
    add_output_args(ap)
    add_only_arg(ap, ROW_NAMES)
    ap.add_argument("--interval", type=float, default=ATTEMPT_INTERVAL * 1e3,
                    help="ms between connect attempts (default 1)")
    args = ap.parse_args(argv)
    if not need_root("spa_latency"):
        return 2
    if not 1 <= args.samples <= 230:
        ap.error("--samples must be 1..230 (one fresh client address per sample)")
    wanted = rows_wanted(ap, args.only, ROW_NAMES)
    fw_version = fwknop_version()
    specs = [r for r in ROWS if (not wanted or r.name in wanted) and (r.kind != "fwknopd" or fw_version)]

    unwind_on_sigterm()
    info = machine()
    when = utc_now()
    start = time.perf_counter()
    results = []
    for spec in specs:
        log(f"{spec.name}: {args.samples} samples")
        try:
            results.append(run_row(spec, args.samples, log, args.interval / 1e3))
        except Exception as exc:  # noqa: BLE001 - report the row, keep the others
            results.append(RowResult(spec, error=f"did not run: {type(exc).__name__}: {exc}"))
            log(f"  {spec.name}: FAILED: {exc}")
    elapsed = time.perf_counter() - start
    print()
    print(text_table(HEAD, summary_rows(results)))
    for line in findings({r.spec.name: r for r in results}, args.interval / 1e3):
        print(line)
    for r in results:
        if r.error:
            print(f"  {r.spec.name}: {r.error}")
    if not args.no_write:
        out = Path(args.output)
        write_section(out, START_MARK, END_MARK, render_section(results, info, args.samples, when, elapsed, fw_version,
                                                                args.interval / 1e3))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
