"""What to do next, given the state and the time: pure decisions, no I/O.

A `Scheduler` looks at the runs the daemon drives and returns actions: events
to record (a step became READY, is SKIPPED, its retry is due, the run
finished, a step is CANCELLED), attempts to start, attempts to kill (timeout,
cancel) and when to look again. It never acts and never reads the clock: the
daemon passes `now`, performs the actions, applies the events it recorded,
and calls `decide` again until nothing is left to do. Events a decision asks
for are applied before the next call, so a call never repeats the previous
one's work.

Who starts next
---------------
Free slots go round-robin across *users* (run owners) first, then across that
user's runs, then within a run in the order its steps became READY (file
order among those that became READY together). Each round-robin is "least
recently started first": a user who has not started a step for longest goes
first, so a member with 3,000 queued runs gets one start and another member's
new run gets the next free slot. A step starts only if the daemon's global
limit, the per-user limit (`--max-steps-per-user`), the run's `max_parallel`
and the step's pool, if it names one, all have room.

Pools
-----
A pool (`wfd --pool db=2`, `wfctl pool set db 3`) is a limit on the running
steps that name it, shared by every run of every user. Its running steps are
counted like the others (per run, adjusted by each dirty run's change). A
step whose pool is full is passed over: the run's next READY step that can
start goes instead, and a run none of whose READY steps can start waits, noted
as a waiter of those pools, until a step of the pool ends or its limit is
raised; then it queues again with the stamp it had, so fairness is as without
pools. A pool the daemon does not know has limit 0: its steps wait. Lowering a
limit stops no running step; new ones wait until the pool is under it. Passing
over READY steps of a full pool costs one look per step passed, in the run
that starts. A run whose READY steps all wait costs nothing while its pools
stay full. The waiters of a pool are kept per user, each user's in a heap by
stamp: a freed slot (or a raised limit) queues each waiting user's least
recently started run of the pool, and each start of a user queues that user's
next one in every pool with room. So a wake costs the waiting users, not the
waiting runs, and the round-robin stays exact.

How a decision stays small
--------------------------
The daemon tells the scheduler what changed: `drive` a run (submitted,
adopted, resumed), `touch` it whenever one of its events is applied, `drop`
it once finished. A decision looks only at

- the *dirty* runs (touched since the last decision, or whose timer came
  due): their housekeeping and whether they can start a step now;
- the timer heap of (time, run): each run's earliest retry or deadline;
- while a slot is free, the start queues: a heap of (last start, uid) of the
  users who may start a step, and per user a heap of (last start, run id) of
  their runs that have a READY step and room under `max_parallel`.

"Last start" is a counter, not a time: `drive` gives a run a fresh one (it
queues behind that user's waiting runs), a start gives the run and its user a
fresh one. Running steps are counted per run, per user and in total, adjusted
by each dirty run's change. A start pops the user and their run, and pushes
both back if they can take another step. Entries are removed lazily: an entry
whose run was dropped, or which can no longer start, is discarded when popped
and pushed again when an event makes its run dirty. Every entry is pushed
because of an event or a start, so a decision costs the dirty runs' active
steps plus O(log n) per start and per discarded entry; a queued run that
nothing happens to costs nothing, also when thousands wait.

`outcome` turns the end of an attempt into the event that records it; the
random factor of backoff jitter is an argument, so the core stays
deterministic and the event carries the time it chose.
"""

from __future__ import annotations

import heapq
import itertools
import os
import signal
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from wfd import events as ev
from wfd.events import format_ts
from wfd.state import QUEUED, RUNNING, TERMINAL, RunState


@dataclass(frozen=True)
class Emit:
    """Record event `kind` with `fields` in run `run_id`."""

    run_id: str
    kind: type[ev.Event]
    fields: dict[str, Any]


@dataclass(frozen=True)
class Start:
    """Claim attempt `attempt` of `step` (durably), then spawn it."""

    run_id: str
    step: str
    attempt: int


@dataclass(frozen=True)
class Kill:
    """Kill the running attempt's whole tree; `reason` is "timeout" or "cancel"."""

    run_id: str
    step: str
    attempt: int
    reason: str


Action = Emit | Start | Kill


@dataclass
class Decision:
    actions: list[Action] = field(default_factory=list)
    wake_at: float | None = None  # the earliest time a timer must call decide again


