"""Unit tests of the engine (issue 10), with a fake executor and a clock we move.

The engine runs on a real event loop with a real committer writing real logs in a
temp dir; only the processes are fake. `FakeExecutor` records every start and
kill (with the run's durable seq at the moment of the kill), and its
`clear_stale` waits on an asyncio.Event the test sets, so a test can hold an
adoption open and see what other requests do meanwhile. Each test reads the
run's events.jsonl to check the order of what was recorded.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
from bigruns import write_run

from wfd import engine as engine_mod
from wfd import events as ev
from wfd import scheduler
from wfd import state as st
from wfd.clock import Clock
from wfd.engine import Engine, new_run_id
from wfd.errors import IllegalTransition, StorageError, UsageError
from wfd.eventlog import Layout
from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt, StartInfo

TS = "2026-01-01T00:00:00.000000Z"


class FakeExecutor:
    """Records starts and kills; a killed attempt ends soon after with the kill's reason;
    with `exit_code` set, a started attempt ends at once with it."""

    def __init__(self, engine: Engine, exit_code: int | None = None) -> None:
        self.engine = engine
        self.exit_code = exit_code
        self.started: list[AttemptKey] = []
        self.killed: list[tuple[AttemptKey, str, int]] = []  # (key, reason, durable seq)
        self.stale_calls: list[list[StaleAttempt]] = []
        self.release = asyncio.Event()  # clear_stale returns once the test sets it
        self.running = 0
        self._pids = iter(range(10_000, 1_000_000))

    def start(self, spec: AttemptSpec) -> StartInfo:
        self.started.append(spec.key)
        if self.exit_code is not None:
            asyncio.get_running_loop().call_soon(self.engine.attempt_ended, spec.key,
                                                 self.exit_code, None)
        return StartInfo(next(self._pids), None, "boot")

    def identify(self, info: StartInfo) -> StartInfo:
        return info._replace(start_time=1.0)

    def kill(self, key: AttemptKey, reason: str, force: bool = False) -> None:
        self.killed.append((key, reason, self.engine.durable_seq(key.run_id)))
        asyncio.get_running_loop().call_soon(self.engine.attempt_ended, key, None, reason)

    async def clear_stale(self, stale: list[StaleAttempt]) -> None:
        self.stale_calls.append(stale)
        await self.release.wait()

    async def stop_all(self, reason: str) -> None:
        pass


class ShiftedClock(Clock):
    """The daemon's clock, moved forward by `offset` seconds when the test says so."""

    offset = 0.0

    def now(self) -> float:
        return super().now() + self.offset


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (no pytest plugin needed)."""
    @functools.wraps(test)  # pytest sees the test's own arguments (fixtures)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return wrapper


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Let the loop run until `predicate()` is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.005)
    return value


async def settle() -> None:
    """Let the loop run a few iterations (for checks that something did NOT happen)."""
    for _ in range(20):
        await asyncio.sleep(0.005)


class Harness:
    """An engine on `state_dir` with a FakeExecutor, started like the daemon starts it."""

    def __init__(self, state_dir: Path, clock: Clock | None = None,
                 exit_code: int | None = None) -> None:
        (state_dir / "runs").mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.engine = Engine(Layout(state_dir), limit=4, system=False, clock=clock)
        self.executor = FakeExecutor(self.engine, exit_code)
        self.engine.executor = self.executor
        self.unfinished = self.engine.load_all()
        self.committer = self.engine.start()

    async def close(self) -> None:
        self.executor.release.set()
        self.committer.cancel()
        await asyncio.gather(self.committer, return_exceptions=True)
        self.engine._parser.shutdown()
        assert not self.engine.fatal.done(), f"the engine broke: {self.engine.fatal.result()!r}"

    async def submit(self, steps: list[dict], **workflow: Any) -> str:
        text = json.dumps({"name": "t", "steps": steps, **workflow})
        return await self.engine.submit(text, "t.json", str(self.state_dir), {}, 0o022,
                                        os.getuid(), os.getgid())

    def events(self, run_id: str) -> list[dict]:
        """The run's log, checked for whole lines and seqs 1, 2, 3, ..."""
        data = (self.state_dir / "runs" / run_id / "events.jsonl").read_bytes()
        assert not data or data.endswith(b"\n")
        events = [json.loads(line) for line in data.splitlines()]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        return events


