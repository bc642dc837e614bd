"""A run's state is the fold of its events; this module is that fold.

Theory of operation
-------------------
Every step moves through one table, `TRANSITIONS`: for a (step state, event
type) pair it names the next state, and nothing else decides a step's state.
A pair missing from the table is an illegal transition: `apply` raises
`IllegalTransition` naming event, state and step *before* it changes anything,
so a state that saw a bad event is still the state before it. `RunResumed` and
`StepsRetried` are the run-wide step events; their per-step mappings are `RESUME`
and `RETRY`.

Next to the states, a run keeps small indexes that are equally a function of
the events (which steps are READY and in what order, which are RUNNING, which
wait for a retry, which PENDING steps have their `run_if` met and need a
`StepReady`, which can no longer meet it and need a `StepSkipped`).
They let the scheduler decide in time proportional to what changed rather than
to the size of the workflow, and they are rebuilt by the same fold on recovery.

When a step PENDING waits on `run_if` (issue 15)
------------------------------------------------
A dependency is *settled* once its outcome is known: SUCCEEDED, FAILED, or
SKIPPED, a dependency marked skippable counting as settled already (so a
failure skips a whole chain below it in one decision, as before `run_if`). A
settled dependency that is FAILED, or SKIPPED because of a failure, is
*failing*. Each PENDING step counts its dependencies not SUCCEEDED (`waiting`),
not settled (`open`) and failing (`failing`); its rule is then decided:

- `succeeded`: READY when `waiting` is 0; SKIPPED as soon as one dependency is
  failing (a failure skip, `cause` the FAILED step upstream); SKIPPED once all
  are settled and one was skipped for another reason (not a failure skip).
- `done`: READY once `open` is 0; never SKIPPED.
- `failed`: once `open` is 0, READY if `failing` is not 0, else SKIPPED ("no
  dependency failed"; not a failure skip).

Whether a skip is a failure skip is thus a function of the final states of its
dependencies, whatever the order they settled in. The run's outcome is FAILED
iff a step FAILED; SKIPPED steps never decide.

on_exit steps (issue 15)
------------------------
A workflow's `on_exit` steps come last in `workflow.steps` (the first
`run.mains` are its steps proper). They have no dependencies: they wait PENDING
until every main step is terminal, which fixes the run's outcome; then each
whose `when` holds that outcome is promotable, the others skippable. A cancel
(`RunCancelRequested`, legal only while a main step is unfinished) stops main
steps only, so on_exit steps run after a cancel too. Their own states never
change the outcome; `RunFinished` waits for them.

`apply` mutates in place (recovery folds a million events; copying would cost
more than the rest of it) but is deterministic: the same events give the same
state, which `fold` builds fresh.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import msgspec

from wfd import events as ev
from wfd.errors import IllegalTransition
from wfd.text import printable

if TYPE_CHECKING:
    from wfd.workflow import Workflow

PENDING = "PENDING"
READY = "READY"
RUNNING = "RUNNING"
RETRY_WAIT = "RETRY_WAIT"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
SKIPPED = "SKIPPED"
CANCELLED = "CANCELLED"
CORRUPT = "CORRUPT"  # run state only
QUEUED = "QUEUED"  # run state only: waiting for a slot of its workflow's `concurrency`

TERMINAL = frozenset({SUCCEEDED, FAILED, SKIPPED, CANCELLED})

# A step's `run_if` (issue 15): when it may run, given its dependencies' outcomes.
RUN_IF_SUCCEEDED = "succeeded"
RUN_IF_DONE = "done"
RUN_IF_FAILED = "failed"
RUN_TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
RUN_STATES = RUN_TERMINAL | {RUNNING, QUEUED, CORRUPT}  # every state a run can be in

TRANSITIONS: dict[tuple[str, type[ev.Event]], str] = {
    (PENDING, ev.StepReady): READY,
    (PENDING, ev.StepSkipped): SKIPPED,
    (READY, ev.AttemptClaimed): RUNNING,
    (RUNNING, ev.AttemptStarted): RUNNING,
    (RUNNING, ev.AttemptSubmitting): RUNNING,
    (RUNNING, ev.AttemptSubmitted): RUNNING,
    (RUNNING, ev.AttemptSucceeded): SUCCEEDED,
    (RUNNING, ev.AttemptFailed): RETRY_WAIT,
    (RUNNING, ev.StepFailed): FAILED,
    (RUNNING, ev.AttemptInterrupted): READY,
    (RETRY_WAIT, ev.RetryDue): READY,
    (PENDING, ev.StepCancelled): CANCELLED,
    (READY, ev.StepCancelled): CANCELLED,
    (RUNNING, ev.StepCancelled): CANCELLED,
    (RETRY_WAIT, ev.StepCancelled): CANCELLED,
}

# The run-wide events that change or keep a run's state: (run state, event type) -> the
# run's next state; FINISHED stands for the state RunFinished names (its steps'
# outcome). A pair missing here is illegal. A run starts RUNNING, or QUEUED when its
# RunCreated says `queued`; a QUEUED run's steps stay PENDING (only a cancel may touch
# them) until RunDequeued.
FINISHED = "FINISHED"
RUN_TRANSITIONS: dict[tuple[str, type[ev.Event]], str] = {
    (QUEUED, ev.RunDequeued): RUNNING,
    (QUEUED, ev.RunCancelRequested): QUEUED,
    (QUEUED, ev.RunFinished): FINISHED,  # cancelled while queued: CANCELLED
    (RUNNING, ev.RunCancelRequested): RUNNING,
    (RUNNING, ev.RunFinished): FINISHED,
    (FAILED, ev.RunResumed): RUNNING,
    (CANCELLED, ev.RunResumed): RUNNING,
}
_RUN_TABLE_EVENTS = frozenset(kind for _, kind in RUN_TRANSITIONS)

# RunResumed: what each step state becomes; a state missing here refuses the resume.
RESUME: dict[str, str] = {
    SUCCEEDED: SUCCEEDED,
    FAILED: PENDING,
    SKIPPED: PENDING,
    CANCELLED: PENDING,
}


# StepsRetried: what each step it names becomes; a state missing here refuses the retry.
# (SPEC's "a SUCCEEDED step is never rerun" is about recovery and resume: a retry reruns
# a SUCCEEDED step because the user named it, or one upstream of it with --downstream.)
RETRY: dict[str, str] = {
    SUCCEEDED: PENDING,
    FAILED: PENDING,
    SKIPPED: PENDING,
    CANCELLED: PENDING,
}


class StepStatus(msgspec.Struct):
    """One step in `status --json` (SPEC 5)."""

    state: str
    attempts: int
    exit_code: int | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    # The step's `depends_on`, so that other tools can draw the DAG (issue 16).
    depends_on: list[str] = []
    # CPU seconds (user + system) of all its attempts, and the largest peak RSS (KiB).
    cpu: float | None = None
    max_rss: int | None = None
    # How its last attempt's processes were known and killed: "cgroup" (a cgroup of its
    # own) or "session" (session and marks); null if none ran under a keeper.
    containment: str | None = None
    # Where its last attempt went when not local ("slurm"), and its job id there.
    executor: str | None = None
    job_id: str | None = None
    # What its successful attempt wrote to $WFD_OUTPUT (wfd/outputs.py).
    outputs: dict[str, str] = {}
    # The name of the signal that ended the last attempt (exit_code -N), e.g. "SIGTERM"
    # (issue 14); last, so that a StepStatus built by position keeps its meaning.
    exit_signal: str | None = None
    # The daemon's shared limit it counts against (`pool`), and while it is READY
    # only because that pool is full, what it waits for: "pool db".
    pool: str | None = None
    waiting: str | None = None
    description: str = ""  # the step's `description` (issue 14)


class RunStatus(msgspec.Struct):
    """One run in `status RUN_ID --json` (SPEC 5); `steps` in file order."""

    run_id: str
    name: str
    owner: str
    state: str
    created_at: str | None
    finished_at: str | None
    error: str | None
    steps: dict[str, StepStatus]
    schedule: str | None = None  # the schedule that fired this run, if one did
    scheduled_at: str | None = None  # its slot, UTC RFC 3339
    vars: dict[str, str] = {}  # KEY=VALUE given to `wfctl run` or the schedule
    # Running time (issue 14): `run_seconds` the seconds spent RUNNING before
    # `running_since` (all of them once finished; null: not known); `running_since` when
    # the current span began (created or resumed), null when finished. A duration is
    # run_seconds plus now - running_since, unless no daemon drives the run.
    run_seconds: float | None = None
    running_since: str | None = None
    # Unfinished, and no daemon drives it (started with --no-resume): it waits for
    # `wfctl resume`/`resume-all`. Set by the daemon, not by the fold.
    waiting_for_resume: bool = False
    description: str = ""  # the workflow's `description` (issue 14)
    # The on_exit steps (issue 15), in file order, apart from `steps`: they run once the
    # run has ended and never change its state. Always sent whole (they are few).
    on_exit: dict[str, StepStatus] = {}


class RunSummary(msgspec.Struct):
    """One run in `status --json` without a run id."""

    run_id: str
    name: str
    owner: str
    state: str
    created_at: str | None
    finished_at: str | None
    schedule: str | None = None
    scheduled_at: str | None = None
    run_seconds: float | None = None  # as in RunStatus
    running_since: str | None = None
    waiting_for_resume: bool = False


_NO_OUTPUTS: dict[str, str] = {}  # shared, never changed: most steps write none


class StepRec:
    """Mutable record of one step inside a `RunState`."""

    __slots__ = (
        "id", "index", "state", "attempts", "failures", "exit_code", "started_at",
        "finished_at", "error", "retry_at", "pid", "start_time", "boot_id", "waiting",
        "attempt_ts", "retry_at_epoch", "deadline", "cpu", "max_rss", "containment",
        "executor", "token", "job_id", "intent_ts", "pool",
        "outputs",
        "open", "failing", "origin", "settled",
    )

    def __init__(self, step_id: str, index: int, waiting: int, pool: str | None = None) -> None:
        self.id = step_id
        self.index = index
        self.pool = pool  # the daemon's shared limit its attempts count against
        self.state = PENDING
        self.attempts = 0  # attempt numbers taken so far, never reused
        self.failures = 0  # failed attempts since the run (re)started: the retry budget used
        self.exit_code: int | None = None
        self.started_at: str | None = None
        self.finished_at: str | None = None
        self.error: str | None = None
        self.retry_at: str | None = None
        self.pid: int | None = None
        self.start_time: float | None = None
        self.boot_id: str | None = None
        self.waiting = waiting  # dependencies not yet SUCCEEDED
        self.attempt_ts: str | None = None  # when the current attempt was claimed
        self.retry_at_epoch = 0.0  # retry_at as epoch seconds, for the scheduler
        self.deadline: float | None = None  # when the running attempt times out
        self.cpu: float | None = None  # CPU seconds of its attempts, where recorded
        self.max_rss: int | None = None  # KiB
        self.containment: str | None = None  # how its last attempt's processes are known
        self.executor: str | None = None  # its current attempt's batch system, if any
        self.token: str | None = None  # the name of that attempt's job: wfd-<token>
        self.job_id: str | None = None  # that job's id, once accepted
        self.intent_ts: str | None = None  # when its submission was intended (AttemptSubmitting)
        self.outputs: dict[str, str] = _NO_OUTPUTS  # from its AttemptSucceeded
        self.open = waiting  # dependencies not settled yet (module docstring)
        self.failing = 0  # dependencies FAILED or SKIPPED because of a failure
        self.origin: str | None = None  # the FAILED step behind its first failing dependency
        self.settled = False  # its outcome is known to its dependents


class RunState:
    """Everything known about one run; only `apply` changes it."""

    __slots__ = (
        "workflow", "run_id", "name", "owner", "owner_uid", "format", "state", "created_at",
        "finished_at", "error", "cancelling", "last_seq", "steps", "ready", "running",
        "retry_wait", "promotable", "skippable", "counts", "vars", "schedule", "slot", "key",
        "pool_ready", "pool_running",
        "producers", "producers_seq", "ran", "running_since", "resumed", "queue_key",
        "concurrency",
        "producers", "producers_seq", "ran", "running_since", "resumed",
        "mains", "exit_counts",
    )

    def __init__(self, workflow: Workflow) -> None:
        self.workflow = workflow
        self.run_id = ""
        self.name = workflow.name
        self.owner = ""
        self.owner_uid = -1
        self.format = 0
        self.state = RUNNING
        self.created_at: str | None = None
        self.finished_at: str | None = None
        self.error: str | None = None
        self.cancelling = False
        self.last_seq = 0
        self.vars: dict[str, str] = {}
        self.key: str | None = None
        self.schedule: str | None = None
        self.slot: float | None = None
        self.ran = 0.0  # seconds RUNNING before running_since (all of them once finished)
        self.running_since: str | None = None  # start of the current RUNNING span
        self.resumed = False  # resumed or dequeued: RunFinished carries `ran`
        self.queue_key = workflow.name  # runs of one owner and key share a `concurrency`
        self.concurrency: int | None = None  # the limit it was submitted under
        self.steps: dict[str, StepRec] = {
            step.id: StepRec(step.id, i, len(workflow.deps[i]), step.pool)
            for i, step in enumerate(workflow.steps)
        }
        # Per pool its steps use: how many are READY and RUNNING (empty without pools),
        # so that the scheduler weighs pools per run, not per step.
        pools = {rec.pool: 0 for rec in self.steps.values() if rec.pool is not None}
        self.pool_ready: dict[str, int] = dict(pools)
        self.pool_running: dict[str, int] = pools
        # Insertion-ordered sets (dicts): order is the order steps entered them.
        self.ready: dict[str, None] = {}
        self.running: dict[str, None] = {}
        self.retry_wait: dict[str, None] = {}
        self.promotable: dict[str, None] = {}
        self.skippable: dict[str, tuple[str, str | None]] = {}  # step -> (cause, reason)
        self.counts: dict[str, int] = dict.fromkeys(
            (PENDING, READY, RUNNING, RETRY_WAIT, *TERMINAL), 0
        )
        self.counts[PENDING] = len(self.steps)
        # The steps proper come first; the on_exit steps after them, counted apart.
        self.mains = len(self.steps) - workflow.exits
        self.exit_counts: dict[str, int] = dict.fromkeys(self.counts, 0)
        self.exit_counts[PENDING] = workflow.exits
        # Steps whose outputs are recorded, and the seq of the event that last changed
        # which ones are: what a step inherits is computed again only after that changes.
        self.producers: dict[str, None] = {}
        self.producers_seq = 0

    @property
    def finished(self) -> bool:
        return self.state in RUN_TERMINAL or self.state == CORRUPT

    def all_terminal(self) -> bool:
        return sum(self.counts[s] for s in TERMINAL) == len(self.steps)

    def main_open(self) -> int:
        """Main steps (not on_exit) not terminal yet."""
        done = sum(self.counts[s] - self.exit_counts[s] for s in TERMINAL)
        return self.mains - done

    def cancellable(self) -> bool:
        """A cancel may be recorded: the run is not finished nor cancelled yet, and if it
        has on_exit steps, its outcome is not fixed yet (a main step is unfinished): they
        may have seen it. (Without on_exit steps, a cancel between the last step's end and
        RunFinished makes the run CANCELLED, as it always did: old logs hold such ones.)"""
        if self.finished or self.cancelling:
            return False
        return not self.workflow.exits or self.main_open() > 0

    def stops(self, rec: StepRec) -> bool:
        """A cancel stops this step: it is cancelling and `rec` is not an on_exit step, or
        the run never started (cancelled while QUEUED: its on_exit steps do not run)."""
        return self.cancelling and (rec.index < self.mains or self.state == QUEUED)

    def outcome(self) -> str:
        """The run state its main steps call for once all are terminal (on_exit steps
        never decide it)."""
        if self.cancelling or self.counts[CANCELLED] - self.exit_counts[CANCELLED]:
            return CANCELLED
        if self.counts[FAILED] - self.exit_counts[FAILED]:  # SKIPPED never decide (issue 15)
            return FAILED
        return SUCCEEDED

    def failed_steps(self) -> list[str]:
        """The main steps that FAILED, in file order (WFD_FAILED_STEPS of on_exit steps)."""
        return [rec.id for rec in self.steps.values()
                if rec.state == FAILED and rec.index < self.mains]


# ---- apply ------------------------------------------------------------------


def _illegal(run: RunState, event: ev.Event, why: str) -> IllegalTransition:
    return IllegalTransition(
        f"illegal transition in run {run.run_id or '?'}: event {type(event).__name__} "
        f"(seq {event.seq}) {why}"
    )


def _step(run: RunState, event: ev.Event) -> StepRec:
    step_id = event.step  # type: ignore[attr-defined]
    rec = run.steps.get(step_id)
    if rec is None:
        raise _illegal(run, event, f"names unknown step {step_id!r}")
    return rec


def _check_attempt(run: RunState, rec: StepRec, event: ev.Event, expected: int) -> None:
    attempt = event.attempt  # type: ignore[attr-defined]
    if attempt != expected:
        raise _illegal(
            run, event, f"for step {rec.id!r} names attempt {attempt}, expected {expected}"
        )


def _move(run: RunState, rec: StepRec, new: str) -> None:
    """Change a step's state and keep the indexes in step with it."""
    old = rec.state
    run.counts[old] -= 1
    run.counts[new] += 1
    if rec.index >= run.mains:
        run.exit_counts[old] -= 1
        run.exit_counts[new] += 1
    rec.state = new
    for index, member in ((run.ready, READY), (run.running, RUNNING),
                          (run.retry_wait, RETRY_WAIT)):
        if old == member:
            index.pop(rec.id, None)
        if new == member:
            index[rec.id] = None
    if old == PENDING:
        run.promotable.pop(rec.id, None)
        run.skippable.pop(rec.id, None)
    pool = rec.pool
    if pool is not None:
        for counts, member in ((run.pool_ready, READY), (run.pool_running, RUNNING)):
            counts[pool] += (new == member) - (old == member)


