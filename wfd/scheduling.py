"""Schedules in the daemon: the requests that change them and the timer that fires slots.

Part of the engine (it writes through the engine's one event loop; nothing here
runs in another thread but the fsync of the schedule log). Every change is an
event appended to the schedule log and fsync'd *before* it is acted on: a slot's
`SlotFired` (with the run id chosen for it) is durable before that run is
created, and its RunCreated names the schedule and slot. A crash in between
leaves an intent without its run; `recover` (at start, and on every timer pass)
creates that run, with that id. So no slot ever has two runs, and every slot
has a run or a recorded reason (docs/events.md, "The schedule log").

The pure decisions are `wfd.schedules.decide`; this module applies them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import msgspec

from wfd import events as ev
from wfd import schedules as sch
from wfd import state as st
from wfd import store
from wfd.engine import Concurrency, _rule_of
from wfd.errors import UsageError, WfdError
from wfd.eventlog import Submission
from wfd.params import resolve_vars
from wfd.schedlog import Book, Key, Sched, ScheduleLog
from wfd.users import name_of
from wfd.workflow import Workflow, parse_workflow

if TYPE_CHECKING:
    from wfd.engine import Engine

log = logging.getLogger("wfd")

QUEUE_POLL = 1.0  # seconds between looks at a queued slot's blocking runs
RETRY_WAIT = 5.0  # seconds before a failed pass (a full disk) is tried again


class Scheduling:
    """The engine's schedules: the book folded from the log, and the timer task."""

    def __init__(self, engine: Engine, slog: ScheduleLog) -> None:
        self.engine = engine
        self.slog = slog
        self.book: Book = slog.book
        self._lock = asyncio.Lock()  # one pass or request at a time: decisions in order
        self._wake = asyncio.Event()
        self._workflows: dict[Key, Workflow] = {}

    # ---- writing -------------------------------------------------------------------

    def _event(self, kind: type[ev.Event], **fields: Any) -> ev.Event:
        """An event to append; `_append` numbers it."""
        return kind(seq=0, ts=ev.format_ts(self.engine.clock.now()), **fields)

    async def _append(self, events: list[ev.Event]) -> None:
        """Durable, then applied: the book never shows what the disk may not have."""
        seq = self.book.last_seq
        events = [msgspec_replace(e, seq=seq + i) for i, e in enumerate(events, start=1)]
        await asyncio.to_thread(self.slog.append, events)
        for event in events:
            self.book.apply(event)
            if not isinstance(event, ev.SlotsSettled):
                log.info("schedule %s: %s", getattr(event, "name", "?"), describe(event))

    # ---- requests ------------------------------------------------------------------

    def visible(self, uid: int) -> list[Sched]:
        """Schedules of `uid`; all of them for None."""
        return [s for s in self.book.schedules.values() if uid is None or s.key[0] == uid]

    def get(self, owner_uid: int, name: str) -> Sched:
        sched = self.book.schedules.get((owner_uid, name))
        if sched is None:
            raise UsageError(f"no such schedule: {name}")
        return sched

    async def add(self, owner_uid: int, gid: int, name: str, fields: dict[str, Any]) -> Sched:
        """A new schedule; `fields` are ScheduleAdded's own (checked here)."""
        try:
            sch.check_name(name)
        except sch.ScheduleError as exc:
            raise UsageError(str(exc)) from None
        spec = _checked_spec(fields)
        wf = await self._parse(fields["workflow"], fields["source"])
        resolve_vars(wf, spec["vars"])  # its declared params: checked now, not at each slot
        async with self._lock:
            if (owner_uid, name) in self.book.schedules:
                raise UsageError(f"schedule {name} exists already (schedule update NAME "
                                 "FILE changes its workflow; rm and add changes its timing)")
            anchor = float(math.floor(self.engine.clock.now()))
            await self._append([self._event(
                ev.ScheduleAdded, name=name, owner=name_of(owner_uid), owner_uid=owner_uid,
                gid=gid, anchor=anchor, **spec)])
        self._wake.set()
        return self.get(owner_uid, name)

    async def update(self, owner_uid: int, name: str, workflow: str, source: str,
                     base_dir: str) -> Sched:
        wf = await self._parse(workflow, source)
        resolve_vars(wf, self.get(owner_uid, name).added.vars)
        async with self._lock:
            self.get(owner_uid, name)
            await self._append([self._event(ev.ScheduleUpdated, name=name, owner_uid=owner_uid,
                                            workflow=workflow, source=source,
                                            base_dir=base_dir)])
            self._workflows.pop((owner_uid, name), None)
        return self.get(owner_uid, name)

    async def pause(self, owner_uid: int, name: str, paused: bool) -> None:
        async with self._lock:
            sched = self.get(owner_uid, name)
            if sched.paused == paused:
                return
            if paused:
                await self._append([self._event(ev.SchedulePaused, name=name,
                                                owner_uid=owner_uid)])
                return
            events = []
            gap = sch.skip_paused(sched.timing, sched.last_slot, self.engine.clock.now())
            if gap is not None:
                events.append(self._event(ev.SlotSkipped, name=name, owner_uid=owner_uid,
                                          slot=gap[0], until=gap[1], reason=sch.PAUSED))
            events.append(self._event(ev.ScheduleUnpaused, name=name, owner_uid=owner_uid))
            await self._append(events)
        self._wake.set()

    async def remove(self, owner_uid: int, name: str) -> None:
        async with self._lock:
            self.get(owner_uid, name)
            await self._append([self._event(ev.ScheduleRemoved, name=name,
                                            owner_uid=owner_uid)])
            self._workflows.pop((owner_uid, name), None)

    async def fire(self, owner_uid: int, name: str) -> str:
        """`schedule fire`: a run now, as a slot of its own (`manual`)."""
        async with self._lock:
            sched = self.get(owner_uid, name)
            self.engine._refuse_new_runs()
            slot = float(math.floor(self.engine.clock.now()))
            run_id = self.engine.new_run_id()
            await self._append([self._event(ev.SlotFired, name=name, owner_uid=owner_uid,
                                            slot=slot, run_id=run_id, manual=True)])
            await self._create(sched, run_id, slot)
            await self._settle()
        return run_id

    async def _parse(self, text: str, source: str) -> Workflow:
        loop = asyncio.get_running_loop()
        wf = await loop.run_in_executor(self.engine._parser, parse_workflow, text,
                                        store.default_name(source))
        self.engine._check_executors(wf)
        self.engine._check_pools(wf)
        return wf

    # ---- the timer -----------------------------------------------------------------

    def run_finished(self, run_id: str) -> None:
        """A run is over: a slot queued behind it may fire now, not at the next poll."""
        run = self.engine.runs.get(run_id)
        if run is not None and run.schedule is not None:
            self._wake.set()

    async def run(self) -> None:
        """The timer task: recover intents, then decide due slots, sleep until the next."""
        while True:
            try:
                async with self._lock:
                    wait = await self._pass()
            except WfdError as exc:  # storage full, shutting down: try again later
                log.warning("schedules: %s", exc.message)
                wait = RETRY_WAIT
            except OSError as exc:
                log.warning("schedules: cannot write the schedule log: %s",
                            exc.strerror or exc)
                wait = RETRY_WAIT
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.01))
            except asyncio.TimeoutError:
                pass

    async def _pass(self) -> float:
        """One look at every schedule; seconds until the next look is due."""
        await self.recover()
        now = self.engine.clock.now()
        wait = 3600.0
        for sched in list(self.book.schedules.values()):
            if sched.paused:
                continue
            next_at = await self._decide(sched, now)
            wait = min(wait, next_at - self.engine.clock.now())
            if sched.queued is not None:
                wait = min(wait, QUEUE_POLL)
        return wait

    async def _decide(self, sched: Sched, now: float) -> float:
        busy, queued = self._busy(sched), sched.queued
        fire = []
        if queued is not None and not busy:  # its turn: it fires, and a new slot overlaps it
            fire, busy, queued = [queued], True, None
        waiting = self._waiting(sched)  # overlap queue: a run of ours QUEUED in the engine
        decision = sch.decide(sched.timing, sched.policy, sched.last_slot, now, busy,
                              queued if waiting is None else waiting)
        fire += decision.fire
        if decision.queued is not None:  # a run now, QUEUED behind ours (issue 15's state)
            fire.append(decision.queued)
        if not fire and decision.empty:
            return decision.next_at or now + 3600
        self.engine._refuse_new_runs()  # no intent we cannot follow with its run
        name, uid = sched.added.name, sched.added.owner_uid
        events: list[ev.Event] = [
            self._event(ev.SlotSkipped, name=name, owner_uid=uid, slot=first, until=last,
                        reason=reason)
            for first, last, reason in decision.skipped
        ]
        fired = [(slot, self.engine.new_run_id()) for slot in fire]
        events += [self._event(ev.SlotFired, name=name, owner_uid=uid, slot=slot, run_id=r)
                   for slot, r in fired]
        await self._append(events)
        for slot, run_id in fired:
            await self._create(sched, run_id, slot)
        if fired:
            await self._settle()
        return decision.next_at or now + 3600

    async def _settle(self) -> None:
        """Once the runs of the intents so far are durable, say so in the log: from then
        on a missing run of theirs was removed (pruned), not lost in a crash."""
        await self.engine.flushed()
        if self.book.settled < self.book.last_seq:
            await self._append([self._event(ev.SlotsSettled, upto=self.book.last_seq)])

    def _waiting(self, sched: Sched) -> float | None:
        """The slot of this schedule's run that is QUEUED, if one is."""
        name, uid = sched.key[1], sched.key[0]
        return next((run.slot for run in self.engine.runs.values()
                     if run.schedule == name and run.owner_uid == uid
                     and run.state == st.QUEUED), None)

    def _busy(self, sched: Sched) -> bool:
        """A run of this schedule is unfinished."""
        name, uid = sched.key[1], sched.key[0]
        return any(run.schedule == name and run.owner_uid == uid and not run.finished
                   for run in self.engine.runs.values())

    # ---- runs --------------------------------------------------------------------

    async def recover(self) -> None:
        """Create the run of every intent without one (a crash came between them)."""
        for run_id, (key, slot) in sorted(self.book.intents().items()):
            run = self.engine.runs.get(run_id)
            if run_id in self.engine.stubs or (run is not None and run.last_seq > 0):
                continue  # it has its RunCreated
            sched = self.book.schedules.get(key)
            if sched is None:
                continue
            if run is not None:  # a half-made dir (kept for this), loaded as CORRUPT
                self.engine.forget_unborn(run_id)
            log.warning("schedule %s: slot %s has no run yet; creating run %s", key[1],
                        ev.format_ts(slot), run_id)
            await asyncio.to_thread(self.engine.layout.remove_run, run_id)  # a half-made one
            await self._create(sched, run_id, slot)
        if self.book.intents():
            await self._settle()

    async def _create(self, sched: Sched, run_id: str, slot: float) -> None:
        wf = self._workflows.get(sched.key)
        if wf is None:
            wf = self._workflows[sched.key] = await self._parse(sched.workflow, sched.source)
        a = sched.added
        sub = Submission(
            workflow=sched.workflow, source=sched.source, base_dir=sched.base_dir, env=a.env,
            umask=a.umask, uid=a.owner_uid, gid=a.gid, owner=a.owner,
            submitted_at=ev.format_ts(self.engine.clock.now()),
        )
        rule = _rule_of(wf)
        if a.overlap == "queue":  # one at a time: a slot's run waits QUEUED behind the last
            rule = Concurrency(1, f"schedule:{a.name}")
        elif rule is not None and rule.skip:
            # The workflow's own concurrency holds: a slot over it waits QUEUED (on_busy
            # "skip" cannot refuse a slot whose decision is on disk already).
            rule = dataclasses.replace(rule, skip=False)
        await self.engine.create_run(run_id, wf, sub, resolve_vars(wf, a.vars), rule=rule,
                                     schedule=a.name, slot=slot)


