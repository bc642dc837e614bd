"""--json on every command that prints something, "did you mean", and the help texts,
through the real binaries (issue 14)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, base_env, run_json, wait_for_state, wait_until, write_workflow

from wfd.daemon import parse_args

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


def offline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wfctl", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=base_env("none"))


def test_validate_json_and_did_you_mean(wfd_tmp: Path) -> None:
    good = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}, "good.json")
    done = offline("validate", "--json", str(good), cwd=wfd_tmp)
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout) == {"file": str(good), "ok": True, "steps": 1,
                                       "problems": []}
    bad = write_workflow(wfd_tmp, {"nmae": "x", "steps": [
        {"id": "a", "comand": "true", "backoff": {"intial": 1}}]}, "bad.json")
    done = offline("validate", "--json", str(bad), cwd=wfd_tmp)
    assert done.returncode == 2 and done.stderr == ""
    doc = json.loads(done.stdout)
    assert doc["ok"] is False and doc["steps"] is None
    assert set(doc["problems"]) == {
        f"{bad}: $.nmae: unknown field; did you mean 'name'?",
        f"{bad}: $.steps[0]: missing required field \"command\"",
        f"{bad}: $.steps[0].comand: unknown field; did you mean 'command'?",
        f"{bad}: $.steps[0].backoff.intial: unknown field; did you mean 'initial'?",
    }
    # the same problems, as lines on stderr, without --json
    plain = offline("validate", str(bad), cwd=wfd_tmp)
    assert plain.returncode == 2 and set(plain.stderr.splitlines()) == set(doc["problems"])
    missing = offline("validate", "--json", str(wfd_tmp / "nope.json"), cwd=wfd_tmp)
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["problems"] == [
        f"cannot read {wfd_tmp / 'nope.json'}: No such file or directory"]


def test_unknown_command_says_did_you_mean(wfd_tmp: Path) -> None:
    done = offline("stauts", cwd=wfd_tmp)
    assert done.returncode == 2
    assert done.stderr == ("wfctl: error: unknown command 'stauts'; did you mean 'status'? "
                           "(see wfctl --help)\n")
    far = offline("frobnicate", cwd=wfd_tmp)
    assert far.returncode == 2 and "did you mean" not in far.stderr
    assert "(choose from 'validate', 'run'," in far.stderr


def test_validate_help_shows_no_daemon_options(wfd_tmp: Path) -> None:
    done = offline("validate", "--help", cwd=wfd_tmp)
    assert done.returncode == 0
    assert "--socket" not in done.stdout and "--no-autostart" not in done.stdout
    assert "--json" in done.stdout
    # still accepted (SPEC 5: every command takes --socket), just not advertised
    good = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]})
    assert offline("validate", str(good), "--socket", "/nowhere", cwd=wfd_tmp).returncode == 0


def test_wfd_help_documents_every_option_and_install_units() -> None:
    done = subprocess.run([sys.executable, "-m", "wfd", "--help"], capture_output=True,
                          text=True, timeout=60, env=base_env("none"),
                          )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "install-units [--user] [--print]" in text
    parser_options = _wfd_options()
    for option in parser_options:
        # each option is listed with a line of help after it (not a bare flag)
        match = re.search(rf"^  {re.escape(option)}\b(.*)$", text, re.M)
        assert match, f"wfd --help does not list {option}"
        rest = match.group(1).strip()
        following = text[match.end():].split("\n", 1)[1].lstrip() if not rest else rest
        assert following and not following.startswith("--"), f"{option} has no help"


def _wfd_options() -> list[str]:
    """Every long option wfd's parser knows, read from the parser itself."""
    import argparse

    seen: list[str] = []
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        seen.extend(opt for action in self._actions for opt in action.option_strings
                    if opt.startswith("--") and opt != "--help")
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    assert "--keep-runs" in seen and "--state-dir" in seen
    return seen


@pytest.mark.timeout(120)
def test_json_of_cancel_resume_resume_all_and_shutdown(daemon: Callable[..., Daemon],
                                                        wfd_tmp: Path) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "wait", "command": f"while [ ! -e {gate} ]; do sleep 0.05; done",
         "kill_grace": 0.5}]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: run_json(d, run_id)["steps"]["wait"]["state"] == "RUNNING", 20)
    done = d.wfctl("cancel", run_id, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"run_id": run_id, "state": "CANCELLED",
                                       "was_finished": False}
    again = json.loads(d.wfctl("cancel", run_id, "--json").stdout)
    assert again == {"run_id": run_id, "state": "CANCELLED", "was_finished": True}

    gate.touch()
    done = d.wfctl("resume", run_id, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"run_ids": [run_id]}
    wait_for_state(d, run_id, *ENDED)
    done = d.wfctl("resume-all", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {"run_ids": []}

    done = d.wfctl("shutdown", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"stopping": True, "stop_steps": False}
    assert d.proc.wait(30) == 0
