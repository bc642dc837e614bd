"""The run directories on disk: workflow.json, events.jsonl, logs/.

Layout (SPEC 3): `<state-dir>/runs/<run_id>/` holds `workflow.json` (the
submission, written and fsync'd before the run is acknowledged),
`events.jsonl` (one event per line, appended and fsync'd before the daemon
acts on it) and `logs/<step>.<attempt>.log`. Directories are 0700, files 0600.

Nothing under the state dir is reached through a symlink: every file of a run
is opened one directory at a time from the runs dir (`openat` with
O_NOFOLLOW at each level), so a planted `runs/<id>` or `runs/<id>/logs` link
is refused (ELOOP), not followed; and `check_state_dir` refuses, at startup,
a state dir that someone other than the daemon's user could plant runs in. A
root daemon must not be led into reading a forged run or writing elsewhere.

A run exists once its first event is durable. A run dir without one is what
a crash while a run was being created leaves behind: it was never
acknowledged, and `discard_unacknowledged` removes it at the next start.

Reading a log distinguishes a torn tail (the last line has no newline: a crash
in mid-write; dropped, and cut off before the next append) from damage
anywhere else (the run is CORRUPT; the line is named).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from wfd import events as ev
from wfd import faults

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUBMISSION_FORMAT = 1
EVENTS = "events.jsonl"
WORKFLOW = "workflow.json"
LOGS = "logs"
TOMBSTONE = ".pruned-"  # a run dir being pruned (not a run id: loading never sees it)

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW

log = logging.getLogger("wfd")


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


class UnsafeStateDir(Exception):
    """The state dir (or its `runs/`) could be written by someone other than the
    daemon's user, who could then plant a run that the daemon would run as anyone
    (a forged `"uid": 0`). Raised at startup; the daemon refuses to start."""


def check_state_dir(state_dir: Path, system: bool) -> None:
    """Refuse a state dir or `runs/` not owned by the daemon's user (root for a system
    daemon) or writable by others; for a system daemon, writable by its group either.
    `runs/` must not be a symlink. The state dir itself is taken as given (a symlink
    there is the administrator's choice; its target is what is checked). Raises
    UnsafeStateDir, or OSError when it cannot be opened at all."""
    uid = os.geteuid()
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_owner(state_dir, os.fstat(fd), uid, system)
        runs = state_dir / "runs"
        try:
            runs_fd = os.open("runs", _DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeStateDir(f"{runs} is a symlink or not a directory") from None
            raise
        try:
            _check_owner(runs, os.fstat(runs_fd), uid, system)
        finally:
            os.close(runs_fd)
    finally:
        os.close(fd)


def _check_owner(path: Path, info: os.stat_result, uid: int, system: bool) -> None:
    if info.st_uid != uid:
        raise UnsafeStateDir(
            f"{path} belongs to uid {info.st_uid}, not to uid {uid} that wfd runs as; "
            "whoever owns it could plant runs for wfd to run (chown it, or use another "
            "state dir)")
    open_to = info.st_mode & (0o022 if system else 0o002)
    if open_to:
        who = "its group and others" if open_to == 0o022 else (
            "its group" if open_to == 0o020 else "others")
        raise UnsafeStateDir(
            f"{path} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o}); they "
            f"could plant runs for wfd to run (chmod go-w {path})")


def _checked(run_id: str) -> str:
    """The run id, once it is known to be safe as a file name."""
    if not valid_run_id(run_id):
        raise ValueError(f"malformed run id {run_id!r}")
    return run_id


def open_file(path: os.PathLike | str, flags: int, mode: int = 0o600) -> int:
    """`os.open` that follows no symlink: a `RunPath` is walked from its runs dir one
    directory at a time; any other path is opened with O_NOFOLLOW on its last part."""
    if isinstance(path, RunPath):
        return path.open(flags, mode)
    return os.open(path, flags | _NOFOLLOW, mode)


def write_new_file(path: os.PathLike | str, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (never an existing file or a symlink), write, fsync."""
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: os.PathLike | str) -> None:
    """Make the names in a directory durable (a new or renamed file's entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """Put `data` at `path` whole or not at all, durably: a temporary file beside it
    (a stale one from a crash is replaced), fsync'd, renamed over `path`, the directory
    fsync'd."""
    tmp = f"{path}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    write_new_file(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_file(path: os.PathLike | str, limit: int | None = None) -> bytes:
    fd = open_file(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


class RunPath(os.PathLike):
    """A file in a run's directory, named by its parts below `runs/` (run id, then
    maybe `logs`, then the file name), and opened without following any symlink
    (`open`, or `open_file`). It is also a plain path (`os.fspath`, `str`, `name`)
    for messages; opening that path directly would skip the checks."""

    __slots__ = ("layout", "parts")

    def __init__(self, layout: Layout, *parts: str) -> None:
        self.layout = layout
        self.parts = parts

    @property
    def name(self) -> str:
        return self.parts[-1]

    def __fspath__(self) -> str:
        return os.path.join(self.layout.runs, *self.parts)

    def __str__(self) -> str:
        return self.__fspath__()

    def __repr__(self) -> str:
        return f"RunPath({self.__fspath__()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunPath) and os.fspath(self) == os.fspath(other)

    def __hash__(self) -> int:
        return hash(self.__fspath__())

    def open(self, flags: int, mode: int = 0o600) -> int:
        return self.layout.open_at(self.parts, flags, mode)


class Layout:
    """The run directories of one state dir, reached through a descriptor of `runs/`
    that is opened once (the state dir as given, `runs` not through a symlink)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.runs = state_dir / "runs"
        self._runs_fd: int | None = None
        self._lock = threading.Lock()  # worker threads open files too

    def runs_fd(self) -> int:
        """The descriptor of `runs/`, opened on first use and kept (O_CLOEXEC)."""
        fd = self._runs_fd
        if fd is None:
            with self._lock:
                if self._runs_fd is None:
                    state = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        self._runs_fd = os.open("runs", _DIR, dir_fd=state)
                    finally:
                        os.close(state)
                fd = self._runs_fd
        return fd

    def close(self) -> None:
        fd, self._runs_fd = self._runs_fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def open_at(self, parts: Iterable[str], flags: int, mode: int = 0o600) -> int:
        """Open `runs/<parts...>`: each directory with O_DIRECTORY|O_NOFOLLOW relative to
        the one before, the last part with O_NOFOLLOW. A symlink anywhere is ELOOP."""
        *dirs, last = parts
        fd = self.runs_fd()
        opened = []
        try:
            for name in dirs:
                fd = os.open(name, _DIR, dir_fd=fd)
                opened.append(fd)
            return os.open(last, flags | _NOFOLLOW, mode, dir_fd=fd)
        finally:
            for each in opened:
                os.close(each)

    def run_dir(self, run_id: str) -> Path:
        """The run's directory as a path, for messages (open files through `events`,
        `log` and the methods here)."""
        return self.runs / _checked(run_id)

    def _file(self, run_id: str, *parts: str) -> RunPath:
        return RunPath(self, _checked(run_id), *parts)

    def events(self, run_id: str) -> RunPath:
        return self._file(run_id, EVENTS)

    def log(self, run_id: str, step: str, attempt: int) -> RunPath:
        return self._file(run_id, LOGS, f"{step}.{attempt}.log")

    def run_ids(self) -> list[str]:
        """Run directories present, oldest first (run ids sort by creation time)."""
        try:
            # A descriptor of its own: listing moves the position of the one it uses.
            fd = os.open(".", _DIR, dir_fd=self.runs_fd())
        except FileNotFoundError:
            return []
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        return sorted(n for n in names if valid_run_id(n))

    def create_run(self, run_id: str, submission: Submission) -> None:
        """Make the run's directory and durable workflow.json, and an empty events.jsonl.
        The run exists once its first event is appended; until then a crash leaves a
        directory that `discard_unacknowledged` removes at the next start."""
        runs = self.runs_fd()
        os.mkdir(_checked(run_id), 0o700, dir_fd=runs)
        fd = os.open(run_id, _DIR, dir_fd=runs)
        try:
            os.mkdir(LOGS, 0o700, dir_fd=fd)
            write_new_file(self._file(run_id, WORKFLOW), msgspec.json.encode(submission))
            write_new_file(self._file(run_id, EVENTS), b"")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(runs)

    def remove_run(self, run_id: str) -> None:
        """Undo a `create_run` that failed half-way (the run was never acknowledged).
        Removes only what `create_run` makes, and never a run with a committed event."""
        try:
            _discard(self.runs_fd(), _checked(run_id))
        except OSError:
            pass

    def prune(self, run_ids: Iterable[str]) -> list[str]:
        """Remove finished runs crash-safely: each directory is renamed to a tombstone
        (`.pruned-<id>`, which is no run id: loading never sees it), the renames are made
        durable with one fsync of `runs/`, and only then are the tombstones deleted. A
        crash at any point leaves every run whole (not renamed yet) or gone (a tombstone,
        which `remove_tombstones` deletes at the next start). Returns the ids renamed;
        one that cannot be is logged and left whole."""
        runs = self.runs_fd()
        renamed = []
        for run_id in run_ids:
            try:
                os.rename(_checked(run_id), TOMBSTONE + run_id, src_dir_fd=runs,
                          dst_dir_fd=runs)
            except OSError as exc:
                log.warning("cannot prune run %s: %s", run_id, exc.strerror or exc)
                continue
            renamed.append(run_id)
            faults.hit("prune-renamed")  # tests: a crash between renames
        if renamed:
            os.fsync(runs)
        self.remove_tombstones()
        return renamed

    def remove_tombstones(self) -> int:
        """Delete what pruning renamed (at start-up: what a crash left half-deleted);
        the number deleted. A tombstone that cannot be deleted is logged and left."""
        try:
            fd = os.open(".", _DIR, dir_fd=self.runs_fd())
        except FileNotFoundError:
            return 0
        try:
            names = [n for n in os.listdir(fd) if n.startswith(TOMBSTONE)]
        finally:
            os.close(fd)
        for name in names:
            faults.hit("prune-delete")  # tests: a crash while deleting
            try:
                shutil.rmtree(self.runs / name)  # fd-based on Linux: follows no symlink
            except OSError as exc:
                log.warning("cannot delete pruned run %s: %s", name[len(TOMBSTONE):],
                            exc.strerror or exc)
        return len(names)

    def read_submission(self, run_id: str) -> Submission:
        return _submission_decoder.decode(read_file(self._file(run_id, WORKFLOW)))

    def open_log_for_step(self, run_id: str, step: str, attempt: int) -> int:
        """The fd a step writes its output to; a fresh file per attempt, never reused."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        return self.log(run_id, step, attempt).open(flags, 0o600)


