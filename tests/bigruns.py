"""Big runs made straight on disk, for tests of replies that no frame could hold.

Running 20,000 steps through a daemon takes minutes; writing their log takes a
second. These write run directories as the daemon does (workflow.json, then
events.jsonl, 0700/0600) with logs that fold cleanly, for a daemon started
afterwards to find: a finished run whose every step succeeded, a cancelled
run of many steps, many small runs, a step's output of any size.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec

from wfd import events as ev
from wfd.eventlog import Submission

TS = "2026-01-01T00:00:00.000000Z"


def _run_dir(state_dir: Path, run_id: str) -> Path:
    runs = state_dir / "runs"
    runs.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    path = runs / run_id
    path.mkdir(mode=0o700)
    (path / "logs").mkdir(mode=0o700)
    return path


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_run(state_dir: Path, run_id: str, steps: list[str], events: list[ev.Event],
              name: str = "big", uid: int = 0, owner: str = "root") -> Path:
    """A run dir with a workflow of independent `true` steps and the given events."""
    run_dir = _run_dir(state_dir, run_id)
    workflow = json.dumps({"name": name, "steps": [{"id": s, "command": "true"}
                                                   for s in steps]})
    sub = Submission(workflow=workflow, source=f"{name}.json", base_dir="/", env={},
                     umask=0o022, uid=uid, gid=uid, owner=owner, submitted_at=TS)
    _write(run_dir / "workflow.json", msgspec.json.encode(sub))
    _write(run_dir / "events.jsonl", b"".join(ev.encode_line(e) for e in events))
    return run_dir


def step_ids(count: int, width: int = 12) -> list[str]:
    return [f"s{i:0{width - 1}d}" for i in range(count)]


def succeeded_run(state_dir: Path, run_id: str, steps: list[str], name: str = "big",
                  uid: int = 0, owner: str = "root") -> Path:
    """A finished SUCCEEDED run: each step ready, claimed, started, succeeded."""
    events: list[ev.Event] = [ev.RunCreated(seq=1, ts=TS, run_id=run_id, name=name,
                                            owner=owner, owner_uid=uid)]

    def add(kind: type[ev.Event], **fields: object) -> None:
        events.append(kind(seq=len(events) + 1, ts=TS, **fields))

    for step in steps:
        add(ev.StepReady, step=step)
        add(ev.AttemptClaimed, step=step, attempt=1)
        add(ev.AttemptStarted, step=step, attempt=1, pid=12345, start_time=1.0,
            boot_id="00000000-0000-0000-0000-000000000000")
        add(ev.AttemptSucceeded, step=step, attempt=1)
    add(ev.RunFinished, state="SUCCEEDED")
    return write_run(state_dir, run_id, steps, events, name, uid, owner)


def cancelled_run(state_dir: Path, run_id: str, steps: list[str], name: str = "big",
                  uid: int = 0, owner: str = "root") -> Path:
    """A finished CANCELLED run whose steps never started: one event per step."""
    events: list[ev.Event] = [
        ev.RunCreated(seq=1, ts=TS, run_id=run_id, name=name, owner=owner, owner_uid=uid),
        ev.RunCancelRequested(seq=2, ts=TS)]
    events += [ev.StepCancelled(seq=3 + i, ts=TS, step=step) for i, step in enumerate(steps)]
    events.append(ev.RunFinished(seq=len(events) + 1, ts=TS, state="CANCELLED"))
    return write_run(state_dir, run_id, steps, events, name, uid, owner)


def run_id(i: int) -> str:
    """Distinct, well-formed, sorted run ids, all in the past."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(1767225600 + i // 1000))
    return f"{stamp}-{i % 1000:08x}"


def step_output(run_dir: Path, step: str, size: int) -> Path:
    """`size` bytes of output of the step's attempt 1, lines of printable text."""
    line = b"".join(bytes([48 + i % 43]) for i in range(99)) + b"\n"
    path = run_dir / "logs" / f"{step}.1.log"
    with open(path, "wb") as f:
        f.write(line * (size // len(line)) + line[:size % len(line)])
    os.chmod(path, 0o600)
    return path


def finished_run(state_dir: Path, run_id: str, state: str, name: str = "small",
                 ts: str = TS, uid: int = 0, owner: str = "root") -> Path:
    """A finished run of one step `s` in `state` (SUCCEEDED, FAILED or CANCELLED), every
    event stamped `ts` (its creation time, for filters by time)."""
    events: list[ev.Event] = [ev.RunCreated(seq=1, ts=ts, run_id=run_id, name=name,
                                            owner=owner, owner_uid=uid)]

    def add(kind: type[ev.Event], **fields: object) -> None:
        events.append(kind(seq=len(events) + 1, ts=ts, **fields))

    if state == "CANCELLED":
        add(ev.RunCancelRequested)
        add(ev.StepCancelled, step="s")
    else:
        add(ev.StepReady, step="s")
        add(ev.AttemptClaimed, step="s", attempt=1)
        add(ev.AttemptStarted, step="s", attempt=1, pid=12345, start_time=1.0,
            boot_id="00000000-0000-0000-0000-000000000000")
        if state == "SUCCEEDED":
            add(ev.AttemptSucceeded, step="s", attempt=1)
        else:
            add(ev.StepFailed, step="s", attempt=1, exit_code=1, error="exited with status 1")
    add(ev.RunFinished, state=state)
    return write_run(state_dir, run_id, ["s"], events, name, uid, owner)
