"""Simulated reboot (issue 4, test 3; issue 12: only a reboot interrupts an attempt).

A reboot takes the daemon, the keeper and every step process down at once.
Here: SIGKILL the daemon and the keeper, then SIGKILL every process proven to
be a step of our runs (by its `WFD_RUN_ID` mark), then start a new daemon on
the same state dir. It must resume every unfinished run; a RUNNING step's
attempt is lost and reruns as a new attempt without using up a retry (a
`retries: 0` step still succeeds); a SUCCEEDED step never reruns; a
RETRY_WAIT step keeps the retry time recorded in its log and is not retried
before it.

Also how the old processes of a lost attempt are found when they outlived
their keeper (the keeper SIGKILLed, its steps not): the recorded pid with the
same start time and boot id is killed even when it carries no marks, and left
alone when the log gives another boot or start time; after a crash before the
pid was recorded (the log has the claim only), the marks alone find the old
process before the next attempt runs. (Where each attempt has a cgroup leaf,
which alone would find it, the pid tests move the process out of it first.)
A crash of the daemon alone (its keeper alive) loses nothing: the same
attempt goes on.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

from wfd.events import parse_ts

RETRY_DELAY = 4.0  # long enough that the reboot lands inside the wait

STEP_PY = r"""
import os, sys, time
stamps, mode = sys.argv[1], sys.argv[2]
step, attempt = os.environ["WFD_STEP_ID"], int(os.environ["WFD_ATTEMPT"])

def stamp(kind):
    fd = os.open(stamps, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{kind} {os.environ['WFD_RUN_ID']} {step} {attempt} {time.time():.6f}\n"
             .encode())
    os.close(fd)

stamp("start")
if attempt == 1 and mode == "hang-first":
    time.sleep(1000)
if attempt == 1 and mode == "fail-first":
    sys.exit(3)
stamp("end")
"""


def step(root: Path, sid: str, mode: str, **extra: object) -> dict:
    return {"id": sid, "command": [sys.executable, "-I", "-S", str(root / "step.py"),
                                   str(root / "stamps.txt"), mode], **extra}


def stamps(root: Path) -> list[tuple[str, str, str, int, float]]:
    path = root / "stamps.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        kind, run_id, sid, attempt, when = line.split()
        rows.append((kind, run_id, sid, int(attempt), float(when)))
    return rows


def starts(root: Path, run_id: str, sid: str) -> list[tuple[int, float]]:
    return [(a, t) for k, r, s, a, t in stamps(root) if k == "start" and r == run_id and s == sid]


def events(d: Daemon, run_id: str) -> list[dict]:
    text = (d.state_dir / "runs" / run_id / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def marked(run_ids: set[str]) -> list[psutil.Process]:
    """Live processes proven to be steps of `run_ids` by their WFD_RUN_ID mark."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(
                    "WFD_RUN_ID") in run_ids:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def step_state(d: Daemon, run_id: str, sid: str) -> str:
    return run_json(d, run_id)["steps"][sid]["state"]


