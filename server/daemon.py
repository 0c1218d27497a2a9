"""The knock daemon: capture, match, grant. One thread for packets, one for the firewall.

The capture loop reads filtered packet sockets, parses headers with
``struct`` (``spa.packet``), feeds the matcher and hands completed knocks to
the grant manager's queue. It never blocks on anything else: firewall work,
stop commands, the journal and one-time-sequence files are handled by the
manager's worker and a small worker of its own.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from spa import rotating_match
from spa.authorize import Verifier
from spa.config import Config, Door, load_config
from spa.errors import ConfigError, InvalidGrant, SpaError
from spa.grant import Address, CommandAction, Grant
from spa.knock import Knock, address
from spa.matcher import TCP, UDP, MatchDoor, MatchEvent, Matcher
from spa.metrics import Metric, render
from spa.packet import fields, udp_payload
from spa.protocol import NONCE_SIZE, PACKET_SIZE, VERSION
from spa.replay import ReplayCache
from spa.rotating_match import RotatingDoor, SourceBound
from spa.filter import SpaPort, capture_expression, knocks_on
from spa.server import ebpf, netlink
from spa.server.bpf import DROP_ALL, FilterError, compile_filter
from spa.server.capture import ANY, Capture
from spa.server.grants import DEFER_DELAY, GrantManager
from spa.server.knock_kernel import NOTES_INTERVAL, KernelMatcher, unsuitable
from spa.server.logs import Names, Throttle, events
from spa.server.onetime import OneTimeSequences
from spa.server.sdnotify import Notifier
from spa.server.rotating_keys import load_rotating
from spa.server.spa_filter import SpaPortFilter
from spa.server.spa_kernel import NONCES, SpaScreen
from spa.server.spa_receiver import SpaReceiver, load_authorized, load_verifier

log = logging.getLogger("spa.server")

#: A door with a start command and no stop command fires on every knock, as
#: in knockd (the seed's open and close doors rely on it): its grant is held
#: only this long, so knocking again runs the start command again.
ONE_SHOT = 0.001
#: How often attempts are swept for timeouts and interfaces retried.
TICK = 1.0
#: How often the metrics textfile and status.json are rewritten.
METRICS_INTERVAL = 5.0
#: How often junk on the SPA port is summarized in the log (never per packet).
JUNK_SUMMARY_INTERVAL = 60.0
#: Seconds from an accepted SPA packet to its nonce in the kernel's filter (copies before that are
#: refused by the replay cache in Python, for a dictionary lookup each).
NONCE_FILTER_DELAY = 0.05
#: A classic door completed again by the same source within this share of its grant's duration
#: (and at least REPEAT_HOLDOFF seconds) after it opened is counted, not acted on: the extension
#: would move the deadline by less than that. A spoofed flood on a knock sequence completes the
#: same (door, source) many times a second, each a grant, a journal row and an OPEN SESAME line.
REPEAT_SHARE = 0.1
REPEAT_HOLDOFF = 1.0
#: Only doors whose grant lasts at least this long (seconds) hold off repeats: a shorter one
#: could close within the holdoff, and one-shot command doors run their command at every open, as in knockd.
REPEAT_MIN_DURATION = 10.0
#: The interpreter's thread switch interval while the daemon runs (Python's default is 5 ms). Under a
#: flood the capture loop never blocks, and the grant worker waits this long for the GIL each time it
#: comes back from sqlite or libnftables: a batch of grants took tens to hundreds of milliseconds.
SWITCH_INTERVAL = 0.0005


def repeat_holdoff(door: Door) -> float:
    """How long after an open the same source's next open of ``door`` is only counted (0: never)."""
    if door.cmd_timeout < REPEAT_MIN_DURATION or not (door.open or door.stop_command or door.stop_command_6):
        return 0.0
    return max(REPEAT_HOLDOFF, door.cmd_timeout * REPEAT_SHARE)


@dataclass
class Settings:
    """What the command line decides (the config file fills what it leaves open)."""

    config: str = "/etc/knockd.conf"
    interfaces: tuple[str, ...] = ()
    only_ipv4: bool = False
    lookup: bool = False
    backend: str | None = None
    state_dir: str | None = None
    repair_interval: float = 10.0
    max_attempts: int = 65536
    #: Where knock sequences are matched: "kernel" (an eBPF program; an error is logged if it cannot be),
    #: "user" (the Python matcher behind the capture filter), or "auto" (the kernel when it can).
    knock_matcher: str = "auto"
    #: What checks datagrams to the SPA port in the kernel: "ebpf" (their AEAD tag: forgeries never reach
    #: user space; an error is logged if it cannot run), "classic" (a classic BPF filter on the key hint and
    #: nonce), or "auto" (eBPF when it can).
    spa_screen: str = "auto"
    #: Where the Prometheus textfile and status.json go (None: not written).
    metrics_file: str | None = None
    status_file: str | None = None