async def harness(state_dir: Path, **kwargs: Any) -> Harness:
    return Harness(state_dir, **kwargs)


def kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def left_running(state_dir: Path, run_id: str) -> None:
    """A run a crashed daemon left: step `a` RUNNING (attempt 1, pid recorded), step `b`
    READY but not yet claimed, step `c` waiting for `a`."""
    uid = os.getuid()
    events: list[ev.Event] = [ev.RunCreated(seq=1, ts=TS, run_id=run_id, name="left",
                                            owner="me", owner_uid=uid)]

    def add(kind: type[ev.Event], **fields: Any) -> None:
        events.append(kind(seq=len(events) + 1, ts=TS, **fields))

    add(ev.StepReady, step="a")
    add(ev.StepReady, step="b")
    add(ev.AttemptClaimed, step="a", attempt=1)
    add(ev.AttemptStarted, step="a", attempt=1, pid=4242, start_time=1.0, boot_id="old")
    write_run(state_dir, run_id, ["a", "b", "c"], events, name="left", uid=uid, owner="me")
    wf = json.loads((state_dir / "runs" / run_id / "workflow.json").read_text())
    spec = json.loads(wf["workflow"])
    spec["steps"][2]["depends_on"] = ["a"]
    wf["workflow"] = json.dumps(spec)
    (state_dir / "runs" / run_id / "workflow.json").write_text(json.dumps(wf))


RUN = "20260101T000000Z-00000abc"


# ---- adoption ---------------------------------------------------------------------


@run_async
async def test_two_adoptions_of_one_run_clear_its_attempts_once(tmp_path: Path) -> None:
    left_running(tmp_path, RUN)
    h = await harness(tmp_path)
    assert h.unfinished == [RUN]
    first = asyncio.create_task(h.engine.adopt([RUN]))
    second = asyncio.create_task(h.engine.adopt([RUN]))
    await until(lambda: h.executor.stale_calls)
    await settle()
    assert not first.done() and not second.done(), "an adoption did not wait for the clear"
    third = asyncio.create_task(h.engine.adopt([RUN]))  # and one more, mid-way
    await settle()
    assert [[s.key for s in call] for call in h.executor.stale_calls] == [
        [AttemptKey(RUN, "a", 1)]], "the run's old attempts were cleared more than once"
    h.executor.release.set()
    await asyncio.gather(first, second, third)
    await until(lambda: len(h.executor.started) == 2)
    await h.engine.flushed()
    events = h.events(RUN)
    assert kinds(events).count("AttemptInterrupted") == 1
    claims = [(e["step"], e["attempt"]) for e in events if e["type"] == "AttemptClaimed"]
    assert claims == [("a", 1), ("b", 1), ("a", 2)] or claims == [("a", 1), ("a", 2), ("b", 1)]
    assert sorted(h.executor.started) == [AttemptKey(RUN, "a", 2), AttemptKey(RUN, "b", 1)]
    await h.close()


@run_async
async def test_requests_during_an_adoption_wait_for_it(tmp_path: Path) -> None:
    """A cancel waits for the adoption and records RunCancelRequested before the run is
    driven again: no new attempt is claimed, not even of the READY step `b`."""
    left_running(tmp_path, RUN)
    h = await harness(tmp_path)
    adoption = asyncio.create_task(h.engine.adopt(h.unfinished))
    await until(lambda: h.executor.stale_calls)
    cancel = asyncio.create_task(h.engine.cancel(RUN))
    with pytest.raises(UsageError, match="running already"):
        await h.engine.resume(RUN)  # a run being adopted is not adopted a second time
    await settle()
    assert not cancel.done(), "the cancel did not wait for the adoption"
    assert len(h.executor.stale_calls) == 1
    assert kinds(h.events(RUN))[-1] == "AttemptStarted", "recorded before the old tree died"

    h.executor.release.set()
    await asyncio.gather(adoption, cancel)
    run = await h.engine.get(RUN)
    assert run.state == st.CANCELLED
    events = h.events(RUN)
    assert kinds(events)[5:7] == ["AttemptInterrupted", "RunCancelRequested"], kinds(events)
    assert kinds(events).count("AttemptClaimed") == 1, "an attempt was claimed after the cancel"
    assert h.executor.started == [] and h.executor.killed == []
    assert {e["step"] for e in events if e["type"] == "StepCancelled"} == {"a", "b", "c"}
    assert (events[-1]["type"], events[-1]["state"]) == ("RunFinished", "CANCELLED")
    await h.close()


