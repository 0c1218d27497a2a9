"""Client start-up: ``knock-client`` from exec to its first packet on the wire, against ``knock`` and ``fwknop``.

In a ``KnockLab`` (server and client namespaces, no daemon), a packet socket
(``AF_PACKET``) bound to the server's veth timestamps every IPv4 packet from
the client (``SO_TIMESTAMPNS``, kernel receive time). Per run: ``t0`` =
``time.time_ns()`` right before ``subprocess.Popen`` forks (the fork is made
from a thread already in the client namespace, so no ``ip netns exec`` sits
in between); *first packet* = the kernel timestamp of the first packet from
the client minus ``t0``; *exit* = when ``wait`` returned minus ``t0`` (an
upper bound of the time to the last packet). Modes:

* ``static``: ``knock-client 192.0.2.1 7000`` (one TCP knock), beside
  Debian's ``knock 192.0.2.1 7000``;
* ``spa``: ``knock-client --key client.key --server-key server.pub
  --allow-ip 192.0.2.2 192.0.2.1 ssh``, beside Debian's ``fwknop -A tcp/22
  -a 192.0.2.2 -D 192.0.2.1`` (Rijndael + HMAC keys on the command line,
  ``--no-rc-file --no-save-args``);
* ``rotating``: ``knock-client --key shared.key 192.0.2.1 rot`` (a shared key).

Plus ``python -X importtime`` for each of our modes (the slowest imports,
cumulative, and the modules loaded that the mode does not need).

Run as root from the repository root::

    sudo python -m bench.client_startup               # about a minute
    sudo python -m bench.client_startup --runs 10

Results go to ``docs/benchmarks.md`` between the ``<!-- client-startup:start -->``
and ``<!-- client-startup:end -->`` markers.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.grant_latency import markdown_table, text_table  # noqa: E402
from bench.knocklab import (  # noqa: E402
    add_output_args, log, need_root,
    REPO, KnockLab, load_average, machine, make_shared_key, percentile, unwind_on_sigterm, utc_now,
    write_section,
)
from bench.spalab import FwknopKeys, SpaKeys, scratch_dir  # noqa: E402
from spa.server.netns import CLIENT_V4, SERVER_V4, in_netns, sh  # noqa: E402

START_MARK = "<!-- client-startup:start -->"
END_MARK = "<!-- client-startup:end -->"

GOAL_MS = 150.0
RUN_LIMIT = 10.0  # seconds per run
ETH_P_IP = 0x0800
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
# Modules a mode does not need (prefix match on the module name), per mode.
NOT_NEEDED = {
    "static": ("scapy", "cryptography", "nacl", "spa.protocol", "spa.keys", "spa.rotating", "spa.server", "hmac",
               "hashlib", "sqlite3", "ctypes", "json", "logging"),
    "spa": ("scapy", "spa.rotating", "spa.server", "sqlite3"),
    "rotating": ("scapy", "cryptography", "nacl", "spa.protocol", "spa.server", "sqlite3"),
}


def knock_client() -> str:
    exe = Path(sys.executable).with_name("knock-client")
    return str(exe) if exe.exists() else shutil.which("knock-client") or "knock-client"


class Sniffer:
    """A packet socket on the server's veth0 (in the server namespace): kernel timestamps of IPv4 from the client."""

    def __init__(self, ns: str):
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
            self.sock.bind(("veth0", ETH_P_IP))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setblocking(False)

    def drain(self) -> None:
        for _ in range(10000):
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return

    def first_from(self, source: str, limit: float) -> int | None:
        """Kernel receive time (ns, CLOCK_REALTIME) of the first packet from ``source`` within ``limit`` seconds."""
        src = socket.inet_aton(source)
        end = time.monotonic() + limit
        while (left := end - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            for _ in range(1000):
                try:
                    data, anc, _flags, _addr = self.sock.recvmsg(2048, 64)
                except BlockingIOError:
                    break
                if len(data) >= 20 and data[12:16] == src:
                    for level, kind, value in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = struct.unpack("qq", value[:16])
                            return sec * 1_000_000_000 + nsec
        return None

    def close(self) -> None:
        self.sock.close()


def run_once(lab_client: str, sniffer: Sniffer, argv: list[str], env: dict[str, str]) -> tuple[float | None, float, int]:
    """(ms to the first packet or None, ms to exit, return code)."""
    sniffer.drain()
    with in_netns(lab_client):
        t0 = time.time_ns()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/", env=env)
    try:
        first = sniffer.first_from(CLIENT_V4, RUN_LIMIT)
        rc = p.wait(RUN_LIMIT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
        rc = -9
    t_exit = time.time_ns()
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if rc != 0:
        raise RuntimeError(f"{argv[0]} exited {rc}: {err.strip()[:300]}")
    return (None if first is None else (first - t0) / 1e6), (t_exit - t0) / 1e6, rc


def importtime(argv_tail: list[str], lab_client: str, env: dict[str, str]) -> list[tuple[str, int, int, int]]:
    """``python -X importtime -m spa.client.cli ARGS``: (module, self µs, cumulative µs, depth) per import."""
    with in_netns(lab_client):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "spa.client.cli", *argv_tail],
                           capture_output=True, text=True, cwd=str(REPO), env=env, timeout=30)
    out = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        try:
            _, rest = line.split(":", 1)
            self_us, cum_us, name = rest.split("|")
            depth = (len(name) - len(name.lstrip(" "))) // 2
            out.append((name.strip(), int(self_us), int(cum_us), depth))
        except ValueError:
            continue
    return out


