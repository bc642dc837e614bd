"""wfctl reaches the user's running daemon from anywhere (issue 13, first part).

From cron (`env -i HOME=$HOME PATH=/usr/bin:/bin wfctl ...`: no
XDG_RUNTIME_DIR) wfctl looked only at /tmp/wfd-<uid>/wfd.sock, started a
second daemon there, which found the state dir taken, and failed. Now the
daemon announces its socket in its state dir's lock, and wfctl finds it there;
a daemon that holds the state dir but cannot be reached is named, never
doubled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import MARK_VAR, REPO, Daemon, hello, write_workflow

from wfd import paths


def cron_env(sandbox: Any) -> dict[str, str]:
    """What cron gives a job: HOME and PATH; plus the test's mark (for the leak check),
    the checkout on PYTHONPATH, and TMPDIR in the sandbox, so that the /tmp/wfd-<uid>
    fallback is this test's own (cron sets no TMPDIR; the logic is the same)."""
    return {"HOME": str(sandbox.root / "home"), "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO), MARK_VAR: sandbox.mark,
            "TMPDIR": str(sandbox.root / "tmp")}


def cron_wfctl(sandbox: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wfctl", *args], env=cron_env(sandbox),
                          cwd=sandbox.root, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def session_daemon(sandbox: Any) -> Daemon:
    """The user's daemon as a login session starts it: default state dir under HOME,
    its socket in the session's runtime dir (which cron does not know)."""
    if paths.SYSTEM_SOCKET.exists():
        pytest.skip("a system wfd socket exists on this machine")
    run_user = paths.run_user_socket()
    if run_user is not None and hello(run_user) is not None:
        pytest.skip(f"a wfd answers on {run_user}")
    home = sandbox.root / "home"
    state = home / ".local" / "state" / "wfd"  # platformdirs' user_state_dir
    (sandbox.root / "tmp").mkdir()
    return sandbox.daemon(state_dir=state, socket=sandbox.root / "xdg" / "wfd" / "wfd.sock",
                          env={"HOME": str(home), "XDG_RUNTIME_DIR": str(sandbox.root / "xdg")})


def test_from_cron_wfctl_reaches_the_running_daemon(sandbox: Any,
                                                    session_daemon: Daemon) -> None:
    d = session_daemon
    wf = write_workflow(sandbox.root, {"steps": [{"id": "tiny", "command": "true"}]},
                        "tiny.json")
    done = cron_wfctl(sandbox, "run", "tiny.json", "--wait")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert "starting wfd" not in done.stderr
    assert d.run_ids() == {run_id}
    done = cron_wfctl(sandbox, "status", "--json")
    assert done.returncode == 0, done.stderr
    assert [r["run_id"] for r in json.loads(done.stdout)] == [run_id]
    # no second daemon: none was started on the fallback socket, nothing logged to the
    # autostart log, and the session's daemon is the one that ran the step
    assert not (sandbox.root / "tmp" / f"wfd-{os.getuid()}").exists()
    assert not (d.state_dir / "wfd.log").exists()
    assert d.running
    assert wf.exists()
    # where wfctl found it: the daemon's announcement in its state dir's lock
    assert (d.state_dir / "lock").read_text() == f"{d.proc.pid}\n{d.socket}\n"


def test_a_daemon_holding_the_state_dir_is_named_not_doubled(sandbox: Any,
                                                             session_daemon: Daemon) -> None:
    d = session_daemon
    d.socket.unlink()  # it still holds the state dir, but answers nowhere wfctl can find
    done = cron_wfctl(sandbox, "status")
    assert done.returncode == 3, done
    assert done.stderr == (
        f"wfctl: wfd (pid {d.proc.pid}) holds the state dir {d.state_dir}, but wfctl cannot "
        f"reach it: it announced {d.socket}, which does not answer: No such file or "
        "directory; reach it with --socket PATH (or WFD_SOCKET=PATH), or stop it "
        f"(kill {d.proc.pid}) and let wfctl start one on "
        f"{sandbox.root / 'tmp' / f'wfd-{os.getuid()}' / 'wfd.sock'}\n")
    assert not (d.state_dir / "wfd.log").exists(), "no second daemon may be started"
    assert not (sandbox.root / "tmp" / f"wfd-{os.getuid()}").exists()
    assert d.running


def test_a_stale_lock_announces_nothing(sandbox: Any, session_daemon: Daemon) -> None:
    # Once the daemon is gone its lock file stays, with its words in it: they count
    # only while the lock is held, so wfctl does not chase a dead daemon's socket.
    d = session_daemon
    d.stop()
    assert (d.state_dir / "lock").read_text().startswith(f"{d.proc.pid}\n")
    assert paths.state_dir_holder(d.state_dir) is None
    done = cron_wfctl(sandbox, "status", "--no-autostart")
    assert done.returncode == 3, done
    socket = Path(sandbox.root / "tmp" / f"wfd-{os.getuid()}" / "wfd.sock")
    assert done.stderr.startswith(f"wfctl: cannot reach wfd at {socket}: "), done.stderr