# ---- effects after their events are durable -----------------------------------------


def failing_disk(h: Harness) -> dict[str, bool]:
    """Make the committer's writes fail with ENOSPC while `switch["full"]` is True."""
    switch = {"full": False}
    write = h.engine.committer._write_batch

    def write_batch(lines: dict, opens: list) -> None:
        if switch["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(lines, opens)

    h.engine.committer._write_batch = write_batch  # type: ignore[method-assign]
    return switch


@run_async
async def test_a_kill_waits_for_its_cancel_to_be_durable(tmp_path: Path) -> None:
    """While events cannot be written: status shows the storage error, a submit is
    refused, and a cancel kills nothing; once the disk is back, the kill comes after
    RunCancelRequested is durable."""
    h = await harness(tmp_path)
    disk = failing_disk(h)
    run_id = await h.submit([{"id": "a", "command": "sleep 100"}])
    await until(lambda: h.executor.started)
    await h.engine.flushed()

    disk["full"] = True
    cancel = asyncio.create_task(h.engine.cancel(run_id))
    await until(lambda: h.engine.storage_error)
    await settle()
    assert h.executor.killed == [], "a kill before its cancel was on disk"
    run = await h.engine.get(run_id)
    status = h.engine.status(run)
    assert status.state == st.RUNNING and "No space left" in (status.error or ""), status
    with pytest.raises(StorageError, match="No space left"):
        await h.submit([{"id": "x", "command": "true"}])
    assert not cancel.done()

    disk["full"] = False
    await cancel
    events = h.events(run_id)
    cancel_seq = next(e["seq"] for e in events if e["type"] == "RunCancelRequested")
    assert [(k, r) for k, r, _ in h.executor.killed] == [(AttemptKey(run_id, "a", 1), "cancel")]
    assert h.executor.killed[0][2] >= cancel_seq, "killed before RunCancelRequested was durable"
    assert h.engine.storage_error is None and h.engine.status(run).error is None
    assert run.state == st.CANCELLED and events[-1]["state"] == "CANCELLED"
    await h.close()


# ---- memory: finished runs shrink back to stubs --------------------------------------


@run_async
async def test_a_finished_run_shrinks_back_to_a_stub_and_loads_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "KEEP_FINISHED", 2)
    h = await harness(tmp_path, exit_code=0)
    run_ids = []
    for i in range(4):
        run_id = await h.submit([{"id": "a", "command": "true"},
                                 {"id": "b", "command": "true", "depends_on": ["a"]}],
                                name=f"r{i}")
        await h.engine.finished(run_id)
        run_ids.append(run_id)
    first = run_ids[0]
    assert first not in h.engine.runs and first in h.engine.stubs
    assert first not in h.engine.ctx and first not in h.engine.committer.files
    assert run_ids[-1] in h.engine.runs  # the most recent ones stay folded
    summary = {s.run_id: s for s, _ in h.engine.summaries()}[first]
    assert (summary.state, summary.name) == (st.SUCCEEDED, "r0")

    run = await h.engine.get(first)
    assert run is not None and first in h.engine.runs and first not in h.engine.stubs
    expected = st.fold(run.workflow, (ev.json_decoder.decode(json.dumps(e))
                                      for e in h.events(first)))
    assert msgspec.to_builtins(h.engine.status(run)) == msgspec.to_builtins(
        st.run_status(expected))
    assert run.state == st.SUCCEEDED and run.steps["b"].state == st.SUCCEEDED
    await h.close()


# ---- a bug in deciding stops the daemon ----------------------------------------------


