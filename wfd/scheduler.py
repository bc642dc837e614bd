"""What to do next, given the state and the time: pure decisions, no I/O.

`decide` looks at every run the daemon drives and returns actions: events to
record (a step became READY, is SKIPPED, its retry is due, the run finished,
a step is CANCELLED), attempts to start, attempts to kill (timeout, cancel)
and when to look again. It never acts and never reads the clock: the daemon
passes `now`, performs the actions, applies the events it recorded, and calls
`decide` again until nothing is left to do. Events a decision asks for are
applied before the next call, so a call never repeats the previous one's work.

`outcome` turns the end of an attempt into the event that records it; the
random factor of backoff jitter is an argument, so the core stays
deterministic and the event carries the time it chose.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wfd import events as ev
from wfd.events import format_ts
from wfd.state import RUNNING, TERMINAL, RunState


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

    def wake(self, at: float) -> None:
        if self.wake_at is None or at < self.wake_at:
            self.wake_at = at


def decide(
    runs: Mapping[str, RunState],
    order: Iterable[str],
    limit: int,
    now: float,
) -> Decision:
    """Actions for the runs named in `order` (runs the daemon drives, least recently
    started first, which makes starts round-robin across runs); `limit` is the
    daemon's global `--max-parallel`."""
    decision = Decision()
    driven = [runs[run_id] for run_id in order]
    for run in driven:
        if not run.finished:
            _housekeeping(run, now, decision)
    if not any(isinstance(a, Emit) for a in decision.actions):
        _starts(driven, limit, decision)
    return decision


def _housekeeping(run: RunState, now: float, decision: Decision) -> None:
    """Everything but starting attempts, for one run."""
    add = decision.actions.append
    if run.cancelling:
        _cancel(run, decision)
    for step_id, cause in run.skippable.items():
        add(Emit(run.run_id, ev.StepSkipped, {"step": step_id, "cause": cause}))
    for step_id in run.promotable:
        add(Emit(run.run_id, ev.StepReady, {"step": step_id}))
    # Cancelling: `_cancel` has recorded the waiting steps CANCELLED; no retry is due.
    for step_id in () if run.cancelling else run.retry_wait:
        at = run.steps[step_id].retry_at_epoch
        if at <= now:
            add(Emit(run.run_id, ev.RetryDue, {"step": step_id}))
        else:
            decision.wake(at)
    for step_id in run.running:
        rec = run.steps[step_id]
        if rec.deadline is None:
            continue
        if rec.deadline <= now:
            add(Kill(run.run_id, step_id, rec.attempts, "timeout"))
        else:
            decision.wake(rec.deadline)
    if run.all_terminal():
        add(Emit(run.run_id, ev.RunFinished, {"state": run.outcome()}))


def _cancel(run: RunState, decision: Decision) -> None:
    for rec in run.steps.values():
        if rec.state in TERMINAL:
            continue
        if rec.state == RUNNING:
            decision.actions.append(Kill(run.run_id, rec.id, rec.attempts, "cancel"))
        else:
            decision.actions.append(Emit(run.run_id, ev.StepCancelled, {"step": rec.id}))


def _starts(driven: list[RunState], limit: int, decision: Decision) -> None:
    """Fill free slots one start per run per round: round-robin across runs, and
    within a run in the order steps became READY."""
    free = limit - sum(run.counts[RUNNING] for run in driven)
    queues = []
    for run in driven:
        if run.finished or run.cancelling or not run.ready:
            continue
        cap = run.workflow.max_parallel
        room = len(run.ready) if cap is None else min(len(run.ready), cap - run.counts[RUNNING])
        if room > 0:
            queues.append((run, iter(run.ready), room))
    while free > 0 and queues:
        next_round = []
        for run, ready, room in queues:
            if free == 0:
                break
            step_id = next(ready)
            decision.actions.append(Start(run.run_id, step_id, run.steps[step_id].attempts + 1))
            free -= 1
            if room > 1:
                next_round.append((run, ready, room - 1))
        queues = next_round


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
) -> Emit:
    """The event that records how attempt `attempt` of `step_id` ended.

    `exit_code` is the leader's (None if it never ran); `interrupted` names a daemon
    stop or crash, which does not use up a retry; `rand` in [0, 1) scales jitter."""
    run_id = run.run_id
    base = {"step": step_id, "attempt": attempt}
    if interrupted is not None and not run.cancelling:
        return Emit(run_id, ev.AttemptInterrupted, {**base, "reason": interrupted})
    if run.cancelling:
        return Emit(run_id, ev.StepCancelled, {**base, "exit_code": exit_code})
    if exit_code == 0 and not timed_out and start_error is None:
        return Emit(run_id, ev.AttemptSucceeded, base)
    step = run.workflow.steps[run.steps[step_id].index]
    if start_error is not None:
        error = f"cannot start: {start_error}"
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
