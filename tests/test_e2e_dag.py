"""Dependency order and parallelism through the real daemon (SPEC 1 `depends_on`,
`max_parallel`; SPEC 2; SPEC 4 `--max-parallel`).

Steps stamp `NAME start|end TIME` into a shared file with `date +%s.%N`; a
stamp written inside the step lies within the daemon's own start and end of it,
so an overlap of stamps proves real parallelism, and the maximum overlap of
stamps is a lower bound of the daemon's, so `<= limit` is sound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, replay_events, run_json, wait_for_state, write_workflow


def stamped(name: str, stamps: Path, sleep: float) -> str:
    """A shell command that stamps its start, sleeps, and stamps its end."""
    return (f'echo "{name} start $(date +%s.%N)" >> {stamps}; sleep {sleep}; '
            f'echo "{name} end $(date +%s.%N)" >> {stamps}')


def read_stamps(path: Path) -> dict[str, tuple[float, float]]:
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in path.read_text().splitlines():
        name, what, when = line.split()
        (starts if what == "start" else ends)[name] = float(when)
    assert starts.keys() == ends.keys(), path.read_text()
    return {name: (starts[name], ends[name]) for name in starts}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                    key=lambda p: (p[0], p[1]))  # an end before a start at the same instant
    best = now = 0
    for _, delta in points:
        now += delta
        best = max(best, now)
    return best



def seq_of(events: list[dict], type_: str, step: str) -> int:
    [seq] = [e["seq"] for e in events if e["type"] == type_ and e.get("step") == step]
    return seq


def test_diamond_order_and_parallel_middle(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    stamps = wfd_tmp / "stamps"
    wf = write_workflow(wfd_tmp, {"name": "diamond", "steps": [
        {"id": "d", "command": stamped("d", stamps, 0), "depends_on": ["b", "c"]},
        {"id": "b", "command": stamped("b", stamps, 0.6), "depends_on": ["a"]},
        {"id": "c", "command": stamped("c", stamps, 0.6), "depends_on": ["a"]},
        {"id": "a", "command": stamped("a", stamps, 0.2)},
    ]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    status = run_json(d, run_id)
    assert status["state"] == "SUCCEEDED"
    assert list(status["steps"]) == ["d", "b", "c", "a"]  # file order
    assert all(s["state"] == "SUCCEEDED" and s["attempts"] == 1 for s in status["steps"].values())

    t = read_stamps(stamps)
    assert t["b"][0] >= t["a"][1] and t["c"][0] >= t["a"][1], t
    assert t["d"][0] >= max(t["b"][1], t["c"][1]), t
    # b and c really ran at the same time
    assert t["b"][0] < t["c"][1] and t["c"][0] < t["b"][1], t

    events = replay_events(d, run_id)
    a_done = seq_of(events, "AttemptSucceeded", "a")
    for step in ("b", "c"):
        assert seq_of(events, "StepReady", step) > a_done
        assert seq_of(events, "AttemptClaimed", step) > a_done
    assert seq_of(events, "AttemptClaimed", "d") > max(
        seq_of(events, "AttemptSucceeded", "b"), seq_of(events, "AttemptSucceeded", "c"))
    # both middle steps were claimed before either finished: they overlapped
    assert max(seq_of(events, "AttemptClaimed", "b"), seq_of(events, "AttemptClaimed", "c")) < \
        min(seq_of(events, "AttemptSucceeded", "b"), seq_of(events, "AttemptSucceeded", "c"))


def test_dependency_success_is_durable_before_the_dependent_starts(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    d = daemon()
    # the dependent step looks for its upstream's success in the log on disk
    check = (f'grep -q \'"type":"AttemptSucceeded".*"step":"up"\' '
             f'{d.state_dir}/runs/"$WFD_RUN_ID"/events.jsonl')
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "up", "command": "true"},
        {"id": "down", "command": check, "depends_on": ["up"]},
    ]})
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"


def test_two_sleeps_overlap(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    stamps = wfd_tmp / "stamps"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "x", "command": stamped("x", stamps, 0.8)},
        {"id": "y", "command": stamped("y", stamps, 0.8)},
    ]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    t = read_stamps(stamps)
    assert max_overlap(list(t.values())) == 2, t  # each started before the other ended


def test_run_max_parallel_is_respected(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    stamps = wfd_tmp / "stamps"
    wf = write_workflow(wfd_tmp, {"max_parallel": 2, "steps": [
        {"id": f"s{i}", "command": stamped(f"s{i}", stamps, 0.3)} for i in range(6)
    ]})
    d = daemon(max_parallel=8)
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    t = read_stamps(stamps)
    assert len(t) == 6
    assert max_overlap(list(t.values())) <= 2, t
    assert max_overlap(list(t.values())) == 2, t  # the limit is used, not just obeyed


def test_max_parallel_one_runs_in_file_order(daemon: Callable[..., Daemon],
                                             wfd_tmp: Path) -> None:
    stamps = wfd_tmp / "stamps"
    names = ["q", "c", "m", "a"]
    wf = write_workflow(wfd_tmp, {"max_parallel": 1, "steps": [
        {"id": n, "command": stamped(n, stamps, 0)} for n in names
    ]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    t = read_stamps(stamps)
    assert sorted(t, key=lambda n: t[n][0]) == names, t
    assert max_overlap(list(t.values())) == 1, t


def test_daemon_max_parallel_across_runs(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    stamps = wfd_tmp / "stamps"
    go = wfd_tmp / "go"
    # A first run holds both global slots until the other two runs are submitted.
    blocker = write_workflow(wfd_tmp, {"name": "blocker", "steps": [
        {"id": f"z{i}", "command": f"while [ ! -e {go} ]; do sleep 0.05; done; "
                                   + stamped(f"zz{i}", stamps, 0)}
        for i in range(2)
    ]}, "blocker.json")
    wfs = [
        write_workflow(wfd_tmp, {"name": f"r{r}", "steps": [
            {"id": f"s{i}", "command": stamped(f"r{r}s{i}", stamps, 0.4)} for i in range(3)
        ]}, f"r{r}.json")
        for r in range(2)
    ]
    d = daemon(max_parallel=2)
    blocker_id = d.submit(blocker)
    run_ids = [d.submit(wf) for wf in wfs]
    for run_id in run_ids:
        steps = run_json(d, run_id)["steps"]
        assert all(s["state"] in ("PENDING", "READY") for s in steps.values()), steps
    go.touch()
    for run_id in [blocker_id, *run_ids]:
        assert wait_for_state(d, run_id, "SUCCEEDED", "FAILED")["state"] == "SUCCEEDED"
    t = read_stamps(stamps)
    assert len(t) == 8
    work = {n: v for n, v in t.items() if n.startswith("r")}
    assert max_overlap(list(work.values())) <= 2, t
    assert max_overlap(list(work.values())) == 2, t
    # READY steps start round-robin across runs: the first two freed slots went one to each
    first_two = sorted(work, key=lambda n: work[n][0])[:2]
    assert {n[:2] for n in first_two} == {"r0", "r1"}, t
