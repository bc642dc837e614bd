"""The schedule log: `<state-dir>/schedules.jsonl`, its fold, and appending to it.

The fold (`Book.apply`) is pure: the schedules as the log says, each with the
last slot decided, the slot queued, and the runs its recent slots fired. The
file is read as run logs are (`eventlog.parse_log`): a torn last line is cut
off before the next append; a damaged line elsewhere stops the daemon's start
(`ScheduleLogDamaged`), because guessing past it could fire a slot twice.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

from wfd import events as ev
from wfd.eventlog import AppendLog, fsync_dir, parse_log, read_file, write_new_file
from wfd.schedules import Policy, Timing

FILE = "schedules.jsonl"
RECENT = 64  # fired slots remembered per schedule (more than a pass can leave unsettled)

Key = tuple[int, str]  # (owner uid, name)


class ScheduleLogDamaged(Exception):
    pass


@dataclass
class Sched:
    """One schedule as folded from the log."""

    added: ev.ScheduleAdded
    workflow: str
    source: str
    base_dir: str
    paused: bool = False
    last_slot: float | None = None  # the newest slot of the series decided
    queued: float | None = None
    last_run: str | None = None
    fired: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT))

    @property
    def key(self) -> Key:
        return (self.added.owner_uid, self.added.name)

    @property
    def timing(self) -> Timing:
        a = self.added
        return Timing(a.cron, a.every, a.tz, a.anchor)

    @property
    def policy(self) -> Policy:
        a = self.added
        return Policy(a.catch_up, a.max_catch_up, a.overlap)


class Book:
    """Every schedule the log holds, keyed by (owner uid, name); only `apply` changes it."""

    def __init__(self) -> None:
        self.schedules: dict[Key, Sched] = {}
        self.last_seq = 0
        self.settled = 0  # every SlotFired up to this seq has its run

    def apply(self, event: ev.Event) -> None:
        self.last_seq = event.seq
        if isinstance(event, ev.SlotsSettled):
            self.settled = max(self.settled, event.upto)
            return
        if isinstance(event, ev.ScheduleAdded):
            self.schedules[(event.owner_uid, event.name)] = Sched(
                event, event.workflow, event.source, event.base_dir)
            return
        sched = self.schedules.get((event.owner_uid, event.name))  # type: ignore[attr-defined]
        if sched is None:
            return  # about a schedule removed since (never written by us; ignored)
        if isinstance(event, ev.ScheduleRemoved):
            del self.schedules[sched.key]
        elif isinstance(event, ev.ScheduleUpdated):
            sched.workflow, sched.source, sched.base_dir = (
                event.workflow, event.source, event.base_dir)
        elif isinstance(event, (ev.SchedulePaused, ev.ScheduleUnpaused)):
            sched.paused = isinstance(event, ev.SchedulePaused)
        elif isinstance(event, ev.SlotFired):
            if not event.manual:
                sched.last_slot = _later(sched.last_slot, event.slot)
            if sched.queued == event.slot:
                sched.queued = None
            sched.last_run = event.run_id
            sched.fired.append((event.run_id, event.slot, event.seq))
        elif isinstance(event, ev.SlotQueued):
            sched.queued = event.slot
            sched.last_slot = _later(sched.last_slot, event.slot)
        elif isinstance(event, ev.SlotSkipped):
            sched.last_slot = _later(sched.last_slot, event.until)

    def intents(self) -> dict[str, tuple[Key, float]]:
        """Run id -> (schedule, slot) of every fired slot not yet settled: a run such an
        intent names must not be discarded as unacknowledged; one that does not exist is
        created."""
        return {run_id: (sched.key, slot)
                for sched in self.schedules.values() for run_id, slot, seq in sched.fired
                if seq > self.settled}


def _later(a: float | None, b: float) -> float:
    return b if a is None else max(a, b)


class ScheduleLog:
    """The file: read once at start, then appended to by the engine only."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE
        self.book = Book()
        self._log: AppendLog | None = None
        self._missing = False

    def load(self) -> Book:
        """Fold the file (none yet is an empty book); cut a torn tail. ScheduleLogDamaged
        if a line other than the last is damaged."""
        try:
            data = read_file(self.path)
        except FileNotFoundError:
            # Made by the first append: a state dir that never had a schedule holds no file.
            self._missing = True
            data = b""
        read = parse_log(data, ev.schedule_decoder)
        if read.problem is not None:
            raise ScheduleLogDamaged(f"{self.path}: {read.problem}")
        for event in read.events:
            self.book.apply(event)
        self._log = AppendLog(self.path, read.good_size)
        if read.torn_tail is not None:
            self._log.cut()
        return self.book

    def append(self, events: list[ev.Event]) -> None:
        """Durable (fsync'd) when it returns; call it from a worker thread. The events are
        applied to the book by the caller, on the loop, once this returned."""
        assert self._log is not None
        if self._missing:
            write_new_file(self.path, b"")
            fsync_dir(self.path.parent)  # the new name must survive a crash, as its lines
            self._missing = False
        self._log.append(b"".join(ev.encode_line(e) for e in events))