def _settle(run: RunState, rec: StepRec, failure: bool, origin: str | None) -> None:
    """`rec`'s outcome is known: its dependents count it, and those whose `run_if` is
    now decided become promotable or skippable; a skippable one settles in turn
    (iteratively: chains are long)."""
    wf = run.workflow
    stack = [(rec, failure, origin)]
    while stack:
        rec, failure, origin = stack.pop()
        rec.settled = True
        succeeded = rec.state == SUCCEEDED
        for j in wf.dependents[rec.index]:
            dep = run.steps[wf.steps[j].id]
            dep.open -= 1
            if succeeded:
                dep.waiting -= 1
            if failure:
                dep.failing += 1
                if dep.origin is None:
                    dep.origin = origin
            if dep.state != PENDING or run.cancelling or dep.settled:
                continue
            skip = _judge(run, dep)
            if skip is not None:
                run.skippable[dep.id] = skip
                stack.append((dep, skip[1] is None, dep.origin))


def _judge(run: RunState, rec: StepRec) -> tuple[str, str | None] | None:
    """Decide a PENDING step's `run_if` if its dependencies allow: mark it promotable,
    or return (cause, reason) to skip it (reason None: because of a failure)."""
    step = run.workflow.steps[rec.index]
    rule = step.run_if
    if rule == RUN_IF_SUCCEEDED:
        if rec.waiting == 0:
            run.promotable[rec.id] = None
        elif rec.failing:
            return (rec.origin or "?", None)
        elif rec.open == 0:
            skipped = next(d for d in step.depends_on if run.steps[d].state != SUCCEEDED)
            return (skipped, f"dependency {skipped!r} was skipped")
    elif rec.open == 0:
        if rule == RUN_IF_DONE or rec.failing:
            run.promotable[rec.id] = None
        else:
            return (step.depends_on[0], "no dependency failed")
    return None