@dataclass
class Runtime:
    """A loaded configuration with its one-time sequence files: what a reload swaps in whole."""

    config: Config
    doors: dict[str, Door]
    onetime: dict[str, OneTimeSequences] = field(default_factory=dict)
    #: SPA: None when no door accepts SPA.
    verifier: Verifier | None = None
    #: Doors with rotating sequences, their shared keys loaded.
    rotating: tuple[RotatingDoor, ...] = ()
    #: SPA doors' authorized_keys: door -> (path, keys).
    authorized: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> Runtime:
        config = load_config(path)
        onetime = {}
        for d in config.doors:
            if d.one_time_sequences is not None:
                onetime[d.name] = OneTimeSequences(config.resolve(d.one_time_sequences))
        authorized = load_authorized(config)
        return cls(config, {d.name: d for d in config.doors}, onetime, load_verifier(config, authorized),
                   load_rotating(config), authorized)

    def match_doors(self, now: float | None = None) -> list[MatchDoor]:
        """The classic doors, and the rotating candidates in force at ``now``."""
        out = rotating_match.plan(self.rotating, time.time() if now is None else now)
        for d in self.doors.values():
            if "sequence" not in d.triggers:
                continue  # SPA or rotating only: nothing for the static matcher
            if d.name in self.onetime:
                seq = self.onetime[d.name].current
                if seq is None:
                    continue  # every sequence used: the door is disabled
                out.append(MatchDoor.of(d, seq))
            else:
                out.append(MatchDoor.of(d))
        return out

    @property
    def warnings(self) -> list[str]:
        """What ``spa check-config`` warns about, and doors whose one-time sequences are all used."""
        from spa.checks import check, check_keys
        from spa.server.listening import listening_ports

        out = list(self.config.warnings)
        out += [f"{f.path}:{f.line}: {f.message}" for f in check(self.config, listening_ports())]
        out += [f"{f.path}:{f.line}: {f.message}" for f in check_keys(self.config, self.rotating, self.authorized)]
        for name, otp in self.onetime.items():
            if otp.current is None:
                out.append(f"{otp.path}: every one-time sequence of door {name} is used; the door is disabled")
        return out

    @property
    def needs_native(self) -> bool:
        return any(d.open for d in self.doors.values())


def door_grant(door: Door, address: Address, duration: float | None = None, via: str = "knock") -> Grant | None:
    """What a completed knock (or an SPA packet) on ``door`` for ``address`` opens, or None when nothing.

    ``duration`` (SPA: what the client asked for, already capped) replaces the door's ``cmd_timeout``.
    An address that can never be granted (unspecified, multicast) opens nothing: this runs on the
    capture loop, where packet content must never raise.
    """
    try:
        if door.open:
            return Grant(door.name, address, door.open, duration or door.cmd_timeout, via=via)
        action = CommandAction(door.start_command, door.stop_command, door.start_command_6, door.stop_command_6)
        start, stop = action.commands_for(address)
        if start is None:
            return None  # knockd never runs a stop command without a start command
        return Grant(door.name, address, (), (duration or door.cmd_timeout) if stop else ONE_SHOT, action, via=via)
    except InvalidGrant as exc:
        log.warning("door %s: not opened for %s: %s", door.name, address, exc)
        return None


def _debug_packet(proto: int, skey: int, sport: int, dkey: int, dport: int, size: int) -> None:
    """knockd -D's packet line, with the right month (knockd prints it one too low)."""
    log.debug("%s: %s: %s:%d -> %s:%d %d bytes", time.strftime("%Y-%m-%d %H:%M:%S"),
              "tcp" if proto == TCP else "udp", address(skey), sport, address(dkey), dport, size)