class _Driven:
    """What the scheduler keeps about one run it drives."""

    __slots__ = ("uid", "stamp", "running", "pools", "queued", "wake", "waits")

    def __init__(self, uid: int, stamp: int) -> None:
        self.uid = uid
        self.stamp = stamp  # last start (or when it came to be driven)
        self.running = 0  # its RUNNING steps as last counted
        self.pools: dict[str, int] = {}  # its RUNNING steps per pool, as last counted
        self.waits: set[str] = set()  # the pools whose waiters it is among
        self.queued = False  # has a live entry in its user's queue
        self.wake: float | None = None  # its live entry in the timer heap


class _User:
    """One run owner: their running steps, driven runs and queue of runs."""

    __slots__ = ("uid", "stamp", "running", "runs", "queue", "queued")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.stamp = 0  # last start; 0 for never, so a newcomer goes first
        self.running = 0
        self.runs = 0
        self.queue: list[tuple[int, str]] = []  # (stamp, run id) of runs that may start
        self.queued = False  # has an entry in the users' queue

    def room(self, per_user: int | None, taken: int) -> bool:
        return per_user is None or self.running + taken < per_user


class _Cursor:
    """A run's READY steps in order, for one decision, past those whose pool is full.
    Pool room only shrinks within a decision, so a step passed over stays passed."""

    __slots__ = ("run", "steps", "head", "room")

    def __init__(self, run: RunState, room: Callable[[str], bool]) -> None:
        self.run = run
        self.steps = iter(run.ready)
        self.head: str | None = None
        self.room = room

    def peek(self) -> str | None:
        """The next step that can start now, or None."""
        steps = self.run.steps
        while True:
            head = self.head
            if head is not None:
                pool = steps[head].pool
                if pool is None or self.room(pool):
                    return head
            head = self.head = next(self.steps, None)
            if head is None:
                return None

    def take(self) -> str:
        step_id = self.peek()
        assert step_id is not None
        self.head = None
        return step_id


