"""When a schedule's slots are, and which of them fire: pure, with the clock passed in.

A schedule has slots: the times a run is due. `--cron EXPR` slots come from
cronsim (five fields, or `@hourly`, `@daily`/`@midnight`, `@weekly`,
`@monthly`, `@yearly`/`@annually`) in the schedule's IANA time zone;
`--every DURATION` slots are `anchor + k * every` (k >= 1), counted from the
whole second the schedule was added.

The DST rule. Cron slots are wall-clock times in the schedule's zone:
- a wall time that does not exist (the hour skipped when clocks go forward)
  fires once, at the first instant after the gap (cronsim's rule, as Debian
  cron's): `30 2 * * *` fires at 03:00 that day; `*/15 * * * *` fires once at
  03:00 for the whole skipped hour;
- a wall time that exists twice (the hour repeated when clocks go back) fires
  once, at its first occurrence: the second pass through the hour has no slots.
`--every` slots are instants, DST does not move them.

Every slot is decided once, in order: fired as a run, queued, or skipped with
a reason. `decide` says, for the slots due by `now` after the last decided one,
what each becomes under the catch-up and overlap policies:
- a slot is on time if it is decided within `grace` of it (half the distance to
  the next slot, at most ON_TIME_GRACE); older due slots were missed (the
  daemon was down, or paused: see `skip_paused`);
- catch-up `none` skips every missed slot; `latest` fires the newest missed one;
  `all` fires the newest `max_catch_up` missed ones, in slot order; the rest
  are recorded as skipped (one record for a range of slots);
- overlap, judged against the schedule's runs from earlier decisions: `allow`
  fires regardless; `skip` records the slots as skipped while such a run is
  unfinished; `queue` fires the newest one as a run that waits QUEUED in the
  engine (issue 15's run state) and starts when those runs are over (one waits
  at most: a slot due while one waits is skipped).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cronsim

CATCH_UP = ("none", "latest", "all")
OVERLAP = ("skip", "queue", "allow")
MAX_CATCH_UP = 10
ON_TIME_GRACE = 60.0  # seconds: a slot decided later than this (or than half its period) was missed
NAME_LIMIT = 64

NICKNAMES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")

# Reasons recorded for skipped slots (docs/events.md).
MISSED = "missed"
MISSED_OVER_LIMIT = "missed, over --max-catch-up"
OVERLAP_SKIP = "overlap: the previous run is unfinished"
OVERLAP_QUEUE_FULL = "overlap: a slot is queued already"
PAUSED = "paused"


class ScheduleError(ValueError):
    """A bad schedule specification: the message is one line for the user."""


@dataclass(frozen=True)
class Timing:
    """When the slots are: exactly one of `cron` and `every`; `anchor` is when the
    schedule was added (epoch seconds, whole)."""

    cron: str | None
    every: float | None
    tz: str
    anchor: float


def cron_expression(expr: str) -> str:
    """The five-field form of `expr` (a nickname expanded), checked; ScheduleError
    naming the field otherwise."""
    text = " ".join(expr.split())
    text = NICKNAMES.get(text.lower(), text)
    if text.startswith("@"):
        raise ScheduleError(f"cron expression {expr!r}: unknown nickname {text!r} (known: "
                            f"{', '.join(NICKNAMES)})")
    fields = text.split(" ")
    if len(fields) != 5:
        raise ScheduleError(f"cron expression {expr!r}: expected 5 fields (minute hour "
                            f"day-of-month month day-of-week), got {len(fields)}")
    try:
        cronsim.CronSim(text, _dt.datetime(2000, 1, 1, tzinfo=_dt.timezone.utc))
    except cronsim.CronSimError as exc:
        raise ScheduleError(f"cron expression {expr!r}: {_field_problem(str(exc), fields)}"
                            ) from None
    return text


def _field_problem(message: str, fields: list[str]) -> str:
    """cronsim says `Bad minute`; we say which field, and what it holds."""
    for index, name in enumerate(FIELDS):
        if name.replace("-", " ") in message.lower() or name in message.lower():
            return f"bad {name} field {fields[index]!r} (field {index + 1})"
    return message


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ScheduleError if there is none."""
    if not name or name.startswith(("/", ".")) or ".." in name:
        raise ScheduleError(f"unknown time zone {name!r} (an IANA name like Europe/Berlin)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown time zone {name!r} (an IANA name like "
                            "Europe/Berlin)") from None


def check_name(name: str) -> None:
    """A schedule name: it names runs and is typed on command lines."""
    if not name or len(name) > NAME_LIMIT or not (name[0].isalnum() and name.isascii()) or \
            not all(c.isalnum() or c in "._-" for c in name):
        raise ScheduleError(f"bad schedule name {name!r}: 1 to {NAME_LIMIT} letters, digits, "
                            "'.', '_' or '-', starting with a letter or digit")


# ---- slots ---------------------------------------------------------------------


def slots_after(timing: Timing, after: float) -> Iterator[float]:
    """The slots strictly after `after`, in order, as epoch seconds (whole)."""
    if timing.every is not None:
        k = max(1, math.floor((after - timing.anchor) / timing.every) + 1)
        while timing.anchor + k * timing.every <= after:
            k += 1
        for n in itertools.count(k):
            yield timing.anchor + n * timing.every
        return
    assert timing.cron is not None
    tz = zone(timing.tz)
    start = _dt.datetime.fromtimestamp(math.floor(after), tz)
    for moment in cronsim.CronSim(timing.cron, start):
        if _second_pass(moment):
            continue  # a repeated wall time fired at its first occurrence
        yield moment.timestamp()


