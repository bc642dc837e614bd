"""The daemon does not keep a descriptor per attempt: the keeper opens each attempt's
log itself, and a daemon that opened them too (and never closed them) ran out of
descriptors after about a thousand attempts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, run_json, write_workflow

STEPS = 300


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_attempts_leave_no_descriptor_open_in_the_daemon(daemon: Callable[..., Daemon],
                                                         wfd_tmp: Path) -> None:
    d = daemon(max_parallel=8)
    small = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}, "small.json")
    d.submit(small, "--wait")  # the keeper and the socket are up: the baseline
    before = open_fds(d.proc.pid)
    wf = write_workflow(wfd_tmp, {"steps": [{"id": f"s{i}", "command": "true"}
                                            for i in range(STEPS)]})
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    after = open_fds(d.proc.pid)
    assert after - before < 20, f"{after - before} more descriptors after {STEPS} attempts"
