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
when it is below the daemon, its real uid is the attempt's (the step's user,
checked when the process is first seen), and either it carries that attempt's
marks, all present and non-empty, or it is in the leader's session while the
leader is not yet reaped. Until we reap it, the leader's pid, and so its
session id, cannot name another process; after that a stranger may get the
pid and start a session with that id. So a leader's exit is first seen while
it is still a zombie (`waitid(WNOWAIT)`), what it left in its session is found
then, and only then is it reaped. Every process found is remembered as a
psutil.Process (pid and start time), and every signal goes through psutil,
which refuses a pid that was reused.

After a crash the old steps are no longer below us: then a process is the
attempt's when it is the recorded leader (same pid, same start time, same
boot) or carries the marks, and so are its descendants; again only processes
of the run owner's uid.

Killing
-------
SIGTERM to every process of the attempt, SIGKILL to what is left after its
`kill_grace` (at once when the kill is asked again with `force`), until
nothing of it is left and its leader is reaped. One task kills every dying
attempt, so one pass over /proc per POLL tick serves them all.

One reaper
----------
Only `reap` waits for children: it collects every exited child, leaders (whose
status is the attempt's outcome) and the orphans the subreaper inherits alike.
Popen objects are disarmed right after the spawn so that subprocess' own
clean-up never steals a leader's status.

Another user's step
-------------------
subprocess enters `cwd` while still root, and its `preexec_fn` (which ran
after setuid) can deadlock a threaded daemon. So a step of another user starts
as `/bin/sh -c CWD_WRAPPER`, already as that user: the shell enters the
directory, checks the program can be found, and execs it. Until that exec its
stdin is a pipe to the daemon: it writes why it could not go on there, and
closes it right before the exec. The daemon reads the pipe from the loop and
never waits for it: a reason read there becomes the attempt's start error.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil

from wfd.cgroups import AttemptCgroups
from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt, StartFailed, StartInfo
from wfd.scheduler import exit_code_of
from wfd.users import name_of

log = logging.getLogger("wfd")

MARK_RUN = "WFD_RUN_ID"
MARK_STEP = "WFD_STEP_ID"
MARK_ATTEMPT = "WFD_ATTEMPT"
_MARK_KEYS = (MARK_RUN.encode(), MARK_STEP.encode(), MARK_ATTEMPT.encode())
PR_SET_CHILD_SUBREAPER = 36
POLL = 0.02  # seconds between checks while a tree is dying; only during kills
WINDOW_AGE = 0.25  # attempts younger than this are scanned from their leader's pid up
START_TIME_TOLERANCE = 0.05  # create_time is in clock ticks; allow for float rounding
REPORT_LIMIT = 4096  # bytes kept of what the cwd wrapper says

# Runs as the step's user: $1 the directory, then the argv. Why it cannot go on goes to
# fd 0 (a pipe to the daemon), closed right before the final exec, so EOF with nothing
# said means the program was exec'd. `cd` does not say why it failed, so on that path
# only, `env --chdir` says it. cd sets OLDPWD to the daemon's directory: put it back.
# The checks stop at what the daemon's own exec would refuse (missing, not executable).
CWD_WRAPPER = """\
set -- "${OLDPWD-}" "${OLDPWD+1}" "$@"
cd -P -- "$3" 2>/dev/null || {
  printf 'cwd ' >&0; /usr/bin/env --chdir="$3" true 2>&0 || exit 127; echo >&0; exit 127; }
if [ "$2" ]; then OLDPWD=$1; else unset OLDPWD; fi
shift 3
command -v -- "$1" >/dev/null 2>&1 || { echo 'exec No such file or directory' >&0; exit 127; }
case $1 in */*) if [ -d "$1" ] || [ ! -x "$1" ]; then
  echo 'exec Permission denied' >&0; exit 127; fi;; esac
exec </dev/null
exec "$@"
"""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = boot_id()


def become_subreaper(on: bool = True) -> bool:
    """Make orphaned descendants reparent to us instead of to init (or stop that)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def marks_of(pid: int) -> tuple[str, str, str] | None:
    """The three marks of process `pid` if all are present and non-empty, else None: an
    absent mark must never match an absent mark. The first of a repeated name counts, as
    for getenv."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    found: dict[bytes, bytes] = {}
    for entry in data.split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name in _MARK_KEYS:
            found.setdefault(name, value)
    marks = tuple(found.get(k, b"").decode(errors="surrogateescape") for k in _MARK_KEYS)
    return marks if all(marks) else None  # type: ignore[return-value]


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


def descendants(table: dict[int, ProcInfo], roots: Iterable[int]) -> list[int]:
    """Every process below any of `roots` in `table`, iteratively (trees can be deep)."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: list[int] = []
    stack = [child for root in roots for child in children.get(root, ())]
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
            with proc.oneshot():
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    result.append(proc)
        except psutil.Error:
            pass
    return result


def process_of(pid: int, uid: int) -> psutil.Process | None:
    """`pid` if it runs (not a zombie) with real uid `uid`: only such a process may be
    signalled for an attempt of that user."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.uids().real == uid and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
    except psutil.Error:
        pass
    return None


def send(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses if the pid was reused
        except psutil.Error:
            pass


# ---- spawning ---------------------------------------------------------------------


def spawn(spec: AttemptSpec) -> tuple[StartInfo, int]:
    """Start the leader in a session of its own, output straight to its log file. The
    second value is the read end of the cwd wrapper's pipe for another user's step (see
    the module's doc), else -1."""
    argv = spec.argv
    kwargs: dict = {
        "stdin": subprocess.DEVNULL, "stdout": spec.log_fd, "stderr": spec.log_fd,
        "env": spec.env, "start_new_session": True, "umask": spec.umask, "close_fds": True,
    }
    report_r = report_w = -1
    if spec.user is None:
        kwargs["cwd"] = spec.cwd
    else:
        report_r, report_w = os.pipe()
        os.set_blocking(report_r, False)
        # "./" keeps a relative cwd away from CDPATH and from `cd -`
        cwd = spec.cwd if spec.cwd.startswith("/") else "./" + spec.cwd
        argv = ["/bin/sh", "-c", CWD_WRAPPER, "wfd-cwd", cwd, *spec.argv]
        kwargs.update(stdin=report_w, cwd="/", user=spec.user.uid, group=spec.user.gid,
                      extra_groups=list(spec.user.groups))
    try:
        popen = subprocess.Popen(argv, **kwargs)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        if report_r >= 0:
            os.close(report_r)
        # ValueError: an embedded NUL the checks upstream should have refused
        raise StartFailed(_os_error_text(exc) if isinstance(exc, OSError) else str(exc)
                          ) from None
    finally:
        if report_w >= 0:
            os.close(report_w)
    # Disarm: our reaper owns this pid's exit status (see "One reaper").
    popen.returncode = 0
    return StartInfo(popen.pid, None, BOOT_ID), report_r


def wrapper_error(said: bytes, cwd: str, uid: int, program: str) -> str | None:
    """The start error the cwd wrapper reported, or None if it said nothing."""
    kind, _, text = said.decode(errors="replace").partition(" ")
    line = text.strip().splitlines()[0] if text.strip() else ""
    if kind == "cwd":
        # `env: cannot change directory to 'DIR': REASON`; DIR may hold ": " itself
        reason = line.rsplit(": ", 1)[-1] if "cannot change directory" in line else ""
        return f"cannot enter {cwd} as {name_of(uid)}: {reason or 'cannot change directory'}"
    if kind == "exec":
        return f"{line}: {program}"
    return None


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        text += f": {exc.filename}"
    return text


# ---- the executor -----------------------------------------------------------------


@dataclass
class _Report:
    """The read end of a cwd wrapper's pipe, and what is needed to word its reason."""

    fd: int
    cwd: str
    uid: int
    program: str
    said: bytes = b""


@dataclass(eq=False)
class _Attempt:
    key: AttemptKey
    pid: int
    grace: float
    uid: int  # the real uid a process must have to be taken for one of its
    status: int | None = None  # the leader's wait status, once reaped
    usage: tuple[float, int] | None = None  # its CPU seconds and peak RSS (KiB), once reaped
    reaped: bool = False
    kill_reason: str | None = None
    dying: bool = False
    deadline: float = 0.0  # monotonic time of the SIGKILL, once dying
    forced: bool = False  # asked again: SIGKILL without waiting out the grace
    escalated: bool = False
    members: dict[int, psutil.Process] = field(default_factory=dict)
    termed: set[psutil.Process] = field(default_factory=set)
    report: _Report | None = None
    started: float = field(default_factory=time.monotonic)
    cgroup: Path | None = None  # its own cgroup leaf, where one could be had


@dataclass(eq=False)
class _Stale:
    """An attempt of a previous daemon being cleared."""

    key: AttemptKey
    uid: int
    grace: float
    deadline: float
    members: dict[int, psutil.Process] = field(default_factory=dict)
    termed: set[psutil.Process] = field(default_factory=set)
    told: bool = False
    forced: bool = False
    escalated: bool = False


class LocalExecutor:
    """Runs attempts as local process trees; calls `on_end(key, exit_code, kill_reason)`
    once per attempt, after its leader exited and every process of it is gone (with
    `start_error=` when the cwd wrapper could not start the program)."""

    def __init__(self, on_end: Callable[..., None],
                 cgroups: AttemptCgroups | None = None) -> None:
        self.on_end = on_end
        self.cgroups = cgroups  # a cgroup leaf per attempt, if one can be had
        self.attempts: dict[AttemptKey, _Attempt] = {}
        self.by_pid: dict[int, _Attempt] = {}  # leaders not yet reaped
        self._settle_scheduled = False
        self._exited: list[_Attempt] = []
        self._dying: dict[AttemptKey, _Attempt] = {}
        self._killer: asyncio.Task | None = None
        self._stale: dict[AttemptKey, _Stale] = {}
        self.pid = os.getpid()
        self.uid = os.getuid()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        become_subreaper()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.loop = loop

    # -- start ---------------------------------------------------------------------

    def start(self, spec: AttemptSpec) -> StartInfo:
        leaf = self._leaf(spec.key)
        if leaf is None:
            info, report_fd = spawn(spec)
        else:
            with self.cgroups.inside(leaf):  # type: ignore[union-attr]
                info, report_fd = spawn(spec)
        uid = self.uid if spec.user is None else spec.user.uid
        attempt = _Attempt(spec.key, info.pid, spec.kill_grace, uid, cgroup=leaf)
        if report_fd >= 0:
            attempt.report = _Report(report_fd, spec.cwd, uid, spec.argv[0])
            self.loop.add_reader(report_fd, self._read_report, attempt)
        self.attempts[spec.key] = attempt
        self.by_pid[info.pid] = attempt
        self.reap()  # it may have exited before we registered it
        return info

    def _leaf(self, key: AttemptKey) -> Path | None:
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(key)
        except OSError as exc:
            log.warning("%s: no cgroup of its own (%s)", _name(key), exc.strerror or exc)
            return None

    def containment(self, key: AttemptKey) -> str:
        """How the attempt's processes are known: "cgroup" or "session" (+ marks)."""
        attempt = self.attempts.get(key)
        return "cgroup" if attempt is not None and attempt.cgroup is not None else "session"

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

    def _read_report(self, attempt: _Attempt) -> None:
        """Take what the cwd wrapper wrote; at EOF (it exec'd, or gave up) close the pipe."""
        report = attempt.report
        if report is None or report.fd < 0:
            return
        try:
            while chunk := os.read(report.fd, REPORT_LIMIT):
                report.said = (report.said + chunk)[:REPORT_LIMIT]
        except BlockingIOError:
            return  # more to come
        except OSError:
            pass
        self._close_report(report)

    def _close_report(self, report: _Report) -> None:
        if report.fd >= 0:
            self.loop.remove_reader(report.fd)
            os.close(report.fd)
            report.fd = -1

    # -- reaping ------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: leaders' statuses are kept, orphans discarded.
        Leaders are looked at before they are reaped (see the module's doc): one scan
        serves every leader that has exited by then."""
        seen: set[int] = set()
        while True:
            pid = _waitable_child()
            if pid is None or pid in seen:  # seen: waitid and waitpid disagree; never spin
                return
            seen.add(pid)
            if pid not in self.by_pid:
                _reap_pid(pid)  # an orphan we inherited, or a wrapper that failed to start
                continue
            exited = [a for a in self.by_pid.values() if _has_exited(a.pid)]
            self._claim(exited)
            for attempt in exited:
                del self.by_pid[attempt.pid]
                attempt.status, attempt.usage = _reap_with_usage(attempt.pid)
                attempt.reaped = True
                self._exited.append(attempt)
            self._schedule_settle()

    def _schedule_settle(self) -> None:
        if not self._settle_scheduled:
            self._settle_scheduled = True
            self.loop.call_soon(self._settle)

    def _settle(self) -> None:
        """Attempts whose leader was reaped: end them, or first kill what they left behind
        (found while the leader was a zombie)."""
        self._settle_scheduled = False
        exited, self._exited = self._exited, []
        for attempt in exited:
            if attempt.dying:
                continue  # the kill loop ends it
            left = alive(attempt.members.values())
            if left:
                log.info("%s: killing %d process(es) left behind", _name(attempt.key), len(left))
                self._begin_kill(attempt)
            else:
                self._finish(attempt)

    def _finish(self, attempt: _Attempt) -> None:
        self.attempts.pop(attempt.key, None)
        if attempt.cgroup is not None and self.cgroups is not None:
            self.cgroups.remove(attempt.cgroup)
        code = None if attempt.status is None else exit_code_of(attempt.status)
        report = attempt.report
        error = None
        if report is not None:
            self._read_report(attempt)  # the wrapper is gone: all it said is in the pipe
            self._close_report(report)
            error = wrapper_error(report.said, report.cwd, report.uid, report.program)
        try:
            if error is not None and attempt.kill_reason is None:
                self.on_end(attempt.key, None, None, start_error=error)
            else:
                self.on_end(attempt.key, code, attempt.kill_reason, usage=attempt.usage)
        except Exception:  # one attempt's bookkeeping must not stop the others' kills
            log.exception("%s: recording the end failed", _name(attempt.key))

    # -- finding a tree ------------------------------------------------------------

    def _claim(self, attempts: list[_Attempt]) -> None:
        """Bring each of `attempts`' members up to date: drop those gone, add the processes
        that are its and not yet known. An attempt in a cgroup leaf of its own: what is in
        the leaf, and nothing else (a small file read, no scan). The others: the processes
        below the daemon that are theirs (see the module's doc), one pass over /proc for
        them all."""
        if not attempts:
            return
        for attempt in attempts:
            attempt.members = {p.pid: p for p in alive(attempt.members.values())}
        scanned = [a for a in attempts if a.cgroup is None or self.cgroups is None]
        for attempt in attempts:
            if attempt not in scanned:
                self._claim_leaf(attempt)
        if not scanned:
            return
        table = proc_table(self._scan_floor(scanned))
        # Only an unreaped leader's session id is proof: see the module's doc.
        sessions = {a.pid: a for a in self.attempts.values() if not a.reaped}
        wanted = {a.key.marks(): a for a in scanned}
        targets = set(scanned)
        known = set(self.by_pid).union(*(a.members for a in attempts))
        for pid in descendants(table, [self.pid]):
            if pid in known:
                continue
            owner = sessions.get(table[pid].sid)
            if owner is None:
                marks = marks_of(pid)
                owner = wanted.get(marks) if marks is not None else None
            if owner not in targets:
                continue
            proc = process_of(pid, owner.uid)
            if proc is not None:
                owner.members[pid] = proc

    def _claim_leaf(self, attempt: _Attempt) -> None:
        """Everything in the attempt's cgroup leaf is its, whatever it did (setsid, env -i,
        double fork): only its leader's pid is left to the reaper."""
        for pid in self.cgroups.pids(attempt.cgroup):  # type: ignore[union-attr,arg-type]
            if pid not in attempt.members and pid not in self.by_pid:
                try:
                    attempt.members[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass

    def _scan_floor(self, attempts: list[_Attempt]) -> int:
        """The lowest pid that can belong to `attempts`: every process of an attempt, and
        every process between it and the daemon, was created after its leader, so has a
        higher pid, unless pids wrapped since. A wrap shows as a last pid below the
        leader's; a full wrap round takes longer than WINDOW_AGE, so older attempts get
        a full scan. (`attempts` is a list: it is read twice.)"""
        now = time.monotonic()
        floor = min((a.pid for a in attempts), default=0)
        if any(now - a.started > WINDOW_AGE for a in attempts) or last_pid() < floor:
            return 0
        return floor

    # -- killing ------------------------------------------------------------------

    def kill(self, key: AttemptKey, reason: str, force: bool = False) -> None:
        """Kill the attempt's whole tree; its end comes through on_end. Asked again while it
        is dying, nothing changes unless `force`: then SIGKILL at once. Also `force`s the
        clearing of a previous daemon's attempt (`clear_stale`)."""
        self.reap()  # a leader that exited before the kill (noticed late) keeps its outcome
        attempt = self.attempts.get(key)
        if attempt is None:
            stale = self._stale.get(key)
            if stale is not None and force:
                stale.deadline, stale.forced = min(stale.deadline, time.monotonic()), True
            return
        if not attempt.dying and not attempt.reaped:
            attempt.kill_reason = reason  # a leader that already exited keeps its outcome
        self._begin_kill(attempt, force)

    def _begin_kill(self, attempt: _Attempt, force: bool = False) -> None:
        now = time.monotonic()
        if attempt.dying:
            if force:
                attempt.deadline, attempt.forced = min(attempt.deadline, now), True
            return
        attempt.dying, attempt.forced = True, force
        attempt.deadline = now if force else now + attempt.grace
        if not attempt.reaped:  # safe to name by pid until we reap it
            try:
                attempt.members[attempt.pid] = psutil.Process(attempt.pid)
            except psutil.Error:
                pass
        self._dying[attempt.key] = attempt
        if self._killer is None:
            self._killer = self.loop.create_task(self._kill_loop())

    async def _kill_loop(self) -> None:
        """Kill every dying attempt, one tick per POLL, until none is left."""
        try:
            while self._dying:
                self._kill_tick()
                if self._dying:
                    await asyncio.sleep(POLL)
        finally:
            self._killer = None

    def _kill_tick(self) -> None:
        """One look for all dying attempts: end those with nothing left and the leader
        reaped; SIGTERM what is new in the others, and past the deadline SIGKILL all of it."""
        dying = list(self._dying.values())
        self._claim(dying)
        now = time.monotonic()
        for attempt in dying:
            left = list(attempt.members.values())
            if not left and attempt.reaped:
                del self._dying[attempt.key]
                self._finish(attempt)
                continue
            killing = _term_then_kill(attempt, left, now)
            if killing and attempt.cgroup is not None and self.cgroups is not None:
                self.cgroups.kill(attempt.cgroup)  # also what forked since the scan

    async def stop_all(self, reason: str, force: bool = False) -> None:
        """Kill every running attempt (`force`: SIGKILL at once, also to the previous
        daemon's attempts being cleared) and wait until all have ended."""
        for key in list(self.attempts):
            self.kill(key, reason, force)
        if force:
            for key in list(self._stale):
                self.kill(key, reason, force)
        while self._killer is not None:
            await asyncio.shield(self._killer)

    # -- after a crash: trees of the previous daemon ---------------------------------

    async def clear_stale(self, stale: list[StaleAttempt],
                          on_cleared: Callable[[AttemptKey], None] | None = None) -> None:
        """Make sure no process of the given attempts of a previous daemon is left.

        Those are the processes of the run owner's uid with an attempt's marks, and the
        recorded leader (same pid, start time and boot), each with its descendants:
        SIGTERM, then SIGKILL after the step's `kill_grace`, or at once once
        `kill(key, ..., force=True)` asks. A process may start another while it is being
        killed (`trap 'cleanup &' TERM`), and once it exits that one is below nothing we
        know: so an attempt is clear only when a fresh look for its marks finds nothing.
        Attempts are cleared side by side, each on its own grace: `on_cleared(key)` is
        called as soon as one is clear, and this returns when all are."""
        now = time.monotonic()
        entries: dict[AttemptKey, _Stale] = {}
        for item in stale:
            uid = self.uid if item.uid is None else item.uid
            entries[item.key] = self._stale[item.key] = _Stale(
                item.key, uid, item.kill_grace, now + item.kill_grace)
        try:
            _find_marked(proc_table(), list(entries.values()))
            for item in stale:
                leader = _verified_leader(item.pid, item.start_time, item.boot_id)
                entry = entries[item.key]
                if leader is not None and _uid_of(leader) == entry.uid:
                    entry.members[leader.pid] = leader
            while entries:
                for key in self._stale_tick(list(entries.values())):
                    del entries[key]
                    self._stale.pop(key, None)
                    if on_cleared is not None:
                        on_cleared(key)
                if entries:
                    await asyncio.sleep(POLL)
        finally:
            for key in entries:
                self._stale.pop(key, None)

    def _stale_tick(self, entries: list[_Stale]) -> list[AttemptKey]:
        """One look at every stale attempt being cleared (one pass over /proc, read after
        the known processes were checked, so it holds whatever they started before they
        went); the keys of those now clear."""
        for entry in entries:
            entry.members = {p.pid: p for p in alive(entry.members.values())}
        table = proc_table()
        for entry in entries:
            _grow(table, entry)
        empty = [e for e in entries if not e.members]
        _find_marked(table, empty)  # all we knew of is gone: look again for what started
        now = time.monotonic()
        cleared = []
        for entry in entries:
            left = list(entry.members.values())
            if not left:
                cleared.append(entry.key)
                continue
            if not entry.told:
                entry.told = True
                log.info("%s: killing %d process(es) of the previous daemon",
                         _name(entry.key), len(left))
            _term_then_kill(entry, left, now)
        return cleared


# ---- helpers ----------------------------------------------------------------------


def _waitable_child() -> int | None:
    """The pid of a child that has exited, left unreaped; None if there is none."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return None if info is None else info.si_pid


def _has_exited(pid: int) -> bool:
    """Whether our child `pid` has exited (it stays unreaped); True if it is not our child
    any more, so that its attempt still ends."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _reap_pid(pid: int) -> int | None:
    """Reap the exited child `pid`; its wait status (None if it was not ours to reap)."""
    return _reap_with_usage(pid)[0]


def _reap_with_usage(pid: int) -> tuple[int | None, tuple[float, int] | None]:
    """Reap the exited child `pid`: its wait status and (CPU seconds, peak RSS KiB) of it
    and the children it waited for, from wait4's rusage; (None, None) if not ours."""
    try:
        reaped, status, usage = os.wait4(pid, os.WNOHANG)
    except ChildProcessError:
        return None, None
    if reaped != pid:
        return None, None
    return status, (usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def _uid_of(proc: psutil.Process) -> int | None:
    try:
        return proc.uids().real
    except psutil.Error:
        return None


def _grow(table: dict[int, ProcInfo], entry: _Stale) -> None:
    """Add to the stale attempt the descendants of its processes."""
    for pid in descendants(table, list(entry.members)):
        if pid not in entry.members:
            proc = process_of(pid, entry.uid)
            if proc is not None:
                entry.members[pid] = proc


def _find_marked(table: dict[int, ProcInfo], entries: list[_Stale]) -> None:
    """Add to `entries` every process in `table` with one's marks and uid."""
    wanted = {e.key.marks(): e for e in entries}
    if not wanted:
        return
    for pid in table:
        marks = marks_of(pid)
        entry = wanted.get(marks) if marks is not None else None
        if entry is not None and pid not in entry.members:
            proc = process_of(pid, entry.uid)
            if proc is not None:
                entry.members[pid] = proc


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


def _term_then_kill(dying: _Attempt | _Stale, left: list[psutil.Process], now: float) -> bool:
    """One tick of a kill: SIGTERM what has not had it (also what joined since, so a
    kill_grace of 0 is still TERM, then KILL); past the deadline SIGKILL all of it,
    warning once. True once SIGKILL is due."""
    send([p for p in left if p not in dying.termed], signal.SIGTERM)
    dying.termed.update(left)
    if now < dying.deadline:
        return False
    if not dying.escalated:
        dying.escalated = True
        _warn_escalation(dying.key, dying.grace, dying.forced)
    send(left, signal.SIGKILL)
    return True


def _warn_escalation(key: AttemptKey, grace: float, forced: bool) -> None:
    if forced:
        log.warning("%s: killed again, sending SIGKILL", _name(key))
    else:
        log.warning("%s: still running %g s after SIGTERM, sending SIGKILL", _name(key), grace)


def _name(key: AttemptKey) -> str:
    return f"{key.run_id} {key.step}#{key.attempt}"