def _second_pass(moment: _dt.datetime) -> bool:
    """Whether `moment` is the second occurrence of a wall time that occurs twice."""
    if moment.fold == 0:
        return False
    return moment.replace(fold=0).utcoffset() != moment.utcoffset()


def next_slot(timing: Timing, after: float) -> float:
    return next(slots_after(timing, after))


def grace(timing: Timing, slot: float) -> float:
    """How late a slot may be decided and still be on time."""
    return min(ON_TIME_GRACE, (next_slot(timing, slot) - slot) / 2)


# ---- decisions -----------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    catch_up: str = "latest"
    max_catch_up: int = MAX_CATCH_UP
    overlap: str = "skip"


@dataclass
class Decision:
    """What the due slots become, in slot order: `fire` are run now, `queued` (if set)
    waits for the runs in flight, `skipped` are (first, last, reason) ranges; `next_at`
    is when to decide again (the next slot)."""

    fire: list[float] = field(default_factory=list)
    queued: float | None = None
    skipped: list[tuple[float, float, str]] = field(default_factory=list)
    next_at: float | None = None

    @property
    def empty(self) -> bool:
        return not self.fire and self.queued is None and not self.skipped


def due_slots(timing: Timing, last: float | None, now: float,
              limit: int) -> tuple[list[float], float | None, float | None]:
    """The due slots after `last` (None: the anchor) up to `now`: the newest `limit`
    of them, the first and last of the older ones (None, None if none), never
    listing more than `limit` (a year of `--every 1s` is counted, not listed)."""
    start = timing.anchor if last is None else last
    if timing.every is not None:
        return _due_every(timing, start, now, limit)
    newest: list[float] = []
    first_old = last_old = None
    for slot in slots_after(timing, start):
        if slot > now:
            break
        newest.append(slot)
        if len(newest) > limit:
            dropped = newest.pop(0)
            first_old = dropped if first_old is None else first_old
            last_old = dropped
    return newest, first_old, last_old


def _due_every(timing: Timing, start: float, now: float,
               limit: int) -> tuple[list[float], float | None, float | None]:
    every = timing.every
    assert every is not None
    first_k = math.floor((start - timing.anchor) / every) + 1
    last_k = math.floor((now - timing.anchor) / every)
    if last_k < first_k:
        return [], None, None
    newest_k = max(first_k, last_k - limit + 1)
    newest = [timing.anchor + k * every for k in range(newest_k, last_k + 1)]
    if newest_k == first_k:
        return newest, None, None
    return newest, timing.anchor + first_k * every, timing.anchor + (newest_k - 1) * every


def decide(timing: Timing, policy: Policy, last: float | None, now: float, busy: bool,
           queued: float | None) -> Decision:
    """The decision for the slots due after `last` by `now`. `busy`: a run of this
    schedule from an earlier decision is unfinished; `queued`: a slot already waits."""
    keep = max(policy.max_catch_up, 1) + 1  # the missed ones that may fire, and one on time
    newest, old_first, old_last = due_slots(timing, last, now, keep)
    decision = Decision(next_at=next_slot(timing, max(now, last or timing.anchor)))
    if not newest:
        return decision
    on_time = [s for s in newest[-1:] if now - s <= grace(timing, s)]
    missed = newest[: len(newest) - len(on_time)]
    fire, skipped = _catch_up(policy, missed)
    if old_first is not None:
        reason = MISSED_OVER_LIMIT if policy.catch_up == "all" else MISSED
        skipped.insert(0, (old_first, old_last, reason))  # type: ignore[arg-type]
    fire += on_time
    decision.skipped = _merged(skipped)
    if not fire or policy.overlap == "allow" or not (busy or queued is not None):
        decision.fire = fire
        return decision
    if policy.overlap == "queue" and queued is None:
        decision.queued = fire[-1]
        decision.skipped += [(s, s, OVERLAP_SKIP) for s in fire[:-1]]
    else:
        reason = OVERLAP_QUEUE_FULL if queued is not None else OVERLAP_SKIP
        decision.skipped += [(s, s, reason) for s in fire]
    decision.skipped = _merged(decision.skipped)
    return decision


def _catch_up(policy: Policy, missed: list[float]) -> tuple[list[float], list[tuple]]:
    """Which missed slots fire, and the skipped ranges of the others."""
    if not missed:
        return [], []
    count = {"none": 0, "latest": 1, "all": policy.max_catch_up}[policy.catch_up]
    count = min(count, len(missed))
    fire = missed[len(missed) - count:] if count else []
    rest = missed[: len(missed) - count]
    reason = MISSED_OVER_LIMIT if policy.catch_up == "all" else MISSED
    return fire, [(s, s, reason) for s in rest]


def _merged(skipped: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Adjacent skips with the same reason as one range (slots in between are all due)."""
    out: list[tuple[float, float, str]] = []
    for first, last, reason in skipped:
        if out and out[-1][2] == reason:
            out[-1] = (out[-1][0], last, reason)
        else:
            out.append((first, last, reason))
    return out


def skip_paused(timing: Timing, last: float | None, now: float) -> tuple[float, float] | None:
    """At unpause: the range of slots that fell while paused (first, last), if any."""
    newest, old_first, _ = due_slots(timing, last, now, 1)
    if not newest:
        return None
    return (old_first if old_first is not None else newest[0], newest[-1])
