"""The run directories on disk: workflow.json, events.jsonl, logs/.

Layout (SPEC 3): `<state-dir>/runs/<run_id>/` holds `workflow.json` (the
submission, written and fsync'd before the run is acknowledged),
`events.jsonl` (one event per line, appended and fsync'd before the daemon
acts on it) and `logs/<step>.<attempt>.log`. Directories are 0700, files 0600,
and nothing here follows a symlink: a root daemon must not be led into
writing elsewhere by a link someone planted.

Reading a log distinguishes a torn tail (the last line has no newline: a crash
in mid-write; dropped, and cut off before the next append) from damage
anywhere else (the run is CORRUPT; the line is named).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from wfd import events as ev

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUBMISSION_FORMAT = 1
EVENTS = "events.jsonl"
WORKFLOW = "workflow.json"
LOGS = "logs"

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class Submission(msgspec.Struct, kw_only=True):
    """workflow.json: the exact workflow text and the context it was submitted in.

    Holds the submitting client's environment, which may contain secrets: the
    file is 0600 in a 0700 directory."""

    format: int = SUBMISSION_FORMAT
    workflow: str
    source: str
    base_dir: str
    env: dict[str, str]
    umask: int
    uid: int
    gid: int
    owner: str
    submitted_at: str


_submission_decoder = msgspec.json.Decoder(Submission)


def valid_run_id(run_id: str) -> bool:
    return RUN_ID_RE.fullmatch(run_id) is not None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (never an existing file or a symlink), write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, limit: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


class Layout:
    """Paths inside one state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.runs = state_dir / "runs"

    def run_dir(self, run_id: str) -> Path:
        if not valid_run_id(run_id):
            raise ValueError(f"malformed run id {run_id!r}")
        return self.runs / run_id

    def events(self, run_id: str) -> Path:
        return self.run_dir(run_id) / EVENTS

    def log(self, run_id: str, step: str, attempt: int) -> Path:
        return self.run_dir(run_id) / LOGS / f"{step}.{attempt}.log"

    def run_ids(self) -> list[str]:
        """Run directories present, oldest first (run ids sort by creation time)."""
        try:
            names = os.listdir(self.runs)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_run_id(n))

    def create_run(self, run_id: str, submission: Submission) -> None:
        """Make the run's directory and durable workflow.json, and an empty events.jsonl."""
        run_dir = self.run_dir(run_id)
        os.mkdir(run_dir, 0o700)
        os.mkdir(run_dir / LOGS, 0o700)
        write_new_file(run_dir / WORKFLOW, msgspec.json.encode(submission))
        write_new_file(run_dir / EVENTS, b"")
        fsync_dir(run_dir)
        fsync_dir(self.runs)

    def remove_run(self, run_id: str) -> None:
        """Undo a `create_run` that failed half-way (the run was never acknowledged)."""
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def read_submission(self, run_id: str) -> Submission:
        return _submission_decoder.decode(read_file(self.run_dir(run_id) / WORKFLOW))

    def open_log_for_step(self, run_id: str, step: str, attempt: int) -> int:
        """The fd a step writes its output to; a fresh file per attempt, never reused."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC | _NOFOLLOW
        return os.open(self.log(run_id, step, attempt), flags, 0o600)


# ---- reading a log ---------------------------------------------------------------


@dataclass
class LogRead:
    """A log file parsed: its committed events and what was wrong with it."""

    events: list[ev.Event] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    good_size: int = 0  # bytes up to and including the last committed newline
    torn_tail: str | None = None
    problem: str | None = None  # a damaged line other than the last: the run is corrupt


def parse_log(data: bytes) -> LogRead:
    """Split, decode and check the lines of an events.jsonl image."""
    result = LogRead()
    end = data.rfind(b"\n") + 1
    result.good_size = end
    if end < len(data):
        result.torn_tail = (
            f"torn last line ({len(data) - end} bytes without a newline) dropped"
        )
    body = data[:end]
    try:
        events = ev.json_decoder.decode_lines(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        events = None
    lines = body.splitlines()
    if events is not None and len(events) == len(lines):
        result.events, result.lines = events, lines
    else:  # a damaged line, or a blank one (decode_lines skips those without a word)
        _parse_line_by_line(body, result)
    return result


def _parse_line_by_line(body: bytes, result: LogRead) -> None:
    """Slow path, only for a damaged log: find and name the first bad line."""
    for number, line in enumerate(body.splitlines(), start=1):
        try:
            result.events.append(ev.json_decoder.decode(line))
            result.lines.append(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            result.problem = f"damaged line {number}: {exc}"
            return


def read_log(path: Path, repair: bool) -> LogRead:
    """Read a run's log; with `repair`, cut a torn tail off the file itself (recovery
    does this before anything is appended, so a new line never extends a half one)."""
    data = read_file(path)
    result = parse_log(data)
    if repair and result.torn_tail is not None:
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW)
        try:
            os.ftruncate(fd, result.good_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    return result


TAIL = 64 * 1024


def read_ends(path: Path) -> tuple[ev.Event, ev.Event] | None:
    """The first and last events of a log, reading only its ends; None when the file
    is empty, torn, has an overlong last line, or an end does not decode."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        first = f.readline(TAIL)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL))
        tail = f.read()
    if not first.endswith(b"\n") or not tail.endswith(b"\n"):
        return None
    cut = tail.rfind(b"\n", 0, len(tail) - 1)
    if cut < 0 and size > len(tail):
        return None
    try:
        return ev.json_decoder.decode(first), ev.json_decoder.decode(tail[cut + 1:])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# ---- appending ------------------------------------------------------------------


class AppendLog:
    """One run's events.jsonl as the single writer appends to it.

    `size` is the length of the committed prefix: a failed append is cut back to
    it, so a retry never leaves half a line in the middle. The file is opened per
    append rather than held open: a thousand active runs must not use a thousand
    descriptors (and steps must not inherit a raised descriptor limit)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.dirty = False  # bytes past `size` may be on disk from a failed append

    def append(self, data: bytes) -> None:
        """Write and fsync `data` (whole lines) at the committed end; all or nothing."""
        fd = os.open(self.path, os.O_WRONLY | _NOFOLLOW)
        try:
            if self.dirty:
                os.ftruncate(fd, self.size)
                self.dirty = False
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], self.size + written)
            os.fsync(fd)
        except OSError:
            self._cut_back(fd)
            raise
        finally:
            os.close(fd)
        self.size += len(data)

    def _cut_back(self, fd: int) -> None:
        try:
            os.ftruncate(fd, self.size)
        except OSError:
            self.dirty = True  # the next append truncates before it writes
