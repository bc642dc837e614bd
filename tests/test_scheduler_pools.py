"""Pools in the pure scheduler: the simulator of test_scheduler over random DAGs whose
steps name shared pools, plus small scripted cases (a full pool, a raised limit, a
lowered one, a pool the daemon does not know).

`PoolSim` checks, besides everything `Sim` checks, that no step starts in a pool at
or over its limit, that (while no limit was lowered) a pool never has more running
steps than its limit, and that fairness is the rule of test_scheduler with "can
start" meaning "has a READY step whose pool, if any, has room"."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import hypothesis
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_scheduler import (
    OWNER,
    Fleet,
    Sim,
    bound_for,
    check_ending,
    check_refold,
    first,
    hypothesis_chooser,
    independent,
    make_step,
    make_workflow,
)

from wfd import events as ev
from wfd import state as st
from wfd.scheduler import Start
from wfd.workflow import Step, Workflow

POOLS = ("db", "net")


@dataclass
class PoolSim(Sim):
    pools: dict[str, int] = field(default_factory=dict)
    # advance number -> (pool, new limit), applied after that advance
    pool_changes: dict[int, tuple[str, int]] = field(default_factory=dict)
    lowered: bool = False
    peak: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__post_init__()
        for pool, limit in self.pools.items():
            self.sched.set_pool(pool, limit)

    def in_pool(self, pool: str) -> int:
        return sum(rec.state == st.RUNNING and rec.pool == pool
                   for run in self.runs.values() for rec in run.steps.values())

    def has_room(self, pool: str | None) -> bool:
        return pool is None or self.in_pool(pool) < self.pools.get(pool, 0)

    def check_slots(self) -> None:
        super().check_slots()
        for pool in POOLS:
            running = self.in_pool(pool)
            self.peak[pool] = max(self.peak[pool], running)
            if not self.lowered:
                assert running <= self.pools.get(pool, 0), f"{running} running in {pool}"

    def first_startable(self, run: st.RunState) -> str | None:
        return next((s for s in run.ready if self.has_room(run.steps[s].pool)), None)

    def startable(self) -> dict[int, list[str]]:
        found = super().startable()
        for uid in list(found):
            found[uid] = [r for r in found[uid] if self.first_startable(self.runs[r])]
            if not found[uid]:
                del found[uid]
        return found

    def check_fair(self, action: Start) -> None:
        # Sim's rule, except the step: the first READY one that can start, not the first.
        run = self.runs[action.run_id]
        pool = run.steps[action.step].pool
        assert self.has_room(pool), f"{action.step} started in full pool {pool}"
        assert action.step == self.first_startable(run)
        ready, run.ready = run.ready, {action.step: None, **run.ready}
        try:
            super().check_fair(action)
        finally:
            run.ready = ready

    def advance(self, wake_at: float | None) -> None:
        super().advance(wake_at)
        change = self.pool_changes.get(self.advances)
        if change is not None:
            pool, limit = change
            self.lowered = self.lowered or limit < self.pools.get(pool, 0)
            self.pools[pool] = limit
            self.sched.set_pool(pool, limit)


@hs.composite
def pooled_workflows(draw: hs.DrawFn, max_steps: int = 10) -> Workflow:
    n = draw(hs.integers(1, max_steps))
    steps: list[Step] = []
    for i in range(n):
        deps = draw(hs.lists(hs.integers(0, i - 1), unique=True, max_size=3)) if i else []
        step = make_step(f"s{i}", *(f"s{d}" for d in deps), retries=draw(hs.integers(0, 1)),
                         timeout=draw(hs.sampled_from([None, None, 2.5])))
        pool = draw(hs.sampled_from([None, "db", "db", "net"]))
        steps.append(Step(**{**{f: getattr(step, f) for f in step.__struct_fields__},
                             "pool": pool}))
    return make_workflow(*steps, max_parallel=draw(hs.none() | hs.integers(1, 4)))


@hs.composite
def pooled_fleets(draw: hs.DrawFn) -> tuple[dict[str, Workflow], dict[str, int]]:
    """One to four runs of one or two users."""
    fleet, owners = {}, {}
    for i in range(draw(hs.integers(1, 4))):
        fleet[f"r{i}"] = draw(pooled_workflows())
        owners[f"r{i}"] = draw(hs.sampled_from([OWNER, OWNER + 1]))
    return fleet, owners


@settings(max_examples=150, deadline=None)
@given(shared=pooled_fleets(), limit=hs.integers(1, 5), db=hs.integers(1, 3),
       net=hs.integers(1, 2), data=hs.data())
def test_random_pooled_runs_never_exceed_a_pool_and_end_as_their_dags_say(
    shared: tuple[dict[str, Workflow], dict[str, int]], limit: int, db: int, net: int,
    data: hs.DataObject,
) -> None:
    fleet, owners = shared
    sim = PoolSim(fleet, limit, hypothesis_chooser(data), owners=owners,
                  pools={"db": db, "net": net})

    sim.run(bound_for(fleet))

    for run_id in fleet:
        check_ending(sim, run_id)
        check_refold(sim, run_id)
    hypothesis.event(f"db at its limit: {sim.peak['db'] == db}")


@settings(max_examples=100, deadline=None)
@given(shared=pooled_fleets(), db=hs.integers(1, 3), new=hs.integers(1, 4),
       when=hs.integers(1, 6), data=hs.data())
def test_a_pool_limit_changed_while_runs_wait_is_followed(
    shared: tuple[dict[str, Workflow], dict[str, int]], db: int, new: int, when: int,
    data: hs.DataObject,
) -> None:
    """Raised: waiting steps start at once (Sim checks no slot stays idle while a step
    could start). Lowered: no step is stopped, none starts while the pool is full."""
    fleet, owners = shared
    sim = PoolSim(fleet, 6, hypothesis_chooser(data), owners=owners,
                  pools={"db": db, "net": 1}, pool_changes={when: ("db", new)})

    sim.run(bound_for(fleet))

    for run_id in fleet:
        check_ending(sim, run_id)
        check_refold(sim, run_id)


def db_workflow(n: int, prefix: str = "s", pool: str = "db") -> Workflow:
    return make_workflow(*(Step(id=f"{prefix}{i}", command="true", pool=pool)
                           for i in range(n)))


def decide_now(sim: Sim) -> list:
    return sim.sched.decide(sim.now).actions


def end(sim: Sim, run_id: str, step: str) -> None:
    attempt = sim.attempts.pop((run_id, step))
    sim.emit(run_id, ev.AttemptSucceeded, step=step, attempt=attempt.number)


def settle(sim: Sim) -> None:
    """Decide and act until a decision does nothing."""
    while sim.act(decide_now(sim)):
        pass


def test_two_runs_share_one_slot_and_take_turns() -> None:
    fleet = {"a": db_workflow(2), "b": db_workflow(2)}
    sim = PoolSim(fleet, 4, first, owners={"a": 1001, "b": 1002}, pools={"db": 1})

    settle(sim)
    assert sim.starts == [("a", "s0")]
    end(sim, "a", "s0")
    settle(sim)
    assert sim.starts[1:] == [("b", "s0")]  # b waited longest
    end(sim, "b", "s0")
    settle(sim)
    assert sim.starts[2:] == [("a", "s1")]


def test_steps_without_the_pool_pass_those_waiting_for_it() -> None:
    steps = [Step(id="d0", command="true", pool="db"), Step(id="d1", command="true", pool="db"),
             Step(id="free", command="true")]
    sim = PoolSim({"r": make_workflow(*steps)}, 4, first, pools={"db": 1})

    settle(sim)

    assert sim.starts == [("r", "d0"), ("r", "free")]
    assert sim.runs["r"].steps["d1"].state == st.READY


def test_a_raised_limit_starts_waiting_steps_at_the_next_decision() -> None:
    sim = PoolSim({"a": db_workflow(3), "b": db_workflow(3)}, 10, first, pools={"db": 0})
    settle(sim)
    assert sim.starts == []

    sim.sched.set_pool("db", 3)
    sim.pools["db"] = 3
    settle(sim)

    assert sim.starts == [("a", "s0"), ("b", "s0"), ("a", "s1")]


def test_a_lowered_limit_stops_nothing_and_starts_nothing_until_under_it() -> None:
    sim = PoolSim({"a": db_workflow(4)}, 10, first, pools={"db": 3})
    settle(sim)
    assert len(sim.starts) == 3
    sim.sched.set_pool("db", 1)
    sim.pools["db"] = 1
    sim.lowered = True

    end(sim, "a", "s0")
    settle(sim)
    assert len(sim.starts) == 3  # two still run: over the new limit
    end(sim, "a", "s1")
    end(sim, "a", "s2")
    settle(sim)
    assert sim.starts[3:] == [("a", "s3")]


def test_a_pool_the_daemon_does_not_know_has_no_slot() -> None:
    sim = PoolSim({"a": db_workflow(1, pool="nosuch")}, 4, first)

    settle(sim)

    assert sim.starts == []
    assert sim.sched.pool_full("nosuch")
    assert sim.runs["a"].steps["s0"].state == st.READY


def test_a_waiting_run_is_woken_when_the_holder_finishes_and_is_dropped() -> None:
    sim = PoolSim({"a": db_workflow(1), "b": db_workflow(1)}, 4, first, pools={"db": 1})
    settle(sim)
    assert sim.starts == [("a", "s0")]

    end(sim, "a", "s0")  # a's RunFinished comes next; b starts from the same decision loop
    settle(sim)

    assert sim.starts[1:] == [("b", "s0")]
    assert sim.sched.pool_running("db") == 1


def test_fold_keeps_pool_counts_in_step_with_states() -> None:
    wf = make_workflow(Step(id="a", command="true", pool="db"),
                       Step(id="b", command="true", pool="db", depends_on=("a",)))
    sim = PoolSim({"r": wf}, 2, first, pools={"db": 1})
    settle(sim)
    run = sim.runs["r"]
    assert run.pool_ready == {"db": 0} and run.pool_running == {"db": 1}

    folded = st.fold(wf, sim.streams["r"])

    assert folded.pool_running == run.pool_running and folded.pool_ready == run.pool_ready


def test_runs_waiting_for_a_full_pool_cost_their_users_not_their_number() -> None:
    """3,000 runs of 7 users wait for a pool of one slot: while it is held, the steps of
    another run end and start, and each decision looks at a handful of runs, not at
    every waiter; each time the slot frees, the wake looks at about one run per waiting
    user, and the next in line (round-robin across users) starts."""
    fleet = Fleet(limit=8)
    fleet.sched.set_pool("db", 1)
    for i in range(3000):
        fleet.submit(f"r{i:04d}", 1000 + i % 7, db_workflow(1))
    fleet.submit("free", 999, independent(6))
    assert sorted(fleet.settle()) == ["free"] * 6 + ["r0000"]

    for n in range(6):
        fleet.runs.seen.clear()
        fleet.succeed("free", f"s{n}")
        fleet.settle()
        assert len(fleet.runs.seen) < 10, len(fleet.runs.seen)

    for n in range(1, 30):
        fleet.runs.seen.clear()
        fleet.succeed(f"r{n - 1:04d}")
        assert fleet.settle() == [f"r{n:04d}"]  # users 1000..1006 in turn, runs in order
        assert len(fleet.runs.seen) < 40, len(fleet.runs.seen)
