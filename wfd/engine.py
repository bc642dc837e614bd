"""The one writer: every event of every run is recorded here, and only here.

`emit` stamps an event with its run's next seq and the time, applies it to the
run's state at once (so the next decision sees it) and queues its line for
the committer. The committer writes each run's queued lines with one write
and one fsync per run per batch (group commit), and only then runs what waits
for those events: spawning an attempt whose claim is now durable, replying to
a client, telling watchers. Nothing is ever acted on
before the events it depends on are on disk. If a write fails (ENOSPC, EIO,
EFBIG) the batch is retried with backoff until it succeeds; meanwhile nothing
waiting on it happens and new runs are refused.

The committer writes on the loop's own thread. A worker thread would let the
loop go on during an fsync, but every hand-over costs two thread wake-ups on
the critical path of each step, and nothing the loop could do meanwhile may
act on undurable events anyway: measured, writing in place made 500
independent steps 1.3x faster and a chain 1.15x.

The decide loop (`_tick`) asks the pure scheduler what to do and does it until
nothing is left, then sets a timer for the next deadline. Attempt ends come
from the executor through `_attempt_ended`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from wfd import events as ev
from wfd import scheduler
from wfd import state as st
from wfd.errors import IllegalTransition, StorageError, UsageError, WfdError, WorkflowInvalid
from wfd.eventlog import AppendLog, Layout, LogRead, Submission, read_ends, read_log
from wfd.executor import (
    AttemptKey,
    AttemptSpec,
    Executor,
    StaleAttempt,
    StartFailed,
    StartInfo,
    UserIds,
)
from wfd.procs import MARK_ATTEMPT, MARK_RUN, MARK_STEP
from wfd.workflow import Workflow, build_workflow, parse_workflow

log = logging.getLogger("wfd")

# Variables meant for the daemon itself, never passed to steps (SPEC 1).
DAEMON_ONLY = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", MARK_RUN, MARK_STEP,
               MARK_ATTEMPT)
DAEMON_ONLY_PREFIXES = ("LISTEN_", "WATCHDOG_")
LAZY_COMMIT = 0.05  # seconds an event nothing waits for may wait for company
STOP_FLUSH_WAIT = 5.0  # seconds a stop waits for a failing disk before giving up


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def new_run_id(now: float, last: str) -> str:
    """`20261125T095852Z-xxxxxxxx`: sorts by creation time (the first five hex digits are
    the microseconds), random in the last three; strictly after `last`."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    micros = int((now % 1) * 1_000_000)
    run_id = f"{stamp}-{micros:05x}{random.randrange(4096):03x}"
    while run_id <= last:
        micros += 1
        run_id = f"{stamp}-{micros:05x}{random.randrange(4096):03x}"
    return run_id


def default_name(source: str) -> str:
    base = os.path.basename(source)
    return base.rsplit(".", 1)[0] if "." in base else base


def step_env(sub: Submission, wf: Workflow, index: int, key: AttemptKey) -> dict[str, str]:
    """Client env (variables meant for the daemon removed, the owner's passwd fields
    winning over the client's), then workflow env, then defaults.env and the step's env,
    then the marks."""
    env = {
        k: v for k, v in sub.env.items()
        if k not in DAEMON_ONLY and not k.startswith(DAEMON_ONLY_PREFIXES)
    }
    try:
        entry = pwd.getpwuid(sub.uid)
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name,
                   SHELL=entry.pw_shell or "/bin/sh")
    except KeyError:
        pass
    env.update(wf.env)
    env.update(wf.steps[index].env)
    env[MARK_RUN], env[MARK_STEP], env[MARK_ATTEMPT] = key.marks()
    return env


def step_argv(command: str | tuple[str, ...]) -> list[str]:
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def step_cwd(sub: Submission, cwd: str | None) -> str:
    return os.path.join(sub.base_dir, cwd) if cwd else sub.base_dir


def placeholder_workflow(name: str) -> Workflow:
    """The workflow of a run whose workflow.json cannot be read: no steps."""
    return build_workflow(name, None, {}, ())