def _rule_met(run: RunState, rec: StepRec) -> bool:
    """Whether a step's `run_if` (an on_exit step: its `when`) lets it become READY now."""
    if rec.index >= run.mains:
        return _exit_due(run, rec)
    rule = run.workflow.steps[rec.index].run_if
    if rule == RUN_IF_SUCCEEDED:
        return rec.waiting == 0
    return rec.open == 0 and (rule == RUN_IF_DONE or rec.failing > 0)


def _exit_due(run: RunState, rec: StepRec) -> bool:
    when = run.workflow.steps[rec.index].when or ()
    return run.main_open() == 0 and run.outcome() in when


def _open_exit_phase(run: RunState) -> None:
    """Every main step is terminal: each on_exit step whose `when` holds the outcome is
    promotable, the others skippable."""
    outcome = run.outcome()
    for rec in list(run.steps.values())[run.mains:]:
        if rec.state != PENDING:
            continue
        if _exit_due(run, rec):
            run.promotable[rec.id] = None
        else:
            when = ", ".join(run.workflow.steps[rec.index].when or ())
            run.skippable[rec.id] = ("", f"the run is {outcome}; on_exit when {when}")


def _judge_roots(run: RunState) -> None:
    """Judge every PENDING step whose dependencies are all settled (a new or resumed run)."""
    for rec in list(run.steps.values())[:run.mains]:
        if rec.state == PENDING and rec.open == 0 and not rec.settled:
            skip = _judge(run, rec)
            if skip is not None:
                run.skippable[rec.id] = skip
                _settle(run, rec, skip[1] is None, rec.origin)


