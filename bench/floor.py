"""The floors: a small in-process DAG executor, with and without durable events.

`raw`: `parallel` worker threads take READY steps in order and run each with
`subprocess.run(command, shell=True)` (so `/bin/sh -c`, as wfd runs a string
command); a step's dependents become READY when it exits 0. Nothing is
written anywhere: this is what running the commands costs in Python.

`durable`: raw plus what a durable engine cannot avoid, modelled on wfd's log
(SPEC 3): three JSON events per step, appended to one file by a single writer
thread, each fsync'd before it is acted on:

1. `claimed`, durable before the process is spawned;
2. `started` with the pid, once it runs;
3. `succeeded`, durable before any dependent starts.

Variants: group commit (the writer takes every line queued so far into one
write + fsync) or one fsync per event; and a log file per step (created per
attempt and given to the step as stdout and stderr, as wfd does) or output to
/dev/null. Group commit + a log file per step is *the durable floor*: what a
durable engine written in Python, with wfd's guarantees, costs at least.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bench.workloads import Step


class StepFailed(Exception):
    """A step's command exited non-zero: the run stops, the runner reports the step."""


def run_dag(steps: Sequence[Step], parallel: int, run_step: Callable[[Step], None]) -> None:
    """Run `steps` respecting dependencies, at most `parallel` at a time, in file order
    among the READY ones. Raises the first step's exception (after the workers stop)."""
    index = {s.id: i for i, s in enumerate(steps)}
    waiting = [len(s.deps) for s in steps]
    dependents: list[list[int]] = [[] for _ in steps]
    for i, s in enumerate(steps):
        for d in s.deps:
            dependents[index[d]].append(i)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    cond = threading.Condition()
    state = {"done": 0, "error": None}
    total = len(steps)

    def worker() -> None:
        while True:
            with cond:
                while not ready and state["done"] < total and state["error"] is None:
                    cond.wait()
                if state["done"] >= total or state["error"] is not None:
                    return
                i = ready.popleft()
            try:
                run_step(steps[i])
            except BaseException as exc:  # noqa: B902 - report any failure, stop the others
                with cond:
                    state["error"] = state["error"] or exc
                    cond.notify_all()
                return
            with cond:
                state["done"] += 1
                for j in dependents[i]:
                    waiting[j] -= 1
                    if waiting[j] == 0:
                        ready.append(j)
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["error"] is not None:
        raise state["error"]  # type: ignore[misc]


def run_raw(steps: Sequence[Step], parallel: int) -> None:
    def run_step(step: Step) -> None:
        code = subprocess.run(
            step.command, shell=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ).returncode
        if code != 0:
            raise StepFailed(f"step {step.id} exited with status {code}")

    run_dag(steps, parallel, run_step)


# ---- durable -------------------------------------------------------------------


class Claimed(msgspec.Struct, tag=True, tag_field="type"):
    seq: int
    ts: str
    step: str
    attempt: int


class Started(msgspec.Struct, tag=True, tag_field="type"):
    seq: int
    ts: str
    step: str
    attempt: int
    pid: int


class Succeeded(msgspec.Struct, tag=True, tag_field="type"):
    seq: int
    ts: str
    step: str
    attempt: int


def _ts() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class EventWriter:
    """One writer thread appending JSON lines to one file; `append` returns a ticket,
    `wait(ticket)` returns once that line (and every one before it) is fsync'd."""

    def __init__(self, path: Path, group_commit: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.group_commit = group_commit
        self.encoder = msgspec.json.Encoder()
        self.cond = threading.Condition()
        self.pending: deque[bytes] = deque()
        self.seq = 0  # lines queued
        self.durable = 0  # lines fsync'd
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def append(self, make: Callable[[int], msgspec.Struct]) -> int:
        with self.cond:
            self.seq += 1
            self.pending.append(self.encoder.encode(make(self.seq)) + b"\n")
            self.cond.notify_all()
            return self.seq

    def wait(self, ticket: int) -> None:
        with self.cond:
            while self.durable < ticket and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error

    def _loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.pending and not self.closed:
                        self.cond.wait()
                    if not self.pending:
                        return
                    if self.group_commit:
                        batch = list(self.pending)
                        self.pending.clear()
                    else:
                        batch = [self.pending.popleft()]
                data = b"".join(batch)
                while data:
                    data = data[os.write(self.fd, data):]
                os.fsync(self.fd)
                with self.cond:
                    self.durable += len(batch)
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: B902 - hand it to every waiter
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()
        os.close(self.fd)


@dataclass(frozen=True)
class Durable:
    group_commit: bool
    step_logs: bool

    @property
    def name(self) -> str:
        """`durable` is the floor; the other variants name what they leave out."""
        return "durable" + ("" if self.group_commit else "-nogc") + (
            "" if self.step_logs else "-nolog")

    def describe(self) -> str:
        gc = "group commit" if self.group_commit else "one fsync per event"
        logs = "log file per step" if self.step_logs else "output to /dev/null"
        return f"{gc}, {logs}"


DURABLE_VARIANTS = (
    Durable(True, True),
    Durable(False, True),
    Durable(True, False),
    Durable(False, False),
)


def run_durable(steps: Sequence[Step], parallel: int, variant: Durable, work: Path) -> None:
    """Run `steps` with events in `work`/events.jsonl and logs in `work`/logs."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    writer = EventWriter(work / "events.jsonl", variant.group_commit)
    log_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC

    def run_step(step: Step) -> None:
        writer.wait(writer.append(lambda seq: Claimed(seq, _ts(), step.id, 1)))
        out = os.open(logs / f"{step.id}.1.log", log_flags, 0o600) if variant.step_logs else None
        try:
            proc = subprocess.Popen(
                step.command, shell=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if out is None else out, stderr=subprocess.STDOUT,
            )
        finally:
            if out is not None:
                os.close(out)
        writer.append(lambda seq: Started(seq, _ts(), step.id, 1, proc.pid))
        code = proc.wait()
        if code != 0:
            raise StepFailed(f"step {step.id} exited with status {code}")
        writer.wait(writer.append(lambda seq: Succeeded(seq, _ts(), step.id, 1)))

    try:
        run_dag(steps, parallel, run_step)
    finally:
        writer.close()
