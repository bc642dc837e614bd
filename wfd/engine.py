"""The one writer: every event of every run is recorded here, and only here.

The engine's state (runs, their submissions, logs, watchers) has one owner,
the event loop. Worker threads compute pure values (a fold, a parse, a user
lookup: `store.load_run`, `parse_workflow`) and hand them back; nothing is
assigned or repaired from a thread. One load per run is in flight at a time,
and one adoption: a request for a run being loaded or adopted waits for it.

`_record` stamps an event with its run's next seq and the time, applies it to
the run's state at once (so the next decision sees it and never repeats it)
and queues its line with the committer. Every effect waits for the events it
depends on: spawns, kills, replies and watcher notifications run as
`after_commit` callbacks (docs/design.md, "Who owns what").

The decide loop (`_tick`) asks the pure scheduler what to do and does it
until nothing is left, then sets a timer for the next deadline. Attempt ends
come from the executor through `attempt_ended`. If the committer or the
decide loop fails, `fatal` is set: the daemon logs it once and exits non-zero.
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import concurrent.futures
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wfd import events as ev
from wfd import faults, logcap, retention, scheduler, slurm, store
from wfd import state as st
from wfd.clock import Clock
from wfd.committer import Batch, Committer
from wfd.errors import StorageError, UsageError
from wfd.eventlog import Layout, Submission
from wfd.executor import AttemptKey, AttemptSpec, Executor, StaleAttempt, StartFailed, StartInfo
from wfd.outputs import output_env, upstream
from wfd.params import resolve_vars
from wfd.pools import PoolLimits
from wfd.procs import BOOT_ID, MARK_ATTEMPT, MARK_RUN, MARK_STEP
from wfd.store import RunCtx, Stub
from wfd.users import name_of
from wfd.workflow import Workflow, parse_workflow

if TYPE_CHECKING:
    from wfd.scheduling import Scheduling

log = logging.getLogger("wfd")

# Variables meant for the daemon itself, never passed to steps (SPEC 1): systemd's, and
# every inherited WFD_* (the marks, the client's WFD_SOCKET, test switches).
DAEMON_ONLY = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID")
DAEMON_ONLY_PREFIXES = ("LISTEN_", "WATCHDOG_", "WFD_")
STOP_FLUSH_WAIT = 5.0  # seconds a stop waits for a failing disk before giving up
KEEP_FINISHED = 64  # finished runs kept folded in memory after their last use
MAX_KILL_GRACE = 300.0  # default cap of kill_grace for runs not owned by root


def new_run_id(now: float, last: str) -> str:
    """`20261125T095852Z-xxxxxxxx`: the time to the microsecond (five hex digits) and
    three random ones; strictly after `last` whatever the clock says, so ids stay
    ordered when the clock steps back (the id then carries `last`'s time, plus 1 us)."""
    micros = max(int(now * 1_000_000), _micros_of(last) + 1)
    seconds, micro = divmod(micros, 1_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))
    return f"{stamp}-{micro:05x}{random.randrange(4096):03x}"


def _micros_of(run_id: str) -> int:
    """The microsecond time an id of ours carries; -1 for anything else."""
    try:
        stamp, tail = run_id.split("-", 1)
        seconds = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
        return seconds * 1_000_000 + int(tail[:5], 16)
    except (ValueError, OverflowError):
        return -1


def step_env(ctx: RunCtx, run: st.RunState, index: int, key: AttemptKey,
             outputs: Mapping[str, str] | None = None) -> dict[str, str]:
    """Client env (variables meant for the daemon removed, the owner's passwd fields
    winning over the client's), then workflow env, then defaults.env and the step's env,
    then the run's KEY=VALUE vars, then the outputs of the steps upstream (`WFD_OUT_*`),
    then the schedule's slot, an on_exit step's WFD_RUN_STATE and WFD_FAILED_STEPS, and
    the marks."""
    wf = run.workflow
    env = {
        k: v for k, v in ctx.sub.env.items()
        if k not in DAEMON_ONLY and not k.startswith(DAEMON_ONLY_PREFIXES)
    }
    env.update(ctx.login)
    env.update(wf.env)
    env.update(wf.steps[index].env)
    env.update(run.vars)
    env.update(outputs or {})
    if run.schedule is not None:
        env["WFD_SCHEDULE"] = run.schedule
        env["WFD_SCHEDULED_AT"] = st.slot_ts(run.slot) or ""
    if index >= run.mains:  # an on_exit step: how the run ended
        env["WFD_RUN_STATE"] = run.outcome()
        env["WFD_FAILED_STEPS"] = " ".join(run.failed_steps())
    env[MARK_RUN], env[MARK_STEP], env[MARK_ATTEMPT] = key.marks()
    return env


def _rule_of(wf: Workflow) -> Concurrency | None:
    if wf.concurrency is None:
        return None
    return Concurrency(wf.concurrency, None, wf.on_busy == "skip")


def step_argv(command: str | tuple[str, ...]) -> list[str]:
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def step_cwd(sub: Submission, cwd: str | None) -> str:
    return os.path.join(sub.base_dir, cwd) if cwd else sub.base_dir


@dataclass(frozen=True)
class Concurrency:
    """One at a time: at most `limit` unfinished runs of one owner under `key` (None: the
    workflow's name); a further submit is QUEUED until one ends, or with `skip` refused.
    A workflow's `concurrency`/`on_busy` make one; a caller of `Engine.submit` may pass
    its own (a schedule's `--overlap queue`: e.g. Concurrency(1, "schedule:NAME"))."""

    limit: int
    key: str | None = None
    skip: bool = False


