"""Tests of wfd.state: the transition table, apply's checks, resume, fold and the views.

Each test tells a short story: build a run to some point with events, apply one
more, and look at what the run says (its `run_status`, or the error it raised).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from wfd import events as ev
from wfd import scheduler
from wfd import state as st
from wfd.errors import IllegalTransition
from wfd.workflow import Backoff, Step, Workflow, build_workflow

T0 = 1_800_000_000.0
RFC3339_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

STEP_STATES = (
    st.PENDING, st.READY, st.RUNNING, st.RETRY_WAIT,
    st.SUCCEEDED, st.FAILED, st.SKIPPED, st.CANCELLED,
)
STEP_EVENTS: tuple[type[ev.Event], ...] = (
    ev.StepReady, ev.AttemptClaimed, ev.AttemptStarted, ev.AttemptSucceeded,
    ev.AttemptFailed, ev.StepFailed, ev.AttemptInterrupted, ev.RetryDue,
    ev.StepSkipped, ev.StepCancelled, ev.AttemptSubmitting, ev.AttemptSubmitted,
)
RUN_EVENTS: tuple[type[ev.Event], ...] = (
    ev.RunCreated, ev.RunCancelRequested, ev.RunFinished, ev.RunResumed, ev.StepsRetried,
)

# SPEC 2, written out independently of the module: (state, event) -> next state.
SPEC_TRANSITIONS: dict[tuple[str, type[ev.Event]], str] = {
    (st.PENDING, ev.StepReady): st.READY,
    (st.PENDING, ev.StepSkipped): st.SKIPPED,
    (st.PENDING, ev.StepCancelled): st.CANCELLED,
    (st.READY, ev.AttemptClaimed): st.RUNNING,
    (st.READY, ev.StepCancelled): st.CANCELLED,
    (st.RUNNING, ev.AttemptStarted): st.RUNNING,
    # a batch attempt's intent and job id (issue 17): nothing moves
    (st.RUNNING, ev.AttemptSubmitting): st.RUNNING,
    (st.RUNNING, ev.AttemptSubmitted): st.RUNNING,
    (st.RUNNING, ev.AttemptSucceeded): st.SUCCEEDED,
    (st.RUNNING, ev.AttemptFailed): st.RETRY_WAIT,
    (st.RUNNING, ev.StepFailed): st.FAILED,
    (st.RUNNING, ev.AttemptInterrupted): st.READY,
    (st.RUNNING, ev.StepCancelled): st.CANCELLED,
    (st.RETRY_WAIT, ev.RetryDue): st.READY,
    (st.RETRY_WAIT, ev.StepCancelled): st.CANCELLED,
}
ILLEGAL_PAIRS = [
    (state, kind) for state in STEP_STATES for kind in STEP_EVENTS
    if (state, kind) not in SPEC_TRANSITIONS
]


# ---- helpers -------------------------------------------------------------------


def make_step(step_id: str, *deps: str, retries: int = 0, timeout: float | None = None,
              run_if: str = "succeeded") -> Step:
    return Step(id=step_id, command="true", depends_on=deps, retries=retries, timeout=timeout,
                backoff=Backoff(initial=2.0, factor=2.0, max=60.0), run_if=run_if)


def make_workflow(*steps: Step, max_parallel: int | None = None) -> Workflow:
    return build_workflow("wf", max_parallel, {}, steps)


class Story:
    """A run driven by hand: `emit` builds the next event (next seq, the fake clock)."""

    def __init__(self, workflow: Workflow) -> None:
        self.run = st.RunState(workflow)
        self.now = T0
        self.events: list[ev.Event] = []

    def event(self, kind: type[ev.Event], **fields: Any) -> ev.Event:
        return kind(seq=self.run.last_seq + 1, ts=ev.format_ts(self.now), **fields)

    def emit(self, kind: type[ev.Event], **fields: Any) -> ev.Event:
        event = self.event(kind, **fields)
        st.apply(self.run, event)
        self.events.append(event)
        return event

    def later(self, seconds: float) -> None:
        self.now += seconds

    # The usual paths of one step.
    def create(self) -> Story:
        self.emit(ev.RunCreated, run_id="r1", name="wf", owner="alice", owner_uid=1000)
        return self

    def ready(self, step: str) -> None:
        self.emit(ev.StepReady, step=step)

    def claim(self, step: str) -> int:
        attempt = self.run.steps[step].attempts + 1
        self.emit(ev.AttemptClaimed, step=step, attempt=attempt)
        self.emit(ev.AttemptStarted, step=step, attempt=attempt, pid=4242,
                  start_time=self.now, boot_id="boot-1")
        return attempt

    def succeed(self, step: str) -> None:
        attempt = self.claim(step)
        self.later(1)
        self.emit(ev.AttemptSucceeded, step=step, attempt=attempt)

    def fail_once(self, step: str, exit_code: int = 1) -> None:
        attempt = self.claim(step)
        self.later(1)
        self.emit(ev.AttemptFailed, step=step, attempt=attempt, exit_code=exit_code,
                  error=f"exited with status {exit_code}", retry_at=ev.format_ts(self.now + 2))

    def fail(self, step: str, exit_code: int = 1) -> None:
        attempt = self.claim(step)
        self.later(1)
        self.emit(ev.StepFailed, step=step, attempt=attempt, exit_code=exit_code,
                  error=f"exited with status {exit_code}")

    def finish(self, state: str) -> None:
        self.emit(ev.RunFinished, state=state)

    def state_of(self, step: str) -> str:
        return self.run.steps[step].state

    def status_bytes(self) -> bytes:
        return msgspec.json.encode(st.run_status(self.run))


def snapshot(run: st.RunState) -> dict[str, Any]:
    """Everything in a RunState but its workflow, copied: equal iff nothing changed."""
    out: dict[str, Any] = {}
    for name in st.RunState.__slots__:
        if name == "steps":
            out[name] = {
                sid: {slot: getattr(rec, slot) for slot in st.StepRec.__slots__}
                for sid, rec in run.steps.items()
            }
        elif name != "workflow":
            value = getattr(run, name)
            out[name] = dict(value) if isinstance(value, dict) else value
    out["status"] = msgspec.json.encode(st.run_status(run))
    return out


def two_step_story() -> Story:
    """`a` (one retry) and `b` depending on it."""
    return Story(make_workflow(make_step("a", retries=1), make_step("b", "a"))).create()


def reach(state: str) -> tuple[Story, str]:
    """A story with one step in `state`, and that step's id."""
    story = two_step_story()
    if state == st.PENDING:
        return story, "a"
    if state == st.SKIPPED:
        story.ready("a")
        story.fail_once("a")
        story.emit(ev.RetryDue, step="a")
        story.fail("a")
        story.emit(ev.StepSkipped, step="b", cause="a")
        return story, "b"
    if state == st.CANCELLED:
        story.emit(ev.RunCancelRequested)
        story.emit(ev.StepCancelled, step="a")
        return story, "a"
    story.ready("a")
    if state == st.READY:
        return story, "a"
    story.claim("a")
    attempt = story.run.steps["a"].attempts
    if state == st.RUNNING:
        return story, "a"
    if state == st.RETRY_WAIT:
        story.emit(ev.AttemptFailed, step="a", attempt=attempt, exit_code=3, error="exit 3",
                   retry_at=ev.format_ts(T0 + 10))
    elif state == st.SUCCEEDED:
        story.emit(ev.AttemptSucceeded, step="a", attempt=attempt)
    elif state == st.FAILED:
        story.emit(ev.StepFailed, step="a", attempt=attempt, exit_code=3, error="exit 3")
    return story, "a"


