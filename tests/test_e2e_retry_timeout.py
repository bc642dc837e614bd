"""Retries, backoff, failure, skipping, timeouts and leftover processes through the real
daemon (SPEC 1 `retries`/`backoff`/`timeout`/`kill_grace`, SPEC 2)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

from helpers import (
    Daemon,
    pid_gone,
    pids_in,
    replay_events,
    run_json,
    wait_for_state,
    write_workflow,
)

from wfd.events import parse_ts

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")





# ---- retries and backoff ------------------------------------------------------------


def test_backoff_gaps_are_measured(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    starts = wfd_tmp / "starts"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "flaky", "retries": 2,
        "backoff": {"initial": 0.3, "factor": 2, "jitter": 0},
        "command": f'date +%s.%N >> {starts}; echo "try $WFD_ATTEMPT"; exit 3',
    }]})
    d = daemon()
    run_id = d.submit(wf)
    status = wait_for_state(d, run_id, *ENDED)
    assert status["state"] == "FAILED"
    step = status["steps"]["flaky"]
    assert step["attempts"] == 3 and step["exit_code"] == 3
    assert step["error"] == "exited with status 3"

    t = [float(x) for x in starts.read_text().split()]
    assert len(t) == 3, t
    gaps = [b - a for a, b in pairwise(t)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps
    assert gaps[0] < 0.3 + 2.5 and gaps[1] < 0.6 + 2.5, gaps  # generous: a loaded box

    # the recorded retry times are exactly the nominal delays after the failures
    failed = [e for e in replay_events(d, run_id) if e["type"] == "AttemptFailed"]
    assert [e["attempt"] for e in failed] == [1, 2]
    delays = [parse_ts(e["retry_at"]) - parse_ts(e["ts"]) for e in failed]
    assert abs(delays[0] - 0.3) < 0.05 and abs(delays[1] - 0.6) < 0.05, delays


def test_backoff_max_caps_the_delay(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {
        "defaults": {"backoff": {"initial": 0.1, "factor": 10, "jitter": 0}},
        "steps": [{"id": "s", "command": "exit 1", "retries": 3, "backoff": {"max": 0.3}}],
    })
    d = daemon()
    run_id = d.submit(wf)
    assert wait_for_state(d, run_id, *ENDED)["state"] == "FAILED"
    failed = [e for e in replay_events(d, run_id) if e["type"] == "AttemptFailed"]
    delays = [parse_ts(e["retry_at"]) - parse_ts(e["ts"]) for e in failed]
    # 0.1, then 1.0 and 10 capped at 0.3 (step backoff merged over defaults field by field)
    assert len(delays) == 3
    for got, want in zip(delays, [0.1, 0.3, 0.3], strict=True):
        assert abs(got - want) < 0.05, delays


def test_jitter_stays_in_bounds(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    starts = wfd_tmp / "starts"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "j", "retries": 5,
        "backoff": {"initial": 0.2, "factor": 1, "jitter": 0.5},
        "command": f"date +%s.%N >> {starts}; exit 1",
    }]})
    d = daemon()
    run_id = d.submit(wf)
    assert wait_for_state(d, run_id, *ENDED)["state"] == "FAILED"
    failed = [e for e in replay_events(d, run_id) if e["type"] == "AttemptFailed"]
    delays = [parse_ts(e["retry_at"]) - parse_ts(e["ts"]) for e in failed]
    assert len(delays) == 5
    for delay in delays:
        assert 0.1 - 0.01 <= delay <= 0.3 + 0.01, delays
    assert max(delays) - min(delays) > 0.002, delays  # really random, not a fixed factor
    t = [float(x) for x in starts.read_text().split()]
    assert all(b - a >= 0.1 for a, b in pairwise(t)), t


def test_succeeds_on_a_later_attempt(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "retries": 5, "backoff": {"initial": 0.05},
        "command": '[ "$WFD_ATTEMPT" -ge 3 ]',
    }, {"id": "after", "command": "true", "depends_on": ["s"]}]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 0, done.stderr
    status = run_json(d, done.stdout.strip())
    assert status["state"] == "SUCCEEDED"
    s = status["steps"]["s"]
    assert s["attempts"] == 3 and s["exit_code"] == 0 and s["error"] is None


# ---- permanent failure -----------------------------------------------------------------


def test_permanent_failure_skips_downstream_only(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "bad", "command": "echo failing; exit 3", "retries": 1,
         "backoff": {"initial": 0.05}},
        {"id": "child", "command": "true", "depends_on": ["bad"]},
        {"id": "grandchild", "command": "true", "depends_on": ["child", "side"]},
        {"id": "side", "command": "sleep 0.5"},
        {"id": "side2", "command": "true", "depends_on": ["side"]},
    ]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, (done.stdout, done.stderr)
    run_id = done.stdout.strip()
    assert "FAILED" in done.stderr and "bad" in done.stderr
    status = run_json(d, run_id)
    assert status["state"] == "FAILED"
    steps = status["steps"]
    assert steps["bad"]["state"] == "FAILED"
    assert steps["bad"]["attempts"] == 2 and steps["bad"]["exit_code"] == 3
    assert steps["bad"]["error"] == "exited with status 3"
    for sid in ("child", "grandchild"):
        assert steps[sid]["state"] == "SKIPPED", steps
        assert steps[sid]["attempts"] == 0 and steps[sid]["exit_code"] is None
        assert steps[sid]["started_at"] is None
        assert "skipped" in steps[sid]["error"]
    assert "'bad'" in steps["child"]["error"]
    # the independent branch went on to the end
    assert steps["side"]["state"] == "SUCCEEDED" and steps["side2"]["state"] == "SUCCEEDED"
    assert status["finished_at"] is not None
    assert parse_ts(status["finished_at"]) >= parse_ts(steps["side2"]["finished_at"])


def test_exit_code_of_a_signal(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "sig", "command": "kill -USR1 $$; sleep 5"},
        {"id": "nine", "command": ["python3", "-c", "import os; os.kill(os.getpid(), 9)"]},
    ]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    steps = run_json(d, done.stdout.strip())["steps"]
    assert steps["sig"]["exit_code"] == -10 and steps["sig"]["error"] == "killed by SIGUSR1"
    assert steps["nine"]["exit_code"] == -9 and steps["nine"]["error"] == "killed by SIGKILL"


def test_cannot_start(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    (wfd_tmp / "notexec").write_text("#!/bin/sh\ntrue\n")
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "missing", "command": ["/nonexistent/prog", "x"], "retries": 1,
         "backoff": {"initial": 0.05}},
        {"id": "notexec", "command": ["./notexec"]},
        {"id": "badcwd", "command": "true", "cwd": "no/such/dir"},
        {"id": "after", "command": "true", "depends_on": ["missing"]},
    ]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    steps = run_json(d, done.stdout.strip())["steps"]
    missing = steps["missing"]
    assert missing["state"] == "FAILED" and missing["attempts"] == 2, missing
    assert missing["exit_code"] is None
    assert missing["error"].startswith("cannot start: "), missing
    assert "No such file" in missing["error"] and "/nonexistent/prog" in missing["error"]
    assert steps["notexec"]["error"].startswith("cannot start: ")
    assert "Permission denied" in steps["notexec"]["error"], steps["notexec"]
    badcwd = steps["badcwd"]
    assert badcwd["state"] == "FAILED" and badcwd["exit_code"] is None
    assert badcwd["error"].startswith("cannot start: ") and "no/such/dir" in badcwd["error"]
    assert steps["after"]["state"] == "SKIPPED"
    assert "\n" not in missing["error"] + badcwd["error"]


# ---- timeouts and process trees ----------------------------------------------------------

TREE = """
echo $$ >> {pids}
sleep 60 & echo $! >> {pids}
setsid sh -c 'echo $$ >> {pids}; exec sleep 60' &
sh -c 'trap "" TERM; echo $$ >> {pids}; sleep 60; sleep 60' &
(sh -c 'echo $$ >> {pids}; exec sleep 60' &) &
python3 -c 'import os, time, signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("{pids}", "a").write(f"{{os.getpid()}}\\n"); time.sleep(60)
    os._exit(0)