class Engine:
    """All runs, their logs and the decisions; the only place that changes state."""

    def __init__(self, layout: Layout, limit: int, system: bool, *,
                 clock: Clock | None = None, max_kill_grace: float = MAX_KILL_GRACE,
                 max_steps_per_user: int | None = None,
                 max_runs_per_user: int | None = None,
                 pools: PoolLimits | None = None) -> None:
        self.layout = layout
        self.limit = limit
        self.system = system
        self.clock = clock or Clock()
        self.max_kill_grace = max_kill_grace
        self.max_log_size = 0  # `wfd --max-log-size` (0: no cap); the daemon sets it
        self.uid = os.getuid()
        self.runs: dict[str, st.RunState] = {}
        self.stubs: dict[str, Stub] = {}
        self.ctx: dict[str, RunCtx] = {}
        # The runs driven, and who starts next (round-robin across users, then runs).
        self.pools = pools or PoolLimits(layout.state_dir, {})
        self.sched = scheduler.Scheduler(self.runs, limit, max_steps_per_user,
                                         self.pools.limits)
        self._pool_lock = asyncio.Lock()  # one write of pools.json at a time
        # One at a time: the unfinished runs per (owner uid, queue key), and the QUEUED
        # runs this daemon keeps in line (not those left to `resume` after --no-resume).
        self._by_key: dict[tuple[int, str], dict[str, None]] = {}
        self._queued: dict[str, None] = {}
        self.max_runs_per_user = max_runs_per_user
        self._submitting: collections.Counter[int] = collections.Counter()  # per owner uid
        self.committer = Committer(layout, self._durable)
        self.stopping = False
        self.executor: Executor = None  # type: ignore[assignment]  # set by the daemon
        self.watchers: dict[str, set[asyncio.Queue]] = {}
        self.on_transition: Callable[[str, ev.Event], None] | None = None
        self.fatal: asyncio.Future | None = None  # set with the exception that broke us
        self._loading: dict[str, asyncio.Task] = {}
        self._adopting: dict[str, asyncio.Task] = {}
        self._cancels: set[str] = set()  # runs a cancel waits to see adopted
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._unrecorded: dict[AttemptKey, StartInfo] = {}
        self._tick_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._finish_waiters: dict[str, list[asyncio.Future]] = {}
        self._last_run_id = ""
        # `wfctl run --key`: (owner uid, key) -> its run, or the submit making it now
        self._keys: dict[tuple[int, str], str | asyncio.Future[str]] = {}
        # Per run: which steps upstream of each step have outputs (`outputs.upstream`'s
        # memo), valid while the run's `producers_seq` is the one it was built for.
        self._upstream: dict[str, tuple[int, dict[int, frozenset[int]]]] = {}
        self.schedules: Scheduling | None = None  # set by the daemon: the schedule timer
        # Parses of submissions, one at a time: a flood of big submits costs one core.
        self._parser = concurrent.futures.ThreadPoolExecutor(1, "wfd-parse")

    @property
    def storage_error(self) -> str | None:
        return self.committer.storage_error

    def start(self) -> asyncio.Task:
        """The committer task; the daemon supervises it."""
        self.fatal = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self.committer.run(), name="wfd-committer")
        task.add_done_callback(self._task_done)
        return task

    def supervise(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """A background task of the daemon's own (adopting, checking logs): if it fails,
        that is a bug, and the daemon stops rather than carry on without it."""
        task = asyncio.create_task(coro)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("a background task failed: %r", exc)
            self.fail(exc)  # type: ignore[arg-type]

    def fail(self, exc: BaseException) -> None:
        """The writer or the decide loop is broken: the daemon exits non-zero."""
        if self.fatal is not None and not self.fatal.done():
            self.fatal.set_result(exc)

    # ---- loading ---------------------------------------------------------------

    def load_all(self) -> list[str]:
        """At start: fold every unfinished run on disk, note the finished ones, return
        the unfinished ones. A finished run is known at first by its first and last
        events (a `Stub`): folding a million events of old runs would hold up the start,
        so it is folded when asked for, and checked in the background (`verify_stubs`)."""
        unfinished = []
        for run_id in self.layout.run_ids():
            self._last_run_id = max(self._last_run_id, run_id)
            stub = store.peek(self.layout, run_id)
            if stub is not None:
                self.stubs[run_id] = stub
                self._index_key(run_id, stub.owner_uid, stub.key)
                continue
            loaded = store.load_run(self.layout, run_id, self.uid)
            self._index_key(run_id, loaded.run.owner_uid, loaded.run.key)
            if self._install(run_id, loaded) and not loaded.run.finished:
                unfinished.append(run_id)
        return unfinished

    def _install(self, run_id: str, loaded: store.Loaded) -> bool:
        """Take a loaded run into the engine (on the loop); False if it is no run."""
        if loaded.never_acknowledged:
            log.warning("run %s has no first event (its submit was never acknowledged); "
                        "ignored", run_id)
            if loaded.torn:
                self.committer.add_run(run_id, 0, 0, torn=True)  # cut the torn line
                self.committer.drop_run(run_id)
            return False
        self.stubs.pop(run_id, None)
        self.runs[run_id] = loaded.run
        self._join(loaded.run)
        if loaded.ctx is not None:
            self.ctx[run_id] = loaded.ctx
            if loaded.run.state != st.CORRUPT:
                self.committer.add_run(run_id, loaded.good_size, loaded.run.last_seq,
                                       loaded.torn)
        self._keep_recent(run_id)
        return True

    async def get(self, run_id: str) -> st.RunState | None:
        """The run's state, folding a finished run's log (in a worker thread) on first
        use; None for an unknown run."""
        run = self.runs.get(run_id)
        if run is not None:
            self._keep_recent(run_id)
            return run
        if run_id not in self.stubs:
            return None
        task = self._loading.get(run_id)
        if task is None:
            task = asyncio.create_task(self._load(run_id))
            self._loading[run_id] = task
        return await asyncio.shield(task)

    async def _load(self, run_id: str) -> st.RunState | None:
        try:
            loaded = await asyncio.to_thread(store.load_run, self.layout, run_id, self.uid)
            if run_id in self.runs:  # cannot happen while this load is in flight; be sure
                return self.runs[run_id]
            return loaded.run if self._install(run_id, loaded) else None
        finally:
            del self._loading[run_id]

    def _keep_recent(self, run_id: str) -> None:
        """Finished runs stay folded for KEEP_FINISHED uses of others, then shrink back to
        a Stub: a daemon that has seen 100,000 runs must not hold them all."""
        run = self.runs.get(run_id)
        if run is None or not run.finished or run.state == st.CORRUPT:
            return
        self._recent[run_id] = None
        self._recent.move_to_end(run_id)
        while len(self._recent) > KEEP_FINISHED:
            old, _ = self._recent.popitem(last=False)
            self._shrink(old)

    def forget_unborn(self, run_id: str) -> None:
        """Drop a run loaded from a dir without a first event (a schedule's intent kept
        it from the start-up clean-up), so that the run can be created afresh."""
        run = self.runs.get(run_id)
        assert run is not None and run.last_seq == 0 and run_id not in self.sched
        del self.runs[run_id]
        self.ctx.pop(run_id, None)
        self._recent.pop(run_id, None)

    def _shrink(self, run_id: str) -> None:
        run = self.runs.get(run_id)
        if (run is None or not run.finished or run_id in self.sched
                or run_id in self._adopting or self.committer.pending(run_id)
                or self._finish_waiters.get(run_id) or self.watchers.get(run_id)):
            return
        self.stubs[run_id] = store.stub_of(run)
        del self.runs[run_id]
        self.ctx.pop(run_id, None)
        self.committer.drop_run(run_id)

    def summaries(self) -> list[tuple[st.RunSummary, int]]:
        """Every run's summary and owner uid, oldest first."""
        items = [(st.run_summary(run), run.owner_uid) for run in self.runs.values()]
        items += [(stub.summary, stub.owner_uid) for stub in self.stubs.values()]
        items.sort(key=lambda item: item[0].run_id)
        return items

    async def prune(self, run_ids: list[str]) -> list[str]:
        """Remove these finished runs, from memory and from disk (crash-safely:
        `Layout.prune`); the ids removed. A run that is not finished, or is in use (being
        loaded, its last events not durable yet, waited for or watched), is left for a
        later prune."""
        taken: dict[str, Stub] = {}
        for run_id in run_ids:
            stub = self._take_for_prune(run_id)
            if stub is not None:
                taken[run_id] = stub
        if not taken:
            return []
        try:
            removed = await asyncio.to_thread(self.layout.prune, list(taken))
        except OSError as exc:  # the fsync of runs/: the renames may not be durable
            log.error("pruning runs: %s", exc.strerror or exc)
            removed = []
        for run_id in set(taken) - set(removed):  # still on disk: still a run
            self.stubs[run_id] = taken[run_id]
        for run_id in removed:  # its key may name a new run
            stub = taken[run_id]
            if stub.key is not None and self._keys.get((stub.owner_uid, stub.key)) == run_id:
                del self._keys[(stub.owner_uid, stub.key)]
        if removed:
            log.info("pruned %d run(s)", len(removed))
        return removed

    async def apply_policy(self, keep_runs: int | None, keep_days: float | None) -> list[str]:
        """`wfd --keep-runs N --keep-days D`: prune what the policy chooses (`retention`)."""
        chosen = retention.policy(self.summaries(), self.clock.now(), keep_runs, keep_days)
        return await self.prune(chosen) if chosen else []

    def running_attempts(self) -> list[AttemptKey]:
        """The attempts recorded RUNNING now (for a look at their logs' size)."""
        return [AttemptKey(run_id, step, run.steps[step].attempts)
                for run_id, run in self.runs.items() for step in run.running]

    def _take_for_prune(self, run_id: str) -> Stub | None:
        """Forget a finished run that nothing uses (its stub, to put back if its directory
        cannot be removed); None if it must stay."""
        if (run_id in self._loading or run_id in self.sched or run_id in self._adopting
                or self.committer.pending(run_id) or self._finish_waiters.get(run_id)
                or self.watchers.get(run_id)):
            return None
        run = self.runs.get(run_id)
        if run is not None:
            if not (run.finished or run.state == st.CORRUPT):
                return None
            stub = store.stub_of(run)
            del self.runs[run_id]
            self.ctx.pop(run_id, None)
            self._recent.pop(run_id, None)
            self.committer.drop_run(run_id)
            return stub
        return self.stubs.pop(run_id, None)

    async def verify_stubs(self) -> None:
        """Fold every finished run once, in the background, so that a damaged log is
        reported as CORRUPT soon after the start, not only when someone asks for it.
        A run that folds cleanly stays a Stub (its state is not kept in memory). The
        fold runs in a worker thread; only the loop decides what to keep."""
        for run_id in list(self.stubs):
            if run_id not in self.stubs or run_id in self._loading:
                continue
            loaded = await asyncio.to_thread(store.load_run, self.layout, run_id, self.uid)
            if run_id not in self.stubs or run_id in self._loading:
                continue  # a request loaded it meanwhile: its copy wins
            if loaded.run.state == st.CORRUPT:
                self._install(run_id, loaded)

    # ---- the one writer ------------------------------------------------------------

    def _record(self, run_id: str, kind: type[ev.Event], fields: dict[str, Any],
                lazily: bool = False) -> ev.Event:
        """Record an event: applied now (or IllegalTransition, with nothing changed),
        durable at the next commit."""
        run = self.runs[run_id]
        event = kind(seq=run.last_seq + 1, ts=ev.format_ts(self.clock.now()), **fields)
        st.apply(run, event)
        self.sched.touch(run_id)
        self.committer.queue(run_id, event, lazily)
        log.info("%s %s", run_id, st.describe(event))
        return event

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committer.after_commit(callback)

    async def flushed(self) -> None:
        await self.committer.flushed()

    def _durable(self, batch: Batch) -> None:
        """A batch is on disk: tell watchers, then decide again."""
        for run_id, event in batch:
            if self.on_transition is not None:
                self.on_transition(run_id, event)
            if type(event) is ev.RunFinished and self.schedules is not None:
                self.schedules.run_finished(run_id)
            for queue in self.watchers.get(run_id, ()):
                queue.put_nowait(event)
        self.kick()

    def durable_seq(self, run_id: str) -> int:
        run = self.runs.get(run_id)
        return self.committer.durable.get(run_id, run.last_seq if run else 0)

    # ---- watchers ---------------------------------------------------------------

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
        try:
            wake_at = None
            while True:
                decision = self.sched.decide(self.clock.now())
                wake_at = decision.wake_at
                if not self._perform(decision.actions):
                    break
            self._set_timer(wake_at)
        except Exception as exc:  # a bug in deciding: nothing may go on from here
            log.exception("the decide loop failed")
            self.fail(exc)

    def _perform(self, actions: list[scheduler.Action]) -> bool:
        """Do the actions; True if any recorded an event (so decide again)."""
        changed = False
        for action in actions:
            if isinstance(action, scheduler.Emit):
                self._record(action.run_id, action.kind, action.fields)
                if action.kind is ev.RunFinished:
                    self._run_finished(action.run_id)
                changed = True
            elif isinstance(action, scheduler.Start):
                if self.stopping:
                    continue
                self._claim(action)
                changed = True
            elif isinstance(action, scheduler.Kill):
                key = AttemptKey(action.run_id, action.step, action.attempt)
                # A cancel kills only once RunCancelRequested is on disk.
                self.after_commit(lambda k=key, r=action.reason: self.executor.kill(k, r))
        return changed

    def _set_timer(self, wake_at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            delay = max(0.0, wake_at - self.clock.now())
            self._timer = asyncio.get_running_loop().call_later(delay, self.kick)

    def _run_finished(self, run_id: str) -> None:
        self.sched.drop(run_id)
        self._leave(self.runs[run_id])
        self._upstream.pop(run_id, None)

        def done() -> None:
            for future in self._finish_waiters.pop(run_id, []):
                if not future.done():
                    future.set_result(None)
            self._keep_recent(run_id)

        self.after_commit(done)

    async def finished(self, run_id: str) -> None:
        """Wait until the run's RunFinished is durable."""
        run = self.runs[run_id]
        if run.finished and run_id not in self.sched:
            await self.flushed()
            return
        future = asyncio.get_running_loop().create_future()
        self._finish_waiters.setdefault(run_id, []).append(future)
        await future

    # ---- attempts ---------------------------------------------------------------

    def _claim(self, action: scheduler.Start) -> None:
        key = AttemptKey(action.run_id, action.step, action.attempt)
        self._record(key.run_id, ev.AttemptClaimed, {"step": key.step, "attempt": key.attempt})
        if getattr(self.executor, "wants_log_fd", True):  # the keeper opens its own
            self.committer.open_log_after(key)
        self.after_commit(lambda: self._spawn(key))

    def _grace(self, run: st.RunState, step_index: int) -> float:
        """The step's kill_grace, capped for runs not owned by root: one user's huge grace
        must not pin a slot, a cancel or a stop for ever."""
        grace = run.workflow.steps[step_index].kill_grace
        return grace if run.owner_uid == 0 else min(grace, self.max_kill_grace)

    def _spawn(self, key: AttemptKey) -> None:
        """The claim is durable: start the process (unless the run moved on meanwhile)."""
        faults.hit("spawn")  # tests: a crash between a claim and its spawn
        run = self.runs.get(key.run_id)
        rec = run.steps[key.step] if run is not None else None
        moved_on = rec is None or rec.state != st.RUNNING or rec.attempts != key.attempt
        if moved_on or run.stops(rec) or self.stopping:  # type: ignore[union-attr, arg-type]
            self.committer.discard_log_fd(key)
            if not moved_on:
                self.attempt_ended(key, None, "stop" if self.stopping else "cancel")
            return
        assert run is not None and rec is not None
        ctx = self.ctx[key.run_id]
        step = run.workflow.steps[rec.index]
        log_fd = -1
        if getattr(self.executor, "wants_log_fd", True):
            try:
                log_fd = self.committer.log_fd(key)
            except OSError as exc:
                self.attempt_ended(key, None, None,
                                   start_error=f"cannot open log: {exc.strerror}")
                return
        spec = AttemptSpec(
            key=key, argv=step_argv(step.command),
            env=step_env(ctx, run, rec.index, key, self._outputs_for(run, rec.index)),
            cwd=step_cwd(ctx.sub, step.cwd), log_fd=log_fd, umask=ctx.sub.umask,
            kill_grace=self._grace(run, rec.index), user=ctx.user,
            timeout=step.timeout,
        )
        if step.executor != "local":
            self._submit_job(run, rec, spec)
            return
        try:
            info = self.executor.start(spec)
        except StartFailed as exc:
            self.attempt_ended(key, None, None, start_error=str(exc))
            return
        finally:
            if log_fd >= 0:
                os.close(log_fd)
        if info is not None:  # a local executor knows the pid at once
            self.attempt_started(key, info)

    def respawn(self, key: AttemptKey) -> None:
        """An executor found the attempt never started (no job by its name): start it."""
        self._spawn(key)

    def _submit_job(self, run: st.RunState, rec: st.StepRec, spec: AttemptSpec) -> None:
        """A batch attempt (Slurm): its intent, with the token that names its job, durable
        before the submission; an intent already recorded (a job its earlier daemon
        submitted, or not, as the executor found out by that name) keeps its token."""
        key = spec.key
        step = run.workflow.steps[rec.index]
        spec.executor, spec.slurm = step.executor, step.slurm
        try:  # the log exists before the job runs: `wfctl logs` of a pending job is empty
            os.close(self.layout.open_log_for_step(key.run_id, key.step, key.attempt))
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            self.attempt_ended(key, None, None, start_error=f"cannot open log: {why}")
            return
        spec.log_path = os.fspath(self.layout.log(key.run_id, key.step, key.attempt))
        if rec.token is not None:
            spec.token, spec.intent_at = rec.token, 0.0
            self.executor.start(spec)
            return
        spec.token, spec.intent_at = secrets.token_hex(8), self.clock.now()
        self._record(key.run_id, ev.AttemptSubmitting, {
            "step": key.step, "attempt": key.attempt, "executor": step.executor,
            "token": spec.token})
        self.after_commit(lambda: self._job_intent_durable(spec))

    def _job_intent_durable(self, spec: AttemptSpec) -> None:
        key = spec.key
        faults.hit("slurm-intent")  # tests: a crash after the intent, before sbatch
        run = self.runs.get(key.run_id)
        rec = run.steps[key.step] if run is not None else None
        if rec is None or rec.state != st.RUNNING or rec.attempts != key.attempt:
            return
        if run.stops(rec) or self.stopping:  # type: ignore[union-attr]
            self.attempt_ended(key, None, "stop" if self.stopping else "cancel")
            return
        self.executor.start(spec)

    def attempt_submitted(self, key: AttemptKey, job_id: str) -> None:
        """The batch system accepted the attempt's job: its id, recorded once."""
        run = self.runs.get(key.run_id)
        rec = run.steps[key.step] if run is not None and not run.finished else None
        if rec is None or rec.state != st.RUNNING or rec.attempts != key.attempt \
                or rec.job_id == job_id:
            return
        self._record(key.run_id, ev.AttemptSubmitted, {
            "step": key.step, "attempt": key.attempt, "job_id": job_id})

    def attempt_lost(self, key: AttemptKey, why: str) -> None:
        """The executor lost the attempt (a job gone without its record): `on_lost`."""
        run = self.runs.get(key.run_id)
        if run is not None and not run.finished:
            self._lose(run, key, why)
            self.kick()

    def _outputs_for(self, run: st.RunState, index: int) -> dict[str, str]:
        """`WFD_OUT_*` of the steps upstream of step `index` that recorded outputs."""
        if not run.producers:
            return {}
        seq, memo = self._upstream.get(run.run_id, (-1, {}))
        if seq != run.producers_seq:
            memo = {}
            self._upstream[run.run_id] = (run.producers_seq, memo)
        wf, recs = run.workflow, run.steps
        found = upstream(wf.deps, index, lambda i: bool(recs[wf.steps[i].id].outputs), memo)
        return output_env((wf.steps[i].id, recs[wf.steps[i].id].outputs) for i in sorted(found))

    def attempt_started(self, key: AttemptKey, info: StartInfo) -> None:
        """The attempt's leader runs: AttemptStarted, once per loop iteration's spawns."""
        self._unrecorded[key] = info
        if len(self._unrecorded) == 1:
            asyncio.get_running_loop().call_soon(self._record_starts)

    def _record_starts(self) -> None:
        """AttemptStarted for the attempts spawned in the last loop iteration. Reading a
        leader's start time waits while it is still in execve, so it is done here, after
        every spawn of the iteration, rather than right after each one. Nothing waits
        for it on disk: recovery finds a process by its marks if the daemon dies first."""
        while self._unrecorded:
            key = next(iter(self._unrecorded))  # in the order they were spawned
            info = self.executor.identify(self._unrecorded.pop(key))
            run = self.runs.get(key.run_id)
            rec = run.steps[key.step] if run is not None else None
            if rec is None or rec.state != st.RUNNING or rec.attempts != key.attempt:
                continue  # it ended (and was recorded) before this came
            self._record(key.run_id, ev.AttemptStarted, {
                "step": key.step, "attempt": key.attempt, "pid": info.pid,
                "start_time": info.start_time or 0.0, "boot_id": info.boot_id,
                **({"containment": info.containment} if info.containment else {}),
            }, lazily=True)

    def attempt_ended(self, key: AttemptKey, exit_code: int | None, kill_reason: str | None,
                      start_error: str | None = None,
                      usage: tuple[float, int] | None = None,
                      outputs: dict[str, str] | None = None,
                      output_error: str | None = None) -> None:
        """Record how an attempt ended (called by the executor once its tree is gone);
        an outcome is recorded once: an attempt no longer RUNNING is left as it is.
        `outputs` are what it wrote to $WFD_OUTPUT, `output_error` why that file was
        refused (which fails an attempt that exited 0)."""
        run = self.runs.get(key.run_id)
        rec = run.steps[key.step] if run is not None and not run.finished else None
        if rec is not None and rec.state == st.RUNNING and self.max_log_size:
            # the last look at its log, before its end is known to anyone (a few syscalls)
            logcap.cut_all(self.layout, [key], self.max_log_size)
        if rec is None or rec.state != st.RUNNING or rec.attempts != key.attempt:
            self._ack(key)
            return
        if key in self._unrecorded:  # AttemptStarted comes before the attempt's end
            self._record_starts()
        interrupted = "daemon stopped" if kill_reason == "stop" else None
        emit = scheduler.outcome(
            run, key.step, key.attempt, exit_code, now=self.clock.now(), rand=random.random(),  # type: ignore[union-attr]
            timed_out=kill_reason == "timeout", start_error=start_error, interrupted=interrupted,
            outputs=outputs, output_error=output_error,
        )
        fields = dict(emit.fields)
        if usage is not None and emit.kind in ev.ATTEMPT_ENDS:
            fields["cpu"], fields["max_rss"] = round(usage[0], 6), usage[1]
        self._record(emit.run_id, emit.kind, fields)
        self._ack(key)
        self.kick()

    def _ack(self, key: AttemptKey) -> None:
        """Once the outcome is durable, the executor may forget its record of it."""
        ack = getattr(self.executor, "ack", None)
        if ack is not None:
            self.after_commit(lambda: ack([key]))

    # ---- requests -----------------------------------------------------------------

    def key_taken(self, uid: int, key: str) -> bool:
        """Whether a submit by `uid` with this idempotency key would get an earlier run
        (or one being submitted now)."""
        return (self._owner(uid), key) in self._keys

    def _owner(self, uid: int) -> int:
        return uid if self.system else self.uid

    def _index_key(self, run_id: str, owner_uid: int, key: str | None) -> None:
        if key is not None:
            self._keys.setdefault((owner_uid, key), run_id)

    async def submit(self, workflow_text: str, source: str, base_dir: str, env: dict[str, str],
                     umask: int, uid: int, gid: int, vars: dict[str, str] | None = None,
                     key: str | None = None, concurrency: Concurrency | None = None) -> str:
        """`_submit`, idempotent with a `key`: the owner's run with that key (durable, or
        being submitted: then its outcome) answers, and nothing new is made."""
        if key is None:
            return await self._submit(workflow_text, source, base_dir, env, umask, uid, gid,
                                      vars, None, concurrency)
        slot = (self._owner(uid), key)
        earlier = self._keys.get(slot)
        if isinstance(earlier, str):
            return earlier
        if earlier is not None:
            return await asyncio.shield(earlier)
        pending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._keys[slot] = pending
        try:
            run_id = await self._submit(workflow_text, source, base_dir, env, umask, uid, gid,
                                        vars, key, concurrency)
        except BaseException as exc:
            del self._keys[slot]  # no run was made: the key is free again
            pending.set_exception(exc)
            pending.exception()  # retrieved: nobody may be waiting for it
            raise
        self._keys[slot] = run_id
        pending.set_result(run_id)
        return run_id

    async def _submit(self, workflow_text: str, source: str, base_dir: str,
                      env: dict[str, str], umask: int, uid: int, gid: int,
                      vars: dict[str, str] | None, key: str | None,
                      concurrency: Concurrency | None = None) -> str:
        """Validate a submission (off the loop), make its workflow.json durable, record
        the run's first event (with `vars`, the KEY=VALUE of `wfctl run`); return the run
        id once that event is durable. Under a concurrency limit (the caller's, else the
        workflow's) that is reached, the run starts QUEUED, or with skip is refused."""
        self._refuse_new_runs()
        owner_uid = self._owner(uid)
        self._check_run_limit(owner_uid)
        self._submitting[owner_uid] += 1  # counts against the limit until it is driven
        try:
            loop = asyncio.get_running_loop()
            wf = await loop.run_in_executor(self._parser, parse_workflow, workflow_text,
                                            store.default_name(source))
            self._check_executors(wf)
            self._check_pools(wf)
            vars = resolve_vars(wf, vars or {})  # declared params: checked, defaults in
            rule = concurrency or _rule_of(wf)
            self._busy(owner_uid, wf, rule)  # skip: refused before anything is made
            self._refuse_new_runs()
            now = self.clock.now()
            sub = Submission(
                workflow=workflow_text, source=source, base_dir=base_dir, env=env,
                umask=umask & 0o777, uid=owner_uid, gid=gid if self.system else os.getgid(),
                owner=name_of(owner_uid), submitted_at=ev.format_ts(now),
            )
            run_id = self.new_run_id()
            await self.create_run(run_id, wf, sub, vars or {}, key, rule)
        finally:
            self._submitting[owner_uid] -= 1  # from here to `drive` nothing awaits
        await self.flushed()
        return run_id

    def new_run_id(self) -> str:
        self._last_run_id = new_run_id(self.clock.now(), self._last_run_id)
        return self._last_run_id

    async def create_run(self, run_id: str, wf: Workflow, sub: Submission, vars: dict[str, str],
                         key: str | None = None, rule: Concurrency | None = None,
                         schedule: str | None = None, slot: float | None = None) -> None:
        """Make the run's directory and durable workflow.json (in a worker thread), record
        its RunCreated (QUEUED if `rule`'s limit is reached) and drive it; the event is
        durable at the next commit."""
        ctx = await asyncio.to_thread(self._create_run, run_id, sub)
        try:  # again: another submit may have taken the last slot meanwhile
            queued = self._busy(sub.uid, wf, rule)
        except UsageError:
            await asyncio.to_thread(self.layout.remove_run, run_id)
            raise
        self.ctx[run_id] = ctx
        run = self.runs[run_id] = st.RunState(wf)
        self.committer.add_run(run_id, 0, 0)
        fields: dict[str, Any] = {
            "run_id": run_id, "name": wf.name, "owner": sub.owner, "owner_uid": sub.uid,
            "vars": dict(vars or {}), "key": key,
            "queue": rule.key if rule is not None else None,
            "concurrency": rule.limit if rule is not None else None, "queued": queued}
        if schedule is not None:
            fields.update(schedule=schedule, slot=slot)
        self._record(run_id, ev.RunCreated, fields)
        self._join(run)
        if queued:
            self._queued[run_id] = None
        else:
            self.sched.drive(run_id)
        self.kick()

    def _busy(self, owner_uid: int, wf: Workflow, rule: Concurrency | None) -> bool:
        """Whether a new run under `rule` must queue: its owner's unfinished runs of the
        key (QUEUED ones too: a newcomer waits behind them) reach the limit. With skip,
        that is a refusal (UsageError, exit 2) instead."""
        if rule is None:
            return False
        key = rule.key if rule.key is not None else wf.name
        unfinished = self._by_key.get((owner_uid, key), {})
        if len(unfinished) < rule.limit:
            return False
        if rule.skip:
            ids = ", ".join(list(unfinished)[:3]) + (", ..." if len(unfinished) > 3 else "")
            raise UsageError(
                f"{'workflow' if rule.key is None else 'queue'} {key!r} has {len(unfinished)} "
                f"unfinished run{'s' if len(unfinished) > 1 else ''} of "
                f"{name_of(owner_uid)} ({ids}), its concurrency is {rule.limit} and on_busy "
                "is \"skip\": not started")
        return True

    def _join(self, run: st.RunState) -> None:
        """An unfinished run counts against its queue key's concurrency."""
        if not run.finished:
            self._by_key.setdefault((run.owner_uid, run.queue_key), {})[run.run_id] = None

    def _leave(self, run: st.RunState) -> None:
        """The run finished: its slot frees, and the oldest QUEUED run of its key may start."""
        slot = (run.owner_uid, run.queue_key)
        unfinished = self._by_key.get(slot)
        if unfinished is None:
            return
        unfinished.pop(run.run_id, None)
        self._queued.pop(run.run_id, None)
        if not unfinished:
            del self._by_key[slot]
        else:
            self._admit(slot)

    def _admit(self, slot: tuple[int, str]) -> None:
        """Start the QUEUED runs of `slot` that its concurrency lets start (submit order)."""
        runs = [self.runs[run_id] for run_id in self._by_key.get(slot, ())]
        for run_id in scheduler.admissions(runs, self._queued):
            del self._queued[run_id]
            self._record(run_id, ev.RunDequeued, {})
            self.sched.drive(run_id)
        self.kick()

    def _check_executors(self, wf: Workflow) -> None:
        """Slurm steps: a user-mode daemon (a job cannot write into a system daemon's
        root-only run dir) with `sbatch` on its PATH."""
        if not any(step.executor == "slurm" for step in wf.steps):
            return
        if self.system:
            raise UsageError("Slurm steps need a wfd in user mode (its state dir shared with "
                             "the nodes, docs/slurm.md); this one runs in system mode")
        if not slurm.sbatch_found():
            raise UsageError("this workflow has Slurm steps, but sbatch is not on wfd's PATH "
                             "(install the Slurm client commands)")

    def _check_pools(self, wf: Workflow) -> None:
        """Every pool the workflow names is one of the daemon's (the validator cannot know:
        a name it does not have is a typo far more often than a pool to come)."""
        named = {step.pool for step in wf.steps if step.pool is not None}
        unknown = sorted(named - self.sched.pools.keys())
        if unknown:
            have = ", ".join(sorted(self.sched.pools)) or "none"
            raise UsageError(
                f"workflow {wf.name!r} names pool{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}, which wfd does not have (its pools: {have});"
                f" add one with `wfctl pool set {unknown[0]} N` or `wfd --pool {unknown[0]}=N`")

    async def set_pool(self, name: str, limit: int) -> None:
        """Set a pool's limit at run time: durable (pools.json) before it is in force.
        Raised, waiting steps start at once; lowered, running steps go on."""
        async with self._pool_lock:
            try:
                await asyncio.to_thread(self.pools.set, name, limit)
            except OSError as exc:
                raise StorageError(f"cannot save pool limits in {self.pools.path}: "
                                   f"{exc.strerror or exc}") from None
        self.sched.set_pool(name, limit)
        log.info("pool %s: limit %d (set at run time)", name, limit)
        self.kick()

    def pool_table(self) -> list[tuple[str, int, int, int, str]]:
        """Each pool: name, limit, running steps and READY steps that name it (of the runs
        driven, counted now), and where its limit comes from ("option" or "set")."""
        running: collections.Counter[str] = collections.Counter()
        waiting: collections.Counter[str] = collections.Counter()
        for run_id in self.sched:
            run = self.runs[run_id]
            running.update(run.pool_running)
            waiting.update(run.pool_ready)
        return [(name, limit, running[name], waiting[name], self.pools.source(name))
                for name, limit in sorted(self.sched.pools.items())]

    def _check_run_limit(self, uid: int) -> None:
        """`--max-runs-per-user`: the runs of `uid` the daemon drives plus its submits in
        flight. Runs not driven (after `--no-resume`, or still being adopted) are not
        counted: they hold no slot until they are driven."""
        limit = self.max_runs_per_user
        have = self.sched.runs_of(uid) + self._submitting[uid]
        if limit is not None and have >= limit:
            raise UsageError(f"uid {uid} has {have} unfinished runs, the limit is {limit} "
                             "(wfd --max-runs-per-user); submit again once some have finished")

    def _refuse_new_runs(self) -> None:
        if self.stopping:
            raise UsageError("wfd is shutting down; submit again once it is back")
        if self.storage_error is not None:
            raise StorageError(f"wfd cannot persist events now ({self.storage_error})")

    def _create_run(self, run_id: str, sub: Submission) -> RunCtx:
        """In a worker thread: the run's directory and durable workflow.json, and what the
        user database says of its owner."""
        try:
            self.layout.create_run(run_id, sub)
        except OSError as exc:
            self.layout.remove_run(run_id)
            raise StorageError(f"cannot create run directory: {exc.strerror or exc}") from None
        return store.run_ctx(sub, self.uid)

    async def _known(self, run_id: str) -> st.RunState:
        run = await self.get(run_id)
        if run is None:
            raise UsageError(f"no such run: {run_id}")
        return run

    async def cancel(self, run_id: str) -> None:
        """Cancel and return once the run is over (every step process gone). Asked again
        while the first cancel waits out a kill_grace, it kills at once (SIGKILL)."""
        run = await self._known(run_id)
        if run.finished:
            return
        if run.cancelling:
            self.after_commit(lambda: self._force_kills(run_id))
        elif not run.cancellable():
            pass  # its outcome is fixed: the on_exit steps run on, and this waits for them
        elif run_id in self.sched:
            self._record(run_id, ev.RunCancelRequested, {})
            self.kick()
        else:  # not driven: its old trees die first, and adopting it records the cancel
            self._cancels.add(run_id)
            try:
                await self.adopt([run_id])
            finally:
                self._cancels.discard(run_id)
        await self.finished(run_id)

    def _force_kills(self, run_id: str) -> None:
        run = self.runs.get(run_id)
        for step_id in run.running if run is not None else ():
            key = AttemptKey(run_id, step_id, run.steps[step_id].attempts)  # type: ignore[union-attr]
            self.executor.kill(key, "cancel", force=True)

    async def rerun(self, run_id: str, uid: int, gid: int, variables: dict[str, str]) -> str:
        """A new run of the run's stored workflow, submitted as `uid` with the stored
        context and variables (`variables` over them); the new run's id."""
        run = await self._known(run_id)
        ctx = self.ctx.get(run_id)
        if ctx is None:
            raise UsageError(f"run {run_id} cannot be run again: its workflow.json is "
                             f"unreadable ({run.error or 'CORRUPT'})")
        sub = ctx.sub
        return await self.submit(sub.workflow, sub.source, sub.base_dir, sub.env, sub.umask,
                                 uid, gid, {**run.vars, **variables})

    async def retry(self, run_id: str, steps: list[str], downstream: bool) -> list[str]:
        """Run `steps` of a finished run again (with `downstream`, every step after them
        too): one StepsRetried event, through the fold; returns the steps to run, once
        the run is durably RUNNING again."""
        run = await self._known(run_id)
        if run_id in self.sched or run_id in self._adopting:
            raise UsageError(f"run {run_id} is running; retry its steps once it has ended")
        unknown = [step for step in steps if step not in run.steps]
        if unknown:
            raise UsageError(f"run {run_id} has no step {unknown[0]!r}"
                             f"{st.near_step(unknown[0], run)}")
        chosen = st.downstream(run, steps) if downstream else list(dict.fromkeys(steps))
        problem = st.retry_problem(run, chosen)
        if problem is not None:
            raise UsageError(problem)
        self._record(run_id, ev.StepsRetried, {"steps": chosen})
        self._join(run)  # counts against its concurrency again; a retry does not queue
        self.sched.drive(run_id)
        self.kick()
        await self.flushed()
        return chosen

    async def resume(self, run_id: str) -> None:
        """Continue a FAILED or CANCELLED run, or pick up an unfinished one not driven;
        returns once it is durably RUNNING again."""
        run = await self._known(run_id)
        if run_id in self.sched or run_id in self._adopting:
            raise UsageError(f"run {run_id} is running already")
        if run_id in self._queued:
            raise UsageError(f"run {run_id} is QUEUED: it starts when its turn comes")
        if run.state in (st.SUCCEEDED, st.CORRUPT):
            raise UsageError(f"run {run_id} is {run.state}; only a FAILED, CANCELLED or "
                             "unfinished run can be resumed")
        await self._resume([run_id])

    async def resume_all(self, visible: Callable[[st.RunState], bool]) -> list[str]:
        """Resume every unfinished run nobody drives that `visible` allows."""
        run_ids = [run_id for run_id, run in self.runs.items()
                   if not run.finished and run_id not in self.sched
                   and run_id not in self._adopting and run_id not in self._queued
                   and visible(run)]
        await self._resume(run_ids)
        return run_ids

    async def _resume(self, run_ids: list[str]) -> None:
        await self.adopt([r for r in run_ids if not self.runs[r].finished])
        for run_id in run_ids:
            if self.runs[run_id].state in (st.FAILED, st.CANCELLED):
                self._record(run_id, ev.RunResumed, {})
                self._join(self.runs[run_id])  # counts again; a resume does not queue
                self.sched.drive(run_id)
        self.kick()
        await self.flushed()

    async def adopt(self, run_ids: list[str]) -> None:
        """Drive unfinished runs left by a previous daemon: deal with what is left of
        their attempts (re-attach, record, or kill and interrupt), and go on. One adoption
        per run: a run already being adopted is waited for, not adopted again."""
        tasks = self.start_adoptions(run_ids)
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    def start_adoptions(self, run_ids: list[str]) -> list[asyncio.Task]:
        """Start adopting each run not driven or being adopted yet; each run's task."""
        tasks = []
        for run_id in run_ids:
            task = self._adopting.get(run_id)
            if task is None and run_id not in self.sched and not self.runs[run_id].finished:
                task = self.supervise(self._adopt(run_id))
                self._adopting[run_id] = task
            if task is not None:
                tasks.append(task)
        return tasks

    async def _adopt(self, run_id: str) -> None:
        try:
            run = self.runs[run_id]
            stale = []
            for step_id in run.running:
                rec = run.steps[step_id]
                key = AttemptKey(run_id, step_id, rec.attempts)
                claimed_at = ev.parse_ts(rec.attempt_ts) if rec.attempt_ts else None
                stale.append(StaleAttempt(
                    key, rec.pid, rec.start_time, rec.boot_id, self._grace(run, rec.index),
                    run.owner_uid, claimed_at,
                    executor=rec.executor or run.workflow.steps[rec.index].executor,
                    token=rec.token, job_id=rec.job_id,
                    log_path=os.fspath(self.layout.log(run_id, step_id, rec.attempts)),
                    intent_at=ev.parse_ts(rec.intent_ts) if rec.intent_ts else None,
                ))
            if run.state == st.QUEUED:
                pass  # none of its steps ever started: nothing is left to deal with
            elif hasattr(self.executor, "reattach"):
                await self._reattach(run, stale)
            else:
                await self.executor.clear_stale(stale)
                for key, *_ in stale:
                    self._interrupted(run, key, "daemon restarted")
            if run_id in self._cancels and run.cancellable():
                # before the run is driven again: no new attempt may start first
                self._record(run_id, ev.RunCancelRequested, {})
            if run.finished:
                pass
            elif run.state == st.QUEUED and not run.cancelling:
                self._queued[run_id] = None  # back in line, in submit order
                self._admit((run.owner_uid, run.queue_key))
            else:
                self._queued.pop(run_id, None)
                self.sched.drive(run_id)
            self.kick()
        finally:
            del self._adopting[run_id]

    async def _reattach(self, run: st.RunState, stale: list[StaleAttempt]) -> None:
        """Attempts a previous daemon left RUNNING: those still running under the keeper go
        on; an ended one's outcome is recorded (once: `attempt_ended` checks); a lost one
        (no keeper runs it, no record of its end) follows its step's `on_lost`, after
        whatever is left of its tree is killed. One that never reached the keeper (the
        previous daemon died between its claim and its spawn) never ran: it starts now."""
        found = self.executor.reattach(stale)  # type: ignore[attr-defined]
        for record in found.ended:
            self.attempt_ended(record.key, record.exit_code, record.kill_reason,
                               start_error=record.error, usage=(record.cpu, record.max_rss),
                               outputs=record.outputs, output_error=record.output_error)
        lost = [entry for entry in stale if entry.key in set(found.lost)]
        unsent = [entry for entry in stale if entry.key in set(found.unsent)]
        if lost or unsent:  # of an unsent one nothing should be left: made sure of
            await self.executor.clear_stale(lost + unsent)
        for entry in lost:
            self._lost(run, entry)
        for entry in unsent:
            log.info("%s %s: attempt %d never reached the keeper; starting it now",
                     run.run_id, entry.key.step, entry.key.attempt)
            self._spawn(entry.key)

    def _lost(self, run: st.RunState, entry: StaleAttempt) -> None:
        rec = run.steps[entry.key.step]
        if rec.state != st.RUNNING or rec.attempts != entry.key.attempt:
            return
        why = ("the machine restarted" if entry.boot_id and entry.boot_id != BOOT_ID
               else "its keeper is gone")
        self._lose(run, entry.key, why)

    def _lose(self, run: st.RunState, key: AttemptKey, why: str) -> None:
        """A lost attempt follows its step's `on_lost`."""
        rec = run.steps[key.step]
        if rec.state != st.RUNNING or rec.attempts != key.attempt:
            return
        step = run.workflow.steps[rec.index]
        if step.on_lost == "fail":
            self._record(run.run_id, ev.StepFailed, {
                "step": key.step, "attempt": key.attempt, "error": f"attempt lost: {why}"})
        else:
            self._interrupted(run, key, f"attempt lost: {why}")

    def _interrupted(self, run: st.RunState, key: AttemptKey, reason: str) -> None:
        rec = run.steps[key.step]
        if rec.state == st.RUNNING and rec.attempts == key.attempt:
            self._record(run.run_id, ev.AttemptInterrupted, {
                "step": key.step, "attempt": key.attempt, "reason": reason})

    def adopting(self) -> int:
        return len(self._adopting)

    def status(self, run: st.RunState, steps: bool = True) -> st.RunStatus:
        """The run's status as its durable events say: a RunFinished still waiting for the
        disk is not shown as the end, and a storage error is shown. Without `steps`, the
        run's fields only (the server streams the steps: `st.step_statuses`)."""
        status = st.run_status(run, steps, self.sched.pool_full)
        error = self.storage_error
        undurable = self.durable_seq(run.run_id) < run.last_seq
        if (error is not None and not run.finished) or undurable:
            if run.finished and run.state != st.CORRUPT:
                status.state, status.finished_at = st.RUNNING, None
            status.error = error or status.error
        note = getattr(self.executor, "status_note", lambda: None)()
        if note is not None and status.error is None and any(
                run.steps[step_id].executor for step_id in run.running):
            status.error = note  # e.g. the Slurm controller does not answer: waiting
        status.waiting_for_resume = self.waits_for_resume(run)
        return status

    def waits_for_resume(self, run: st.RunState) -> bool:
        """Unfinished and nobody drives it (the daemon started with --no-resume)."""
        run_id = run.run_id
        return (not run.finished and run_id not in self.sched
                and run_id not in self._adopting and run_id not in self._queued)

    def summary(self, summary: st.RunSummary) -> st.RunSummary:
        """A list entry as `status` shows it: the storage error on unfinished runs, and
        whether one waits for a resume."""
        run = self.runs.get(summary.run_id)
        if run is None:
            return summary
        status = self.status(run, steps=False)  # a list must not cost every run's steps
        if (status.state == summary.state and status.error is None
                and not status.waiting_for_resume):
            return summary
        return st.RunSummary(run_id=summary.run_id, name=summary.name, owner=summary.owner,
                             state=status.state, created_at=summary.created_at,
                             finished_at=status.finished_at, schedule=summary.schedule,
                             scheduled_at=summary.scheduled_at,
                             run_seconds=status.run_seconds,
                             running_since=status.running_since,
                             waiting_for_resume=status.waiting_for_resume)

    async def stop(self, stop_steps: bool = True) -> None:
        """Stop: with `stop_steps` (or an executor whose attempts die with the daemon)
        kill every running tree and record the attempts as interrupted; else leave them
        running under the keeper, for the next daemon. Then flush.

        If events cannot be persisted, give up on them after STOP_FLUSH_WAIT: the next
        start folds the log as it is, finds those attempts RUNNING and deals with them
        itself, so nothing is lost but the wait."""
        self.stopping = True
        for task in list(self._adopting.values()):
            task.cancel()
        if stop_steps or not hasattr(self.executor, "reattach"):
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

    def force_stop(self) -> None:
        """A second stop request: kill what is still dying at once."""
        for run_id in list(self.sched):
            self._force_kills(run_id)

    def active_runs(self) -> int:
        return len(self.sched) + len(self._adopting)

    def events_path(self, run_id: str) -> os.PathLike:
        return self.layout.events(run_id)

    def log_path(self, run_id: str, step: str, attempt: int) -> os.PathLike:
        return self.layout.log(run_id, step, attempt)