def _step_event(run: RunState, event: ev.Event) -> None:
    rec = _step(run, event)
    new = TRANSITIONS.get((rec.state, type(event)))
    if new is None:
        raise _illegal(run, event, f"cannot apply to step {rec.id!r} in state {rec.state}")
    if run.finished:
        raise _illegal(run, event, f"after the run finished ({run.state})")
    kind = type(event)
    if run.state == QUEUED and kind is not ev.StepCancelled:
        raise _illegal(run, event, "while the run is QUEUED")
    if kind is ev.AttemptClaimed:
        if run.stops(rec):
            raise _illegal(run, event, "after the run was cancelled")
        _check_attempt(run, rec, event, rec.attempts + 1)
    elif kind in _ATTEMPT_EVENTS:
        _check_attempt(run, rec, event, rec.attempts)
    elif kind is ev.StepCancelled and event.attempt is not None:  # type: ignore[attr-defined]
        _check_attempt(run, rec, event, rec.attempts)
    elif kind is ev.StepReady and not _rule_met(run, rec):
        rule = run.workflow.steps[rec.index].run_if
        why = ("with dependencies not SUCCEEDED" if rule == RUN_IF_SUCCEEDED
               else f"whose run_if {rule!r} is not met")
        if rec.index >= run.mains:
            why = "(an on_exit step) whose when does not hold, or before the steps ended"
        raise _illegal(run, event, f"for step {rec.id!r} {why}")
    _STEP_EFFECTS[kind](run, rec, event)
    if isinstance(event, ev.AttemptEnd) and event.cpu is not None:
        rec.cpu = (rec.cpu or 0.0) + event.cpu
        rec.max_rss = max(rec.max_rss or 0, event.max_rss or 0)
    _move(run, rec, new)
    if new in TERMINAL:
        rec.finished_at = event.ts
        if new != CANCELLED and not rec.settled:
            failure = new == FAILED or (kind is ev.StepSkipped and event.reason is None)  # type: ignore[attr-defined]
            _settle(run, rec, failure, rec.id if new == FAILED else rec.origin)
        if rec.index < run.mains and run.workflow.exits and run.main_open() == 0 \
                and run.state != QUEUED:
            _open_exit_phase(run)