def step_event_fields(story: Story, kind: type[ev.Event], step: str) -> dict[str, Any]:
    """Fields of a well-formed `kind` for `step`, naming the attempt a legal one would."""
    rec = story.run.steps[step]
    current = rec.attempts
    fields: dict[str, Any] = {"step": step}
    if kind is ev.AttemptClaimed:
        fields["attempt"] = current + 1
    elif kind is ev.AttemptStarted:
        fields.update(attempt=current, pid=99, start_time=T0, boot_id="boot-1")
    elif kind is ev.AttemptSucceeded:
        fields["attempt"] = current
    elif kind is ev.AttemptSubmitting:
        fields.update(attempt=current, executor="slurm", token="0123456789abcdef")
    elif kind is ev.AttemptSubmitted:
        fields.update(attempt=current, job_id="42")
    elif kind is ev.AttemptFailed:
        fields.update(attempt=current, exit_code=1, error="x", retry_at=ev.format_ts(T0 + 5))
    elif kind is ev.StepFailed:
        fields.update(attempt=current, exit_code=1, error="x")
    elif kind is ev.AttemptInterrupted:
        fields.update(attempt=current, reason="daemon stopped")
    elif kind is ev.StepSkipped:
        fields["cause"] = "a"
    elif kind is ev.StepCancelled and rec.state == st.RUNNING:
        fields.update(attempt=current, exit_code=-15)
    return fields


def assert_refused(story: Story, kind: type[ev.Event], *words: str, **fields: Any) -> str:
    """Apply `kind`; it must raise and leave the run exactly as it was. The message."""
    before = snapshot(story.run)
    with pytest.raises(IllegalTransition) as info:
        st.apply(story.run, story.event(kind, **fields))
    assert snapshot(story.run) == before
    message = info.value.message
    for word in (kind.__name__, *words):
        assert word in message
    return message


# ---- the table -------------------------------------------------------------------


def test_the_table_is_the_state_diagram_of_spec_2() -> None:
    assert st.TRANSITIONS == SPEC_TRANSITIONS
    assert st.RESUME == {
        st.SUCCEEDED: st.SUCCEEDED, st.FAILED: st.PENDING,
        st.SKIPPED: st.PENDING, st.CANCELLED: st.PENDING,
    }


@pytest.mark.parametrize("state", STEP_STATES)
def test_reach_puts_a_step_in_each_state(state: str) -> None:
    story, step = reach(state)
    assert story.state_of(step) == state


@pytest.mark.parametrize(
    ("state", "kind"), list(SPEC_TRANSITIONS),
    ids=[f"{s}-{k.__name__}" for s, k in SPEC_TRANSITIONS],
)
def test_every_legal_pair_moves_the_step(state: str, kind: type[ev.Event]) -> None:
    story, step = reach(state)
    seq = story.run.last_seq

    story.emit(kind, **step_event_fields(story, kind, step))

    assert story.state_of(step) == SPEC_TRANSITIONS[(state, kind)]
    assert st.run_status(story.run).steps[step].state == SPEC_TRANSITIONS[(state, kind)]
    assert story.run.last_seq == seq + 1


