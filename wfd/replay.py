"""`wfctl replay` and `Watch` history: a run's persisted log, read a block at a time.

A run's log may hold a million events (17 MB for a finished 20,000-step run):
read whole, and decoded into events, it would cost the daemon hundreds of MB
per request. So it is read here in blocks of whole lines, up to the size it
had when the reader opened it (lines the committer adds meanwhile are not
there yet: a watcher gets those as they become durable), and each block is
handed on before the next is read.

Everything here runs in a worker thread and touches no engine state: it gets
the file and the run's workflow (immutable) from the loop, and returns plain
values. The checks are those of recovery (`eventlog.parse_log`,
`store.fold_checked`): a damaged line ends the log there, an illegal
transition or a seq gap ends the fold there, a torn last line is noted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec

from wfd import events as ev
from wfd import protocol as p
from wfd import state as st
from wfd.errors import IllegalTransition
from wfd.eventlog import open_file
from wfd.workflow import Workflow

BLOCK = 256 * 1024  # bytes of the log read at once


class LogReader:
    """A run's events.jsonl as it was when opened, a block of whole lines at a time."""

    def __init__(self, path: os.PathLike) -> None:
        self.name = os.path.basename(os.fspath(path))
        self.fd = open_file(path, os.O_RDONLY)  # OSError if it cannot be read
        self.size = os.fstat(self.fd).st_size
        self.offset = 0
        self.number = 0  # lines read so far
        self.torn_tail: str | None = None
        self.problem: str | None = None  # the first damaged line; nothing after it counts

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blocks(self) -> Iterator[list[tuple[bytes, ev.Event]]]:
        """Each block's lines with their events, in order, until the end or the first
        damaged line."""
        rest = b""
        while self.offset < self.size and self.problem is None:
            data = os.pread(self.fd, min(BLOCK, self.size - self.offset), self.offset)
            if not data:  # cut short meanwhile (it never is, once committed)
                break
            self.offset += len(data)
            data = rest + data
            end = data.rfind(b"\n") + 1
            rest = data[end:]
            if end:
                yield self._decode(data[:end])
        if rest:
            self.torn_tail = f"torn last line ({len(rest)} bytes without a newline) dropped"

    def _decode(self, body: bytes) -> list[tuple[bytes, ev.Event]]:
        lines = body.splitlines()
        try:
            events = ev.json_decoder.decode_lines(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            events = None
        if events is not None and len(events) == len(lines):  # else a damaged or blank line
            self.number += len(lines)
            return list(zip(lines, events, strict=True))
        good = []
        for line in lines:
            self.number += 1
            try:
                good.append((line, ev.json_decoder.decode(line)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.problem = f"damaged line {self.number}: {exc}"
                break
        return good


def events_after(path: os.PathLike, after_seq: int) -> Iterator[list[ev.Event]]:
    """The committed events with `seq > after_seq`, a block at a time (for `Watch`);
    nothing if the log cannot be read."""
    try:
        reader = LogReader(path)
    except OSError:
        return
    with reader:
        for block in reader.blocks():
            events = [event for _, event in block if event.seq > after_seq]
            if events:
                yield events


class Replay:
    """Re-folds a run's persisted log from scratch: `blocks` gives the log's lines, each
    with a readable transition while the fold goes on, and `result` the state they fold
    to and the problems found. `workflow` None: the run's workflow.json cannot be read,
    so there is nothing to fold against; the run's `status` and `error` as loaded are
    reported instead, and every event gets its transition."""

    def __init__(self, path: os.PathLike, workflow: Workflow | None,
                 status: st.RunStatus | None = None, error: str | None = None) -> None:
        self.path = path
        self.status = status
        self.error = error
        self.run = st.RunState(workflow) if workflow is not None else None
        self.folding = True
        self.lines = 0
        self.problem: str | None = None  # an illegal transition or a seq gap
        self.damaged: str | None = None  # a line that is not an event: the log ends there
        self.unreadable: str | None = None
        self.torn_tail: str | None = None

    def blocks(self) -> Iterator[list[tuple[str, str | None]]]:
        """(line, transition) pairs, a block at a time; the transition is None once the
        fold has stopped at a problem (the lines go on to the end of the log)."""
        try:
            reader = LogReader(self.path)
        except OSError as exc:
            name = os.path.basename(os.fspath(self.path))
            self.unreadable = f"cannot read {name}: {exc.strerror or exc}"
            return
        with reader:
            for block in reader.blocks():
                yield [(line.decode(errors="replace"), self._fold(event))
                       for line, event in block]
            self.torn_tail = reader.torn_tail
            self.damaged = reader.problem

    def _fold(self, event: ev.Event) -> str | None:
        self.lines += 1
        if not self.folding:
            return None
        if self.run is not None:
            try:
                st.apply(self.run, event)
            except IllegalTransition as exc:
                self.problem = f"line {self.lines}: {exc.message}"
                self.folding = False
                return None
        return transition(event)

    def result(self) -> tuple[p.Replayed, st.RunState | None]:
        """The end of the replay (after `blocks` is exhausted): its last message, with no
        lines (those went in parts) and the folded state without its steps, and the run
        folded, whose steps go with it (`st.step_statuses`)."""
        if self.unreadable is not None:
            return p.Replayed([], [], None, [self.unreadable]), None
        if self.run is None:
            problems = [self.error or "workflow.json unreadable"]
            return p.Replayed([], [], self.status, problems, self.torn_tail), None
        problem = self.problem or self.damaged
        if problem is not None:
            self.run.state = st.CORRUPT
            self.run.error = problem
        header = st.run_status(self.run, steps=False)
        return p.Replayed([], [], header, [problem] if problem else [], self.torn_tail), self.run


def transition(event: ev.Event) -> str:
    """One readable line per event: seq, time, what happened."""
    return f"{event.seq:>6}  {event.ts}  {st.describe(event)}"
