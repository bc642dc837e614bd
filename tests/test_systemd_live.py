"""The real daemon under systemd's protocols (issue 7, "Prove it").

Each test plays systemd's part with systemd's own rules, against a real `wfd`:
- sd_notify: the test binds the AF_UNIX datagram socket of $NOTIFY_SOCKET, as
  PID 1 does, and reads what the daemon says and when: READY=1 only once a run
  left unfinished by a crashed daemon runs again, STATUS=, WATCHDOG=1 at half
  of $WATCHDOG_USEC, STOPPING=1 and EXTEND_TIMEOUT_USEC= on SIGTERM;
- socket activation: a listening socket the test made, passed as fd 3 with
  LISTEN_FDS/LISTEN_PID, and systemd's own `systemd-socket-activate`;
- the journal: `<N>` priority prefixes when $JOURNAL_STREAM names stderr;
- boot resume: after every process is killed, as by a reboot, the next daemon
  resumes every unfinished run by itself (or with `wfctl resume-all` after
  `--no-resume`);
- a real user manager (`systemd --user` in a cgroup of its own, with a private
  $XDG_RUNTIME_DIR) running the units `wfd install-units --user` writes.

A step's processes are found by their marks (WFD_RUN_ID of one of the test's runs,
and the test's WFDTEST_MARK) before anything signals them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    MARK_VAR,
    Daemon,
    run_json,
    run_wfctl,
    wait_for_state,
    wait_until,
    write_workflow,
)

from wfd import protocol
from wfd.keeper import keeper_alive

PY = sys.executable
# A step that ignores SIGTERM (so only its kill_grace ends it), says it runs, and
# sleeps; `argv[1]` is a file it creates once it ignores SIGTERM.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(sys.argv[1], 'a').close(); time.sleep(600)")
# A step that waits until the file `argv[1]` exists.
GATED = ("import os, sys, time\n"
         "while not os.path.exists(sys.argv[1]): time.sleep(0.05)")


# ------------------------------------------------------------------ helpers


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET: a datagram socket the test binds,
    and every message received, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> str | None:
        """The next message, or None if none comes within `timeout`."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        self.messages.append((time.monotonic(), data.decode()))
        return data.decode()

    def wait_for(self, prefix: str, timeout: float = 30.0,
                 on_each: Callable[[str], None] | None = None) -> str:
        """Receive until a message with a line starting with `prefix` arrives; that
        message. `on_each` sees every message as it comes (the state of the daemon
        can be checked at the very moment it says something)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(deadline - time.monotonic())
            if message is None:
                raise AssertionError(f"no {prefix!r} within {timeout:g} s; got "
                                     f"{[m for _, m in self.messages]}")
            if on_each is not None:
                on_each(message)
            if any(line.startswith(prefix) for line in message.splitlines()):
                return message

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, m in self.messages for line in m.splitlines()
                if line.startswith(prefix)]


@pytest.fixture
def notify(wfd_tmp: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(wfd_tmp / "notify")
    yield receiver
    receiver.close()


def read_events(d: Daemon, run_id: str) -> list[dict]:
    path = d.state_dir / "runs" / run_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_procs(run_ids: set[str], mark: str) -> list[psutil.Process]:
    """Live processes proven to be steps of `run_ids`: both marks, not a zombie."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("WFD_RUN_ID") in run_ids and env.get(MARK_VAR) == mark:
            found.append(proc)
    return found


def kill_steps(run_ids: set[str], mark: str) -> None:
    """SIGKILL every process proven to be a step of `run_ids`, until none is left."""
    def gone() -> bool:
        left = step_procs(run_ids, mark)
        for proc in left:
            try:
                proc.kill()  # psutil refuses a pid reused since it was listed
            except psutil.Error:
                pass
        return not left

    wait_until(gone, 10, message=f"the steps of {sorted(run_ids)} to die")


def step_running(d: Daemon, run_id: str, step: str, attempt: int) -> bool:
    rec = run_json(d, run_id)["steps"][step]
    return rec["state"] == "RUNNING" and rec["attempts"] == attempt


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    live = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.Error:
            pass
    return live


# ------------------------------------------------------------------ sd_notify