@pytest.mark.parametrize(
    ("state", "kind"), ILLEGAL_PAIRS, ids=[f"{s}-{k.__name__}" for s, k in ILLEGAL_PAIRS],
)
def test_every_illegal_pair_raises_and_changes_nothing(
    state: str, kind: type[ev.Event]
) -> None:
    story, step = reach(state)

    message = assert_refused(story, kind, state, repr(step),
                             **step_event_fields(story, kind, step))

    assert f"seq {story.run.last_seq + 1}" in message
    assert story.run.run_id in message


def test_all_illegal_pairs_are_covered() -> None:
    assert len(ILLEGAL_PAIRS) == len(STEP_STATES) * len(STEP_EVENTS) - len(SPEC_TRANSITIONS)
    assert len(ILLEGAL_PAIRS) == 67 + 14  # + AttemptSubmitting/-Submitted off RUNNING


def test_a_refused_event_leaves_the_run_usable() -> None:
    story, _ = reach(st.READY)
    assert_refused(story, ev.AttemptSucceeded, step="a", attempt=1)

    story.succeed("a")

    assert story.state_of("a") == st.SUCCEEDED
    assert [e.seq for e in story.events] == list(range(1, len(story.events) + 1))


# ---- sequence and the first event ---------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 2, 4, 9])
def test_a_seq_other_than_the_next_raises(seq: int) -> None:
    story, _ = reach(st.READY)  # RunCreated, StepReady: the next seq is 3
    before = snapshot(story.run)

    claim = ev.AttemptClaimed(seq=seq, ts=ev.format_ts(T0), step="a", attempt=1)  # else legal

    with pytest.raises(IllegalTransition, match=rf"\(seq {seq}\) out of sequence: expected seq 3"):
        st.apply(story.run, claim)

    assert snapshot(story.run) == before


@pytest.mark.parametrize("kind", [*STEP_EVENTS, ev.RunCancelRequested, ev.RunFinished,
                                  ev.RunResumed])
def test_the_first_event_must_be_run_created(kind: type[ev.Event]) -> None:
    story = two_step_story()
    fresh = Story(story.run.workflow)
    fields = step_event_fields(story, kind, "a") if kind in STEP_EVENTS else {}
    if kind is ev.RunFinished:
        fields = {"state": st.SUCCEEDED}

    assert_refused(fresh, kind, "before RunCreated", **fields)


def test_run_created_twice_raises() -> None:
    story = two_step_story()
    assert_refused(story, ev.RunCreated, "after the first event",
                   run_id="r1", name="wf", owner="alice", owner_uid=1000)


def test_run_created_fills_the_run_header() -> None:
    story = two_step_story()
    status = st.run_status(story.run)
    assert (status.run_id, status.name, status.owner) == ("r1", "wf", "alice")
    assert status.created_at == ev.format_ts(T0)
    assert story.run.owner_uid == 1000
    assert story.run.format == ev.LOG_FORMAT


def test_an_unknown_step_raises() -> None:
    story = two_step_story()
    assert_refused(story, ev.StepReady, "unknown step 'nope'", step="nope")


def test_ready_with_a_dependency_not_succeeded_raises() -> None:
    story = two_step_story()
    assert_refused(story, ev.StepReady, "'b'", "dependencies not SUCCEEDED", step="b")


def test_ready_once_the_dependency_succeeded() -> None:
    story = two_step_story()
    story.ready("a")
    story.succeed("a")

    story.ready("b")

    assert story.state_of("b") == st.READY


# ---- attempt numbers ------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [0, 2, 3])
def test_a_claim_must_take_the_next_attempt_number(attempt: int) -> None:
    story, _ = reach(st.READY)
    assert_refused(story, ev.AttemptClaimed, "names attempt", "expected 1",
                   step="a", attempt=attempt)


def test_attempt_numbers_count_on_across_retries() -> None:
    story, _ = reach(st.RETRY_WAIT)
    story.emit(ev.RetryDue, step="a")
    assert_refused(story, ev.AttemptClaimed, "expected 2", step="a", attempt=1)

    story.emit(ev.AttemptClaimed, step="a", attempt=2)

    assert st.run_status(story.run).steps["a"].attempts == 2


def test_an_interrupted_attempt_is_retried_with_a_new_number_and_no_retry_used() -> None:
    story, _ = reach(st.RUNNING)
    story.emit(ev.AttemptInterrupted, step="a", attempt=1, reason="daemon stopped")
    assert story.state_of("a") == st.READY

    story.claim("a")

    assert story.run.steps["a"].attempts == 2
    assert story.run.steps["a"].failures == 0


@pytest.mark.parametrize("kind", [ev.AttemptStarted, ev.AttemptSucceeded, ev.AttemptFailed,
                                  ev.StepFailed, ev.AttemptInterrupted, ev.StepCancelled])
@pytest.mark.parametrize("wrong", [0, 2])
def test_other_attempt_events_must_name_the_current_attempt(
    kind: type[ev.Event], wrong: int
) -> None:
    story, _ = reach(st.RUNNING)
    fields = step_event_fields(story, kind, "a")
    fields["attempt"] = wrong

    assert_refused(story, kind, f"names attempt {wrong}", "expected 1", **fields)


def test_a_cancelled_run_claims_nothing() -> None:
    story, _ = reach(st.READY)
    story.emit(ev.RunCancelRequested)

    assert_refused(story, ev.AttemptClaimed, "after the run was cancelled", step="a", attempt=1)


def test_cancel_twice_raises() -> None:
    story, _ = reach(st.READY)
    story.emit(ev.RunCancelRequested)

    assert_refused(story, ev.RunCancelRequested, "in run state RUNNING")


# ---- RunFinished --------------------------------------------------------------------


