"""What a freed pool slot costs the pure scheduler when thousands of runs wait for it.

Run: `python bench/bench_pools.py [--runs N] [--users U] [--slots S]`.

N one-step runs of U users all name pool `db` of one slot (the global limit is 8).
The bench ends the running step S times and times each decision that starts the
next run: the scheduler wakes one waiting run per waiting user, not every waiter
(wfd/scheduler.py, "Pools"). Prints the mean milliseconds per freed slot.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wfd import events as ev  # noqa: E402
from wfd import state as st  # noqa: E402
from wfd.scheduler import Emit, Scheduler, Start  # noqa: E402
from wfd.workflow import Step, build_workflow  # noqa: E402

T0 = 1_800_000_000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--users", type=int, default=7)
    parser.add_argument("--slots", type=int, default=200)
    args = parser.parse_args()
    runs: dict[str, st.RunState] = {}
    sched = Scheduler(runs, 8, pools={"db": 1})
    workflow = build_workflow("wf", None, {}, (Step(id="s0", command="true", pool="db"),))

    def apply(run_id: str, kind: type[ev.Event], /, **fields: object) -> None:
        run = runs[run_id]
        st.apply(run, kind(seq=run.last_seq + 1, ts=ev.format_ts(T0), **fields))
        sched.touch(run_id)

    def settle() -> list[str]:
        started = []
        while actions := sched.decide(T0).actions:
            for action in actions:
                if isinstance(action, Start):
                    apply(action.run_id, ev.AttemptClaimed, step=action.step,
                          attempt=action.attempt)
                    started.append(action.run_id)
                elif isinstance(action, Emit):
                    apply(action.run_id, action.kind, **action.fields)
                    if action.kind is ev.RunFinished:
                        sched.drop(action.run_id)
        return started

    for i in range(args.runs):
        run_id = f"r{i:06d}"
        runs[run_id] = st.RunState(workflow)
        uid = 1000 + i % args.users
        apply(run_id, ev.RunCreated, run_id=run_id, name="wf", owner=f"u{uid}", owner_uid=uid)
        sched.drive(run_id)
    running = settle()
    took = 0.0
    for _ in range(min(args.slots, args.runs - 1)):
        apply(running[-1], ev.AttemptSucceeded, step="s0", attempt=1)
        start = time.perf_counter()
        running = settle()
        took += time.perf_counter() - start
        assert len(running) == 1
    slots = min(args.slots, args.runs - 1)
    print(f"{args.runs} runs of {args.users} users waiting for a pool of 1: "
          f"{took / slots * 1000:.2f} ms per freed slot (mean of {slots})")


if __name__ == "__main__":
    main()
