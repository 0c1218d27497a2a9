"""The README's first command, run whole: every way in closed -> open -> closed."""

import subprocess
import sys

import pytest

from tests.netns.knockd_helpers import ROOT

pytestmark = pytest.mark.netns


def test_demo_passes_every_way_in():
    r = subprocess.run([sys.executable, "-m", "spa.cli", "demo", "--duration", "1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    for door in ("door openSSH", "over IPv6", "knock 192.0.2.1 2222:udp", "door sshSPA", "door sshRotating"):
        assert door in r.stdout
    assert "FAIL" not in r.stdout and "demo passed" in r.stdout