class Stub(NamedTuple):
    """A finished run known by its first and last events, not folded yet."""

    summary: st.RunSummary
    owner_uid: int


class NewRun(NamedTuple):
    run_id: str
    workflow: Workflow
    sub: Submission


class Engine:
    """All runs, their logs and the decisions; the only place that changes state."""

    def __init__(self, layout: Layout, limit: int, system: bool) -> None:
        self.layout = layout
        self.limit = limit
        self.system = system
        self.uid = os.getuid()
        self.runs: dict[str, st.RunState] = {}
        self.stubs: dict[str, Stub] = {}
        self.subs: dict[str, Submission] = {}
        self.order: dict[str, None] = {}  # runs driven, least recently started first
        self.files: dict[str, AppendLog] = {}  # each run's log and its committed size
        self.storage_error: str | None = None
        self.stopping = False
        self.executor: Executor = None  # type: ignore[assignment]  # set by the daemon
        self._lines: dict[str, list[bytes]] = {}
        self._events: list[tuple[str, ev.Event]] = []
        self._callbacks: list[Callable[[], None]] = []
        self._dirty = asyncio.Event()
        self._lazy: asyncio.TimerHandle | None = None
        self._opens: list[AttemptKey] = []
        self._log_fds: dict[AttemptKey, int | OSError] = {}
        self._unrecorded: dict[AttemptKey, StartInfo] = {}
        self._tick_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._finish_waiters: dict[str, list[asyncio.Future]] = {}
        self.watchers: dict[str, set[asyncio.Queue]] = {}
        self._last_run_id = ""
        self.on_transition: Callable[[str, ev.Event], None] | None = None

    # ---- loading ---------------------------------------------------------------

    def load_all(self) -> list[str]:
        """Fold every unfinished run on disk and note the finished ones; return the
        unfinished ones. A finished run is known at first by its first and last events
        (a `Stub`): folding a million events of old runs would hold up the start, so
        they are folded when asked for, and checked in the background (`verify_stubs`)."""
        unfinished = []
        for run_id in self.layout.run_ids():
            self._last_run_id = max(self._last_run_id, run_id)
            stub = self._peek(run_id)
            if stub is not None:
                self.stubs[run_id] = stub
                continue
            run = self._load(run_id)
            if run is None:
                continue
            self.runs[run_id] = run
            if not run.finished:
                unfinished.append(run_id)
        return unfinished

    def _peek(self, run_id: str) -> Stub | None:
        """A Stub if the log's first line is RunCreated and its last RunFinished."""
        try:
            ends = read_ends(self.layout.events(run_id))
        except OSError:
            return None
        if ends is None:
            return None
        first, last = ends
        if (type(first) is not ev.RunCreated or type(last) is not ev.RunFinished
                or first.seq != 1 or first.run_id != run_id):
            return None
        summary = st.RunSummary(run_id=run_id, name=first.name, owner=first.owner,
                                state=last.state, created_at=first.ts, finished_at=last.ts)
        return Stub(summary, first.owner_uid)

    def run(self, run_id: str) -> st.RunState | None:
        """The run's state, folding a finished run's log on first use."""
        run = self.runs.get(run_id)
        if run is None and self.stubs.pop(run_id, None) is not None:
            run = self._load(run_id)
            if run is not None:
                self.runs[run_id] = run
        return run

    def summaries(self) -> list[tuple[st.RunSummary, int]]:
        """Every run's summary and owner uid, oldest first."""
        items = [(st.run_summary(run), run.owner_uid) for run in self.runs.values()]
        items += [(stub.summary, stub.owner_uid) for stub in self.stubs.values()]
        items.sort(key=lambda item: item[0].run_id)
        return items

    async def verify_stubs(self) -> None:
        """Fold every finished run once, in the background, so that a damaged log is
        reported as CORRUPT soon after the start, not only when someone asks for it.
        A run that folds cleanly stays a Stub (its state is not kept in memory)."""
        for run_id in list(self.stubs):
            if run_id not in self.stubs:
                continue  # folded meanwhile by a request
            run = await asyncio.to_thread(self._load, run_id)
            if run_id not in self.stubs:
                continue
            if run is None or run.state == st.CORRUPT:
                del self.stubs[run_id]
                if run is not None:
                    self.runs[run_id] = run

    def _load(self, run_id: str) -> st.RunState | None:
        try:
            sub = self.layout.read_submission(run_id)
            wf = parse_workflow(sub.workflow, default_name(sub.source))
        except (OSError, ValueError, WfdError) as exc:
            return self._corrupt(run_id, placeholder_workflow(run_id),
                                 f"workflow.json unreadable: {_one_line(exc)}")
        path = self.layout.events(run_id)
        try:
            read = read_log(path, repair=True)
        except OSError as exc:
            return self._corrupt(run_id, wf, f"events.jsonl unreadable: {exc}")
        if not read.events and read.problem is None:
            log.warning("run %s has no first event (never acknowledged); ignored", run_id)
            return None
        if read.torn_tail:
            log.warning("run %s: %s", run_id, read.torn_tail)
        run, problem = fold_checked(wf, read)
        self.files[run_id] = AppendLog(path, read.good_size)
        self.subs[run_id] = sub
        if problem is not None:
            run.state = st.CORRUPT
            run.error = problem
            log.error("run %s is CORRUPT: %s", run_id, problem)
        return run

    def _corrupt(self, run_id: str, wf: Workflow, error: str) -> st.RunState:
        log.error("run %s is CORRUPT: %s", run_id, error)
        run = st.RunState(wf)
        run.run_id = run_id
        run.state = st.CORRUPT
        run.error = error
        return run

    # ---- the one writer ------------------------------------------------------------

    def emit(self, run_id: str, kind: type[ev.Event], /, **fields: Any) -> ev.Event:
        """Record an event: applied now, durable at the next commit."""
        event = self._record(run_id, kind, fields)
        self._dirty.set()
        return event

    def emit_lazily(self, run_id: str, kind: type[ev.Event], /, **fields: Any) -> ev.Event:
        """Record an event nothing waits for (AttemptStarted: recovery finds a process
        by its marks if the daemon dies before this is on disk). It goes out with the
        next commit, or after LAZY_COMMIT, and saves an fsync on the critical path of
        a chain of short steps."""
        event = self._record(run_id, kind, fields)
        if self._lazy is None:
            self._lazy = asyncio.get_running_loop().call_later(LAZY_COMMIT, self._dirty.set)
        return event

    def _record(self, run_id: str, kind: type[ev.Event], fields: dict[str, Any]) -> ev.Event:
        run = self.runs[run_id]
        event = kind(seq=run.last_seq + 1, ts=ev.format_ts(time.time()), **fields)
        st.apply(run, event)
        self._lines.setdefault(run_id, []).append(ev.encode_line(event))
        self._events.append((run_id, event))
        log.info("%s %s", run_id, st.describe(event))
        return event

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every event emitted so far is durable."""
        self._callbacks.append(callback)
        self._dirty.set()

    async def flushed(self) -> None:
        """Wait until everything emitted so far is durable and acted on."""
        future = asyncio.get_running_loop().create_future()
        self.after_commit(lambda: future.done() or future.set_result(None))
        await future

    async def committer(self) -> None:
        """Forever: take the queued lines, write and fsync them, then act on them."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self._lazy is not None:
                self._lazy.cancel()
                self._lazy = None
            lines, self._lines = self._lines, {}
            events, self._events = self._events, []
            callbacks, self._callbacks = self._callbacks, []
            opens, self._opens = self._opens, []
            # Log files of the claims just made durable are opened in the same trip.
            self._log_fds.update(await self._write(lines, opens))
            for run_id, event in events:
                self._tell_watchers(run_id, event)
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # a bug in one callback must not stop the writer
                    log.exception("error after commit")
            self.kick()

    async def _write(self, lines: dict[str, list[bytes]],
                     opens: list[AttemptKey]) -> dict[AttemptKey, int | OSError]:
        delay = 0.1
        while True:
            try:
                fds = self._write_batch(lines, opens)
            except OSError as exc:
                if self.storage_error is None:
                    log.error("cannot persist events: %s; retrying", exc)
                self.storage_error = f"cannot persist events: {exc.strerror or exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.storage_error is not None:
                log.warning("events persist again")
            self.storage_error = None
            return fds

    def _write_batch(self, lines: dict[str, list[bytes]],
                     opens: list[AttemptKey]) -> dict[AttemptKey, int | OSError]:
        """Removes each run from `lines` once it is durable,
        then opens the log files of `opens`."""
        for run_id in list(lines):
            self.files[run_id].append(b"".join(lines[run_id]))
            del lines[run_id]
        return self._open_logs(opens) if opens else {}

    def _open_logs(self, keys: list[AttemptKey]) -> dict[AttemptKey, int | OSError]:
        """Each claimed attempt's log file, or why not."""
        fds: dict[AttemptKey, int | OSError] = {}
        for key in keys:
            try:
                fds[key] = self.layout.open_log_for_step(key.run_id, key.step, key.attempt)
            except OSError as exc:
                fds[key] = exc
        return fds

    def _log_fd(self, key: AttemptKey) -> int:
        """The attempt's log fd, opened by the committer (or here, if it did not)."""
        fd = self._log_fds.pop(key, None)
        if isinstance(fd, OSError):
            raise fd
        if fd is None:
            fd = self.layout.open_log_for_step(key.run_id, key.step, key.attempt)
        return fd

    # ---- watchers ---------------------------------------------------------------

    def _tell_watchers(self, run_id: str, event: ev.Event) -> None:
        if self.on_transition is not None:
            self.on_transition(run_id, event)
        for queue in self.watchers.get(run_id, ()):
            queue.put_nowait(event)

    def watch(self, run_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self.watchers.setdefault(run_id, set()).add(queue)
        return queue

    def unwatch(self, run_id: str, queue: asyncio.Queue) -> None:
        queues = self.watchers.get(run_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self.watchers[run_id]

    # ---- deciding ---------------------------------------------------------------

    def kick(self) -> None:
        """Decide soon (once per loop iteration, however many things changed)."""
        if not self._tick_scheduled:
            self._tick_scheduled = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_scheduled = False
        wake_at = None
        while True:
            decision = scheduler.decide(self.runs, list(self.order), self.limit, time.time())
            wake_at = decision.wake_at
            if not self._perform(decision.actions):
                break
        self._set_timer(wake_at)

    def _perform(self, actions: list[scheduler.Action]) -> bool:
        """Do the actions; True if any recorded an event (so decide again)."""
        changed = False
        for action in actions:
            if isinstance(action, scheduler.Emit):
                self.emit(action.run_id, action.kind, **action.fields)
                if action.kind is ev.RunFinished:
                    self._run_finished(action.run_id)
                changed = True
            elif isinstance(action, scheduler.Start):
                if self.stopping:
                    continue
                self._claim(action)
                changed = True
            elif isinstance(action, scheduler.Kill):
                self.executor.kill(AttemptKey(action.run_id, action.step, action.attempt),
                                   action.reason)
        return changed

    def _set_timer(self, wake_at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, wake_at - time.time())
            self._timer = loop.call_later(delay, self.kick)

    def _run_finished(self, run_id: str) -> None:
        self.order.pop(run_id, None)

        def done() -> None:
            for future in self._finish_waiters.pop(run_id, []):
                if not future.done():
                    future.set_result(None)

        self.after_commit(done)

    async def finished(self, run_id: str) -> None:
        """Wait until the run's RunFinished is durable."""
        if self.runs[run_id].finished and run_id not in self.order:
            await self.flushed()
            return
        future = asyncio.get_running_loop().create_future()
        self._finish_waiters.setdefault(run_id, []).append(future)
        await future

    # ---- attempts ---------------------------------------------------------------

    def _claim(self, action: scheduler.Start) -> None:
        key = AttemptKey(action.run_id, action.step, action.attempt)
        self.emit(key.run_id, ev.AttemptClaimed, step=key.step, attempt=key.attempt)
        self.order.pop(key.run_id, None)
        self.order[key.run_id] = None  # started last: goes to the back of the round
        self._opens.append(key)
        self.after_commit(lambda: self._spawn(key))

    def _spawn(self, key: AttemptKey) -> None:
        """The claim is durable: start the process (unless the run moved on meanwhile)."""
        run = self.runs[key.run_id]
        rec = run.steps[key.step]
        moved_on = rec.state != st.RUNNING or rec.attempts != key.attempt
        if moved_on or run.cancelling or self.stopping:
            fd = self._log_fds.pop(key, None)
            if isinstance(fd, int):
                os.close(fd)
            if not moved_on:
                self._attempt_ended(key, None, "stop" if self.stopping else "cancel")
            return
        sub = self.subs[key.run_id]
        step = run.workflow.steps[rec.index]
        try:
            log_fd = self._log_fd(key)
        except OSError as exc:
            self._attempt_ended(key, None, None, start_error=f"cannot open log: {exc.strerror}")
            return
        spec = AttemptSpec(
            key=key, argv=step_argv(step.command), env=step_env(sub, run.workflow, rec.index, key),
            cwd=step_cwd(sub, step.cwd), log_fd=log_fd, umask=sub.umask,
            kill_grace=step.kill_grace, user=self._user_ids(sub),
        )
        try:
            info = self.executor.start(spec)
        except StartFailed as exc:
            self._attempt_ended(key, None, None, start_error=str(exc))
            return
        finally:
            os.close(log_fd)
        self._unrecorded[key] = info
        if len(self._unrecorded) == 1:
            asyncio.get_running_loop().call_soon(self._record_starts)

    def _record_starts(self) -> None:
        """AttemptStarted for the attempts spawned in the last loop iteration. Reading a
        leader's start time waits while it is still in execve, so it is done here, after
        every spawn of the iteration, rather than right after each one."""
        while self._unrecorded:
            key = next(iter(self._unrecorded))  # in the order they were spawned
            info = self._unrecorded.pop(key)
            info = self.executor.identify(info)
            self.emit_lazily(key.run_id, ev.AttemptStarted, step=key.step, attempt=key.attempt,
                             pid=info.pid, start_time=info.start_time or 0.0,
                             boot_id=info.boot_id)

    def _user_ids(self, sub: Submission) -> UserIds | None:
        """Whom to run as: None for the daemon's own user. The primary gid and the groups
        come from the group database, as at login (not the client's effective gid)."""
        if sub.uid == self.uid:
            return None
        try:
            entry = pwd.getpwuid(sub.uid)
            return UserIds(sub.uid, entry.pw_gid,
                           tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))
        except KeyError:
            return UserIds(sub.uid, sub.gid, (sub.gid,))

    def _attempt_ended(self, key: AttemptKey, exit_code: int | None, kill_reason: str | None,
                       start_error: str | None = None) -> None:
        """Record how an attempt ended (called by the executor once its tree is gone)."""
        run = self.runs.get(key.run_id)
        if run is None or run.finished:
            return
        rec = run.steps[key.step]
        if rec.state != st.RUNNING or rec.attempts != key.attempt:
            return
        if key in self._unrecorded:  # AttemptStarted comes before the attempt's end
            self._record_starts()
        interrupted = "daemon stopped" if kill_reason == "stop" else None
        emit = scheduler.outcome(
            run, key.step, key.attempt, exit_code, now=time.time(), rand=random.random(),
            timed_out=kill_reason == "timeout", start_error=start_error, interrupted=interrupted,
        )
        self.emit(emit.run_id, emit.kind, **emit.fields)
        self.kick()

    # ---- requests -----------------------------------------------------------------

    def submit(self, workflow_text: str, source: str, base_dir: str, env: dict[str, str],
               umask: int, uid: int, gid: int) -> NewRun:
        """Validate a submission and name the run; the caller makes its workflow.json
        durable, then calls `start_run`."""
        if self.stopping:
            raise UsageError("wfd is shutting down; submit again once it is back")
        if self.storage_error is not None:
            raise StorageError(f"wfd cannot persist events now ({self.storage_error})")
        wf = parse_workflow(workflow_text, default_name(source))
        owner_uid = uid if self.system else self.uid
        now = time.time()
        run_id = self._last_run_id = new_run_id(now, self._last_run_id)
        sub = Submission(
            workflow=workflow_text, source=source, base_dir=base_dir, env=env,
            umask=umask & 0o777, uid=owner_uid, gid=gid if self.system else os.getgid(),
            owner=owner_name(owner_uid), submitted_at=ev.format_ts(now),
        )
        return NewRun(run_id, wf, sub)

    def start_run(self, new: NewRun) -> None:
        """workflow.json is durable: record the run's first event and drive it."""
        run_id, wf, sub = new
        self.subs[run_id] = sub
        self.runs[run_id] = st.RunState(wf)
        self.files[run_id] = AppendLog(self.layout.events(run_id), 0)
        self.emit(run_id, ev.RunCreated, run_id=run_id, name=wf.name, owner=sub.owner,
                  owner_uid=sub.uid)
        self.order[run_id] = None
        self.kick()

    async def cancel(self, run_id: str) -> None:
        """Ask for the cancel; `finished` tells when every step process is gone."""
        run = self.runs[run_id]
        if run_id not in self.order and not run.finished:
            await self.adopt([run_id], "daemon restarted")  # its old trees die first
        if run.finished or run.cancelling:
            return
        self.emit(run_id, ev.RunCancelRequested)
        self.kick()

    async def resume(self, run_ids: list[str]) -> None:
        """Continue FAILED/CANCELLED runs and pick up unfinished ones not driven."""
        adopt = [r for r in run_ids if not self.runs[r].finished and r not in self.order]
        await self.adopt(adopt, "daemon restarted")
        for run_id in run_ids:
            if self.runs[run_id].state in (st.FAILED, st.CANCELLED):
                self.emit(run_id, ev.RunResumed)
                self.order[run_id] = None
        self.kick()
        await self.flushed()

    async def adopt(self, run_ids: list[str], reason: str) -> None:
        """Drive unfinished runs left by a previous daemon: kill what is left of their
        attempts, record those as interrupted, and go on."""
        stale = []
        for run_id in run_ids:
            run = self.runs[run_id]
            for step_id in run.running:
                rec = run.steps[step_id]
                grace = run.workflow.steps[rec.index].kill_grace
                key = AttemptKey(run_id, step_id, rec.attempts)
                stale.append(StaleAttempt(key, rec.pid, rec.start_time, rec.boot_id, grace))
        await self.executor.clear_stale(stale)
        for key, *_ in stale:
            self.emit(key.run_id, ev.AttemptInterrupted, step=key.step, attempt=key.attempt,
                      reason=reason)
        for run_id in run_ids:
            self.order[run_id] = None
        self.kick()

    async def stop(self) -> None:
        """Kill every running tree, record the attempts as interrupted, flush.

        If events cannot be persisted, give up on them after STOP_FLUSH_WAIT: the next
        start folds the log as it is, finds those attempts RUNNING and interrupts them
        itself, so nothing is lost but the wait."""
        self.stopping = True
        await self.executor.stop_all("stop")
        for _ in range(3):  # claims whose spawn was still pending end in the next commit
            flushed = asyncio.ensure_future(self.flushed())
            while not flushed.done():
                await asyncio.wait([flushed], timeout=STOP_FLUSH_WAIT)
                if not flushed.done() and self.storage_error is not None:
                    flushed.cancel()
                    log.error("stopping with events not persisted (%s); the next start "
                              "recovers from the log as it is", self.storage_error)
                    return

    def active_runs(self) -> int:
        return len(self.order)


def fold_checked(wf: Workflow, read: LogRead) -> tuple[st.RunState, str | None]:
    """Fold a parsed log; a damaged line or an illegal transition is the problem found,
    with the state as far as the log is good."""
    run = st.RunState(wf)
    for number, event in enumerate(read.events, start=1):  # one event per line
        try:
            st.apply(run, event)
        except IllegalTransition as exc:
            return run, f"line {number}: {exc.message}"
    return run, read.problem


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, WorkflowInvalid):
        return exc.problems[0]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
