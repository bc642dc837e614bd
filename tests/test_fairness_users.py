"""Fairness between users of a system daemon, and per-user limits, with real users.

Run as root: two users made here (removed at teardown), both in the socket
group, submit through the real `wfctl` to a real `wfd --system`. One user
holds the only slot with a step that waits for a gate file and queues many
runs behind it; the other's new run must start next (round-robin across
users, then runs), not behind all of them. With `--max-steps-per-user` the
second user runs even while the first user's gate holds; a submit over
`--max-runs-per-user` is refused with exit 2 and a clear line.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow
from test_socket_users import Runtime, client, foreign_python  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not hasattr(os, "getgrouplist"),
    reason="needs root, to run clients as other users",
)

QUEUED = 10  # runs the first user queues behind its gate


@dataclass
class Members:
    group: str
    alice: str
    bob: str

    def uid(self, user: str) -> int:
        return pwd.getpwnam(user).pw_uid


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


@pytest.fixture(scope="module")
def members() -> Iterator[Members]:
    """A socket group with two fresh users in it."""
    for tool in ("groupadd", "useradd", "userdel", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    tag = uuid.uuid4().hex[:8]
    group, users = f"wfdf{tag}", [f"wfda{tag}", f"wfdb{tag}"]
    made: list[str] = []
    made_group = False
    try:
        _run("groupadd", group)
        made_group = True
        for name in users:
            _run("useradd", "-M", "-N", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                 "-G", group, name)
            made.append(name)
        yield Members(group, *users)
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
        if made_group:
            subprocess.run(["groupdel", group], capture_output=True)


@dataclass
class Setup:
    d: Daemon
    rt: Runtime
    gate: Path  # the gated step ends once this file exists
    gated: Path  # a workflow whose one step waits for the gate
    quick: Path  # a workflow whose one step is `true`

    def submit(self, user: str, workflow: Path, *flags: str) -> Any:
        return client(self.rt, self.d, user, "run", str(workflow), *flags)

    def submit_ok(self, user: str, workflow: Path) -> str:
        done = self.submit(user, workflow)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def submit_many(self, user: str, workflow: Path, count: int) -> list[str]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: self.submit_ok(user, workflow), range(count)))

    def step(self, run_id: str) -> dict:
        return run_json(self.d, run_id)["steps"]["s"]


def setup(daemon: Callable[..., Daemon], sandbox: Any, rt: Runtime, members: Members,
          max_parallel: int, *limits: str) -> Setup:
    os.chmod(sandbox.root, 0o711)  # any user may pass through, not list
    d = daemon(max_parallel=max_parallel, socket=sandbox.root / "run" / "wfd.sock",
               extra=["--system", "--socket-group", members.group, *limits])
    work = sandbox.root / "work"
    work.mkdir(mode=0o755)
    gate = work / "gate"
    gated = write_workflow(work, {"steps": [{
        "id": "s", "command": f"while [ ! -e {gate} ]; do sleep 0.05; done"}]}, "gated.json")
    quick = write_workflow(work, {"steps": [{"id": "s", "command": "true"}]}, "quick.json")
    for path in (gated, quick):
        os.chmod(path, 0o644)
    return Setup(d, rt, gate, gated, quick)


def test_another_users_new_run_starts_before_a_users_many_queued_runs(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,  # noqa: F811
        members: Members) -> None:
    s = setup(daemon, sandbox, foreign_python, members, 1)
    holder = s.submit_ok(members.alice, s.gated)
    wait_until(lambda: s.step(holder)["state"] == "RUNNING", 30, message="the gated step")
    queued = s.submit_many(members.alice, s.quick, QUEUED)
    newcomer = s.submit_ok(members.bob, s.quick)
    assert s.step(newcomer)["state"] == "READY"  # the one slot is alice's

    s.gate.touch()
    for run_id in [holder, *queued, newcomer]:
        wait_for_state(s.d, run_id, "SUCCEEDED", timeout=60)

    started = {run_id: s.step(run_id)["started_at"] for run_id in [*queued, newcomer]}
    order = sorted(started, key=started.__getitem__)
    assert order[0] == newcomer, (
        f"bob's run started after {order.index(newcomer)} of alice's {QUEUED} queued runs")
    owners = {run["run_id"]: run["owner"] for run in run_json(s.d)}
    assert {owners[r] for r in queued} == {members.alice} and owners[newcomer] == members.bob


def test_per_user_limits_leave_room_for_others_and_refuse_a_submit_over_the_run_limit(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,  # noqa: F811
        members: Members) -> None:
    s = setup(daemon, sandbox, foreign_python, members, 2,
              "--max-steps-per-user", "1", "--max-runs-per-user", "6")
    holder = s.submit_ok(members.alice, s.gated)
    wait_until(lambda: s.step(holder)["state"] == "RUNNING", 30, message="the gated step")
    queued = s.submit_many(members.alice, s.quick, 5)

    # a seventh unfinished run of alice's is refused, with nothing created
    runs_before = s.d.run_ids()
    done = s.submit(members.alice, s.quick)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"wfctl: uid {members.uid(members.alice)} has 6 unfinished runs, the limit is 6 "
        "(wfd --max-runs-per-user); submit again once some have finished\n")
    assert s.d.run_ids() == runs_before

    # bob's run starts and ends in the slot alice may not take (one step per user)
    done = s.submit(members.bob, s.quick, "--wait")
    assert done.returncode == 0, done.stderr
    assert all(s.step(run_id)["state"] == "READY" for run_id in queued)

    s.gate.touch()
    for run_id in [holder, *queued]:
        wait_for_state(s.d, run_id, "SUCCEEDED", timeout=60)
    assert s.submit(members.alice, s.quick, "--wait").returncode == 0  # under the limit again
