"""Which runs a run list shows: filters, counts and the newest N (issue 14). Pure.

The daemon filters, so a list of the last 20 of 10,000 runs sends 20 summaries, not
10,000; the counts by state (`42 runs: 39 SUCCEEDED, 2 FAILED, 1 RUNNING`) and the
number matched are of every run that passed the filters, before the limit.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable
from typing import NamedTuple

from wfd.state import RunSummary


class Selection(NamedTuple):
    runs: list[RunSummary]  # oldest first, the newest `limit` of those matched
    matched: int
    counts: dict[str, int]


def select(runs: Iterable[RunSummary], states: Collection[str] = (), name: str | None = None,
           since: str | None = None, limit: int | None = None) -> Selection:
    """The runs (oldest first) in one of `states` (any if empty), of workflow `name`,
    created at or after `since` (a timestamp as events write them: such strings sort as
    the times do), and of those the newest `limit`."""
    chosen = [run for run in runs
              if (not states or run.state in states)
              and (name is None or run.name == name)
              and (since is None or (run.created_at or "") >= since)]
    counts = collections.Counter(run.state for run in chosen)
    shown = chosen if limit is None else chosen[max(0, len(chosen) - limit):]
    return Selection(shown, len(chosen), dict(counts))

