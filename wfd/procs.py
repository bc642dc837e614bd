"""Processes: spawn an attempt, know its whole tree, kill it, reap everything.

The local executor behind the daemon (docs/design.md, "Executors"): `start`
an attempt, `kill` it, and learn how it ended through `on_end`, called once per
attempt when its leader has exited *and* its whole tree is gone.

Which processes are an attempt's
--------------------------------
The daemon is a child subreaper, so everything a step starts stays below it,
also after a middle process dies. Each leader starts a session of its own
(`setsid`), and every step process carries the marks `WFD_RUN_ID`,
`WFD_STEP_ID` and `WFD_ATTEMPT` in its environment. A process is an attempt's
when it is below the daemon and either is in the leader's session (the session
id stays reserved while any member lives, so it cannot name a stranger) or
carries that attempt's marks, all present and non-empty. After a daemon crash
the old steps are no longer below us: then a process is the attempt's when it
is the recorded leader (same pid, same start time, same boot) or carries the
marks, and so are its descendants. Nothing else is ever signalled, and every
signal goes through psutil, which checks the pid was not reused.

One reaper
----------
Only `reap` waits for children: it collects every exited child, leaders (whose
status is the attempt's outcome) and the orphans the subreaper inherits alike.
Popen objects are disarmed right after the spawn so that subprocess' own
clean-up never steals a leader's status.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import psutil

from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt, StartFailed, StartInfo
from wfd.scheduler import exit_code_of

log = logging.getLogger("wfd")

MARK_RUN = "WFD_RUN_ID"
MARK_STEP = "WFD_STEP_ID"
MARK_ATTEMPT = "WFD_ATTEMPT"
PR_SET_CHILD_SUBREAPER = 36
POLL = 0.02  # seconds between checks while a tree is dying; only during kills
WINDOW_AGE = 0.25  # attempts younger than this are scanned from their leader's pid up
START_TIME_TOLERANCE = 0.05  # create_time is in clock ticks; allow for float rounding


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = boot_id()


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to us instead of to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def read_marks(proc: psutil.Process) -> tuple[str, str, str] | None:
    """The three marks if all are present and non-empty, else None: an absent mark
    must never match an absent mark."""
    try:
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    marks = (env.get(MARK_RUN, ""), env.get(MARK_STEP, ""), env.get(MARK_ATTEMPT, ""))
    return marks if all(marks) else None


class ProcInfo(NamedTuple):
    ppid: int
    sid: int


def last_pid() -> int:
    """The pid the kernel handed out last (in our pid namespace), or -1 if unknown."""
    try:
        with open("/proc/sys/kernel/ns_last_pid", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return -1


def proc_table(floor: int = 0) -> dict[int, ProcInfo]:
    """ppid and session id of every process with a pid >= `floor`, from one pass over
    /proc/*/stat (the stat files are the cost; skipping old pids saves most of it)."""
    table: dict[int, ProcInfo] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) < floor:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        table[int(name)] = ProcInfo(int(fields[1]), int(fields[3]))
    return table


def descendants(table: dict[int, ProcInfo], root: int) -> list[int]:
    """Every process below `root` in `table`, iteratively (trees can be deep)."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: list[int] = []
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie counts as gone (its reaper may not be us)."""
    result = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                result.append(proc)
        except psutil.Error:
            pass
    return result


def send(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses if the pid was reused
        except psutil.Error:
            pass


def spawn(spec: AttemptSpec) -> StartInfo:
    """Start the leader in a session of its own, output straight to its log file."""
    kwargs: dict = {
        "stdin": subprocess.DEVNULL,
        "stdout": spec.log_fd,
        "stderr": spec.log_fd,
        "env": spec.env,
        "start_new_session": True,
        "umask": spec.umask,
        "close_fds": True,
    }
    why_r = why_w = -1
    if spec.user is None:
        kwargs["cwd"] = spec.cwd
    else:
        # subprocess changes directory while still root; enter it as the user instead:
        # preexec_fn runs after setgroups/setgid/setuid. subprocess reports only that
        # preexec_fn failed, so the child writes why to a pipe (close-on-exec) first.
        why_r, why_w = os.pipe()
        cwd = spec.cwd

        def enter_cwd() -> None:
            try:
                os.chdir(cwd)
            except OSError as exc:
                os.write(why_w, (exc.strerror or type(exc).__name__).encode()[:200])
                raise

        kwargs.update(
            user=spec.user.uid, group=spec.user.gid, extra_groups=list(spec.user.groups),
            preexec_fn=enter_cwd,
        )
    try:
        popen = subprocess.Popen(spec.argv, **kwargs)
    except subprocess.SubprocessError:
        why = ""
        if why_r >= 0:
            os.close(why_w)  # the child's copy is gone: read to the end of what it said
            why_w = -1
            why = os.read(why_r, 512).decode(errors="replace")
        user = spec.user.uid if spec.user is not None else os.getuid()
        raise StartFailed(f"cannot enter {spec.cwd} as {_user_name(user)}: "
                          f"{why or 'failed before exec'}") from None
    except OSError as exc:
        raise StartFailed(_os_error_text(exc)) from None
    except ValueError as exc:  # an embedded NUL the checks upstream should have refused
        raise StartFailed(str(exc)) from None
    finally:
        for fd in (why_r, why_w):
            if fd >= 0:
                os.close(fd)
    # Disarm: our reaper owns this pid's exit status (see "One reaper").
    popen.returncode = 0
    return StartInfo(popen.pid, None, BOOT_ID)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        text += f": {exc.filename}"
    return text


@dataclass
class _Attempt:
    key: AttemptKey
    pid: int
    grace: float
    status: int | None = None  # the leader's wait status, once reaped
    kill_reason: str | None = None
    killing: asyncio.Task | None = None
    extra: list[psutil.Process] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class LocalExecutor:
    """Runs attempts as local process trees; calls `on_end(key, exit_code, kill_reason)`
    once per attempt, after its leader exited and every process of it is gone."""

    def __init__(self, on_end: Callable[[AttemptKey, int | None, str | None], None]) -> None:
        self.on_end = on_end
        self.attempts: dict[AttemptKey, _Attempt] = {}
        self.by_pid: dict[int, _Attempt] = {}
        self._settle_scheduled = False
        self._exited: list[_Attempt] = []
        self.pid = os.getpid()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        become_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.loop = loop

    # -- start ---------------------------------------------------------------------

    def start(self, spec: AttemptSpec) -> StartInfo:
        info = spawn(spec)
        attempt = _Attempt(spec.key, info.pid, spec.kill_grace)
        self.attempts[spec.key] = attempt
        self.by_pid[info.pid] = attempt
        self.reap()  # it may have exited before we registered it
        return info

    def identify(self, info: StartInfo) -> StartInfo:
        """`info` with the leader's start time (0.0 once it is gone: nothing to find).
        Only an unreaped leader is asked: a reaped one's pid may be another process now."""
        start_time = 0.0
        if info.pid in self.by_pid:
            try:
                start_time = psutil.Process(info.pid).create_time()
            except psutil.Error:
                pass
        return info._replace(start_time=start_time)

    @property
    def running(self) -> int:
        return len(self.attempts)

    # -- reaping ------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: leaders' statuses are kept, orphans discarded."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            attempt = self.by_pid.pop(pid, None)
            if attempt is not None:
                attempt.status = status
                self._exited.append(attempt)
                self._schedule_settle()

    def _schedule_settle(self) -> None:
        if not self._settle_scheduled:
            self._settle_scheduled = True
            self.loop.call_soon(self._settle)

    def _settle(self) -> None:
        """Attempts whose leader exited: end them, or first kill what they left behind.
        One scan of /proc serves every attempt that ended since the last call."""
        self._settle_scheduled = False
        exited, self._exited = self._exited, []
        pending = [a for a in exited if a.killing is None]  # a kill task finishes the others
        if not pending:
            return
        left = self._leftovers([a.key for a in pending])
        for attempt in pending:
            procs = left.get(attempt.key)
            if procs:
                log.info("%s: killing %d process(es) left behind", _name(attempt.key), len(procs))
                attempt.extra = procs
                attempt.killing = asyncio.ensure_future(self._terminate(attempt))
            else:
                self._finish(attempt)

    def _finish(self, attempt: _Attempt) -> None:
        self.attempts.pop(attempt.key, None)
        status = attempt.status
        code = None if status is None else exit_code_of(status)
        self.on_end(attempt.key, code, attempt.kill_reason)

    # -- finding a tree ------------------------------------------------------------

    def _owner_of(self, table: dict[int, ProcInfo], pid: int,
                  sessions: dict[int, AttemptKey]) -> AttemptKey | None:
        key = sessions.get(table[pid].sid)
        if key is not None:
            return key
        try:
            marks = read_marks(psutil.Process(pid))
        except psutil.Error:
            return None
        if marks is None:
            return None
        for known in self.attempts:
            if known.marks() == marks:
                return known
        return None

    def _scan_floor(self, attempts: Iterable[_Attempt]) -> int:
        """The lowest pid that can belong to `attempts`: every process of an attempt, and
        every process between it and the daemon, was created after its leader, so has a
        higher pid, unless pids wrapped since. A wrap shows as a last pid below the
        leader's; a full wrap round takes longer than WINDOW_AGE, so older attempts get
        a full scan."""
        now = time.monotonic()
        floor = min((a.pid for a in attempts), default=0)
        if any(now - a.started > WINDOW_AGE for a in attempts) or last_pid() < floor:
            return 0
        return floor

    def _leftovers(self, keys: Iterable[AttemptKey]) -> dict[AttemptKey, list[psutil.Process]]:
        """Processes below the daemon that belong to the attempts `keys`."""
        wanted = set(keys)
        table = proc_table(self._scan_floor(
            self.attempts[k] for k in wanted if k in self.attempts
        ))
        sessions = {a.pid: a.key for a in self.attempts.values()}
        found: dict[AttemptKey, list[psutil.Process]] = {}
        for pid in descendants(table, self.pid):
            key = self._owner_of(table, pid, sessions)
            if key in wanted:
                try:
                    found.setdefault(key, []).append(psutil.Process(pid))
                except psutil.Error:
                    pass
        return found

    def _tree(self, attempt: _Attempt) -> list[psutil.Process]:
        return self._leftovers([attempt.key]).get(attempt.key, [])

    # -- killing ------------------------------------------------------------------

    def kill(self, key: AttemptKey, reason: str) -> None:
        """Kill the attempt's whole tree (idempotent); its end comes through on_end."""
        attempt = self.attempts.get(key)
        if attempt is None or attempt.killing is not None:
            return
        if attempt.status is None:  # a leader that already exited keeps its own outcome
            attempt.kill_reason = reason
        attempt.killing = asyncio.ensure_future(self._terminate(attempt))

    async def _terminate(self, attempt: _Attempt) -> None:
        """SIGTERM to the whole tree, SIGKILL to what is left after the grace, until
        nothing of it is left and the leader is reaped."""
        name = _name(attempt.key)
        send(self._tree(attempt) + attempt.extra, signal.SIGTERM)
        deadline = time.monotonic() + attempt.grace
        while time.monotonic() < deadline:
            if attempt.status is not None and not alive(self._tree(attempt) + attempt.extra):
                break
            await asyncio.sleep(POLL)
        else:
            log.warning("%s: still running %g s after SIGTERM, sending SIGKILL", name,
                        attempt.grace)
        while True:
            left = alive(self._tree(attempt) + attempt.extra)
            if not left and attempt.status is not None:
                break
            send(left, signal.SIGKILL)
            await asyncio.sleep(POLL)
        self._finish(attempt)

    async def stop_all(self, reason: str) -> None:
        """Kill every running attempt and wait until all have ended."""
        for key in list(self.attempts):
            self.kill(key, reason)
        tasks = [a.killing for a in self.attempts.values() if a.killing is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- after a crash: trees of the previous daemon ---------------------------------

    async def clear_stale(self, stale: list[StaleAttempt]) -> None:
        """Make sure no process of the given attempts of a previous daemon is left.

        Those are the processes with an attempt's marks, and the recorded leader (same
        pid, start time and boot), each with its descendants: SIGTERM, then SIGKILL after
        the step's `kill_grace`. A process may start another while it is being killed
        (`trap 'cleanup &' TERM`), and once it exits that one is below nothing we know:
        so the kill is over only when a fresh look for the marks finds nothing left."""
        if not stale:
            return
        wanted = {key.marks(): key for key, *_ in stale}
        graces = {key: grace for key, *_, grace in stale}
        known = _find_marked(wanted)
        for key, pid, start_time, boot, _grace in stale:
            leader = _verified_leader(pid, start_time, boot)
            if leader is not None:
                known.setdefault(key, []).append(leader)
        began = time.monotonic()
        termed: set[int] = set()
        told: set[AttemptKey] = set()
        escalated: set[AttemptKey] = set()
        while True:
            left = _alive_trees(known)
            if not left:  # all we knew of is gone: look again for what started meanwhile
                left = _alive_trees(_find_marked(wanted))
                if not left:
                    return
            now = time.monotonic()
            for key, procs in left.items():
                if key not in told:
                    told.add(key)
                    log.info("%s: killing %d process(es) of the previous daemon",
                             _name(key), len(procs))
                if now < began + graces[key]:
                    send([p for p in procs if p.pid not in termed], signal.SIGTERM)
                    termed.update(p.pid for p in procs)
                else:
                    if key not in escalated:
                        escalated.add(key)
                        log.warning("%s: still running %g s after SIGTERM, sending SIGKILL",
                                    _name(key), graces[key])
                    send(procs, signal.SIGKILL)
            known = left
            await asyncio.sleep(POLL)


def _find_marked(wanted: dict[tuple[str, str, str], AttemptKey],
                 ) -> dict[AttemptKey, list[psutil.Process]]:
    """Every process whose marks are those of one of the `wanted` attempts."""
    found: dict[AttemptKey, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        marks = read_marks(proc)
        if marks is not None and marks in wanted:
            found.setdefault(wanted[marks], []).append(proc)
    return found


def _alive_trees(procs: dict[AttemptKey, list[psutil.Process]],
                 ) -> dict[AttemptKey, list[psutil.Process]]:
    """Those of `procs` still running, with their descendants; attempts with none left out."""
    left = {key: alive(_with_descendants(alive(group))) for key, group in procs.items()}
    return {key: group for key, group in left.items() if group}


def _verified_leader(pid: int | None, start_time: float | None,
                     boot: str | None) -> psutil.Process | None:
    """The recorded leader if it still runs: same pid, start time and boot."""
    if pid is None or start_time is None or not boot or boot != BOOT_ID:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start_time) <= START_TIME_TOLERANCE:
            return proc
    except psutil.Error:
        pass
    return None


def _with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    result: dict[int, psutil.Process] = {}
    for proc in procs:
        result[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                result.setdefault(child.pid, child)
        except psutil.Error:
            pass
    return list(result.values())


def _name(key: AttemptKey) -> str:
    return f"{key.run_id} {key.step}#{key.attempt}"