def modes(tmp: Path, include_baselines: bool) -> list[dict]:
    kc = knock_client()
    spa_keys = SpaKeys(tmp)
    server_pub = spa_keys.server.path + ".pub"
    make_shared_key(tmp / "shared.key")
    out = [
        {"name": "static", "who": "ours", "label": "`knock-client HOST 7000`", "argv": [kc, SERVER_V4, "7000"],
         "tail": [SERVER_V4, "7000"]},
        {"name": "spa", "who": "ours", "label": "`knock-client --key client.key HOST ssh` (SPA)",
         "argv": [kc, "--key", spa_keys.client.path, "--server-key", server_pub, "--allow-ip", CLIENT_V4, SERVER_V4,
                  "ssh"],
         "tail": ["--key", spa_keys.client.path, "--server-key", server_pub, "--allow-ip", CLIENT_V4, SERVER_V4, "ssh"]},
        {"name": "rotating", "who": "ours", "label": "`knock-client --key shared.key HOST rot` (rotating)",
         "argv": [kc, "--key", str(tmp / "shared.key"), SERVER_V4, "rot"],
         "tail": ["--key", str(tmp / "shared.key"), SERVER_V4, "rot"]},
    ]
    if include_baselines and shutil.which("knock"):
        out.append({"name": "knock", "who": "theirs", "label": "Debian `knock HOST 7000`",
                    "argv": [shutil.which("knock"), SERVER_V4, "7000"]})
    if include_baselines and shutil.which("fwknop"):
        fk = FwknopKeys()
        out.append({"name": "fwknop", "who": "theirs", "label": "Debian `fwknop -A tcp/22 -a ADDR -D HOST` (HMAC)",
                    "argv": [shutil.which("fwknop"), "--no-rc-file", "--no-save-args", "-A", "tcp/22", "-a",
                             CLIENT_V4, "-D", SERVER_V4, "--key-base64-rijndael", fk.key, "--key-base64-hmac",
                             fk.hmac, "--use-hmac"]})
    return out


def measure(runs: int, log, baselines: bool = True) -> dict:
    res: dict = {"rows": [], "imports": {}, "runs": runs}
    with scratch_dir("spa-bench-client-") as tmp, KnockLab(extra=0, tag="cs") as kl:
        lab = kl.lab
        # The client side keeps the server's MAC for good: no run waits for ARP.
        sh("ip", "neigh", "replace", SERVER_V4, "lladdr", kl.server_mac, "dev", "veth0", "nud", "permanent",
           ns=lab.client)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(tmp), "LANG": "C.UTF-8"}
        sniffer = Sniffer(lab.server)
        try:
            for m in modes(tmp, baselines):
                firsts, exits, err = [], [], ""
                try:
                    run_once(lab.client, sniffer, m["argv"], env)  # warm-up: page cache, .pyc files
                    for _ in range(runs):
                        f, e, _ = run_once(lab.client, sniffer, m["argv"], env)
                        exits.append(e)
                        if f is not None:
                            firsts.append(f)
                except Exception as exc:  # noqa: BLE001 - report the mode, keep the others
                    err = f"{type(exc).__name__}: {exc}"
                res["rows"].append({**{k: v for k, v in m.items() if k != "argv"}, "first": firsts, "exit": exits,
                                    "error": err})
                log(f"  {m['name']}: first packet median "
                    f"{statistics.median(firsts) if firsts else float('nan'):.1f} ms, exit median "
                    f"{statistics.median(exits) if exits else float('nan'):.1f} ms {err}")
                if m["who"] == "ours":
                    res["imports"][m["name"]] = importtime(m["tail"], lab.client, env)
        finally:
            sniffer.close()
    return res


HEAD = ["mode", "client", "runs", "first packet, median ms", "p90 ms", "exit, median ms", "goal ≤ 150 ms"]


