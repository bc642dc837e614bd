"""Cleanup and alert steps (`run_if`), `on_exit` steps and a run's `timeout` through the
real binaries (issue 15)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    Daemon,
    replay_events,
    run_json,
    wait_for_state,
    wait_until,
    write_workflow,
)

DUMP_ENV = ["python3", "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]


def backup(tmp: Path, main_exit: int) -> Path:
    """A backup whose dump exits `main_exit`, with a cleanup, an alert and a report."""
    return write_workflow(tmp, {"name": "backup", "steps": [
        {"id": "dump", "command": f"echo dumped > {tmp / 'dump.out'}; exit {main_exit}"},
        {"id": "cleanup", "command": f"touch {tmp / 'cleaned'}", "depends_on": ["dump"],
         "run_if": "done"},
        {"id": "alert", "command": f"touch {tmp / 'alerted'}", "depends_on": ["dump"],
         "run_if": "failed"},
        {"id": "report", "command": f"touch {tmp / 'reported'}", "depends_on": ["dump"]},
    ]})


def states(status: dict, section: str = "steps") -> dict[str, str]:
    return {sid: step["state"] for sid, step in status[section].items()}


@pytest.mark.timeout(120)
def test_cleanup_and_alert_run_after_a_failure_and_the_run_is_failed(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    d = daemon()
    done = d.wfctl("run", str(backup(wfd_tmp, 1)), "--wait")

    assert done.returncode == 1, done.stderr  # FAILED, though cleanup and alert succeeded
    status = run_json(d, done.stdout.strip())
    assert status["state"] == "FAILED"
    assert states(status) == {"dump": "FAILED", "cleanup": "SUCCEEDED",
                              "alert": "SUCCEEDED", "report": "SKIPPED"}
    assert status["steps"]["report"]["error"] == "skipped: upstream step 'dump' failed"
    assert (wfd_tmp / "cleaned").exists() and (wfd_tmp / "alerted").exists()
    assert not (wfd_tmp / "reported").exists()


@pytest.mark.timeout(120)
def test_cleanup_runs_after_a_success_and_the_alert_is_skipped(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    d = daemon()
    done = d.wfctl("run", str(backup(wfd_tmp, 0)), "--wait")

    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    status = run_json(d, run_id)
    assert status["state"] == "SUCCEEDED"  # a skipped alert does not fail the run
    assert states(status) == {"dump": "SUCCEEDED", "cleanup": "SUCCEEDED",
                              "alert": "SKIPPED", "report": "SUCCEEDED"}
    assert status["steps"]["alert"]["error"] == "skipped: no dependency failed"
    assert (wfd_tmp / "cleaned").exists() and not (wfd_tmp / "alerted").exists()
    skipped = [e for e in replay_events(d, run_id) if e["type"] == "StepSkipped"]
    assert skipped == [{**skipped[0], "step": "alert", "cause": "dump",
                        "reason": "no dependency failed"}]


def with_exits(tmp: Path, main: str, **top: object) -> Path:
    """One main step running `main`, and on_exit steps that dump their environment."""
    return write_workflow(tmp, {"name": "exits", **top, "steps": [
        {"id": "ok", "command": "true"},
        {"id": "main", "command": main, "kill_grace": 0.5},
    ], "on_exit": [
        {"id": "notify", "command": [*DUMP_ENV, str(tmp / "notify.env")]},
        {"id": "page", "command": [*DUMP_ENV, str(tmp / "page.env")],
         "when": ["FAILED", "CANCELLED"]},
        {"id": "broken", "command": "exit 3"},  # fails, and changes nothing
    ]})


def check_exits(d: Daemon, tmp: Path, run_id: str, state: str, failed: str) -> dict:
    """The run ended `state`, after its on_exit steps, which saw how it ended."""
    status = run_json(d, run_id)
    assert status["state"] == state
    assert set(status["steps"]) == {"ok", "main"}  # on_exit steps have their own section
    page = "SKIPPED" if state == "SUCCEEDED" else "SUCCEEDED"
    assert states(status, "on_exit") == {"notify": "SUCCEEDED", "page": page,
                                         "broken": "FAILED"}
    env = json.loads((tmp / "notify.env").read_text())
    assert (env["WFD_RUN_STATE"], env["WFD_FAILED_STEPS"]) == (state, failed)
    assert (env["WFD_RUN_ID"], env["WFD_STEP_ID"]) == (run_id, "notify")
    assert (tmp / "page.env").exists() == (state != "SUCCEEDED")
    # Before RunFinished: --wait waited for them.
    events = replay_events(d, run_id)
    assert events[-1]["type"] == "RunFinished" and events[-1]["state"] == state
    table = d.wfctl("status", run_id).stdout
    assert "ON EXIT" in table and "notify" in table
    return status


@pytest.mark.timeout(120)
def test_on_exit_steps_run_after_a_success(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    done = d.wfctl("run", str(with_exits(wfd_tmp, "true")), "--wait")

    assert done.returncode == 0, done.stderr  # the failing on_exit step changes nothing
    status = check_exits(d, wfd_tmp, done.stdout.strip(), "SUCCEEDED", "")
    assert status["on_exit"]["page"]["error"] == (
        "skipped: the run is SUCCEEDED; on_exit when FAILED, CANCELLED")


@pytest.mark.timeout(120)
def test_on_exit_steps_run_after_a_failure(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    done = d.wfctl("run", str(with_exits(wfd_tmp, "exit 2")), "--wait")

    assert done.returncode == 1, done.stderr
    check_exits(d, wfd_tmp, done.stdout.strip(), "FAILED", "main")


@pytest.mark.timeout(120)
def test_on_exit_steps_run_after_a_cancel(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(with_exits(wfd_tmp, f"touch {wfd_tmp / 'started'}; sleep 60"))
    wait_for_state(d, run_id, "RUNNING")
    deadline = time.monotonic() + 30
    while not (wfd_tmp / "started").exists():
        assert time.monotonic() < deadline, "main never started"
        time.sleep(0.05)

    cancel = d.wfctl("cancel", run_id)

    assert cancel.returncode == 0, cancel.stderr
    status = check_exits(d, wfd_tmp, run_id, "CANCELLED", "")
    assert status["steps"]["main"]["state"] == "CANCELLED"


@pytest.mark.timeout(120)
def test_a_run_past_its_timeout_is_cancelled_and_its_on_exit_steps_run(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    d = daemon()
    started = time.monotonic()
    done = d.wfctl("run", str(with_exits(wfd_tmp, "sleep 60", timeout=1.5)), "--wait")

    assert done.returncode == 4, done.stderr  # CANCELLED
    assert time.monotonic() - started < 30
    run_id = done.stdout.strip()
    status = check_exits(d, wfd_tmp, run_id, "CANCELLED", "")
    assert status["error"] == "run timed out after 1.5 s"
    cancels = [e for e in replay_events(d, run_id) if e["type"] == "RunCancelRequested"]
    assert [e.get("reason") for e in cancels] == ["run timed out after 1.5 s"]


def test_on_exit_problems_are_reported_with_their_paths(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf = write_workflow(wfd_tmp, {"timeout": 0, "steps": [{"id": "a", "command": "true"}],
                                  "on_exit": [
        {"id": "a", "command": "true"},
        {"id": "b", "command": "true", "depends_on": ["a"], "when": ["DONE"]},
    ]})
    checked = daemon(start=False).wfctl("validate", str(wf))  # no daemon needed

    assert checked.returncode == 2
    assert checked.stderr.splitlines() == [
        f"{wf}: $.timeout: expected a number of seconds > 0 (at most 1e9) or null, got 0",
        f'{wf}: $.on_exit[0].id: duplicate id "a" (first at $.steps[0])',
        f"{wf}: $.on_exit[1].depends_on: an on_exit step has no depends_on (it runs once "
        "the run has ended)",
        f'{wf}: $.on_exit[1].when: expected a non-empty list of distinct run states out of '
        '"SUCCEEDED", "FAILED" and "CANCELLED", got ["DONE"]',
    ]


@pytest.mark.timeout(180)
def test_an_on_exit_step_survives_a_kill_9_of_the_daemon_and_the_run_then_finishes(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    """Durable like any step: the daemon dies while an on_exit step runs; the next daemon
    re-attaches to it (it runs under the keeper), records its end, then RunFinished."""
    seen = wfd_tmp / "seen"
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "main", "command": "exit 1"}], "on_exit": [
        {"id": "notify", "command": f'echo "$WFD_ATTEMPT $WFD_RUN_STATE" >> {seen}; '
                                    f"while [ ! -f {wfd_tmp / 'go'} ]; do sleep 0.05; done"},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: seen.exists() and seen.read_text() == "1 FAILED\n", 30,
               message="the on_exit step to start")
    d.kill()
    d.start()
    assert run_json(d, run_id)["state"] == "RUNNING"  # RunFinished waits for notify
    (wfd_tmp / "go").touch()

    status = wait_for_state(d, run_id, "FAILED", timeout=60)
    assert status["on_exit"]["notify"]["state"] == "SUCCEEDED"
    assert status["on_exit"]["notify"]["attempts"] == 1  # re-attached, not run again
    assert seen.read_text() == "1 FAILED\n"


@pytest.mark.timeout(120)
def test_resume_runs_cleanup_and_alert_steps_again(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    fixed = wfd_tmp / "fixed"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "dump", "command": f"test -f {fixed}"},
        {"id": "cleanup", "command": "true", "depends_on": ["dump"], "run_if": "done"},
        {"id": "alert", "command": "true", "depends_on": ["dump"], "run_if": "failed"},
    ], "on_exit": [{"id": "notify", "command": "true"}]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    run_id = done.stdout.strip()
    fixed.touch()

    resumed = d.wfctl("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr

    status = wait_for_state(d, run_id, "SUCCEEDED", timeout=60)
    steps = status["steps"]
    assert (steps["dump"]["state"], steps["dump"]["attempts"]) == ("SUCCEEDED", 2)
    assert (steps["cleanup"]["state"], steps["cleanup"]["attempts"]) == ("SUCCEEDED", 2)
    assert (steps["alert"]["state"], steps["alert"]["attempts"]) == ("SKIPPED", 1)
    assert status["on_exit"]["notify"]["attempts"] == 2  # the resumed run ended again
