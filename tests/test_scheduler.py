"""Tests of wfd.scheduler: decide() and outcome(), alone and driven to the end by a simulator.

The simulator below plays the daemon with a fake clock and fake processes: it
applies every event `decide` asks for, claims and "starts" attempts, records
kills, and when nothing is left to do it either ends a running attempt (how is
chosen by the test: hypothesis data, or a fixed script) or jumps to `wake_at`.
It checks the scheduler's promises after every step (limits, who starts next,
no free slot left idle while a step could start), and the test checks the end
state against facts computed independently of wfd.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hypothesis
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from wfd import events as ev
from wfd import state as st
from wfd.scheduler import Emit, Kill, Scheduler, Start, describe_exit, exit_code_of, outcome
from wfd.workflow import Backoff, Step, Workflow, build_workflow

T0 = 1_800_000_000.0
OWNER = 1000
T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]

EXIT_CODES = (0, 0, 1, 2, -signal.SIGKILL)
RANDS = (0.0, 0.25, 0.5, 0.999)
LATER = (0.0, 0.25, 1.0, 3.0)  # seconds that may pass before an attempt ends


# ---- helpers ---------------------------------------------------------------------


def make_step(step_id: str, *deps: str, retries: int = 0, timeout: float | None = None,
              backoff: Backoff | None = None, run_if: str = "succeeded") -> Step:
    return Step(id=step_id, command="true", depends_on=deps, retries=retries, timeout=timeout,
                backoff=backoff or Backoff(initial=2.0, factor=2.0, max=60.0), run_if=run_if)


def make_workflow(*steps: Step, max_parallel: int | None = None,
                  on_exit: tuple[Step, ...] = ()) -> Workflow:
    return build_workflow("wf", max_parallel, {}, steps, on_exit=on_exit)


def independent(n: int, prefix: str = "s") -> Workflow:
    return make_workflow(*(make_step(f"{prefix}{i}") for i in range(n)))


def downstream(workflow: Workflow, roots: set[str]) -> set[str]:
    """Steps that depend, directly or not, on one of `roots` (not the roots themselves)."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for step in workflow.steps:
            if step.id not in found and any(d in roots or d in found for d in step.depends_on):
                found.add(step.id)
                changed = True
    return found


def timeout_text(seconds: float) -> str:
    shown = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
    return f"timed out after {shown} s"


def first(options: Sequence[T]) -> T:
    return options[0]


@dataclass
class Attempt:
    run_id: str
    step: str
    number: int
    killed: str | None = None


