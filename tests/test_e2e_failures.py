"""Failures in place, through the real binaries (issue 14): the last lines of each failed
step under `status RUN` and at the end of `run --wait/--follow`; `logs RUN` with every
step's output prefixed with its step, `--follow` included; an unknown step named with
"did you mean" and the run's steps; a step that never started says so."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")
NOISY = {"name": "noisy", "steps": [
    {"id": "prepare", "command": "echo prepared"},
    {"id": "load", "command": "seq 1 30; echo 'load: no such table' >&2; exit 3",
     "depends_on": ["prepare"]},
    {"id": "report", "command": "echo never", "depends_on": ["load"]},
]}


def tail_block(text: str, step: str) -> list[str]:
    """The lines under `STEP (attempt N) failed, ...:` up to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{step} (attempt"))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line[2:])
    return [lines[start], *block]


@pytest.mark.timeout(90)
def test_status_shows_the_last_lines_of_a_failed_step(daemon: Callable[..., Daemon],
                                                      wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, NOISY))
    wait_for_state(d, run_id, *ENDED)
    done = d.wfctl("status", run_id)
    assert done.returncode == 0, done.stderr
    head, *lines = tail_block(done.stdout, "load")
    assert head == "load (attempt 1) failed, the last 10 lines of its log:"
    assert lines == [str(n) for n in range(22, 31)] + ["load: no such table"]
    assert "prepare (attempt" not in done.stdout and "report (attempt" not in done.stdout
    three = d.wfctl("status", run_id, "--tail", "3").stdout
    assert tail_block(three, "load")[1:] == ["29", "30", "load: no such table"]
    assert "failed, the last" not in d.wfctl("status", run_id, "--tail", "0").stdout
    assert "failed, the last" not in d.wfctl("status", run_id, "--json").stdout


@pytest.mark.timeout(90)
@pytest.mark.parametrize("flag", ["--wait", "--follow"])
def test_run_wait_and_follow_end_with_the_tails(daemon: Callable[..., Daemon], wfd_tmp: Path,
                                                flag: str) -> None:
    d = daemon()
    done = d.wfctl("run", str(write_workflow(wfd_tmp, NOISY)), flag, "--tail", "2")
    assert done.returncode == 1, done.stderr
    assert done.stdout.count("\n") == 1  # stdout is the run id alone
    assert tail_block(done.stderr, "load") == [
        "load (attempt 1) failed, the last 2 lines of its log:", "30", "load: no such table"]
    assert done.stderr.rstrip().splitlines()[-1].endswith("FAILED (failed: load)")


@pytest.mark.timeout(90)
def test_logs_of_a_run_prefix_each_line_with_its_step(daemon: Callable[..., Daemon],
                                                      wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "first", "command": "echo one; printf 'no newline'"},
        {"id": "flaky", "command": 'echo "try $WFD_ATTEMPT"; [ "$WFD_ATTEMPT" -ge 2 ]',
         "retries": 1, "backoff": {"initial": 0.1}, "depends_on": ["first"]},
        {"id": "later", "command": "echo done", "depends_on": ["flaky"]},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    assert wait_for_state(d, run_id, *ENDED)["state"] == "SUCCEEDED"
    done = d.wfctl("logs", run_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "first   | one",
        "first   | no newline",
        "flaky   | try 1",
        "flaky#2 | try 2",
        "later   | done",
    ]


@pytest.mark.timeout(120)
def test_logs_follow_interleaves_steps_as_they_write(daemon: Callable[..., Daemon],
                                                     wfd_tmp: Path) -> None:
    """Two steps side by side, each line released by the test once the one before it was
    shown: the followed output has them in the order they were written."""
    go = {name: wfd_tmp / name for name in ("y1", "x2", "y2")}
    wait = "while [ ! -e {} ]; do sleep 0.05; done"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "x", "command": f"echo x1; {wait.format(go['x2'])}; echo x2"},
        {"id": "y", "command": f"{wait.format(go['y1'])}; echo y1; "
                               f"{wait.format(go['y2'])}; echo y2"},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    follow = d.popen("logs", run_id, "--follow")
    try:
        seen: list[str] = []
        for expected, release in (("x | x1", "y1"), ("y | y1", "x2"), ("x | x2", "y2"),
                                  ("y | y2", None)):
            line = follow.stdout.readline().rstrip("\n")
            seen.append(line)
            assert line == expected, seen
            if release:
                go[release].touch()
        assert follow.wait(60) == 0, follow.stderr.read()
        assert follow.stdout.read() == ""
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


@pytest.mark.timeout(90)
def test_an_unknown_step_and_a_step_that_never_started(daemon: Callable[..., Daemon],
                                                       wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, NOISY))
    wait_for_state(d, run_id, *ENDED)
    typo = d.wfctl("logs", run_id, "lod")
    assert typo.returncode == 2
    assert typo.stderr == (f"wfctl: run {run_id} has no step 'lod'; did you mean 'load'? "
                           "its steps: prepare, load, report\n")
    far = d.wfctl("logs", run_id, "zzz")
    assert far.returncode == 2
    assert far.stderr.endswith("has no step 'zzz'; its steps: prepare, load, report\n")
    never = d.wfctl("logs", run_id, "report")
    assert never.returncode == 0 and never.stdout == ""
    assert never.stderr == "step report never started (it is SKIPPED)\n"
    assert d.wfctl("logs", run_id, "--attempt", "1").returncode == 2
    assert run_json(d, run_id)["steps"]["report"]["attempts"] == 0


@pytest.mark.timeout(60)
def test_logs_of_a_step_still_waiting(daemon: Callable[..., Daemon],
                                             wfd_tmp: Path) -> None:
    d = daemon()
    blocker = wfd_tmp / "open"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "gate", "command": f"while [ ! -e {blocker} ]; do sleep 0.05; done"},
        {"id": "after", "command": "true", "depends_on": ["gate"]}]})
    run_id = d.submit(wf)
    wait_until(lambda: run_json(d, run_id)["steps"]["gate"]["state"] == "RUNNING", 20)
    done = d.wfctl("logs", run_id, "after")
    assert done.stderr == "step after never started (it is PENDING)\n"
    blocker.touch()
    wait_for_state(d, run_id, *ENDED)
    assert d.wfctl("logs", run_id).stdout == ""  # neither step wrote anything


@pytest.mark.timeout(120)
def test_logs_follow_waits_through_a_queued_run(daemon: Callable[..., Daemon],
                                                wfd_tmp: Path) -> None:
    """A run QUEUED behind another (concurrency 1) is followed until it has run."""
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"name": "one", "concurrency": 1, "steps": [
        {"id": "s", "command": f'while [ ! -e {gate} ]; do sleep 0.05; done; '
                               'echo "run $WFD_RUN_ID"'}]})
    d = daemon()
    first = d.submit(wf)
    wait_until(lambda: run_json(d, first)["steps"]["s"]["state"] == "RUNNING", 20)
    second = d.submit(wf)
    queued = run_json(d, second)
    assert queued["state"] == "QUEUED" and queued["waiting_for_resume"] is False
    assert "waiting for resume-all" not in d.wfctl("status").stdout
    follow = d.popen("logs", second, "--follow")
    try:
        gate.touch()
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert out == f"s | run {second}\n"
