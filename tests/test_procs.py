"""The local executor (wfd/procs.py) on its own: real processes, an asyncio loop, no daemon.

The test process plays the daemon: `LocalExecutor.install` makes it a child
subreaper with a SIGCHLD reaper on a fresh loop (both undone at teardown).
Every process a test starts carries the sandbox's mark, so the `sandbox`
fixture fails the test if one is left behind; a test that leaves a process
alive on purpose (a stranger that must not be signalled) kills it itself.
Steps of another user (`nobody`) need root.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import base_env, pid_gone, pids_in, wait_until

from wfd import procs
from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt, StartInfo
from wfd.users import UserIds

PY = sys.executable
# Ignores SIGTERM, says so, then sleeps: only SIGKILL ends it.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(sys.argv[1], 'w').write('ready'); time.sleep(120)")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run steps as nobody")


class Harness:
    """An executor on its own loop, recording each attempt's end."""

    def __init__(self, root: Path, mark: str) -> None:
        self.root = root
        self.mark = mark
        self.loop = asyncio.new_event_loop()
        self.ended: dict[AttemptKey, tuple[int | None, str | None, str | None]] = {}
        self.ex = procs.LocalExecutor(self._on_end)
        self.ex.install(self.loop)
        self.count = 0

    def _on_end(self, key: AttemptKey, code: int | None, reason: str | None,
                start_error: str | None = None,
                usage: tuple[float, int] | None = None) -> None:
        assert key not in self.ended, f"{key} ended twice"
        self.ended[key] = (code, reason, start_error)
        if start_error is None:  # a leader we reaped: wait4 measured it
            assert usage is not None and usage[0] >= 0 and usage[1] > 0, (key, usage)

    def key(self) -> AttemptKey:
        self.count += 1
        return AttemptKey("run-procs", f"step{self.count}", 1)

    def env(self, key: AttemptKey | None = None, **extra: str) -> dict[str, str]:
        env = base_env(self.mark)
        if key is not None:
            env.update(zip((procs.MARK_RUN, procs.MARK_STEP, procs.MARK_ATTEMPT), key.marks(),
                           strict=True))
        env.update(extra)
        return env

    def start(self, argv: list[str], key: AttemptKey | None = None, grace: float = 5.0,
              user: UserIds | None = None, cwd: Path | str | None = None,
              env: dict[str, str] | None = None) -> tuple[AttemptKey, StartInfo]:
        key = key or self.key()
        log_path = self.root / f"{key.step}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            info = self.ex.start(AttemptSpec(
                key=key, argv=argv, env=env or self.env(key), cwd=str(cwd or self.root),
                log_fd=fd, umask=0o022, kill_grace=grace, user=user))
        finally:
            os.close(fd)
        return key, info

    def log(self, key: AttemptKey) -> str:
        return (self.root / f"{key.step}.log").read_text()

    def run_until(self, predicate: Callable[[], Any], timeout: float = 15.0,
                  what: str = "") -> None:
        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.01)

        try:
            self.loop.run_until_complete(asyncio.wait_for(poll(), timeout))
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out after {timeout:g} s waiting for "
                                 f"{what or predicate}") from None

    def end_of(self, key: AttemptKey, timeout: float = 15.0) -> tuple:
        self.run_until(lambda: key in self.ended, timeout, f"the end of {key}")
        return self.ended[key]

    def close(self) -> None:
        try:
            self.loop.run_until_complete(
                asyncio.wait_for(self.ex.stop_all("stop", force=True), 30))
        finally:
            self.loop.close()
            procs.become_subreaper(False)


