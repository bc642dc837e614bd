"""Short run references through the real binaries (issue 14): a prefix of the id or of
its random part, `@last`, `NAME@last`, `NAME@-2`, and an ambiguous prefix (exit 2)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, run_json, write_workflow


def submit_named(d: Daemon, root: Path, name: str, command: str = "true") -> str:
    wf = write_workflow(root, {"name": name, "steps": [{"id": "s", "command": command}]},
                        name=f"{name}.json")
    return d.submit(wf, "--wait")


@pytest.mark.timeout(120)
def test_references_everywhere(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    etl1 = submit_named(d, wfd_tmp, "etl", "echo one")
    build = submit_named(d, wfd_tmp, "build")
    etl2 = submit_named(d, wfd_tmp, "etl", "echo two")

    assert run_json(d, "@last")["run_id"] == etl2
    assert run_json(d, "@-3")["run_id"] == etl1
    assert run_json(d, "etl@last")["run_id"] == etl2
    assert run_json(d, "etl@-2")["run_id"] == etl1
    assert run_json(d, "build@last")["run_id"] == build
    random_part = build.split("-", 1)[1]
    assert run_json(d, random_part[:8])["run_id"] == build  # the whole random part
    assert run_json(d, build[:-1])["run_id"] == build  # a prefix of the id

    # every command that takes a run id takes a reference
    logs = d.wfctl("logs", "etl@-2", "s")
    assert (logs.returncode, logs.stdout) == (0, "one\n")
    replay = d.wfctl("replay", "etl@last", "--json")
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["state"]["run_id"] == etl2
    assert d.wfctl("timeline", "@last", "--width", "60").returncode == 0
    graph = d.wfctl("graph", "build@last", "--format", "mermaid")
    assert graph.returncode == 0 and "s" in graph.stdout
    cancel = d.wfctl("cancel", "@last")
    assert cancel.returncode == 0 and "already finished" in cancel.stderr

    # a failed run resumed by reference
    wf = write_workflow(wfd_tmp, {"name": "flaky", "steps": [{"id": "s", "command": "exit 1"}]})
    assert d.wfctl("run", str(wf), "--wait").returncode == 1
    failed = run_json(d)[-1]["run_id"]
    resumed = d.wfctl("resume", "flaky@last")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.strip() == f"run {failed} resumed"  # the id, not the reference


@pytest.mark.timeout(120)
def test_ambiguous_short_and_unknown(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    ids = [submit_named(d, wfd_tmp, "x") for _ in range(3)]
    stamp_prefix = ids[0][:4]  # "2026...": every id starts so
    done = d.wfctl("status", stamp_prefix)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == (f"wfctl: run reference '{stamp_prefix}' matches 3 runs; "
                        "give more characters:")
    assert lines[1:] == [f"  {run_id}  x" for run_id in reversed(ids)]

    for ref, words in [("abc", "too short"), ("x@-4", "there are only 3 runs of workflow 'x'"),
                       ("nope@last", "no runs of workflow 'nope'"), ("zzzz", "no such run: zzzz")]:
        done = d.wfctl("status", ref)
        assert done.returncode == 2, (ref, done.stderr)
        assert done.stderr.startswith("wfctl: ") and words in done.stderr, (ref, done.stderr)
        assert len(done.stderr.splitlines()) == 1
