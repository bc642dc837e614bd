"""Loading runs from disk: pure values that a worker thread may compute.

Everything here reads files and returns a new value; nothing touches the
engine's state, so the engine can fold a big run in a worker thread and take
the result on its loop (docs/design.md, "Who owns what"). Nothing here writes
either: a torn tail is reported, and cut by the engine's `AppendLog` before its
next append, not here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from wfd import events as ev
from wfd import state as st
from wfd import users
from wfd.errors import IllegalTransition, WfdError, WorkflowInvalid
from wfd.eventlog import Layout, LogRead, Submission, read_ends, read_log
from wfd.users import UserIds
from wfd.workflow import Workflow, build_workflow, parse_workflow

log = logging.getLogger("wfd")


def default_name(source: str) -> str:
    base = os.path.basename(source)
    return base.rsplit(".", 1)[0] if "." in base else base


def placeholder_workflow(name: str) -> Workflow:
    """The workflow of a run whose workflow.json cannot be read: no steps."""
    return build_workflow(name, None, {}, ())


@dataclass(frozen=True)
class RunCtx:
    """What a run's steps are started with, besides the workflow: the submission, and
    what the user database said of its owner when the run was loaded."""

    sub: Submission
    user: UserIds | None  # None: the daemon's own user
    login: dict[str, str] = field(default_factory=dict)  # HOME, USER, LOGNAME, SHELL


def run_ctx(sub: Submission, daemon_uid: int) -> RunCtx:
    """Asks the user database: call it off the event loop."""
    user = None if sub.uid == daemon_uid else users.user_ids(sub.uid, sub.gid)
    return RunCtx(sub, user, users.login_env(sub.uid))


class Stub(NamedTuple):
    """A finished run known by its first and last events, not folded: a few hundred
    bytes in memory, however big the run."""

    summary: st.RunSummary
    owner_uid: int
    key: str | None = None  # `wfctl run --key`


def peek(layout: Layout, run_id: str) -> Stub | None:
    """A Stub if the log's first line is RunCreated and its last RunFinished."""
    try:
        ends = read_ends(layout.events(run_id))
    except OSError:
        return None
    if ends is None:
        return None
    first, last = ends
    if (type(first) is not ev.RunCreated or type(last) is not ev.RunFinished
            or first.seq != 1 or first.run_id != run_id):
        return None
    ran = last.ran if last.ran is not None else max(0.0, ev.parse_ts(last.ts)
                                                     - ev.parse_ts(first.ts))
    summary = st.RunSummary(run_id=run_id, name=first.name, owner=first.owner,
                            state=last.state, created_at=first.ts, finished_at=last.ts,
                            schedule=first.schedule, scheduled_at=st.slot_ts(first.slot),
                            run_seconds=round(ran, 6))
    return Stub(summary, first.owner_uid, first.key)


def stub_of(run: st.RunState) -> Stub:
    return Stub(st.run_summary(run), run.owner_uid, run.key)


@dataclass
class Loaded:
    """A run as its files say: the fold, the submission, where appending goes on."""

    run: st.RunState
    ctx: RunCtx | None  # None when workflow.json cannot be read (the run is CORRUPT)
    good_size: int = 0  # the committed prefix of events.jsonl
    torn: bool = False  # bytes past good_size: cut before the next append
    never_acknowledged: bool = False  # no first event: a submit that never finished


def load_run(layout: Layout, run_id: str, daemon_uid: int) -> Loaded:
    """Fold a run from its files. A damaged run comes back CORRUPT, with the error."""
    try:
        sub = layout.read_submission(run_id)
        wf = parse_workflow(sub.workflow, default_name(sub.source))
        ctx = run_ctx(sub, daemon_uid)
    except (OSError, ValueError, WfdError) as exc:
        return Loaded(corrupt_run(run_id, placeholder_workflow(run_id),
                                  f"workflow.json unreadable: {_one_line(exc)}"), None)
    try:
        read = read_log(layout.events(run_id), repair=False)
    except OSError as exc:
        return Loaded(corrupt_run(run_id, wf, f"events.jsonl unreadable: {exc}"), None)
    if not read.events and read.problem is None:
        return Loaded(st.RunState(wf), ctx, torn=read.torn_tail is not None,
                      never_acknowledged=True)
    if read.torn_tail:
        log.warning("run %s: %s", run_id, read.torn_tail)
    run, problem = fold_checked(wf, read)
    if problem is not None:
        run.state = st.CORRUPT
        run.error = problem
        log.error("run %s is CORRUPT: %s", run_id, problem)
    return Loaded(run, ctx, read.good_size, read.torn_tail is not None)


def corrupt_run(run_id: str, wf: Workflow, error: str) -> st.RunState:
    log.error("run %s is CORRUPT: %s", run_id, error)
    run = st.RunState(wf)
    run.run_id = run_id
    run.state = st.CORRUPT
    run.error = error
    return run


def fold_checked(wf: Workflow, read: LogRead) -> tuple[st.RunState, str | None]:
    """Fold a parsed log; a damaged line or an illegal transition is the problem found,
    with the state as far as the log is good."""
    run = st.RunState(wf)
    for number, event in enumerate(read.events, start=1):  # one event per line
        try:
            st.apply(run, event)
        except IllegalTransition as exc:
            return run, f"line {number}: {exc.message}"
    return run, read.problem


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, WorkflowInvalid):
        return exc.problems[0]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