def test_run_finished_while_a_step_is_not_terminal_raises() -> None:
    story = two_step_story()
    story.ready("a")
    story.succeed("a")

    assert_refused(story, ev.RunFinished, "more work", state=st.SUCCEEDED)


@pytest.mark.parametrize("wrong", [st.FAILED, st.CANCELLED, st.RUNNING, "DONE"])
def test_run_finished_with_the_wrong_outcome_raises(wrong: str) -> None:
    story = two_step_story()
    story.ready("a")
    story.succeed("a")
    story.ready("b")
    story.succeed("b")

    assert_refused(story, ev.RunFinished, f"with state {wrong}", "call for SUCCEEDED",
                   state=wrong)


def failed_story() -> Story:
    story = two_step_story()
    story.ready("a")
    story.fail_once("a")
    story.emit(ev.RetryDue, step="a")
    story.fail("a")
    story.emit(ev.StepSkipped, step="b", cause="a")
    return story


def cancelled_story() -> Story:
    story = two_step_story()
    story.ready("a")
    story.succeed("a")
    story.ready("b")
    attempt = story.claim("b")
    story.emit(ev.RunCancelRequested)
    story.emit(ev.StepCancelled, step="b", attempt=attempt, exit_code=-15)
    return story


@pytest.mark.parametrize(
    ("build", "outcome"), [(failed_story, st.FAILED), (cancelled_story, st.CANCELLED)],
)
def test_run_finished_with_the_outcome_its_steps_call_for(build: Any, outcome: str) -> None:
    story: Story = build()
    for wrong in {st.SUCCEEDED, st.FAILED, st.CANCELLED} - {outcome}:
        assert_refused(story, ev.RunFinished, state=wrong)

    story.later(1)
    story.finish(outcome)

    status = st.run_status(story.run)
    assert status.state == outcome
    assert status.finished_at == ev.format_ts(story.now)
    assert story.run.finished


def test_nothing_applies_after_the_run_finished() -> None:
    story = failed_story()
    story.finish(st.FAILED)

    assert_refused(story, ev.RunFinished, "while the run is FAILED", state=st.FAILED)
    assert_refused(story, ev.RunCancelRequested, "in run state FAILED")
    assert_refused(story, ev.StepCancelled, "in state FAILED", step="a")


# ---- RunResumed -------------------------------------------------------------------


@pytest.mark.parametrize("build", [two_step_story, failed_story, cancelled_story])
def test_resume_is_refused_unless_the_run_failed_or_was_cancelled(build: Any) -> None:
    story: Story = build()  # RUNNING, with every step terminal or not
    assert_refused(story, ev.RunResumed, "in run state RUNNING")


def test_resume_of_a_succeeded_run_is_refused() -> None:
    story = two_step_story()
    story.ready("a")
    story.succeed("a")
    story.ready("b")
    story.succeed("b")
    story.finish(st.SUCCEEDED)

    assert_refused(story, ev.RunResumed, "in run state SUCCEEDED")


def test_resume_after_failure_resets_failed_and_skipped_steps() -> None:
    story = failed_story()
    story.finish(st.FAILED)
    story.later(60)

    story.emit(ev.RunResumed)

    status = st.run_status(story.run)
    assert status.state == st.RUNNING
    assert status.finished_at is None
    for step in ("a", "b"):
        assert status.steps[step].state == st.PENDING
        assert status.steps[step].error is None
        assert status.steps[step].started_at is None
        assert status.steps[step].finished_at is None
    assert status.steps["a"].attempts == 2  # attempt numbers are never reused
    assert status.steps["a"].exit_code == 1  # still the last attempt's
    assert_refused(story, ev.StepReady, "dependencies not SUCCEEDED", step="b")


def test_running_time_leaves_out_the_time_between_a_failure_and_its_resume() -> None:
    """Issue 14: a resumed run's duration is its running time, and a list that knows the
    run by its first and last events (a Stub) gets the same figure from RunFinished."""
    story = failed_story()  # created at T0, two seconds of attempts
    story.finish(st.FAILED)
    first = st.run_summary(story.run)
    assert (first.run_seconds, first.running_since) == (2.0, None)
    story.later(3600)  # an hour FAILED before anybody resumes it
    story.emit(ev.RunResumed)
    assert st.run_status(story.run).running_since == ev.format_ts(story.now)
    for step in ("a", "b"):
        story.ready(step)
        story.succeed(step)  # one second each
    fields = scheduler._finished_fields(story.run, story.now)
    assert fields == {"state": st.SUCCEEDED, "ran": 4.0}
    story.emit(ev.RunFinished, **fields)
    summary = st.run_summary(story.run)
    assert (summary.run_seconds, summary.running_since) == (4.0, None)


def test_a_run_never_resumed_logs_no_running_time() -> None:
    story = failed_story()
    assert scheduler._finished_fields(story.run, story.now) == {"state": st.FAILED}


def test_resume_gives_a_fresh_retry_budget_and_numbers_go_on() -> None:
    story = failed_story()
    story.finish(st.FAILED)
    story.emit(ev.RunResumed)
    story.ready("a")
    assert_refused(story, ev.AttemptClaimed, "expected 3", step="a", attempt=1)

    attempt = story.claim("a")
    ended = scheduler.outcome(story.run, "a", attempt, 1, now=story.now, rand=0.0)

    assert attempt == 3
    assert ended.kind is ev.AttemptFailed  # one retry left again, as on the first run
    story.emit(ended.kind, **ended.fields)
    story.emit(ev.RetryDue, step="a")
    attempt = story.claim("a")
    assert scheduler.outcome(story.run, "a", attempt, 1, now=story.now,
                             rand=0.0).kind is ev.StepFailed