_ATTEMPT_EVENTS = frozenset({
    ev.AttemptStarted, ev.AttemptSucceeded, ev.AttemptFailed, ev.StepFailed,
    ev.AttemptInterrupted, ev.AttemptSubmitting, ev.AttemptSubmitted,
})


def _eff_ready(run: RunState, rec: StepRec, event: ev.StepReady) -> None:
    pass


def _eff_claimed(run: RunState, rec: StepRec, event: ev.AttemptClaimed) -> None:
    rec.attempts = event.attempt
    rec.attempt_ts = event.ts
    rec.pid = rec.start_time = rec.boot_id = rec.deadline = None
    rec.retry_at = None
    rec.executor = rec.token = rec.job_id = rec.intent_ts = None
    if rec.started_at is None:
        rec.started_at = event.ts


def _eff_started(run: RunState, rec: StepRec, event: ev.AttemptStarted) -> None:
    timeout = run.workflow.steps[rec.index].timeout
    rec.deadline = None if timeout is None else ev.parse_ts(event.ts) + timeout
    rec.pid = event.pid
    rec.start_time = event.start_time
    rec.boot_id = event.boot_id
    if event.containment is not None:
        rec.containment = event.containment


def _eff_submitting(run: RunState, rec: StepRec, event: ev.AttemptSubmitting) -> None:
    rec.executor = event.executor
    rec.token = event.token
    rec.intent_ts = event.ts


def _eff_submitted(run: RunState, rec: StepRec, event: ev.AttemptSubmitted) -> None:
    rec.job_id = event.job_id


def _eff_succeeded(run: RunState, rec: StepRec, event: ev.AttemptSucceeded) -> None:
    rec.exit_code = 0
    rec.error = None
    if event.outputs:
        rec.outputs = event.outputs
        run.producers[rec.id] = None
        run.producers_seq = event.seq


def _eff_attempt_failed(run: RunState, rec: StepRec, event: ev.AttemptFailed) -> None:
    rec.failures += 1
    rec.exit_code = event.exit_code
    rec.error = event.error
    rec.retry_at = event.retry_at
    rec.retry_at_epoch = ev.parse_ts(event.retry_at)


def _eff_step_failed(run: RunState, rec: StepRec, event: ev.StepFailed) -> None:
    rec.failures += 1
    rec.exit_code = event.exit_code
    rec.error = event.error


def _eff_interrupted(run: RunState, rec: StepRec, event: ev.AttemptInterrupted) -> None:
    rec.pid = rec.start_time = rec.boot_id = rec.deadline = None