def test_ready_once_folded_and_serving_while_the_crashed_daemons_step_goes_on(
        daemon: Callable[..., Daemon], wfd_tmp: Path, notify: NotifySocket) -> None:
    # Issue 12 changed this on purpose: a crash of the daemon no longer stops its steps,
    # and READY=1 no longer waits for old trees to die (issue 10: adoption runs in the
    # background). The step of the crashed daemon is re-attached, not restarted.
    started = wfd_tmp / "started"
    wf = write_workflow(wfd_tmp, {"name": "long", "steps": [
        {"id": "long", "command": [PY, "-c", STUBBORN, str(started)], "kill_grace": 1},
    ]})
    first = daemon(name="first")
    run_id = first.submit(wf)
    wait_until(lambda: started.exists() and step_running(first, run_id, "long", 1))
    old = step_procs({run_id}, first.mark)
    assert old
    first.kill()  # a crash: the step keeps running under the keeper

    second = daemon(name="second", state_dir=first.state_dir, socket=first.socket,
                    env={"NOTIFY_SOCKET": str(notify.path)}, start=False)
    second.start(wait=False)
    seen_at_ready: dict = {}

    def at_ready(message: str) -> None:
        if "READY=1" in message.splitlines():  # look at the state dir the moment it arrives
            seen_at_ready["old alive"] = alive(old)

    ready = notify.wait_for("READY=1", on_each=at_ready)
    assert ready == "READY=1\nSTATUS=1 active run(s)"
    assert [m for _, m in notify.messages[:-1]] == []  # no kill to wait for: no extension
    assert seen_at_ready["old alive"] == old  # attempt 1 goes on
    wait_until(lambda: read_events(second, run_id)[-1]["type"] != "RunCreated")
    kinds = [(e["type"], e.get("attempt")) for e in read_events(second, run_id)]
    assert ("AttemptInterrupted", 1) not in kinds and ("AttemptClaimed", 2) not in kinds
    assert step_running(second, run_id, "long", 1)

    status = notify.wait_for("STATUS=")
    assert status == "STATUS=1 active run(s), 1 step(s) running"
    second.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert second.proc.wait(30) == 0
    assert alive(old) == old  # a stop leaves it running too


def test_watchdog_pings_and_a_stop_that_waits_for_kill_grace(
        daemon: Callable[..., Daemon], wfd_tmp: Path, notify: NotifySocket) -> None:
    started = wfd_tmp / "started"
    grace = 2
    wf = write_workflow(wfd_tmp, {"name": "stubborn", "steps": [
        {"id": "stubborn", "command": [PY, "-c", STUBBORN, str(started)], "kill_grace": grace},
    ]})
    # WatchdogSec=1s: systemd aborts a daemon silent for 1 s, so it pings every 0.5 s.
    d = daemon(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    notify.wait_for("READY=1")
    run_id = d.submit(wf)
    wait_until(lambda: started.exists() and step_running(d, run_id, "stubborn", 1))
    notify.wait_for("WATCHDOG=1")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        notify.receive(2.0 - (time.monotonic() - t0))
    pings = [t for t, _ in notify.lines("WATCHDOG=1")]
    assert len(pings) >= 4, notify.messages
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 0.9, gaps  # well inside the 1 s the watchdog allows
    assert ("STATUS=1 active run(s), 1 step(s) running"
            in [line for _, line in notify.lines("STATUS=")])

    # Issue 12: only `wfctl shutdown --stop-steps` stops the steps (a plain SIGTERM leaves
    # them to the keeper, tested above); that stop waits out the kill_grace.
    stop_sent = time.monotonic()
    assert d.wfctl("shutdown", "--stop-steps").returncode == 0
    notify.wait_for("STOPPING=1")
    extend = notify.wait_for("EXTEND_TIMEOUT_USEC=")
    # More than the step's kill_grace, sent before the wait for it, not after.
    assert int(extend.split("=", 1)[1]) >= grace * 1_000_000
    assert d.proc.poll() is None
    assert d.proc.wait(30) == 0
    assert time.monotonic() - stop_sent >= grace  # SIGTERM was ignored: the grace ran out
    assert not step_procs({run_id}, d.mark)
    events = read_events(d, run_id)
    assert (events[-1]["type"], events[-1]["reason"]) == ("AttemptInterrupted", "daemon stopped")


# ------------------------------------------------------------------ socket activation

QUICK = {"name": "quick", "steps": [
    {"id": "a", "command": "echo a"},
    {"id": "b", "command": "echo b", "depends_on": ["a"]},
]}


def launch(d: Daemon, argv: list[str], **popen: object) -> None:
    """Start `d` with `argv` instead of its own command line (as Daemon.start does:
    stderr to its log, a session of its own), without waiting for it."""
    with open(d.log_path, "ab") as log:
        log.write(f"---- start {' '.join(argv)}\n".encode())
        log.flush()
        d.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  env=d.env, cwd=d.root, start_new_session=True, **popen)