def test_resume_after_cancel_keeps_succeeded_steps() -> None:
    story = cancelled_story()
    story.finish(st.CANCELLED)
    a_before = st.run_status(story.run).steps["a"]

    story.emit(ev.RunResumed)

    status = st.run_status(story.run)
    assert status.steps["a"] == a_before
    assert status.steps["b"].state == st.PENDING
    assert not story.run.cancelling
    story.ready("b")  # its dependency is still SUCCEEDED
    story.succeed("b")
    assert story.run.steps["b"].attempts == 2
    story.finish(st.SUCCEEDED)
    assert st.run_status(story.run).state == st.SUCCEEDED


def test_resume_can_run_a_skipped_step_once_its_cause_succeeds() -> None:
    story = failed_story()
    story.finish(st.FAILED)
    story.emit(ev.RunResumed)

    story.ready("a")
    story.succeed("a")
    story.ready("b")
    story.succeed("b")
    story.finish(st.SUCCEEDED)

    assert st.run_status(story.run).state == st.SUCCEEDED


# ---- run_if (issue 15) ------------------------------------------------------------------


def backup_story() -> Story:
    """main -> cleanup (run_if done), alert (run_if failed), report (needs main)."""
    return Story(make_workflow(
        make_step("main"),
        make_step("cleanup", "main", run_if="done"),
        make_step("alert", "main", run_if="failed"),
        make_step("report", "main"),
    )).create()


def test_after_a_failure_cleanup_and_alert_are_ready_and_the_rest_skipped() -> None:
    story = backup_story()
    story.ready("main")
    with pytest.raises(IllegalTransition, match="run_if 'done' is not met"):
        st.apply(story.run, story.event(ev.StepReady, step="cleanup"))
    story.fail("main")

    assert dict(story.run.promotable) == {"cleanup": None, "alert": None}
    assert story.run.skippable == {"report": ("main", None)}
    story.emit(ev.StepSkipped, step="report", cause="main")
    for step in ("cleanup", "alert"):
        story.ready(step)
        story.succeed(step)
    # A run whose main step failed is FAILED, though its cleanup and alert succeeded.
    assert story.run.outcome() == st.FAILED
    story.finish(st.FAILED)


def test_after_a_success_the_alert_is_skipped_and_the_run_succeeds() -> None:
    story = backup_story()
    story.ready("main")
    story.succeed("main")

    assert list(story.run.promotable) == ["cleanup", "report"]
    assert story.run.skippable == {"alert": ("main", "no dependency failed")}
    with pytest.raises(IllegalTransition, match="run_if 'failed' is not met"):
        st.apply(story.run, story.event(ev.StepReady, step="alert"))
    story.emit(ev.StepSkipped, step="alert", cause="main", reason="no dependency failed")
    assert st.run_status(story.run).steps["alert"].error == "skipped: no dependency failed"
    for step in ("cleanup", "report"):
        story.ready(step)
        story.succeed(step)
    assert story.run.outcome() == st.SUCCEEDED  # a SKIPPED step does not decide
    story.finish(st.SUCCEEDED)


def test_a_failing_cleanup_fails_the_run() -> None:
    story = backup_story()
    story.ready("main")
    story.succeed("main")
    story.emit(ev.StepSkipped, step="alert", cause="main", reason="no dependency failed")
    story.ready("report")
    story.succeed("report")
    story.ready("cleanup")
    story.fail("cleanup")

    with pytest.raises(IllegalTransition):
        st.apply(story.run, story.event(ev.RunFinished, state=st.SUCCEEDED))
    story.finish(st.FAILED)


def test_an_alert_counts_a_step_skipped_because_of_a_failure_as_failed() -> None:
    story = Story(make_workflow(
        make_step("a"),
        make_step("b", "a"),
        make_step("alert", "b", run_if="failed"),
    )).create()
    story.ready("a")
    story.fail("a")

    # b is skipped because a failed: the alert runs in the same decision.
    assert story.run.skippable == {"b": ("a", None)}
    assert list(story.run.promotable) == ["alert"]


def test_a_step_after_a_skipped_alert_is_skipped_but_not_as_a_failure() -> None:
    story = Story(make_workflow(
        make_step("a"),
        make_step("alert", "a", run_if="failed"),
        make_step("page", "alert"),
        make_step("audit", "page", run_if="failed"),
    )).create()
    story.ready("a")
    story.succeed("a")
    story.emit(ev.StepSkipped, step="alert", cause="a", reason="no dependency failed")

    assert story.run.skippable == {
        "page": ("alert", "dependency 'alert' was skipped"),
        "audit": ("page", "no dependency failed"),
    }


def test_resume_reruns_cleanup_and_alert_steps_also_when_they_succeeded() -> None:
    story = backup_story()
    story.ready("main")
    story.fail("main")
    story.emit(ev.StepSkipped, step="report", cause="main")
    for step in ("cleanup", "alert"):
        story.ready(step)
        story.succeed(step)
    story.finish(st.FAILED)

    story.emit(ev.RunResumed)

    assert {sid: rec.state for sid, rec in story.run.steps.items()} == dict.fromkeys(
        ("main", "cleanup", "alert", "report"), st.PENDING)
    assert story.run.steps["cleanup"].attempts == 1  # attempt numbers go on
    assert list(story.run.promotable) == ["main"]
    story.ready("main")
    story.succeed("main")
    assert story.run.skippable == {"alert": ("main", "no dependency failed")}
    assert snapshot(st.fold(story.run.workflow, story.events)) == snapshot(story.run)


