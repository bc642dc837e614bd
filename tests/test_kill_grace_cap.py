"""A huge `kill_grace` cannot pin the daemon (issue 11, finding 4), through the real
`wfd` and `wfctl`.

A member's step that ignores SIGTERM with `kill_grace: 1e6` held a slot for
ever, and a cancel or a stop waited with it. Now the daemon caps `kill_grace`
for runs not owned by root (`--max-kill-grace`, default 300 s), and a cancel
asked a second time kills at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import Daemon, pid_gone, run_json, wait_for_state, wait_until, write_workflow
from test_fairness_users import Members, members, setup  # noqa: F401  (a fixture)
from test_socket_users import Runtime, client, foreign_python  # noqa: F401  (a fixture)

# Ignores SIGTERM, says so by creating argv[1], then sleeps.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(sys.argv[1], 'w').write(str(__import__('os').getpid())); time.sleep(600)")


def stubborn_run(d: Daemon, wfd_tmp: Path) -> tuple[str, int]:
    started = wfd_tmp / "started"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "command": [sys.executable, "-c", STUBBORN, str(started)],
         "kill_grace": 1e6},
    ]})
    run_id = d.submit(wf)
    pid = int(wait_until(lambda: started.exists() and started.read_text(), 15))
    return run_id, pid


def test_a_second_cancel_kills_at_once(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    # The daemon's user here is root, whose runs keep their kill_grace (the cap is for
    # other users: below): the first cancel waits it out, a second one does not.
    d = daemon(extra=["--max-kill-grace", "1"])
    run_id, pid = stubborn_run(d, wfd_tmp)
    cancel = threading.Thread(target=d.wfctl, args=("cancel", run_id), daemon=True)
    began = time.monotonic()
    cancel.start()
    time.sleep(2)  # past the 1 s cap: root's own run keeps its grace
    assert not pid_gone(pid), "root's run was held to the cap meant for other users"
    again = d.wfctl("cancel", run_id, timeout=20)
    assert again.returncode == 0, again.stderr
    assert pid_gone(pid)
    cancel.join(20)
    assert not cancel.is_alive()
    assert wait_for_state(d, run_id, "CANCELLED")["state"] == "CANCELLED"
    assert time.monotonic() - began < 15


def test_another_users_huge_kill_grace_is_capped(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,  # noqa: F811
        members: Members) -> None:  # noqa: F811
    s = setup(daemon, sandbox, foreign_python, members, 2, "--max-kill-grace", "1")
    shared = sandbox.root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    pid_file = shared / "pid"
    wf = write_workflow(sandbox.root / "work", {"steps": [{
        "id": "s", "kill_grace": 1e6,
        "command": f"trap '' TERM; echo $$ > {pid_file}; exec sleep 600"}]}, "stubborn.json")
    os.chmod(wf, 0o644)
    run_id = s.submit_ok(members.alice, wf)
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30))
    began = time.monotonic()
    done = client(s.rt, s.d, members.alice, "cancel", run_id)
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert pid_gone(pid)
    assert 0.9 <= took < 10, f"cancel took {took:.1f} s: the 1 s cap was not applied"
    assert run_json(s.d, run_id)["state"] == "CANCELLED"
