"""What wfctl says, through the real binaries (issue 14, "Plain words"): a signal death
in words, `exit_signal` in JSON, one rule for times, running time of a resumed run, and
a run no daemon drives."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


def step_row(table: str, step: str) -> str:
    return next(line for line in table.splitlines() if line.split()[:1] == [step])


@pytest.mark.timeout(90)
def test_a_timeout_and_a_cancel_read_as_words(daemon: Callable[..., Daemon],
                                              wfd_tmp: Path) -> None:
    slow = write_workflow(wfd_tmp, {"steps": [
        {"id": "slow", "command": ["sleep", "30"], "timeout": 0.5, "kill_grace": 5}]},
        name="slow.json")
    d = daemon()
    run_id = d.submit(slow)
    status = wait_for_state(d, run_id, *ENDED)
    step = status["steps"]["slow"]
    assert (step["exit_code"], step["exit_signal"]) == (-15, "SIGTERM")  # JSON keeps both
    table = d.wfctl("status", run_id).stdout
    row = step_row(table, "slow")
    assert row.split()[:4] == ["slow", "FAILED", "1", "SIGTERM"]
    assert row.endswith("killed by SIGTERM (timeout)")
    assert "-15" not in table

    hang = write_workflow(wfd_tmp, {"steps": [
        {"id": "hang", "command": "trap '' TERM; sleep 30 & wait; sleep 30",
         "kill_grace": 0.3}]}, name="hang.json")
    run_id = d.submit(hang)
    wait_until(lambda: run_json(d, run_id)["steps"]["hang"]["state"] == "RUNNING", 20)
    # let the shell set its trap before the cancel
    wait_until(lambda: run_json(d, run_id)["steps"]["hang"]["started_at"], 20)
    assert d.wfctl("cancel", run_id).returncode == 0
    status = run_json(d, run_id)
    step = status["steps"]["hang"]
    assert step["state"] == "CANCELLED"
    row = step_row(d.wfctl("status", run_id).stdout, "hang")
    assert row.endswith(f"killed by {step['exit_signal']} (cancel)"), row
    assert step["exit_signal"] in ("SIGTERM", "SIGKILL")


@pytest.mark.timeout(60)
def test_times_are_local_with_their_zone(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]})
    d = daemon()
    run_id = d.submit(wf)
    wait_for_state(d, run_id, *ENDED)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for tz, zone in (("UTC", "UTC"), ("Asia/Tokyo", "JST")):
        head = d.wfctl("status", run_id, env={"TZ": tz}).stdout.splitlines()[0]
        assert re.search(rf"created {stamp} {zone}  finished {stamp} {zone} \(ran ", head), head
        listing = d.wfctl("status", env={"TZ": tz}).stdout.splitlines()
        assert re.search(rf"{stamp} {zone}", listing[1]), listing


@pytest.mark.timeout(120)
def test_a_resumed_run_counts_running_time(daemon: Callable[..., Daemon],
                                           wfd_tmp: Path) -> None:
    flag = wfd_tmp / "fixed"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": f"test -e {flag}"}]})
    d = daemon()
    run_id = d.submit(wf)
    wait_for_state(d, run_id, *ENDED)
    # The run sits FAILED for a while; then it is fixed and resumed.
    first = run_json(d, run_id)
    flag.touch()
    time.sleep(3)  # time spent FAILED, which must not count (a wait for time itself)
    assert d.wfctl("resume", run_id).returncode == 0
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED"
    assert final["run_seconds"] < 2.5, final  # two quick `test` commands, not 3 s and more
    assert final["run_seconds"] >= first["run_seconds"]
    head = d.wfctl("status", run_id).stdout.splitlines()[0]
    took = re.search(r"\(ran (\d+\.\d)s\)", head)
    assert took and float(took.group(1)) < 2.5, head
    listing = d.wfctl("status").stdout
    row = next(line for line in listing.splitlines() if line.startswith(run_id))
    assert float(row.split()[-1].rstrip("s")) < 2.5, row
    # After a restart the run is known by its first and last events: same figure.
    d.restart()
    row = next(line for line in d.wfctl("status").stdout.splitlines()
               if line.startswith(run_id))
    assert float(row.split()[-1].rstrip("s")) < 2.5, row
    assert run_json(d)[0]["run_seconds"] == final["run_seconds"]


@pytest.mark.timeout(120)
def test_a_run_no_daemon_drives_says_so(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "long", "command": '[ "$WFD_ATTEMPT" -ge 2 ] || sleep 30', "kill_grace": 0.2}]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: run_json(d, run_id)["steps"]["long"]["state"] == "RUNNING", 20)
    assert d.wfctl("shutdown", "--stop-steps").returncode == 0
    assert d.proc.wait(30) == 0
    d.extra.append("--no-resume")
    d.start()
    status = run_json(d, run_id)
    assert status["state"] == "RUNNING" and status["waiting_for_resume"] is True
    listing = d.wfctl("status").stdout
    row = next(line for line in listing.splitlines() if line.startswith(run_id))
    assert "waiting for resume-all" in row and " RUNNING " not in row
    shown = [row.split()[-1]]
    head = d.wfctl("status", run_id).stdout.splitlines()[0]
    assert "waiting for resume-all" in head and f"wfctl resume {run_id}" in head
    # its duration does not grow while nobody drives it
    time.sleep(1.2)
    row = next(line for line in d.wfctl("status").stdout.splitlines()
               if line.startswith(run_id))
    assert row.split()[-1] == shown[0]
    assert d.wfctl("resume", run_id).returncode == 0
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED" and final["waiting_for_resume"] is False