# ---- runs that were never acknowledged -------------------------------------------

_FOOTPRINT = frozenset({WORKFLOW, EVENTS, LOGS})  # what create_run makes


def discard_unacknowledged(layout: Layout, keep: Collection[str] = ()) -> list[str]:
    """Remove every run dir that a crash left while the run was being created (no
    committed first event: the submit was never answered, so it is no run), except
    those in `keep`; log each once; return their ids. Call it at startup, holding the
    state dir's lock, before the runs are loaded.

    Only a directory holding nothing but what `create_run` makes (workflow.json, an
    events.jsonl without a whole line, an empty logs/) is removed: anything else is
    left for loading to report (CORRUPT). Removal is crash-safe as it is: every state
    a crash can leave half-way is again such a directory, removed at the next start."""
    gone = []
    runs = layout.runs_fd()
    for run_id in layout.run_ids():
        if run_id in keep:
            continue
        try:
            removed = _discard(runs, run_id)
        except OSError as exc:
            log.warning("run %s was never acknowledged but cannot be removed: %s",
                        run_id, exc.strerror or exc)
            continue
        if removed:
            log.warning("run %s was never acknowledged (the daemon stopped while it was "
                        "being created); its directory is removed", run_id)
            gone.append(run_id)
    if gone:
        os.fsync(runs)
    return gone


