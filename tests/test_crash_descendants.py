"""Detached descendants die with their step; strangers never do (issue 4, test 4).

A step's first attempt starts the hard cases of SPEC 3 "A step's process
tree": a child in a session of its own (`setsid`), a child in a process group
of its own, a double-forked grandchild whose parent exited (an orphan, also in
a session of its own), and a child in a session of its own that ignores
SIGTERM, and a child that answers SIGTERM by starting a detached child and
exiting. It writes their pids to a file and then either waits (the leader
keeps running) or exits 0 (the leader leaves them behind).

Every kill path must leave none of them: the end of the attempt (the leader
exits), cancel, timeout, `wfctl shutdown --stop-steps`, SIGTERM to the keeper,
and the loss of the keeper (SIGKILL, as a reboot would) + daemon restart; and
a cancel after a daemon SIGKILL + restart, which left the whole tree running
(issue 12: steps outlive the daemon). And on every path these survive: a
process the test started with no marks, one with another run's marks (same
step and attempt), one with this run's id but an empty attempt mark, and
(where the other run is not itself stopped) the step of another run of the
same daemon with the same step id.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import Daemon, base_env, run_json, wait_for_state, wait_until, write_workflow

KILL_GRACE = 0.5
SIGTERM_BIT = 1 << (15 - 1)

# A process that answers SIGTERM by starting a detached child (marks inherited) and exiting,
# as a shell's `trap 'cleanup &' TERM` does: the kill must go on until nothing is left.
RESPAWN_PY = r"""
import os, signal, sys, time
def on_term(signum, frame):
    if os.fork() == 0:
        os.setsid()
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        os.execvp("sleep", ["sleep", "1000"])
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(1000)
"""

TREE_PY = r"""
import json, os, signal, subprocess, sys, time
out, leader = sys.argv[1], sys.argv[2]
RESPAWN_PY = %r
if os.environ["WFD_ATTEMPT"] != "1":
    # A later attempt: note which processes of attempt 1 still run as it starts, then
    # succeed, so that a resumed run can finish.
    alive = []
    if os.path.exists(out):
        pids = json.load(open(out))
        if os.path.exists(out + ".respawned"):
            pids["respawned"] = int(open(out + ".respawned").read())
        for what, pid in pids.items():
            try:
                stat = open(f"/proc/{pid}/stat", "rb").read()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2:].split()[0] != b"Z":
                alive.append(what)
    with open(out + ".check", "w") as f:
        json.dump(alive, f)
    sys.exit(0)
sleep = ["sleep", "1000"]
pids = {}
pids["setsid"] = subprocess.Popen(sleep, start_new_session=True).pid
pids["pgrp"] = subprocess.Popen(sleep, preexec_fn=os.setpgrp).pid
pids["noterm"] = subprocess.Popen(
    sleep, start_new_session=True,
    preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)).pid
r, w = os.pipe()
middle = os.fork()
if middle == 0:  # double fork: the middle process exits, the grandchild is orphaned
    os.setsid()
    grandchild = os.fork()
    if grandchild == 0:
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        os.execvp("sleep", sleep)
    os._exit(0)
os.close(w)
os.waitpid(middle, 0)
pids["orphan"] = int(os.read(r, 64))
respawner = subprocess.Popen([sys.executable, "-c", RESPAWN_PY, out + ".respawned"],
                             start_new_session=True, stdout=subprocess.PIPE)
assert respawner.stdout.readline() == b"ready\n"  # its SIGTERM handler is in place
pids["respawner"] = respawner.pid
pids["leader"] = os.getpid()
with open(out + ".tmp", "w") as f:
    json.dump(pids, f)
os.rename(out + ".tmp", out)
if leader == "stay":
    time.sleep(1000)
while not os.path.exists(out + ".go"):  # leader "exit": once the test has seen the tree
    time.sleep(0.02)
