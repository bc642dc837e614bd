"""Step output as wfctl shows it besides `logs RUN STEP`: the last lines of each failed
step under a status table, and every step's output of a run, each line prefixed with
its step (`wfctl logs RUN`, as `docker compose logs` does).

The daemon keeps no time per output line (a step writes its log file itself), so
"time order" is the order in which attempts started: an attempt's lines come after
those of every attempt that started before it. With `--follow`, output that comes
while the run goes on is shown as it comes, polled every FOLLOW_POLL seconds, so the
lines of steps running side by side interleave as they were written, give or take a
poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from wfd import protocol
from wfd.errors import WfdError
from wfd.text import printable

if TYPE_CHECKING:
    from wfctl.conn import Connection
    from wfd.state import RunStatus, StepStatus

FAILED = "FAILED"
TAILS_SHOWN = 5  # failed steps whose tails are shown; past that, a line says how many more
FOLLOW_POLL = 0.25  # seconds between looks at a followed run's logs


# ---- the tails of failed steps ---------------------------------------------------------


def failure_tails(connect: Callable[[], Connection], status: RunStatus,
                  lines: int) -> list[str]:
    """Under a run's table: the last `lines` lines of each FAILED step's last attempt. The
    tails are a help, not the answer: a log that cannot be read is named, not fatal."""
    failed = [(sid, step) for sid, step in status.steps.items()
              if step.state == FAILED and step.attempts >= 1]
    if lines <= 0 or not failed:
        return []
    text: list[str] = []
    try:
        conn = connect()
    except WfdError as e:
        return ["", f"(the failed steps' logs cannot be read: {e.message})"]
    for step_id, step in failed[:TAILS_SHOWN]:
        text.append("")
        head = f"{step_id} (attempt {step.attempts}) failed"
        try:
            data = read_log(conn, status.run_id, step_id, step.attempts, tail=lines)
        except WfdError as e:
            text.append(f"{head}; its log cannot be read: {e.message}")
            continue
        shown = data.splitlines()[-lines:]
        text.append(f"{head}, the last {len(shown)} line{'' if len(shown) == 1 else 's'} "
                    "of its log:" if shown else f"{head} with no output")
        text += ["  " + printable(line.decode("utf-8", "replace")) for line in shown]
    more = len(failed) - TAILS_SHOWN
    if more > 0:
        text += ["", f"{more} more failed step{'' if more == 1 else 's'}: "
                     f"wfctl logs {status.run_id} STEP"]
    return text


def read_log(conn: Connection, run_id: str, step: str, attempt: int, offset: int = 0,
             tail: int = 0) -> bytes:
    """One attempt's log from `offset` (or its last `tail` lines) as it is now."""
    request = protocol.Logs(run_id=run_id, step=step, attempt=attempt, offset=offset,
                            tail=tail)
    return b"".join(chunk.data for chunk in _chunks(conn, request))


def _chunks(conn: Connection, request: protocol.Logs) -> Iterator[protocol.LogData]:
    from wfctl.conn import expect

    for reply in conn.stream(request):
        if isinstance(reply, protocol.LogEnd):
            return
        yield expect(reply, protocol.LogData, conn.path)  # type: ignore[misc]


# ---- every step's output ----------------------------------------------------------------


class Interleaver:
    """Every attempt's output of one run, a whole line at a time, prefixed with its step
    (`step | `, `step#2 | ` for a later attempt); what it has read of each is kept, so a
    followed run is read on from where it was."""

    def __init__(self, conn: Connection, run_id: str, write: Callable[[bytes], None]) -> None:
        self.conn = conn
        self.run_id = run_id
        self.write = write
        self.offsets: dict[tuple[str, int], int] = {}
        self.partial: dict[tuple[str, int], bytes] = {}
        self.width = 0

    def attempts(self, status: RunStatus) -> list[tuple[str, int, StepStatus]]:
        """(step, attempt) pairs in the order they started: by the step's first start,
        then attempt number (a step's attempts never overlap)."""
        started = [(sid, step) for sid, step in status.steps.items() if step.attempts >= 1]
        started.sort(key=lambda item: item[1].started_at or "")
        return [(sid, n, step) for sid, step in started for n in range(1, step.attempts + 1)]

    def pass_over(self, status: RunStatus, final: bool) -> None:
        """Read what is new in every attempt; an attempt that is over (or everything,
        when `final`) has its last line shown even without a newline."""
        labels = (_label(sid, max(1, step.attempts)) for sid, step in status.steps.items())
        self.width = max([self.width, *map(len, labels)])
        for step_id, attempt, step in self.attempts(status):
            key = (step_id, attempt)
            over = final or attempt < step.attempts or step.state not in LIVE
            if key in self.offsets and self.partial.get(key) is None:
                continue  # read to its end, and it was over then
            data = read_log(self.conn, self.run_id, step_id, attempt, self.offsets.get(key, 0))
            self.offsets[key] = self.offsets.get(key, 0) + len(data)
            self._emit(key, self.partial.get(key, b"") + data, over)

    def _emit(self, key: tuple[str, int], data: bytes, over: bool) -> None:
        lines = data.split(b"\n")
        rest = lines.pop()  # after the last newline: a line still being written
        if over and rest:
            lines.append(rest)
            rest = b""
        prefix = _label(*key).ljust(self.width).encode() + b" | "
        if lines:
            self.write(b"".join(prefix + line + b"\n" for line in lines))
        self.partial[key] = None if over else rest  # type: ignore[assignment]


LIVE = frozenset({"RUNNING"})  # a step whose latest attempt may still write
UNFINISHED = frozenset({"RUNNING", "QUEUED"})  # a run whose steps may still write


def _label(step: str, attempt: int) -> str:
    return step if attempt == 1 else f"{step}#{attempt}"


def all_logs(conn: Connection, run_id: str, follow: bool,
             write: Callable[[bytes], None]) -> RunStatus:
    """Print every step's output of the run; with `follow` until the run is over."""
    status = conn.call(protocol.Status(run_id=run_id), protocol.RunInfo).status  # type: ignore[attr-defined]
    view = Interleaver(conn, status.run_id, write)
    while follow and status.state in UNFINISHED:
        view.pass_over(status, final=False)
        time.sleep(FOLLOW_POLL)
        status = conn.call(protocol.Status(run_id=status.run_id),
                           protocol.RunInfo).status  # type: ignore[attr-defined]
    view.pass_over(status, final=True)
    return status