@pytest.fixture
def harness(sandbox: Any) -> Iterator[Harness]:
    h = Harness(sandbox.root, sandbox.mark)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times of every pass over /proc the executor makes."""
    calls: list[float] = []
    real = procs.proc_table

    def counted(floor: int = 0) -> dict:
        calls.append(time.monotonic())
        return real(floor)

    monkeypatch.setattr(procs, "proc_table", counted)
    return calls


def ticks(h: Harness, scans: list[float], n: int) -> None:
    """Let the executor make `n` more passes over /proc."""
    goal = len(scans) + n
    h.run_until(lambda: len(scans) >= goal, what=f"{n} scans")


def alive(pid: int) -> bool:
    return not pid_gone(pid)


def stranger(h: Harness, argv: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                            **popen)


def finish(proc: subprocess.Popen) -> None:
    """Kill a process the test started itself (its Popen proves it is that one)."""
    proc.kill()
    proc.wait(10)


def nobody() -> UserIds:
    entry = pwd.getpwnam("nobody")
    return UserIds(entry.pw_uid, entry.pw_gid, ())


# ---- spawn, reap, identify ----------------------------------------------------------


def test_exit_status_start_time_and_kill(harness: Harness) -> None:
    exits, _ = harness.start([PY, "-c", "raise SystemExit(3)"])
    sleeper, info = harness.start([PY, "-c", "import time; time.sleep(60)"])
    assert harness.end_of(exits) == (3, None, None)
    known = harness.ex.identify(info)
    assert known.start_time == pytest.approx(psutil.Process(info.pid).create_time(), abs=0.05)
    harness.ex.kill(sleeper, "cancel")
    assert harness.end_of(sleeper) == (-signal.SIGTERM, "cancel", None)
    assert pid_gone(info.pid)
    assert harness.ex.identify(info).start_time == 0.0  # reaped: its pid names no one now
    assert harness.ex.running == 0


TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out = sys.argv[1]
    pids = [subprocess.Popen(["sleep", "60"]).pid,
            subprocess.Popen(["sleep", "60"], start_new_session=True).pid,
            subprocess.Popen([sys.executable, "-c", sys.argv[2], out + ".stubborn"]).pid]
    if os.fork() == 0:  # double fork: the grandchild is an orphan in a session of its own
        os.setsid()
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
    while not os.path.exists(out + ".stubborn"):
        time.sleep(0.01)
    with open(out + ".tmp", "w") as f:
        f.write("\\n".join(map(str, pids)) + "\\n")
    os.rename(out + ".tmp", out)
    if sys.argv[3] == "wait":
        time.sleep(60)
""")


@pytest.mark.parametrize("how", ["kill", "leader exits"])
def test_the_whole_tree_dies(harness: Harness, how: str) -> None:
    out = harness.root / "tree.pids"
    key, info = harness.start([PY, "-c", TREE, str(out), STUBBORN,
                               "wait" if how == "kill" else "exit"], grace=0.5)
    pids = pids_in(out, 3)
    mine = [p.pid for p in psutil.Process().children(recursive=True)
            if procs.marks_of(p.pid) == key.marks()]
    assert len(mine) >= 4, mine  # the three children and the orphan, at least
    if how == "kill":
        harness.ex.kill(key, "timeout")
        assert harness.end_of(key) == (-signal.SIGTERM, "timeout", None)
    else:
        assert harness.end_of(key) == (0, None, None)
    assert [p for p in {*pids, *mine, info.pid} if alive(p)] == []


def test_a_leftover_without_marks_in_the_leaders_session_dies(harness: Harness) -> None:
    """The session counts while the leader is unreaped: its exit is seen before the reap."""
    out, go = harness.root / "bare.pid", harness.root / "go"
    script = (f"env -u {procs.MARK_RUN} -u {procs.MARK_STEP} -u {procs.MARK_ATTEMPT} "
              f"sleep 60 & echo $! > {out}; while [ ! -e {go} ]; do sleep 0.01; done")
    key, _ = harness.start(["/bin/sh", "-c", script])
    [bare] = pids_in(out, 1)
    wait_until(lambda: procs.marks_of(bare) is None)  # env has exec'd sleep
    go.touch()
    assert harness.end_of(key) == (0, None, None)
    assert pid_gone(bare)


# ---- finding the tree: the scan floor, sessions, uids, marks -----------------------------


def test_a_leftover_with_a_lower_pid_than_its_leader_dies(harness: Harness) -> None:
    """Issue 11 finding 5: an attempt older than WINDOW_AGE gets a full scan, so a process
    with its marks below the leader's pid (as after a pid wrap) is found."""
    key = harness.key()
    early = stranger(harness, ["sleep", "60"], harness.env(key))
    _, info = harness.start([PY, "-c", f"import time; time.sleep({procs.WINDOW_AGE * 2})"],
                            key=key)
    assert early.pid < info.pid
    assert harness.end_of(key) == (0, None, None)
    assert pid_gone(early.pid)


def test_a_session_counts_only_while_its_leader_is_unreaped(harness: Harness) -> None:
    """Issue 11 finding 3: once the leader is reaped its pid may be handed out again, and a
    process of the same uid that starts a session with that id is a stranger. It takes
    the pid while the attempt's leftover is waited for (SIGTERM ignored, then SIGKILL)."""
    out = harness.root / "stubborn"
    leftover_script = (f"import os; os.setsid(); exec(compile({STUBBORN!r}, 's', 'exec'))")
    leader = (f"import subprocess, sys, time, os; "
              f"subprocess.Popen([sys.executable, '-c', {leftover_script!r}, {str(out)!r}]); "
              f"[time.sleep(0.01) for _ in range(1000) if not os.path.exists({str(out)!r})]")
    key, info = harness.start([PY, "-c", leader], grace=5)
    harness.run_until(lambda: info.pid not in harness.ex.by_pid and out.exists(),
                      what="the leader reaped, its leftover ignoring SIGTERM")
    assert key not in harness.ended  # dying: the leftover ignores SIGTERM for 5 s
    taker = take_pid(harness, info.pid)
    try:
        assert harness.end_of(key) == (0, None, None)
        assert alive(taker.pid), "a stranger in a session with the old leader's id died"
    finally:
        finish(taker)