def _discard(runs: int, run_id: str) -> bool:
    """Remove `runs/<run_id>` if it is an unacknowledged run's footprint; whether it was."""
    try:
        fd = os.open(run_id, _DIR, dir_fd=runs)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return False  # a symlink or a file: not a run dir of ours; loading reports it
        raise
    try:
        if not _unacknowledged(fd):
            return False
        for name in (WORKFLOW, EVENTS):
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(LOGS, dir_fd=fd)
        except FileNotFoundError:
            pass
    finally:
        os.close(fd)
    os.rmdir(run_id, dir_fd=runs)
    return True


def _unacknowledged(fd: int) -> bool:
    """Whether the run dir at `fd` holds only create_run's footprint, with no whole line
    in events.jsonl and nothing in logs/."""
    names = set(os.listdir(fd))
    if not names <= _FOOTPRINT:
        return False
    if LOGS in names:
        try:
            logs = os.open(LOGS, _DIR, dir_fd=fd)
        except OSError:
            return False  # a symlink or a file named logs: not ours
        try:
            if os.listdir(logs):
                return False
        finally:
            os.close(logs)
    if WORKFLOW in names and not _is_regular(fd, WORKFLOW):
        return False
    if EVENTS not in names:
        return True
    return _is_regular(fd, EVENTS) and not _has_newline(fd, EVENTS)