def table(res: dict) -> list[list[str]]:
    out = []
    for r in res["rows"]:
        f, e = r["first"], r["exit"]
        med = statistics.median(f) if f else None
        goal = "-" if r["who"] != "ours" else ("met" if med is not None and med <= GOAL_MS else "NOT met")
        out.append([f"`{r['name']}`", r["label"] + (f" (error: {r['error']})" if r["error"] else ""), str(len(e)),
                    f"{med:.1f}" if med is not None else "-", f"{percentile(f, 90):.1f}" if f else "-",
                    f"{statistics.median(e):.1f}" if e else "-", goal])
    return out


def import_summary(imports: list[tuple[str, int, int, int]], mode: str, top: int = 8) -> tuple[str, str, float]:
    """(top-level imports by cumulative time, unneeded modules loaded, total import ms)."""
    tops = sorted((x for x in imports if x[3] == 0), key=lambda x: -x[2])
    total = sum(x[2] for x in imports if x[3] == 0) / 1e3
    top_text = ", ".join(f"`{n}` {c / 1e3:.1f}" for n, _, c, _ in tops[:top])
    names = {n: c for n, _, c, _ in imports}
    flagged = []
    for prefix in NOT_NEEDED[mode]:
        hit = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if hit:
            cum = max(names[n] for n in hit) / 1e3
            flagged.append(f"`{prefix}` ({len(hit)} module{'s' if len(hit) > 1 else ''}, {cum:.1f} ms)")
    return top_text, ", ".join(flagged) or "none", total


def render(res: dict, info: dict[str, str], when: str, elapsed: float) -> str:
    ours = [r for r in res["rows"] if r["who"] == "ours"]
    goal_bits = []
    for r in ours:
        if r["first"]:
            m = statistics.median(r["first"])
            goal_bits.append(f"`{r['name']}` {'met' if m <= GOAL_MS else '**NOT met**'} ({m:.1f} ms)")
        else:
            goal_bits.append(f"`{r['name']}` not measured")
    met = all(r["first"] and statistics.median(r["first"]) <= GOAL_MS for r in ours) and bool(ours)
    imp_rows = []
    for mode, imps in res["imports"].items():
        top, flagged, total = import_summary(imps, mode)
        imp_rows.append([f"`{mode}`", f"{total:.0f}", top, flagged])
    parts = [
        START_MARK,
        "## Client start-up: exec to first packet",
        "",
        f"Run {when} by `bench/client_startup.py` ({res['runs']} runs per mode after one warm-up run, {elapsed:.0f} s;"
        f" load average at the end {load_average()}).",
        "",
        "\n".join(f"- {k}: {v}" for k, v in info.items()),
        "",
        "**Method.** A lab (server and client namespaces) with no daemon; a packet socket on the server's veth",
        "(`AF_PACKET`, `SO_TIMESTAMPNS`) takes the kernel's receive time of every IPv4 packet from the client.",
        "`t0` is `time.time_ns()` just before `subprocess.Popen` forks, from a thread already in the client",
        "namespace (no `ip netns exec` in between); *first packet* is the first packet's kernel timestamp minus",
        "`t0`: fork, exec, interpreter start, imports, key loading, and the packet itself. *Exit* is when",
        "`wait()` returned (an upper bound). The client has a permanent neighbour entry for the server, so no run",
        "waits for ARP. One warm-up run per mode first (page cache, `.pyc`).",
        "",
        markdown_table(HEAD, table(res)),
        "",
        "**What loads** (`python -X importtime -m spa.client.cli ...`, the same arguments; ms cumulative, top-level",
        "imports only; *not needed* lists modules loaded that the mode has no use for):",
        "",
        markdown_table(["mode", "imports, ms", "slowest top-level imports, ms", "loaded but not needed"], imp_rows),
        "",
        f"**Goal: exec → packet ≤ {GOAL_MS:g} ms** — **{'met' if met else 'NOT met'}**: {', '.join(goal_bits)}.",
        "",
        "**Re-run** (root): `sudo python -m bench.client_startup` (`--runs 10` for a quicker one).",
        END_MARK,
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.client_startup", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per mode (default 20)")
    ap.add_argument("--no-baselines", action="store_true", help="skip knock and fwknop")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if not need_root("client_startup", "network namespaces, packet sockets"):
        return 2
    if not 1 <= args.runs <= 200:
        ap.error("--runs must be 1..200")

    unwind_on_sigterm()
    info, when, start = machine(), utc_now(), time.perf_counter()
    res = measure(args.runs, log, not args.no_baselines)
    print(text_table(HEAD, table(res)))
    for mode, imps in res["imports"].items():
        top, flagged, total = import_summary(imps, mode)
        print(f"{mode}: imports {total:.0f} ms; slowest {top}; not needed: {flagged}")
    if not args.no_write:
        write_section(Path(args.output), START_MARK, END_MARK, render(res, info, when, time.perf_counter() - start))
        print(f"wrote {args.output}")
    return 1 if any(r["error"] for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