"""

HOLD_PY = "import time; time.sleep(1000)"


def tree_workflow(root: Path, name: str, leader: str, **extra: object) -> tuple[Path, Path]:
    (root / "tree.py").write_text(TREE_PY % RESPAWN_PY)
    out = root / f"{name}.pids"
    wf = write_workflow(root, {"name": name, "steps": [{
        "id": "work", "command": [sys.executable, "-I", str(root / "tree.py"), str(out), leader],
        "kill_grace": KILL_GRACE, **extra,
    }]}, f"{name}.json")
    return wf, out


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tree(out: Path, run_id: str) -> dict[str, psutil.Process]:
    """The step's processes, each proven the test's by its marks, once all are up."""
    pids = json.loads(wait_until(lambda: out.exists() and out.read_text(), timeout=15,
                                 message=f"{out.name}"))
    procs = {}
    for what, pid in pids.items():
        proc = psutil.Process(pid)
        env = proc.environ()
        assert (env.get("WFD_RUN_ID"), env.get("WFD_ATTEMPT")) == (run_id, "1"), what
        procs[what] = proc
    sig_ign = int(_status_field(procs["noterm"], "SigIgn"), 16)
    assert sig_ign & SIGTERM_BIT, "the noterm child does not ignore SIGTERM"
    sids = {what: _sid(p) for what, p in procs.items()}
    assert len({sids["leader"], sids["setsid"], sids["noterm"], sids["orphan"]}) == 4, sids
    assert procs["orphan"].ppid() != pids["leader"]  # reparented: an orphan
    return procs


def _status_field(proc: psutil.Process, name: str) -> str:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(f"no {name} in /proc/{proc.pid}/status")


def _sid(proc: psutil.Process) -> int:
    data = Path(f"/proc/{proc.pid}/stat").read_bytes()
    return int(data[data.rfind(b")") + 2:].split()[3])


def check_at_attempt_2(out: Path) -> None:
    """Attempt 2 found none of attempt 1's processes running when it started."""
    alive = json.loads(Path(f"{out}.check").read_text())
    assert not alive, f"attempt 2 started while attempt 1's {alive} still ran"


def assert_all_gone(procs: dict[str, psutil.Process], when: str, out: Path | None = None,
                    run_id: str | None = None) -> None:
    """None of `procs` runs; with `out`, neither does the child the respawner started when
    it got SIGTERM (which every kill path sends it first)."""
    left = [what for what, proc in procs.items() if not gone(proc)]
    if out is not None:
        path = Path(f"{out}.respawned")
        pid = int(wait_until(lambda: path.exists() and path.read_text(), timeout=5,
                             message="the respawner's child (it never got SIGTERM?)"))
        try:
            child = psutil.Process(pid)
            if child.environ().get("WFD_RUN_ID") == run_id and not gone(child):
                left.append("respawned")
        except psutil.Error:
            pass  # gone (or a zombie whose environment cannot be read)
    assert not left, f"still running {when}: {left}"


class Strangers:
    """Processes the test starts itself that no kill path may touch."""

    def __init__(self, root: Path, mark: str, run_id: str) -> None:
        base = base_env(mark, {"WFD_RUN_ID": None, "WFD_STEP_ID": None, "WFD_ATTEMPT": None})
        other = {"WFD_RUN_ID": "20200101T000000Z-0000beef", "WFD_STEP_ID": "work",
                 "WFD_ATTEMPT": "1"}
        partial = {"WFD_RUN_ID": run_id, "WFD_STEP_ID": "work", "WFD_ATTEMPT": ""}
        self.procs = {
            name: subprocess.Popen([sys.executable, "-c", HOLD_PY, str(root)],
                                   env={**base, **env}, start_new_session=True)
            for name, env in (("no marks", {}), ("another run's marks", other),
                              ("an empty attempt mark", partial))
        }

    def assert_alive(self, when: str) -> None:
        dead = [name for name, p in self.procs.items() if p.poll() is not None]
        assert not dead, f"a stranger was killed {when}: {dead}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def strangers(sandbox):
    made: list[Strangers] = []

    def make(run_id: str) -> Strangers:
        made.append(Strangers(sandbox.root, sandbox.mark, run_id))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def other_run(d: Daemon, root: Path) -> tuple[str, dict[str, psutil.Process], Path]:
    """Another run of the same daemon, its step (same id) holding a tree of its own."""
    wf, out = tree_workflow(root, "other", "stay")
    run_id = d.submit(wf)
    return run_id, tree(out, run_id), out