def test_an_old_log_without_run_if_folds_as_before() -> None:
    """A StepSkipped without `reason` (every log before issue 15) is a failure skip."""
    story = failed_story()
    data = b"".join(ev.encode_line(e) for e in story.events)
    assert b'"reason"' not in data

    folded = st.fold(story.run.workflow, ev.json_decoder.decode_lines(data))

    assert folded.steps["b"].error == "skipped: upstream step 'a' failed"
    assert folded.outcome() == st.FAILED


# ---- fold ---------------------------------------------------------------------------


def test_fold_rebuilds_the_live_state() -> None:
    story = failed_story()
    story.finish(st.FAILED)
    story.emit(ev.RunResumed)
    story.ready("a")

    folded = st.fold(story.run.workflow, story.events)

    assert snapshot(folded) == snapshot(story.run)


def test_fold_of_a_stream_with_a_gap_raises() -> None:
    story = failed_story()
    with pytest.raises(IllegalTransition, match="out of sequence"):
        st.fold(story.run.workflow, story.events[:3] + story.events[4:])


def test_fold_through_the_json_lines_gives_the_same_state() -> None:
    story = cancelled_story()
    story.finish(st.CANCELLED)
    data = b"".join(ev.encode_line(e) for e in story.events)

    folded = st.fold(story.run.workflow, ev.json_decoder.decode_lines(data))

    assert msgspec.json.encode(st.run_status(folded)) == story.status_bytes()


# ---- apply never half-applies: random event soup ---------------------------------------


def soup_event(story: Story, kind: type[ev.Event], step: str, attempt_shift: int,
               seq_shift: int) -> ev.Event:
    if kind in STEP_EVENTS:
        fields = step_event_fields(story, kind, step)
        if "attempt" in fields:
            fields["attempt"] += attempt_shift
    elif kind is ev.RunCreated:
        fields = {"run_id": "r1", "name": "wf", "owner": "alice", "owner_uid": 1}
    elif kind is ev.RunFinished:
        fields = {"state": story.run.outcome()}
    elif kind is ev.StepsRetried:
        fields = {"steps": [step]}
    else:
        fields = {}
    return kind(seq=story.run.last_seq + 1 + seq_shift, ts=ev.format_ts(story.now), **fields)


@settings(max_examples=150, deadline=None)
@given(hs.lists(
    hs.tuples(
        hs.sampled_from(STEP_EVENTS + RUN_EVENTS),
        hs.sampled_from(["a", "b", "c"]),
        hs.sampled_from([0, 0, 0, 1, -1]),
        hs.sampled_from([0, 0, 0, 0, 1]),
    ),
    max_size=60,
))
def test_apply_either_changes_the_run_or_nothing(
    moves: list[tuple[type[ev.Event], str, int, int]],
) -> None:
    workflow = make_workflow(make_step("a", retries=1), make_step("b", "a"), make_step("c"))
    story = Story(workflow)
    accepted: list[ev.Event] = []
    for kind, step, attempt_shift, seq_shift in moves:
        event = soup_event(story, kind, step, attempt_shift, seq_shift)
        before = snapshot(story.run)
        try:
            st.apply(story.run, event)
        except IllegalTransition:
            assert snapshot(story.run) == before
            continue
        accepted.append(event)
        assert sum(story.run.counts.values()) == 3
        for state in STEP_STATES:
            assert story.run.counts[state] == sum(
                rec.state == state for rec in story.run.steps.values()
            )
    assert snapshot(st.fold(workflow, accepted)) == snapshot(story.run)


# ---- the views ---------------------------------------------------------------------


def ordered(data: bytes) -> Any:
    """Decoded JSON with objects as lists of (key, value) pairs, so key order shows."""
    return json.loads(data, object_pairs_hook=lambda pairs: pairs)


# SPEC 5's keys in its order, then the ones added since (issue 14: exit_signal, running
# time, waiting_for_resume)
RUN_KEYS = ["run_id", "name", "owner", "state", "created_at", "finished_at", "error", "steps",
            "schedule", "scheduled_at", "vars", "run_seconds", "running_since",
            "waiting_for_resume", "description", "on_exit"]
STEP_KEYS = ["state", "attempts", "exit_code", "started_at", "finished_at", "error",
             "depends_on", "cpu", "max_rss", "containment", "executor", "job_id",
             "outputs", "exit_signal", "pool", "waiting", "description"]
SUMMARY_KEYS = ["run_id", "name", "owner", "state", "created_at", "finished_at", "schedule",
                "scheduled_at", "run_seconds", "running_since", "waiting_for_resume"]


def test_run_status_has_the_spec_5_shape() -> None:
    story = Story(make_workflow(make_step("zeta"), make_step("alpha", "zeta"), make_step("mid")))
    story.create()
    story.ready("zeta")
    story.succeed("zeta")

    pairs = ordered(story.status_bytes())

    assert [key for key, _ in pairs] == RUN_KEYS
    steps = dict(pairs)["steps"]
    assert [sid for sid, _ in steps] == ["zeta", "alpha", "mid"]  # file order
    for _, step in steps:
        assert [key for key, _ in step] == STEP_KEYS


