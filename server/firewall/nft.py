"""nftables backend: grants are set elements that carry their own timeout.

What it adds to the ruleset (docs/firewall.md says the same):

* a table ``inet spa`` (name configurable) with two sets, ``allow4`` and
  ``allow6``, of ``address . protocol . port`` elements with timeouts, and a
  chain ``mark`` on the input hook at priority -175 that sets one bit of the
  packet mark (``0x20000000`` by default) on packets whose source, protocol
  and destination port are in a set;
* one rule ``meta mark & BIT == BIT accept`` (comment ``spa-gatekeeper``) at
  the top of every other input base chain that can drop: chains with policy
  drop or a drop/reject rule, native nftables (``inet filter input``) or
  iptables-nft (``ip filter INPUT``, inserted through iptables itself so its
  tools keep parsing the table), and iptables-legacy's INPUT when it drops.

The accept must sit where the drop is decided: an accept in our own table
would not stop another table's chain from dropping the packet, so we mark
in ours and accept in theirs. The kernel removes an element when its timeout
ends, so a grant closes on time even when the daemon is dead. A clean
``teardown`` deletes the table and every rule with our comment, and nothing
else.

Two paths to the kernel. Grants (``open``, ``open_many``, ``close``) are set
elements written by ``nfnetlink.SetElementWriter``: one batch on a raw
netlink socket a transaction, timeouts in exact milliseconds. Everything
else (setup, check, list, teardown, the hooks) goes through libnftables'
JSON (``libnft``). ``elements="json"`` (or no netlink socket) writes the
elements through JSON too, with whole-second timeouts. Both paths run the
same operations in the same transactions.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spa.errors import BackendUnavailable, FirewallError
from spa.grant import ActiveGrant, PortSpec, decode_label, encode_label
from spa.server.firewall import run as runner
from spa.server.firewall.base import Backend
from spa.server.firewall.libnft import Transport, open_transport
from spa.server.firewall.nfnetlink import CreateTemplate, Element, ElementOp, SetElementWriter, element_key

log = logging.getLogger(__name__)

HOOK_COMMENT = "spa-gatekeeper"
DEFAULT_TABLE = "spa"
DEFAULT_MARK = 0x20000000
# Below iptables' mangle (-150) and filter (0): the mark must be set before
# any chain that may drop looks at the packet.
MARK_PRIORITY = -175
_IPTABLES_TABLES = {"filter", "mangle", "raw", "security", "nat"}
ELEMENT_PATHS = ("auto", "netlink", "json")
ElementPath = Literal["auto", "netlink", "json"]


@dataclass(frozen=True, slots=True)
class _Step:
    """One element operation of a transaction, before it is written as JSON or netlink."""

    op: str  # add, create or delete
    grant: ActiveGrant
    ports: tuple[PortSpec, ...]
    #: time left for the kernel timeout; each path rounds it up to its unit
    seconds: float


def _timeout_ms(seconds: float) -> int:
    # Exact milliseconds for netlink: the kernel takes them as they are, so the
    # safety-net timeout ends with the grant, not up to 1 s later. Never zero.
    return max(1, math.ceil(seconds * 1000))


def _elem_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: PortSpec) -> dict[str, Any]:
    return {"concat": [str(address), port.proto, port.port]}


def _has_verdict(expr: Any, verdicts: tuple[str, ...] = ("drop", "reject")) -> bool:
    if isinstance(expr, dict):
        return any(k in verdicts or _has_verdict(v, verdicts) for k, v in expr.items())
    if isinstance(expr, list):
        return any(_has_verdict(e, verdicts) for e in expr)
    return False


class NftBackend(Backend):
    name = "nft"
    kernel_expiry = True

    def __init__(
        self,
        table: str = DEFAULT_TABLE,
        mark: int = DEFAULT_MARK,
        transport: Transport | None = None,
        clock=time.time,
        elements: ElementPath = "auto",
    ):
        """``elements``: how grants are written. ``netlink``: raw nfnetlink batches; ``json``: the
        JSON transport; ``auto``: netlink when its socket opens here, else JSON."""
        if not 0 < mark < 2**32:
            raise ValueError(f"nft mark {mark:#x} must be a non-zero 32-bit value")
        if elements not in ELEMENT_PATHS:
            raise ValueError(f"nft elements {elements!r} must be one of {', '.join(ELEMENT_PATHS)}")
        self.table = table
        self.mark = mark
        self._clock = clock
        self._nft = transport if transport is not None else open_transport()
        self._writer = self._open_writer(elements)
        # Laid-out create batches by (door, IP version, ports): a door's grants differ only in address and time.
        self._templates: dict[tuple[str, int, tuple[PortSpec, ...]], CreateTemplate] = {}

    def _open_writer(self, elements: ElementPath) -> SetElementWriter | None:
        if elements == "json":
            return None
        try:
            # Made here, so in this thread's network namespace, like the libnftables context.
            return SetElementWriter(self.table)
        except OSError as exc:
            if elements == "netlink":
                raise BackendUnavailable(f"cannot open a NETLINK_NETFILTER socket: {exc}") from None
            log.info("nft: no netlink socket (%s); set elements go through %s", exc, self._nft.kind)
            return None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            open_transport()
        except BackendUnavailable as exc:
            return f"nftables is not usable here ({exc.message}); Debian: apt-get install nftables"
        return None

    @property
    def transport_kind(self) -> str:
        return self._nft.kind

    def describe(self) -> str:
        return f"nft (table inet {self.table}; grants through {self.element_kind}, the rest through {self.transport_kind})"

    @property
    def element_kind(self) -> str:
        """How grants are written: ``netlink``, or the JSON transport's kind."""
        return SetElementWriter.kind if self._writer is not None else self._nft.kind

    def close_transports(self) -> None:
        """Close the element socket and (when it can) the JSON transport: for tests and benchmarks."""
        if self._writer is not None:
            self._writer.close()
        if hasattr(self._nft, "close"):
            self._nft.close()

    # -- structure ---------------------------------------------------------

    def _obj(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {kind: {"family": "inet", "table": self.table, **fields}}

    def _mark_rule(self, version: int) -> dict[str, Any]:
        proto = "ip" if version == 4 else "ip6"
        return self._obj(
            "rule",
            chain="mark",
            expr=[
                {
                    "match": {
                        "op": "==",
                        "left": {
                            "concat": [
                                {"payload": {"protocol": proto, "field": "saddr"}},
                                {"meta": {"key": "l4proto"}},
                                {"payload": {"protocol": "th", "field": "dport"}},
                            ]
                        },
                        "right": f"@allow{version}",
                    }
                },
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, self.mark]}}},
            ],
        )

    def setup(self) -> None:
        doc = [
            {"add": {"table": {"family": "inet", "name": self.table}}},
            {"add": self._obj("set", name="allow4", type=["ipv4_addr", "inet_proto", "inet_service"], flags=["timeout"])},
            {"add": self._obj("set", name="allow6", type=["ipv6_addr", "inet_proto", "inet_service"], flags=["timeout"])},
            {
                "add": self._obj(
                    "chain", name="mark", type="filter", hook="input", prio=MARK_PRIORITY, policy="accept"
                )
            },
            # Flushing and refilling in one transaction: no moment without the rules.
            {"flush": self._obj("chain", name="mark")},
            {"add": self._mark_rule(4)},
            {"add": self._mark_rule(6)},
        ]
        self._nft.cmd({"nftables": doc})
        self._install_hooks()

    def _ruleset(self) -> list[dict[str, Any]]:
        out = self._nft.cmd({"nftables": [{"list": {"ruleset": None}}]})
        return out.get("nftables", [])

    def _input_chains(self, ruleset: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
        """Other tables' input base chains that can drop, with whether they already hold our hook."""
        chains: dict[tuple[str, str, str], dict[str, Any]] = {}
        for item in ruleset:
            c = item.get("chain")
            if not c or c.get("hook") != "input" or c.get("family") not in ("ip", "ip6", "inet"):
                continue
            if c.get("family") == "inet" and c.get("table") == self.table:
                continue
            chains[(c["family"], c["table"], c["name"])] = {
                "drops": c.get("policy") == "drop",
                "hooked": [],
                "iptables": c["family"] in ("ip", "ip6") and c["table"] in _IPTABLES_TABLES and c["name"].isupper(),
            }
        for item in ruleset:
            r = item.get("rule")
            if not r:
                continue
            info = chains.get((r["family"], r["table"], r["chain"]))
            if info is None:
                continue
            if self._is_hook_rule(r):
                info["hooked"].append(r["handle"])
            elif _has_verdict(r.get("expr")):
                info["drops"] = True
        return chains

    def _is_hook_rule(self, rule: dict[str, Any]) -> bool:
        """Our accept rule: by its comment, or (iptables-nft keeps comments where nft cannot read them) by its shape."""
        if rule.get("comment") == HOOK_COMMENT:
            return True
        expr = rule.get("expr") or []
        want = {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, self.mark]}, "right": self.mark}}
        return bool(expr) and expr[0] == want and {"accept": None} in expr

    def _legacy_inputs(self) -> list[tuple[str, str]]:
        """iptables-legacy INPUT chains that drop: (binary, family)."""
        found = []
        for family, names, binary in (
            ("ip", "/proc/net/ip_tables_names", "iptables-legacy"),
            ("ip6", "/proc/net/ip6_tables_names", "ip6tables-legacy"),
        ):
            try:
                tables = Path(names).read_text().split()
            except OSError:
                continue
            path = runner.which(binary)
            if "filter" not in tables or path is None:
                continue
            rules = runner.run([path, "-w", "-S", "INPUT"]).stdout.splitlines()
            if any(line in ("-P INPUT DROP",) or line.endswith(("-j DROP", "-j REJECT")) or "-j REJECT " in line for line in rules):
                found.append((path, family))
        return found

    def _iptables_hook_argv(self, binary: str, op: str) -> list[str]:
        m = f"{self.mark:#x}/{self.mark:#x}"
        spec = ["INPUT", "1"] if op == "-I" else ["INPUT"]
        return [binary, "-w", op, *spec, "-m", "mark", "--mark", m, "-m", "comment", "--comment", HOOK_COMMENT, "-j", "ACCEPT"]

    def _install_hooks(self) -> None:
        chains = self._input_chains(self._ruleset())
        doc = []
        for (family, table, chain), info in sorted(chains.items()):
            if not info["drops"] or info["hooked"]:
                continue
            if info["iptables"]:
                binary = runner.which("iptables-nft" if family == "ip" else "ip6tables-nft")
                if binary is None:
                    raise BackendUnavailable(f"{family} {table} {chain} is managed by iptables-nft, which is not installed")
                runner.run(self._iptables_hook_argv(binary, "-I"))
                log.info("nft: hooked iptables-nft %s %s %s", family, table, chain)
                continue
            doc.append(
                {
                    "insert": {
                        "rule": {
                            "family": family,
                            "table": table,
                            "chain": chain,
                            "comment": HOOK_COMMENT,
                            "expr": [
                                {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, self.mark]}, "right": self.mark}},
                                {"accept": None},
                            ],
                        }
                    }
                }
            )
            log.info("nft: hooked %s %s %s", family, table, chain)
        if doc:
            self._nft.cmd({"nftables": doc})
        for binary, family in self._legacy_inputs():
            check = runner.run(self._iptables_hook_argv(binary, "-C"), check=False)
            if check.returncode != 0:
                runner.run(self._iptables_hook_argv(binary, "-I"))
                log.info("nft: hooked %s INPUT", binary)

    def check(self) -> list[str]:
        ruleset = self._ruleset()
        problems = []
        tables = {(i["table"]["family"], i["table"]["name"]) for i in ruleset if "table" in i}
        if ("inet", self.table) not in tables:
            return [f"table inet {self.table} is missing"]
        sets = {i["set"]["name"] for i in ruleset if "set" in i and i["set"].get("table") == self.table}
        problems += [f"set inet {self.table} {s} is missing" for s in ("allow4", "allow6") if s not in sets]
        marks = [i for i in ruleset if "rule" in i and i["rule"]["table"] == self.table and i["rule"]["chain"] == "mark"]
        if len(marks) != 2:
            problems.append(f"chain inet {self.table} mark holds {len(marks)} rules, expected 2")
        for (family, table, chain), info in sorted(self._input_chains(ruleset).items()):
            if info["drops"] and not info["hooked"]:
                problems.append(f"{family} {table} {chain} drops but has no {HOOK_COMMENT} accept rule")
        for binary, _family in self._legacy_inputs():
            if runner.run(self._iptables_hook_argv(binary, "-C"), check=False).returncode != 0:
                problems.append(f"{binary} INPUT drops but has no {HOOK_COMMENT} accept rule")
        return problems

    def teardown(self) -> None:
        ruleset = self._ruleset()
        doc: list[dict[str, Any]] = []
        for (family, table, chain), info in self._input_chains(ruleset).items():
            for handle in info["hooked"]:
                doc.append({"delete": {"rule": {"family": family, "table": table, "chain": chain, "handle": handle}}})
        if any(i.get("table", {}).get("name") == self.table and i["table"].get("family") == "inet" for i in ruleset):
            doc.append({"delete": {"table": {"family": "inet", "name": self.table}}})
        if doc:
            self._nft.cmd({"nftables": doc})
        for binary, _family in self._legacy_inputs():
            while runner.run(self._iptables_hook_argv(binary, "-D"), check=False).returncode == 0:
                pass

    # -- grants ------------------------------------------------------------

    def _elements(self, grant: ActiveGrant, ports, timeout_s: int, with_comment: bool) -> list[dict[str, Any]]:
        elems = []
        for p in ports:
            e: dict[str, Any] = {"val": _elem_key(grant.address, p), "timeout": timeout_s}
            if with_comment:
                e["comment"] = encode_label(grant.door)
            elems.append({"elem": e})
        return elems

    def _element_op(self, op: str, grant: ActiveGrant, ports, timeout_s: int) -> dict[str, Any]:
        return {
            op: self._obj(
                "element",
                name=f"allow{grant.address.version}",
                elem=self._elements(grant, ports, timeout_s, with_comment=(op in ("add", "create"))),
            )
        }

    def _netlink_op(self, step: _Step) -> ElementOp:
        timeout_ms = None if step.op == "delete" else _timeout_ms(step.seconds)
        comment = encode_label(step.grant.door) if step.op in ("add", "create") else None
        elems = tuple(Element(element_key(step.grant.address, p.proto, p.port), timeout_ms, comment) for p in step.ports)
        return ElementOp(step.op, f"allow{step.grant.address.version}", elems)  # type: ignore[arg-type]

    def _write(self, steps: list[_Step]) -> None:
        """Run ``steps`` as one transaction, through netlink or JSON."""
        if self._writer is not None:
            self._writer.apply([self._netlink_op(s) for s in steps])
            return
        self._nft.cmd({"nftables": [self._element_op(s.op, s.grant, s.ports, self._timeout(s.seconds)) for s in steps]})

    @staticmethod
    def _timeout(seconds: float) -> int:
        # nft's JSON takes whole seconds (1.0.6 silently drops a fractional
        # timeout, leaving the element forever): round up, never to zero. The
        # grant manager deletes the element at the exact deadline; the kernel
        # timeout is the safety net, at most 1 s later.
        return max(1, math.ceil(seconds))

    def _refresh_ops(self, grant: ActiveGrant, previous: ActiveGrant | None, now: float) -> list[_Step]:
        """add (a no-op when present), delete, add again: a fresh timeout whether or not the element existed.

        In one transaction, so a re-grant extends without a gap and never
        holds two elements; ports the previous grant had and this one has not
        are removed in the same transaction.
        """
        left = grant.deadline - now
        ops = [_Step(op, grant, grant.ports, left) for op in ("add", "delete", "add")]
        if previous is not None and previous.address == grant.address:
            gone = tuple(p for p in previous.ports if p not in grant.ports)
            if gone:
                ops.append(_Step("add", previous, gone, 1))
                ops.append(_Step("delete", previous, gone, 1))
        return ops

    def _create(self, grant: ActiveGrant) -> bool:
        """Add ``grant``'s elements in one transaction that fails if any exists; False when it failed."""
        seconds = grant.deadline - self._clock()
        try:
            if self._writer is not None and grant.ports:
                self._writer.create(self._template(grant), grant.address.packed, _timeout_ms(seconds))
            else:
                self._write([_Step("create", grant, grant.ports, seconds)])
        except FirewallError:
            return False
        return True

    def _template(self, grant: ActiveGrant) -> CreateTemplate:
        key = (grant.door, grant.address.version, grant.ports)
        t = self._templates.get(key)
        if t is None:
            if len(self._templates) >= 1024:  # doors come and go with reloads; never grow without bound
                self._templates.clear()
            any_address = ipaddress.ip_address(0 if grant.address.version == 4 else "::")
            tails = [element_key(any_address, p.proto, p.port)[len(any_address.packed):] for p in grant.ports]
            t = self._templates[key] = CreateTemplate(self.table, f"allow{grant.address.version}",
                                                      len(any_address.packed), tails, encode_label(grant.door))
        return t

    def open(self, grant: ActiveGrant, previous: ActiveGrant | None = None) -> None:
        # A first grant is usually new to the set: "create" fails if any
        # element exists, and costs one netlink round trip without the
        # delete that makes the kernel wait for freed objects (tens of ms
        # through an nft process). If it exists (another door holds the
        # port), refresh it instead.
        if previous is None and self._create(grant):
            return
        self._write(self._refresh_ops(grant, previous, self._clock()))

    @property
    def prompt(self) -> bool:
        # Through netlink a create is one send and one ack (about 0.1 ms); the
        # nft library path parses JSON and is left to the grant worker.
        return self._writer is not None

    def open_new(self, grant: ActiveGrant) -> bool:
        return self._writer is not None and self._create(grant)

    def open_many(self, pairs: list[tuple[ActiveGrant, ActiveGrant | None]]) -> None:
        """Every pair in ONE transaction: all open, or none."""
        if len(pairs) == 1:
            self.open(*pairs[0])
            return
        now = self._clock()
        self._write([op for grant, previous in pairs for op in self._refresh_ops(grant, previous, now)])

    def close(self, grant: ActiveGrant) -> None:
        self._write([_Step("add", grant, grant.ports, 1), _Step("delete", grant, grant.ports, 1)])

    def list(self) -> list[ActiveGrant]:
        now = self._clock()
        held: dict[tuple[str, str], dict[str, Any]] = {}
        for version in (4, 6):
            try:
                out = self._nft.cmd({"nftables": [{"list": self._obj("set", name=f"allow{version}")}]})
            except FirewallError:
                continue  # no table: nothing is open through us
            for item in out.get("nftables", []):
                for e in item.get("set", {}).get("elem", []) or []:
                    e = e.get("elem", e) if isinstance(e, dict) else e
                    if not isinstance(e, dict) or "val" not in e:
                        continue
                    # JSON gives whole seconds left, truncated; 0 means expired or in
                    # its last second. Recent kernels also keep dumping an expired
                    # element until the next transaction, while packets already miss
                    # it. Either way it no longer counts as held.
                    if int(e.get("expires", 0)) <= 0:
                        continue
                    addr, proto, port = e["val"]["concat"]
                    door = decode_label(e.get("comment", ""))
                    entry = held.setdefault((door, addr), {"ports": [], "deadline": 0.0})
                    entry["ports"].append(PortSpec(int(port), str(proto)))
                    entry["deadline"] = max(entry["deadline"], now + float(e["expires"]))
        return [
            ActiveGrant(door, ipaddress.ip_address(addr), tuple(sorted(v["ports"])), v["deadline"])
            for (door, addr), v in sorted(held.items())
        ]
