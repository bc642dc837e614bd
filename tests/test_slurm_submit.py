"""Issue 17 without a cluster: what wfd tells sbatch and the job, and the clear refusals
(a system-mode daemon, no sbatch on wfd's PATH) through the real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
import pytest
from helpers import REPO, Daemon, wait_until, write_workflow

from wfd.executor import AttemptKey, AttemptSpec
from wfd.slurm import job_script, one_line, record_path, sbatch_argv
from wfd.slurmjob import JobSpec
from wfd.workflow import SlurmOptions


def spec(**kwargs) -> AttemptSpec:
    fields = dict(key=AttemptKey("r", "s", 2), argv=["true"], env={}, cwd="/data",
                  log_fd=-1, umask=0o22, kill_grace=5.0, executor="slurm")
    fields.update(kwargs)
    return AttemptSpec(**fields)  # type: ignore[arg-type]


def test_sbatch_options() -> None:
    argv = sbatch_argv(spec(slurm=SlurmOptions(partition="gpu", cpus=4, mem="4G",
                                               extra=("--qos=low",))), "/st/s.2.log", "abc")
    assert argv == ["sbatch", "--parsable", "--no-requeue", "--job-name=wfd-abc",
                    "--chdir=/data", "--export=NONE", "--output=/st/s.2.log",
                    "--error=/st/s.2.log", "--open-mode=append", "--partition=gpu",
                    "--cpus-per-task=4", "--mem=4G", "--qos=low"]


def test_time_limit_is_a_backstop_past_timeout_and_grace() -> None:
    # 100 s + 5 s grace: two minutes, and one more so the supervisor's own kill comes first
    assert "--time=3" in sbatch_argv(spec(timeout=100.0), "/l.log", "t")
    assert "--time=1-00" in sbatch_argv(spec(timeout=100.0, slurm=SlurmOptions(time="1-00")),
                                        "/l.log", "t")
    assert not any(a.startswith("--time") for a in sbatch_argv(spec(), "/l.log", "t"))


def test_record_sits_next_to_the_log() -> None:
    assert record_path("/st/runs/r/logs/s.2.log") == "/st/runs/r/logs/s.2.exit"


def test_one_line_is_slurms_last_word() -> None:
    err = (b"sbatch: error: invalid partition specified: nope\n"
           b"sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    assert one_line(err, "x") == ("sbatch: error: Batch job submission failed: "
                                  "Invalid partition name specified")
    assert one_line(b"\n", "fallback") == "fallback"


def test_job_script_feeds_the_supervisor_exactly_the_attempt(tmp_path: Path) -> None:
    """The script, run by sh as Slurm would, hands the supervisor the spec unchanged,
    also an env value with quotes, newlines and the here-document's end marker."""
    tricky = "a'b\"c\nWFD_ATTEMPT_SPEC_END\n$(touch nope)"
    job = JobSpec(run_id="r", step="s", attempt=1, argv=["/bin/sh", "-c", "printf %s \"$X\""],
                  env={"X": tricky, "PATH": "/usr/bin:/bin"}, cwd=str(tmp_path), umask=0o22,
                  kill_grace=1.0, log=str(tmp_path / "s.1.log"),
                  record=str(tmp_path / "s.1.exit"))
    script = tmp_path / "job.sh"
    script.write_text(job_script(job))
    done = subprocess.run(["/bin/sh", str(script)], cwd=tmp_path, timeout=60,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "s.1.log").read_text() == tricky
    record = json.loads((tmp_path / "s.1.exit").read_text())
    assert (record["exit_code"], record["why"], record["error"]) == (0, "exited", None)
    assert not (tmp_path / "nope").exists()
    assert msgspec.json.decode(job_script(job).splitlines()[3], type=JobSpec) == job


