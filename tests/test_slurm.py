"""Issue 17: steps on a real one-node Slurm cluster (tools/slurm-up), through the real
daemon, wfctl and Slurm's own commands. Skipped, with the reason, only when the cluster
cannot be installed or started."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    Daemon,
    pid_gone,
    pids_in,
    replay_events,
    run_json,
    wait_for_state,
    wait_until,
    write_workflow,
)
from slurmtest import SLURM_UP, active_jobs, cluster_or_skip, job_names, jobs_named

from wfd.events import parse_ts

DUMP_ENV = ["python3", "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> None:
    cluster_or_skip()


@pytest.mark.timeout(180)
def test_mixed_dag_succeeds(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """Prove-it 1: local and Slurm steps in one DAG; the Slurm step's output in `wfctl
    logs`, its env the one a local step gets (marks, the workflow's variables); its
    $WFD_OUTPUT reaches the steps downstream, as a local step's does."""
    wf = write_workflow(wfd_tmp, {
        "env": {"FROM_WORKFLOW": "wf"},
        "steps": [
            {"id": "prep", "command": "echo local > prep.out"},
            {"id": "remote", "executor": "slurm", "depends_on": ["prep"],
             "env": {"FROM_STEP": "step"}, "slurm": {"partition": "debug", "time": 5},
             "command": [*DUMP_ENV[:2], DUMP_ENV[2] + "; print('hello from slurm');"
                         " print(open('prep.out').read().strip())", str(wfd_tmp / "env.json")]},
            {"id": "emit", "executor": "slurm", "depends_on": ["prep"],
             "command": 'echo GREETING=hi >> "$WFD_OUTPUT"'},
            {"id": "after", "depends_on": ["remote", "emit"],
             "command": 'test -s env.json && [ "$WFD_OUT_emit_GREETING" = hi ]'},
        ],
    })
    d = daemon()
    done = d.wfctl("run", str(wf), "FROM_VARS=var", "--wait", env={"FROM_CLIENT": "client"},
                   timeout=150)
    assert done.returncode == 0, (done.stdout, done.stderr, d.log_text())
    run_id = done.stdout.strip()
    status = run_json(d, run_id)
    assert status["state"] == "SUCCEEDED"
    remote = status["steps"]["remote"]
    assert remote["executor"] == "slurm" and remote["job_id"]
    assert status["steps"]["prep"]["executor"] is None

    env = json.loads((wfd_tmp / "env.json").read_text())
    assert (env["WFD_RUN_ID"], env["WFD_STEP_ID"], env["WFD_ATTEMPT"]) == (run_id, "remote", "1")
    assert (env["FROM_WORKFLOW"], env["FROM_STEP"], env["FROM_CLIENT"], env["FROM_VARS"]) == (
        "wf", "step", "client", "var")
    assert not any(key.startswith("SLURM_") for key in env)  # exactly a local step's env

    plain = d.wfctl("status", run_id).stdout
    header = next(line for line in plain.splitlines() if line.startswith("STEP"))
    assert header.split()[-2:] == ["JOB", "ERROR"], plain
    assert f"slurm {remote['job_id']}" in plain, plain

    logs = d.wfctl("logs", run_id, "remote")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == ["hello from slurm", "local"]

    events = replay_events(d, run_id)
    names = job_names(events)
    assert len(names) == 2  # remote and emit, one job each
    ids = {row[0] for row in jobs_named() if row[2] in names}
    assert ids == {remote["job_id"], status["steps"]["emit"]["job_id"]}
    assert status["steps"]["emit"]["outputs"] == {"GREETING": "hi"}


@pytest.mark.timeout(120)
def test_bad_partition_fails_with_slurms_message(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    """Prove-it 7."""
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "command": "true", "executor": "slurm", "slurm": {"partition": "nope"}}]})
    d = daemon()
    run_id = d.submit(wf)
    status = wait_for_state(d, run_id, "FAILED", timeout=60)
    error = status["steps"]["s"]["error"]
    assert error == ("cannot start: sbatch: error: Batch job submission failed: "
                     "Invalid partition name specified"), error
    plain = d.wfctl("status", run_id)
    assert "Invalid partition name specified" in plain.stdout
    assert not active_jobs(job_names(replay_events(d, run_id)))


def ends_of(events: list[dict], step: str, attempt: int) -> list[str]:
    ends = ("AttemptSucceeded", "AttemptFailed", "StepFailed", "AttemptInterrupted",
            "StepCancelled")
    return [e["type"] for e in events if e["type"] in ends and e.get("step") == step
            and e.get("attempt") == attempt]


def job_running(d: Daemon, run_id: str, step: str) -> str:
    """Wait until the step's job runs on the node; its id."""
    def running() -> str | None:
        job_id = run_json(d, run_id)["steps"][step]["job_id"]
        rows = [row for row in jobs_named() if row[0] == job_id]
        return job_id if job_id and rows and rows[0][1] == "RUNNING" else None

    return wait_until(running, 60, interval=0.2, message=f"{step}'s job to run")


@pytest.mark.timeout(180)
def test_retries_and_timeout(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """Prove-it 2: a retry through Slurm as for a local step; a timed-out job is gone from
    squeue, and so is what it started."""
    wf = write_workflow(wfd_tmp, {"defaults": {"executor": "slurm"}, "steps": [
        {"id": "flaky", "command": '[ "$WFD_ATTEMPT" = 2 ]', "retries": 2,
         "backoff": {"initial": 0.1}},
        {"id": "slow", "timeout": 3, "kill_grace": 1,
         "command": f"sleep 300 & echo $! >> {wfd_tmp / 'pids'}; echo $$ >> "
                    f"{wfd_tmp / 'pids'}; wait"},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(wfd_tmp / "pids", 2)
    status = wait_for_state(d, run_id, "FAILED", timeout=120)
    assert status["steps"]["flaky"]["state"] == "SUCCEEDED"
    assert status["steps"]["flaky"]["attempts"] == 2
    slow = status["steps"]["slow"]
    assert (slow["state"], slow["error"]) == ("FAILED", "timed out after 3 s"), slow
    assert all(pid_gone(pid) for pid in pids)
    events = replay_events(d, run_id)
    assert not active_jobs(job_names(events))
    assert len(job_names(events)) == 3  # one job per attempt: flaky twice, slow once


@pytest.mark.timeout(180)
def test_daemon_killed_while_a_job_runs(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """Prove-it 3: kill -9 of the daemon while a Slurm step runs, restart: one sbatch for
    the attempt, its outcome recorded once."""
    go = wfd_tmp / "go"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm",
         "command": f"while [ ! -e {go} ]; do sleep 0.1; done; echo done"}]})
    d = daemon()
    run_id = d.submit(wf)
    job_running(d, run_id, "s")
    d.kill()
    d.start()
    go.touch()
    status = wait_for_state(d, run_id, "SUCCEEDED", timeout=90)
    events = replay_events(d, run_id)
    names = job_names(events)
    assert len(names) == 1
    assert len([row for row in jobs_named() if row[2] in names]) == 1
    assert ends_of(events, "s", 1) == ["AttemptSucceeded"]
    assert status["steps"]["s"]["attempts"] == 1


@pytest.mark.timeout(240)
def test_daemon_killed_between_intent_and_job_id(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    """Prove-it 4: the daemon dies after sbatch accepted the job, before its id is
    recorded; the next daemon finds the job by name and submits nothing."""
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm", "command": "sleep 2; echo once >> runs.txt"}]})
    d = daemon(env={"WFD_FAULTS": "slurm-submitted=kill"})
    done = d.wfctl("run", str(wf))
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    wait_until(lambda: not d.running, 60, message="the fault to kill the daemon")
    lines = (d.state_dir / "runs" / run_id / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["type"] == "AttemptSubmitting", lines  # no job id
    d.env.pop("WFD_FAULTS")
    d.start()
    status = wait_for_state(d, run_id, "SUCCEEDED", timeout=120)
    names = job_names(replay_events(d, run_id))
    rows = [row for row in jobs_named() if row[2] in names]
    assert len(names) == 1 and len(rows) == 1, rows
    assert status["steps"]["s"]["job_id"] == rows[0][0]
    assert (wfd_tmp / "runs.txt").read_text() == "once\n"


@pytest.mark.timeout(180)
def test_cancel_ends_the_job_and_what_it_started(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    """Prove-it 5: `wfctl cancel` ends the job and everything it started; nothing is
    left in squeue. The step's kill_grace is honoured inside the job (its TERM trap runs)."""
    pids = wfd_tmp / "pids"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm", "kill_grace": 10,
         "command": f"trap 'echo got TERM; exit 7' TERM; sleep 300 & echo $! >> {pids}; "
                    f"echo $$ >> {pids}; wait"}]})
    d = daemon()
    run_id = d.submit(wf)
    started = pids_in(pids, 2)
    job_running(d, run_id, "s")
    done = d.wfctl("cancel", run_id, timeout=90)
    assert done.returncode == 0, done.stderr
    status = run_json(d, run_id)
    assert (status["state"], status["steps"]["s"]["state"]) == ("CANCELLED", "CANCELLED")
    assert all(pid_gone(pid) for pid in started)
    assert not active_jobs(job_names(replay_events(d, run_id)))
    assert "got TERM" in d.wfctl("logs", run_id, "s").stdout


@pytest.mark.timeout(240)
def test_controller_down_means_waiting(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """Prove-it 6: slurmctld stopped while a step runs and started again: the run goes on;
    `status` meanwhile says the controller is unreachable."""
    go = wfd_tmp / "go"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm",
         "command": f"while [ ! -e {go} ]; do sleep 0.1; done"},
        {"id": "t", "executor": "slurm", "depends_on": ["s"], "command": "true"}]})
    d = daemon()
    run_id = d.submit(wf)
    job_running(d, run_id, "s")
    subprocess.run([str(SLURM_UP), "stop", "ctld"], check=True, timeout=60)
    try:
        def says_unreachable() -> dict | None:
            status = run_json(d, run_id)
            return status if "controller unreachable" in (status["error"] or "") else None

        status = wait_until(says_unreachable, 60, interval=0.2,
                            message="status to say the controller is unreachable")
        assert status["state"] == "RUNNING" and status["steps"]["s"]["state"] == "RUNNING"
        plain = d.wfctl("status", run_id)
        assert "controller unreachable" in plain.stdout + plain.stderr
    finally:
        subprocess.run([str(SLURM_UP)], check=True, timeout=120)
    go.touch()
    status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", timeout=120)
    assert status["state"] == "SUCCEEDED", status
    assert status["error"] is None


@pytest.mark.timeout(120)
def test_logs_follow_a_slurm_step(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """`wfctl logs --follow` streams a Slurm step's output as the job writes it, and ends
    with the step."""
    go = wfd_tmp / "go"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm",
         "command": f"echo first; while [ ! -e {go} ]; do sleep 0.1; done; echo second"}]})
    d = daemon()
    run_id = d.submit(wf)
    follower = d.popen("logs", run_id, "s", "--follow", stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "first\n"  # while the job still runs
        assert run_json(d, run_id)["steps"]["s"]["state"] == "RUNNING"
        go.touch()
        rest, _ = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert rest == "second\n" and follower.returncode == 0
    assert wait_for_state(d, run_id, "SUCCEEDED")["steps"]["s"]["job_id"]


@pytest.mark.timeout(180)
def test_a_job_gone_without_its_record_is_lost(daemon: Callable[..., Daemon],
                                               wfd_tmp: Path) -> None:
    """A job that ends without writing its exit record (here: a directory is in the
    record's place, as when the node cannot write the state dir) is lost and follows
    on_lost: "rerun" runs it again; "fail" fails the step, saying why."""
    d = daemon(start=False)
    block = (f'mkdir "{d.state_dir}/runs/$WFD_RUN_ID/logs/$WFD_STEP_ID.$WFD_ATTEMPT.exit"')
    wf = write_workflow(wfd_tmp, {"defaults": {"executor": "slurm"}, "steps": [
        {"id": "again", "command": f'[ "$WFD_ATTEMPT" = 2 ] || {block}'},
        {"id": "fails", "command": block, "on_lost": "fail"}]})
    d.start()
    run_id = d.submit(wf)
    status = wait_for_state(d, run_id, "FAILED", timeout=90)
    again, fails = status["steps"]["again"], status["steps"]["fails"]
    assert (again["state"], again["attempts"]) == ("SUCCEEDED", 2), again
    assert fails["state"] == "FAILED"
    assert fails["error"].startswith(f"attempt lost: Slurm job {fails['job_id']} ended "), fails
    assert fails["error"].endswith("without an exit record (is the state dir shared with the "
                                   "nodes?)")
    events = replay_events(d, run_id)
    assert ends_of(events, "again", 1) == ["AttemptInterrupted"]
    assert not active_jobs(job_names(events))
    assert "cannot write the exit record" in d.wfctl("logs", run_id, "fails").stdout


@pytest.mark.timeout(180)
def test_shutdown_stop_steps_ends_the_jobs(daemon: Callable[..., Daemon],
                                           wfd_tmp: Path) -> None:
    """`wfctl shutdown --stop-steps` ends Slurm jobs as it ends local steps (interrupted);
    a plain stop leaves them to the next daemon."""
    go = wfd_tmp / "go"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm",
         "command": f"while [ ! -e {go} ]; do sleep 0.1; done"}]})
    d = daemon()
    run_id = d.submit(wf)
    job_running(d, run_id, "s")
    d.stop(keep_steps=True)  # SIGTERM: the job goes on
    assert active_jobs(job_names(replay_events_offline(d, run_id)))
    d.start()
    job_running(d, run_id, "s")
    d.stop()  # shutdown --stop-steps
    events = replay_events_offline(d, run_id)
    assert ends_of(events, "s", 1) == ["AttemptInterrupted"]
    assert not active_jobs(job_names(events))


def replay_events_offline(d: Daemon, run_id: str) -> list[dict]:
    """The run's events from its log file, with no daemon to ask."""
    text = (d.state_dir / "runs" / run_id / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.timeout(300)
def test_daemon_killed_after_the_intent_before_sbatch(daemon: Callable[..., Daemon],
                                                      wfd_tmp: Path) -> None:
    """The daemon dies once the intent is durable, before sbatch: the next daemon finds no
    job by the name, waits out RESUBMIT_AFTER from the intent (a dead daemon's sbatch could
    still get through), then submits it, once. The wait is shortened to keep the suite
    short; test_slurm_submit checks the default."""
    wait = 8.0
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm", "command": "echo once >> runs.txt"}]})
    d = daemon(env={"WFD_FAULTS": "slurm-intent=kill"})
    done = d.wfctl("run", str(wf))
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    wait_until(lambda: not d.running, 60, message="the fault to kill the daemon")
    names = job_names(replay_events_offline(d, run_id))
    assert len(names) == 1 and not [row for row in jobs_named() if row[2] in names]
    d.env.pop("WFD_FAULTS")
    d.extra = [*d.extra, "--slurm-resubmit-after", str(wait)]
    d.start()
    status = wait_for_state(d, run_id, "SUCCEEDED", timeout=wait + 120)
    rows = [row for row in jobs_named() if row[2] in names]
    assert len(rows) == 1 and status["steps"]["s"]["job_id"] == rows[0][0], rows
    assert (wfd_tmp / "runs.txt").read_text() == "once\n"
    events = replay_events(d, run_id)
    intent = next(e for e in events if e["type"] == "AttemptSubmitting")
    submitted = next(e for e in events if e["type"] == "AttemptSubmitted")
    waited = parse_ts(submitted["ts"]) - parse_ts(intent["ts"])
    assert waited >= wait, waited



@pytest.mark.timeout(180)
def test_a_job_squeue_no_longer_shows_asks_sacct(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    """A job squeue no longer shows by its name (here: renamed behind wfd's back) and with
    no exit record: sacct is asked; without accounting (this cluster) it cannot say, so
    the attempt is lost."""
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm", "command": "sleep 300", "on_lost": "fail"}]})
    d = daemon()
    run_id = d.submit(wf)
    job_id = job_running(d, run_id, "s")
    try:
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "name=renamed"], check=True,
                       timeout=30)
        status = wait_for_state(d, run_id, "FAILED", timeout=60)
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    assert status["steps"]["s"]["error"] == (
        f"attempt lost: Slurm job {job_id} ended (gone from the queue) without an exit "
        "record (is the state dir shared with the nodes?)")
    wait_until(lambda: not active_jobs({"renamed"}), 30, message="the renamed job to end")


@pytest.mark.timeout(120)
def test_cancel_of_a_pending_job_is_at_once(daemon: Callable[..., Daemon],
                                            wfd_tmp: Path) -> None:
    """A job still pending (held here) has no batch shell to signal: cancel ends it at once,
    not after the step's kill_grace."""
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "executor": "slurm", "kill_grace": 60, "command": "true",
         "slurm": {"extra": ["--hold"]}}]})
    d = daemon()
    run_id = d.submit(wf)
    job_id = wait_until(lambda: run_json(d, run_id)["steps"]["s"]["job_id"], 60, interval=0.2,
                        message="the job id")
    assert [row[1] for row in jobs_named() if row[0] == job_id] == ["PENDING"]
    started = time.monotonic()
    done = d.wfctl("cancel", run_id, timeout=90)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30  # well under kill_grace
    assert run_json(d, run_id)["steps"]["s"]["state"] == "CANCELLED"
    assert [row[1] for row in jobs_named() if row[0] == job_id] == ["CANCELLED"]
