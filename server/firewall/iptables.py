"""iptables backend: one ACCEPT rule per granted port, in a chain of our own.

What it adds to the ruleset, in the ``filter`` table of both families
(``iptables`` and ``ip6tables``):

* a chain ``SPA-GRANTS`` (name configurable);
* one rule ``-I INPUT 1 -j SPA-GRANTS`` at the top of INPUT;
* per granted port, a rule in ``SPA-GRANTS``::

    -s 192.0.2.2/32 -p tcp -m tcp --dport 22
    -m time --datestop 2026-11-28T07:00:00
    -m comment --comment "spa:DOOR:1795847461.097" -j ACCEPT

  where DOOR is the %-escaped door name (``spa.grant.encode_label``) and the
  number is the Unix deadline. The comment is how ``list()`` reads a grant
  back; rules without a ``spa:`` comment are not ours and are left alone.

The time match makes the kernel stop matching a rule once the clock passes
the datestop (UTC, whole seconds: the rule matches through the second
``floor(deadline)``, so less than 1 s past the deadline), whether or not the
daemon is alive to delete it; the daemon deletes it on time anyway. xt_time
takes dates up to 2038-12-31T23:59:59; a deadline past that gets no time
match and relies on the daemon alone.

Variants: ``nft`` runs ``iptables-nft`` and friends, ``legacy`` the
``-legacy`` ones, ``auto`` whatever plain ``iptables`` is on this host.
Opening, re-granting and closing each run ONE ``iptables-restore --noflush``
(``ip6tables-restore`` for IPv6): the new rules and the deletion of the old
ones go in one commit, so a re-grant never leaves a gap or a duplicate, and a
failed commit changes nothing. ``teardown`` removes the jump and the chain
and nothing else.
"""

from __future__ import annotations

import calendar
import ipaddress
import logging
import math
import re
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from spa.errors import BackendUnavailable, FirewallError
from spa.grant import ActiveGrant, Address, PortSpec, decode_label, encode_label
from spa.server.firewall import run as runner
from spa.server.firewall.base import Backend

log = logging.getLogger(__name__)

DEFAULT_CHAIN = "SPA-GRANTS"
COMMENT_PREFIX = "spa:"
#: xt_comment holds at most 255 characters (XT_MAX_COMMENT_LEN - 1).
MAX_COMMENT = 255
#: The latest ``--datestop`` libxt_time accepts (it refuses years after 2038).
LATEST_DATESTOP = calendar.timegm((2038, 12, 31, 23, 59, 59))
INSTALL_HINT = "Debian: apt-get install iptables"

VARIANTS = ("auto", "nft", "legacy")
# variant -> (v4 tool, v6 tool, v4 restore, v6 restore)
_BINARIES = {
    "auto": ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore"),
    "nft": ("iptables-nft", "ip6tables-nft", "iptables-nft-restore", "ip6tables-nft-restore"),
    "legacy": ("iptables-legacy", "ip6tables-legacy", "iptables-legacy-restore", "ip6tables-legacy-restore"),
}
_CHAIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,27}$")
# What encode_label leaves in a comment, plus our own ':' separators and the
# deadline's digits: nothing that needs escaping inside double quotes.
_SAFE_COMMENT_RE = re.compile(r"^[A-Za-z0-9_.~%:-]+$")


# -- pure parts: rule text, parsing --------------------------------------------


def binaries(variant: str) -> tuple[str, str, str, str]:
    """The program names for ``variant``: (iptables, ip6tables, iptables-restore, ip6tables-restore)."""
    if variant not in _BINARIES:
        raise ValueError(f"iptables variant {variant!r} is not one of: {', '.join(VARIANTS)}")
    return _BINARIES[variant]


def format_datestop(deadline: float) -> str | None:
    """``--datestop`` for ``deadline``: floor(deadline) in UTC, or None when xt_time cannot express it."""
    second = math.floor(deadline)
    if second > LATEST_DATESTOP:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(max(0, second)))


def format_deadline(deadline: float) -> str:
    return f"{deadline:.3f}"


