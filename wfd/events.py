"""The events of a run's log: frozen schema, one Struct per type.

Every line of `events.jsonl` is one of these, encoded as a JSON object whose
`type` field is the tag. These Structs are a file format (see docs/events.md):
a field, once released, never changes its type or meaning; a new field gets a
default so that older logs stay readable; a new event type gets a new tag.
`RunCreated.format` says which version of this format wrote the log.

Starting an attempt is two events (SPEC 3): `AttemptClaimed` takes the attempt
number and is durable before anything is spawned, so a number is never reused
even after a crash right after the spawn; `AttemptStarted` records the
leader's pid, start time and boot id once it runs, so that a later daemon can
prove a process is that attempt's before it signals it.
"""

from __future__ import annotations

import datetime as _dt
from typing import Union

import msgspec

LOG_FORMAT = 1


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    """Common fields: `seq` counts 1, 2, 3, ... per run without gaps; `ts` is UTC RFC 3339."""

    seq: int
    ts: str


class RunCreated(Event, tag=True, kw_only=True, omit_defaults=False):
    """First event of every run: it exists, owned by `owner_uid`; its workflow: workflow.json."""

    format: int = LOG_FORMAT  # always written: this class does not omit defaults
    run_id: str
    name: str
    owner: str
    owner_uid: int
    # `wfctl run FILE KEY=VALUE...` (and a schedule's): variables of every step, over
    # every level of the workflow's env; kept apart from the client's environment.
    vars: dict[str, str] = {}
    # The schedule whose slot this run is, and the slot (epoch seconds, UTC).
    schedule: str | None = None
    slot: float | None = None
    # `wfctl run --key K`: a second submit with the same key by the same user gets this run.
    key: str | None = None
    # One at a time (issue 15): the run was submitted under a limit of `concurrency`
    # unfinished runs of its owner with the same `queue` (null: the run's name); `queued`:
    # the limit was reached, so it starts QUEUED and waits for RunDequeued.
    queue: str | None = None
    concurrency: int | None = None
    queued: bool = False


class StepReady(Event, tag=True, kw_only=True):
    """PENDING -> READY: every dependency SUCCEEDED."""

    step: str


class AttemptClaimed(Event, tag=True, kw_only=True):
    """READY -> RUNNING: attempt number `attempt` is taken; durable before the spawn."""

    step: str
    attempt: int


class AttemptStarted(Event, tag=True, kw_only=True):
    """The attempt's leader runs: pid, psutil create_time and boot id identify it later."""

    step: str
    attempt: int
    pid: int
    start_time: float
    boot_id: str
    # How the attempt's processes are known and killed: "cgroup" (a leaf of its own) or
    # "session" (session and marks); absent in logs older than the keeper.
    containment: str | None = None


class AttemptSubmitting(Event, tag=True, kw_only=True):
    """RUNNING: the attempt is about to be handed to a batch system (`executor`, "slurm")
    as the job named `wfd-<token>`; durable before the submission, so a daemon that dies
    during it looks the job up by that name before it ever submits again."""

    step: str
    attempt: int
    executor: str
    token: str


class AttemptSubmitted(Event, tag=True, kw_only=True):
    """RUNNING: the batch system accepted the attempt's job: its id there."""

    step: str
    attempt: int
    job_id: str


class AttemptEnd(Event, kw_only=True):
    """Fields every event that ends an attempt may carry (none before format 1's
    accounting: defaults keep old logs readable): CPU seconds (user + system) and peak
    RSS in KiB of the attempt's leader and what it waited for, from wait4's rusage."""

    cpu: float | None = None
    max_rss: int | None = None


class AttemptSucceeded(AttemptEnd, tag=True, kw_only=True):
    """RUNNING -> SUCCEEDED: the leader exited 0 and its whole tree is gone. `outputs`:
    the KEY=VALUE lines it wrote to $WFD_OUTPUT (absent when none, and in older logs)."""

    step: str
    attempt: int
    outputs: dict[str, str] = {}


class AttemptFailed(AttemptEnd, tag=True, kw_only=True):
    """RUNNING -> RETRY_WAIT: the attempt failed and a retry is due at `retry_at`."""

    step: str
    attempt: int
    exit_code: int | None = None
    error: str | None = None
    retry_at: str


class StepFailed(AttemptEnd, tag=True, kw_only=True):
    """RUNNING -> FAILED: the attempt failed and no retry remains."""

    step: str
    attempt: int
    exit_code: int | None = None
    error: str | None = None


class AttemptInterrupted(AttemptEnd, tag=True, kw_only=True):
    """RUNNING -> READY: a daemon stop or crash ended the attempt; no retry is used up."""

    step: str
    attempt: int
    reason: str


class RetryDue(Event, tag=True, kw_only=True):
    """RETRY_WAIT -> READY at the recorded `retry_at`."""

    step: str


class StepSkipped(Event, tag=True, kw_only=True):
    """PENDING -> SKIPPED: its `run_if` can no longer be met. Without `reason`, because
    of a failure: `cause` is the FAILED step upstream of it. With `reason` (issue 15),
    for another cause, which `reason` says (e.g. "no dependency failed"); `cause` is
    then the dependency it names, and the skip does not count as a failure."""

    step: str
    cause: str
    reason: str | None = None


class RunCancelRequested(Event, tag=True, kw_only=True):
    """Cancel asked: no new attempt of a main step starts; their running trees are killed
    (on_exit steps run after it). `reason`, when the daemon cancelled the run itself
    (issue 15: `run timed out after N s`), is shown as the run's error."""

    reason: str | None = None


class StepCancelled(AttemptEnd, tag=True, kw_only=True):
    """Any non-terminal state -> CANCELLED; `attempt` set when a running attempt was killed."""

    step: str
    attempt: int | None = None
    exit_code: int | None = None


