"""`wfctl logs` through the real daemon: one log per attempt, stdout and stderr
together, `--attempt`, `--follow` (SPEC 1 logs, SPEC 5 `logs`)."""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


def step_of(d: Daemon, run_id: str, step: str) -> dict:
    return run_json(d, run_id)["steps"][step]


def test_logs_per_attempt(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "retries": 1, "backoff": {"initial": 0.05},
        "command": 'echo "out $WFD_ATTEMPT"; echo "err $WFD_ATTEMPT" >&2; '
                   '[ "$WFD_ATTEMPT" = 2 ]',
    }]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    assert step_of(d, run_id, "s")["attempts"] == 2

    first = d.wfctl("logs", run_id, "s", "--attempt", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "out 1\nerr 1\n"
    second = d.wfctl("logs", run_id, "s", "--attempt", "2")
    assert second.stdout == "out 2\nerr 2\n"
    latest = d.wfctl("logs", run_id, "s")
    assert latest.returncode == 0 and latest.stdout == second.stdout
    assert latest.stderr == ""
    logs = d.state_dir / "runs" / run_id / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["s.1.log", "s.2.log"]
    assert (logs / "s.1.log").read_text() == first.stdout

    bad = d.wfctl("logs", run_id, "s", "--attempt", "3")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


def test_logs_of_a_step_that_never_ran(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "exit 1"},
        {"id": "b", "command": "echo never", "depends_on": ["a"]},
    ]})
    d = daemon()
    run_id = d.wfctl("run", str(wf), "--wait").stdout.strip()
    done = d.wfctl("logs", run_id, "b")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    follow = d.wfctl("logs", run_id, "b", "--follow", timeout=20)  # terminal: ends at once
    assert follow.returncode == 0 and follow.stdout == ""


def test_binary_and_unterminated_output(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "command": ["python3", "-c",
                               "import sys; sys.stdout.buffer.write(bytes(range(256)) * 3)"],
    }]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    done = d.wfctl("logs", run_id, "s", text=False)
    assert done.returncode == 0
    assert done.stdout == bytes(range(256)) * 3


def test_follow_one_attempt_ends_with_it(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "retries": 1, "backoff": {"initial": 0.3},
        "command": f'echo "first $WFD_ATTEMPT"; while [ ! -e {gate} ]; do sleep 0.05; done; '
                   f'echo "second $WFD_ATTEMPT" >&2; [ "$WFD_ATTEMPT" = 2 ]',
    }]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: step_of(d, run_id, "s")["state"] == "RUNNING", 15)
    follower = d.popen("logs", run_id, "s", "--attempt", "1", "--follow")
    # output arrives while the attempt still runs
    assert follower.stdout.readline() == "first 1\n"
    assert follower.poll() is None
    assert step_of(d, run_id, "s")["state"] == "RUNNING"
    gate.touch()
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert out == "second 1\n"
    # it stopped at the end of attempt 1, not of the step
    assert step_of(d, run_id, "s")["attempts"] <= 2
    assert wait_for_state(d, run_id, *ENDED)["state"] == "SUCCEEDED"


def test_follow_goes_on_to_next_attempts(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "retries": 2, "backoff": {"initial": 0.3},
        "command": f'echo "start $WFD_ATTEMPT"; while [ ! -e {gate} ]; do sleep 0.05; done; '
                   f'echo "end $WFD_ATTEMPT" >&2; [ "$WFD_ATTEMPT" = 3 ]',
    }]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: step_of(d, run_id, "s")["state"] == "RUNNING", 15)
    follower = d.popen("logs", run_id, "s", "--follow")
    assert follower.stdout.readline() == "start 1\n"
    t0 = time.monotonic()
    gate.touch()
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert out == "end 1\nstart 2\nend 2\nstart 3\nend 3\n"
    assert time.monotonic() - t0 >= 0.3 + 0.6  # it waited through both backoffs
    assert "attempt 2" in err and "attempt 3" in err  # the switch is said on stderr
    status = run_json(d, run_id)
    assert status["steps"]["s"]["state"] == "SUCCEEDED"
    assert status["steps"]["s"]["attempts"] == 3


def test_follow_before_the_step_starts(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "first", "command": f"while [ ! -e {gate} ]; do sleep 0.05; done"},
        {"id": "later", "command": "echo one; sleep 0.3; echo two", "depends_on": ["first"]},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    follower = d.popen("logs", run_id, "later", "--follow")
    ready, _, _ = select.select([follower.stdout], [], [], 0.5)
    assert not ready and follower.poll() is None  # waiting for the step to start
    gate.touch()
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert out == "one\ntwo\n"
