"""Choosing a backend, and what happens when its programs are missing: a clear error, nothing touched."""

import pytest

from spa.errors import BackendUnavailable, FirewallError
from spa.server.firewall import create_backend, run
from spa.server.firewall.iptables import IptablesBackend
from spa.server.firewall.libnft import NftProcess, open_transport


@pytest.fixture
def empty_path(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "SEARCH_PATH", str(tmp_path))
    return tmp_path


def test_unknown_backend_is_named():
    with pytest.raises(BackendUnavailable, match="unknown firewall backend 'pf'.*auto, nft, iptables"):
        create_backend("pf")


def test_missing_iptables_says_what_to_install(empty_path):
    reason = IptablesBackend.unavailable_reason()
    assert reason is not None and "iptables" in reason and "apt-get install iptables" in reason
    with pytest.raises(BackendUnavailable, match="apt-get install iptables"):
        create_backend("iptables")


def test_missing_nft_binary(empty_path):
    with pytest.raises(BackendUnavailable, match="nft is not installed"):
        NftProcess()
    with pytest.raises(BackendUnavailable, match="unknown nft transport"):
        open_transport("carrier-pigeon")


def test_runner_errors_carry_argv_status_and_stderr(tmp_path):
    with pytest.raises(BackendUnavailable) as missing:
        run.run([str(tmp_path / "no-such-iptables"), "-S"])
    assert missing.value.argv == [str(tmp_path / "no-such-iptables"), "-S"]
    with pytest.raises(FirewallError) as failed:
        run.run(["/bin/sh", "-c", "echo oops >&2; exit 3"])
    assert failed.value.returncode == 3 and failed.value.stderr.strip() == "oops"
    assert "exit status 3" in str(failed.value) and "oops" in str(failed.value)
    with pytest.raises(FirewallError, match="timed out after 0.2 s"):
        run.run(["/bin/sleep", "5"], timeout=0.2)


def test_runner_pins_the_environment(monkeypatch):
    monkeypatch.setenv("PATH", "/tmp/evil")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    out = run.run(["/usr/bin/env"]).stdout.splitlines()
    assert sorted(out) == ["LC_ALL=C", f"PATH={run.SEARCH_PATH}"]