def take_pid(h: Harness, pid: int) -> subprocess.Popen:
    """A process of ours, in a session of its own, with pid `pid` (set as the next pid)."""
    for _ in range(200):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot choose the next pid here: {exc}")
        proc = stranger(h, ["sleep", "60"], h.env())
        if proc.pid == pid:
            return proc
        finish(proc)
    pytest.skip(f"pid {pid} was always taken by someone else first")


@ROOT_ONLY
def test_a_process_of_another_uid_is_never_signalled(harness: Harness) -> None:
    """In the leader's session, with the attempt's marks, but not of the attempt's uid."""
    out = harness.root / "other.pid"
    user = nobody()
    leader = textwrap.dedent(f"""
        import os, time
        pid = os.fork()
        if pid == 0:
            os.setgroups([]); os.setgid({user.gid}); os.setuid({user.uid})
            os.execvp("sleep", ["sleep", "60"])
        open({str(out)!r}, "w").write(str(pid))
        time.sleep(60)
    """)
    key, _ = harness.start([PY, "-c", leader], grace=30)
    [other] = pids_in(out, 1)
    wait_until(lambda: psutil.Process(other).uids().real == user.uid)
    assert procs.marks_of(other) == key.marks()
    try:
        harness.ex.kill(key, "cancel")
        assert harness.end_of(key) == (-signal.SIGTERM, "cancel", None)
        assert alive(other), "the daemon signalled a process of another user"
    finally:
        psutil.Process(other).kill()  # ours: started by this test's leader, checked above


@ROOT_ONLY
def test_forged_marks_of_another_uid_are_ignored(harness: Harness, scans: list[float]) -> None:
    """Issue 11 finding 9: another user's process with a victim's marks neither keeps the
    victim's attempt running nor gets signalled."""
    user = nobody()
    key, info = harness.start([PY, "-c", "import time; time.sleep(0.5)"], grace=30)
    forger = stranger(harness, ["sleep", "60"], harness.env(key),
                      user=user.uid, group=user.gid, extra_groups=[], cwd="/")
    try:
        assert harness.end_of(key, timeout=10) == (0, None, None)
        assert alive(forger.pid), "the daemon signalled another user's process"
    finally:
        finish(forger)


# ---- killing ------------------------------------------------------------------------


def test_a_second_kill_with_force_sends_sigkill_at_once(
        harness: Harness, scans: list[float]) -> None:
    """Issue 11 finding 4: cancel (or stop) asked twice does not wait out a long grace."""
    ready = harness.root / "ready"
    key, info = harness.start([PY, "-c", STUBBORN, str(ready)], grace=60)
    wait_until(ready.exists)
    harness.ex.kill(key, "cancel")
    ticks(harness, scans, 3)
    harness.ex.kill(key, "cancel")  # asked again without force: still the grace
    ticks(harness, scans, 3)
    assert key not in harness.ended and alive(info.pid)
    harness.ex.kill(key, "cancel", force=True)
    assert harness.end_of(key, timeout=5) == (-signal.SIGKILL, "cancel", None)


def test_one_scan_per_tick_serves_every_dying_attempt(
        harness: Harness, scans: list[float]) -> None:
    """Issue 10: attempts being killed share each pass over /proc. Each leader leaves a
    child that ignores SIGTERM, so the trees are looked at for the whole grace."""
    count = 8
    leader = ("import subprocess, sys, time, os; "
              f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}, sys.argv[1]]); "
              "[time.sleep(0.01) for _ in range(1000) if not os.path.exists(sys.argv[1])]")
    started = []
    for i in range(count):
        ready = harness.root / f"ready{i}"
        key, _ = harness.start([PY, "-c", leader, str(ready)], grace=1.0)
        started.append((key, ready))
    for _, ready in started:
        wait_until(ready.exists)
    before, t0 = len(scans), time.monotonic()
    for key, _ in started:
        assert harness.end_of(key) == (0, None, None)
    elapsed = time.monotonic() - t0
    made = len(scans) - before
    # one per tick, plus at most one per batch of leaders reaped
    assert made <= elapsed / procs.POLL + count + 3, (made, elapsed)


