"""The QUEUED run state in the pure core (issue 15): RunCreated(queued) and RunDequeued
through the fold and RUN_TRANSITIONS, and `scheduler.admissions`, the one-at-a-time
rule; then the simulator of test_scheduler over random DAGs submitted under a
concurrency limit: never more unfinished non-QUEUED runs than the limit, dequeued in
submit order, every run ends as its DAG says, and each log folds to the live state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_scheduler import (
    OWNER,
    Sim,
    bound_for,
    check_ending,
    check_refold,
    hypothesis_chooser,
    make_step,
    make_workflow,
    workflows,
)
from test_state import Story

from wfd import events as ev
from wfd import state as st
from wfd.errors import IllegalTransition
from wfd.scheduler import Emit, Kill, Scheduler, Start, admissions


def queued_story() -> Story:
    story = Story(make_workflow(make_step("a"), make_step("b", "a"), make_step("c")))
    story.emit(ev.RunCreated, run_id="r1", name="wf", owner="alice", owner_uid=1000,
               concurrency=1, queued=True)
    return story


def test_a_queued_run_waits_with_every_step_pending() -> None:
    story = queued_story()

    assert story.run.state == st.QUEUED and not story.run.finished
    assert not story.run.promotable
    assert story.run.concurrency == 1 and story.run.queue_key == "wf"
    for kind, fields in [(ev.StepReady, {"step": "a"}),
                         (ev.RunResumed, {}), (ev.RunFinished, {"state": st.SUCCEEDED})]:
        with pytest.raises(IllegalTransition, match="QUEUED"):
            st.apply(story.run, story.event(kind, **fields))


def test_dequeued_it_runs_as_if_just_created() -> None:
    story = queued_story()
    story.later(5)

    story.emit(ev.RunDequeued)

    assert story.run.state == st.RUNNING
    assert list(story.run.promotable) == ["a", "c"]
    assert story.run.running_since == ev.format_ts(story.now)
    with pytest.raises(IllegalTransition, match="in run state RUNNING"):
        st.apply(story.run, story.event(ev.RunDequeued))


def test_a_cancelled_queued_run_ends_cancelled_and_cannot_be_dequeued() -> None:
    story = queued_story()
    story.emit(ev.RunCancelRequested)
    with pytest.raises(IllegalTransition, match="cancelled"):
        st.apply(story.run, story.event(ev.RunDequeued))
    for step in ("a", "b", "c"):
        story.emit(ev.StepCancelled, step=step)

    story.emit(ev.RunFinished, state=st.CANCELLED, ran=0.0)

    assert story.run.state == st.CANCELLED
    assert st.fold(story.run.workflow, story.events).state == st.CANCELLED


def test_every_run_event_in_every_run_state_is_in_the_table_or_refused() -> None:
    """RUN_TRANSITIONS is the whole truth for the run events it names."""
    for state in st.RUN_STATES:
        for kind in (ev.RunDequeued, ev.RunCancelRequested, ev.RunResumed):
            story = queued_story()
            story.run.state = state  # only the run-level table is under test here
            event = story.event(kind)
            if (state, kind) in st.RUN_TRANSITIONS:
                continue
            with pytest.raises(IllegalTransition):
                st.apply(story.run, event)


def run_in(state: str, run_id: str, concurrency: int | None = 1,
           cancelling: bool = False) -> st.RunState:
    run = st.RunState(make_workflow(make_step("a")))
    run.run_id, run.state, run.concurrency, run.cancelling = run_id, state, concurrency, \
        cancelling
    return run


def test_admissions_start_the_oldest_while_the_limit_allows() -> None:
    runs = [run_in(st.QUEUED, "r3", 2), run_in(st.RUNNING, "r1", 2),
            run_in(st.QUEUED, "r2", 2), run_in(st.QUEUED, "r4", 2)]
    assert admissions(runs, {"r2", "r3", "r4"}) == ["r2"]
    assert admissions(runs[:1] + runs[2:], {"r2", "r3", "r4"}) == ["r2", "r3"]
    # a QUEUED run not in line (left for a resume) neither starts nor holds a slot
    assert admissions(runs, {"r3", "r4"}) == ["r3"]
    # a cancelled one is being ended, not started
    assert admissions([run_in(st.QUEUED, "r1", cancelling=True)], {"r1"}) == []
    # the head's own limit decides, and nobody passes it
    assert admissions([run_in(st.RUNNING, "r0", 1), run_in(st.QUEUED, "r1", 1),
                       run_in(st.QUEUED, "r2", 5)], {"r1", "r2"}) == []


# ---- the simulator: runs submitted under a concurrency limit ------------------------


@dataclass
class QueueSim(Sim):
    """Every run is one owner's with the same name, submitted in id order under
    `concurrency`: the first ones start, the rest are QUEUED; each RunFinished admits
    (`admissions`) as the engine does."""

    concurrency: int = 1
    dequeued: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sched = Scheduler(self.runs, self.limit, self.per_user)
        for i, (run_id, workflow) in enumerate(self.workflows.items()):
            self.runs[run_id] = st.RunState(workflow)
            self.streams[run_id] = []
            uid = self.owners.setdefault(run_id, OWNER)
            queued = i >= self.concurrency  # the engine's `_busy`: the limit is reached
            self.emit(run_id, ev.RunCreated, run_id=run_id, name=workflow.name,
                      owner=f"u{uid}", owner_uid=uid, concurrency=self.concurrency,
                      queued=queued)
            if not queued:
                self.drive(run_id)

    def emit(self, run_id: str, kind: type[ev.Event], /, **fields: Any) -> ev.Event:
        event = super().emit(run_id, kind, **fields)
        busy = sum(not run.finished and run.state != st.QUEUED for run in self.runs.values())
        assert busy <= self.concurrency, f"{busy} runs at once, concurrency {self.concurrency}"
        return event

    def act(self, actions: list[Emit | Start | Kill]) -> bool:
        recorded = super().act(actions)
        if any(isinstance(a, Emit) and a.kind is ev.RunFinished for a in actions):
            unfinished = [run for run in self.runs.values() if not run.finished]
            for run_id in admissions(unfinished, self.runs.keys()):
                self.emit(run_id, ev.RunDequeued)
                self.dequeued.append(run_id)
                self.drive(run_id)
                recorded = True
        return recorded


@settings(max_examples=80, deadline=None)
@given(fleet=hs.lists(workflows(6), min_size=1, max_size=5), concurrency=hs.integers(1, 3),
       limit=hs.integers(1, 4), data=hs.data())
def test_random_runs_under_a_concurrency_limit_take_turns_in_submit_order(
        fleet: list, concurrency: int, limit: int, data: hs.DataObject) -> None:
    runs = {f"r{i}": wf for i, wf in enumerate(fleet)}
    sim = QueueSim(runs, limit, hypothesis_chooser(data), concurrency=concurrency)

    sim.run(bound_for(runs) + 10 * len(runs))

    assert sim.dequeued == sorted(sim.dequeued)  # submit order
    assert sim.dequeued == [f"r{i}" for i in range(concurrency, len(runs))]
    for run_id in runs:
        check_ending(sim, run_id)
        check_refold(sim, run_id)
        assert sim.owners[run_id] == OWNER
