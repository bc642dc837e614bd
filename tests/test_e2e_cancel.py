"""`wfctl cancel` through the real daemon (SPEC 2 "On cancel", SPEC 5 `cancel`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, pid_gone, pids_in, run_json, wait_for_state, wait_until, write_workflow

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")

# A step that starts descendants of several kinds, each writing its pid, then waits:
# plain, in a new session, ignoring SIGTERM, orphaned by a subshell.
TREE = """
echo $$ >> {pids}
sleep 60 & echo $! >> {pids}
setsid sh -c 'echo $$ >> {pids}; exec sleep 60' &
sh -c 'trap "" TERM; echo $$ >> {pids}; sleep 60; sleep 60' &
(sh -c 'echo $$ >> {pids}; exec sleep 60' &) &
sleep 60
"""
TREE_PIDS = 5




def step_states(d: Daemon, run_id: str) -> dict[str, str]:
    return {sid: s["state"] for sid, s in run_json(d, run_id)["steps"].items()}


def test_cancel_kills_trees_and_cancels_every_unfinished_step(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    pa, pb = wfd_tmp / "pids_a", wfd_tmp / "pids_b"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "done", "command": "true"},
        {"id": "a", "command": TREE.format(pids=pa), "kill_grace": 0.5, "depends_on": ["done"]},
        {"id": "b", "command": TREE.format(pids=pb), "kill_grace": 0.3},
        {"id": "waits", "command": "true", "depends_on": ["a"]},
        {"id": "retrying", "command": "exit 1", "retries": 3, "backoff": {"initial": 60}},
        {"id": "queued", "command": "true", "depends_on": ["waits", "retrying"]},
    ]})
    d = daemon()
    waiter = d.popen("run", str(wf), "--wait")
    run_id = waiter.stdout.readline().strip()
    pids = pids_in(pa, TREE_PIDS) + pids_in(pb, TREE_PIDS)
    wait_until(lambda: step_states(d, run_id)["retrying"] == "RETRY_WAIT", 15)
    assert step_states(d, run_id) == {
        "done": "SUCCEEDED", "a": "RUNNING", "b": "RUNNING", "waits": "PENDING",
        "retrying": "RETRY_WAIT", "queued": "PENDING",
    }

    done = d.wfctl("cancel", run_id)
    # when cancel returns, every step process is gone
    assert [p for p in pids if not pid_gone(p)] == []
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "cancelled" in done.stderr

    status = run_json(d, run_id)
    assert status["state"] == "CANCELLED"
    assert status["finished_at"] is not None
    steps = status["steps"]
    assert steps["done"]["state"] == "SUCCEEDED"
    for sid in ("a", "b", "waits", "retrying", "queued"):
        assert steps[sid]["state"] == "CANCELLED", steps
        assert steps[sid]["error"] == "cancelled"
        assert steps[sid]["finished_at"] is not None
    assert steps["a"]["attempts"] == 1 and steps["waits"]["attempts"] == 0
    assert steps["retrying"]["attempts"] == 1

    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 4, err
    assert out == ""  # only the run id (read above) went to stdout
    assert "CANCELLED" in err

    events = json.loads(d.wfctl("replay", run_id, "--json").stdout)["events"]
    types = [e["type"] for e in events]
    assert types.count("RunCancelRequested") == 1
    assert types[-1] == "RunFinished" and events[-1]["state"] == "CANCELLED"
    cancelled = {e["step"]: e for e in events if e["type"] == "StepCancelled"}
    assert set(cancelled) == {"a", "b", "waits", "retrying", "queued"}
    assert cancelled["a"].get("attempt") == 1 and cancelled["waits"].get("attempt") is None

    # nothing starts after a cancel, and a second cancel is a no-op on a finished run
    again = d.wfctl("cancel", run_id)
    assert again.returncode == 0 and "CANCELLED" in again.stderr
    assert len(json.loads(d.wfctl("replay", run_id, "--json").stdout)["events"]) == len(events)


def test_cancel_of_a_finished_run_leaves_it(daemon: Callable[..., Daemon],
                                            wfd_tmp: Path) -> None:
    d = daemon()
    ok = d.submit(write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]},
                                 "ok.json"), "--wait")
    bad = d.wfctl("run", str(write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "false"}]}, "bad.json")), "--wait").stdout.strip()
    for run_id, state in ((ok, "SUCCEEDED"), (bad, "FAILED")):
        before = d.wfctl("replay", run_id, "--json").stdout
        done = d.wfctl("cancel", run_id)
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and state in done.stderr, done.stderr
        assert run_json(d, run_id)["state"] == state
        assert d.wfctl("replay", run_id, "--json").stdout == before


def test_follow_and_wait_clients_both_see_the_cancel(daemon: Callable[..., Daemon],
                                                     wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "sleep 60",
                                             "kill_grace": 0.2}]})
    d = daemon()
    follower = d.popen("run", str(wf), "--follow")
    run_id = follower.stdout.readline().strip()
    wait_until(lambda: step_states(d, run_id)["s"] == "RUNNING", 15)
    waiter = d.popen("run", str(wfd_tmp / "wf.json"), "--wait")  # a second run, also cancelled
    other = waiter.stdout.readline().strip()
    wait_until(lambda: step_states(d, other)["s"] == "RUNNING", 15)
    for rid in (run_id, other):
        assert d.wfctl("cancel", rid).returncode == 0
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 4, err
    assert out == ""  # the id was read already; nothing else on stdout
    assert "s: CANCELLED" in err
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 4 and out == "", (out, err)
    assert wait_for_state(d, other, *ENDED)["state"] == "CANCELLED"
