"""Every benchmark in order, each bounded in time, then a summary at the top of ``docs/benchmarks.md``.

Each benchmark runs as its own process (``python -m bench.NAME ...``) with a
time limit; a benchmark that fails or overruns is reported and the next one
runs. Each writes its own section of the output file as when run alone; this
script then writes the header section (between ``<!-- summary:start -->`` and
``<!-- summary:end -->``): the machine, the date, the load averages, what ran
and how long it took, and a table "ours beside theirs" with one row per
figure, its goal and whether it is met, read from the sections.

Run as root from the repository root::

    sudo python -m bench.all            # about 15 minutes
    sudo python -m bench.all --quick    # reduced samples and rates: a smoke check, about 5 minutes
    sudo python -m bench.all --only knock_latency,client_startup
    sudo python -m bench.all --summary-only   # rewrite the summary from the sections already there

The idle-CPU comparison (spa-server vs knockd vs fwknopd, 60 s) is part of
``bench/rotating_costs.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.grant_latency import markdown_table  # noqa: E402
from bench.knocklab import DEFAULT_OUTPUT, REPO, load_average, machine, utc_now  # noqa: E402
from bench.spalab import fwknop_version  # noqa: E402

START_MARK = "<!-- summary:start -->"
END_MARK = "<!-- summary:end -->"


@dataclass
class Step:
    name: str
    full: list[str]
    quick: list[str]
    limit: float  # seconds (full run); quick runs get the same limit
    section: str = ""  # its markers' name in the doc ("" when it writes none)
    writes: bool = True  # takes --output


STEPS = [
    Step("grant_latency", [], ["--samples", "20"], 300, "grant-latency"),
    # A connect every 0.1 ms: at the default 1 ms step the rounding (0.5 ms on average) is half of what is measured.
    Step("knock_latency", ["--interval", "0.1"], ["--samples", "10", "--interval", "0.1"], 300, "knock-latency"),
    Step("spa_latency", ["--interval", "0.1"], ["--samples", "10", "--interval", "0.1"], 300, "spa-latency"),
    Step("rotating_latency", ["--interval", "0.1"], ["--samples", "10", "--interval", "0.1"], 300, "rotating-latency"),
    Step("flood", [], ["--quick"], 1200, "knock-flood"),
    Step("spa_flood", [], ["--packets", "8"], 600, "spa-flood"),
    Step("capture_cost", [], [], 240, "", writes=False),
    Step("spa_costs", [], ["--quick"], 300, "spa-costs"),
    Step("rotating_costs", [], ["--quick"], 300, "rotating-costs"),
    Step("client_startup", [], ["--runs", "5"], 300, "client-startup"),
]
STEP_NAMES = [s.name for s in STEPS]


@dataclass
class Outcome:
    step: Step
    status: str = "not run"  # ok | failed (rc N) | timed out | not run
    seconds: float = 0.0
    tail: str = ""
    stdout: str = ""
    load: str = ""


def run_step(step: Step, quick: bool, output: Path, log) -> Outcome:
    argv = [sys.executable, "-m", f"bench.{step.name}", *(step.quick if quick else step.full)]
    if step.writes:
        argv += ["--output", str(output)]
    log(f"== {step.name}: {' '.join(argv[2:])} (limit {step.limit:.0f} s)")
    out = Outcome(step)
    t0 = time.monotonic()
    # Its own process group: on a timeout the whole benchmark (daemons, flooders) gets the signal; each
    # benchmark turns SIGTERM into SystemExit and tears its namespaces down in ``finally``.
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=step.limit)
        out.status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate(timeout=30)
        out.status = f"timed out after {step.limit:.0f} s"
    except BaseException:
        with_kill = p.poll() is None
        if with_kill:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        raise
    out.seconds = time.monotonic() - t0
    out.stdout = stdout or ""
    out.tail = "\n".join((stderr or "").strip().splitlines()[-6:])
    out.load = load_average()
    log(f"   {out.status} in {out.seconds:.0f} s; load {out.load}")
    if out.status != "ok" and out.tail:
        log("   " + out.tail.replace("\n", "\n   "))
    return out


# -- reading the sections back ------------------------------------------------------------------------------


def section(text: str, name: str) -> str:
    a, b = text.find(f"<!-- {name}:start -->"), text.find(f"<!-- {name}:end -->")
    return text[a:b] if a != -1 and b > a else ""


def tables(sec: str) -> list[list[dict[str, str]]]:
    """Every markdown table of a section, as rows keyed by the header cells."""
    out, lines = [], sec.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|(\s*-+\s*\|)+\s*$", lines[i + 1]):
            head = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                cells = [c.strip() for c in lines[j].strip().strip("|").split("|")]
                rows.append(dict(zip(head, cells)))
                j += 1
            out.append(rows)
            i = j
        else:
            i += 1
    return out


def cell(sec: str, column: str, want: str, key: str, value_col: str) -> str:
    """``value_col`` of the first row whose ``key`` column contains ``want``, in any table with ``column``."""
    for t in tables(sec):
        for r in t:
            if column in r and want in r.get(key, ""):
                return r.get(value_col, "-")
    return "-"


def goal(sec: str, contains: str = "") -> tuple[str, str]:
    """(verdict, the goal line) of the first ``**Goal`` line (containing ``contains``)."""
    for line in sec.splitlines():
        if line.startswith("**Goal") and contains in line:
            m = re.search(r"\*\*(met|NOT met)\*\*", line)
            return (m.group(1) if m else "?"), line
    return "not measured", ""


def run_date(sec: str) -> str:
    m = re.search(r"Run (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", sec)
    return m.group(1) if m else "-"


def _num(x: str) -> float | None:
    try:
        return float(x)
    except ValueError:
        return None


def times(theirs: str, ours: str) -> str:
    """``theirs / ours`` as ``12.3×``, or ``-`` when either is missing."""
    t, o = _num(theirs), _num(ours)
    return f"{t / o:.1f}×" if t is not None and o else "-"


def ten_times(theirs: str, ours: str) -> str:
    t, o = _num(theirs), _num(ours)
    if t is None or not o:
        return "not measured"
    return "met" if t / o >= 10 else "NOT met"


def summary_rows(text: str) -> list[list[str]]:
    rows = []
    kl, sl, rl = section(text, "knock-latency"), section(text, "spa-latency"), section(text, "rotating-latency")
    gl, fl, sf = section(text, "grant-latency"), section(text, "knock-flood"), section(text, "spa-flood")
    sc, rc, cs = section(text, "spa-costs"), section(text, "rotating-costs"), section(text, "client-startup")

    def med(sec: str, row: str) -> str:
        return cell(sec, "median ms", f"`{row}`", "row", "median ms")

    v, _ = goal(gl)
    rows.append(["grant alone: firewall open → connect (nft)", f"{med(gl, 'nft-netlink')} ms",
                 f"{med(gl, 'command')} ms (knockd-style `sh -c iptables`)", "≤ 2 ms", v, run_date(gl)])
    ours, theirs = med(kl, 'spa-open'), med(kl, 'knockd-command')
    rows.append(["open latency, static knock (median)", f"{ours} ms ({times(theirs, ours)} lower)",
                 f"knockd {theirs} ms", "≥ 10× lower than theirs (issue 7)", ten_times(theirs, ours), run_date(kl)])
    ours, udp = med(sl, 'spa-nft'), med(sl, 'fwknopd-udp')
    rows.append(["open latency, SPA (median)", f"{ours} ms ({times(udp, ours)} lower than UDP)",
                 f"fwknopd UDP {udp} ms, pcap {med(sl, 'fwknopd-pcap')} ms", "≥ 10× lower than theirs (issue 7)",
                 ten_times(udp, ours), run_date(sl)])
    v, _ = goal(rl)
    rows.append(["open latency, rotating knock (median)", f"{med(rl, 'rotating')} ms",
                 "none (knockd and fwknop have no rotating sequences)", "≤ 3 ms", v, run_date(rl)])
    # Knock floods at 50 k pps: served, summed over the flood kinds, ours (open =) and knockd.
    ours, theirs = [0, 0], [0, 0]
    for t in tables(fl):
        pending = False  # an ours row at 50 k pps was just counted: the next knockd row is its pair
        for r in t:
            m = re.match(r"(\d+)/(\d+)", r.get("served", ""))
            if not m or r.get("flood") == "none":
                continue
            daemon = r.get("daemon", "")
            if "open = 22/tcp" in daemon and "user space" not in daemon:
                pending = r.get("rate sent, pps", "") == "50.0 k"
                tgt = ours if pending else None
            elif "knockd" in daemon and pending:
                tgt, pending = theirs, False
            else:
                tgt = None
            if tgt is not None:
                tgt[0] += int(m.group(1))
                tgt[1] += int(m.group(2))
    if ours[1]:
        ok = ours[0] / ours[1] >= 0.99
        rows.append(["legit knocks served under 50 k pps floods (all kinds)", f"{ours[0]}/{ours[1]}",
                     f"knockd {theirs[0]}/{theirs[1]}" if theirs[1] else "-",
                     "≥ 99 % (as for SPA; stated here)", "met" if ok else "NOT met", run_date(fl)])
    # Knock floods at the sender's maximum: served, per kind, ours (open =) beside knockd's row after it.
    at_max: dict[str, list[str]] = {}
    for t in tables(fl):
        for r in t:
            rate, flood, daemon = r.get("rate sent, pps", ""), r.get("flood", ""), r.get("daemon", "")
            if not rate.startswith("max") or flood.startswith("random") or not re.match(r"\d+/\d+", r.get("served", "")):
                continue
            # Ours as it runs by default (the kernel matcher); the user-space row is its before/after.
            who = ("ours" if "open = 22/tcp" in daemon and "user space" not in daemon
                   else "knockd" if "knockd" in daemon else "")
            if who:
                at_max.setdefault(who, []).append(f"{flood.split(' (')[0]} {r['served']} at {rate[5:]} pps")
    if at_max.get("ours"):
        served = [re.search(r"(\d+)/(\d+)", x) for x in at_max["ours"]]
        whole = all(m and m.group(1) == m.group(2) for m in served)
        rows.append(["legit knocks served at the sender's maximum (spoofed sources)", "; ".join(at_max["ours"]),
                     "knockd " + "; ".join(at_max.get("knockd", ["-"])), "100 % (never starved)",
                     "met" if whole else "NOT met", run_date(fl)])
    spa_max = [f"{r['got through']} at {r['rate sent, pps'][5:]} pps ({r['flood'].split(':')[0]})"
               for t in tables(sf) for r in t
               if r.get("rate sent, pps", "").startswith("max") and "spa-server" in r.get("daemon", "")
               and "classic" not in r.get("daemon", "")  # the before/after row of the eBPF screen
               and re.match(r"\d+/\d+", r.get("got through", ""))]
    if spa_max:
        whole = all(x.split(" ")[0].split("/")[0] == x.split(" ")[0].split("/")[1] for x in spa_max)
        rows.append(["legit SPA packets through at the sender's maximum", "; ".join(spa_max),
                     "fwknopd: not run at the maximum (see the 50 k pps row below)",
                     "100 % (never starved)", "met" if whole else "NOT met", run_date(sf)])
    v, line = goal(sf)
    m = re.search(r"(\d+)/(\d+) legitimate", line)
    fw = next((r["got through"] for tb in tables(sf) for r in tb
               if "fwknopd, UDP" in r.get("daemon", "") and r.get("flood") != "no flood" and "got through" in r), "-")
    rows.append(["legit SPA through under 50 k pps junk/forgeries", f"{m.group(1)}/{m.group(2)}" if m else "-",
                 f"fwknopd UDP, junk: {fw}", "≥ 99 %", v, run_date(sf)])
    v, _ = goal(fl, "RSS")
    rss = lambda who: (f"{cell(fl, 'RSS end MB', who, 'daemon', 'RSS end MB')} MB "  # noqa: E731
                       f"({cell(fl, 'RSS end MB', who, 'daemon', 'growth')})")
    rows.append(["memory after 60 s of spoofed flood (50 k pps)", rss("spa-server"), f"knockd {rss('knockd')}",
                 "RSS flat within 10 %", v, run_date(fl)])
    v, line = goal(sc)
    m = re.search(r"largest ratio against the 10 k cache is ([\d.]+)×", line)
    rows.append(["replay-cache lookup, 1 M vs 10 k entries", f"{m.group(1)}×" if m else "-",
                 "fwknopd 94× (0.47 ms per packet at 10 k entries, 44 ms at 1 M: a linear scan; fwknop.md §13(d))",
                 "≤ 2×", v, run_date(sc)])
    idle = {k: cell(rc, "CPU % of a core", k, "daemon", "CPU % of a core")
            for k in ("one classic door", "100 rotating", "knockd", "fwknop")}
    v, _ = goal(rc, "idle CPU")
    rows.append(["idle CPU, 60 s (% of a core)", f"classic {idle['one classic door']}, rotating 100×2 {idle['100 rotating']}",
                 f"knockd {idle['knockd']}, fwknopd {idle['fwknop']}", "rotating ≤ 2× classic (stated here)", v,
                 run_date(rc)])
    v, _ = goal(rc, "swap")
    over = " — its filter is over the kernel's 4096 instructions: not installed" if "does not fit" in rc else ""
    rows.append(["one rotating swap, 100 doors × 2 keys",
                 f"{cell(rc, 'total median ms', '100×2', 'doors × keys', 'total median ms')} ms{over}",
                 "-", "≤ 50 ms (stated here)", v, run_date(rc)])
    v, _ = goal(cs)
    first = lambda mode: cell(cs, "first packet, median ms", f"`{mode}`", "mode", "first packet, median ms")  # noqa: E731
    rows.append(["client start-up, exec → first packet (median)",
                 f"static {first('static')} ms, SPA {first('spa')} ms, rotating {first('rotating')} ms",
                 f"knock {first('knock')} ms, fwknop {first('fwknop')} ms", "≤ 150 ms", v, run_date(cs)])
    return rows


def render(text: str, info: dict[str, str], when: str, loads: list[str], outcomes: list[Outcome], quick: bool,
           elapsed: float) -> str:
    ran = [[f"`{o.step.name}`", o.status, f"{o.seconds:.0f}", o.load or "-"] for o in outcomes]
    parts = [
        START_MARK,
        "## Summary: ours beside theirs",
        "",
        (f"Written {when} by `bench/all.py`{' --quick (reduced samples: a smoke check, not the figures)' if quick else ''};"
         f" {elapsed / 60:.1f} minutes in all." if outcomes else
         f"Rewritten {when} by `bench/all.py --summary-only` (nothing run now; the record of the last run is kept below).")
        + " Each figure below is read from its own section further down (its",
        "*run* column says when that section was measured: a section not re-run keeps its earlier figures).",
        "",
        "\n".join(f"- {k}: {v}" for k, v in info.items()),
        f"- load averages (1, 5, 15 min): {'; '.join(loads)}",
        "",
        markdown_table(["figure", "ours", "theirs", "goal", "met?", "run"], summary_rows(text)),
        "",
    ]
    if not ran:
        # Nothing ran now (``--summary-only``): keep what the summary said about the last run.
        old = section(text, "summary")
        a, b = old.find("**This run**"), old.find("**Re-run everything**")
        if a != -1 and b > a:
            parts += [old[a:b].rstrip(), ""]
    if ran:
        parts += ["**This run** (each benchmark a process of its own, with a time limit; a failure is reported and the"
                  " next one runs):", "", markdown_table(["benchmark", "status", "seconds", "load average after"], ran), ""]
        failed = [o for o in outcomes if o.status != "ok"]
        for o in failed:
            parts += [f"`{o.step.name}` {o.status}; the end of its error output:", "", "```", o.tail or "(none)", "```",
                      ""]
        cc = next((o for o in outcomes if o.step.name == "capture_cost" and o.stdout.strip()), None)
        if cc is not None:
            parts += ["`bench/capture_cost.py` (it writes no section of its own; its output):", "", "```",
                      cc.stdout.strip(), "```", ""]
    parts += ["**Re-run everything** (root): `sudo python -m bench.all` (`--quick` for a smoke check).", END_MARK]
    return "\n".join(parts) + "\n"


def write_header(path: Path, section_text: str) -> None:
    """The summary goes right after the file's title and intro line (and replaces itself on later runs)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    a, b = text.find(START_MARK), text.find(END_MARK)
    if a != -1 and b > a:
        new = text[:a] + section_text.rstrip("\n") + text[b + len(END_MARK):]
    else:
        first = text.find("<!--")
        cut = first if first != -1 else len(text)
        new = text[:cut] + section_text + "\n" + text[cut:]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def full_machine() -> dict[str, str]:
    info = machine()
    try:
        info["Debian"] = Path("/etc/debian_version").read_text().strip()
    except OSError:
        info["Debian"] = "unknown"
    with_fw = fwknop_version()
    info["fwknop"] = with_fw or "not installed"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced samples and rates (a smoke check)")
    ap.add_argument("--only", default="", help=f"comma-separated: {','.join(STEP_NAMES)}")
    ap.add_argument("--skip", default="", help="comma-separated steps not to run")
    ap.add_argument("--summary-only", action="store_true", help="run nothing; rewrite the summary")
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="markdown file to update (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and not args.summary_only:
        print("bench.all: needs root (network namespaces and firewalls)", file=sys.stderr)
        return 2
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = (only | skip) - set(STEP_NAMES)
    if unknown:
        ap.error(f"unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEP_NAMES)}")
    steps = [] if args.summary_only else [s for s in STEPS if (not only or s.name in only) and s.name not in skip]
    out = Path(args.output)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info, when, start = full_machine(), utc_now(), time.monotonic()
    loads = [f"{load_average()} at the start"]
    outcomes = []
    for step in steps:
        try:
            outcomes.append(run_step(step, args.quick, out, log))
        except Exception as exc:  # noqa: BLE001 - report it, run the next one
            outcomes.append(Outcome(step, status=f"failed to start: {type(exc).__name__}: {exc}"))
    loads.append(f"{load_average()} at the end")
    text = out.read_text() if out.exists() else ""
    write_header(out, render(text, info, when, loads, outcomes, args.quick, time.monotonic() - start))
    print(markdown_table(["figure", "ours", "theirs", "goal", "met?", "run"], summary_rows(out.read_text())))
    bad = [o for o in outcomes if o.status != "ok"]
    for o in bad:
        print(f"{o.step.name}: {o.status}", file=sys.stderr)
    print(f"wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
