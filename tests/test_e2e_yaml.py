"""Workflow files people can document (issue 14), through the real binaries: a
`description` on the workflow and its steps, shown by `status`; YAML files converted by
wfctl (YAML 1.2), every problem with line:column; `wfctl run -` reads stdin."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, base_env, run_json, wait_for_state

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")

DOCUMENTED = """\
# a YAML workflow, with its description
name: nightly
description: Fetch the sales and load them
env:
  FLAG: on            # YAML 1.2: the string "on", not true
steps:
  - id: fetch
    description: download today's file
    retries: 0o1        # YAML 1.2 octal: 1
    command: echo "$FLAG"
  - id: load
    command: [sh, -c, "echo loaded"]
    depends_on: [fetch]
"""


def wfctl(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wfctl", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=base_env("none"), input=stdin)


@pytest.mark.timeout(90)
def test_a_yaml_workflow_runs_and_status_shows_its_descriptions(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    path = wfd_tmp / "nightly.yaml"
    path.write_text(DOCUMENTED)
    d = daemon()
    done = d.wfctl("run", str(path), "--wait")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    status = run_json(d, run_id)
    assert status["name"] == "nightly"
    assert status["description"] == "Fetch the sales and load them"
    assert status["steps"]["fetch"]["description"] == "download today's file"
    assert status["steps"]["load"]["description"] == ""
    assert d.wfctl("logs", run_id, "fetch").stdout == "on\n"
    table = d.wfctl("status", run_id).stdout.splitlines()
    assert table[1] == "Fetch the sales and load them"
    assert ["fetch", "download", "today's", "file"] in [line.split() for line in table]
    # the daemon got JSON: the stored workflow is the converted document
    stored = json.loads((d.state_dir / "runs" / run_id / "workflow.json").read_text())
    converted = json.loads(stored["workflow"])
    assert converted["env"] == {"FLAG": "on"} and converted["steps"][0]["retries"] == 1


def test_yaml_problems_have_line_and_column(wfd_tmp: Path) -> None:
    path = wfd_tmp / "bad.yml"
    path.write_text("name: bad\n"
                    "steps:\n"
                    "  - id: a\n"
                    "    comand: true\n"
                    "    retries: lots\n"
                    "  - id: b\n"
                    "    command: x\n"
                    "    description: 5\n"
                    "    depends_on: [a, zz]\n")
    done = wfctl("validate", str(path), cwd=wfd_tmp)
    assert done.returncode == 2
    assert set(done.stderr.splitlines()) == {
        f"{path}:3:5: $.steps[0]: missing required field \"command\"",
        f"{path}:4:5: $.steps[0].comand: unknown field; did you mean 'command'?",
        f"{path}:5:5: $.steps[0].retries: expected an integer from 0 to 1000, got \"lots\"",
        f"{path}:8:5: $.steps[1].description: expected a string, got 5",
        f"{path}:9:21: $.steps[1].depends_on[1]: unknown step \"zz\"",
    }, done.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("steps:\n  - id: a\n    command: [x\n", "4:1: YAML: expected ',' or ']'"),
    ("steps:\n  - id: a\n    command: x\n    id: b\n", "4:5: YAML: found duplicate key"),
    ("steps: [\n", "2:1: YAML: expected the node content"),
])
def test_yaml_syntax_errors_have_line_and_column(wfd_tmp: Path, text: str,
                                                 expected: str) -> None:
    path = wfd_tmp / "broken.yaml"
    path.write_text(text)
    done = wfctl("validate", str(path), cwd=wfd_tmp)
    assert done.returncode == 2
    assert done.stderr.startswith(f"{path}:{expected}"), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_aliases_cannot_blow_up(wfd_tmp: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = wfd_tmp / "laughs.yaml"
    path.write_text("\n".join(lines) + "\nsteps: []\n")
    done = wfctl("validate", str(path), cwd=wfd_tmp)
    assert done.returncode == 2
    assert "values once its aliases are expanded" in done.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("text", [
    '{"steps": [{"id": "hi", "command": "echo from stdin"}]}',
    "steps:\n  - id: hi\n    command: echo from stdin\n",
])
def test_run_dash_reads_stdin(daemon: Callable[..., Daemon], wfd_tmp: Path, text: str) -> None:
    d = daemon()
    done = d.wfctl("run", "-", "--wait", input=text)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert run_json(d, run_id)["name"] == "stdin"
    assert d.wfctl("logs", run_id, "hi").stdout == "from stdin\n"
    bad = d.wfctl("run", "-", input="steps: []\n")
    assert bad.returncode == 2 and bad.stderr == "-:1:1: $.steps: must not be empty\n"
    assert wait_for_state(d, run_id, *ENDED)["state"] == "SUCCEEDED"