def _eff_retry_due(run: RunState, rec: StepRec, event: ev.RetryDue) -> None:
    rec.retry_at = None


def _eff_skipped(run: RunState, rec: StepRec, event: ev.StepSkipped) -> None:
    if event.reason is None:
        rec.error = f"skipped: upstream step {event.cause!r} failed"
        rec.origin = event.cause
    else:
        rec.error = f"skipped: {event.reason}"


def _eff_cancelled(run: RunState, rec: StepRec, event: ev.StepCancelled) -> None:
    if event.attempt is not None:
        rec.exit_code = event.exit_code
    rec.error = "cancelled"
    rec.retry_at = None


_STEP_EFFECTS: dict[type[ev.Event], Callable] = {
    ev.StepReady: _eff_ready,
    ev.AttemptClaimed: _eff_claimed,
    ev.AttemptStarted: _eff_started,
    ev.AttemptSubmitting: _eff_submitting,
    ev.AttemptSubmitted: _eff_submitted,
    ev.AttemptSucceeded: _eff_succeeded,
    ev.AttemptFailed: _eff_attempt_failed,
    ev.StepFailed: _eff_step_failed,
    ev.AttemptInterrupted: _eff_interrupted,
    ev.RetryDue: _eff_retry_due,
    ev.StepSkipped: _eff_skipped,
    ev.StepCancelled: _eff_cancelled,
}


def _run_created(run: RunState, event: ev.RunCreated) -> None:
    if run.last_seq != 0:
        raise _illegal(run, event, "after the first event")
    run.run_id = event.run_id
    run.name = event.name
    run.owner = event.owner
    run.owner_uid = event.owner_uid
    run.format = event.format
    run.created_at = event.ts
    run.vars = event.vars
    run.schedule = event.schedule
    run.slot = event.slot
    run.key = event.key
    run.queue_key = event.queue if event.queue is not None else event.name
    run.concurrency = event.concurrency
    if event.queued:  # its steps wait for RunDequeued; its running time starts then
        run.state = QUEUED
        run.resumed = True
        return
    run.running_since = event.ts
    _judge_roots(run)


def _run_dequeued(run: RunState, event: ev.RunDequeued) -> None:
    if run.cancelling:
        raise _illegal(run, event, "after the run was cancelled")
    run.state = RUNNING
    run.running_since = event.ts
    _judge_roots(run)


def _run_cancel(run: RunState, event: ev.RunCancelRequested) -> None:
    if not run.cancellable():
        why = f"in run state {run.state}" if run.finished or run.cancelling else \
            "with every main step ended"
        raise _illegal(run, event, why)
    run.cancelling = True
    run.promotable.clear()
    run.skippable.clear()
    if event.reason is not None:
        run.error = event.reason


def _run_finished(run: RunState, event: ev.RunFinished) -> None:
    if run.finished or not run.all_terminal() or event.state != run.outcome():
        raise _illegal(
            run, event,
            f"with state {event.state} while the run is {run.state} and its steps call for "
            f"{run.outcome() if run.all_terminal() else 'more work'}",
        )
    run.state = event.state
    run.finished_at = event.ts
    if event.ran is not None:
        run.ran = event.ran
    elif run.running_since is not None:
        run.ran += max(0.0, ev.parse_ts(event.ts) - ev.parse_ts(run.running_since))
    run.running_since = None


def _run_resumed(run: RunState, event: ev.RunResumed) -> None:
    if run.state not in (FAILED, CANCELLED):
        raise _illegal(run, event, f"in run state {run.state}")
    for rec in run.steps.values():
        if rec.state not in RESUME:
            raise _illegal(run, event, f"with step {rec.id!r} in state {rec.state}")
    wf = run.workflow
    for rec in run.steps.values():
        # A step with another run_if (cleanup, alert) runs again, also when it SUCCEEDED,
        # and so does an on_exit step: the resumed run ends again.
        if (rec.state == SUCCEEDED and wf.steps[rec.index].run_if == RUN_IF_SUCCEEDED
                and rec.index < run.mains):
            continue
        _move(run, rec, PENDING)
        _forget_outputs(run, rec, event.seq)
        rec.failures = 0
        rec.error = None
        rec.started_at = rec.finished_at = None
    for rec in run.steps.values():
        rec.settled = rec.state == SUCCEEDED
        rec.waiting = rec.open = sum(
            run.steps[wf.steps[d].id].state != SUCCEEDED for d in wf.deps[rec.index]
        )
        rec.failing = 0
        rec.origin = None
    run.state = RUNNING
    run.cancelling = False
    run.finished_at = None
    run.error = None  # a run timeout's reason belongs to the run before the resume
    run.running_since = event.ts
    run.resumed = True
    _judge_roots(run)
    if run.workflow.exits and run.main_open() == 0:  # cannot happen today; be sure
        _open_exit_phase(run)