def test_run_status_values() -> None:
    story = Story(make_workflow(make_step("ok"), make_step("killed"),
                                make_step("never", "killed")))
    story.create()
    story.ready("ok")
    story.ready("killed")
    started = ev.format_ts(story.now)
    story.succeed("ok")
    attempt = story.claim("killed")
    story.emit(ev.StepFailed, step="killed", attempt=attempt, exit_code=-9,
               error="killed by SIGKILL", cpu=0.25, max_rss=2048)
    story.emit(ev.StepSkipped, step="never", cause="killed")
    story.later(1)
    story.finish(st.FAILED)

    status = json.loads(story.status_bytes())

    assert status["state"] == st.FAILED
    assert status["error"] is None
    assert RFC3339_US.match(status["created_at"])
    assert RFC3339_US.match(status["finished_at"])
    assert status["steps"]["ok"] == {
        "state": "SUCCEEDED", "attempts": 1, "exit_code": 0, "started_at": started,
        "finished_at": ev.format_ts(T0 + 1), "error": None, "exit_signal": None,
        "depends_on": [],
        "cpu": None, "max_rss": None, "containment": None,
        "executor": None, "job_id": None, "outputs": {}, "pool": None, "waiting": None,
        "description": "",
    }
    assert status["steps"]["never"] == {
        "state": "SKIPPED", "attempts": 0, "exit_code": None, "started_at": None,
        "finished_at": ev.format_ts(T0 + 1), "error": "skipped: upstream step 'killed' failed",
        "depends_on": ["killed"], "cpu": None, "max_rss": None, "containment": None,
        "executor": None, "job_id": None, "outputs": {}, "exit_signal": None, "pool": None,
        "waiting": None, "description": "",
    }
    assert status["steps"]["killed"]["exit_code"] == -9
    assert status["steps"]["killed"]["error"] == "killed by SIGKILL"
    assert status["steps"]["killed"]["exit_signal"] == "SIGKILL"
    assert status["steps"]["killed"]["attempts"] == 1
    assert (status["steps"]["killed"]["cpu"], status["steps"]["killed"]["max_rss"]) == (0.25, 2048)


def test_started_at_is_the_first_attempt_and_finished_at_the_last() -> None:
    story, _ = reach(st.READY)
    first = ev.format_ts(story.now)
    story.fail_once("a")
    story.later(5)
    story.emit(ev.RetryDue, step="a")
    story.succeed("a")

    status = st.run_status(story.run).steps["a"]

    assert status.started_at == first
    assert status.finished_at == ev.format_ts(story.now)
    assert (status.attempts, status.exit_code, status.error) == (2, 0, None)


def test_finished_at_is_set_only_when_the_step_ends() -> None:
    story, _ = reach(st.READY)
    seen = [st.run_status(story.run).steps["a"].finished_at]
    story.claim("a")
    seen.append(st.run_status(story.run).steps["a"].finished_at)
    story.emit(ev.AttemptFailed, step="a", attempt=1, exit_code=1, error="x",
               retry_at=ev.format_ts(T0 + 10))
    seen.append(st.run_status(story.run).steps["a"].finished_at)
    story.emit(ev.RetryDue, step="a")
    seen.append(st.run_status(story.run).steps["a"].finished_at)

    assert seen == [None, None, None, None]


def test_run_summary_has_the_spec_5_shape() -> None:
    story = two_step_story()
    pairs = ordered(msgspec.json.encode(st.run_summary(story.run)))
    assert [key for key, _ in pairs] == SUMMARY_KEYS
    assert dict(pairs)["state"] == st.RUNNING


@pytest.mark.parametrize("kind", STEP_EVENTS + RUN_EVENTS)
def test_every_event_type_has_a_description(kind: type[ev.Event]) -> None:
    story, _ = reach(st.RUNNING)
    if kind in STEP_EVENTS:
        fields = step_event_fields(story, kind, "a")
    elif kind is ev.RunCreated:
        fields = {"run_id": "r1", "name": "wf", "owner": "alice", "owner_uid": 1}
    elif kind is ev.RunFinished:
        fields = {"state": st.SUCCEEDED}
    elif kind is ev.StepsRetried:
        fields = {"steps": ["a", "b"]}
    else:
        fields = {}
    text = st.describe(story.event(kind, **fields))
    assert text and text != kind.__name__


# ---- StepsRetried (wfctl retry) ----------------------------------------------------------


def chain_story() -> Story:
    """a -> b -> c, and d alone; a and d succeed, b fails, c is skipped; FAILED."""
    story = Story(make_workflow(make_step("a"), make_step("b", "a"), make_step("c", "b"),
                                make_step("d"))).create()
    story.ready("a")
    story.ready("d")
    story.succeed("a")
    story.succeed("d")
    story.ready("b")
    story.fail("b")
    story.emit(ev.StepSkipped, step="c", cause="b")
    story.finish(st.FAILED)
    return story


def test_retry_reruns_the_named_steps_and_keeps_the_others() -> None:
    story = chain_story()
    story.later(60)
    story.emit(ev.StepsRetried, steps=["b", "c"])
    assert story.run.state == st.RUNNING
    assert [story.state_of(s) for s in "abcd"] == [st.SUCCEEDED, st.PENDING, st.PENDING,
                                                  st.SUCCEEDED]
    assert list(story.run.promotable) == ["b"]  # c waits for b; a is not rerun
    assert story.run.steps["b"].error is None and story.run.steps["b"].failures == 0
    story.ready("b")
    assert story.claim("b") == 2  # attempt numbers go on
    story.emit(ev.AttemptSucceeded, step="b", attempt=2)
    story.ready("c")
    story.succeed("c")
    story.finish(st.SUCCEEDED)
    assert st.run_status(story.run).state == st.SUCCEEDED


