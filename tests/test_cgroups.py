"""A cgroup per attempt (issue 12, "Prove it" 6), through the real `wfd` and `wfctl`.

`setsid env -i sleep 1000 &` leaves the step's session and drops its marks:
the session + marks method cannot tell it from a stranger. In a cgroup leaf of
its own it cannot escape: it is gone after the attempt ends, after a cancel and
after a timeout. Root with cgroup2 mounted, as here and in CI; elsewhere the
test says why it cannot run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import (
    Daemon,
    pid_gone,
    run_json,
    wait_for_state,
    wait_until,
    why_no_cgroups,
    write_workflow,
)

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


pytestmark = pytest.mark.skipif(why_no_cgroups() is not None,
                                reason=why_no_cgroups() or "")


def escapee(pid_file: Path, then: str) -> str:
    """A step that starts a process outside its session, without marks, then `then`."""
    return f"setsid env -i sh -c 'echo $$ > {pid_file}; exec sleep 1000' & {then}"


def escaped_pid(pid_file: Path) -> int:
    return int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 10))


def stranger_kept(stranger: psutil.Process) -> bool:
    return stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE


@pytest.fixture
def stranger(wfd_tmp: Path) -> psutil.Process:
    """A process of the same user that is no step's: it must survive every kill."""
    proc = psutil.Popen(["sleep", "300"], env={"PATH": os.environ["PATH"]},
                        cwd=wfd_tmp, start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("how", ["ends", "cancel", "timeout"])
def test_an_escaped_process_dies_with_its_attempt(daemon: Callable[..., Daemon], wfd_tmp: Path,
                                                 stranger: psutil.Process, how: str) -> None:
    pid_file = wfd_tmp / "escaped"
    step: dict = {"id": "s", "kill_grace": 1}
    if how == "ends":
        step["command"] = escapee(pid_file, "sleep 0.5")
    elif how == "cancel":
        step["command"] = escapee(pid_file, "sleep 1000")
    else:
        step.update(command=escapee(pid_file, "sleep 1000"), timeout=1.5)
    wf = write_workflow(wfd_tmp, {"steps": [step]})
    d = daemon()
    run_id = d.submit(wf)
    pid = escaped_pid(pid_file)
    escaped = psutil.Process(pid)
    assert escaped.environ().get("WFD_RUN_ID") is None  # no marks: only the cgroup knows
    if how == "cancel":
        assert d.wfctl("cancel", run_id).returncode == 0
    status = wait_for_state(d, run_id, *ENDED)
    want = {"ends": "SUCCEEDED", "cancel": "CANCELLED", "timeout": "FAILED"}[how]
    assert status["state"] == want, status
    assert pid_gone(pid), f"the escaped process {pid} outlived its attempt ({how})"
    assert status["steps"]["s"]["containment"] == "cgroup"
    if how == "timeout":
        assert status["steps"]["s"]["error"] == "timed out after 1.5 s"
    assert stranger_kept(stranger)
    assert run_json(d, run_id)["steps"]["s"]["attempts"] == 1