class Scheduler:
    """Decisions for the runs the daemon drives (module docstring: how it stays small).

    A user is kept for the daemon's life (a few hundred bytes per uid ever seen), so
    their last start is remembered between their runs."""

    def __init__(self, runs: Mapping[str, RunState], limit: int,
                 per_user: int | None = None, pools: Mapping[str, int] | None = None) -> None:
        self.runs = runs  # every run's state by id, kept current by the caller's `apply`
        self.limit = limit  # the daemon's global --max-parallel
        self.per_user = per_user  # --max-steps-per-user; None: the global limit only
        self.pools: dict[str, int] = dict(pools or {})  # pool -> limit; change: set_pool
        self._pool_running: dict[str, int] = {}  # RUNNING steps per pool, driven runs
        self._pool_taken: dict[str, int] = {}  # starts per pool in the decision under way
        # pool -> uid -> heap of (stamp, run id): that user's runs waiting for the pool
        self._pool_waiters: dict[str, dict[int, list[tuple[int, str]]]] = {}
        self._driven: dict[str, _Driven] = {}
        self._users: dict[int, _User] = {}
        self._dirty: dict[str, None] = {}  # ordered, so decisions are deterministic
        self._timers: list[tuple[float, str]] = []
        self._queue: list[tuple[int, int]] = []  # (stamp, uid) of users who may start
        self._running = 0
        self._stamps = itertools.count(1)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._driven

    def __len__(self) -> int:
        return len(self._driven)

    def __iter__(self) -> Iterator[str]:
        return iter(self._driven)

    def runs_of(self, uid: int) -> int:
        """How many runs of `uid` are driven (for `--max-runs-per-user`)."""
        user = self._users.get(uid)
        return 0 if user is None else user.runs

    def pool_running(self, pool: str) -> int:
        """Running steps of driven runs in `pool`, as of the last decision."""
        return self._pool_running.get(pool, 0)

    def pool_full(self, pool: str) -> bool:
        return self.pool_running(pool) >= self.pools.get(pool, 0)

    # ---- what changed ---------------------------------------------------------

    def set_pool(self, pool: str, limit: int) -> None:
        """A pool's limit, new or changed. Raised: its waiting runs may start at the next
        decision. Lowered: running steps go on; new ones wait until it has room."""
        raised = limit > self.pools.get(pool, 0)
        self.pools[pool] = limit
        if raised and self._pool_room(pool):
            self._wake_pool(pool)

    def drive(self, run_id: str) -> None:
        """Start driving a run (submitted, adopted, resumed); its owner is read now."""
        if run_id not in self._driven:
            uid = self.runs[run_id].owner_uid
            user = self._users.get(uid)
            if user is None:
                user = self._users[uid] = _User(uid)
            user.runs += 1
            self._driven[run_id] = _Driven(uid, next(self._stamps))
        self._dirty[run_id] = None

    def touch(self, run_id: str) -> None:
        """An event of the run was applied: look at it in the next decision."""
        if run_id in self._driven:
            self._dirty[run_id] = None

    def drop(self, run_id: str) -> None:
        """Stop driving a run (it finished). Its queue and timer entries go stale."""
        driven = self._driven.pop(run_id, None)
        if driven is None:
            return
        self._dirty.pop(run_id, None)
        user = self._users[driven.uid]
        user.runs -= 1
        self._recount(user, driven, 0)
        if driven.pools:
            self._recount_pools(driven, {})
        self._offer(user, 0)

    # ---- deciding ---------------------------------------------------------------

    def decide(self, now: float) -> Decision:
        """Housekeeping of the dirty runs; if that records nothing, starts. A
        decision that records events starts nothing, so a start always sees the
        READY steps those events make."""
        decision = Decision()
        if self._timers and self._timers[0][0] <= now:
            self._due(now)
        dirty, self._dirty = self._dirty, {}
        for run_id in dirty:
            self._refresh(run_id, now, decision)
        if not any(isinstance(a, Emit) for a in decision.actions):
            self._starts(decision)
        if self._timers:
            self._next_wake(decision)
        return decision

    def _refresh(self, run_id: str, now: float, decision: Decision) -> None:
        """Count the run's RUNNING steps, do its housekeeping, queue it if it can start.
        (The hot path of every step: the small checks are inlined.)"""
        driven = self._driven[run_id]
        run = self.runs[run_id]
        user = self._users[driven.uid]
        self._recount(user, driven, run.counts[RUNNING])
        if run.pool_running:
            self._recount_pools(driven, run.pool_running)
        if not run.finished:
            wake = _housekeeping(run, now, decision.actions.append)
            if wake != driven.wake:
                self._set_timer(run_id, driven, wake)
        if not driven.queued:
            self._enqueue(run_id, run, driven, user, 0)
        if not user.queued:
            self._offer(user, 0)

    def _recount(self, user: _User, driven: _Driven, running: int) -> None:
        delta = running - driven.running
        driven.running = running
        user.running += delta
        self._running += delta

    def _recount_pools(self, driven: _Driven, running: Mapping[str, int]) -> None:
        """The run's running steps per pool changed: adjust the pools' counts; a pool
        that has a slot fewer taken wakes the runs waiting for it."""
        old = driven.pools
        for pool in old.keys() | running.keys():
            delta = running.get(pool, 0) - old.get(pool, 0)
            if delta:
                self._pool_running[pool] = self._pool_running.get(pool, 0) + delta
                if delta < 0 and self._pool_room(pool):  # not while over a lowered limit
                    self._wake_pool(pool)
        driven.pools = {pool: n for pool, n in running.items() if n}

    def _pool_room(self, pool: str) -> bool:
        """Whether `pool` can take one more step in the decision under way."""
        used = self._pool_running.get(pool, 0) + self._pool_taken.get(pool, 0)
        return used < self.pools.get(pool, 0)

    def _wait_for_pools(self, run_id: str, run: RunState) -> None:
        """The run cannot start a step now, perhaps for a full pool: note it among the
        waiters of the pools of its READY steps, in its user's heap for each."""
        driven = self._driven[run_id]
        for pool, ready in run.pool_ready.items():
            if ready and pool not in driven.waits:
                driven.waits.add(pool)
                users = self._pool_waiters.setdefault(pool, {})
                heapq.heappush(users.setdefault(driven.uid, []), (driven.stamp, run_id))

    def _wake_pool(self, pool: str) -> None:
        """The pool has room: queue again each waiting user's least recently started run
        of it, so a wake costs the waiting users, not the waiting runs."""
        for uid in list(self._pool_waiters.get(pool, ())):
            self._wake_next(pool, uid)

    def _wake_user(self, uid: int) -> None:
        """The user started a step: in each pool with room, their next waiting run joins
        the queue (the one queued for it may have been the run that started)."""
        for pool in [p for p, users in self._pool_waiters.items() if uid in users]:
            if self._pool_room(pool):
                self._wake_next(pool, uid)

    def _wake_next(self, pool: str, uid: int) -> None:
        """Queue the user's least recently started run that waits for `pool` and can start
        now; entries of runs dropped, queued meanwhile or restamped are put right."""
        users = self._pool_waiters.get(pool)
        heap = users.get(uid) if users is not None else None
        if heap is None:
            return
        blocked = []  # waiting for something else too (max_parallel, another pool)
        while heap:
            stamp, run_id = heapq.heappop(heap)
            driven = self._driven.get(run_id)
            if driven is None or pool not in driven.waits:
                continue  # dropped, or queued since
            if driven.stamp != stamp:  # it started a step since: its place moved back
                heapq.heappush(heap, (driven.stamp, run_id))
                continue
            run = self.runs[run_id]
            if not self._startable(run, 0):
                blocked.append((stamp, run_id))
                continue
            user = self._users[uid]
            self._enqueue(run_id, run, driven, user, 0)
            if not user.queued:
                self._offer(user, 0)
            break
        for entry in blocked:
            heapq.heappush(heap, entry)
        if not heap:
            del users[uid]  # type: ignore[union-attr]
            if not users:
                del self._pool_waiters[pool]

    # ---- timers -------------------------------------------------------------------

    def _due(self, now: float) -> None:
        """Runs whose retry or deadline came: dirty."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, run_id = heapq.heappop(timers)
            driven = self._driven.get(run_id)
            if driven is not None and driven.wake == at:
                driven.wake = None
                self._dirty[run_id] = None

    def _set_timer(self, run_id: str, driven: _Driven, wake: float | None) -> None:
        driven.wake = wake
        if wake is not None:
            heapq.heappush(self._timers, (wake, run_id))
            if len(self._timers) > 2 * len(self._driven) + 64:
                self._timers = [t for t in self._timers if self._live_timer(*t)]
                heapq.heapify(self._timers)

    def _live_timer(self, at: float, run_id: str) -> bool:
        driven = self._driven.get(run_id)
        return driven is not None and driven.wake == at

    def _next_wake(self, decision: Decision) -> None:
        timers = self._timers
        while timers and not self._live_timer(*timers[0]):
            heapq.heappop(timers)
        if timers:
            decision.wake_at = timers[0][0]

    # ---- starts ---------------------------------------------------------------------

    def _startable(self, run: RunState, taken: int, cursor: _Cursor | None = None) -> bool:
        """`taken`: steps of this run already started in this decision; `cursor`: its
        READY steps as this decision has gone through them."""
        if run.finished or len(run.ready) <= taken:
            return False
        if run.cancelling and run.main_open():  # on_exit steps start after a cancel
            return False
        cap = run.workflow.max_parallel
        if cap is not None and run.counts[RUNNING] + taken >= cap:
            return False
        if not run.pool_ready:  # no step of it names a pool
            return True
        if cursor is not None:
            return cursor.peek() is not None
        pooled = 0  # no decision under way: a READY step without a pool, or with room
        for pool, ready in run.pool_ready.items():
            if ready and self._pool_room(pool):
                return True
            pooled += ready
        return len(run.ready) > pooled

    def _enqueue(self, run_id: str, run: RunState, driven: _Driven, user: _User,
                 taken: int, cursor: _Cursor | None = None) -> None:
        if driven.queued:
            return
        if not self._startable(run, taken, cursor):
            if run.pool_ready:
                self._wait_for_pools(run_id, run)
            return
        driven.waits.clear()  # queued: its waiter entries go stale
        driven.queued = True
        heapq.heappush(user.queue, (driven.stamp, run_id))
        if len(user.queue) > 2 * user.runs + 64:  # stale entries of dropped runs
            user.queue = [e for e in user.queue if self._live_entry(*e)]
            heapq.heapify(user.queue)

    def _live_entry(self, stamp: int, run_id: str) -> bool:
        driven = self._driven.get(run_id)
        return driven is not None and driven.queued and driven.stamp == stamp

    def _offer(self, user: _User, taken: int) -> None:
        """Queue the user if they have a run to start and room under the limit."""
        if not user.queued and user.queue and user.room(self.per_user, taken):
            user.queued = True
            heapq.heappush(self._queue, (user.stamp, user.uid))

    def _starts(self, decision: Decision) -> None:
        """Fill free slots: the user who started least recently, their run that
        started least recently, its first READY step not taken yet; repeat."""
        free = self.limit - self._running
        if free <= 0 or not self._queue:
            return
        taken: dict[str, int] = {}  # starts per run in this decision
        by_user: dict[int, int] = {}
        cursors: dict[str, _Cursor] = {}
        self._pool_taken = {}
        while free > 0 and self._queue:
            uid = heapq.heappop(self._queue)[1]
            user = self._users[uid]
            user.queued = False
            if not user.room(self.per_user, by_user.get(uid, 0)):
                continue  # offered again when one of their steps ends
            run_id = self._next_run(user, taken, cursors)
            if run_id is None:
                continue
            run = self.runs[run_id]
            cursor = cursors[run_id]
            step_id = cursor.take()
            pool = run.steps[step_id].pool
            if pool is not None:
                self._pool_taken[pool] = self._pool_taken.get(pool, 0) + 1
            decision.actions.append(Start(run_id, step_id, run.steps[step_id].attempts + 1))
            free -= 1
            taken[run_id] = taken.get(run_id, 0) + 1
            by_user[uid] = by_user.get(uid, 0) + 1
            driven = self._driven[run_id]
            driven.stamp = user.stamp = next(self._stamps)
            self._dirty[run_id] = None  # the next decision sees what came of the start
            self._enqueue(run_id, run, driven, user, taken[run_id], cursor)
            if self._pool_waiters:
                self._wake_user(uid)
            self._offer(user, by_user[uid])
        self._pool_taken = {}  # counted as running from the next decision on

    def _next_run(self, user: _User, taken: dict[str, int],
                  cursors: dict[str, _Cursor]) -> str | None:
        """Pop the user's least recently started run that can start a step now;
        entries that went stale or cannot start are discarded on the way (a run
        waiting for a pool is noted as its waiter)."""
        while user.queue:
            stamp, run_id = heapq.heappop(user.queue)
            if not self._live_entry(stamp, run_id):
                continue
            self._driven[run_id].queued = False
            run = self.runs[run_id]
            cursor = cursors.get(run_id)
            if cursor is None:
                cursor = cursors[run_id] = _Cursor(run, self._pool_room)
            if self._startable(run, taken.get(run_id, 0), cursor):
                return run_id
            if run.pool_ready:
                self._wait_for_pools(run_id, run)
        return None


def _housekeeping(run: RunState, now: float, add: Callable[[Action], None]) -> float | None:
    """Everything but starting attempts, for one run; returns when to look again."""
    wake: float | None = None
    if run.cancelling:
        _cancel(run, add)
    for step_id, (cause, reason) in run.skippable.items():
        fields = {"step": step_id, "cause": cause}
        if reason is not None:
            fields["reason"] = reason
        add(Emit(run.run_id, ev.StepSkipped, fields))
    for step_id in run.promotable:
        add(Emit(run.run_id, ev.StepReady, {"step": step_id}))
    # Cancelling: `_cancel` has recorded the waiting main steps CANCELLED; no retry is due.
    for step_id in run.retry_wait:
        if run.stops(run.steps[step_id]):
            continue
        at = run.steps[step_id].retry_at_epoch
        if at <= now:
            add(Emit(run.run_id, ev.RetryDue, {"step": step_id}))
        elif wake is None or at < wake:
            wake = at
    for step_id in run.running:
        rec = run.steps[step_id]
        if rec.deadline is None:
            continue
        if rec.deadline <= now:
            add(Kill(run.run_id, step_id, rec.attempts, "timeout"))
        elif wake is None or rec.deadline < wake:
            wake = rec.deadline
    limit = run.workflow.timeout
    if limit is not None and run.running_since is not None and run.cancellable() \
            and run.main_open():  # once every step has ended, RunFinished is due
        at = ev.parse_ts(run.running_since) + limit
        if at <= now:  # a hung run must not hold its schedule for ever
            reason = f"run timed out after {limit:g} s"
            add(Emit(run.run_id, ev.RunCancelRequested, {"reason": reason}))
        elif wake is None or at < wake:
            wake = at
    if run.all_terminal():
        add(Emit(run.run_id, ev.RunFinished, _finished_fields(run, now)))
    return wake


def _finished_fields(run: RunState, now: float) -> dict:
    """RunFinished's fields; a resumed or queued run's running time too (see the event:
    one cancelled while QUEUED never ran)."""
    fields: dict = {"state": run.outcome()}
    if run.resumed:
        since = run.running_since
        fields["ran"] = round(run.ran + (0.0 if since is None else
                                         max(0.0, now - ev.parse_ts(since))), 6)
    return fields


def admissions(runs: Iterable[RunState], waiting: Container[str]) -> list[str]:
    """One at a time: of the unfinished runs of one owner and queue key, the QUEUED ones
    to start now (RunDequeued), oldest first. The oldest run in `waiting` (the QUEUED runs
    the daemon keeps in line: not those a cancel is ending) starts while fewer than its
    `concurrency` of these runs are unfinished and not QUEUED; the next one waits behind
    it, so they start in submit order."""
    busy, queued = 0, []
    for run in runs:
        if run.state != QUEUED:
            busy += 1
        elif run.run_id in waiting and not run.cancelling:
            queued.append(run)
    started = []
    for run in sorted(queued, key=lambda r: r.run_id):  # ids grow with submit time
        if busy >= (run.concurrency or 1):
            break
        started.append(run.run_id)
        busy += 1
    return started


def _cancel(run: RunState, add: Callable[[Action], None]) -> None:
    """A cancel stops the main steps; on_exit steps (the last ones) run after it, unless
    the run was cancelled while QUEUED (it never started)."""
    queued = run.state == QUEUED
    if not run.main_open() and not queued:
        return
    for rec in itertools.islice(run.steps.values(), None if queued else run.mains):
        if rec.state in TERMINAL:
            continue
        if rec.state == RUNNING:
            add(Kill(run.run_id, rec.id, rec.attempts, "cancel"))
        else:
            add(Emit(run.run_id, ev.StepCancelled, {"step": rec.id}))


# ---- the end of an attempt ------------------------------------------------------


def exit_code_of(status: int) -> int:
    """A wait status as SPEC reports it: the exit status, or -N for signal N."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