# ---- clearing a previous daemon's attempts -------------------------------------------


def test_stale_attempts_clear_side_by_side(harness: Harness) -> None:
    """A long kill_grace holds back only its own attempt; force ends it at once."""
    slow_key, quick_key = harness.key(), harness.key()
    ready = harness.root / "ready"
    slow = stranger(harness, [PY, "-c", STUBBORN, str(ready)], harness.env(slow_key))
    quick = stranger(harness, ["sleep", "60"], harness.env(quick_key))
    wait_until(ready.exists)
    cleared: list[AttemptKey] = []
    stale = [StaleAttempt(slow_key, None, None, None, 60.0, os.getuid()),
             StaleAttempt(quick_key, None, None, None, 60.0, os.getuid())]
    task = harness.loop.create_task(harness.ex.clear_stale(stale, cleared.append))
    harness.run_until(lambda: quick_key in cleared, what="the quick attempt cleared")
    assert alive(slow.pid) and not task.done()
    harness.ex.kill(slow_key, "cancel", force=True)
    harness.run_until(task.done, timeout=5, what="the slow attempt cleared")
    task.result()
    assert cleared == [quick_key, slow_key]
    assert pid_gone(slow.pid) and pid_gone(quick.pid)


@ROOT_ONLY
def test_stale_clearing_ignores_marks_of_another_uid(harness: Harness) -> None:
    key = harness.key()
    user = nobody()
    theirs = stranger(harness, ["sleep", "60"], harness.env(key), cwd="/")  # root's
    own = stranger(harness, ["sleep", "60"], harness.env(key), user=user.uid, group=user.gid,
                   extra_groups=[], cwd="/")
    try:
        wait_until(lambda: procs.marks_of(own.pid) == key.marks())
        harness.loop.run_until_complete(asyncio.wait_for(harness.ex.clear_stale(
            [StaleAttempt(key, None, None, None, 60.0, user.uid)]), 15))
        assert pid_gone(own.pid)
        assert alive(theirs.pid), "clearing nobody's attempt signalled root's process"
    finally:
        finish(theirs)


# ---- another user's step: the cwd wrapper ----------------------------------------------


@pytest.fixture
def open_root(harness: Harness) -> Path:
    harness.root.chmod(0o755)  # nobody may enter the sandbox, not what is 0700 in it
    return harness.root


@ROOT_ONLY
def test_a_step_of_another_user_enters_its_cwd_as_that_user(
        harness: Harness, open_root: Path) -> None:
    work = open_root / "work"
    work.mkdir(mode=0o755)
    key = harness.key()
    env = {k: v for k, v in harness.env(key, X="x").items() if k != "OLDPWD"}
    harness.start(["/bin/sh", "-c", 'pwd; id -u; echo "${OLDPWD-unset}|$X"'], key=key,
                  user=nobody(), cwd=work, env=env)
    assert harness.end_of(key) == (0, None, None)
    assert harness.log(key).split("\n") == [str(work), str(nobody().uid), "unset|x", ""]
    key = harness.key()
    harness.start(["/bin/sh", "-c", 'echo "$OLDPWD"'], key=key, user=nobody(), cwd=work,
                  env=harness.env(key, OLDPWD="/old"))
    assert harness.end_of(key) == (0, None, None)
    assert harness.log(key) == "/old\n"


@ROOT_ONLY
def test_why_a_step_of_another_user_cannot_start(harness: Harness, open_root: Path) -> None:
    private = open_root / "private"
    private.mkdir(mode=0o700)
    work = open_root / "work"
    work.mkdir(mode=0o755)
    (work / "notexec").write_text("#!/bin/sh\ntrue\n")
    fds = len(os.listdir("/proc/self/fd"))
    cases = {
        "cannot enter {private} as nobody: Permission denied": (["true"], private),
        "cannot enter {work}/none as nobody: No such file or directory": (["true"],
                                                                          work / "none"),
        "No such file or directory: /nonexistent/prog": (["/nonexistent/prog"], work),
        "No such file or directory: no-such-program": (["no-such-program"], work),
        "Permission denied: ./notexec": (["./notexec"], work),
    }
    for error, (argv, cwd) in cases.items():
        key, _ = harness.start(argv, user=nobody(), cwd=cwd)
        assert harness.end_of(key) == (None, None, error.format(private=private, work=work))
        assert harness.log(key) == ""
    assert len(os.listdir("/proc/self/fd")) == fds  # every report pipe closed
