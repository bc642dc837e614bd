"""Shell completion (issue 14): the scripts `wfctl completion bash|zsh|fish` prints, and
completion requests answered for real in bash (commands, options, run references from
the daemon). zsh and fish scripts are checked by those shells where installed (.ci/run
installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, base_env, write_workflow

BIN = Path(sys.executable).parent  # the venv's bin: wfctl is there


def complete_in_bash(line: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completes `line` (the cursor at its end) to, with wfctl's script."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    script = (
        'source <(wfctl completion bash)\n'
        f'COMP_LINE={_quote(line)}; COMP_POINT=${{#COMP_LINE}}\n'
        f'COMP_WORDS=({" ".join(_quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n'
        f'_python_argcomplete wfctl {_quote(words[-1])} {_quote(words[-2])}\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    full_env = base_env("none", {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                 **(env or {})})
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env=full_env)
    assert done.returncode == 0, done.stderr
    return [word.strip() for word in done.stdout.splitlines() if word.strip()]


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


@pytest.mark.skipif(not (BIN / "wfctl").exists(), reason="wfctl is not installed in this venv")
def test_bash_completes_commands_and_options() -> None:
    assert complete_in_bash("wfctl sta") == ["status"]
    assert set(complete_in_bash("wfctl re")) >= {"replay", "resume", "resume-all", "retry",
                                                  "rerun"}
    assert complete_in_bash("wfctl run --fo") == ["--follow"]
    assert {"bash", "fish", "zsh"} <= set(complete_in_bash("wfctl completion "))


@pytest.mark.timeout(90)
@pytest.mark.skipif(not (BIN / "wfctl").exists(), reason="wfctl is not installed in this venv")
def test_bash_completes_run_references_from_the_daemon(daemon: Callable[..., Daemon],
                                                       wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, {"name": "nightly", "steps": [
        {"id": "a", "command": "true"}]}))
    env = {"WFD_SOCKET": str(d.socket)}
    assert complete_in_bash("wfctl status nig", env) == ["nightly@last"]
    assert complete_in_bash(f"wfctl logs {run_id[:12]}", env) == [run_id]
    # `@` breaks words in bash: what follows it is completed, and bash puts it after it
    assert "last" in complete_in_bash("wfctl cancel @", env)
    # no daemon: no run references, and no error, and none started
    assert complete_in_bash("wfctl status nig", {"WFD_SOCKET": str(wfd_tmp / "no.sock")}) == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_scripts_are_generated_and_parse(shell: str, wfd_tmp: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "wfctl", "completion", shell],
                          capture_output=True, text=True, timeout=60, env=base_env("none"))
    assert done.returncode == 0, done.stderr
    assert "wfctl" in done.stdout and "_ARGCOMPLETE" in done.stdout
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (.ci/run installs it)")
    path = wfd_tmp / f"wfctl.{shell}"
    path.write_text(done.stdout)
    check = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stderr


def test_an_unknown_shell_is_bad_usage() -> None:
    done = subprocess.run([sys.executable, "-m", "wfctl", "completion", "tcsh"],
                          capture_output=True, text=True, timeout=60, env=base_env("none"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
