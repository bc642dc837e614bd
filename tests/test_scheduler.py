"""Tests of wfd.scheduler: decide() and outcome(), alone and driven to the end by a simulator.

The simulator below plays the daemon with a fake clock and fake processes: it
applies every event `decide` asks for, claims and "starts" attempts, records
kills, and when nothing is left to do it either ends a running attempt (how is
chosen by the test: hypothesis data, or a fixed script) or jumps to `wake_at`.
It checks the scheduler's promises after every step, and the test checks the
end state against facts computed independently of wfd.
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
from wfd.scheduler import Emit, Kill, Start, decide, describe_exit, exit_code_of, outcome
from wfd.workflow import Backoff, Step, Workflow, build_workflow

T0 = 1_800_000_000.0
T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]

EXIT_CODES = (0, 0, 1, 2, -signal.SIGKILL)
RANDS = (0.0, 0.25, 0.5, 0.999)
LATER = (0.0, 0.25, 1.0, 3.0)  # seconds that may pass before an attempt ends


# ---- helpers ---------------------------------------------------------------------


def make_step(step_id: str, *deps: str, retries: int = 0, timeout: float | None = None,
              backoff: Backoff | None = None) -> Step:
    return Step(id=step_id, command="true", depends_on=deps, retries=retries, timeout=timeout,
                backoff=backoff or Backoff(initial=2.0, factor=2.0, max=60.0))


def make_workflow(*steps: Step, max_parallel: int | None = None) -> Workflow:
    return build_workflow("wf", max_parallel, {}, steps)


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
    now: float = T0
    runs: dict[str, st.RunState] = field(default_factory=dict)
    order: dict[str, None] = field(default_factory=dict)
    streams: dict[str, list[ev.Event]] = field(default_factory=dict)
    attempts: dict[tuple[str, str], Attempt] = field(default_factory=dict)
    starts: list[tuple[str, str]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    at_cancel: dict[str, dict[str, str]] = field(default_factory=dict)
    advances: int = 0
    iterations: int = 0

    def __post_init__(self) -> None:
        for run_id, workflow in self.workflows.items():
            self.runs[run_id] = st.RunState(workflow)
            self.streams[run_id] = []
            self.emit(run_id, ev.RunCreated, run_id=run_id, name=workflow.name,
                      owner="alice", owner_uid=1000)
            self.order[run_id] = None

    # -- recording --

    def emit(self, run_id: str, kind: type[ev.Event], /, **fields: Any) -> ev.Event:
        run = self.runs[run_id]
        event = kind(seq=run.last_seq + 1, ts=ev.format_ts(self.now), **fields)
        st.apply(run, event)
        self.streams[run_id].append(event)
        self.check_slots()
        return event

    def check_slots(self) -> None:
        total = 0
        for run in self.runs.values():
            running = sum(rec.state == st.RUNNING for rec in run.steps.values())
            cap = run.workflow.max_parallel
            assert cap is None or running <= cap, f"{running} running, max_parallel {cap}"
            total += running
        assert total <= self.limit, f"{total} running, global limit {self.limit}"

    # -- one round --

    def run(self, bound: int) -> None:
        """Decide and act until every run finished; fail after `bound` rounds."""
        while not all(run.finished for run in self.runs.values()):
            self.iterations += 1
            assert self.iterations <= bound, "the runs did not end"
            decision = decide(self.runs, list(self.order), self.limit, self.now)
            self.check_timeouts(decision.actions)
            if not self.act(decision.actions):
                self.advance(decision.wake_at)

    def act(self, actions: list[Emit | Start | Kill]) -> bool:
        recorded = False
        for action in actions:
            if isinstance(action, Emit):
                self.emit(action.run_id, action.kind, **action.fields)
                if action.kind is ev.RunFinished:
                    self.order.pop(action.run_id, None)
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
            assert run.steps[dep].state == st.SUCCEEDED, f"{step.id} started before {dep}"
        assert action.attempt == run.steps[action.step].attempts + 1
        self.emit(action.run_id, ev.AttemptClaimed, step=action.step, attempt=action.attempt)
        self.order.pop(action.run_id)
        self.order[action.run_id] = None  # as the engine: started last, back of the round
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
        """Kill(timeout) exactly for the running attempts past their deadline."""
        timeouts = {(a.run_id, a.step) for a in actions
                    if isinstance(a, Kill) and a.reason == "timeout"}
        due = set()
        for (run_id, step_id), attempt in self.attempts.items():
            run = self.runs[run_id]
            timeout = run.workflow.steps[run.workflow.index[step_id]].timeout
            started = ev.parse_ts(self.streams_started(run_id, step_id, attempt.number))
            if timeout is not None and started + timeout <= self.now:
                due.add((run_id, step_id))
        assert timeouts == due

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
            if when == self.advances and not run.finished and not run.cancelling:
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
        if run.cancelling:
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
        self.order[run_id] = None


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
        steps.append(make_step(
            f"s{i}", *(f"s{d}" for d in deps),
            retries=draw(hs.integers(0, 2)),
            timeout=draw(hs.sampled_from([None, None, 1.0, 2.5, 30.0])),
            backoff=backoff,
        ))
    return make_workflow(*steps, max_parallel=draw(hs.none() | hs.integers(1, 4)))


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


def check_ending(sim: Sim, run_id: str) -> None:
    """The end of a run that was not cancelled, against facts computed here."""
    workflow = sim.workflows[run_id]
    status = sim.status(run_id)
    states = {sid: step.state for sid, step in status.steps.items()}
    failed = {sid for sid, state in states.items() if state == st.FAILED}
    skipped = {sid for sid, state in states.items() if state == st.SKIPPED}
    assert skipped == downstream(workflow, failed)
    assert not failed & skipped
    assert all(states[s.id] == st.SUCCEEDED for s in workflow.steps
               if s.id not in failed | skipped)
    assert (status.state == st.SUCCEEDED) == all(s == st.SUCCEEDED for s in states.values())
    assert status.state == (st.FAILED if failed else st.SUCCEEDED)
    for step in workflow.steps:
        if states[step.id] == st.FAILED:
            assert status.steps[step.id].attempts == step.retries + 1
        if states[step.id] == st.SKIPPED:
            assert status.steps[step.id].attempts == 0
    assert isinstance(sim.streams[run_id][-1], ev.RunFinished)


def note_coverage(sim: Sim) -> None:
    """What the examples exercised (see pytest --hypothesis-show-statistics)."""
    for run_id, stream in sim.streams.items():
        hypothesis.event(f"run {sim.status(run_id).state}")
        hypothesis.event(f"steps skipped: {any(isinstance(e, ev.StepSkipped) for e in stream)}")
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
        after = status.steps[sid].state
        assert after == (before if before in st.TERMINAL else st.CANCELLED)
    cancel_seq = next(e.seq for e in sim.streams["r0"] if isinstance(e, ev.RunCancelRequested))
    assert not [e for e in sim.streams["r0"]
                if isinstance(e, ev.AttemptClaimed) and e.seq > cancel_seq]
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
    succeeded = {sid for sid, step in before.steps.items() if step.state == st.SUCCEEDED}
    starts = len(sim.starts)
    sim.cancel_at = {}
    sim.choose = first  # every attempt ends at once, before any deadline
    sim.exit_code = lambda run_id, step: 0

    sim.resume("r0")
    sim.run(sim.iterations + bound_for(sim.workflows))

    after = sim.status("r0")
    assert after.state == st.SUCCEEDED
    assert not succeeded & {step for _, step in sim.starts[starts:]}
    for sid, step in after.steps.items():
        if sid not in succeeded:
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
    return decide(sim.runs, list(sim.order), sim.limit, sim.now).actions


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
    assert decide(sim.runs, ["r"], 4, sim.now + 1000).actions == []


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

    early = decide(sim.runs, ["r"], 8, sim.now + 0.999)
    due = decide(sim.runs, ["r"], 8, sim.now + 1.0)

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

    before = decide(sim.runs, ["r"], 8, started + timeout / 2)
    at = decide(sim.runs, ["r"], 8, started + timeout)
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
    assert kinds(decide_now(sim)) == [("RunFinished", "")]
    assert decide_now(sim)[0] == Emit("r", ev.RunFinished, {"state": st.CANCELLED})


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