def test_reboot_resumes_runs_reruns_running_keeps_succeeded_and_retry_time(
        daemon, wfd_tmp: Path) -> None:
    (wfd_tmp / "step.py").write_text(STEP_PY)
    wf_a = write_workflow(wfd_tmp, {"name": "a", "steps": [
        step(wfd_tmp, "done", "quick"),
        step(wfd_tmp, "after_done", "quick", depends_on=["done"]),
        step(wfd_tmp, "hang", "hang-first", retries=0),
        step(wfd_tmp, "after_hang", "quick", depends_on=["hang"]),
        step(wfd_tmp, "retry", "fail-first", retries=1,
             backoff={"initial": RETRY_DELAY, "jitter": 0}),
    ]}, "a.json")
    wf_b = write_workflow(wfd_tmp, {"name": "b", "steps": [
        step(wfd_tmp, "hang", "hang-first"),
        step(wfd_tmp, "next", "quick", depends_on=["hang"]),
    ]}, "b.json")
    d = daemon()
    run_a, run_b = d.submit(wf_a), d.submit(wf_b)

    def settled() -> bool:
        a = run_json(d, run_a)["steps"]
        return (a["done"]["state"] == a["after_done"]["state"] == "SUCCEEDED"
                and a["retry"]["state"] == "RETRY_WAIT"
                and len(starts(wfd_tmp, run_a, "hang")) == 1
                and len(starts(wfd_tmp, run_b, "hang")) == 1)

    wait_until(settled, timeout=15, message="a SUCCEEDED, a RETRY_WAIT and two RUNNING steps")
    failed = [e for e in events(d, run_a) if e["type"] == "AttemptFailed"]
    assert len(failed) == 1 and failed[0]["step"] == "retry"
    retry_at = failed[0]["retry_at"]

    # The reboot: the daemon, the keeper and every step process die at once.
    d.kill()
    d.kill_keeper()
    victims = marked({run_a, run_b})
    assert len(victims) >= 2, victims  # both hanging leaders were still running
    for proc in victims:
        proc.send_signal(signal.SIGKILL)  # psutil refuses a reused pid
    psutil.wait_procs(victims, timeout=5)
    wait_until(lambda: not marked({run_a, run_b}), timeout=5, message="step processes gone")

    assert time.time() < parse_ts(retry_at) - 0.5, "the reboot came too late to test retry_at"
    d.start()
    a = wait_for_state(d, run_a, "SUCCEEDED", "FAILED", "CANCELLED", timeout=30)
    b = wait_for_state(d, run_b, "SUCCEEDED", "FAILED", "CANCELLED", timeout=30)
    assert a["state"] == "SUCCEEDED", a
    assert b["state"] == "SUCCEEDED", b

    # SUCCEEDED steps were not rerun.
    for sid in ("done", "after_done"):
        assert a["steps"][sid]["attempts"] == 1
        assert [n for n, _ in starts(wfd_tmp, run_a, sid)] == [1]
    # RUNNING steps' attempts were lost and reran as a new attempt; with retries 0 the
    # interruption used no retry.
    for run_id, status in ((run_a, a), (run_b, b)):
        assert status["steps"]["hang"]["attempts"] == 2
        assert [n for n, _ in starts(wfd_tmp, run_id, "hang")] == [1, 2]
        log = events(d, run_id)
        interrupted = [e for e in log if e["type"] == "AttemptInterrupted"]
        assert [(e["step"], e["attempt"]) for e in interrupted] == [("hang", 1)]
        assert interrupted[0]["reason"].startswith("attempt lost: "), interrupted
        assert not [e for e in log if e["type"] in ("AttemptFailed", "StepFailed")
                    and e["step"] == "hang"]
    # The RETRY_WAIT step kept its recorded time and was not retried before it.
    log = events(d, run_a)
    failed = [e for e in log if e["type"] == "AttemptFailed"]
    assert [(e["step"], e["attempt"], e["retry_at"]) for e in failed] == [
        ("retry", 1, retry_at)]
    due = [e for e in log if e["type"] == "RetryDue"]
    assert len(due) == 1 and parse_ts(due[0]["ts"]) >= parse_ts(retry_at)
    retry_starts = starts(wfd_tmp, run_a, "retry")
    assert [n for n, _ in retry_starts] == [1, 2]
    assert retry_starts[1][1] >= parse_ts(retry_at), (retry_starts, retry_at)
    assert a["steps"]["retry"]["attempts"] == 2


def rewrite_started(path: Path, field: str, change) -> None:
    """Change `field` of every AttemptStarted line of a log with `change(old value)`."""
    lines = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "AttemptStarted":
            event[field] = change(event[field])
        lines.append(json.dumps(event, separators=(",", ":")))
    path.write_text("".join(line + "\n" for line in lines))


def unmarked_leader_run(d: Daemon, root: Path) -> tuple[str, psutil.Process]:
    """A run whose leader execs into `sleep` with an empty environment: no marks, only
    its recorded pid and start time say it is the step's."""
    wf = write_workflow(root, {"name": "bare", "steps": [
        {"id": "bare", "command": ["env", "-i", "sleep", "1000"], "kill_grace": 0.5}]},
        "bare.json")
    run_id = d.submit(wf)

    def leader() -> psutil.Process | None:
        started = [e for e in events(d, run_id) if e["type"] == "AttemptStarted"]
        if not started:
            return None
        proc = psutil.Process(started[0]["pid"])
        return proc if proc.name() == "sleep" else None  # env has exec'd sleep

    proc = wait_until(leader, timeout=10, message="the step to exec sleep")
    assert "WFD_RUN_ID" not in proc.environ()
    return run_id, proc


def cgroup_v2(pid: int | str) -> str | None:
    """The cgroup v2 path of a process ("0::/path" in /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def leave_its_cgroup(proc: psutil.Process) -> None:
    """Move `proc` out of its attempt's cgroup leaf (where the keeper could make one) into
    this test's own cgroup: a stranger that took a step's pid is in no leaf of wfd's."""
    mine, its = cgroup_v2("self"), cgroup_v2(proc.pid)
    if mine is None or its == mine:
        return  # no leaf per attempt here
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            mount = Path(left.split()[4])
            (mount / mine.lstrip("/") / "cgroup.procs").write_text(str(proc.pid))
            assert cgroup_v2(proc.pid) == mine
            return
    raise AssertionError("a cgroup v2 path but no cgroup2 mount")


