"""The README's first command: the product working, end to end, in two throw-away namespaces.

It builds a server and a client namespace, puts the seed article's
default-deny firewall (iptables INPUT policy DROP) in the server, starts
``spa-server`` there with the bundled configuration below and a service on
tcp/22, and shows that port going closed -> open -> closed from the client,
once for each way in: a classic knock (IPv4 and IPv6), the seed article's
own door with the real ``knock``, a signed SPA packet, and a rotating
sequence.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import click

from spa.server.netns import CLIENT2_V4, SERVER_V4, SERVER_V6, Lab, in_netns

#: The bundled configuration: knockd.conf syntax, one door per way in.
DEMO_CONFIG = """\
# spa demo: knockd.conf syntax, read as knockd reads it
[options]
    logfile   = {logfile}
    ServerKey = {tmp}/server.key

# A classic knock sequence; the firewall is opened natively (nftables), no shell.
[openSSH]
    sequence    = 7000,8000:udp,9000
    seq_timeout = 5
    tcpflags    = syn
    open        = 22/tcp
    cmd_timeout = {duration}

# The seed article's door, verbatim but for the timeout: knockd's own commands.
[opencloseSSH]
    sequence      = 2222:udp,3333:tcp,4444:udp
    seq_timeout   = 15
    tcpflags      = syn
    start_command = /usr/sbin/iptables -A INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT
    cmd_timeout   = {duration}
    stop_command  = /usr/sbin/iptables -D INPUT -s %IP% -p tcp --syn --dport 22 -j ACCEPT

# Signed single-packet authorization: the client's Ed25519 key is listed here.
[sshSPA]
    authorized_keys = {tmp}/authorized_keys
    open            = 22/tcp
    cmd_timeout     = {duration}

# A rotating sequence: derived from a shared key and the clock, each used once.
[sshRotating]
    rotating_key = {tmp}/rotating.key
    seq_timeout  = 5
    tcpflags     = syn
    open         = 22/tcp
    cmd_timeout  = {duration}
