"""Helpers for tests that drive the real `wfd` and `wfctl` as subprocesses.

Everything a test starts lives in one short private temp dir (socket paths
must stay under 108 bytes) and carries a mark: the test's temp dir on its
command line, or `WFDTEST_MARK=<token>` in its environment (the runner
passes it to `wfctl`, whose environment every step inherits). The mark is
named outside `WFD_*` because the daemon strips inherited `WFD_*` variables
from steps. conftest.py uses these marks to prove a leftover process is the
test's before it touches it.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

REPO = Path(__file__).resolve().parent.parent
MARK_VAR = "WFDTEST_MARK"
START_TIMEOUT = 30.0  # a daemon under a loaded CI box may take a while to recover and bind
STOP_TIMEOUT = 60.0  # SIGTERM waits for step trees to end (kill_grace defaults to 5 s)

# Variables of the machine's own daemon or service manager that must not leak into ours.
_SCRUB = (
    "WFD_SOCKET", "WFD_STATE_DIR", "WFD_NO_AUTOSTART", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
    "WATCHDOG_PID",
)

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
    message: str | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that; no fixed sleeps.
    Raises AssertionError naming what was awaited (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last value: {value!r})")
        time.sleep(interval)


def base_env(mark: str, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a process a test starts: this one, minus the machine's wfd
    settings, plus the repo on PYTHONPATH, no autostart, and the test's mark.
    In `extra`, a value of None removes the variable."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["WFD_NO_AUTOSTART"] = "1"
    env[MARK_VAR] = mark
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _as_user(user: str | int | None, env: dict[str, str]) -> dict[str, Any]:
    """Popen arguments to run as `user` (name or uid) with its groups, as login would."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return {"user": entry.pw_uid, "group": entry.pw_gid,
            "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid)}


def run_wfctl(
    *args: str, mark: str, input: str | bytes | None = None, timeout: float = 60.0,
    user: str | int | None = None, env: Mapping[str, str | None] | None = None,
    cwd: str | Path | None = None, text: bool = True, **popen: Any,
) -> subprocess.CompletedProcess:
    """Run `python -m wfctl ARGS` to completion (see `base_env` for its environment);
    `popen` goes to subprocess.run (e.g. `umask=0o027`)."""
    full_env = base_env(mark, env)
    kwargs = {**_as_user(user, full_env), **popen}
    if isinstance(input, str) and not text:
        input = input.encode()
    return subprocess.run(
        [sys.executable, "-m", "wfctl", *args], input=input, capture_output=True,
        timeout=timeout, env=full_env, cwd=cwd if cwd is not None else ("/" if user else None),
        text=text, **kwargs,
    )


def popen_wfctl(
    *args: str, mark: str, user: str | int | None = None,
    env: Mapping[str, str | None] | None = None, **popen: Any,
) -> subprocess.Popen:
    """Start `python -m wfctl ARGS` in the background, stdout and stderr piped as text."""
    full_env = base_env(mark, env)
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
             "stdin": subprocess.DEVNULL, **_as_user(user, full_env), **popen}
    return subprocess.Popen([sys.executable, "-m", "wfctl", *args], env=full_env, **popen)


def ask_shutdown(path: str | Path, stop_steps: bool, timeout: float = 5.0) -> bool:
    """`wfctl shutdown [--stop-steps]` straight on the socket; False if not answered."""
    from wfd import protocol

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        protocol.send(sock, protocol.Shutdown(stop_steps=stop_steps))
        return isinstance(protocol.recv_reply(sock), protocol.Ok)
    except Exception:  # gone, or not a daemon to use
        return False
    finally:
        sock.close()


def hello(path: str | Path, timeout: float = 1.0) -> Any:
    """The HelloReply of the daemon at `path`, or None if nothing answers in time."""
    from wfd import protocol

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        protocol.send(sock, protocol.Hello(client="tests"))
        reply = protocol.recv_reply(sock)
    except Exception:  # refused, closed, garbage, another protocol: not a daemon to use
        return None
    finally:
        sock.close()
    return reply if isinstance(reply, protocol.HelloReply) else None