@dataclass
class Sim:
    """The daemon, played with a fake clock: see the module docstring."""

    workflows: dict[str, Workflow]
    limit: int
    choose: Choose
    exit_code: Callable[[str, str], int] | None = None  # per (run, step); else `choose`
    cancel_at: dict[str, int] = field(default_factory=dict)  # run -> advance number
    owners: dict[str, int] = field(default_factory=dict)  # run -> uid; else OWNER
    per_user: int | None = None
    now: float = T0
    runs: dict[str, st.RunState] = field(default_factory=dict)
    sched: Scheduler = field(init=False)
    # Who started last, counted here independently of the scheduler: run and user ->
    # the number of the last start (a run: or of when it was driven; a user: -1 never).
    last_start: dict[str | int, int] = field(default_factory=dict)
    clock: int = 0
    previous: tuple[int, set[int]] | None = None  # the last start's user, who could start
    streams: dict[str, list[ev.Event]] = field(default_factory=dict)
    attempts: dict[tuple[str, str], Attempt] = field(default_factory=dict)
    starts: list[tuple[str, str]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    at_cancel: dict[str, dict[str, str]] = field(default_factory=dict)
    advances: int = 0
    iterations: int = 0

    def __post_init__(self) -> None:
        self.sched = Scheduler(self.runs, self.limit, self.per_user)
        for run_id, workflow in self.workflows.items():
            self.runs[run_id] = st.RunState(workflow)
            self.streams[run_id] = []
            uid = self.owners.setdefault(run_id, OWNER)
            self.emit(run_id, ev.RunCreated, run_id=run_id, name=workflow.name,
                      owner=f"u{uid}", owner_uid=uid)
            self.drive(run_id)

    def drive(self, run_id: str) -> None:
        self.sched.drive(run_id)
        self.last_start[run_id] = self.tick()
        self.last_start.setdefault(self.owners[run_id], -1)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- recording --

    def emit(self, run_id: str, kind: type[ev.Event], /, **fields: Any) -> ev.Event:
        run = self.runs[run_id]
        event = kind(seq=run.last_seq + 1, ts=ev.format_ts(self.now), **fields)
        st.apply(run, event)
        self.sched.touch(run_id)
        self.streams[run_id].append(event)
        self.check_slots()
        return event

    def check_slots(self) -> None:
        total = 0
        per_user: Counter[int] = Counter()
        for run_id, run in self.runs.items():
            running = sum(rec.state == st.RUNNING for rec in run.steps.values())
            cap = run.workflow.max_parallel
            assert cap is None or running <= cap, f"{running} running, max_parallel {cap}"
            total += running
            per_user[self.owners[run_id]] += running
        assert total <= self.limit, f"{total} running, global limit {self.limit}"
        if self.per_user is not None:
            assert max(per_user.values()) <= self.per_user, f"per user: {per_user}"

    def startable(self) -> dict[int, list[str]]:
        """Each user who may start a step now, with their runs that may (the scheduler's
        rule, computed from the runs' states alone)."""
        running = Counter({uid: 0 for uid in self.owners.values()})
        for run_id, run in self.runs.items():
            running[self.owners[run_id]] += run.counts[st.RUNNING]
        found: dict[int, list[str]] = {}
        for run_id, run in self.runs.items():
            uid, cap = self.owners[run_id], run.workflow.max_parallel
            cancelled = run.cancelling and run.main_open()  # on_exit steps start after it
            if (run_id not in self.sched or run.finished or cancelled or not run.ready
                    or cap is not None and run.counts[st.RUNNING] >= cap
                    or self.per_user is not None and running[uid] >= self.per_user):
                continue
            found.setdefault(uid, []).append(run_id)
        return found

    def check_fair(self, action: Start) -> None:
        """This start is the one the rule calls for: the user who started least
        recently, their run that started least recently, its first READY step."""
        startable = self.startable()
        uid = self.owners[action.run_id]
        assert uid in startable and action.run_id in startable[uid], "cannot start now"
        assert self.last_start[uid] == min(self.last_start[u] for u in startable), (
            f"user {uid} started, but {startable} waited longer")
        assert self.last_start[action.run_id] == min(
            self.last_start[r] for r in startable[uid]), "not the user's longest waiting run"
        assert action.step == next(iter(self.runs[action.run_id].ready))
        # The promise in plain words: nobody who could start waits through two starts
        # in a row of another user.
        if self.previous is not None and self.previous[0] == uid:
            passed_over = (self.previous[1] & startable.keys()) - {uid}
            assert not passed_over, f"users {passed_over} waited through two starts of {uid}"
        self.previous = (uid, set(startable))

    def check_no_idle_slot(self) -> None:
        """After a decision that started what it could: no free slot, or no start possible."""
        running = sum(run.counts[st.RUNNING] for run in self.runs.values())
        assert running == self.limit or not self.startable(), (
            f"{running} of {self.limit} running while {self.startable()} could start")

    # -- one round --

    def run(self, bound: int) -> None:
        """Decide and act until every run finished; fail after `bound` rounds."""
        while not all(run.finished for run in self.runs.values()):
            self.iterations += 1
            assert self.iterations <= bound, "the runs did not end"
            decision = self.sched.decide(self.now)
            self.check_timeouts(decision.actions)
            recorded = self.act(decision.actions)
            if not any(isinstance(a, Emit) for a in decision.actions):
                self.check_no_idle_slot()
            if not recorded:
                self.advance(decision.wake_at)

    def act(self, actions: list[Emit | Start | Kill]) -> bool:
        recorded = False
        for action in actions:
            if isinstance(action, Emit):
                self.emit(action.run_id, action.kind, **action.fields)
                if action.kind is ev.RunFinished:
                    self.sched.drop(action.run_id)
                recorded = True
            elif isinstance(action, Start):
                self.start(action)
                recorded = True
            else:
                self.kill(action)
        return recorded

    def start(self, action: Start) -> None:
        run = self.runs[action.run_id]
        step = run.workflow.steps[run.workflow.index[action.step]]
        for dep in step.depends_on:
            done = st.TERMINAL if step.run_if != "succeeded" else {st.SUCCEEDED}
            assert run.steps[dep].state in done, f"{step.id} started before {dep}"
        if step.run_if == "failed":
            assert any(run.steps[d].state == st.FAILED or (run.steps[d].state == st.SKIPPED
                       and run.steps[d].error.startswith("skipped: upstream step "))
                       for d in step.depends_on), f"{step.id} started with nothing failed"
        assert action.attempt == run.steps[action.step].attempts + 1
        self.check_fair(action)
        self.last_start[action.run_id] = self.last_start[self.owners[action.run_id]] = self.tick()
        self.emit(action.run_id, ev.AttemptClaimed, step=action.step, attempt=action.attempt)
        self.emit(action.run_id, ev.AttemptStarted, step=action.step, attempt=action.attempt,
                  pid=1000 + len(self.starts), start_time=self.now, boot_id="boot")
        self.attempts[(action.run_id, action.step)] = Attempt(
            action.run_id, action.step, action.attempt
        )
        self.starts.append((action.run_id, action.step))

    def kill(self, action: Kill) -> None:
        attempt = self.attempts[(action.run_id, action.step)]
        assert attempt.number == action.attempt
        assert action.reason in ("timeout", "cancel")
        if action.reason == "cancel":
            assert self.runs[action.run_id].cancelling
        attempt.killed = attempt.killed or action.reason
        self.kills.append(action)

    def check_timeouts(self, actions: list[Emit | Start | Kill]) -> None:
        """Kill(timeout) only for running attempts past their deadline, and for each
        such attempt in the first decision that sees it past (a decision looks at a run
        only when something happened to it or its timer came, so not again after)."""
        timeouts = {(a.run_id, a.step) for a in actions
                    if isinstance(a, Kill) and a.reason == "timeout"}
        due = set()
        for (run_id, step_id), attempt in self.attempts.items():
            run = self.runs[run_id]
            timeout = run.workflow.steps[run.workflow.index[step_id]].timeout
            started = ev.parse_ts(self.streams_started(run_id, step_id, attempt.number))
            if timeout is not None and started + timeout <= self.now:
                due.add((run_id, step_id))
        assert timeouts <= due
        assert all(self.attempts[key].killed for key in due - timeouts), "a timeout missed"

    def streams_started(self, run_id: str, step_id: str, number: int) -> str:
        for event in reversed(self.streams[run_id]):
            if isinstance(event, ev.AttemptStarted) and event.step == step_id \
                    and event.attempt == number:
                return event.ts
        raise AssertionError(f"no AttemptStarted for {step_id} attempt {number}")

    # -- time passes --

    def advance(self, wake_at: float | None) -> None:
        """Nothing to do now: an attempt ends, or the clock jumps to `wake_at`; then
        maybe a cancel request comes in, before the next decision."""
        options = (["finish"] if self.attempts else []) + (["jump"] if wake_at else [])
        assert options, f"stuck: nothing running, nothing to wait for, at {self.now}"
        if self.choose(options) == "finish":
            self.end_attempt(wake_at)
        else:
            assert wake_at is not None and wake_at > self.now
            self.now = wake_at
        self.advances += 1
        for run_id, when in self.cancel_at.items():
            run = self.runs[run_id]
            if when == self.advances and run.cancellable():
                self.at_cancel[run_id] = {sid: rec.state for sid, rec in run.steps.items()}
                self.emit(run_id, ev.RunCancelRequested)

    def end_attempt(self, wake_at: float | None) -> None:
        key = self.choose(sorted(self.attempts))
        attempt = self.attempts.pop(key)
        later = self.choose(LATER)
        if wake_at is None or self.now + later < wake_at:
            self.now += later
        run = self.runs[attempt.run_id]
        if attempt.killed:
            code = -signal.SIGTERM
        elif self.exit_code is not None:
            code = self.exit_code(attempt.run_id, attempt.step)
        else:
            code = self.choose(EXIT_CODES)
        rand = self.choose(RANDS)
        ended = outcome(run, attempt.step, attempt.number, code, now=self.now, rand=rand,
                        timed_out=attempt.killed == "timeout")
        self.check_outcome(run, attempt, code, rand, ended)
        self.emit(ended.run_id, ended.kind, **ended.fields)

    def check_outcome(self, run: st.RunState, attempt: Attempt, code: int, rand: float,
                      ended: Emit) -> None:
        step = run.workflow.steps[run.workflow.index[attempt.step]]
        key = (attempt.run_id, attempt.step)
        assert ended.fields["step"] == attempt.step
        assert ended.fields["attempt"] == attempt.number
        if run.stops(run.steps[attempt.step]):  # not an on_exit step: they run on
            assert ended.kind is ev.StepCancelled
            assert ended.fields["exit_code"] == code
            return
        if code == 0 and attempt.killed is None:
            assert ended.kind is ev.AttemptSucceeded
            return
        self.failures[key] += 1
        n = self.failures[key]
        assert ended.fields["exit_code"] == code
        if attempt.killed == "timeout":
            assert step.timeout is not None
            assert ended.fields["error"] == timeout_text(step.timeout)
        if n <= step.retries:
            assert ended.kind is ev.AttemptFailed
            assert ended.fields["retry_at"] == ev.format_ts(self.now + step.backoff.delay(n, rand))
        else:
            assert ended.kind is ev.StepFailed

    # -- after the end --

    def status(self, run_id: str) -> st.RunStatus:
        return st.run_status(self.runs[run_id])

    def resume(self, run_id: str) -> None:
        self.emit(run_id, ev.RunResumed)
        self.failures = Counter({k: v for k, v in self.failures.items() if k[0] != run_id})
        self.drive(run_id)


# ---- hypothesis: random workflows ------------------------------------------------------


@hs.composite
def workflows(draw: hs.DrawFn, max_steps: int = 30) -> Workflow:
    n = draw(hs.integers(1, max_steps))
    steps = []
    for i in range(n):
        deps = draw(hs.lists(hs.integers(0, i - 1), unique=True, max_size=3)) if i else []
        backoff = Backoff(
            initial=draw(hs.sampled_from([1.0, 0.5, 2.0])),
            factor=draw(hs.sampled_from([2.0, 1.0, 3.0])),
            max=draw(hs.sampled_from([60.0, 0.0, 3.0])),
            jitter=draw(hs.sampled_from([0.0, 0.1, 0.5])),
        )
        rules = ["succeeded", "succeeded", "done", "failed"] if deps else ["succeeded", "done"]
        steps.append(make_step(
            f"s{i}", *(f"s{d}" for d in deps),
            retries=draw(hs.integers(0, 2)),
            timeout=draw(hs.sampled_from([None, None, 1.0, 2.5, 30.0])),
            backoff=backoff,
            run_if=draw(hs.sampled_from(rules)),
        ))
    ends = ["SUCCEEDED", "FAILED", "CANCELLED"]
    on_exit = tuple(
        Step(id=f"x{j}", command="true", retries=draw(hs.integers(0, 1)),
             when=tuple(draw(hs.lists(hs.sampled_from(ends), min_size=1, unique=True))))
        for j in range(draw(hs.sampled_from([0, 0, 1, 2])))
    )
    return make_workflow(*steps, max_parallel=draw(hs.none() | hs.integers(1, 4)),
                         on_exit=on_exit)


@hs.composite
def fleets(draw: hs.DrawFn) -> dict[str, Workflow]:
    """One run, or sometimes several at once (smaller ones)."""
    count = draw(hs.sampled_from([1, 1, 2, 3]))
    max_steps = 30 if count == 1 else 10
    return {f"r{i}": draw(workflows(max_steps)) for i in range(count)}


def hypothesis_chooser(data: hs.DataObject) -> Choose:
    return lambda options: data.draw(hs.sampled_from(list(options)))


def bound_for(workflows: dict[str, Workflow]) -> int:
    steps = sum(len(wf.steps) for wf in workflows.values())
    return 50 + 30 * steps


def check_refold(sim: Sim, run_id: str) -> None:
    """The stream, through its JSON lines, folds prefix by prefix to the live state."""
    workflow = sim.workflows[run_id]
    lines = b"".join(ev.encode_line(event) for event in sim.streams[run_id])
    events = ev.json_decoder.decode_lines(lines)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    fresh = st.RunState(workflow)
    for event in events:  # the state after each event is the fold of that prefix
        st.apply(fresh, event)
    folded = st.fold(workflow, events)
    live = msgspec.json.encode(st.run_status(sim.runs[run_id]))
    assert msgspec.json.encode(st.run_status(folded)) == live
    assert msgspec.json.encode(st.run_status(fresh)) == live


def mains(workflow: Workflow) -> tuple[Step, ...]:
    """The steps proper, without the on_exit steps (the last `exits`)."""
    return workflow.steps[: len(workflow.steps) - workflow.exits]


def expected_skips(workflow: Workflow, states: dict[str, str]) -> dict[str, bool]:
    """The steps `run_if` must have SKIPPED, given the states of those that ran, each with
    whether its skip counts as a failure; computed here from the rule as the README says
    it, in file order (a step's dependencies come before it in these workflows)."""
    skips: dict[str, bool] = {}
    for step in mains(workflow):
        failing = [d for d in step.depends_on if states[d] == st.FAILED or skips.get(d)]
        if step.run_if == "succeeded":
            if all(states[d] == st.SUCCEEDED for d in step.depends_on):
                continue
            skips[step.id] = bool(failing)
        elif step.run_if == "failed" and not failing:
            skips[step.id] = False
    return skips


def check_ending(sim: Sim, run_id: str) -> None:
    """The end of a run that was not cancelled, against facts computed here."""
    workflow = sim.workflows[run_id]
    status = sim.status(run_id)
    states = {sid: step.state for sid, step in status.steps.items()}
    failed = {sid for sid, state in states.items() if state == st.FAILED}
    skipped = {sid for sid, state in states.items() if state == st.SKIPPED}
    skips = expected_skips(workflow, states)
    assert skipped == set(skips)
    for sid, failure in skips.items():  # a skip because of a failure names the failure
        assert status.steps[sid].error.startswith("skipped: upstream step ") == failure
    if all(s.run_if == "succeeded" for s in mains(workflow)):  # as before run_if
        assert skipped == downstream(workflow, failed)
    assert not failed & skipped
    assert all(states[s.id] == st.SUCCEEDED for s in mains(workflow)
               if s.id not in failed | skipped)
    # The run's outcome: FAILED iff a step FAILED; SKIPPED steps never decide.
    assert status.state == (st.FAILED if failed else st.SUCCEEDED)
    check_exits(sim, run_id)
    for step in mains(workflow):
        if states[step.id] == st.FAILED:
            assert status.steps[step.id].attempts == step.retries + 1
        if states[step.id] == st.SKIPPED:
            assert status.steps[step.id].attempts == 0
    assert isinstance(sim.streams[run_id][-1], ev.RunFinished)


def check_exits(sim: Sim, run_id: str) -> None:
    """on_exit steps ran, after every main step ended, iff their `when` holds the outcome;
    they never changed it."""
    workflow = sim.workflows[run_id]
    status = sim.status(run_id)
    stream = sim.streams[run_id]
    assert set(status.on_exit) == {s.id for s in workflow.steps[len(status.steps):]}
    mains_ended = max(e.seq for e in stream if getattr(e, "step", None) in status.steps
                      and e.__class__ in (ev.AttemptSucceeded, ev.StepFailed, ev.StepSkipped,
                                          ev.StepCancelled))
    for step in workflow.steps[len(status.steps):]:
        ran = status.state in step.when
        assert status.on_exit[step.id].state in (
            (st.SUCCEEDED, st.FAILED) if ran else (st.SKIPPED,))
        claims = [e.seq for e in stream if isinstance(e, ev.AttemptClaimed) and e.step == step.id]
        assert bool(claims) == ran
        assert all(seq > mains_ended for seq in claims)


def note_coverage(sim: Sim) -> None:
    """What the examples exercised (see pytest --hypothesis-show-statistics)."""
    for run_id, stream in sim.streams.items():
        hypothesis.event(f"run {sim.status(run_id).state}")
        hypothesis.event(f"steps skipped: {any(isinstance(e, ev.StepSkipped) for e in stream)}")
        ran = {e.step for e in stream if isinstance(e, ev.AttemptClaimed)}
        rules = {s.run_if for s in sim.workflows[run_id].steps if s.id in ran}
        hypothesis.event(f"run_if that ran: {sorted(rules)}")
        hypothesis.event(f"on_exit steps: {len(sim.status(run_id).on_exit)}")
        hypothesis.event(f"retries: {any(isinstance(e, ev.RetryDue) for e in stream)}")
    hypothesis.event(f"runs at once: {len(sim.runs)}")
    hypothesis.event(f"timeout kills: {bool(sim.kills)}")


# ---- the properties ------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(fleet=fleets(), limit=hs.integers(1, 6), data=hs.data())
def test_random_runs_end_as_their_dags_and_outcomes_say(
    fleet: dict[str, Workflow], limit: int, data: hs.DataObject
) -> None:
    sim = Sim(fleet, limit, hypothesis_chooser(data))

    sim.run(bound_for(fleet))

    for run_id in fleet:
        check_ending(sim, run_id)
        check_refold(sim, run_id)
    assert all(kill.reason == "timeout" for kill in sim.kills)
    note_coverage(sim)


@settings(max_examples=80, deadline=None)
@given(fleet=fleets(), limit=hs.integers(1, 6), data=hs.data())
def test_cancel_ends_every_unfinished_step_and_the_run_cancelled(
    fleet: dict[str, Workflow], limit: int, data: hs.DataObject
) -> None:
    cancel_at = {"r0": data.draw(hs.integers(0, 12), label="cancel r0 at advance")}
    sim = Sim(fleet, limit, hypothesis_chooser(data), cancel_at=cancel_at)

    sim.run(bound_for(fleet))

    status = sim.status("r0")
    if "r0" not in sim.at_cancel:  # it ended before the cancel came
        check_ending(sim, "r0")
        return
    assert status.state == st.CANCELLED
    for sid, before in sim.at_cancel["r0"].items():
        if sid in status.steps:
            after = status.steps[sid].state
            assert after == (before if before in st.TERMINAL else st.CANCELLED)
    check_exits(sim, "r0")
    cancel_seq = next(e.seq for e in sim.streams["r0"] if isinstance(e, ev.RunCancelRequested))
    assert not [e for e in sim.streams["r0"] if isinstance(e, ev.AttemptClaimed)
                and e.seq > cancel_seq and e.step in status.steps]
    killed = {k.step for k in sim.kills if k.run_id == "r0" and k.reason == "cancel"}
    assert killed == {sid for sid, before in sim.at_cancel["r0"].items() if before == st.RUNNING}
    for run_id in fleet:
        check_refold(sim, run_id)


@settings(max_examples=40, deadline=None)
@given(workflow=workflows(12), limit=hs.integers(1, 4), data=hs.data())
def test_resume_reruns_only_what_did_not_succeed(
    workflow: Workflow, limit: int, data: hs.DataObject
) -> None:
    sim = Sim({"r0": workflow}, limit, hypothesis_chooser(data),
              cancel_at={"r0": data.draw(hs.sampled_from([0, 3, 99]), label="cancel at")})
    sim.run(bound_for(sim.workflows))
    before = sim.status("r0")
    if before.state == st.SUCCEEDED:
        return
    # Steps with another run_if (cleanup, alert) run again, also when they SUCCEEDED.
    rules = {step.id: step.run_if for step in workflow.steps}
    succeeded = {sid for sid, step in before.steps.items()
                 if step.state == st.SUCCEEDED and rules[sid] == "succeeded"}
    starts = len(sim.starts)
    sim.cancel_at = {}
    sim.choose = first  # every attempt ends at once, before any deadline
    sim.exit_code = lambda run_id, step: 0

    sim.resume("r0")
    sim.run(sim.iterations + bound_for(sim.workflows))

    after = sim.status("r0")
    assert after.state == st.SUCCEEDED
    assert not succeeded & {step for _, step in sim.starts[starts:]}
    # Nothing failed this time: alerts are skipped, and what needs them to succeed.
    skips = expected_skips(workflow, {sid: step.state for sid, step in after.steps.items()})
    assert not any(skips.values())
    for sid, step in after.steps.items():
        if sid in succeeded:
            continue
        if sid in skips:
            assert step.state == st.SKIPPED
            assert step.attempts == before.steps[sid].attempts
        else:
            assert step.attempts == before.steps[sid].attempts + 1
    check_refold(sim, "r0")


@settings(max_examples=40, deadline=None)
@given(runs=hs.integers(2, 3), steps=hs.integers(3, 8), data=hs.data())
def test_starts_go_round_robin_across_runs(runs: int, steps: int, data: hs.DataObject) -> None:
    fleet = {f"r{i}": independent(steps) for i in range(runs)}
    sim = Sim(fleet, 2, hypothesis_chooser(data))

    sim.run(bound_for(fleet))

    run_order = [run_id for run_id, _ in sim.starts]
    assert run_order == [f"r{i % runs}" for i in range(runs * steps)]
    for run_id in fleet:  # within a run: the order they became READY, which is file order
        assert [s for r, s in sim.starts if r == run_id] == [f"s{i}" for i in range(steps)]


@hs.composite
def shared_fleets(draw: hs.DrawFn) -> tuple[dict[str, Workflow], dict[str, int]]:
    """Two or three users, one to three small runs each."""
    fleet, owners = {}, {}
    for uid in range(1001, 1001 + draw(hs.integers(2, 3))):
        for i in range(draw(hs.integers(1, 3))):
            run_id = f"u{uid}r{i}"
            fleet[run_id] = draw(workflows(6))
            owners[run_id] = uid
    return fleet, owners


@settings(max_examples=100, deadline=None)
@given(shared=shared_fleets(), limit=hs.integers(1, 3),
       per_user=hs.none() | hs.integers(1, 2), data=hs.data())
def test_users_take_turns_and_stay_under_the_per_user_limit(
    shared: tuple[dict[str, Workflow], dict[str, int]], limit: int, per_user: int | None,
    data: hs.DataObject,
) -> None:
    """`Sim` checks every start against the rule (least recently started user, then
    run, then READY order; nobody passed over twice in a row), the limits at every
    event, and that no slot stays free while a step could start."""
    fleet, owners = shared
    cancel_at = {"u1001r0": data.draw(hs.sampled_from([2, 5, 999]), label="cancel at")}
    sim = Sim(fleet, limit, hypothesis_chooser(data), owners=owners, per_user=per_user,
              cancel_at=cancel_at)

    sim.run(bound_for(fleet))

    for run_id in fleet:
        if run_id not in sim.at_cancel:
            check_ending(sim, run_id)
        check_refold(sim, run_id)
    hypothesis.event(f"users who started: {len({owners[r] for r, _ in sim.starts})}")


def test_with_one_slot_users_alternate_and_each_users_runs_alternate() -> None:
    fleet = {"a0": independent(2), "a1": independent(2), "a2": independent(2),
             "b": independent(3)}
    owners = {"a0": 1001, "a1": 1001, "a2": 1001, "b": 1002}
    sim = Sim(fleet, 1, first, exit_code=lambda run_id, step: 0, owners=owners)

    sim.run(bound_for(fleet))

    assert sim.starts == [("a0", "s0"), ("b", "s0"), ("a1", "s0"), ("b", "s1"),
                          ("a2", "s0"), ("b", "s2"), ("a0", "s1"), ("a1", "s1"),
                          ("a2", "s1")]


def test_the_per_user_limit_leaves_global_slots_to_other_users() -> None:
    fleet = {"a0": independent(2), "a1": independent(2), "b": independent(2)}
    owners = {"a0": 1001, "a1": 1001, "b": 1002}
    sim = Sim(fleet, 4, first, owners=owners, per_user=1)
    sim.act(decide_now(sim))

    sim.act(decide_now(sim))

    assert sim.starts == [("a0", "s0"), ("b", "s0")]  # two of four slots: one per user
    assert decide_now(sim) == []
    sim.emit("a0", ev.AttemptSucceeded, step="s0", attempt=1)
    sim.attempts.pop(("a0", "s0"))
    sim.act(decide_now(sim))
    assert sim.starts[2:] == [("a1", "s0")]  # a's next run, as a's one step ended


# ---- many runs: fairness and cost ------------------------------------------------------


class CountingRuns(dict[str, st.RunState]):
    """The runs by id, noting which ones the scheduler looks up."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __getitem__(self, run_id: str) -> st.RunState:
        self.seen.add(run_id)
        return super().__getitem__(run_id)


class Fleet:
    """A lean daemon for thousands of runs: applies what `decide` asks, ends attempts
    when told (Sim checks too much per event for this many runs)."""

    def __init__(self, limit: int, per_user: int | None = None) -> None:
        self.runs = CountingRuns()
        self.sched = Scheduler(self.runs, limit, per_user)

    def submit(self, run_id: str, uid: int, workflow: Workflow) -> None:
        dict.__setitem__(self.runs, run_id, st.RunState(workflow))
        self.apply(run_id, ev.RunCreated, run_id=run_id, name="wf", owner=f"u{uid}",
                   owner_uid=uid)
        self.sched.drive(run_id)

    def apply(self, run_id: str, kind: type[ev.Event], /, **fields: Any) -> None:
        run = dict.__getitem__(self.runs, run_id)
        st.apply(run, kind(seq=run.last_seq + 1, ts=ev.format_ts(T0), **fields))
        self.sched.touch(run_id)

    def settle(self) -> list[str]:
        """Decide and act until nothing is left; the runs started, in order."""
        started = []
        while actions := self.sched.decide(T0).actions:
            for action in actions:
                if isinstance(action, Start):
                    self.apply(action.run_id, ev.AttemptClaimed, step=action.step,
                               attempt=action.attempt)
                    started.append(action.run_id)
                elif isinstance(action, Emit):
                    self.apply(action.run_id, action.kind, **action.fields)
                    if action.kind is ev.RunFinished:
                        self.sched.drop(action.run_id)
        return started

    def succeed(self, run_id: str, step: str = "s0") -> None:
        self.apply(run_id, ev.AttemptSucceeded, step=step, attempt=1)


def test_a_new_run_of_another_user_gets_the_next_free_slot_behind_3000_queued() -> None:
    fleet = Fleet(limit=4)
    for i in range(3000):
        fleet.submit(f"a{i:04}", 1001, independent(1))
    assert fleet.settle() == ["a0000", "a0001", "a0002", "a0003"]
    fleet.submit("b", 1002, independent(1))
    assert fleet.settle() == []  # b is READY; every slot is taken
    assert fleet.sched.runs_of(1001) == 3000 and fleet.sched.runs_of(1002) == 1

    fleet.succeed("a0000")
    fleet.runs.seen.clear()
    started = fleet.settle()

    assert started == ["b"]  # not a0004, queued long before b
    # Incremental: only the run that changed and the one started were looked at,
    # not the 2,996 queued ones.
    assert fleet.runs.seen == {"a0000", "b"}
    fleet.succeed("a0001")
    assert fleet.settle() == ["a0004"]  # then a's queue goes on where it was
    assert fleet.sched.runs_of(1001) == 2998


def test_a_decision_with_every_slot_taken_looks_only_at_what_changed() -> None:
    fleet = Fleet(limit=2)
    for i in range(2000):
        fleet.submit(f"a{i:04}", 1000 + i % 50, independent(3))
    fleet.settle()
    fleet.runs.seen.clear()

    fleet.apply("a1234", ev.RunCancelRequested)  # a queued run, nothing running
    assert [type(a) for a in fleet.sched.decide(T0).actions] == [Emit] * 3
    assert fleet.runs.seen == {"a1234"}
    fleet.runs.seen.clear()
    assert fleet.sched.decide(T0).actions == []  # nothing changed: nothing looked at
    assert fleet.runs.seen == set()


# ---- decide, case by case ---------------------------------------------------------------


def sim_of(*steps: Step, max_parallel: int | None = None, limit: int = 8) -> Sim:
    return Sim({"r": make_workflow(*steps, max_parallel=max_parallel)}, limit, first)


def kinds(actions: list[Emit | Start | Kill]) -> list[tuple[str, str]]:
    out = []
    for a in actions:
        if isinstance(a, Emit):
            out.append((a.kind.__name__, a.fields.get("step", "")))
        elif isinstance(a, Start):
            out.append(("Start", a.step))
        else:
            out.append((f"Kill:{a.reason}", a.step))
    return out


def decide_now(sim: Sim) -> list[Emit | Start | Kill]:
    return sim.sched.decide(sim.now).actions


def test_roots_become_ready_first_and_start_in_the_next_decision() -> None:
    sim = sim_of(make_step("b"), make_step("a"), make_step("c", "a"), max_parallel=1)

    first_round = decide_now(sim)
    sim.act(first_round)
    second_round = decide_now(sim)

    assert kinds(first_round) == [("StepReady", "b"), ("StepReady", "a")]
    assert kinds(second_round) == [("Start", "b")]
    assert second_round[0] == Start("r", "b", 1)


def test_a_decision_that_records_events_starts_nothing_yet() -> None:
    sim = sim_of(make_step("a"), make_step("b"), make_step("c", "a"), max_parallel=1)
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))  # a starts; b waits for the slot
    ended = outcome(sim.runs["r"], "a", 1, 0, now=sim.now, rand=0.0)
    sim.emit("r", ended.kind, **ended.fields)

    actions = decide_now(sim)

    assert kinds(actions) == [("StepReady", "c")]  # b starts next time, seeing c READY too


def test_a_finished_run_gets_no_actions() -> None:
    sim = sim_of(make_step("a"))
    sim.run(20)
    fresh = Scheduler(sim.runs, 4)
    fresh.drive("r")  # as if driven again by mistake
    assert fresh.decide(sim.now + 1000).actions == []


def test_the_global_limit_counts_running_steps_of_every_run() -> None:
    sim = Sim({"x": independent(3), "y": independent(3)}, 3, first)
    sim.act(decide_now(sim))

    sim.act(decide_now(sim))

    assert sim.starts == [("x", "s0"), ("y", "s0"), ("x", "s1")]
    assert decide_now(sim) == []


def test_a_retried_step_goes_behind_steps_that_became_ready_before_it() -> None:
    sim = sim_of(make_step("a", retries=1, backoff=Backoff(initial=5, max=5)),
                 make_step("b"), make_step("c"), max_parallel=1)
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))  # a starts
    ended = outcome(sim.runs["r"], "a", 1, 1, now=sim.now, rand=0.0)
    sim.emit("r", ended.kind, **ended.fields)
    sim.attempts.clear()
    sim.now += 5
    sim.act(decide_now(sim))  # RetryDue: a is READY again, behind b and c

    sim.act(decide_now(sim))

    assert sim.starts == [("r", "a"), ("r", "b")]
    assert list(sim.runs["r"].ready) == ["c", "a"]


def test_a_retry_waits_for_its_time() -> None:
    sim = sim_of(make_step("a", retries=2, backoff=Backoff(initial=1, factor=3, max=60)))
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))
    ended = outcome(sim.runs["r"], "a", 1, 7, now=sim.now, rand=0.5)
    sim.emit("r", ended.kind, **ended.fields)

    early = sim.sched.decide(sim.now + 0.999)
    due = sim.sched.decide(sim.now + 1.0)

    assert ended.fields["retry_at"] == ev.format_ts(sim.now + 1.0)
    assert ended.fields["error"] == "exited with status 7"
    assert early.actions == [] and early.wake_at == sim.now + 1.0
    assert kinds(due.actions) == [("RetryDue", "a")]


@pytest.mark.parametrize(
    ("n", "rand", "expected"),
    [(1, 0.5, 1.0), (2, 0.5, 2.0), (3, 0.5, 4.0), (4, 0.5, 8.0), (7, 0.5, 60.0),
     (3, 0.0, 3.6), (3, 1.0, 4.4), (100_000, 0.5, 60.0)],
)
def test_backoff_delay_is_min_of_max_and_initial_times_factor_power_jittered(
    n: int, rand: float, expected: float
) -> None:
    backoff = Backoff(initial=1, factor=2, max=60, jitter=0.1)
    assert backoff.delay(n, rand) == pytest.approx(expected)


@pytest.mark.parametrize("rand", RANDS)
def test_each_failure_waits_the_backoff_of_its_number(rand: float) -> None:
    backoff = Backoff(initial=1.5, factor=3, max=20, jitter=0.5)
    sim = sim_of(make_step("a", retries=4, backoff=backoff))
    sim.act(decide_now(sim))
    for n in range(1, 6):
        sim.act(decide_now(sim))  # Start
        ended = outcome(sim.runs["r"], "a", n, 1, now=sim.now, rand=rand)
        expected = min(20.0, 1.5 * 3 ** (n - 1)) * (0.5 + rand)
        if n == 5:
            assert ended.kind is ev.StepFailed
            break
        assert ended.kind is ev.AttemptFailed
        assert ended.fields["retry_at"] == ev.format_ts(sim.now + expected)
        sim.emit("r", ended.kind, **ended.fields)
        sim.now = ev.parse_ts(ended.fields["retry_at"])
        sim.act(decide_now(sim))  # RetryDue
    assert sim.runs["r"].steps["a"].attempts == 5


@pytest.mark.parametrize(("timeout", "text"), [(2.5, "2.5"), (120.0, "120"), (1e-3, "0.001")])
def test_a_running_attempt_past_its_deadline_is_killed_for_timeout(
    timeout: float, text: str
) -> None:
    sim = sim_of(make_step("a", timeout=timeout, retries=1))
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))  # started at now
    started = sim.now

    before = sim.sched.decide(started + timeout / 2)
    at = sim.sched.decide(started + timeout)
    ended = outcome(sim.runs["r"], "a", 1, -signal.SIGTERM, now=started + timeout, rand=0.0,
                    timed_out=True)

    assert before.actions == [] and before.wake_at == pytest.approx(started + timeout)
    assert at.actions == [Kill("r", "a", 1, "timeout")]
    assert ended.kind is ev.AttemptFailed
    assert ended.fields["error"] == f"timed out after {text} s"
    assert ended.fields["exit_code"] == -signal.SIGTERM


def test_a_timed_out_attempt_that_exits_0_still_failed() -> None:
    sim = sim_of(make_step("a", timeout=1))
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))
    ended = outcome(sim.runs["r"], "a", 1, 0, now=sim.now + 1, rand=0.0, timed_out=True)
    assert ended.kind is ev.StepFailed
    assert ended.fields["error"] == "timed out after 1 s"


def test_a_step_that_cannot_start_fails_with_the_reason() -> None:
    sim = sim_of(make_step("a"))
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))
    ended = outcome(sim.runs["r"], "a", 1, None, now=sim.now, rand=0.0,
                    start_error="No such file or directory: 'nope'")
    assert ended.kind is ev.StepFailed
    assert ended.fields == {"step": "a", "attempt": 1, "exit_code": None,
                            "error": "cannot start: No such file or directory: 'nope'"}


def test_an_interrupted_attempt_uses_no_retry() -> None:
    sim = sim_of(make_step("a"))
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))
    ended = outcome(sim.runs["r"], "a", 1, -signal.SIGTERM, now=sim.now, rand=0.0,
                    interrupted="daemon stopped")
    sim.emit("r", ended.kind, **ended.fields)
    sim.attempts.clear()

    again = decide_now(sim)

    assert ended.kind is ev.AttemptInterrupted
    assert again == [Start("r", "a", 2)]
    failing = outcome(sim.runs["r"], "a", 2, 1, now=sim.now, rand=0.0)
    assert failing.kind is ev.StepFailed  # retries=0: this is the first failure


@pytest.mark.parametrize(("status", "code", "text"), [
    (0, 0, "exited with status 0"),
    (3 << 8, 3, "exited with status 3"),
    (signal.SIGKILL, -9, "killed by SIGKILL"),
    (signal.SIGTERM, -15, "killed by SIGTERM"),
])
def test_exit_codes_as_spec_reports_them(status: int, code: int, text: str) -> None:
    assert exit_code_of(status) == code
    assert describe_exit(code) == text


def test_a_signal_without_a_name_is_shown_by_number() -> None:
    assert describe_exit(-200) == "killed by signal 200"


def test_a_failure_without_an_exit_code_reads_as_killed() -> None:
    sim = sim_of(make_step("a"))
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))
    ended = outcome(sim.runs["r"], "a", 1, None, now=sim.now, rand=0.0)
    assert ended.fields["error"] == "killed by SIGKILL"


# ---- cancel ---------------------------------------------------------------------------


def cancelled_sim() -> Sim:
    """`run` RUNNING, `wait` in RETRY_WAIT, `ready` READY (no slot), `later` PENDING."""
    sim = sim_of(make_step("run"), make_step("wait", retries=1), make_step("ready"),
                 make_step("later", "run"), max_parallel=2)
    sim.act(decide_now(sim))
    sim.act(decide_now(sim))  # run and wait start
    ended = outcome(sim.runs["r"], "wait", 1, 1, now=sim.now, rand=0.0)
    sim.emit("r", ended.kind, **ended.fields)
    sim.attempts.pop(("r", "wait"))
    sim.emit("r", ev.RunCancelRequested)
    return sim


def test_cancel_kills_running_attempts_and_cancels_the_rest() -> None:
    sim = cancelled_sim()

    actions = decide_now(sim)

    assert sorted(kinds(actions)) == [
        ("Kill:cancel", "run"), ("StepCancelled", "later"), ("StepCancelled", "ready"),
        ("StepCancelled", "wait"),
    ]
    assert not [a for a in actions if isinstance(a, Start)]


def test_cancel_while_a_retry_is_due_cancels_the_step() -> None:
    sim = cancelled_sim()
    sim.now += 3600  # the retry was due long ago when the cancel came

    actions = decide_now(sim)
    sim.act(actions)

    assert ("RetryDue", "wait") not in kinds(actions)
    assert sim.runs["r"].steps["wait"].state == st.CANCELLED


def test_a_cancelled_run_ends_cancelled_once_its_attempts_are_gone() -> None:
    sim = cancelled_sim()
    sim.act(decide_now(sim))  # the kill and the StepCancelled events
    assert decide_now(sim) == [Kill("r", "run", 1, "cancel")]  # until the attempt ends

    ended = outcome(sim.runs["r"], "run", 1, -signal.SIGTERM, now=sim.now, rand=0.0)
    sim.emit("r", ended.kind, **ended.fields)

    assert ended.kind is ev.StepCancelled
    assert ended.fields == {"step": "run", "attempt": 1, "exit_code": -signal.SIGTERM}
    assert decide_now(sim) == [Emit("r", ev.RunFinished, {"state": st.CANCELLED})]


def test_a_success_recorded_after_the_cancel_readies_no_dependent() -> None:
    sim = cancelled_sim()
    sim.emit("r", ev.AttemptSucceeded, step="run", attempt=1)  # it ended as the cancel came

    actions = decide_now(sim)
    sim.act(actions)

    assert ("StepReady", "later") not in kinds(actions)
    assert sim.runs["r"].steps["later"].state == st.CANCELLED
    assert kinds(decide_now(sim)) == [("RunFinished", "")]


def test_an_attempt_that_exits_0_during_cancel_is_cancelled() -> None:
    sim = cancelled_sim()
    ended = outcome(sim.runs["r"], "run", 1, 0, now=sim.now, rand=0.0)
    assert ended.kind is ev.StepCancelled