def rule_comment(door: str, deadline: float) -> str:
    """``spa:LABEL:DEADLINE``; raises ``FirewallError`` when it does not fit in an iptables comment."""
    comment = f"{COMMENT_PREFIX}{encode_label(door)}:{format_deadline(deadline)}"
    if len(comment) > MAX_COMMENT:
        raise FirewallError(
            f"door name {door[:20]!r}... is too long for an iptables comment "
            f"({len(comment)} characters once escaped, at most {MAX_COMMENT}); shorten it"
        )
    return comment


def parse_comment(comment: str) -> tuple[str, float] | None:
    """(door, deadline) from ``spa:LABEL:DEADLINE``, or None when the comment is not ours."""
    if not comment.startswith(COMMENT_PREFIX):
        return None
    parts = comment[len(COMMENT_PREFIX):].split(":")
    if len(parts) != 2 or not parts[0]:
        return None
    try:
        deadline = float(parts[1])
    except ValueError:
        return None
    if not math.isfinite(deadline):
        return None
    return decode_label(parts[0]), deadline


def source_spec(address: Address) -> str:
    return f"{address}/{address.max_prefixlen}"


def rule_args(address: Address, port: PortSpec, door: str, deadline: float) -> list[str]:
    """The match and target of one grant rule, as arguments (what follows ``-A CHAIN``)."""
    args = ["-s", source_spec(address), "-p", port.proto, "-m", port.proto, "--dport", str(port.port)]
    datestop = format_datestop(deadline)
    if datestop is not None:
        args += ["-m", "time", "--datestop", datestop]
    args += ["-m", "comment", "--comment", rule_comment(door, deadline), "-j", "ACCEPT"]
    return args


def spec_text(args: Sequence[str]) -> str:
    """Arguments as one iptables-restore line fragment, quoted as ``iptables -S`` prints them."""
    out = []
    for i, a in enumerate(args):
        if i > 0 and args[i - 1] == "--comment":
            if not _SAFE_COMMENT_RE.match(a):
                raise ValueError(f"comment {a!r} holds characters that need escaping")
            out.append(f'"{a}"')
        elif not a or any(c.isspace() or c in "\"'\\" for c in a):
            raise ValueError(f"argument {a!r} cannot go into an iptables-restore line unquoted")
        else:
            out.append(a)
    return " ".join(out)


def rule_spec(address: Address, port: PortSpec, door: str, deadline: float) -> str:
    """The text of one grant rule after ``-A CHAIN``, the same as ``iptables -S`` prints it back."""
    return spec_text(rule_args(address, port, door, deadline))


class ParsedRule(NamedTuple):
    """One of our rules, read back from ``iptables -S CHAIN``."""

    door: str
    address: Address
    port: PortSpec
    deadline: float
    #: the printed text after ``-A CHAIN``, reusable as ``-D CHAIN <spec>``
    spec: str


def _option(tokens: list[str], name: str) -> str | None:
    for i, t in enumerate(tokens[:-1]):
        if t == name:
            return tokens[i + 1]
    return None


def parse_rule_line(line: str, chain: str = DEFAULT_CHAIN) -> ParsedRule | None:
    """Parse one ``iptables -S`` line; None when it is not one of our grant rules in ``chain``."""
    head = f"-A {chain} "
    if not line.startswith(head):
        return None
    spec = line[len(head):].strip()
    try:
        tokens = shlex.split(spec)
    except ValueError:
        return None
    comment = _option(tokens, "--comment")
    ours = parse_comment(comment) if comment is not None else None
    if ours is None:
        return None
    door, deadline = ours
    src, proto, dport = _option(tokens, "-s"), _option(tokens, "-p"), _option(tokens, "--dport")
    if src is None or proto is None or dport is None or "!" in tokens or _option(tokens, "-j") != "ACCEPT":
        log.warning("iptables: ignoring rule with an spa comment but an unexpected shape: %s", line)
        return None
    try:
        net = ipaddress.ip_network(src, strict=True)
        if net.prefixlen != net.max_prefixlen:
            raise ValueError(src)
        port = PortSpec(int(dport), proto)  # type: ignore[arg-type]
    except ValueError:
        log.warning("iptables: ignoring rule with an spa comment but an unexpected shape: %s", line)
        return None
    return ParsedRule(door, net.network_address, port, deadline, spec)


