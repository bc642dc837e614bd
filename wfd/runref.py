"""Short run references: what a person types instead of a 25-character run id.

A reference is one of:
- a whole run id (`20261125T095852Z-0a1b2c3d`);
- a prefix of at least MIN_PREFIX characters of a run id (`20261125T0958`) or of its
  random part, after the `-` (`0a1b`);
- `@last` (the newest run), `@-N` (the Nth newest; `@-1` is `@last`);
- `NAME@last`, `NAME@-N`: the same among the runs of workflow NAME.

Pure: `resolve` is given the runs the asker may see (oldest first, as run ids sort
by creation time) and returns one run id or raises a UsageError (exit 2) that says
what matched. The daemon resolves, so a reference only ever sees the caller's runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from wfd.errors import UsageError

MIN_PREFIX = 4
SHOWN_CANDIDATES = 10  # an ambiguous prefix lists at most this many matches
_POSITION_RE = re.compile(r"@(last|-[1-9][0-9]{0,8})\Z")
_PREFIX_RE = re.compile(r"[0-9A-Za-z-]{1,25}")  # what a (part of a) run id may hold


class Candidate(NamedTuple):
    """A run a reference may name: its id, workflow name and creation time (shown)."""

    run_id: str
    name: str
    created_at: str | None = None


class AmbiguousRef(UsageError):
    """A prefix matches several runs; `matches` are their ids, newest first."""

    def __init__(self, message: str, matches: list[str]) -> None:
        super().__init__(message)
        self.matches = matches


def resolve(ref: str, runs: Sequence[Candidate]) -> str:
    """The run id `ref` names among `runs` (oldest first); UsageError if none or several."""
    if any(run.run_id == ref for run in runs):
        return ref
    position = _POSITION_RE.search(ref)
    if position is not None:
        return _by_position(ref, ref[:position.start()], position.group(1), runs)
    if not _PREFIX_RE.fullmatch(ref):  # not even a piece of one: no file is ever named
        raise UsageError(f"malformed run id {_shown(ref)}")
    if len(ref) < MIN_PREFIX:
        raise UsageError(f"run reference {_shown(ref)} is too short: give at least {MIN_PREFIX} "
                         "characters of a run id, @last, or NAME@last")
    matches = [run for run in runs if _prefix_of(ref, run.run_id)]
    if not matches:
        raise UsageError(f"no such run: {_shown(ref)[1:-1]}")
    if len(matches) > 1:
        raise _ambiguous(ref, matches)
    return matches[0].run_id


def _shown(ref: str, limit: int = 80) -> str:
    """A reference quoted for a message, cut short if long (a name may be megabytes)."""
    return repr(ref if len(ref) <= limit else ref[:limit] + "...")


def _prefix_of(ref: str, run_id: str) -> bool:
    return run_id.startswith(ref) or run_id.partition("-")[2].startswith(ref)


def _by_position(ref: str, name: str, where: str, runs: Sequence[Candidate]) -> str:
    """`@last` / `@-N`, among all runs or those named `name`."""
    pool = [run for run in runs if run.name == name] if name else list(runs)
    back = 1 if where == "last" else int(where[1:])
    if back <= len(pool):
        return pool[-back].run_id
    whose = f"of workflow {_shown(name)}" if name else "of yours"
    if not pool:
        raise UsageError(f"no such run: {_shown(ref)[1:-1]} (no runs {whose})")
    raise UsageError(f"no such run: {_shown(ref)[1:-1]} (there are only {len(pool)} runs {whose})")


def _ambiguous(ref: str, matches: list[Candidate]) -> AmbiguousRef:
    newest = matches[::-1]
    lines = [f"  {run.run_id}  {run.name}" for run in newest[:SHOWN_CANDIDATES]]
    if len(newest) > SHOWN_CANDIDATES:
        lines.append(f"  ... and {len(newest) - SHOWN_CANDIDATES} more")
    return AmbiguousRef(f"run reference {_shown(ref)} matches {len(matches)} runs; give more "
                        "characters:\n" + "\n".join(lines), [run.run_id for run in newest])
