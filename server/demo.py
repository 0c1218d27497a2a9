"""The README's first command: the product working, end to end, in two throw-away namespaces.

It builds a server and a client namespace, puts the seed article's
default-deny firewall (iptables INPUT policy DROP) in the server, starts
``spa-server`` there and a service on port 22, and shows that port going
closed -> open -> closed from the client. Each way in adds its step here as
it lands; this release opens through the grant module (``spa grant``), the
act every way in ends with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import click

from spa.server.netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, Lab, in_netns


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


def run_demo(duration: float = 3.0) -> int:
    if os.geteuid() != 0:
        click.echo("spa demo: needs root (it builds network namespaces and firewalls)", err=True)
        return 2
    py = sys.executable
    click.echo(click.style("spa demo", bold=True) + ": a default-deny server, a client, and one door\n")
    with Lab(tag="demo") as lab, tempfile.TemporaryDirectory(prefix="spa-demo-") as state:
        server = None
        try:
            lab.default_deny("iptables-nft")
            lab.listen(22)
            _say(None, f"server {SERVER_V4} / {SERVER_V6}: iptables INPUT policy DROP, a service on tcp/22")
            server = lab.exec_server(
                [py, "-m", "spa.server.cli", "--backend", "nft", "--state-dir", state, "--repair-interval", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            time.sleep(0.5)
            _expect(server.poll() is None, "spa-server running in the server namespace (no listening socket)")
            before = (lab.probe(SERVER_V4), lab.probe(SERVER_V6))
            _expect(not any(before), f"client -> tcp/22 before: IPv4 {_state(before[0])}, IPv6 {_state(before[1])}")
            for client in (CLIENT_V4, CLIENT_V6):
                proc = subprocess.run(
                    ["ip", "netns", "exec", lab.server, py, "-m", "spa.cli", "grant", "--backend", "nft",
                     "--state-dir", state, "--door", "ssh", "--address", client, "--port", "22/tcp",
                     "--duration", str(duration)],
                    capture_output=True, text=True,
                )
                _expect(proc.returncode == 0, f"grant door 'ssh' to {client} for {duration:g}s: {proc.stdout.strip() or proc.stderr.strip()}")
            t0 = time.monotonic()
            after = (lab.probe(SERVER_V4), lab.probe(SERVER_V6))
            _expect(all(after), f"client -> tcp/22 now: IPv4 {_state(after[0])}, IPv6 {_state(after[1])}")
            other = lab.probe(SERVER_V4, source="192.0.2.3")
            _expect(not other, f"from another client address (192.0.2.3): {_state(other)}")
            closed_after = lab.wait_for(False, SERVER_V4, limit=duration + 3)
            _expect(closed_after is not None, f"closed again {time.monotonic() - t0:.1f}s after opening: {_state(False)}")
            server.terminate()
            server.wait(10)
            with in_netns(lab.server):
                left = subprocess.run(["nft", "list", "table", "inet", "spa"], capture_output=True).returncode
            _expect(left != 0, "spa-server stopped cleanly and removed its nftables table")
        except DemoFailed:
            click.echo(click.style("\ndemo failed", fg="red", bold=True))
            if server is not None and server.poll() is not None and server.stderr is not None:
                click.echo(server.stderr.read().decode(errors="replace"), err=True)
            return 1
        finally:
            if server is not None and server.poll() is None:
                server.kill()
    click.echo(click.style("\ndemo passed", fg="green", bold=True) + ": closed -> open -> closed, for one address only")
    return 0