@run_async
async def test_an_illegal_transition_in_the_decide_loop_is_fatal(tmp_path: Path) -> None:
    h = await harness(tmp_path)
    run_id = await h.submit([{"id": "a", "command": "sleep 100"}])
    await until(lambda: h.executor.started)
    await h.engine.flushed()
    bogus = scheduler.Emit(run_id, ev.AttemptSucceeded, {"step": "a", "attempt": 7})
    h.engine.sched.decide = lambda now: scheduler.Decision([bogus])  # type: ignore[method-assign]
    h.engine.kick()
    exc = await asyncio.wait_for(h.engine.fatal, 5)
    assert isinstance(exc, IllegalTransition), exc
    assert h.engine.runs[run_id].steps["a"].attempts == 1  # nothing applied
    h.committer.cancel()
    await asyncio.gather(h.committer, return_exceptions=True)
    h.engine._parser.shutdown()


# ---- time: run ids and deadlines do not trust the wall clock --------------------------


def test_run_ids_stay_ordered_when_the_clock_steps_back() -> None:
    now = 1_800_000_000.25
    last = new_run_id(now, "")
    ids = [last]
    started = time.monotonic()
    for step_back in (0.0, 1e-7, 1.0, 3600.0, 86400 * 365, now):  # down to the epoch
        for _ in range(50):
            ids.append(new_run_id(now - step_back, ids[-1]))
    assert time.monotonic() - started < 1.0, "new_run_id took its time: a loop?"
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    micros = [engine_mod._micros_of(run_id) for run_id in ids[1:]]
    assert all(b == a + 1 for a, b in zip(micros, micros[1:], strict=False)), \
        "a stepped-back id should carry the last id's time + 1 us"
    assert ids[0].startswith(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))


def test_run_ids_roll_over_a_second_and_ignore_foreign_names() -> None:
    last = "20261125T095852Z-f423f000"  # 999,999 us into its second
    rolled = new_run_id(0.0, last)
    assert rolled > last and rolled.startswith("20261125T095853Z-00000")
    assert new_run_id(1_800_000_000.0, "my-own-run") > "20270115T080000Z"  # not ours: the clock
    started = time.monotonic()
    far = new_run_id(1_800_000_000.0, "99991231T235959Z-f423f000")  # a dir stamped far ahead
    assert time.monotonic() - started < 0.1 and far


def test_the_clock_does_not_follow_wall_clock_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    before = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert abs(clock.now() - before) < 5
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert abs(clock.now() - before) < 5


@run_async
async def test_timeouts_and_backoff_follow_the_engines_clock_not_the_wall_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock steps an hour back before the attempt starts, then two hours ahead:
    nothing times out and no retry comes early. The engine's clock moves past the
    deadline: the attempt is killed as timed out; past the retry time: the next attempt
    starts."""
    clock = ShiftedClock()
    h = await harness(tmp_path, clock=clock)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    run_id = await h.submit([{"id": "a", "command": "sleep 100", "timeout": 10, "retries": 1,
                              "backoff": {"initial": 5, "factor": 1}}])
    await until(lambda: h.executor.started)
    await h.engine.flushed()
    await until(lambda: "AttemptStarted" in kinds(h.events(run_id)))
    h.engine.kick()
    await settle()
    assert h.executor.killed == [], "a deadline came from the wall clock"
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    h.engine.kick()
    await settle()
    assert h.executor.killed == [], "a wall clock jump timed the attempt out"

    clock.offset = 11
    h.engine.kick()
    await until(lambda: h.executor.killed)
    assert h.executor.killed[0][:2] == (AttemptKey(run_id, "a", 1), "timeout")
    run = await h.engine.get(run_id)
    await until(lambda: run.steps["a"].state == st.RETRY_WAIT)
    assert abs(ev.parse_ts(run.steps["a"].retry_at) - (clock.now() + 5)) < 1

    monkeypatch.setattr(time, "time", lambda: real() + 7200)
    h.engine.kick()
    await settle()
    assert h.executor.started == [AttemptKey(run_id, "a", 1)], "the retry came early"
    clock.offset = 17
    h.engine.kick()
    await until(lambda: len(h.executor.started) == 2)
    assert h.executor.started[1] == AttemptKey(run_id, "a", 2)
    await h.close()
