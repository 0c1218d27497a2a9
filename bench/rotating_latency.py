"""Rotating-knock latency: from the last knock of a rotating sequence to the first TCP connect that gets through.

The method of ``bench/knock_latency.py`` (``bench.knocklab.knock_sample``),
with rotating doors. Each (door, key, window) sequence opens only once, so
every sample knocks a door no earlier sample used: the server has ``--doors``
rotating doors (``rot0``, ``rot1``, ...) that share one shared key
(``spa.keys.shared.generate``, 30 s windows, 4 TCP knocks in 20000–29999,
``tcpflags = syn``, ``open = 22/tcp``), and sample *i* knocks door ``rot<i>``
from a fresh client address with the sequence ``spa.rotating.derive(secret,
door, counter(now), params)``, derived before the clock starts. Per sample:
sockets made beforehand, a random pause of 50–150 ms, the four knocks (one
SYN each), ``t0`` just before the last, a connect to tcp/22 every 1 ms until
one completes: ``t1``; latency ``t1 − t0``, nothing within 2 s a failure.

The *classic* row is ``bench/knock_latency.py``'s ``spa-open`` row (one
static door ``7000,8000,9000``) run in the same invocation, for a side-by-side
figure (``--no-classic`` skips it).

Run as root from the repository root::

    sudo python -m bench.rotating_latency              # about a minute
    sudo python -m bench.rotating_latency --samples 30 --no-classic

Results go to ``docs/benchmarks.md`` between the ``<!-- rotating-latency:start -->``
and ``<!-- rotating-latency:end -->`` markers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import knock_latency  # noqa: E402
from bench.grant_latency import markdown_table, text_table  # noqa: E402
from bench.knocklab import (  # noqa: E402
    add_output_args, log, need_root,
    Daemon, Knocker, KnockLab, knock_sample, load_average, machine, make_shared_key, ms, percentile,
    rotating_door_text, unwind_on_sigterm, utc_now, write_section,
)
from bench.spalab import scratch_dir  # noqa: E402

START_MARK = "<!-- rotating-latency:start -->"
END_MARK = "<!-- rotating-latency:end -->"

WARMUP = 2
SAMPLE_LIMIT = 2.0
POOL = 120
ATTEMPT_INTERVAL = 0.001
INTERVAL = 30  # the shared key's window, seconds
GOAL_MS = 3.0


@dataclass
class Row:
    name: str
    label: str
    latencies: list[float] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    failures: int = 0
    boundary_samples: int = 0  # samples whose knocks or connects straddled a window boundary
    load: str = ""
    error: str = ""

    @property
    def samples(self) -> int:
        return len(self.latencies) + self.failures


def run_rotating(samples: int, doors: int, log, interval: float = ATTEMPT_INTERVAL) -> Row:
    from spa import rotating

    if doors < samples + WARMUP:
        raise ValueError("one door per sample: --doors must be at least --samples + 2")
    row = Row("rotating", f"spa-server, {doors} rotating doors sharing one key, `open = 22/tcp`")
    rng = random.Random(13)
    with scratch_dir("spa-bench-rot-") as tmp, KnockLab(extra=samples + WARMUP, tag="rl") as kl:
        lab = kl.lab
        key = make_shared_key(tmp / "shared.key", interval=INTERVAL)
        text = "".join(rotating_door_text(f"rot{i}", str(tmp / "shared.key")) for i in range(doors))
        daemon = Daemon(lab, "spa", text)
        try:
            knocker = Knocker(lab)
            secret, params = key.newest.secret, key.params
            for i, source in enumerate(kl.sources):
                door = f"rot{i}"
                c0 = rotating.counter(time.time(), INTERVAL)
                steps = [(s.proto, s.port) for s in rotating.derive(secret, door, c0, params)]
                lat, attempts, _span, client = knock_sample(lab, knocker, source, steps, rng, limit=SAMPLE_LIMIT,
                                                            interval=interval, pool=POOL)
                client.close()
                straddled = rotating.counter(time.time(), INTERVAL) != c0
                if i >= WARMUP:
                    row.boundary_samples += straddled
                    if lat is None:
                        row.failures += 1
                    else:
                        row.latencies.append(lat)
                        row.attempts.append(attempts)
                    if (i - WARMUP + 1) % 10 == 0:
                        log(f"  rotating: {i - WARMUP + 1}/{samples}")
            opened = daemon.count_lines("OPEN SESAME (rotating key")
            if opened < samples + WARMUP - row.failures:
                row.error = f"the log shows {opened} rotating opens for {samples + WARMUP} knocks"
            if not daemon.alive():
                row.error = "spa-server exited during the row"
        finally:
            daemon.cleanup()
    row.load = load_average()
    return row


def run_classic(samples: int, log, interval: float = ATTEMPT_INTERVAL) -> Row:
    spec = next(r for r in knock_latency.ROWS if r.name == "spa-open")
    r = knock_latency.run_row(spec, samples, log, interval)
    return Row("classic", "spa-server, one static door `7000,8000,9000`, `open = 22/tcp` (knock_latency's `spa-open`)",
               r.latencies, r.attempts, r.failures, 0, load_average(), r.error)


HEAD = ["row", "daemon and doors", "samples", "failures", "min ms", "median ms", "p90 ms", "max ms",
        "connect attempts, median / max", "load average after the row"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        lat = r.latencies
        stats = ([ms(min(lat)), ms(statistics.median(lat)), ms(percentile(lat, 90)), ms(max(lat))] if lat
                 else ["-"] * 4)
        att = f"{statistics.median(r.attempts):g} / {max(r.attempts)}" if r.attempts else "-"
        out.append([f"`{r.name}`", r.label, str(r.samples), str(r.failures), *stats, att, r.load or "-"])
    return out


def render(rows: list[Row], info: dict[str, str], samples: int, doors: int, when: str, elapsed: float,
           interval: float = ATTEMPT_INTERVAL) -> str:
    by = {r.name: r for r in rows}
    rot = by.get("rotating")
    if rot is not None and rot.latencies:
        m = statistics.median(rot.latencies) * 1e3
        goal = (f"**{'met' if m <= GOAL_MS else 'NOT met'}**: median {m:.2f} ms"
                f" (p90 {percentile(rot.latencies, 90) * 1e3:.2f} ms, {rot.failures} failures)")
    else:
        goal = "**not measured** in this run" + (f" ({rot.error})" if rot is not None and rot.error else "")
    notes = [f"- `{r.name}`: {r.error}." for r in rows if r.error]
    found = []
    cl = by.get("classic")
    if rot is not None and rot.latencies and cl is not None and cl.latencies:
        a, b = statistics.median(rot.latencies) * 1e3, statistics.median(cl.latencies) * 1e3
        found.append(f"- **Rotating vs classic**: {a:.2f} ms against {b:.2f} ms median in the same run"
                     f" ({a - b:+.2f} ms). Both open an nft set element from the capture loop; a rotating"
                     " grant also carries the sequence's used-once token (a replay-cache lookup and insert in the"
                     " capture loop, burned in memory at once); both open first and are journaled right after, the"
                     " token with the grant.")
    if rot is not None and rot.latencies and statistics.median(rot.attempts) > 1:
        found.append(f"- **Resolution**: connects go out every {interval * 1e3:g} ms; the median sample got"
                     f" through on attempt {statistics.median(rot.attempts):g}, so each sample is rounded up by up to"
                     f" {interval * 1e3:g} ms.")
    if rot is not None and rot.boundary_samples:
        found.append(f"- {rot.boundary_samples} sample(s) straddled a window boundary (the server swapped its"
                     " candidates and filter meanwhile); they are counted like the others.")
    parts = [
        START_MARK,
        "## Rotating-knock latency: last knock of a rotating sequence to first TCP connect",
        "",
        f"Run {when} by `bench/rotating_latency.py` ({samples} samples per row after {WARMUP} warm-up samples,"
        f" {elapsed:.0f} s in all; load average at the end {load_average()}).",
        "",
        "\n".join(f"- {k}: {v}" for k, v in info.items()),
        "",
        "**Method.** As *Knock latency* (`bench.knocklab.knock_sample`: iptables-nft default deny, a service on",
        "tcp/22, sockets made beforehand, a random 50–150 ms pause, the knocks as `knock` sends them, then a",
        f"connect every {interval * 1e3:g} ms from the same source until one completes). Each (door, key,",
        f"window) sequence opens only once, so the server has {doors} rotating doors (`rot0`, `rot1`, ...) sharing",
        f"one shared key ({INTERVAL} s windows, 4 TCP knocks drawn from 20000–29999, `tcpflags = syn`,",
        "`open = 22/tcp`), and sample *i* knocks door `rot<i>` from a fresh client address, with",
        "`spa.rotating.derive(secret, door, counter(now), params)` computed before the clock starts. With",
        f"{doors} doors × 1 key × 3 accepted windows the server matches {doors * 3} candidate sequences and its",
        "kernel filter passes their ports and guard ports. The *classic* row is `bench/knock_latency.py`'s",
        "`spa-open` row run in the same invocation.",
        "",
        markdown_table(HEAD, table_rows(rows)),
        "",
    ]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    if found:
        parts += ["**What the numbers say.**", "", *found, ""]
    parts += [
        f"**Goal: rotating knock → connect median ≤ {GOAL_MS:g} ms** — {goal}.",
        "",
        "**Re-run** (root, from the repository root; about a minute):",
        "",
        "```",
        "sudo python -m bench.rotating_latency",
        "sudo python -m bench.rotating_latency --samples 30 --no-classic --interval 0.25",
        "```",
        END_MARK,
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rotating_latency", description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40, help="samples per row (default 40)")
    ap.add_argument("--doors", type=int, default=0, help="rotating doors on the server (default samples + 2)")
    ap.add_argument("--no-classic", action="store_true", help="skip the classic side-by-side row")
    ap.add_argument("--interval", type=float, default=ATTEMPT_INTERVAL * 1e3, help="ms between connect attempts (default 1)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if not need_root("rotating_latency"):
        return 2
    if not 1 <= args.samples <= 200:
        ap.error("--samples must be 1..200 (one fresh client address and door per sample)")
    doors = args.doors or args.samples + WARMUP

    unwind_on_sigterm()
    info = machine()
    when = utc_now()
    start = time.perf_counter()
    rows = []
    step = args.interval / 1e3
    jobs = [("rotating", lambda: run_rotating(args.samples, doors, log, step))]
    if not args.no_classic:
        jobs.append(("classic", lambda: run_classic(args.samples, log, step)))
    for name, job in jobs:
        log(f"{name}: {args.samples} samples")
        try:
            rows.append(job())
        except Exception as exc:  # noqa: BLE001 - report the row, keep the others
            rows.append(Row(name, name, error=f"did not run: {type(exc).__name__}: {exc}"))
            log(f"  {name}: FAILED: {exc}")
    elapsed = time.perf_counter() - start
    print()
    print(text_table(HEAD, table_rows(rows)))
    for r in rows:
        if r.error:
            print(f"  {r.name}: {r.error}")
    if not args.no_write:
        out = Path(args.output)
        write_section(out, START_MARK, END_MARK, render(rows, info, args.samples, doors, when, elapsed, step))
        print(f"\nwrote {out}")
    return 0 if all(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