os.wait()' &
while [ "$(wc -l < {pids})" -lt 6 ]; do sleep 0.02; done
"""


def tree_command(pids: Path, tail: str) -> str:
    """Start five kinds of descendants (plain, setsid, ignoring SIGTERM, orphaned by a
    subshell, double-forked in a new session ignoring SIGTERM), each writing its pid."""
    return TREE.format(pids=pids) + tail


TREE_PIDS = 6  # the leader and five descendants


def test_timeout_kills_the_whole_tree(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    pids_file = wfd_tmp / "pids"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "slow", "timeout": 1.5, "kill_grace": 0.3,
        "command": tree_command(pids_file, "sleep 60"),
    }]})
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(pids_file, TREE_PIDS)
    assert not any(pid_gone(p) for p in pids)
    status = wait_for_state(d, run_id, *ENDED)
    # the step is ended only once its tree is gone: no waiting here
    assert [p for p in pids if not pid_gone(p)] == []
    step = status["steps"]["slow"]
    assert status["state"] == "FAILED" and step["state"] == "FAILED"
    assert step["error"] == "timed out after 1.5 s"
    assert step["exit_code"] == -15  # the leader (sh) died of the SIGTERM
    took = parse_ts(step["finished_at"]) - parse_ts(step["started_at"])
    assert took >= 1.5 + 0.3, took  # timeout, then the grace before the SIGKILL


def test_timeout_whole_seconds_message_and_retry(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "t", "timeout": 1, "kill_grace": 0, "retries": 1, "backoff": {"initial": 0.05},
        "command": ["sleep", "30"],
    }]})
    d = daemon()
    run_id = d.submit(wf)
    status = wait_for_state(d, run_id, *ENDED)
    step = status["steps"]["t"]
    assert step["attempts"] == 2 and step["error"] == "timed out after 1 s"
    assert step["exit_code"] == -15
    failed = [e for e in replay_events(d, run_id) if e["type"] == "AttemptFailed"]
    assert failed[0]["error"] == "timed out after 1 s"


def test_leftovers_are_killed_before_success(daemon: Callable[..., Daemon],
                                             wfd_tmp: Path) -> None:
    pids_file = wfd_tmp / "pids"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "quick", "kill_grace": 0.5, "command": tree_command(pids_file, "exit 0")},
        {"id": "next", "command": f"cat {pids_file} > {wfd_tmp / 'seen'}",
         "depends_on": ["quick"]},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    status = wait_for_state(d, run_id, *ENDED)
    pids = pids_in(pids_file, TREE_PIDS)
    assert [p for p in pids if not pid_gone(p)] == []
    quick = status["steps"]["quick"]
    assert status["state"] == "SUCCEEDED", status
    assert quick["state"] == "SUCCEEDED" and quick["exit_code"] == 0
    took = parse_ts(quick["finished_at"]) - parse_ts(quick["started_at"])
    assert took >= 0.5, took  # two descendants ignore SIGTERM: the grace ran out first
    # the dependent started only after every leftover was gone
    events = replay_events(d, run_id)
    [ok] = [e for e in events if e["type"] == "AttemptSucceeded" and e["step"] == "quick"]
    [claim] = [e for e in events if e["type"] == "AttemptClaimed" and e["step"] == "next"]
    assert claim["seq"] > ok["seq"]
    assert d.log_path.read_text().count("left behind") >= 1


def test_leftover_of_a_failed_attempt_is_killed_and_outcome_kept(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    pid_file = wfd_tmp / "pid"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "f", "kill_grace": 0.2, "command": f"sleep 60 & echo $! > {pid_file}; exit 7",
    }]})
    d = daemon()
    run_id = d.submit(wf)
    status = wait_for_state(d, run_id, *ENDED)
    assert pid_gone(int(pid_file.read_text()))
    assert status["steps"]["f"]["exit_code"] == 7
    assert status["steps"]["f"]["error"] == "exited with status 7"


def test_started_at_and_finished_at_span_retries(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "retries": 1, "backoff": {"initial": 0.4}, "command": "exit 1",
    }]})
    d = daemon()
    t0 = time.time()
    run_id = d.submit(wf)
    step = wait_for_state(d, run_id, *ENDED)["steps"]["s"]
    start, end = parse_ts(step["started_at"]), parse_ts(step["finished_at"])
    assert t0 - 1 < start < end
    assert end - start >= 0.4  # both attempts and the backoff between them
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", step["finished_at"])


def test_default_timeout_and_explicit_null(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {
        "defaults": {"timeout": 0.5, "kill_grace": 0.1},
        "steps": [
            {"id": "inherits", "command": "sleep 1.2"},
            {"id": "unlimited", "command": "sleep 1.2", "timeout": None},
            {"id": "own", "command": "sleep 1.2", "timeout": 5},
        ],
    })
    d = daemon()
    run_id = d.submit(wf)
    steps = wait_for_state(d, run_id, *ENDED)["steps"]
    assert steps["inherits"]["state"] == "FAILED"
    assert steps["inherits"]["error"] == "timed out after 0.5 s"
    assert steps["unlimited"]["state"] == "SUCCEEDED"
    assert steps["own"]["state"] == "SUCCEEDED"
