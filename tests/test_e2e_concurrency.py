"""One run at a time through the real daemon (issue 15): a workflow's `concurrency`
queues a further submit (state QUEUED) or, with `"on_busy": "skip"`, refuses it; a
QUEUED run starts in submit order when a slot frees, can be cancelled, is waited
through by `run --wait`, and survives a kill -9 of the daemon (the queue is derived
from the logs).

Each run's one step stamps `RUN start|end TIME` into a ledger (see test_e2e_dag.py)
and holds until the test creates a file, so the test decides when a run ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, replay_events, run_json, wait_for_state, wait_until, write_workflow
from test_e2e_dag import read_stamps


def held_workflow(tmp: Path, **top: object) -> Path:
    ledger, go = tmp / "ledger", tmp / "go-$WFD_RUN_ID"
    command = (f'echo "$WFD_RUN_ID start $(date +%s.%N)" >> {ledger}; '
               f'while [ ! -e "{go}" ]; do sleep 0.05; done; '
               f'echo "$WFD_RUN_ID end $(date +%s.%N)" >> {ledger}')
    return write_workflow(tmp, {"name": "nightly", **top,
                                "steps": [{"id": "work", "command": command}]})


def release(tmp: Path, run_id: str) -> None:
    (tmp / f"go-{run_id}").touch()


def state(d: Daemon, run_id: str) -> str:
    return run_json(d, run_id)["state"]


@pytest.mark.timeout(120)
def test_a_second_submit_queues_and_starts_when_the_first_ends(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = held_workflow(wfd_tmp, concurrency=1)
    d = daemon()
    first = d.submit(wf)
    wait_until(lambda: (wfd_tmp / "ledger").exists(), timeout=30)
    waiter = d.popen("run", str(wf), "--wait")  # --wait waits through QUEUED
    second = wait_until(lambda: (d.run_ids() - {first}), timeout=30).pop()
    wait_for_state(d, second, "QUEUED")

    listed = d.wfctl("status").stdout
    assert any(second in line and "QUEUED" in line for line in listed.splitlines()), listed
    assert run_json(d, second)["steps"]["work"]["state"] == "PENDING"
    assert waiter.poll() is None
    release(wfd_tmp, first)
    wait_for_state(d, second, "RUNNING")
    release(wfd_tmp, second)
    out, _ = waiter.communicate(timeout=60)

    assert waiter.returncode == 0 and out.strip() == second
    stamps = read_stamps(wfd_tmp / "ledger")
    assert stamps[first][1] <= stamps[second][0]  # never both at once
    events = [e["type"] for e in replay_events(d, second)]
    assert events[:2] == ["RunCreated", "RunDequeued"]
    replayed = d.wfctl("replay", second).stdout
    assert "QUEUED" in replayed and "run: RUNNING (its turn in the queue)" in replayed


@pytest.mark.timeout(120)
def test_on_busy_skip_refuses_the_second_submit(daemon: Callable[..., Daemon],
                                               wfd_tmp: Path) -> None:
    wf = held_workflow(wfd_tmp, concurrency=1, on_busy="skip")
    d = daemon()
    first = d.submit(wf)

    refused = d.wfctl("run", str(wf))

    assert refused.returncode == 2
    assert refused.stdout == ""
    assert (f"workflow 'nightly' has 1 unfinished run of root ({first}), its concurrency "
            'is 1 and on_busy is "skip": not started') in refused.stderr
    assert d.run_ids() == {first}
    release(wfd_tmp, first)
    wait_for_state(d, first, "SUCCEEDED")
    second = d.submit(wf)  # the slot is free again
    release(wfd_tmp, second)
    wait_for_state(d, second, "SUCCEEDED")


@pytest.mark.timeout(120)
def test_cancel_of_a_queued_run_and_the_next_one_keeps_its_turn(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = held_workflow(wfd_tmp, concurrency=1)
    d = daemon()
    first = d.submit(wf)
    second, third = d.submit(wf), d.submit(wf)
    wait_for_state(d, third, "QUEUED")

    done = d.wfctl("cancel", second)

    assert done.returncode == 0, done.stderr
    status = wait_for_state(d, second, "CANCELLED")
    assert status["steps"]["work"]["state"] == "CANCELLED"
    assert state(d, first) == "RUNNING" and state(d, third) == "QUEUED"
    release(wfd_tmp, first)
    wait_for_state(d, third, "RUNNING")
    release(wfd_tmp, third)
    wait_for_state(d, third, "SUCCEEDED")
    assert second not in read_stamps(wfd_tmp / "ledger")  # it never ran


@pytest.mark.timeout(150)
def test_a_queued_run_survives_kill_9_of_the_daemon(daemon: Callable[..., Daemon],
                                                    wfd_tmp: Path) -> None:
    wf = held_workflow(wfd_tmp, concurrency=1)
    d = daemon()
    first = d.submit(wf)
    second = d.submit(wf)
    wait_for_state(d, second, "QUEUED")
    wait_until(lambda: first in (wfd_tmp / "ledger").read_text()
               if (wfd_tmp / "ledger").exists() else False, timeout=30)

    d.kill()
    d.start()

    wait_for_state(d, first, "RUNNING")
    assert state(d, second) == "QUEUED"
    release(wfd_tmp, first)
    wait_for_state(d, second, "RUNNING")
    release(wfd_tmp, second)
    wait_for_state(d, second, "SUCCEEDED")
    stamps = read_stamps(wfd_tmp / "ledger")
    assert stamps[first][1] <= stamps[second][0]
    assert state(d, first) == "SUCCEEDED"