# Moves fd argv[1] to fd 3, sets LISTEN_PID to its own pid, and execs argv[2:]: what
# systemd does between fork and exec (the pid is known only in the child).
AS_SYSTEMD = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
              "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])")


def start_on_socket(d: Daemon, listener: socket.socket) -> None:
    """Start `d` as systemd starts a socket unit's service: `listener` as fd 3,
    LISTEN_FDS=1 (in d.env) and LISTEN_PID the daemon's own pid."""
    fd = listener.fileno()
    assert fd != 3
    launch(d, [PY, "-c", AS_SYSTEMD, str(fd), *d.argv], pass_fds=[fd])


def wfctl_at(d: Daemon, path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_wfctl("--socket", str(path), *args, mark=d.mark, cwd=d.root)


def test_socket_passed_as_fd_3(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    path = wfd_tmp / "unit.sock"  # the socket unit's: the test made it, not the daemon
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    inode = path.stat().st_ino
    env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "wfd.socket"}
    # --socket names another path: the daemon must serve the socket it was given.
    d = daemon(env=env, start=False)
    try:
        start_on_socket(d, listener)
        wf = write_workflow(wfd_tmp, QUICK)
        done = wfctl_at(d, path, "run", str(wf), "--wait")
        assert done.returncode == 0, (done.stderr, d.log_text())
        status = wfctl_at(d, path, "status", done.stdout.strip(), "--json")
        assert json.loads(status.stdout)["state"] == "SUCCEEDED"
        assert not d.socket.exists()  # it bound nothing of its own
        assert "socket from systemd" in d.log_text()
        assert d.stop() == 0
        # The socket unit's socket is left as it was: same node, still listening, so
        # a client connects while no daemon runs and is served by the next one.
        assert path.stat().st_ino == inode
        d2 = daemon(name="again", state_dir=d.state_dir, env=env, start=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:
            early.settimeout(30)
            early.connect(str(path))  # queued by the kernel: nobody accepts yet
            start_on_socket(d2, listener)
            protocol.send(early, protocol.Hello(client="tests"))
            assert isinstance(protocol.recv_reply(early), protocol.HelloReply)
        assert wfctl_at(d2, path, "status").returncode == 0
        assert d2.stop() == 0
        assert path.stat().st_ino == inode
    finally:
        listener.close()


def test_systemd_socket_activate_starts_it_on_the_first_client(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    d = daemon(start=False)
    # It passes only the variables named with -E; it execs the daemon (same pid)
    # once the first client connects, handing over its listening socket as fd 3.
    keep = ["PYTHONPATH", MARK_VAR, "PATH"]
    argv = [activate, "-l", str(d.socket), "--fdname=wfd.socket",
            *[f"-E{name}={d.env[name]}" for name in keep], *d.argv]
    launch(d, argv)
    wait_until(d.socket.exists, 10, message="systemd-socket-activate to listen")
    inode = d.socket.stat().st_ino
    assert psutil.Process(d.proc.pid).name() == "systemd-socket-activate"  # no daemon yet

    first = d.wfctl("status")
    assert first.returncode == 0, (first.stderr, d.log_text())
    assert "socket from systemd" in d.log_text()
    assert psutil.Process(d.proc.pid).cmdline()[1:3] == ["-m", "wfd"]  # the same pid
    wf = write_workflow(wfd_tmp, QUICK)
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 0, done.stderr
    assert d.stop() == 0
    assert d.socket.stat().st_ino == inode  # not unlinked, not replaced


# ------------------------------------------------------------------ the journal


def test_journal_lines_carry_priorities_one_per_transition(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    # systemd sets $JOURNAL_STREAM to the device:inode of the stream it gave as stderr.
    stderr = wfd_tmp / "journal.stderr"
    stderr.touch()
    info = stderr.stat()
    d = daemon(name="journal", env={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    assert d.log_path == stderr
    wf = write_workflow(wfd_tmp, {"name": "two", "steps": [
        {"id": "ok", "command": "true"},
        {"id": "bad", "command": "exit 3", "depends_on": ["ok"]},
    ]})
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    run_id = done.stdout.strip()
    # A step that outlives its kill_grace when the daemon stops: a warning.
    started = wfd_tmp / "started"
    stubborn = write_workflow(wfd_tmp, {"name": "stubborn", "steps": [
        {"id": "s", "command": [PY, "-c", STUBBORN, str(started)], "kill_grace": 0.2},
    ]}, name="stubborn.json")
    d.submit(stubborn)
    wait_until(started.exists)
    assert d.stop() == 0

    lines = [line for line in stderr.read_text().splitlines()
             if not line.startswith("---- start ")]  # the test's own marker
    assert lines and all(re.match(r"<[0-7]>\S", line) for line in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\dT", line) for line in lines)  # journald stamps
    # One line per event of the run, in order, at level info.
    ours = [line for line in lines if run_id in line]
    events = read_events(d, run_id)
    assert len(ours) == len(events), (ours, events)
    assert all(line.startswith(f"<6>{run_id} ") for line in ours)
    assert ours[-1].endswith("run: FAILED")
    assert [line for line in lines if line.startswith("<4>")
            and line.endswith("still running 0.2 s after SIGTERM, sending SIGKILL")]


# ------------------------------------------------------------------ boot resume


def unfinished_runs(d: Daemon, root: Path) -> tuple[dict[str, list[str]], Path]:
    """Three runs whose gated steps run until `gate` exists: {run id: gated steps}."""
    gate = root / "gate"
    gated = [PY, "-c", GATED, str(gate)]
    workflows = [
        {"name": "one", "steps": [{"id": "g", "command": gated, "kill_grace": 1}]},
        {"name": "chain", "steps": [
            {"id": "first", "command": "true"},
            {"id": "g", "command": gated, "depends_on": ["first"], "kill_grace": 1},
        ]},
        {"name": "wide", "steps": [
            {"id": "g1", "command": gated, "kill_grace": 1},
            {"id": "g2", "command": gated, "kill_grace": 1},
        ]},
    ]
    runs = {}
    for i, obj in enumerate(workflows):
        run_id = d.submit(write_workflow(root, obj, name=f"wf{i}.json"))
        runs[run_id] = [s["id"] for s in obj["steps"] if s["command"] is gated]
    for run_id, steps in runs.items():
        for step in steps:
            wait_until(lambda r=run_id, s=step: step_running(d, r, s, 1))
    wait_until(lambda: len(step_procs(set(runs), d.mark)) == 4)
    return runs, gate


def reboot(d: Daemon, run_ids: set[str]) -> None:
    """What a power cut leaves: no daemon, no keeper, no step, the state dir as it was."""
    d.kill()
    d.kill_keeper()
    kill_steps(run_ids, d.mark)


def attempts_running(d: Daemon, runs: dict[str, list[str]], attempt: int) -> bool:
    return all(step_running(d, run_id, step, attempt)
               for run_id, steps in runs.items() for step in steps)


def test_boot_resumes_every_unfinished_run_by_itself(
        daemon: Callable[..., Daemon], wfd_tmp: Path, notify: NotifySocket) -> None:
    before = daemon(name="before")
    runs, gate = unfinished_runs(before, wfd_tmp)
    reboot(before, set(runs))

    # Started as systemd starts it at boot; nobody types a command but `status`.
    boot = daemon(name="boot", state_dir=before.state_dir, socket=before.socket,
                  env={"NOTIFY_SOCKET": str(notify.path)}, start=False)
    boot.start(wait=False)
    assert notify.wait_for("READY=1") == "READY=1\nSTATUS=3 active run(s)"
    assert attempts_running(boot, runs, 2)
    attempts = sorted(p.environ()["WFD_ATTEMPT"] for p in step_procs(set(runs), boot.mark))
    assert attempts == ["2"] * 4
    gate.touch()
    for run_id in runs:
        status = wait_for_state(boot, run_id, "SUCCEEDED", "FAILED")
        assert status["state"] == "SUCCEEDED", status
        for step, rec in status["steps"].items():
            assert rec["attempts"] == (1 if step == "first" else 2), (step, rec)


def test_no_resume_waits_for_resume_all(
        daemon: Callable[..., Daemon], wfd_tmp: Path, notify: NotifySocket) -> None:
    before = daemon(name="before")
    runs, gate = unfinished_runs(before, wfd_tmp)
    reboot(before, set(runs))
    logs = {run_id: read_events(before, run_id) for run_id in runs}

    boot = daemon(name="boot", state_dir=before.state_dir, socket=before.socket,
                  extra=["--no-resume"], env={"NOTIFY_SOCKET": str(notify.path)})
    assert notify.wait_for("READY=1") == "READY=1\nSTATUS=0 active run(s)"
    assert notify.wait_for("STATUS=") == "STATUS=0 active run(s), 0 step(s) running"
    assert {run_id: read_events(boot, run_id) for run_id in runs} == logs  # left alone
    assert not step_procs(set(runs), boot.mark)

    done = boot.wfctl("resume-all")
    assert done.returncode == 0, done.stderr
    assert sorted(re.findall(r"run (\S+) resumed", done.stderr)) == sorted(runs)
    wait_until(lambda: attempts_running(boot, runs, 2))
    gate.touch()
    for run_id in runs:
        assert wait_for_state(boot, run_id, "SUCCEEDED", "FAILED")["state"] == "SUCCEEDED"
    again = boot.wfctl("resume-all")
    assert (again.returncode, again.stderr.strip()) == (0, "no runs to resume")


# Sets RLIMIT_FSIZE to argv[1] bytes, then execs argv[2:]: no file grows past that.
# Only the soft limit, so the test can lift it again (prlimit, no CAP_SYS_RESOURCE).
FSIZE_LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); "
                 "resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY)); "
                 "os.execv(sys.argv[2], sys.argv[2:])")


def test_ready_with_the_reason_when_the_resume_cannot_be_recorded(
        daemon: Callable[..., Daemon], wfd_tmp: Path, notify: NotifySocket) -> None:
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"name": "gated", "steps": [
        {"id": "g", "command": [PY, "-c", GATED, str(gate)], "kill_grace": 1},
    ]})
    first = daemon(name="first")
    run_id = first.submit(wf)
    wait_until(lambda: step_running(first, run_id, "g", 1))
    reboot(first, {run_id})
    events = first.state_dir / "runs" / run_id / "events.jsonl"
    size = events.stat().st_size

    # Not one more byte fits in the log (EFBIG): the resume cannot be recorded. The
    # daemon must still get ready, or systemd kills it at TimeoutStartSec, again and again.
    second = daemon(name="second", state_dir=first.state_dir, socket=first.socket,
                    extra=["--log-level", "error"], start=False,
                    env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    launch(second, [PY, "-c", FSIZE_LIMITED, str(size), *second.argv])
    # READY=1 comes once the logs are folded and the socket serves (issue 10): the
    # resume's first write fails after it, and STATUS= says why.
    assert notify.wait_for("READY=1") == "READY=1\nSTATUS=1 active run(s)"
    notify.wait_for("STATUS=cannot persist events: File too large; 1 active run(s), "
                    "0 step(s) running", timeout=10)
    assert events.stat().st_size == size
    assert not step_procs({run_id}, first.mark)  # nothing acted on the unrecorded claim

    # The disk heals (the limit is lifted from outside): the run goes on by itself.
    psutil.Process(second.proc.pid).rlimit(psutil.RLIMIT_FSIZE,
                                           (psutil.RLIM_INFINITY, psutil.RLIM_INFINITY))
    wait_until(lambda: step_running(second, run_id, "g", 2), 20, message="attempt 2")
    notify.wait_for("STATUS=1 active run(s), 1 step(s) running", timeout=10)  # error gone
    gate.touch()
    assert wait_for_state(second, run_id, "SUCCEEDED", "FAILED")["state"] == "SUCCEEDED"


# ------------------------------------------------------------------ a real user manager

SYSTEMD = next((p for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
                if os.access(p, os.X_OK)), None)
SYSTEMCTL = shutil.which("systemctl")
VENV_WFD = Path(sys.executable).parent / "wfd"  # the installed console script
BOOTED_FLAG = Path("/run/systemd/system")  # sd_booted(3): what `systemd --user` checks


def cgroup_dirs(name: str) -> list[Path]:
    """Where a cgroup `name` goes in each hierarchy systemd tracks processes with:
    cgroup2 alone (unified), or the named v1 `systemd` one plus cgroup2 (hybrid)."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root / name]
    dirs = [root / "systemd" / name]
    if (root / "unified" / "cgroup.controllers").exists():
        dirs.append(root / "unified" / name)
    return dirs


def remove_cgroup(top: Path) -> list[str]:
    """Kill what is left in the cgroup tree `top` (its membership proves it ours: only
    the manager the test started, and what it started, was ever put there) and remove
    it, deepest first. The pids it had to kill."""
    killed: list[str] = []
    if not top.exists():
        return killed
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in [*dirs, top]:
        for _ in range(100):
            pids = (directory / "cgroup.procs").read_text().split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        directory.rmdir()
    return killed


class ManagerFailed(Exception):
    """`systemd --user` did not come up: its own reason, from its log."""


class UserManager:
    """`systemd --user` started by the test, in a cgroup of its own, with a private
    $XDG_RUNTIME_DIR and $XDG_CONFIG_HOME; `systemctl` talks to it."""

    def __init__(self, root: Path, mark: str) -> None:
        self.root = root
        self.runtime = root / "rt"
        self.config = root / "cfg"
        self.units = self.config / "systemd" / "user"
        self.log = root / "manager.log"
        self.cgroups = cgroup_dirs(f"wfdtest-{mark[:12]}")
        self.created: list[Path] = []  # of /run/systemd/system and its parents, top first
        self.proc: subprocess.Popen | None = None
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
            "XDG_RUNTIME_DIR": str(self.runtime), "XDG_CONFIG_HOME": str(self.config),
            "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_COLOR": "0", MARK_VAR: mark,
        }

    def start(self) -> None:
        self.runtime.mkdir(mode=0o700)
        self.units.mkdir(parents=True)
        # An empty target as the default unit: nothing of /etc/systemd/user starts.
        (self.units / "wfdtest.target").write_text("[Unit]\nDescription=wfd test\n")
        for directory in [*reversed(BOOTED_FLAG.parents[:-2]), BOOTED_FLAG]:
            try:
                directory.mkdir(mode=0o755)
                self.created.append(directory)
            except FileExistsError:
                pass
        for directory in self.cgroups:
            directory.mkdir()
        procs = [str(d / "cgroup.procs") for d in self.cgroups]

        def join_cgroup() -> None:  # in the child, before exec: never the caller's cgroup
            for path in procs:
                with open(path, "w") as f:
                    f.write("0")

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SYSTEMD, "--user", "--unit=wfdtest.target"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, env=self.env, cwd=self.root, start_new_session=True,
                preexec_fn=join_cgroup,
            )
        wait_until(lambda: self.proc.poll() is not None or self.state() in ("running",
                                                                            "degraded"),
                   20, interval=0.05, message="the user manager to run")
        if self.proc.poll() is not None:
            raise ManagerFailed(f"systemd --user exited with status {self.proc.returncode}: "
                                f"{self.log.read_text(errors='replace')[-2000:]}")

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([SYSTEMCTL, "--user", "--no-pager", *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr, self.log_text())
        return done

    def state(self) -> str:
        return self.systemctl("is-system-running", check=False).stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def log_text(self) -> str:
        parts = []
        for path in (self.log, self.root / "wfd-unit.log"):
            try:
                parts.append(f"--- {path.name}\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-60:]))
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self) -> list[str]:
        """Stop the manager (SIGTERM: it stops every unit and exits), remove its
        cgroups and, if the test made it, /run/systemd/system. Problems, if any."""
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                problems.append("the user manager ignored SIGTERM for 30 s")
        for directory in reversed(self.cgroups):
            try:
                killed = remove_cgroup(directory)
            except OSError as exc:
                problems.append(f"cannot remove cgroup {directory}: {exc}")
                continue
            if killed:
                problems.append(f"processes left in {directory}: {killed}")
        for directory in reversed(self.created):
            try:
                directory.rmdir()
            except OSError as exc:
                problems.append(f"cannot remove {directory}: {exc}")
        return problems


def _why_no_user_manager() -> str | None:
    if SYSTEMD is None or SYSTEMCTL is None:
        return "systemd or systemctl is not installed"
    if os.geteuid() != 0:
        return ("starting `systemd --user` in a cgroup of its own needs root here "
                "(creating /run/systemd/system and a cgroup)")
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        return None  # a real systemd machine: it has the flag, our cgroup sits below its
    if not Path("/sys/fs/cgroup/cgroup.procs").exists() and not Path(
            "/sys/fs/cgroup/systemd/cgroup.procs").exists():
        return "no cgroup hierarchy systemd can use (/sys/fs/cgroup/{,systemd/}cgroup.procs)"
    return None


@pytest.fixture
def user_manager(wfd_tmp: Path, sandbox: Any) -> Iterator[UserManager]:
    why = _why_no_user_manager()
    if why:
        pytest.skip(f"cannot start a user manager: {why}")
    manager = UserManager(wfd_tmp, sandbox.mark)
    # One manager at a time on this machine: they share /run/systemd/system, which the
    # first may have made and will remove.
    lock = os.open("/run", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manager.start()
        except BaseException as exc:
            problems = manager.stop()
            if isinstance(exc, (OSError, subprocess.SubprocessError, ManagerFailed)):
                pytest.skip(f"cannot start a user manager here: {exc} {problems or ''}")
            raise
        try:
            yield manager
        finally:
            problems = manager.stop()
            if problems:
                pytest.fail("\n".join(problems) + "\n" + manager.log_text(), pytrace=False)
    finally:
        os.close(lock)


def test_user_service_under_a_real_user_manager(
        user_manager: UserManager, wfd_tmp: Path, sandbox: Any) -> None:
    if not os.access(VENV_WFD, os.X_OK):
        pytest.skip(f"no installed wfd next to {sys.executable}")
    um = user_manager
    mark = sandbox.mark
    # The test's own settings as a drop-in, which `install-units` leaves alone: the
    # state dir in the sandbox, the mark, the daemon's stderr in a file (no journald
    # here), and a watchdog short enough to bite during the test.
    dropin = um.units / "wfd.service.d"
    dropin.mkdir(parents=True)
    unit_log = wfd_tmp / "wfd-unit.log"
    (dropin / "test.conf").write_text(
        "[Service]\n"
        f"Environment=XDG_STATE_HOME={wfd_tmp / 'state'} {MARK_VAR}={mark}\n"
        f"StandardOutput=append:{unit_log}\nStandardError=append:{unit_log}\n"
        "WatchdogSec=2s\n")
    installed = subprocess.run([str(VENV_WFD), "install-units", "--user"], env=um.env,
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    service = (um.units / "wfd.service").read_text()
    assert f"ExecStart={VENV_WFD}\n" in service
    # It reloaded our manager itself, so daemon-reload is not among the next steps.
    assert "daemon-reload" not in installed.stdout, installed.stdout
    assert "systemctl --user enable --now wfd.socket wfd.service" in installed.stdout
    assert um.show("wfd.service", "FragmentPath") == str(um.units / "wfd.service")

    um.systemctl("start", "wfd.socket")
    sock = um.runtime / "wfd" / "wfd.sock"  # %t/wfd/wfd.sock
    assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert um.show("wfd.service", "ActiveState") == "inactive"

    # wfctl finds the socket by itself ($XDG_RUNTIME_DIR); its first request starts wfd.
    client = {"XDG_RUNTIME_DIR": str(um.runtime)}

    def wfctl(*args: str) -> subprocess.CompletedProcess:
        return run_wfctl(*args, mark=mark, env=client, cwd=wfd_tmp)

    quick = write_workflow(wfd_tmp, QUICK)
    done = wfctl("run", str(quick), "--wait")
    assert done.returncode == 0, (done.stderr, um.log_text())
    assert um.show("wfd.service", "ActiveState") == "active"
    assert (wfd_tmp / "state" / "wfd" / "runs" / done.stdout.strip()).is_dir()
    assert "socket from systemd" in unit_log.read_text()
    assert "active run(s)" in um.show("wfd.service", "StatusText")  # STATUS= arrived
    pinged = [um.show("wfd.service", "WatchdogTimestampMonotonic")]
    wait_until(lambda: pinged.append(um.show("wfd.service", "WatchdogTimestampMonotonic"))
               or len(set(pinged)) >= 3, 10, interval=0.2, message="two WATCHDOG=1 pings")

    gate = wfd_tmp / "gate"
    long = write_workflow(wfd_tmp, {"name": "long", "steps": [
        {"id": "g", "command": [PY, "-c", GATED, str(gate)], "kill_grace": 1},
    ]}, name="long.json")
    done = wfctl("run", str(long))
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()

    def step(attempt: int) -> bool:
        status = wfctl("status", run_id, "--json")  # may find wfd restarting: retry
        if status.returncode != 0:
            return False
        rec = json.loads(status.stdout)["steps"]["g"]
        return rec["state"] == "RUNNING" and rec["attempts"] == attempt and bool(
            [p for p in step_procs({run_id}, mark)
             if p.environ().get("WFD_ATTEMPT") == str(attempt)])

    wait_until(lambda: step(1), 20, message="attempt 1 to run")
    first = step_procs({run_id}, mark)
    assert all(p.environ().get(MARK_VAR) == mark for p in first)  # proven ours

    def pid() -> int:
        return int(um.show("wfd.service", "MainPID") or 0)

    # Issue 12 changed what follows on purpose: steps outlive the daemon. KillMode=process:
    # `systemctl --user restart wfd` signals the daemon only; the keeper and the step go
    # on, and the new daemon re-attaches to the same attempt.
    old_pid = pid()
    um.systemctl("restart", "wfd.service")
    wait_until(lambda: pid() not in (0, old_pid), 20, message="systemd to restart wfd")
    wait_until(lambda: step(1), 20, message="attempt 1 to be re-attached")
    assert alive(first) == first  # the same processes, never restarted

    # `systemctl stop wfd`: the daemon exits 0 (not restarted); the step goes on.
    um.systemctl("stop", "wfd.service")
    assert (um.show("wfd.service", "ActiveState"), um.show("wfd.service", "Result")) == (
        "inactive", "success")
    assert alive(first) == first
    events_path = wfd_tmp / "state" / "wfd" / "runs" / run_id / "events.jsonl"
    assert "AttemptInterrupted" not in events_path.read_text()

    # The socket stayed: the next wfctl starts wfd again, which re-attaches.
    wait_until(lambda: step(1), 20, message="attempt 1 after the stop")
    old_pid = pid()
    daemon_proc = psutil.Process(old_pid)
    assert daemon_proc.environ().get(MARK_VAR) == mark  # proven ours before the kill
    daemon_proc.kill()

    # Restart=on-failure: systemd restarts wfd; with KillMode=process it kills only the
    # main process, so the step is still attempt 1 under the same keeper.
    wait_until(lambda: pid() not in (0, old_pid), 20, message="systemd to restart wfd")
    wait_until(lambda: step(1), 20, message="attempt 1 after the crash")
    assert alive(first) == first
    assert um.show("wfd.service", "NRestarts") == "1"  # the kill's: the watchdog never bit
    gate.touch()
    wait_until(lambda: json.loads(wfctl("status", run_id, "--json").stdout)["state"]
               == "SUCCEEDED", 20, message="the run to succeed")
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    assert [e["attempt"] for e in events if e["type"] == "AttemptClaimed"] == [1]
    [started_event] = [e for e in events if e["type"] == "AttemptStarted"]
    assert started_event["pid"] in {p.pid for p in first}

    um.systemctl("stop", "wfd.socket", "wfd.service")
    assert [um.show(unit, "ActiveState") for unit in ("wfd.socket", "wfd.service")] == [
        "inactive", "inactive"]
    # KillMode=process left the keeper; with no daemon and no step it exits by itself.
    lock = wfd_tmp / "state" / "wfd" / "keeper" / "lock"
    wait_until(lambda: not keeper_alive(lock.parent), 10, message="the keeper to exit")