class RunFinished(Event, tag=True, kw_only=True):
    """The run is over: `state` is SUCCEEDED, FAILED or CANCELLED. `ran`: the seconds
    it spent RUNNING over all its spans, written only for a resumed run (for one never
    resumed it is `ts` minus the creation time), so that a list of runs known by their
    first and last events shows a resumed run's running time, not its age."""

    state: str
    ran: float | None = None


class RunDequeued(Event, tag=True, kw_only=True):
    """QUEUED -> RUNNING: fewer than its `concurrency` runs of its queue are unfinished,
    and it is the oldest QUEUED one; its steps may start."""


class RunResumed(Event, tag=True, kw_only=True):
    """FAILED or CANCELLED run -> RUNNING: its FAILED, SKIPPED and CANCELLED steps
    go back to PENDING with a fresh retry budget; attempt numbers go on."""


class StepsRetried(Event, tag=True, kw_only=True):
    """A finished run -> RUNNING (`wfctl retry`): `steps` (those named, and with
    --downstream every step after them) go back to PENDING with a fresh retry budget,
    whatever they ended as; the others keep their results. Attempt numbers go on."""

    steps: list[str]


AnyEvent = Union[  # noqa: UP007 - msgspec wants a Union object here on 3.10
    RunCreated,
    StepReady,
    AttemptClaimed,
    AttemptStarted,
    AttemptSucceeded,
    AttemptFailed,
    StepFailed,
    AttemptInterrupted,
    RetryDue,
    StepSkipped,
    RunCancelRequested,
    StepCancelled,
    RunFinished,
    RunResumed,
    AttemptSubmitting,
    AttemptSubmitted,
    StepsRetried,
    RunDequeued,
]

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]
ATTEMPT_ENDS = (AttemptSucceeded, AttemptFailed, StepFailed, AttemptInterrupted, StepCancelled)

# Built once: typed decoders are the fast path of recovery and replay.
json_decoder = msgspec.json.Decoder(AnyEvent)
json_encoder = msgspec.json.Encoder()


def encode_line(event: Event) -> bytes:
    """One log line, newline included."""
    return json_encoder.encode(event) + b"\n"


def format_ts(epoch: float) -> str:
    """UTC RFC 3339 with microseconds, always: `2026-11-25T09:58:52.123456Z`."""
    moment = _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(ts: str) -> float:
    """Inverse of `format_ts` (also accepts other RFC 3339 forms); epoch seconds."""
    text = ts[:-1] + "+00:00" if ts.endswith("Z") else ts
    return _dt.datetime.fromisoformat(text).timestamp()


# ---- the schedule log ------------------------------------------------------------
#
# `<state-dir>/schedules.jsonl`: every schedule's life and every decision about one
# of its slots, appended and fsync'd by the engine before it acts on them (a run of
# a slot is created only once its `SlotFired` is durable). Same rules as run events.
# A schedule is known by (`owner_uid`, `name`); `seq` counts the whole file.


class ScheduleAdded(Event, tag=True, kw_only=True):
    """A schedule exists: when (`cron` in `tz`, or `every` seconds from `anchor`), its
    policies, and the submission its runs are made of (workflow text and context)."""

    name: str
    owner: str
    owner_uid: int
    gid: int
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    anchor: float
    catch_up: str = "latest"
    max_catch_up: int = 10
    overlap: str = "skip"
    workflow: str
    source: str
    base_dir: str
    env: dict[str, str] = {}
    umask: int = 0o022
    vars: dict[str, str] = {}


class ScheduleUpdated(Event, tag=True, kw_only=True):
    """`schedule update NAME FILE`: later runs use this workflow."""

    name: str
    owner_uid: int
    workflow: str
    source: str
    base_dir: str


class SchedulePaused(Event, tag=True, kw_only=True):
    name: str
    owner_uid: int


class ScheduleUnpaused(Event, tag=True, kw_only=True):
    """Slots that fell while paused are recorded skipped (`paused`) just before this."""

    name: str
    owner_uid: int


class ScheduleRemoved(Event, tag=True, kw_only=True):
    name: str
    owner_uid: int


class SlotFired(Event, tag=True, kw_only=True):
    """Slot `slot` (epoch seconds) is run `run_id`: durable before that run is created,
    which carries `schedule` and `slot` in its RunCreated. `manual`: `schedule fire`,
    a slot of its own outside the schedule's series."""

    name: str
    owner_uid: int
    slot: float
    run_id: str
    manual: bool = False


class SlotQueued(Event, tag=True, kw_only=True):
    """Overlap `queue`: slot `slot` fires when the schedule's unfinished runs are over."""

    name: str
    owner_uid: int
    slot: float


class SlotSkipped(Event, tag=True, kw_only=True):
    """The slots from `slot` to `until` (both included) get no run, because `reason`
    (missed, missed over --max-catch-up, overlap, paused)."""

    name: str
    owner_uid: int
    slot: float
    until: float
    reason: str


class SlotsSettled(Event, tag=True, kw_only=True):
    """Every `SlotFired` up to seq `upto` has its run (its RunCreated is durable): only
    a later one can be an intent without its run. Written once those runs are created,
    so that a run removed since (`wfctl prune`) is never taken for a missing one."""

    upto: int


AnyScheduleEvent = Union[  # noqa: UP007
    ScheduleAdded, ScheduleUpdated, SchedulePaused, ScheduleUnpaused, ScheduleRemoved,
    SlotFired, SlotQueued, SlotSkipped, SlotsSettled,
]
schedule_decoder = msgspec.json.Decoder(AnyScheduleEvent)
