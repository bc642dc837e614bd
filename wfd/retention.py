"""Which finished runs to remove: `wfctl prune` and `wfd --keep-runs/--keep-days`. Pure.

Only finished runs are ever chosen (SUCCEEDED, FAILED, CANCELLED; CORRUPT only when
asked for by name, as its log may be worth a look): an unfinished run is never removed.
Which runs the asker may remove (their own; root anyone's) is the caller's filter.
How a run is removed crash-safely is `eventlog.Layout.prune`'s business.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from wfd.errors import UsageError
from wfd.events import format_ts
from wfd.state import CORRUPT, RUN_STATES, RUN_TERMINAL, RunSummary

PRUNABLE = RUN_TERMINAL | {CORRUPT}


def check_states(states: Collection[str]) -> None:
    """UsageError unless every state is one a prune may remove."""
    for state in sorted(set(states)):
        if state not in RUN_STATES:
            raise UsageError(f"unknown run state {state!r} (one of "
                             f"{', '.join(sorted(RUN_STATES))})")
        if state not in PRUNABLE:
            raise UsageError(f"prune removes finished runs only, never {state} ones")


def choose(runs: Iterable[RunSummary], now: float, *, keep: int | None = None,
           older_than: float | None = None, states: Collection[str] = (),
           name: str | None = None) -> list[str]:
    """Run ids to remove among `runs` (oldest first): the finished runs in one of
    `states` (default: SUCCEEDED, FAILED, CANCELLED) of workflow `name`, except the
    newest `keep` of them, and of the rest those that finished more than `older_than`
    seconds before `now` (all of them when `older_than` is None)."""
    wanted = set(states) if states else RUN_TERMINAL
    matching = [run for run in runs
                if run.state in wanted and run.state in PRUNABLE
                and (name is None or run.name == name)]
    if keep:
        matching = matching[:max(0, len(matching) - keep)]
    if older_than is not None:
        before = format_ts(now - older_than)  # such strings sort as the times do
        matching = [run for run in matching if _ended(run) < before]
    return [run.run_id for run in matching]


def _ended(run: RunSummary) -> str:
    return run.finished_at or run.created_at or ""


def policy(runs: Sequence[tuple[RunSummary, int]], now: float, keep_runs: int | None,
           keep_days: float | None) -> list[str]:
    """`wfd --keep-runs N --keep-days D`: of each user's finished runs, those beyond the
    newest N and (with both) finished more than D days ago. With only one of the two,
    that one alone decides."""
    if keep_runs is None and keep_days is None:
        return []
    by_owner: dict[int, list[RunSummary]] = {}
    for summary, owner_uid in runs:
        by_owner.setdefault(owner_uid, []).append(summary)
    older = None if keep_days is None else keep_days * 86400.0
    chosen: list[str] = []
    for owned in by_owner.values():
        chosen += choose(owned, now, keep=keep_runs, older_than=older)
    return sorted(chosen)
