"""The daemon itself, `wfd`: lock, socket, signals, restart, shutdown, version, log
lines (SPEC 4; SPEC 3 recovery basics; SPEC 5 `shutdown`, `--version`)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    Daemon,
    base_env,
    hello,
    pid_gone,
    pids_in,
    replay_events,
    run_json,
    run_wfctl,
    wait_for_state,
    wait_until,
    write_workflow,
)

import wfd

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")

# Writes the pids of a small tree (one descendant ignoring SIGTERM) and, on its first
# attempt, waits; a later attempt succeeds at once.
TREE = """
echo "$WFD_ATTEMPT" >> {tries}
if [ "$WFD_ATTEMPT" -ge 2 ]; then exit 0; fi
echo $$ >> {pids}
sleep 60 & echo $! >> {pids}
setsid sh -c 'echo $$ >> {pids}; exec sleep 60' &
sh -c 'trap "" TERM; echo $$ >> {pids}; sleep 60' &
sleep 60
"""
TREE_PIDS = 4





def tree_workflow(wfd_tmp: Path, name: str = "wf.json") -> tuple[Path, Path, Path]:
    """A run of `counted` (appends to a counter, succeeds) then `tree` (TREE, retries 0)."""
    pids, tries, counter = wfd_tmp / "pids", wfd_tmp / "tries", wfd_tmp / "counter"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "counted", "command": f"echo x >> {counter}"},
        {"id": "tree", "command": TREE.format(pids=pids, tries=tries), "retries": 0,
         "kill_grace": 0.3, "depends_on": ["counted"]},
    ]}, name)
    return wf, pids, counter


# ---- one daemon per state dir, sockets ------------------------------------------------------


def test_second_daemon_on_the_same_state_dir(daemon: Callable[..., Daemon],
                                             wfd_tmp: Path) -> None:
    first = daemon()
    second = daemon(name="second", state_dir=first.state_dir, start=False)
    second.start(wait=False)
    assert second.proc.wait(30) != 0
    text = second.log_path.read_text()
    assert "another wfd" in text and str(first.state_dir) in text, text
    assert "Traceback" not in text
    assert not second.socket.exists()
    assert first.running and hello(first.socket) is not None


def test_stale_socket_is_replaced(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    path = wfd_tmp / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file nobody listens on, as after a crash
    dead.close()
    assert path.exists()
    d = daemon(socket=path)
    reply = hello(path)
    assert reply is not None and reply.pid == d.proc.pid
    run_id = d.submit(write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}),
                      "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"


def test_live_socket_is_not_taken_over(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    first = daemon()
    other = daemon(name="other", socket=first.socket, start=False)
    other.start(wait=False)
    assert other.proc.wait(30) != 0
    text = other.log_path.read_text()
    assert str(first.socket) in text and "Traceback" not in text, text
    reply = hello(first.socket)
    assert reply is not None and reply.pid == first.proc.pid


def test_socket_is_private(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon(socket=wfd_tmp / "sockdir" / "wfd.sock")
    assert (d.socket.stat().st_mode & 0o777) == 0o600
    assert (d.socket.parent.stat().st_mode & 0o777) == 0o700
    assert (d.state_dir.stat().st_mode & 0o777) == 0o700


# ---- stopping and restarting ---------------------------------------------------------------


def interrupted_once(d: Daemon, run_id: str, reason: str) -> list[dict]:
    """The run's log, which must hold one AttemptInterrupted, of `tree` attempt 1, for
    `reason` (or a reason starting with it) before attempt 2 was claimed."""
    events = replay_events(d, run_id)
    [interrupted] = [e for e in events if e["type"] == "AttemptInterrupted"]
    assert (interrupted["step"], interrupted["attempt"]) == ("tree", 1), interrupted
    assert interrupted["reason"].startswith(reason), interrupted
    [claim2] = [e for e in events if e["type"] == "AttemptClaimed" and e["attempt"] == 2]
    assert interrupted["seq"] < claim2["seq"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    return events


def cancel_the_same_attempt(d: Daemon, run_id: str, pids: list[int], wfd_tmp: Path) -> None:
    """The next daemon re-attached `tree` attempt 1, whose tree still runs: a cancel kills
    it, and no other attempt ever ran."""
    status = run_json(d, run_id)
    assert status["steps"]["tree"]["state"] == "RUNNING", status
    assert status["steps"]["tree"]["attempts"] == 1, status
    assert [p for p in pids if pid_gone(p)] == []
    done = d.wfctl("cancel", run_id)
    assert done.returncode == 0, done.stderr
    assert [p for p in pids if not pid_gone(p)] == []
    assert run_json(d, run_id)["state"] == "CANCELLED"
    assert (wfd_tmp / "tries").read_text().split() == ["1"]


def test_sigterm_leaves_steps_running_and_the_next_daemon_re_attaches(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf, pids_file, counter = tree_workflow(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(pids_file, TREE_PIDS)
    assert d.stop(keep_steps=True) == 0
    assert [p for p in pids if pid_gone(p)] == []  # the steps go on under the keeper
    assert not d.socket.exists()
    events = [json.loads(line) for line in
              (d.state_dir / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["type"] == "AttemptInterrupted"]
    assert "stopping" in d.log_text()
    d.start()
    cancel_the_same_attempt(d, run_id, pids, wfd_tmp)
    assert counter.read_text() == "x\n"  # SUCCEEDED steps are not rerun


def test_shutdown_stop_steps_kills_trees_and_the_step_reruns_without_using_a_retry(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf, pids_file, counter = tree_workflow(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(pids_file, TREE_PIDS)
    done = d.wfctl("shutdown", "--stop-steps")
    assert done.returncode == 0, done.stderr
    assert d.proc.wait(30) == 0
    assert [p for p in pids if not pid_gone(p)] == []  # gone by the time the daemon exited
    assert not d.socket.exists()
    events = [json.loads(line) for line in
              (d.state_dir / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    [interrupted] = [e for e in events if e["type"] == "AttemptInterrupted"]
    assert interrupted["step"] == "tree" and interrupted["attempt"] == 1
    assert interrupted["reason"] == "daemon stopped"
    assert events[-1]["type"] == "AttemptInterrupted"  # the run is not finished
    assert "stopping" in d.log_text()

    d.start()
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED"
    tree = final["steps"]["tree"]
    assert tree["state"] == "SUCCEEDED" and tree["attempts"] == 2 and tree["exit_code"] == 0
    assert counter.read_text() == "x\n"  # SUCCEEDED steps are not rerun
    assert (wfd_tmp / "tries").read_text().split() == ["1", "2"]


def test_sigint_stops_like_sigterm(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf, pids_file, _ = tree_workflow(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(pids_file, TREE_PIDS)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(30) == 0
    assert [p for p in pids if pid_gone(p)] == []
    d.start()
    cancel_the_same_attempt(d, run_id, pids, wfd_tmp)


def test_restart_after_a_crash_goes_on_and_after_a_reboot_resumes_the_run(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf, pids_file, counter = tree_workflow(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(pids_file, TREE_PIDS)
    d.kill()  # SIGKILL: the step's tree goes on under the keeper
    assert [p for p in pids if pid_gone(p)] == []
    d.start()
    status = run_json(d, run_id)
    assert status["steps"]["tree"]["state"] == "RUNNING", status
    assert status["steps"]["tree"]["attempts"] == 1, status
    assert [p for p in pids if pid_gone(p)] == []

    d.kill()
    d.kill_keeper()  # as a reboot would; the tree is left behind
    assert [p for p in pids if pid_gone(p)] == []
    d.start()
    final = wait_for_state(d, run_id, *ENDED)
    # the old tree was killed before the new attempt started
    assert [p for p in pids if not pid_gone(p)] == []
    assert final["state"] == "SUCCEEDED"
    assert final["steps"]["tree"]["attempts"] == 2
    assert counter.read_text() == "x\n"
    assert (wfd_tmp / "tries").read_text().split() == ["1", "2"]
    interrupted_once(d, run_id, "attempt lost: ")


@pytest.mark.parametrize("crash", ["daemon", "daemon and keeper"])
def test_cancel_after_a_crash_and_no_resume_kills_the_old_tree(
    daemon: Callable[..., Daemon], wfd_tmp: Path, crash: str,
) -> None:
    wf, pids_file, _ = tree_workflow(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    pids = pids_in(pids_file, TREE_PIDS)
    d.kill()
    if crash == "daemon and keeper":
        d.kill_keeper()
    d.extra.append("--no-resume")
    d.start()
    assert run_json(d, run_id)["state"] == "RUNNING"
    assert [p for p in pids if pid_gone(p)] == []  # not picked up: left alone so far
    done = d.wfctl("cancel", run_id)
    assert done.returncode == 0, done.stderr
    assert [p for p in pids if not pid_gone(p)] == []
    status = run_json(d, run_id)
    assert status["state"] == "CANCELLED"
    assert status["steps"]["tree"]["state"] == "CANCELLED"
    assert status["steps"]["counted"]["state"] == "SUCCEEDED"
    assert (wfd_tmp / "tries").read_text().split() == ["1"]  # no new attempt ran


def test_retry_wait_survives_a_restart(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "retries": 1, "backoff": {"initial": 2},
        "command": '[ "$WFD_ATTEMPT" = 2 ]',
    }]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: run_json(d, run_id)["steps"]["s"]["state"] == "RETRY_WAIT", 15)
    [failed] = [e for e in replay_events(d, run_id) if e["type"] == "AttemptFailed"]
    d.restart()
    assert wait_for_state(d, run_id, *ENDED)["state"] == "SUCCEEDED"
    events = replay_events(d, run_id)
    [claim2] = [e for e in events if e["type"] == "AttemptClaimed" and e["attempt"] == 2]
    assert claim2["ts"] >= failed["retry_at"]  # the recorded retry time was kept


def test_waiting_client_rides_out_a_restart(daemon: Callable[..., Daemon],
                                            wfd_tmp: Path) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "command": f"while [ ! -e {gate} ]; do sleep 0.05; done", "kill_grace": 0.1,
    }]})
    d = daemon()
    waiter = d.popen("run", str(wf), "--wait")
    run_id = waiter.stdout.readline().strip()
    wait_until(lambda: run_json(d, run_id)["steps"]["s"]["state"] == "RUNNING", 15)
    d.stop(keep_steps=True)
    d.start()
    gate.touch()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out == ""
    assert run_json(d, run_id)["steps"]["s"]["attempts"] == 1  # the same attempt went on


def test_shutdown_command(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "s", "command": f"echo $$ > {wfd_tmp / 'pid'}; "
                              f"while [ ! -e {gate} ]; do sleep 0.05; done",
        "kill_grace": 0.1,
    }]})
    d = daemon()
    run_id = d.submit(wf)
    pid = int(wait_until(lambda: (wfd_tmp / "pid").exists() and (wfd_tmp / "pid").read_text()))
    done = d.wfctl("shutdown")
    assert done.returncode == 0, done.stderr
    assert d.proc.wait(30) == 0
    assert not pid_gone(pid)  # the step goes on under the keeper
    assert not d.socket.exists()
    after = d.wfctl("status")
    assert after.returncode == 3 and len(after.stderr.splitlines()) == 1
    gate.touch()  # it ends while no daemon runs
    wait_until(lambda: pid_gone(pid), 10, message="the step to end")
    d.start()
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED" and final["steps"]["s"]["attempts"] == 1, final


def test_versions(sandbox) -> None:
    env = base_env(sandbox.mark)
    done = subprocess.run([sys.executable, "-m", "wfd", "--version"], capture_output=True,
                          text=True, env=env, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"wfd {wfd.__version__}"
    done = run_wfctl("--version", mark=sandbox.mark)
    assert done.returncode == 0
    assert re.fullmatch(rf"wfctl {re.escape(wfd.__version__)}( .*)?", done.stdout.strip())


def test_daemon_logs_one_line_per_transition(daemon: Callable[..., Daemon],
                                             wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "true"},
        {"id": "b", "command": "exit 1", "depends_on": ["a"]},
        {"id": "c", "command": "true", "depends_on": ["b"]},
    ]})
    d = daemon()
    run_id = d.wfctl("run", str(wf), "--wait").stdout.strip()
    events = replay_events(d, run_id)
    lines = [line for line in d.log_text().splitlines() if run_id in line]
    assert len(lines) == len(events), "\n".join(lines)
    for needle in ("a: SUCCEEDED", "b: FAILED", "c: SKIPPED", "run: FAILED"):
        assert sum(needle in line for line in lines) == 1, needle
    assert all("Traceback" not in line for line in d.log_text().splitlines())


class DefaultLimitDaemon(Daemon):
    """A daemon started without --max-parallel."""

    @property
    def argv(self) -> list[str]:
        argv = super().argv
        i = argv.index("--max-parallel")
        return argv[:i] + argv[i + 2:]


def test_max_parallel_defaults_to_twice_the_cpus(sandbox, wfd_tmp: Path) -> None:
    limit = 2 * (os.cpu_count() or 1)
    stamps = wfd_tmp / "stamps"
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": f"s{i}", "command": f"echo {i} >> {stamps}; "
                                   f"while [ ! -e {gate} ]; do sleep 0.05; done"}
        for i in range(limit + 2)
    ]})
    d = DefaultLimitDaemon(wfd_tmp, "auto", sandbox.mark)
    sandbox.daemons.append(d)  # stopped and checked for leaks at teardown
    d.start()
    assert "--max-parallel" not in d.argv
    run_id = d.submit(wf)
    wait_until(lambda: stamps.exists() and len(stamps.read_text().split()) == limit, 15)
    states = [s["state"] for s in run_json(d, run_id)["steps"].values()]
    assert states.count("RUNNING") == limit and states.count("READY") == 2, states
    gate.touch()
    assert wait_for_state(d, run_id, *ENDED)["state"] == "SUCCEEDED"