def retry_problem(run: RunState, steps: Iterable[str]) -> str | None:
    """Why `steps` cannot run again in `run` now, or None: the run must be finished (not
    CORRUPT), each step known and in a RETRY state, and each dependency of a step SUCCEEDED
    or among `steps` (a step after a FAILED or CANCELLED one that stays so could never
    start)."""
    if run.state not in RUN_TERMINAL:
        return f"run {run.run_id} is {run.state}; only a finished run's steps can be retried"
    chosen = set(steps)
    if not chosen:
        return "no step named"
    wf = run.workflow
    for step_id in sorted(chosen):
        rec = run.steps.get(step_id)
        if rec is None:
            return f"run {run.run_id} has no step {step_id!r}"
        if rec.state not in RETRY:
            return f"step {step_id!r} is {rec.state}"
        for d in wf.deps[rec.index]:
            dep = run.steps[wf.steps[d].id]
            if dep.id not in chosen and dep.state != SUCCEEDED:
                return (f"step {step_id!r} depends on {dep.id!r}, which is {dep.state}: "
                        f"retry {dep.id!r} too (or resume the run)")
    return None


def downstream(run: RunState, steps: Iterable[str]) -> list[str]:
    """`steps` and every step after them, in file order."""
    wf = run.workflow
    stack = [run.steps[s].index for s in steps if s in run.steps]
    seen: set[int] = set()
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(wf.dependents[i])
    return [wf.steps[i].id for i in sorted(seen)]


def _steps_retried(run: RunState, event: ev.StepsRetried) -> None:
    problem = retry_problem(run, event.steps)
    if problem is not None:
        raise _illegal(run, event, problem)
    wf = run.workflow
    chosen = [run.steps[s] for s in dict.fromkeys(event.steps)]
    for rec in chosen:
        _move(run, rec, RETRY[rec.state])
        _forget_outputs(run, rec, event.seq)
        rec.failures = 0
        rec.exit_code = rec.error = None
        rec.started_at = rec.finished_at = None
    # Each dependency of a retried step is SUCCEEDED or retried (retry_problem), so it
    # waits only for the retried ones; the steps left as they were are terminal, and a
    # resume or retry counts theirs afresh.
    retried = {rec.index for rec in chosen}
    for rec in chosen:
        rec.waiting = rec.open = sum(d in retried for d in wf.deps[rec.index])
        rec.failing = 0
        rec.origin = None
        rec.settled = False
    run.state = RUNNING
    run.cancelling = False
    run.finished_at = None
    run.error = None  # a run timeout's reason belongs to the run before the retry
    run.running_since = event.ts
    run.resumed = True
    _judge_roots(run)


def _forget_outputs(run: RunState, rec: StepRec, seq: int) -> None:
    """A step that runs again has no outputs until it succeeds again."""
    if rec.outputs:
        rec.outputs = _NO_OUTPUTS
        del run.producers[rec.id]
        run.producers_seq = seq


_RUN_EFFECTS: dict[type[ev.Event], Callable] = {
    ev.RunCreated: _run_created,
    ev.RunCancelRequested: _run_cancel,
    ev.RunFinished: _run_finished,
    ev.RunResumed: _run_resumed,
    ev.StepsRetried: _steps_retried,
    ev.RunDequeued: _run_dequeued,
}


def apply(run: RunState, event: ev.Event) -> None:
    """Apply one event, or raise IllegalTransition leaving `run` unchanged."""
    if event.seq != run.last_seq + 1:
        raise _illegal(run, event, f"out of sequence: expected seq {run.last_seq + 1}")
    if run.last_seq == 0 and type(event) is not ev.RunCreated:
        raise _illegal(run, event, "before RunCreated")
    kind = type(event)
    if kind in _RUN_TABLE_EVENTS and (run.state, kind) not in RUN_TRANSITIONS:
        raise _illegal(run, event, f"with state {event.state} while the run is {run.state}"
                       if kind is ev.RunFinished else f"in run state {run.state}")
    effect = _RUN_EFFECTS.get(kind)
    if effect is not None:
        effect(run, event)
    else:
        _step_event(run, event)
    run.last_seq = event.seq


def fold(workflow: Workflow, events: Iterable[ev.Event]) -> RunState:
    """The state a run's events describe, built fresh."""
    run = RunState(workflow)
    for event in events:
        apply(run, event)
    return run


# ---- views ------------------------------------------------------------------


# Whether a pool is full now (the daemon's scheduler knows; a replay has no daemon).
PoolFull = Callable[[str], bool]


def step_status(rec: StepRec, depends_on: list[str] | None = None,
                pool_full: PoolFull | None = None, description: str = "") -> StepStatus:
    waiting = None
    if rec.pool is not None and rec.state == READY and pool_full is not None \
            and pool_full(rec.pool):
        waiting = f"pool {rec.pool}"
    return StepStatus(
        state=rec.state, attempts=rec.attempts, exit_code=rec.exit_code,
        started_at=rec.started_at, finished_at=rec.finished_at, error=rec.error,
        exit_signal=signal_name(rec.exit_code),
        depends_on=depends_on or [], cpu=rec.cpu, max_rss=rec.max_rss,
        containment=rec.containment, executor=rec.executor, job_id=rec.job_id,
        outputs=rec.outputs,
        pool=rec.pool, waiting=waiting, description=description,
    )