def outcome(
    run: RunState,
    step_id: str,
    attempt: int,
    exit_code: int | None,
    *,
    now: float,
    rand: float,
    timed_out: bool = False,
    start_error: str | None = None,
    interrupted: str | None = None,
    outputs: dict[str, str] | None = None,
    output_error: str | None = None,
) -> Emit:
    """The event that records how attempt `attempt` of `step_id` ended.

    `exit_code` is the leader's (None if it never ran); `interrupted` names a daemon
    stop or crash, which does not use up a retry; `rand` in [0, 1) scales jitter.
    `outputs` go with a success; `output_error` (its $WFD_OUTPUT was refused) makes an
    exit 0 a failure with that error."""
    run_id = run.run_id
    base = {"step": step_id, "attempt": attempt}
    cancelled = run.stops(run.steps[step_id])  # an on_exit step runs on after a cancel
    if interrupted is not None and not cancelled:
        return Emit(run_id, ev.AttemptInterrupted, {**base, "reason": interrupted})
    if cancelled:
        return Emit(run_id, ev.StepCancelled, {**base, "exit_code": exit_code})
    if exit_code == 0 and not timed_out and start_error is None and output_error is None:
        return Emit(run_id, ev.AttemptSucceeded, {**base, "outputs": outputs} if outputs else base)
    step = run.workflow.steps[run.steps[step_id].index]
    if start_error is not None:
        error = f"cannot start: {start_error}"
    elif output_error is not None and exit_code == 0 and not timed_out:
        error = output_error
    elif timed_out:
        error = f"timed out after {step.timeout:g} s"
    else:
        error = describe_exit(exit_code if exit_code is not None else -signal.SIGKILL)
    failed = {**base, "exit_code": exit_code, "error": error}
    failures = run.steps[step_id].failures + 1
    if failures > step.retries:
        return Emit(run_id, ev.StepFailed, failed)
    retry_at = now + step.backoff.delay(failures, rand)
    return Emit(run_id, ev.AttemptFailed, {**failed, "retry_at": format_ts(retry_at)})