def parse_rules(lines: Iterable[str], chain: str = DEFAULT_CHAIN) -> list[ParsedRule]:
    return [r for r in (parse_rule_line(line, chain) for line in lines) if r is not None]


def group_rules(rules: Iterable[ParsedRule]) -> list[ActiveGrant]:
    """Rules grouped into grants by (door, address); the latest deadline wins, ``detail`` holds the specs."""
    held: dict[tuple[str, Address], list[ParsedRule]] = {}
    for r in rules:
        held.setdefault((r.door, r.address), []).append(r)
    grants = []
    for (door, address), rs in held.items():
        grants.append(
            ActiveGrant(
                door,
                address,
                tuple(sorted({r.port for r in rs})),
                max(r.deadline for r in rs),
                detail=tuple(r.spec for r in rs),
            )
        )
    return sorted(grants, key=lambda g: (g.door, g.address.version, int(g.address)))


def restore_text(chain: str, add: Sequence[str] = (), delete: Sequence[str] = ()) -> str:
    """An ``iptables-restore --noflush`` document that appends ``add`` and deletes ``delete`` in one commit."""
    lines = ["*filter"]
    lines += [f"-A {chain} {spec}" for spec in add]
    lines += [f"-D {chain} {spec}" for spec in delete]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# -- the backend ---------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    version: int
    tool_name: str
    restore_name: str
    tool: str | None
    restore: str | None

    @property
    def usable(self) -> bool:
        return self.tool is not None and self.restore is not None

    def missing(self) -> str:
        names = [n for n, p in ((self.tool_name, self.tool), (self.restore_name, self.restore)) if p is None]
        return " and ".join(names)