def _is_regular(dir_fd: int, name: str) -> bool:
    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return stat.S_ISREG(info.st_mode)


def _has_newline(dir_fd: int, name: str) -> bool:
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
    try:
        while True:
            chunk = os.read(fd, TAIL)
            if not chunk:
                return False
            if b"\n" in chunk:
                return True
    finally:
        os.close(fd)


# ---- reading a log ---------------------------------------------------------------


@dataclass
class LogRead:
    """A log file parsed: its committed events and what was wrong with it."""

    events: list[ev.Event] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    good_size: int = 0  # bytes up to and including the last committed newline
    torn_tail: str | None = None
    problem: str | None = None  # a damaged line other than the last: the run is corrupt


def parse_log(data: bytes, decoder: msgspec.json.Decoder = ev.json_decoder) -> LogRead:
    """Split, decode and check the lines of an events.jsonl image (or, with
    `ev.schedule_decoder`, of the schedule log)."""
    result = LogRead()
    end = data.rfind(b"\n") + 1
    result.good_size = end
    if end < len(data):
        result.torn_tail = (
            f"torn last line ({len(data) - end} bytes without a newline) dropped"
        )
    body = data[:end]
    try:
        events = decoder.decode_lines(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        events = None
    lines = body.splitlines()
    if events is not None and len(events) == len(lines):
        result.events, result.lines = events, lines
    else:  # a damaged line, or a blank one (decode_lines skips those without a word)
        _parse_line_by_line(body, result, decoder)
    return result


def _parse_line_by_line(body: bytes, result: LogRead, decoder: msgspec.json.Decoder) -> None:
    """Slow path, only for a damaged log: find and name the first bad line."""
    for number, line in enumerate(body.splitlines(), start=1):
        try:
            result.events.append(decoder.decode(line))
            result.lines.append(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            result.problem = f"damaged line {number}: {exc}"
            return


def read_log(path: os.PathLike | str, repair: bool) -> LogRead:
    """Read a run's log; with `repair`, cut a torn tail off the file itself (recovery
    does this before anything is appended, so a new line never extends a half one)."""
    data = read_file(path)
    result = parse_log(data)
    if repair and result.torn_tail is not None:
        fd = open_file(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, result.good_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    return result


TAIL = 64 * 1024


def read_ends(path: os.PathLike | str) -> tuple[ev.Event, ev.Event] | None:
    """The first and last events of a log, reading only its ends; None when the file
    is empty, torn, has an overlong last line, or an end does not decode."""
    fd = open_file(path, os.O_RDONLY)
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

    def __init__(self, path: os.PathLike | str, size: int) -> None:
        self.path = path
        self.size = size
        self.dirty = False  # bytes past `size` may be on disk from a failed append

    def append(self, data: bytes) -> None:
        """Write and fsync `data` (whole lines) at the committed end; all or nothing."""
        fd = open_file(self.path, os.O_WRONLY)
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

    def cut(self) -> None:
        """Cut the file back to the committed prefix now (a torn tail found on recovery)."""
        fd = open_file(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, self.size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _cut_back(self, fd: int) -> None:
        try:
            os.ftruncate(fd, self.size)
        except OSError:
            self.dirty = True  # the next append truncates before it writes