def test_retry_of_a_succeeded_step_and_what_follows() -> None:
    story = chain_story()
    story.emit(ev.StepsRetried, steps=st.downstream(story.run, ["a"]))
    assert [story.state_of(s) for s in "abcd"] == [st.PENDING, st.PENDING, st.PENDING,
                                                  st.SUCCEEDED]
    assert st.downstream(story.run, ["b"]) == ["b", "c"]
    assert st.downstream(story.run, ["d", "a"]) == ["a", "b", "c", "d"]


def test_retry_of_a_succeeded_step_alone_leaves_the_ones_after_it_as_they_were() -> None:
    story = Story(make_workflow(make_step("a"), make_step("b", "a"))).create()
    story.ready("a")
    story.succeed("a")
    story.ready("b")
    story.succeed("b")
    story.finish(st.SUCCEEDED)
    story.emit(ev.StepsRetried, steps=["a"])
    assert list(story.run.promotable) == ["a"]
    story.ready("a")
    story.succeed("a")
    assert story.state_of("b") == st.SUCCEEDED and story.run.steps["b"].attempts == 1
    assert not story.run.promotable  # b is not run again
    story.finish(st.SUCCEEDED)
    story.emit(ev.StepsRetried, steps=["b"])  # and a later retry of b counts afresh
    story.ready("b")
    story.succeed("b")
    story.finish(st.SUCCEEDED)
    assert story.run.steps["b"].attempts == 2


@pytest.mark.parametrize(("steps", "words"), [
    (["c"], "depends on 'b', which is FAILED"),
    (["zz"], "has no step 'zz'"),
    ([], "no step named"),
])
def test_retry_refusals(steps: list[str], words: str) -> None:
    assert_refused(chain_story(), ev.StepsRetried, words, steps=steps)


def test_retry_of_a_running_run_is_refused() -> None:
    story, _ = reach(st.RUNNING)
    assert_refused(story, ev.StepsRetried, "only a finished run", steps=["a"])
# ---- on_exit steps and a run's timeout (issue 15) ----------------------------------------


def exit_story() -> Story:
    """main, then on_exit: notify (any end) and page (FAILED or CANCELLED only)."""
    return Story(build_workflow("wf", None, {}, (make_step("main"),), on_exit=(
        Step(id="notify", command="true", when=("SUCCEEDED", "FAILED", "CANCELLED")),
        Step(id="page", command="true", when=("FAILED", "CANCELLED")),
    ))).create()


def test_on_exit_steps_wait_for_the_main_steps_and_follow_when() -> None:
    story = exit_story()
    assert list(story.run.promotable) == ["main"]
    with pytest.raises(IllegalTransition, match="an on_exit step"):
        st.apply(story.run, story.event(ev.StepReady, step="notify"))
    story.ready("main")
    story.succeed("main")

    assert list(story.run.promotable) == ["notify"]
    assert story.run.skippable == {
        "page": ("", "the run is SUCCEEDED; on_exit when FAILED, CANCELLED")}
    # The outcome is fixed: a cancel now is illegal (the on_exit steps may have seen it).
    assert not story.run.cancellable()
    with pytest.raises(IllegalTransition, match="with every main step ended"):
        st.apply(story.run, story.event(ev.RunCancelRequested))
    story.ready("notify")
    story.fail("notify")  # a failing on_exit step changes nothing
    story.emit(ev.StepSkipped, step="page", cause="",
               reason="the run is SUCCEEDED; on_exit when FAILED, CANCELLED")
    assert story.run.outcome() == st.SUCCEEDED
    story.finish(st.SUCCEEDED)
    status = st.run_status(story.run)
    assert list(status.steps) == ["main"]
    assert {sid: s.state for sid, s in status.on_exit.items()} == {
        "notify": st.FAILED, "page": st.SKIPPED}


def test_on_exit_steps_run_after_a_cancel_and_the_run_is_cancelled() -> None:
    story = exit_story()
    story.ready("main")
    attempt = story.claim("main")
    story.emit(ev.RunCancelRequested, reason="run timed out after 5 s")
    assert st.run_status(story.run).error == "run timed out after 5 s"
    assert story.run.stops(story.run.steps["main"])
    assert not story.run.stops(story.run.steps["notify"])
    story.emit(ev.StepCancelled, step="main", attempt=attempt, exit_code=-15)

    assert list(story.run.promotable) == ["notify", "page"]
    for step in ("notify", "page"):
        story.ready(step)
        story.succeed(step)  # claimed after the cancel: legal for an on_exit step
    with pytest.raises(IllegalTransition):
        st.apply(story.run, story.event(ev.RunFinished, state=st.SUCCEEDED))
    story.finish(st.CANCELLED)
    assert snapshot(st.fold(story.run.workflow, story.events)) == snapshot(story.run)

    story.emit(ev.RunResumed)  # a resume runs them again once the run ends again
    assert {sid: rec.state for sid, rec in story.run.steps.items()} == dict.fromkeys(
        ("main", "notify", "page"), st.PENDING)
    assert st.run_status(story.run).error is None


def test_a_cancel_between_the_last_step_and_run_finished_still_folds_without_on_exit() -> None:
    """Logs written before issue 15 may hold one: the run is then CANCELLED."""
    story = Story(make_workflow(make_step("a"))).create()
    story.ready("a")
    story.succeed("a")
    story.emit(ev.RunCancelRequested)
    story.finish(st.CANCELLED)
