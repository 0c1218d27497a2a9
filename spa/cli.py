"""``spa``: the administrator's command.

``spa grants`` lists what the firewall holds and ``spa grants --revoke``
closes early; ``spa grant`` opens by hand; ``spa demo`` shows the product
working in two throw-away network namespaces.
"""

from __future__ import annotations

import logging
import time

import click

from spa import __version__
from spa.cli_errors import handle_errors
from spa.grant import Grant, parse_address

DEFAULT_STATE_DIR = "/var/lib/spa"

backend_option = click.option(
    "--backend",
    default="auto",
    show_default=True,
    help="Firewall backend: auto, nft or iptables.",
)
state_dir_option = click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the grant journal lives (the daemon's StateDir).",
)


def _manager(backend: str, state_dir: str):
    # Imported here: the admin CLI reaches into the server only for these commands.
    from spa.server.firewall import create_backend
    from spa.server.firewall.command import CommandBackend
    from spa.server.grants import GrantManager
    from spa.server.journal import Journal

    native = create_backend(backend)
    return GrantManager(Journal(state_dir), native, CommandBackend())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-v", "--verbose", is_flag=True, help="Log what is done.")
def main(verbose: bool) -> None:
    """Administer the spa gatekeeper."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def _format_left(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 100 else time.strftime("%H:%M:%S", time.gmtime(seconds))


@main.command()
@backend_option
@state_dir_option
@click.option("--revoke", "revoke", metavar="ADDRESS", help="Close every grant of this address now.")
@handle_errors
def grants(backend: str, state_dir: str, revoke: str | None) -> None:
    """List active grants (door, address, ports, seconds left) as the firewall holds them."""
    mgr = _manager(backend, state_dir)
    if revoke is not None:
        address = parse_address(revoke)
        closed = mgr.revoke_address(address)
        if not closed:
            click.echo(f"no grant open for {address}")
        for g in closed:
            click.echo(f"closed door {g.door} for {g.address}")
        return
    now = time.time()
    rows = []
    held = mgr.native.list() if mgr.native is not None else []
    seen = {(g.door, g.address) for g in held}
    for g in held:
        if g.deadline <= now:
            continue  # an iptables rule past its datestop matches nothing; it is removed at the next sweep
        rows.append((g.door, str(g.address), ",".join(map(str, g.ports)), g.seconds_left(now), mgr.native.name))
    # Command doors leave no trace we can read back; show the journal's word for them.
    for g in mgr.active():
        if g.commands is not None and (g.door, g.address) not in seen:
            rows.append((g.door, str(g.address), "commands", g.seconds_left(now), "command"))
    if not rows:
        click.echo("no active grants")
        return
    click.echo(f"{'DOOR':<20} {'ADDRESS':<40} {'PORTS':<20} {'LEFT':>8}  BACKEND")
    for door, addr, ports, left, name in sorted(rows):
        click.echo(f"{door:<20} {addr:<40} {ports:<20} {_format_left(left):>8}  {name}")


@main.command("grant")
@backend_option
@state_dir_option
@click.option("--door", default="manual", show_default=True, help="Door name recorded with the grant.")
@click.option("--address", required=True, help="Client address (IPv4 or IPv6).")
@click.option("--port", "ports", required=True, multiple=True, metavar="PORT[/PROTO]", help="Port to open (repeatable).")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds until it closes.")
@handle_errors
def grant_cmd(backend: str, state_dir: str, door: str, address: str, ports: tuple[str, ...], duration: float) -> None:
    """Open PORTS for ADDRESS by hand. The kernel closes it at the deadline (nft, iptables)."""
    g = Grant.create(door, address, " ".join(ports), duration, via="by hand, spa grant")
    mgr = _manager(backend, state_dir)
    for b in (mgr.native,):
        b.setup()
    held = mgr.grant(g)
    click.echo(f"opened door {held.door} for {held.address}: {','.join(map(str, held.ports))} for {duration:g}s")


@main.command()
@state_dir_option
@handle_errors
def status(state_dir: str) -> None:
    """Show the running daemon: uptime, interfaces, doors, backend, counters and open grants."""
    import json
    import os

    from spa.metrics import parse
    from spa.server.journal import Journal

    path = os.path.join(state_dir, "status.json")
    try:
        with open(path, encoding="utf-8") as f:
            st = json.load(f)
    except FileNotFoundError:
        click.echo(f"spa-server is not running (no {path})")
        raise SystemExit(3)
    try:
        os.kill(int(st["pid"]), 0)
        running = True
    except ProcessLookupError:
        running = False
    now = time.time()
    if not running:
        click.echo(f"spa-server is not running (pid {st['pid']} is gone; status written {now - st['written']:.0f} s ago)")
        raise SystemExit(3)
    up = now - st["started"]
    click.echo(f"spa-server running, pid {st['pid']}, up {int(up // 3600)}h{int(up % 3600 // 60):02d}m{int(up % 60):02d}s")
    click.echo(f"  config:     {st['config']}")
    click.echo(f"  backend:    {st['backend'] or 'commands only'}")
    click.echo("  interfaces: " + ", ".join(f"{k} ({v})" for k, v in st["interfaces"].items()))
    click.echo(f"  doors:      {', '.join(st['doors']) or '(none)'}")
    metrics_path = os.path.join(state_dir, "metrics.prom")
    try:
        with open(metrics_path, encoding="utf-8") as f:
            m = parse(f.read())
    except FileNotFoundError:
        m = {}
    if m:
        def get(name: str, label: str = "") -> int:
            return int(m.get(f"{name}{{{label}}}" if label else name, 0))

        parsed, malformed = get("spa_packets_total", 'result="parsed"'), get("spa_packets_total", 'result="malformed"')
        opens, timeouts = get("spa_knock_events_total", 'kind="open"'), get("spa_knock_events_total", 'kind="timeout"')
        click.echo(f"  packets:    {parsed} parsed, {malformed} malformed, "
                   f"{get('spa_kernel_drops_total')} dropped by the kernel")
        where = st.get("knock_matcher")
        click.echo(f"  knocks:     {opens} opens, {timeouts} timeouts, {get('spa_attempts')} attempts in progress"
                   + (f"; matched in {'the kernel' if where == 'kernel' else 'user space'}" if where else ""))
        click.echo(f"  firewall:   {get('spa_grants_total')} grants, {get('spa_firewall_operations_total')} operations, "
                   f"{get('spa_firewall_failures_total')} failures, {get('spa_firewall_repairs_total')} repairs")
        spa = {k.split('result="', 1)[1].rstrip('"}'): int(v) for k, v in m.items()
               if k.startswith("spa_spa_packets_total{")}
        if sum(spa.values()):
            rejected = ", ".join(f"{n} {r}" for r, n in sorted(spa.items()) if r != "accepted" and n)
            click.echo(f"  SPA:        {spa.get('accepted', 0)} accepted, rejected: {rejected or 'none'}; "
                       f"{get('spa_replay_cache_entries')} nonces remembered")
        screened = {k.split('result="', 1)[1].rstrip('"}'): int(v) for k, v in m.items()
                    if k.startswith("spa_screen_datagrams_total{")}
        if st.get("spa_screen") == "ebpf" or any(screened.values()):
            dropped = ", ".join(f"{screened[r]} {r}" for r in ("forged", "unknown", "replay", "size", "version")
                                if screened.get(r))
            click.echo(f"  SPA screen: {'eBPF, in the kernel' if st.get('spa_screen') == 'ebpf' else 'classic'};"
                       f" dropped there: {dropped or 'none'}; {screened.get('passed', 0)} passed to the checks")
    grants_now = [g for g in Journal(state_dir).all() if not g.closing]
    click.echo(f"  grants:     {len(grants_now)} open")
    for e in grants_now:
        g = e.grant
        ports = ",".join(map(str, g.ports)) or "commands"
        click.echo(f"    {g.door:<20} {str(g.address):<40} {ports:<20} {_format_left(g.seconds_left(now)):>8}")


def _line_of(message: str) -> int:
    parts = message.split(":", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


@main.command("check-config")
@click.argument("path", default="/etc/knockd.conf", required=False)
@handle_errors
def check_config(path: str) -> None:
    """Check a knockd.conf-style file: every error and warning with file and line.

    Exit status: 0 fine, 1 warnings only, 2 errors.
    """
    from spa.checks import check
    from spa.config import load_config
    from spa.errors import ConfigError
    from spa.server.listening import listening_ports

    from spa.checks import check_keys
    from spa.errors import KeyFileError
    from spa.server.rotating_keys import load_rotating
    from spa.server.spa_receiver import load_authorized, load_verifier

    try:
        config = load_config(path)
        # Key files too: a missing, unsafe or malformed one stops the server as surely as a bad line.
        authorized = load_authorized(config)
        load_verifier(config, authorized)
        rotating = load_rotating(config)
    except (ConfigError, KeyFileError) as exc:
        for e in getattr(exc, "errors", None) or [exc]:
            where = f"{e.path}:{e.line}" if e.line is not None else f"{e.path or path}"
            click.echo(f"{where}: error: {e.message}")
        raise SystemExit(2)
    # The parser's warnings read "path:line: message"; ours come as findings. One list, in line order.
    lines = [(_line_of(w), w.replace(": ", ": warning: ", 1)) for w in config.warnings]
    lines += [(f.line, str(f)) for f in check(config, listening_ports())]
    lines += [(f.line, str(f)) for f in check_keys(config, rotating, authorized)]
    warnings = [text for _, text in sorted(lines, key=lambda item: item[0])]
    for w in warnings:
        click.echo(w)
    doors = len(config.doors)
    click.echo(f"{path}: {doors} door{'s' if doors != 1 else ''}, {len(warnings)} warning{'s' if len(warnings) != 1 else ''}")
    raise SystemExit(1 if warnings else 0)


@main.command()
@click.option("--duration", type=float, default=2.0, show_default=True, help="cmd_timeout of the demo doors, in seconds.")
@handle_errors
def demo(duration: float) -> None:
    """Build two network namespaces and show a protected port going closed -> open -> closed (root)."""
    from spa.server.demo import run_demo

    raise SystemExit(run_demo(duration))


def _register() -> None:
    from spa.cli_keys import keygen, trust

    main.add_command(keygen)
    main.add_command(trust)
    try:
        from spa.cli_rotating import sequence
    except ImportError:  # pragma: no cover - during development only
        return
    main.add_command(sequence)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