class IptablesBackend(Backend):
    name = "iptables"
    kernel_expiry = True
    lists_firewall = True

    def __init__(self, variant: str = "auto", chain: str = DEFAULT_CHAIN, clock=time.time):
        tool4, tool6, restore4, restore6 = binaries(variant)
        if not _CHAIN_RE.match(chain) or chain.upper() in ("INPUT", "OUTPUT", "FORWARD", "ACCEPT", "DROP", "RETURN"):
            raise ValueError(f"iptables chain name {chain!r} is not usable (letters, digits, _.-, at most 28)")
        self.variant = variant
        self.chain = chain
        # Kept for the same signature as the other backends; deadlines are absolute here.
        self._clock = clock
        self._families = {
            4: _Family(4, tool4, restore4, runner.which(tool4), runner.which(restore4)),
            6: _Family(6, tool6, restore6, runner.which(tool6), runner.which(restore6)),
        }
        if not self._families[4].usable:
            raise BackendUnavailable(f"{self._families[4].missing()} not installed; {INSTALL_HINT}")

    def describe(self) -> str:
        return f"iptables (chain {self.chain}; {self._families[4].restore_name} --noflush)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if runner.which("iptables") is None:
            return f"iptables is not installed; {INSTALL_HINT}"
        return None

    # -- helpers -----------------------------------------------------------

    def _family(self, version: int) -> _Family:
        fam = self._families[version]
        if not fam.usable:
            raise BackendUnavailable(
                f"{fam.missing()} not installed, so IPv{version} grants cannot be opened; {INSTALL_HINT}"
            )
        return fam

    def _usable(self) -> list[_Family]:
        return [f for f in self._families.values() if f.usable]

    def _tool(self, fam: _Family, *args: str, check: bool = True):
        assert fam.tool is not None
        return runner.run([fam.tool, "-w", *args], check=check)

    def _chain_exists(self, fam: _Family) -> bool:
        # Not from ``-S CHAIN``'s exit status alone: iptables-nft reports a
        # missing chain as "incompatible, use 'nft' tool", legacy as "No
        # chain/target/match", and a real failure looks the same.
        return f"-N {self.chain}" in self._tool(fam, "-S").stdout.splitlines()

    def _jumps(self, fam: _Family) -> int:
        jump = f"-A INPUT -j {self.chain}"
        return sum(1 for line in self._tool(fam, "-S", "INPUT").stdout.splitlines() if line.strip() == jump)

    def _chain_lines(self, fam: _Family) -> list[str] | None:
        """``-S CHAIN`` output lines, or None when the chain does not exist."""
        proc = self._tool(fam, "-S", self.chain, check=False)
        if proc.returncode == 0:
            return proc.stdout.splitlines()
        if not self._chain_exists(fam):
            return None
        raise FirewallError("firewall command failed", proc.args, proc.returncode, proc.stderr)

    def _held(self, fam: _Family, door: str, address: Address) -> list[str]:
        """The specs of every rule of ``door`` for ``address`` in our chain."""
        lines = self._chain_lines(fam) or []
        return [r.spec for r in parse_rules(lines, self.chain) if r.door == door and r.address == address]

    def _restore(self, fam: _Family, add: Sequence[str], delete: Sequence[str]) -> None:
        assert fam.restore is not None
        runner.run([fam.restore, "-w", "--noflush"], input=restore_text(self.chain, add, delete))

    def _replace(self, fam: _Family, door: str, address: Address, add: Sequence[str]) -> None:
        """Append ``add`` and delete every other rule of ``door`` for ``address``, in one commit."""
        old = self._held(fam, door, address)
        if not add and not old:
            return
        try:
            self._restore(fam, add, old)
        except BackendUnavailable:
            raise
        except FirewallError:
            # A rule we meant to delete may have gone between reading and
            # committing (another process, or an operator): read again and
            # retry once; the failed commit changed nothing.
            fresh = self._held(fam, door, address)
            if sorted(fresh) == sorted(old):
                raise
            log.info("iptables: rules of %s for %s changed under us; retrying", door, address)
            if add or fresh:
                self._restore(fam, add, fresh)

    # -- structure ---------------------------------------------------------

    def setup(self) -> None:
        for fam in self._families.values():
            if not fam.usable:
                log.warning("iptables: %s not installed; IPv%d grants cannot be opened", fam.missing(), fam.version)
                continue
            if not self._chain_exists(fam):
                self._tool(fam, "-N", self.chain)
                log.info("iptables: created chain %s (%s)", self.chain, fam.tool_name)
            if self._tool(fam, "-C", "INPUT", "-j", self.chain, check=False).returncode != 0:
                self._tool(fam, "-I", "INPUT", "1", "-j", self.chain)
                log.info("iptables: inserted INPUT jump to %s (%s)", self.chain, fam.tool_name)
            else:
                for _ in range(self._jumps(fam) - 1):
                    self._tool(fam, "-D", "INPUT", "-j", self.chain)

    def check(self) -> list[str]:
        problems = []
        for fam in self._usable():
            if not self._chain_exists(fam):
                problems.append(f"{fam.tool_name}: chain {self.chain} is missing from the filter table")
            jumps = self._jumps(fam)
            if jumps == 0:
                problems.append(f"{fam.tool_name}: INPUT has no jump to {self.chain}")
            elif jumps > 1:
                problems.append(f"{fam.tool_name}: INPUT jumps to {self.chain} {jumps} times, expected once")
        return problems

    def teardown(self) -> None:
        for fam in self._usable():
            for _ in range(self._jumps(fam)):
                self._tool(fam, "-D", "INPUT", "-j", self.chain)
            if self._chain_exists(fam):
                self._tool(fam, "-F", self.chain)
                self._tool(fam, "-X", self.chain)
                log.info("iptables: removed chain %s (%s)", self.chain, fam.tool_name)

    # -- grants ------------------------------------------------------------

    def open(self, grant: ActiveGrant, previous: ActiveGrant | None = None) -> None:
        fam = self._family(grant.address.version)
        if format_datestop(grant.deadline) is None:
            log.warning("iptables: deadline %.0f is past what xt_time can hold; only the daemon closes it", grant.deadline)
        add = [rule_spec(grant.address, p, grant.door, grant.deadline) for p in grant.ports]
        # The old rules are read from the chain rather than taken from
        # ``previous``: that also removes what a crash or a stale journal left.
        self._replace(fam, grant.door, grant.address, add)

    def close(self, grant: ActiveGrant) -> None:
        fam = self._families[grant.address.version]
        if not fam.usable:
            return  # nothing can be open through a family we cannot run
        self._replace(fam, grant.door, grant.address, [])

    def list(self) -> list[ActiveGrant]:
        rules: list[ParsedRule] = []
        for fam in self._usable():
            rules += parse_rules(self._chain_lines(fam) or [], self.chain)
        return group_rules(rules)