def _checked_spec(fields: dict[str, Any]) -> dict[str, Any]:
    """ScheduleAdded's timing and policy fields, checked and normalized; UsageError."""
    spec = dict(fields)
    try:
        if (spec.get("cron") is None) == (spec.get("every") is None):
            raise sch.ScheduleError("give exactly one of --cron and --every")
        if spec.get("cron") is not None:
            spec["cron"] = sch.cron_expression(spec["cron"])
        elif not (0 < spec["every"] < 10 * 366 * 86400) or not math.isfinite(spec["every"]):
            raise sch.ScheduleError("--every must be more than 0 and at most ten years")
        sch.zone(spec["tz"])
        if spec["catch_up"] not in sch.CATCH_UP:
            raise sch.ScheduleError(f"--catch-up must be one of {', '.join(sch.CATCH_UP)}")
        if spec["overlap"] not in sch.OVERLAP:
            raise sch.ScheduleError(f"--overlap must be one of {', '.join(sch.OVERLAP)}")
        if not 0 <= spec["max_catch_up"] <= 10_000:
            raise sch.ScheduleError("--max-catch-up must be 0..10000")
    except sch.ScheduleError as exc:
        raise UsageError(str(exc)) from None
    spec["umask"] = spec["umask"] & 0o777
    return spec


def msgspec_replace(event: ev.Event, **changes: Any) -> ev.Event:
    return msgspec.structs.replace(event, **changes)


def describe(event: ev.Event) -> str:
    """One line for the daemon's log."""
    kind = type(event).__name__
    if isinstance(event, ev.SlotFired):
        return f"slot {ev.format_ts(event.slot)} fired as run {event.run_id}" + (
            " (schedule fire)" if event.manual else "")
    if isinstance(event, ev.SlotSkipped):
        span = ev.format_ts(event.slot)
        if event.until != event.slot:
            span += f" to {ev.format_ts(event.until)}"
        return f"slot {span} skipped: {event.reason}"
    if isinstance(event, ev.SlotQueued):
        return f"slot {ev.format_ts(event.slot)} queued"
    return kind


def owner_of(system: bool, daemon_uid: int, peer_uid: int) -> int:
    """Whose schedules a peer acts on: its own in system mode; the daemon user's else."""
    return peer_uid if system else daemon_uid

