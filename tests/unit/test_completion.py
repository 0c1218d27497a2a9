"""Shell completion: each program prints click's completion script for bash, zsh and fish, and completes.

The console scripts are run as installed (``sys.prefix/bin``, the venv's);
where they are not installed, ``python -c`` calls ``main`` with the program's
name, which is what the scripts do. docs/operations.md ("Shell completion")
tells administrators which lines to add.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {
    "spa": ("spa.cli", "_SPA_COMPLETE"),
    "spa-server": ("spa.server.cli", "_SPA_SERVER_COMPLETE"),
    "knock-client": ("spa.client.cli", "_KNOCK_CLIENT_COMPLETE"),
}


def run(prog: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    module, _ = PROGRAMS[prog]
    script = Path(sys.prefix) / "bin" / prog
    if script.exists():
        argv = [str(script)]
    else:
        argv = [sys.executable, "-c", f"from {module} import main; main(prog_name={prog!r})"]
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT)


def function_name(prog: str) -> str:
    return f"_{prog.replace('-', '_')}_completion"


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_program_emits_a_completion_script(prog, shell):
    if shell == "bash" and shutil.which("bash") is None:
        pytest.skip("click checks the bash version by running bash")
    _, var = PROGRAMS[prog]
    r = run(prog, {var: f"{shell}_source"})
    assert r.returncode == 0, r.stderr
    assert var in r.stdout, r.stdout  # the script calls the program back with this variable
    if shell == "bash":
        assert f"complete -o nosort -F {function_name(prog)} {prog}" in r.stdout
    elif shell == "zsh":
        assert f"#compdef {prog}" in r.stdout
    else:
        assert f"complete --no-files --command {prog}" in r.stdout


def _complete(prog: str, words: str) -> list[str]:
    _, var = PROGRAMS[prog]
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    r = run(prog, {var: "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert r.returncode == 0, r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if "," in line]


def test_spa_completes_its_subcommands():
    got = _complete("spa", "spa ")
    assert {"keygen", "trust", "sequence", "grants", "grant", "status", "check-config", "demo"} <= set(got), got


def test_spa_completes_a_subcommands_options_and_choices():
    assert {"--shared", "--server", "--rotate", "--grace"} <= set(_complete("spa", "spa keygen --"))
    assert set(_complete("spa", "spa keygen --proto ")) == {"tcp", "udp", "mixed"}


def test_spa_server_and_knock_client_complete_their_options():
    assert {"--config", "--interface", "--state-dir", "--metrics-file"} <= set(_complete("spa-server", "spa-server --"))
    assert {"--key", "--server-key", "--bind-source", "--tcpflags"} <= set(_complete("knock-client", "knock-client --"))