@pytest.mark.timeout(60)
def test_supervisor_timeout_and_sigterm(tmp_path: Path) -> None:
    """The supervisor enforces the timeout itself; SIGTERM gives the step its grace."""
    def job(name: str, command: str, timeout: float | None) -> subprocess.Popen:
        spec = JobSpec(run_id="r", step=name, attempt=1, argv=["/bin/sh", "-c", command],
                       env={"PATH": "/usr/bin:/bin", "WFD_RUN_ID": "r", "WFD_STEP_ID": name,
                            "WFD_ATTEMPT": "1"},
                       cwd=str(tmp_path), umask=0o22, kill_grace=5.0, timeout=timeout,
                       log=str(tmp_path / f"{name}.log"), record=str(tmp_path / f"{name}.exit"))
        proc = subprocess.Popen([sys.executable, "-m", "wfd.slurmjob"], stdin=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdin is not None
        proc.stdin.write(msgspec.json.encode(spec) + b"\n")
        proc.stdin.close()
        return proc

    slow = job("slow", "sleep 60", timeout=0.5)
    trap = job("trap", "trap 'echo got TERM; exit 3' TERM; echo up; sleep 60 & wait", None)
    log = tmp_path / "trap.log"
    wait_until(lambda: log.exists() and "up" in log.read_text(), 20, message="the step to run")
    trap.terminate()
    assert slow.wait(30) == 0 and trap.wait(30) == 0
    slow_record = json.loads((tmp_path / "slow.exit").read_text())
    assert (slow_record["why"], slow_record["exit_code"]) == ("timeout", -15)
    trap_record = json.loads((tmp_path / "trap.exit").read_text())
    assert (trap_record["why"], trap_record["exit_code"]) == ("terminated", 3)
    assert (tmp_path / "trap.log").read_text() == "up\ngot TERM\n"


@pytest.mark.timeout(60)
def test_a_sigterm_to_the_whole_tree_is_the_daemons_kill(tmp_path: Path) -> None:
    """Slurm signals the batch step's whole tree: the step may die of the SIGTERM before
    the supervisor's handler runs; the record must still say "terminated" (the daemon's
    kill, whose reason it knows), not an exit of its own."""
    spec = JobSpec(run_id="r", step="s", attempt=1, argv=["/bin/sh", "-c", "echo up; sleep 60"],
                   env={"PATH": "/usr/bin:/bin", "WFD_RUN_ID": "r", "WFD_STEP_ID": "s",
                        "WFD_ATTEMPT": "1"},
                   cwd=str(tmp_path), umask=0o22, kill_grace=5.0,
                   log=str(tmp_path / "s.log"), record=str(tmp_path / "s.exit"))
    proc = subprocess.Popen([sys.executable, "-m", "wfd.slurmjob"], stdin=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdin is not None
    proc.stdin.write(msgspec.json.encode(spec) + b"\n")
    proc.stdin.close()
    log = tmp_path / "s.log"
    wait_until(lambda: log.exists() and "up" in log.read_text(), 20, message="the step to run")
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree
    for child in tree:  # the step first, as a racing delivery may order it
        child.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    record = json.loads((tmp_path / "s.exit").read_text())
    assert (record["why"], record["exit_code"]) == ("terminated", -15)


SLURM_WF = {"steps": [{"id": "s", "command": "true", "executor": "slurm"}]}


@pytest.mark.timeout(60)
def test_no_sbatch_is_refused_at_submit(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, SLURM_WF)
    d = daemon(env={"PATH": str(wfd_tmp / "empty")})
    done = d.wfctl("run", str(wf))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr == ("wfctl: this workflow has Slurm steps, but sbatch is not on wfd's "
                           "PATH (install the Slurm client commands)\n")
    assert d.wfctl("status", "--json").stdout.count("run_id") == 0


@pytest.mark.timeout(60)
def test_a_system_daemon_refuses_slurm_steps(daemon: Callable[..., Daemon],
                                              wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, SLURM_WF)
    d = daemon(extra=["--system"])
    done = d.wfctl("run", str(wf))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr == ("wfctl: Slurm steps need a wfd in user mode (its state dir shared "
                           "with the nodes, docs/slurm.md); this one runs in system mode\n")


def test_the_resubmit_wait_defaults_to_slurm_resubmit_after() -> None:
    from wfd.daemon import parse_args
    from wfd.slurm import RESUBMIT_AFTER, SlurmExecutor

    assert RESUBMIT_AFTER == 90.0
    assert parse_args([]).slurm_resubmit_after == RESUBMIT_AFTER
    assert parse_args(["--slurm-resubmit-after", "5"]).slurm_resubmit_after == 5.0
    noop = lambda *_: None  # noqa: E731
    assert SlurmExecutor(noop, noop, noop, noop).resubmit_after == RESUBMIT_AFTER