def run_status(run: RunState, steps: bool = True, pool_full: PoolFull | None = None,
               ) -> RunStatus:
    """The `status RUN_ID --json` object of a run; without `steps`, its run fields only
    (a 100,000-step run's steps are sent a part at a time, from `step_statuses`)."""
    return RunStatus(
        run_id=run.run_id, name=run.name, owner=run.owner, state=run.state,
        created_at=run.created_at, finished_at=run.finished_at, error=run.error,
        steps=dict(step_statuses(run, pool_full)) if steps else {},
        schedule=run.schedule, scheduled_at=slot_ts(run.slot), vars=run.vars,
        run_seconds=round(run.ran, 6), running_since=_since(run),
        description=run.workflow.description,
        on_exit={rec.id: step_status(rec, [], pool_full,
                                     run.workflow.steps[rec.index].description)
                 for rec in itertools.islice(run.steps.values(), run.mains, None)},
    )


def slot_ts(slot: float | None) -> str | None:
    """A schedule slot as shown and given to steps: UTC RFC 3339, to the second."""
    if slot is None:
        return None
    return ev.format_ts(slot).split(".")[0] + "Z"


def step_statuses(run: RunState, pool_full: PoolFull | None = None,
                  ) -> Iterator[tuple[str, StepStatus]]:
    """Each step's id and status, in file order, made as they are asked for; not the
    on_exit steps (`run_status` shows those apart)."""
    for rec in itertools.islice(run.steps.values(), run.mains):
        step = run.workflow.steps[rec.index]
        yield rec.id, step_status(rec, list(step.depends_on), pool_full, step.description)


def run_summary(run: RunState) -> RunSummary:
    return RunSummary(
        run_id=run.run_id, name=run.name, owner=run.owner, state=run.state,
        created_at=run.created_at, finished_at=run.finished_at,
        schedule=run.schedule, scheduled_at=slot_ts(run.slot),
        run_seconds=round(run.ran, 6), running_since=_since(run),
    )


def _since(run: RunState) -> str | None:
    """A CORRUPT run is not running, whatever its log got as far as."""
    return None if run.finished else run.running_since


STEPS_LISTED = 20  # an unknown step's error names at most this many of the run's steps


def near_step(step: str, run: RunState) -> str:
    """What follows "run R has no step 'lod'": `; did you mean 'load'? its steps:
    extract, transform, load` (issue 14). The run's steps, at most STEPS_LISTED."""
    import difflib

    ids = list(run.steps)
    near = (difflib.get_close_matches(step, ids, n=1)
            if len(ids) <= 10_000 and len(step) <= 200 else [])
    listed = ", ".join(ids[:STEPS_LISTED]) + (f", ... ({len(ids)} steps)"
                                             if len(ids) > STEPS_LISTED else "")
    return f"; did you mean {near[0]!r}? its steps: {listed}" if near else \
        f"; its steps: {listed}"


def signal_name(exit_code: int | None) -> str | None:
    """`SIGTERM` for exit code -15: the name of the signal a negative exit code stands
    for (`SIG42` for one Python has no name for); None for an exit status."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"SIG{-exit_code}"


def describe(event: ev.Event) -> str:
    """One human line for a transition, used by replay, --follow and the daemon's log;
    control characters in it (a run name, an error quoting a path) are escaped."""
    kind = type(event)
    text = _DESCRIBE.get(kind)
    if text is None:
        return kind.__name__
    return printable(text(event))


_DESCRIBE: dict[type[ev.Event], Callable[..., str]] = {
    ev.RunCreated: lambda e: (f"run created ({e.name}, owner {e.owner})"
                              + (": QUEUED" if e.queued else "")),
    ev.StepReady: lambda e: f"{e.step}: READY",
    ev.AttemptClaimed: lambda e: f"{e.step}: RUNNING (attempt {e.attempt})",
    ev.AttemptStarted: lambda e: f"{e.step}: attempt {e.attempt} started, pid {e.pid}",
    ev.AttemptSubmitting: lambda e: (
        f"{e.step}: attempt {e.attempt} submitting to {e.executor} as job wfd-{e.token}"),
    ev.AttemptSubmitted: lambda e: f"{e.step}: attempt {e.attempt} is job {e.job_id}",
    ev.AttemptSucceeded: lambda e: f"{e.step}: SUCCEEDED (attempt {e.attempt}"
    + (f"; outputs {', '.join(e.outputs)})" if e.outputs else ")"),
    ev.AttemptFailed: lambda e: (
        f"{e.step}: RETRY_WAIT (attempt {e.attempt} failed: {e.error}; retry at {e.retry_at})"
    ),
    ev.StepFailed: lambda e: f"{e.step}: FAILED (attempt {e.attempt}: {e.error})",
    ev.AttemptInterrupted: lambda e: (
        f"{e.step}: READY (attempt {e.attempt} interrupted: {e.reason})"
    ),
    ev.RetryDue: lambda e: f"{e.step}: READY (retry due)",
    ev.StepSkipped: lambda e: (
        f"{e.step}: SKIPPED (upstream {e.cause} failed)" if e.reason is None
        else f"{e.step}: SKIPPED ({e.reason})"
    ),
    ev.RunCancelRequested: lambda e: (
        "run: cancel requested" if e.reason is None else f"run: cancelled ({e.reason})"
    ),
    ev.StepCancelled: lambda e: f"{e.step}: CANCELLED",
    ev.RunFinished: lambda e: f"run: {e.state}",
    ev.RunResumed: lambda e: "run: RUNNING (resumed)",
    ev.StepsRetried: lambda e: f"run: RUNNING (retrying {', '.join(e.steps)})",
    ev.RunDequeued: lambda e: "run: RUNNING (its turn in the queue)",
}
