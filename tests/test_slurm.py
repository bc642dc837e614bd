"""Issue 17: steps on a real one-node Slurm cluster (tools/slurm-up), through the real
daemon, wfctl and Slurm's own commands. Skipped, with the reason, only when the cluster
cannot be installed or started."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, replay_events, run_json, wait_for_state, write_workflow
from slurmtest import active_jobs, cluster_or_skip, job_names, jobs_named

DUMP_ENV = ["python3", "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> None:
    cluster_or_skip()


@pytest.mark.timeout(180)
def test_mixed_dag_succeeds(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """Prove-it 1: local and Slurm steps in one DAG; the Slurm step's output in `wfctl
    logs`, its env the one a local step gets (marks, the workflow's variables)."""
    wf = write_workflow(wfd_tmp, {
        "env": {"FROM_WORKFLOW": "wf"},
        "steps": [
            {"id": "prep", "command": "echo local > prep.out"},
            {"id": "remote", "executor": "slurm", "depends_on": ["prep"],
             "env": {"FROM_STEP": "step"}, "slurm": {"partition": "debug", "time": 5},
             "command": [*DUMP_ENV[:2], DUMP_ENV[2] + "; print('hello from slurm');"
                         " print(open('prep.out').read().strip())", str(wfd_tmp / "env.json")]},
            {"id": "after", "depends_on": ["remote"], "command": "test -s env.json"},
        ],
    })
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait", env={"FROM_CLIENT": "client"}, timeout=150)
    assert done.returncode == 0, (done.stdout, done.stderr, d.log_text())
    run_id = done.stdout.strip()
    status = run_json(d, run_id)
    assert status["state"] == "SUCCEEDED"
    remote = status["steps"]["remote"]
    assert remote["executor"] == "slurm" and remote["job_id"]
    assert status["steps"]["prep"]["executor"] is None

    env = json.loads((wfd_tmp / "env.json").read_text())
    assert (env["WFD_RUN_ID"], env["WFD_STEP_ID"], env["WFD_ATTEMPT"]) == (run_id, "remote", "1")
    assert (env["FROM_WORKFLOW"], env["FROM_STEP"], env["FROM_CLIENT"]) == ("wf", "step",
                                                                            "client")
    assert not any(key.startswith("SLURM_") for key in env)  # exactly a local step's env

    logs = d.wfctl("logs", run_id, "remote")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == ["hello from slurm", "local"]

    events = replay_events(d, run_id)
    names = job_names(events)
    assert len(names) == 1
    assert [row[0] for row in jobs_named() if row[2] in names] == [remote["job_id"]]


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