"""


def _make_keys(tmp: str) -> dict[str, str]:
    """What ``spa keygen --server``, ``spa keygen`` and ``spa keygen --shared`` would write."""
    from spa import rotating
    from spa.keys import ed25519, shared

    server = ed25519.generate(os.path.join(tmp, "server.key"), "server", "demo server")
    client = ed25519.generate(os.path.join(tmp, "client", "key"), "client", "demo client")
    with open(os.path.join(tmp, "authorized_keys"), "w") as f:
        f.write(open(client.path + ".pub").read())
    shared.write(os.path.join(tmp, "rotating.key"), shared.generate(rotating.Params()))
    return {"server_pub": server.path + ".pub", "client": client.path, "rotating": os.path.join(tmp, "rotating.key")}


class DemoFailed(Exception):
    pass


def _say(ok: bool | None, text: str) -> None:
    mark = {True: click.style("ok  ", fg="green"), False: click.style("FAIL", fg="red"), None: "    "}[ok]
    click.echo(f"  {mark} {text}")


def _expect(cond: bool, text: str) -> None:
    _say(cond, text)
    if not cond:
        raise DemoFailed(text)


def _state(is_open: bool) -> str:
    return click.style("open", fg="green") if is_open else click.style("filtered", fg="yellow")


def _door(lab: Lab, title: str, label: str, knock_argv: list[str], server: str, duration: float) -> None:
    click.echo(click.style(f"\n  {title}", bold=True))
    before = lab.probe(server)
    _expect(not before, f"client -> {server} tcp/22: {_state(before)}")
    proc = subprocess.run(["ip", "netns", "exec", lab.client, *knock_argv], capture_output=True, text=True, timeout=30)
    _expect(proc.returncode == 0, f"client: {label}")
    t0 = time.monotonic()
    opened = lab.wait_for(True, server, limit=2)
    _expect(opened is not None, f"client -> {server} tcp/22: {_state(opened is not None)} {opened * 1000 if opened else 0:.0f} ms after the client returned")
    if server == SERVER_V4:
        other = lab.probe(server, source=CLIENT2_V4)
        _expect(not other, f"from another address ({CLIENT2_V4}): {_state(other)}")
    closed = lab.wait_for(False, server, limit=duration + 3)
    _expect(closed is not None, f"closed again {time.monotonic() - t0:.1f} s later (cmd_timeout = {duration:g}): {_state(False)}")


def run_demo(duration: float = 2.0) -> int:
    if os.geteuid() != 0:
        click.echo("spa demo: needs root (it builds network namespaces and firewalls)", err=True)
        return 2
    py = sys.executable
    click.echo(click.style("spa demo", bold=True) + ": a default-deny server, a client, and its doors")
    with Lab(tag="demo") as lab, tempfile.TemporaryDirectory(prefix="spa-demo-") as tmp:
        server = None
        config = os.path.join(tmp, "knockd.conf")
        keys = _make_keys(tmp)
        with open(config, "w") as f:
            f.write(DEMO_CONFIG.format(logfile=os.path.join(tmp, "spa.log"), duration=f"{duration:g}", tmp=tmp))
        try:
            lab.default_deny("iptables-nft")
            lab.listen(22)
            _say(None, f"server {SERVER_V4} / {SERVER_V6}: iptables INPUT policy DROP, a service on tcp/22")
            server = lab.exec_server(
                [py, "-m", "spa.server.cli", "-c", config, "-i", "veth0", "--state-dir", os.path.join(tmp, "state")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            time.sleep(1.0)
            _expect(server.poll() is None, "spa-server sniffing veth0 in the server namespace (no listening socket)")
            client = [py, "-m", "spa.client.cli"]
            for server_addr, title in ((SERVER_V4, "classic knock, opened by nftables (door openSSH, knock-client)"),
                                       (SERVER_V6, "the same door over IPv6")):
                _door(lab, title, f"knock-client {server_addr} 7000 8000:udp 9000",
                      [*client, server_addr, "7000", "8000:udp", "9000"], server_addr, duration)
            knock = shutil.which("knock")
            if knock:
                _door(lab, "the seed article's door with knockd's own commands (the real knock client)",
                      f"knock {SERVER_V4} 2222:udp 3333:tcp 4444:udp", [knock, SERVER_V4, "2222:udp", "3333:tcp", "4444:udp"], SERVER_V4, duration)
            else:
                _say(None, "(the real knock client is not installed: apt-get install knockd to see the seed's door)")
            _door(lab, "signed single-packet authorization (door sshSPA, one UDP packet, Ed25519)",
                  f"knock-client --key client/key --server-key server.key.pub {SERVER_V4} sshSPA",
                  [*client, "--key", keys["client"], "--server-key", keys["server_pub"], SERVER_V4, "sshSPA"],
                  SERVER_V4, duration)
            _door(lab, "rotating sequence (door sshRotating, ports from a shared key and the clock)",
                  f"knock-client --key rotating.key {SERVER_V4} sshRotating",
                  [*client, "--key", keys["rotating"], SERVER_V4, "sshRotating"], SERVER_V4, duration)
            server.terminate()
            _expect(server.wait(10) == 0, "spa-server stopped cleanly (SIGTERM)")
            with in_netns(lab.server):
                left = subprocess.run(["nft", "list", "table", "inet", "spa"], capture_output=True).returncode
            _expect(left != 0, "and removed everything it had added to the firewall")
        except DemoFailed:
            click.echo(click.style("\ndemo failed", fg="red", bold=True))
            if server is not None:
                if server.poll() is None:
                    server.terminate()
                    server.wait(10)
                if server.stderr is not None:
                    click.echo(server.stderr.read().decode(errors="replace"), err=True)
            return 1
        finally:
            if server is not None and server.poll() is None:
                server.kill()
    click.echo(click.style("\ndemo passed", fg="green", bold=True) + ": every door closed -> open -> closed, for the knocking address only")
    return 0