class Daemon:
    def __init__(self, settings: Settings, runtime: Runtime, manager: GrantManager):
        self.settings = settings
        self.runtime = runtime
        self.manager = manager
        self.names = Names(settings.lookup)
        self.matcher = Matcher(runtime.match_doors(), max_attempts=settings.max_attempts)
        self.bound = SourceBound(runtime.rotating)
        self.capture: Capture | None = None
        self.monitor: netlink.Monitor | None = None
        self.selector = selectors.DefaultSelector()
        self._registered: dict[socket.socket, str] = {}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-onetime")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signals: list[int] = []
        self.stats: dict[str, int] = {"malformed": 0, "knocks": 0, "opens": 0, "reloads": 0, "reload_failures": 0,
                                      "rotating_reused": 0, "opens_repeated": 0}
        # (door, source key) -> capture time of its last open acted on; pruned of grants long over when big.
        self._last_open: dict[tuple[str, int], float] = {}
        self._repeats_logged = 0
        self.event_counts: dict[str, int] = {"stage": 0, "open": 0, "timeout": 0, "reset": 0}
        self.started = time.time()
        self._next_metrics = 0.0
        self.filter_expression: str | None = None
        # The compiled filter, whether it has an SPA-port clause, and what the sockets hold.
        self._compiled: list = DROP_ALL
        self._compiled_spa = False
        self._installed: list | None = None
        self.spa_filter = SpaPortFilter()  # that clause's key hints and nonces, between builds
        self._nonces_due: float | None = None  # when an accepted nonce goes into the kernel's filter
        self.notifier = Notifier()
        self._throttle = Throttle()
        self.replay = ReplayCache()
        #: SPA packets made before this time are refused (set by ``start`` after the machine went down under us).
        self.spa_not_before = 0.0
        self.spa: SpaReceiver | None = SpaReceiver(runtime.verifier, self.replay) if runtime.verifier else None
        self._next_junk_summary = 0.0
        self._next_rotation = rotating_match.boundaries(runtime.rotating, time.time())
        #: The kernel knock matcher while it is in use (see ``_sync_kernel``), and why not otherwise.
        self.kernel: KernelMatcher | None = None
        self._kernel_why: str | None = "not started"
        self._tapped: Capture | None = None  # the capture that carries the kernel matcher's taps
        self._kernel_fds: list[int] = []
        self._notes_rearm: float | None = None  # when the notes ring may wake the loop again
        self._kernel_stop_due = False
        # Event totals of kernel matchers closed since start (their counters go with them).
        self._kernel_retired: collections.Counter[str] = collections.Counter()
        self._kernel_lost_logged = 0
        #: The SPA port's eBPF screen while it is in use (see ``_sync_screen``), and why not otherwise.
        self.screen: SpaScreen | None = None
        self._screen_why: str | None = "not started"
        self._screen_capture: Capture | None = None  # the capture that carries its sockets
        #: The verifier and the epochs of its hint index the screen's map was filled from.
        self._screen_hints: tuple[Verifier, tuple[int, int]] | None = None
        self._screen_stop_due = False
        self._screen_retired: collections.Counter[str] = collections.Counter()
        self._screen_reported = 0

    @property
    def spa_port(self) -> int | None:
        return self.runtime.config.options.spa_port if self.spa is not None else None

    # -- set-up ------------------------------------------------------------------

    @property
    def interfaces(self) -> tuple[str, ...]:
        return self.settings.interfaces or self.runtime.config.options.interfaces or (ANY,)

    def start(self) -> None:
        # Replays stay refused across restarts (and reboots, with StateDir on disk).
        journal = self.manager.journal
        now = time.time()
        for nonce, until in journal.replay_entries(now):
            self.replay.add(nonce, until)
        if journal.begin_session():
            # A nonce reaches the disk a moment after its grant opens (or ahead of it without an
            # fsync): after a crash the last few may be lost, so nothing made before now is taken.
            self.spa_not_before = now
        if self.spa_not_before and self.spa is not None:
            log.warning("the previous run ended without a clean stop: SPA packets made before %s are refused "
                        "(a nonce written just before may be lost)", time.strftime("%H:%M:%S", time.localtime(now)))
        if self.spa is not None:
            self.spa.verifier.not_before = self.spa_not_before
        self.monitor = netlink.Monitor()
        self.capture = Capture(self.interfaces, ipv6=not self.settings.only_ipv4)
        self.refresh_addresses()
        self.selector.register(self.monitor, selectors.EVENT_READ, "netlink")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signal")
        self._sync_sockets()
        events.info("starting up, listening on %s", ",".join(self.interfaces))
        self.notifier.ready(self.status_line())
        self.publish()

    def status_line(self) -> str:
        doors = len(self.matcher.doors)
        return (f"listening on {','.join(self.interfaces)}: {doors} door{'s' if doors != 1 else ''}, "
                f"{len(self.manager.active())} open")

    def local_addresses(self) -> set[Address]:
        by_name = netlink.addresses()
        wanted = self.interfaces
        addrs: set[Address] = set()
        for name, values in by_name.items():
            if ANY in wanted or name in wanted:
                addrs.update(a for a in values if not (self.settings.only_ipv4 and a.version == 6))
        return addrs

    def refresh_addresses(self) -> None:
        """Re-read this host's addresses and rebuild the kernel filter (addresses changed, doors changed)."""
        try:
            local = self.local_addresses()
        except OSError as exc:
            log.warning("cannot read interface addresses: %s", exc)
            return
        self.matcher.local_addresses = frozenset(local)
        self.bound.local_addresses = frozenset(local)
        self.rebuild_filter()

    def rebuild_filter(self) -> None:
        """Install the kernel filter for the current doors, addresses and SPA key hints, if it changed."""
        local = set(self.matcher.local_addresses or ())
        targets = {d.target for d in self.matcher.doors if d.target is not None}
        steps = set()
        for d in self.matcher.doors:
            for s in (*d.sequence, *d.guards):
                steps.add((s.proto, s.port, d.tcpflags))
        dests = local | targets
        ranges = self.bound.ranges()
        spa = None
        knocked = self.spa_port is not None and knocks_on("udp", self.spa_port, steps, ranges)
        screened = self._sync_screen(knocked)
        if self.spa_port is not None:
            if knocked:
                steps.add(("udp", self.spa_port, None))  # a door knocks there too: it sees every datagram
            elif not screened:  # screened: the SPA port comes on the screen's own sockets, not the capture's
                spa = SpaPort(self.spa_port, PACKET_SIZE, VERSION)
        if self._sync_kernel(knocked):
            steps = set()  # the kernel matcher sees them on its own sockets: none for the capture
        expr = capture_expression(dests, steps, ranges, spa=spa)
        if expr != self.filter_expression:
            try:
                insns = compile_filter(expr) if expr is not None else DROP_ALL
            except FilterError as exc:
                coarse = capture_expression(dests, steps, ranges, coarse=2, spa=spa)
                log.warning("capture filter too large (%s); passing port ranges instead", exc)
                expr, insns = coarse, compile_filter(coarse) if coarse is not None else DROP_ALL
            self._compiled, self._compiled_spa = insns, spa is not None and expr is not None
            self.filter_expression = expr
            log.debug("capture filter: %s", expr)
        if self._compiled_spa:
            assert self.spa is not None and self.spa_port is not None
            program = self.spa_filter.build(self._compiled, self.spa_port, self.spa.verifier, self.replay, time.time())
        else:
            self.spa_filter.clear()  # nothing left for refresh_nonces to put back
            program = self._compiled
        self._install(program)
        if self._kernel_stop_due and self._installed == program:
            self._stop_kernel()
        if self._screen_stop_due and self._installed == program:
            self._stop_screen()

    def _sync_screen(self, spa_port_knocked: bool) -> bool:
        """Start, update or stop the SPA port's eBPF screen; True while it screens the SPA port."""
        mode = self.settings.spa_screen
        port = self.spa_port
        if self.spa is None or port is None:
            why: str | None = "no SPA door"
        elif spa_port_knocked:
            why = "a door knocks on the SPA port, so every datagram to it goes to user space"
        elif mode == "classic":
            why = "--spa-screen classic"
        else:
            why = None
        old = None
        if why is None and (self.screen is None or self.screen.port != port):
            try:
                new = SpaScreen(port)  # type: ignore[arg-type]
                new.refuse(self.replay.latest(NONCES, NONCE_SIZE))
            except ebpf.BpfError as exc:
                why = f"eBPF unavailable: {exc}"
            else:
                old, self.screen, self._screen_capture, self._screen_hints = self.screen, new, None, None
        if why is None:
            assert self.screen is not None and self.spa is not None and self.capture is not None
            try:
                now = time.time()
                source = (self.spa.verifier, self.spa.verifier.index(now))
                if source != self._screen_hints:  # a new epoch or a reload, not every rebuild (rotating windows)
                    self.screen.set_hints(self.spa.verifier.hint_keys(now))
                    self._screen_hints = source
                if self._screen_capture is not self.capture:
                    self.capture.set_screen(self.screen.program)
                    self._screen_capture = self.capture
                    self._sync_sockets()
            except ebpf.BpfError as exc:
                why = f"the kernel refused the SPA screen: {exc}"
        if old is not None:  # replaced (a new port) on the sockets: its counts carry over
            self._screen_retired.update(old.counts())
            old.close()
        self._screen_stop_due = why is not None and self.screen is not None
        if why != self._screen_why:
            if why is None:
                events.info("SPA port %d, kernel filter: eBPF screen (a datagram reaches user space only with a "
                            "valid AEAD tag under a key hint of %d key(s))", port, len(self.spa.verifier))  # type: ignore[union-attr]
            elif why == "no SPA door":
                pass
            elif mode == "ebpf":
                log.error("the SPA port cannot be screened with eBPF (%s); using the classic filter", why)
            else:
                log.info("SPA port: classic kernel filter: %s", why)
        self._screen_why = why
        return why is None

    def _stop_screen(self) -> None:
        """The screen's sockets and maps go (the capture filter has the SPA port back)."""
        self._screen_stop_due = False
        if self.screen is None:
            return
        if self.capture is not None:
            self.capture.set_screen(None)
            self._sync_sockets()
        self._screen_retired.update(self.screen.counts())
        self.screen.close()
        self.screen, self._screen_capture, self._screen_hints = None, None, None

    def _sync_kernel(self, spa_port_knocked: bool) -> bool:
        """Start, update or stop the kernel knock matcher for the doors now; True while it matches them."""
        mode = self.settings.knock_matcher
        if mode == "user":
            why: str | None = "--knock-matcher user"
        elif mode == "auto" and log.isEnabledFor(logging.DEBUG):
            why = "debug logging prints every knock packet, which user space must then see"
        else:
            why = unsuitable(self.matcher.doors, source_bound=bool(self.bound), spa_port_knocked=spa_port_knocked,
                             rotating=bool(self.runtime.rotating))
        if why is None and self.kernel is None:
            try:
                self.kernel = KernelMatcher(self.settings.max_attempts)
            except ebpf.BpfError as exc:
                why = f"eBPF unavailable: {exc}"
        if why is None:
            assert self.kernel is not None and self.capture is not None
            try:
                self.kernel.set_local(self.matcher.local_addresses or ())
                if (self.kernel.set_doors(self.matcher.doors, rotating=bool(self.runtime.rotating))
                        or self._tapped is not self.capture):
                    self.capture.set_tap(self.kernel.program)
                    self._tapped = self.capture
            except ebpf.BpfError as exc:
                why = f"the kernel refused the matcher: {exc}"
        # Stopped only once the capture filter has the knock ports back (``_stop_kernel``): no knock unseen.
        self._kernel_stop_due = why is not None and self.kernel is not None
        if why != self._kernel_why:
            if why is None:
                events.info("knock matching in the kernel (eBPF socket filter)")
                self._register_kernel()
            elif mode == "kernel":
                # Asked for by name: say so loudly, and match in user space rather than not at all.
                log.error("knock matching cannot run in the kernel (%s); matching in user space", why)
            else:
                log.info("knock matching in user space: %s", why)
        self._kernel_why = why
        return why is None

    def _stop_kernel(self) -> None:
        """The kernel matcher's last events, then its taps and maps go (the Python matcher has the knocks now)."""
        self._kernel_stop_due = False
        if self.kernel is None:
            return
        self._kernel_events()
        self._unregister_kernel()
        if self.capture is not None:
            self.capture.set_tap(None)
        self._kernel_retired.update(self.kernel.counts())
        self.kernel.close()
        self.kernel, self._tapped, self._kernel_lost_logged = None, None, 0

    def _unregister_kernel(self) -> None:
        for fd in self._kernel_fds:
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._kernel_fds, self._notes_rearm = [], None

    def _register_kernel(self) -> None:
        self._unregister_kernel()
        self._kernel_fds = self.kernel.filenos() if self.kernel is not None else []
        for fd in self._kernel_fds:
            self.selector.register(fd, selectors.EVENT_READ, "kernel")

    def _rest_notes(self) -> None:
        """Stop waking for notes for ``NOTES_INTERVAL``: under a flood the kernel would wake us for each one.

        (A ring buffer wakes its reader for the first record after the reader
        caught up; a reader that catches up at every wake-up is woken for
        every record.) Opens still wake the loop at once, and bring the notes.
        """
        if self.kernel is None or self._notes_rearm is not None:
            return
        try:
            self.selector.unregister(self.kernel.notes.fileno())
        except (KeyError, ValueError):
            return
        self._notes_rearm = time.monotonic() + NOTES_INTERVAL

    def _rearm_notes(self) -> None:
        self._notes_rearm = None
        if self.kernel is not None:
            self.selector.register(self.kernel.notes.fileno(), selectors.EVENT_READ, "kernel")

    def _kernel_events(self) -> None:
        """What the kernel matcher saw: act on opens, log the rest (throttled), as ``_read`` does for packets."""
        assert self.kernel is not None
        found = self.kernel.read()
        self._rest_notes()
        if not found:
            return
        quiet = None
        for ts, e in found:
            if e[0] == "open" and not self._opened(e, ts):
                quiet = (e,) if quiet is None else (*quiet, e)
        # Counted from the kernel's own counters (some notes are skipped unread under a flood).
        self._log_events([e for _, e in found], found[-1][0], quiet, count=False)

    def refresh_nonces(self) -> None:
        """Put the replay cache's nonces in the kernel's filter (soon after an acceptance, and at each tick)."""
        self._nonces_due = None
        if self.spa_filter.nonces_stale(self.replay):
            self._install(self.spa_filter.with_nonces(self.replay))

    def _install(self, program: list) -> None:
        if program == self._installed:
            return
        try:
            assert self.capture is not None
            self.capture.set_filter(program)
        except FilterError as exc:
            log.error("cannot install the capture filter (%s); keeping the previous one", exc)
            self.filter_expression = None  # try again at the next rebuild
            return
        self._installed = program

    def _sync_sockets(self) -> None:
        assert self.capture is not None
        now = {s: "packet" for s in self.capture.sockets()}
        now.update((s, "spa") for s in self.capture.screens())
        for s in self._registered.keys() - now.keys():
            try:
                self.selector.unregister(s)
            except (KeyError, ValueError):
                pass
        for s in now.keys() - self._registered.keys():
            self.selector.register(s, selectors.EVENT_READ, now[s])
        self._registered = now

    # -- signals -------------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM or SIGINT."""
        sys.setswitchinterval(SWITCH_INTERVAL)
        next_tick = time.monotonic() + TICK
        while True:
            timeout = max(0.0, next_tick - time.monotonic())
            if self._next_rotation != float("inf"):
                # Wake exactly at a window boundary: the new sequences and filter go in together.
                timeout = min(timeout, max(0.0, self._next_rotation - time.time()))
            if self._nonces_due is not None:
                timeout = min(timeout, max(0.0, self._nonces_due - time.monotonic()))
            if self._notes_rearm is not None:
                timeout = min(timeout, max(0.0, self._notes_rearm - time.monotonic()))
            for key, _mask in self.selector.select(timeout):
                kind = key.data
                if kind == "packet":
                    self._read(key.fileobj)  # type: ignore[arg-type]
                elif kind == "spa":
                    self._read_screen(key.fileobj)  # type: ignore[arg-type]
                elif kind == "kernel":
                    if self.kernel is not None:
                        self._kernel_events()
                elif kind == "netlink":
                    assert self.monitor is not None and self.capture is not None
                    if self.monitor.drain():
                        self.capture.refresh()
                        self._sync_sockets()
                        self.refresh_addresses()
                elif kind == "signal":
                    try:
                        while self._wake_r.recv(64):
                            pass
                    except BlockingIOError:
                        pass
            while self._signals:
                sig = self._signals.pop(0)
                if sig == signal.SIGHUP:
                    self.reload()
                else:
                    events.info("shutting down")
                    return
            if time.time() >= self._next_rotation:
                self.rotate_sequences()
            if self._nonces_due is not None and time.monotonic() >= self._nonces_due:
                self.refresh_nonces()
            if self._notes_rearm is not None and time.monotonic() >= self._notes_rearm:
                self._rearm_notes()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK
                self._tick()

    def _tick(self) -> None:
        self.notifier.watchdog()
        dropped = self._throttle.take_suppressed()
        if self.kernel is not None:
            dropped += self.kernel.take_skipped()
            lost = self.kernel.counts()["lost_opens"] - self._kernel_lost_logged
            if lost > 0:
                self._kernel_lost_logged += lost
                log.error("%d knock open(s) lost: the kernel matcher's ring buffer was full", lost)
        if dropped:
            log.warning("%d knock log lines suppressed in the last second (a flood on the knock ports?)", dropped)
        repeats = self.stats["opens_repeated"] - self._repeats_logged
        if repeats:
            self._repeats_logged = self.stats["opens_repeated"]
            log.warning("%d repeated open(s) not acted on: a door completed again by the same source soon after"
                        " it opened (a spoofed flood on a knock sequence?)", repeats)
        if time.monotonic() >= self._next_metrics:
            self._next_metrics = time.monotonic() + METRICS_INTERVAL
            self.publish()
        self._log_events(self.matcher.expire(time.monotonic()), time.monotonic())
        if self.kernel is not None:
            try:
                expired = self.kernel.expire()
            except ebpf.BpfError as exc:  # never the loop's end: the next tick tries again
                log.warning("sweep of the kernel matcher's attempts failed: %s", exc)
                expired = []
            if expired:
                self._log_events([e for _, e in expired], time.monotonic())
        self._log_events(self.bound.expire(time.monotonic()), time.monotonic())
        if self.spa is not None:
            self.replay.prune(time.time())
            counts, self.spa.aead_by_hint = self.spa.aead_by_hint, collections.Counter()
            drops = self.capture.kernel_stats()["drops"] if self.capture is not None else 0
            if self.screen is not None and self._screen_hints != (self.spa.verifier,
                                                                    self.spa.verifier.index(time.time())):
                self.rebuild_filter()  # the hint index moved an epoch: the screen's hint map follows
            elif self.spa_filter.watch_floods(counts, drops, time.time(), self.spa.verifier) or (
                    self._compiled_spa and self.spa_filter.hints_moved(self.spa.verifier, time.time())):
                # A hint flooded or back, or the hints moved on an epoch: a new postlude, no recompiling.
                self.rebuild_filter()
            else:
                self.refresh_nonces()  # nonces the cache has just forgotten leave the kernel's list
            if time.monotonic() >= self._next_junk_summary:
                self._next_junk_summary = time.monotonic() + JUNK_SUMMARY_INTERVAL
                line = self.spa.summary()
                if line:
                    log.warning("%s", line)
                line = self._screen_summary()
                if line:
                    log.warning("%s", line)
        assert self.capture is not None
        if self.capture.refresh():
            self._sync_sockets()

    def _read(self, sock: socket.socket) -> None:
        assert self.capture is not None
        ts, packets = self.capture.read(sock)
        if not packets:
            if sock not in self.capture.sockets():
                self._sync_sockets()
            return
        # The hot path: numbers only (spa.packet.fields, Matcher.feed_fields); an
        # address object is built when a line is logged or a grant made.
        debug = log.isEnabledFor(logging.DEBUG)
        spa_port = self.spa_port
        bound = self.bound if self.bound else None
        feed = self.matcher.feed_fields
        malformed = 0
        for data in packets:
            f = fields(data)
            if f is None:
                malformed += 1
                continue
            proto, skey, dkey, sport, dport, flags, seq = f
            if dport == spa_port and proto == UDP:
                self._spa_packet(data, address(skey))
            if debug:
                _debug_packet(proto, skey, sport, dkey, dport, len(data))
            found = feed(proto, skey, dkey, sport, dport, flags, seq, ts)
            if bound:
                found += bound.feed(Knock(address(skey), address(dkey), "tcp" if proto == TCP else "udp", sport,
                                          dport, flags, seq, ts), time.time())
            if found:
                # Grants first, log lines after: the firewall should not wait for a log write.
                quiet = None
                for e in found:
                    if e[0] == "open" and not self._opened(e, ts):
                        quiet = (e,) if quiet is None else (*quiet, e)
                self._log_events(found, ts, quiet)
        self.stats["knocks"] += len(packets) - malformed
        if malformed:
            self.stats["malformed"] += malformed

    def _read_screen(self, sock: socket.socket) -> None:
        """Datagrams the SPA screen passed (each with a valid AEAD tag): the verifier checks them in full."""
        assert self.capture is not None
        for data in self.capture.read_screen(sock):
            f = fields(data)
            if f is None:  # cannot be: the screen parsed it; counted rather than trusted
                self.stats["malformed"] += 1
                continue
            self.stats["knocks"] += 1  # parsed packets that passed a kernel filter, as ``_read`` counts them
            proto, skey, dkey, sport, dport, _flags, _seq = f
            if log.isEnabledFor(logging.DEBUG):
                _debug_packet(proto, skey, sport, dkey, dport, len(data))
            self._spa_packet(data, address(skey))

    def _screen_counts(self) -> collections.Counter[str]:
        counts = collections.Counter(self._screen_retired)
        if self.screen is not None:
            try:
                counts.update(self.screen.counts())
            except ebpf.BpfError as exc:
                log.warning("cannot read the SPA screen's counters: %s", exc)
        return counts

    def _screen_summary(self) -> str | None:
        """One line for what the SPA screen dropped since the last one (never per packet)."""
        if self.screen is None and not self._screen_retired:
            return None
        c = self._screen_counts()
        dropped = sum(c[k] for k in ("size", "version", "unknown", "replay", "forged"))
        fresh, self._screen_reported = dropped - self._screen_reported, dropped
        if fresh <= 0:
            return None
        return (f"{fresh} SPA-port datagrams dropped in the kernel (totals: {c['forged']} forged under a known key "
                f"hint, {c['unknown']} unknown key hint, {c['replay']} replayed, {c['size']} wrong size, "
                f"{c['version']} wrong version)")

    def _spa_packet(self, data: bytes, source: Address) -> None:
        assert self.spa is not None
        payload = udp_payload(data)
        if payload is None:
            self.stats["malformed"] += 1
            return
        acc = self.spa.handle(payload, source)
        if acc is None:
            return
        door = self.runtime.doors.get(acc.door)
        via = f"SPA key {acc.key_id}" + (f" ({acc.comment})" if acc.comment else "")
        grant = door_grant(door, acc.address, acc.duration, via) if door is not None else None
        if grant is not None:
            # Opened right here when the worker is idle: handing it over costs more than the opening.
            self.manager.submit(grant, (acc.nonce, acc.remember_until), prompt=True)
        else:  # a door that only logs: the nonce is still kept, off the loop
            self._io.submit(self.manager.journal.remember, [(acc.nonce, acc.remember_until)])
        if self.screen is not None:
            try:
                self.screen.refuse((acc.nonce,))  # its copies stop in the kernel from now on
            except ebpf.BpfError as exc:  # the replay cache still refuses them
                log.warning("cannot add a nonce to the SPA screen: %s", exc)
        elif self._nonces_due is None and self.spa_filter.active:
            # Copies of this packet will stop in the kernel: soon, not now, when the grant has
            # had the GIL to itself (building and attaching a filter is milliseconds of Python).
            self._nonces_due = time.monotonic() + NONCE_FILTER_DELAY
        self.stats["opens"] += 1
        events.info("%s: %s: OPEN SESAME (SPA key %s%s) for %s, %.0f s", self.names(source), acc.door, acc.key_id,
                    f" {acc.comment}" if acc.comment else "", acc.address, acc.duration)

    def rotate_sequences(self) -> None:
        """A window boundary: swap in the sequences now in force, and the filter for exactly their ports."""
        now = time.time()
        self.matcher.set_doors(self.runtime.match_doors(now))
        self.bound.rotate(now)
        self.rebuild_filter()
        self._next_rotation = rotating_match.boundaries(self.runtime.rotating, now)
        log.debug("rotating sequences swapped; next change in %.3f s", self._next_rotation - now)

    @staticmethod
    def _door_label(name: str) -> str:
        c = rotating_match.parse_name(name)
        return name if c is None else c.door

    def _log_events(self, found: list[MatchEvent], now: float, quiet: tuple[MatchEvent, ...] | None = None,
                    count: bool = True) -> None:
        """Count the events and write their knockd-style lines (rate-limited; one call per packet, not per event).

        ``quiet``: opens that were not acted on (repeats), counted but not logged.
        """
        counts = self.event_counts
        throttle = self._throttle
        debug = None
        for e in found:
            kind = e[0]
            if count:
                counts[kind] += 1
            if kind == "open":
                # OPEN SESAME is never throttled: log watchers (fail2ban and the like) act on it.
                if quiet is not None and e in quiet:
                    continue
            elif kind == "reset":
                if debug is None:
                    debug = log.isEnabledFor(logging.DEBUG)
                if not debug or not throttle.allow(now):
                    continue
            elif now < throttle.next_ok:  # what allow() would say, without the call (a flood's common case)
                throttle.suppressed += 1
                continue
            elif not throttle.allow(now):
                continue
            who = self.names(e.source)
            door = self._door_label(e.door)
            if kind == "stage":
                events.info("%s: %s: Stage %d", who, door, e.stage)
            elif kind == "open":
                if door == e.door:  # a rotating open is logged once it is known not to be a second use
                    events.info("%s: %s: OPEN SESAME", who, door)
            elif kind == "timeout":
                events.info("%s: %s: sequence timeout (stage %d)", who, door, e.stage)
            else:
                log.debug("%s: %s: sequence reset at stage %d", who, door, e.stage)

    def _opened(self, e: MatchEvent, now: float) -> bool:
        """Act on a completed door; False when it was a repeat held off (``repeat_holdoff``), True otherwise."""
        candidate = rotating_match.parse_name(e.door)
        if candidate is not None:
            self._rotating_opened(candidate, e)
            return True
        door = self.runtime.doors.get(e.door)
        if door is None:
            return True
        holdoff = repeat_holdoff(door)
        extension = False
        if holdoff:
            key = (e.door, e.key)
            age = now - self._last_open.get(key, float("-inf"))
            if 0.0 <= age < holdoff:
                self.stats["opens_repeated"] += 1
                return False
            # The grant from the last open is still far from its end: this one may wait for a batch.
            extension = 0.0 <= age < door.cmd_timeout - 2 * DEFER_DELAY
            if len(self._last_open) >= 65536:
                horizon = max(d.cmd_timeout for d in self.runtime.doors.values())
                self._last_open = {k: t for k, t in self._last_open.items() if 0.0 <= now - t < horizon}
                if len(self._last_open) >= 65536:
                    self._last_open = {}  # that many sources at once: forgetting costs each a grant, no more
            self._last_open[key] = now
        self.stats["opens"] += 1
        grant = door_grant(door, e.source)
        onetime = self.runtime.onetime.get(door.name)
        if onetime is not None:
            # The used sequence stops matching now; the file is rewritten off
            # the capture loop, and the grant goes out once that is on disk.
            line_no, nxt = onetime.take()
            doors = [d for d in self.matcher.doors if d.name != door.name]
            if nxt is not None:
                doors.append(MatchDoor.of(door, nxt))
            self.matcher.set_doors(doors)
            self.rebuild_filter()
            self._io.submit(self._mark_used, door, onetime, line_no, nxt, grant)
            return True
        if grant is not None:
            self.manager.submit(grant, defer=extension, prompt=True)
        return True

    def _rotating_opened(self, c: rotating_match.Candidate, e: MatchEvent) -> None:
        door = self.runtime.doors.get(c.door)
        rdoor = next((r for r in self.runtime.rotating if r.name == c.door), None)
        if door is None or rdoor is None:
            return
        token = rotating_match.used_token(c)
        who = self.names(e.source)
        if token in self.replay:
            self.stats["rotating_reused"] += 1
            log.warning("%s: %s: rotating sequence (key %s, window %d) was already used: refused", who, c.door,
                        c.key_id, c.counter)
            return
        interval = max(r.params.interval for r in rdoor.rings)
        until = rotating_match.used_until(c, interval)
        self.replay.add(token, until)  # burned now: a copy completing a moment later is refused
        grant = door_grant(door, e.source, via=f"rotating key {c.key_id}, window {c.counter}")
        if grant is not None:
            # Burned in memory already; on disk with the grant, right after the firewall opens.
            self.manager.submit(grant, (token, until), nonce_first=False, prompt=True)
        else:
            self._io.submit(self.manager.journal.remember, [(token, until)])
        self.stats["opens"] += 1
        events.info("%s: %s: OPEN SESAME (rotating key %s, window %d)", who, c.door, c.key_id, c.counter)

    def _mark_used(self, door: Door, onetime: OneTimeSequences, line_no: int, nxt, grant: Grant | None) -> None:
        try:
            onetime.mark_used(line_no)
        except OSError as exc:
            log.error("door %s: cannot mark the used one-time sequence in %s: %s", door.name, onetime.path, exc)
        if nxt is None:
            events.info("no more sequences left in the one time sequences file for door %s --> disabling the door", door.name)
        else:
            events.info("new sequence for door %s: %s", door.name, ",".join(f"{s.port}:{s.proto}" for s in nxt))
        if grant is not None:
            self.manager.submit(grant)

    # -- reload and stop ----------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: parse and check the whole file, then swap it in; on any error keep running the old one."""
        path = self.settings.config
        events.info("re-reading config file: %s", path)
        self.notifier.reloading()
        try:
            return self._reload(path)
        finally:
            self.notifier.ready(self.status_line())

    def _reload(self, path: str) -> bool:
        try:
            new = Runtime.load(path)
            if new.needs_native and self.manager.native is None:
                from spa.server.firewall import create_backend

                native = create_backend(self.settings.backend or new.config.options.backend or "auto")
                native.setup()
                self.manager.native = native
        except (ConfigError, SpaError) as exc:
            log.error("new configuration rejected, the old one keeps running:\n%s", exc)
            self.stats["reload_failures"] += 1
            return False
        for w in new.warnings:
            log.warning("%s", w)
        before = self.interfaces
        self.runtime = new
        self._last_open.clear()  # a door may open other ports now: a knock right after the reload acts
        if self.interfaces != before:
            self._recapture(before)
        self._next_rotation = rotating_match.boundaries(new.rotating, time.time())
        if new.verifier is None:
            self.spa = None
        else:
            new.verifier.not_before = self.spa_not_before
            if self.spa is None:
                self.spa = SpaReceiver(new.verifier, self.replay)
            else:
                self.spa.verifier = new.verifier  # the replay cache and counters carry over
        self.matcher.set_doors(new.match_doors())
        self.bound = SourceBound(new.rotating, local_addresses=self.matcher.local_addresses)
        self.refresh_addresses()
        self.stats["reloads"] += 1
        return True

    def _recapture(self, before: tuple[str, ...]) -> None:
        """The config's ``Interface`` changed (and no ``-i`` overrides it): capture on the new list.

        The new sockets open with the drop-all filter, and the reload installs
        the real one in the same loop turn (``refresh_addresses``).
        """
        old = self.capture
        try:
            self.capture = Capture(self.interfaces, ipv6=not self.settings.only_ipv4)
        except (OSError, ValueError, FilterError) as exc:
            log.error("cannot capture on %s (%s); still on %s", ",".join(self.interfaces), exc, ",".join(before))
            self.capture = old
            return
        self.filter_expression = None  # rebuilt for the new interfaces' addresses just after
        if old is not None:
            old.close()
        self._sync_sockets()
        events.info("now listening on %s (was %s)", ",".join(self.interfaces), ",".join(before))

    # -- metrics and status -------------------------------------------------------------

    def metrics(self, active: int) -> list[Metric]:
        """Everything ``spa status`` and Prometheus read, as of now; ``active`` is the count of open grants."""
        kernel = self.capture.kernel_stats() if self.capture is not None else {"packets": 0, "drops": 0}
        c = self.manager.counters
        # The kernel matcher's counters: knock packets it matched and every event (it logs only some).
        matched = collections.Counter(self._kernel_retired)
        if self.kernel is not None:
            matched.update(self.kernel.counts())
        knock_events = {k: v + matched[k] for k, v in self.event_counts.items()}
        up = self.capture.status() if self.capture is not None else {}
        return [
            Metric("spa_packets_total", "counter", "Packets that passed the kernel filter, by result.",
                   {(("result", "parsed"),): self.stats["knocks"] + matched["packets"],
                    (("result", "malformed"),): self.stats["malformed"]}),
            Metric("spa_kernel_drops_total", "counter", "Packets the kernel dropped for lack of buffer room.",
                   {(): kernel["drops"]}),
            Metric("spa_knock_events_total", "counter", "Matcher events: stages, opens, timeouts, resets.",
                   {(("kind", k),): v for k, v in knock_events.items()}),
            Metric("spa_attempts", "gauge", "Knock attempts in progress (the kernel matcher's: at its last sweep).",
                   {(): len(self.matcher) + (self.kernel.attempts_seen if self.kernel is not None else 0)}),
            Metric("spa_attempt_evictions_total", "counter", "Attempts evicted by the cap (spoofed floods).",
                   {(): self.matcher.evictions}),
            Metric("spa_grants_active", "gauge", "Grants open now.", {(): active}),
            Metric("spa_grants_total", "counter", "Grants opened or extended.", {(): c["grants_total"]}),
            Metric("spa_grants_prompt_total", "counter",
                   "Of those, grants the capture loop opened itself (nftables through netlink, worker idle).",
                   {(): c["grants_prompt"]}),
            Metric("spa_repeated_opens_total", "counter",
                   "Doors completed again by the same source soon after opening: counted, not acted on.",
                   {(): self.stats["opens_repeated"]}),
            Metric("spa_firewall_operations_total", "counter", "Firewall operations.", {(): c["firewall_ops"]}),
            Metric("spa_firewall_failures_total", "counter", "Firewall operations that failed.",
                   {(): c["firewall_failures"]}),
            Metric("spa_firewall_repairs_total", "counter", "Times the firewall was rebuilt after a flush.",
                   {(): c["repairs"]}),
            Metric("spa_reloads_total", "counter", "Configuration reloads, by result.",
                   {(("result", "ok"),): self.stats["reloads"], (("result", "rejected"),): self.stats["reload_failures"]}),
            Metric("spa_interface_up", "gauge", "1 when capturing on the interface.",
                   {(("interface", name),): int(state == "open") for name, state in up.items()}),
            Metric("spa_start_time_seconds", "gauge", "Unix time the daemon started.", {(): self.started}),
            Metric("spa_spa_packets_total", "counter", "Datagrams on the SPA port, by result.",
                   {(("result", "accepted"),): self.spa.accepted if self.spa else 0,
                    **{(("result", r),): n for r, n in (self.spa.rejected.items() if self.spa else ())}}),
            Metric("spa_replay_cache_entries", "gauge", "Nonces remembered against replay.", {(): len(self.replay)}),
            Metric("spa_key_hints_quarantined", "gauge", "Key hints dropped in the kernel under a flood of forgeries.",
                   {(): len(self.spa_filter.quarantine)}),
            Metric("spa_screen_datagrams_total", "counter",
                   "Datagrams to the SPA port the eBPF screen looked at, by result (passed: to the verifier).",
                   {(("result", k),): v for k, v in self._screen_counts().items() if k != "datagrams"}),
        ]

    def publish(self) -> None:
        """Write the metrics textfile and status.json (atomically, off the capture loop)."""
        if not self.settings.metrics_file and not self.settings.status_file:
            return
        # Only loop-owned state is read here; the journal count (which may wait
        # for the grant worker's fsync) and the file writes happen on the worker.
        loop_metrics = self.metrics(active=0)  # the real count is filled in off the loop
        status = {
            "pid": os.getpid(),
            "started": self.started,
            "written": time.time(),
            "config": self.settings.config,
            "interfaces": self.capture.status() if self.capture is not None else {},
            "doors": [d.name for d in self.matcher.doors],
            "backend": self.manager.native.name if self.manager.native is not None else None,
            "filter": self.filter_expression,
            "knock_matcher": "kernel" if self.kernel is not None else "user",
            "spa_screen": None if self.spa is None else ("ebpf" if self.screen is not None else "classic"),
        }
        self._io.submit(self._publish_off_loop, loop_metrics, status)

    def _publish_off_loop(self, loop_metrics: list[Metric], status: dict) -> None:
        active = len(self.manager.active())
        metrics = [Metric(m.name, m.kind, m.help, {(): active}) if m.name == "spa_grants_active" else m
                   for m in loop_metrics]
        self._write_files(render(metrics), json.dumps(status, indent=1))

    def _write_files(self, metrics_text: str, status_text: str) -> None:
        for path, text in ((self.settings.metrics_file, metrics_text), (self.settings.status_file, status_text)):
            if not path:
                continue
            tmp = f"{path}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        if self.kernel is not None:
            self.kernel.close()
        if self.screen is not None:
            self.screen.close()
        if self.monitor is not None:
            self.monitor.close()
        self._io.shutdown(wait=True)
        signal.set_wakeup_fd(-1)
        self.selector.close()