def write_workflow(tmp_dir: str | Path, obj: Any, name: str = "wf.json") -> Path:
    """Write a workflow file (a dict/list as JSON, str or bytes as they are); its path."""
    path = Path(tmp_dir) / name
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    elif isinstance(obj, str):
        path.write_text(obj)
    else:
        path.write_text(json.dumps(obj, indent=2))
    return path


class Daemon:
    """One real `wfd` under test, in `root` (the test's temp dir)."""

    def __init__(
        self, root: Path, name: str, mark: str, max_parallel: int = 4,
        extra: Sequence[str] = (), state_dir: Path | None = None, socket: Path | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        self.root = root
        self.name = name
        self.mark = mark
        self.state_dir = state_dir or root / f"{name}.state"
        self.socket = socket or root / f"{name}.sock"
        self.max_parallel = max_parallel
        self.extra = list(extra)
        self.env = base_env(mark, env)
        self.log_path = root / f"{name}.stderr"
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "wfd", "--state-dir", str(self.state_dir),
                "--socket", str(self.socket), "--max-parallel", str(self.max_parallel),
                *self.extra]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> Daemon:
        """Start it (stderr appended to `log_path`); with `wait`, until it answers Hello."""
        assert not self.running, f"daemon {self.name} is running already"
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                cwd=self.root, start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            return not self.running or hello(self.socket) is not None

        wait_until(ready, timeout, interval=0.05, message=f"daemon {self.name} to answer")
        if not self.running:
            raise AssertionError(f"daemon {self.name} exited with status "
                                 f"{self.proc.returncode} at start:\n{self.log_text()}")

    def stop(self, timeout: float = STOP_TIMEOUT, keep_steps: bool = False) -> int:
        """SIGTERM and wait; its exit status. SIGKILL and AssertionError if it hangs.

        A stopped daemon leaves its running steps to the keeper. Unless `keep_steps`, the
        steps are stopped first (`wfctl shutdown --stop-steps`: recorded as interrupted),
        and the keeper too, so that a test's stop stops everything, as before steps
        outlived the daemon; `keep_steps` is a plain SIGTERM."""
        assert self.proc is not None, f"daemon {self.name} was never started"
        if self.proc.poll() is None:
            # Stopping the steps first records them as interrupted in the run's log, as a
            # stop did before steps outlived the daemon; a plain SIGTERM leaves them.
            if keep_steps or not ask_shutdown(self.socket, stop_steps=True):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon {self.name} ignored SIGTERM for {timeout:g} s; "
                                     "killed it") from None
        if not keep_steps:
            self.stop_keeper(timeout)
        return self.proc.returncode

    def keeper(self) -> psutil.Process | None:
        """The state dir's keeper, if one runs (proven by its command line)."""
        keeper_dir = self.state_dir / "keeper"
        try:
            pid = int((keeper_dir / "lock").read_text().split()[0])
            proc = psutil.Process(pid)
            if str(keeper_dir) in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return None

    def stop_keeper(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the keeper and wait until it is gone (it stops its steps first)."""
        proc = self.keeper()
        if proc is None:
            return
        try:
            proc.terminate()
            wait_until(lambda: not _running(proc), timeout, interval=0.05,
                       message=f"keeper of {self.name} to stop")
        except psutil.Error:
            pass

    def kill_keeper(self) -> None:
        """SIGKILL the keeper, as a reboot would (its steps are left behind)."""
        proc = self.keeper()
        if proc is not None:
            try:
                proc.kill()
            except psutil.Error:
                pass
            wait_until(lambda: not _running(proc), 10, interval=0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash: its step processes are left behind, as after a real one."""
        assert self.proc is not None, f"daemon {self.name} was never started"
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def restart(self, wait: bool = True) -> Daemon:
        """Stop it if it runs (SIGTERM), then start it again with the same arguments."""
        if self.running:
            self.stop()
        return self.start(wait)

    def log_text(self, max_lines: int = 400) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        skipped = len(lines) - max_lines
        head = [f"... ({skipped} earlier lines)"] if skipped > 0 else []
        return "\n".join(head + lines[-max_lines:])

    def run_ids(self) -> set[str]:
        """Ids of every run in this daemon's state dir."""
        try:
            return {p.name for p in (self.state_dir / "runs").iterdir() if p.is_dir()}
        except OSError:
            return set()

    def wfctl(
        self, *args: str, input: str | bytes | None = None, timeout: float = 60.0,
        user: str | int | None = None, env: Mapping[str, str | None] | None = None,
        text: bool = True, cwd: str | Path | None = None, **popen: Any,
    ) -> subprocess.CompletedProcess:
        """Run `wfctl --socket S ARGS` against this daemon (WFD_NO_AUTOSTART=1)."""
        return run_wfctl("--socket", str(self.socket), *args, mark=self.mark, input=input,
                         timeout=timeout, user=user, env=env, text=text,
                         cwd=cwd if cwd is not None else (None if user else self.root), **popen)

    def popen(self, *args: str, user: str | int | None = None,
              env: Mapping[str, str | None] | None = None, **popen: Any) -> subprocess.Popen:
        """Start `wfctl --socket S ARGS` in the background (e.g. `run --follow`)."""
        popen.setdefault("cwd", self.root)
        return popen_wfctl("--socket", str(self.socket), *args, mark=self.mark, user=user,
                           env=env, **popen)

    def submit(self, workflow: Path, *flags: str) -> str:
        """`wfctl run WORKFLOW` that must succeed; the run id."""
        done = self.wfctl("run", str(workflow), *flags)
        assert done.returncode == 0, f"wfctl run exited {done.returncode}: {done.stderr}"
        return done.stdout.strip()


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (PID 1 here may never reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_json(daemon: Daemon, run_id: str | None = None) -> Any:
    """`wfctl status [RUN_ID] --json`, which must succeed, parsed."""
    done = daemon.wfctl("status", *([run_id] if run_id else []), "--json")
    assert done.returncode == 0, f"wfctl status exited {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


def wait_for_state(daemon: Daemon, run_id: str, *states: str, timeout: float = 30.0) -> Any:
    """Poll `status RUN_ID --json` until the run is in one of `states`; that status."""
    def reached() -> Any:
        status = run_json(daemon, run_id)
        return status if status["state"] in states else None

    return wait_until(reached, timeout, interval=0.05,
                      message=f"run {run_id} to reach {' or '.join(states)}")


def pid_gone(pid: int) -> bool:
    """Not running; a zombie counts as gone (PID 1 here may not reap)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids_in(path: Path, count: int) -> list[int]:
    """Wait until `path` holds `count` pids, one a line; those pids."""
    def enough() -> list[int] | None:
        try:
            pids = [int(x) for x in path.read_text().split()]
        except (OSError, ValueError):
            return None
        return pids if len(pids) >= count else None

    return wait_until(enough, 15, message=f"{count} pids in {path}")


def replay_events(d: Daemon, run_id: str) -> list[dict]:
    """The events of `wfctl replay RUN_ID --json`, which must succeed."""
    done = d.wfctl("replay", run_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["events"]


def why_no_cgroups() -> str | None:
    """Why a cgroup leaf per attempt cannot be had here (a skip reason), or None."""
    from wfd.cgroups import AttemptCgroups

    if os.geteuid() != 0:
        return "needs root to make cgroups"
    probe = AttemptCgroups.find(f"wfd-test-probe-{os.getpid()}")
    if probe is None:
        return "no writable cgroup2 hierarchy here"
    probe.close()
    return None