@pytest.mark.parametrize("path", ["leader-exits", "cancel", "timeout"])
def test_descendants_die_with_the_attempt(daemon, wfd_tmp: Path, strangers, path: str) -> None:
    d = daemon()
    other_id, other_tree, other_out = other_run(d, wfd_tmp)
    extra = {"timeout": 3} if path == "timeout" else {}
    wf, out = tree_workflow(wfd_tmp, "main", "exit" if path == "leader-exits" else "stay",
                            **extra)
    run_id = d.submit(wf)
    s = strangers(run_id)
    procs = tree(out, run_id)
    if path == "leader-exits":
        Path(f"{out}.go").touch()
        status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=15)
        assert status["state"] == "SUCCEEDED", status
    elif path == "cancel":
        done = d.wfctl("cancel", run_id)
        assert done.returncode == 0, done.stderr
        status = run_json(d, run_id)  # cancel returns once every step process is gone
        assert status["state"] == "CANCELLED", status
    else:
        status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=15)
        assert status["state"] == "FAILED", status
        assert "timed out" in status["steps"]["work"]["error"], status
    assert_all_gone(procs, f"once the run was {status['state']} ({path})", out, run_id)
    s.assert_alive(f"by {path}")
    left = [what for what, proc in other_tree.items() if gone(proc)]
    assert not left, f"{path} of one run killed another run's processes: {left}"
    assert run_json(d, other_id)["steps"]["work"]["state"] == "RUNNING"
    assert d.wfctl("cancel", other_id).returncode == 0
    assert_all_gone(other_tree, "after cancelling the other run", other_out, other_id)


@pytest.mark.parametrize("how", ["shutdown --stop-steps", "keeper SIGTERM"])
def test_descendants_die_when_the_steps_are_stopped(daemon, wfd_tmp: Path, strangers,
                                                    how: str) -> None:
    d = daemon()
    wf, out = tree_workflow(wfd_tmp, "main", "stay")
    run_id = d.submit(wf)
    s = strangers(run_id)
    procs = tree(out, run_id)
    if how == "shutdown --stop-steps":
        done = d.wfctl("shutdown", "--stop-steps")
        assert done.returncode == 0, done.stderr
        assert d.proc.wait(60) == 0
    else:
        assert d.stop(keep_steps=True) == 0  # the daemon's SIGTERM leaves the steps running
        left = [what for what, proc in procs.items() if gone(proc)]
        assert not left, f"the daemon's SIGTERM killed {left}"
        d.stop_keeper()
    assert_all_gone(procs, f"after {how}", out, run_id)
    s.assert_alive(f"by {how}")
    d.start()  # the stopped attempt runs again, and succeeds
    status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=15)
    assert status["state"] == "SUCCEEDED" and status["steps"]["work"]["attempts"] == 2, status
    check_at_attempt_2(out)
    s.assert_alive("after the restart")


def test_a_daemon_crash_leaves_the_tree_and_cancel_still_kills_it(daemon, wfd_tmp: Path,
                                                                  strangers) -> None:
    d = daemon()
    wf, out = tree_workflow(wfd_tmp, "main", "stay")
    run_id = d.submit(wf)
    s = strangers(run_id)
    procs = tree(out, run_id)
    d.kill()
    d.start()
    left = [what for what, proc in procs.items() if gone(proc)]
    assert not left, f"a crash of wfd killed {left}"
    assert run_json(d, run_id)["steps"]["work"]["attempts"] == 1
    done = d.wfctl("cancel", run_id)  # through the keeper, which re-attached
    assert done.returncode == 0, done.stderr
    status = run_json(d, run_id)
    assert status["state"] == "CANCELLED" and status["steps"]["work"]["attempts"] == 1, status
    assert_all_gone(procs, "after a cancel that followed a daemon crash", out, run_id)
    s.assert_alive("by the cancel after a crash")


def test_descendants_die_after_the_keeper_dies_and_the_daemon_restarts(
        daemon, wfd_tmp: Path, strangers) -> None:
    d = daemon()
    wf, out = tree_workflow(wfd_tmp, "main", "stay")
    run_id = d.submit(wf)
    s = strangers(run_id)
    procs = tree(out, run_id)
    d.kill()
    d.kill_keeper()  # as a reboot would, but the step processes live on
    left = [what for what, proc in procs.items() if gone(proc)]
    assert not left, f"gone with the keeper: {left}"
    d.start()
    status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=15)
    assert status["state"] == "SUCCEEDED" and status["steps"]["work"]["attempts"] == 2, status
    assert_all_gone(procs, "after the keeper was killed and the daemon restarted", out, run_id)
    check_at_attempt_2(out)
    s.assert_alive("by the restarted daemon")