def test_recorded_leader_without_marks_is_killed_after_its_keeper_died(
        daemon, wfd_tmp: Path) -> None:
    d = daemon()
    run_id, proc = unmarked_leader_run(d, wfd_tmp)
    d.kill()
    d.kill_keeper()  # its attempt is lost; the leader outlives it
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    leave_its_cgroup(proc)  # so that only its recorded pid and start time name it
    d.start()
    wait_until(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE,
               timeout=10, message="the recorded leader to be killed")
    wait_until(lambda: run_json(d, run_id)["steps"]["bare"]["attempts"] == 2, timeout=10)
    d.wfctl("cancel", run_id)


@pytest.mark.parametrize("field", ["boot_id", "start_time"])
def test_recorded_pid_of_another_process_is_left_alone(daemon, wfd_tmp: Path,
                                                       field: str) -> None:
    """The recorded pid alone proves nothing: with another boot (after a reboot) or
    another start time (the pid was reused), the process there is a stranger."""
    d = daemon()
    run_id, proc = unmarked_leader_run(d, wfd_tmp)
    d.kill()
    d.kill_keeper()  # its attempt is lost; the leader outlives it
    # Here the stranger is the same process (without any mark, out of the attempt's cgroup
    # leaf); the log says otherwise.
    leave_its_cgroup(proc)
    change = {"boot_id": lambda _: "00000000-dead-beef", "start_time": lambda t: t - 10.0}
    rewrite_started(d.state_dir / "runs" / run_id / "events.jsonl", field, change[field])
    d.start()
    wait_until(lambda: run_json(d, run_id)["steps"]["bare"]["attempts"] == 2, timeout=10)
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, (
        f"a process known only by a pid whose {field} does not match was killed")
    d.wfctl("cancel", run_id)
    proc.kill()  # ours: we saw it exec'd as the step's leader
    proc.wait(5)


LOCKED_PY = r"""
import fcntl, os, sys, time
lock = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("OVERLAP: the previous attempt still runs", flush=True)
    sys.exit(1)
if os.environ["WFD_ATTEMPT"] == "1":
    while not os.path.exists(sys.argv[1] + ".go"):
        time.sleep(0.02)
"""


@pytest.mark.parametrize("keeper", ["killed", "alive"])
def test_crash_before_the_pid_was_recorded(daemon, wfd_tmp: Path, keeper: str) -> None:
    """A crash after the spawn but before `AttemptStarted` was durable: the log has the
    claim only. With the keeper killed too, the attempt is lost and the marks alone must
    find the old process before attempt 2 runs; with the keeper alive, the same attempt
    goes on and its end is recorded, with no second attempt."""
    (wfd_tmp / "locked.py").write_text(LOCKED_PY)
    wf = write_workflow(wfd_tmp, {"name": "locked", "steps": [{
        "id": "locked", "command": [sys.executable, "-I", "-S", str(wfd_tmp / "locked.py"),
                                    str(wfd_tmp / "lock")], "kill_grace": 0.5}]}, "locked.json")
    d = daemon()
    run_id = d.submit(wf)
    path = d.state_dir / "runs" / run_id / "events.jsonl"
    wait_until(lambda: b'"AttemptStarted"' in path.read_bytes(), timeout=10)
    d.kill()
    if keeper == "killed":
        d.kill_keeper()
    old = marked({run_id})
    assert len(old) == 1
    lines = path.read_bytes().splitlines(keepends=True)
    assert b'"AttemptStarted"' in lines[-1]
    path.write_bytes(b"".join(lines[:-1]))  # as if the crash came just before it
    d.start()
    if keeper == "alive":
        assert run_json(d, run_id)["steps"]["locked"]["state"] == "RUNNING"
        (wfd_tmp / "lock.go").touch()
    status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", timeout=15)
    assert status["state"] == "SUCCEEDED", (status, d.wfctl("logs", run_id, "locked").stdout)
    assert status["steps"]["locked"]["attempts"] == (2 if keeper == "killed" else 1)
    assert not [p for p in old if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    ends = [e for e in events(d, run_id) if e["type"] in ("AttemptSucceeded", "AttemptFailed",
                                                          "AttemptInterrupted")]
    assert [e["attempt"] for e in ends] == ([1, 2] if keeper == "killed" else [1])
