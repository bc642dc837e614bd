"""The keeper: one long-lived process per state dir that runs the attempts, so that
they outlive the daemon (docs/design.md, "Steps outlive the daemon").

The daemon decides; the keeper only runs, reaps and records. It is the parent
and child subreaper of every attempt's leader (the local executor of
`procs.py` runs inside it), enforces each attempt's `timeout` and `kill_grace`
itself, so a timeout fires on time while no daemon is up, and appends every
attempt's exit record to its journal, fsync'd, before it tells anyone: a
daemon that was down when the attempt ended finds the outcome there.

It is single-threaded (an asyncio loop, no worker threads), listens on
`<state-dir>/keeper/keeper.sock` (0600, in a 0700 dir) for one daemon at a
time, and holds `<state-dir>/keeper/lock` for its whole life: a daemon knows a
keeper is alive by that lock, never by a pid. It exits once no daemon is
connected and no attempt is running; its journal goes with it once every
record in it was acknowledged (the daemon acknowledges a record once the
outcome's event is durable in the run's log).

Started by the daemon (`python -m wfd.keeper STATE_DIR`), it detaches (a
session of its own, not the daemon's child), so stopping or killing the
daemon leaves it and its attempts running. SIGTERM to the keeper itself stops
every attempt (as the old `KillMode=mixed` did) and exits.

The protocol (`KEEPER_PROTOCOL`) is versioned like the client's: the daemon
says its version in `KHello`, the keeper answers with its own; fields only
ever get added with defaults, so a newer daemon can drive an older keeper
that still runs attempts after an upgrade.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from wfd.eventlog import Layout, fsync_dir
from wfd.executor import AttemptKey, AttemptSpec, StartFailed
from wfd.outfile import OutputDirs, OutputFile
from wfd.outputs import OutputInvalid, parse_outputs
from wfd.users import UserIds

log = logging.getLogger("wfd.keeper")

KEEPER_PROTOCOL = 1
HEADER = struct.Struct(">I")
# The keeper's one peer is the daemon of its state dir (a 0600 socket in a 0700 dir), so
# the limit only guards against a damaged length. It is above the client protocol's 16 MiB:
# a welcome carries every end not yet acknowledged, each with up to 64 KiB of outputs, and
# a daemon that could not read it could never start (4,000 such ends fit).
MAX_FRAME = 256 * 1024 * 1024
SOCKET = "keeper.sock"
LOCK = "lock"
JOURNAL_PREFIX = "exits-"
LINGER = 2.0  # seconds an idle keeper with no daemon waits for one before it exits
MAX_RETRY = 5.0  # seconds between tries of a failing journal write, at most


# ---- messages -----------------------------------------------------------------------


class KMsg(msgspec.Struct, tag_field="type", tag=True):
    """Base of the keeper's messages. Unknown fields are ignored: versions add fields
    with defaults, never change them."""


class KHello(KMsg):
    """Daemon -> keeper, first: who is driving."""

    version: int
    daemon_pid: int


class KStart(KMsg):
    """Daemon -> keeper: run this attempt (its claim is durable)."""

    run_id: str
    step: str
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    kill_grace: float
    timeout: float | None = None
    uid: int | None = None  # None: the keeper's own user
    gid: int = -1
    groups: list[int] = []


class KKill(KMsg):
    """Daemon -> keeper: end the attempt ("cancel", "stop", "timeout"); `force`: SIGKILL
    now."""

    run_id: str
    step: str
    attempt: int
    reason: str
    force: bool = False


class KStopAll(KMsg):
    """Daemon -> keeper: stop every attempt (`wfctl shutdown --stop-steps`)."""

    force: bool = False


class KAck(KMsg):
    """Daemon -> keeper: these attempts' outcomes are durable in their runs' logs."""

    keys: list[tuple[str, str, int]]


class ExitRecord(msgspec.Struct, kw_only=True):
    """How an attempt ended: the journal's lines and the keeper's `KEnded` messages."""

    run_id: str
    step: str
    attempt: int
    pid: int = 0
    exit_code: int | None = None  # -N for signal N; None if it never ran
    why: str = "exited"  # exited, timeout, cancel, stop, start-failed
    error: str | None = None  # why it could not start
    started_at: float = 0.0  # wall-clock times, for people
    ended_at: float = 0.0
    cpu: float = 0.0  # user + system seconds of the leader and what it waited for
    max_rss: int = 0  # KiB, the largest of those processes at its peak
    # What an attempt that exited 0 wrote to $WFD_OUTPUT, or why that file was refused.
    outputs: dict[str, str] = {}
    output_error: str | None = None

    @property
    def key(self) -> AttemptKey:
        return AttemptKey(self.run_id, self.step, self.attempt)

    @property
    def kill_reason(self) -> str | None:
        """`why` as the executor interface's kill reason."""
        return self.why if self.why in ("timeout", "cancel", "stop") else None


class KWelcome(KMsg):
    """Keeper -> daemon, answering KHello: what runs, and ends not yet acknowledged."""

    version: int
    pid: int
    running: list[tuple[str, str, int]]
    ended: list[ExitRecord]
    # When this keeper began (wall clock): an attempt claimed after it that it neither runs
    # nor has a record of never reached it (the daemon died between claim and KStart).
    since: float = 0.0


class KStarted(KMsg):
    """Keeper -> daemon: the attempt's leader runs."""

    run_id: str
    step: str
    attempt: int
    pid: int
    start_time: float
    boot_id: str
    containment: str = ""  # how its processes are known: "cgroup" or "session"


class KEnded(KMsg):
    """Keeper -> daemon: the attempt is over (its whole tree gone), the record durable."""

    record: ExitRecord


KRequest = KHello | KStart | KKill | KStopAll | KAck
KReply = KWelcome | KStarted | KEnded

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(KRequest)
_reply_decoder = msgspec.msgpack.Decoder(KReply)
_record_decoder = msgspec.json.Decoder(ExitRecord)


def frame(msg: KMsg) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """One frame's body; None at a clean end of the stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("keeper connection cut in a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ConnectionError(f"keeper frame of {length} bytes")
    return await reader.readexactly(length)


def decode_reply(body: bytes) -> KReply:
    return _reply_decoder.decode(body)  # type: ignore[return-value]


def key_tuple(key: AttemptKey) -> tuple[str, str, int]:
    return (key.run_id, key.step, key.attempt)


def read_journals(keeper_dir: Path) -> dict[AttemptKey, ExitRecord]:
    """Every exit record in the journals of the keeper dir (whole lines only)."""
    records: dict[AttemptKey, ExitRecord] = {}
    for path in sorted(keeper_dir.glob(f"{JOURNAL_PREFIX}*.jsonl")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                record = _record_decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            records[record.key] = record
    return records


def keeper_alive(keeper_dir: Path) -> bool:
    """A keeper holds the lock (asked without waiting, never by pid)."""
    try:
        fd = os.open(keeper_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ---- the keeper process --------------------------------------------------------------


class Journal:
    """Exit records, appended and fdatasync'd in groups (one sync per loop iteration's
    worth of ends). The daemon is told an end once its line is in the file, while the
    sync runs: the keeper still holds it, and the daemon's own fsync of the outcome
    overlaps the keeper's instead of waiting behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                          | os.O_NOFOLLOW, 0o600)
        fsync_dir(path.parent)
        self.size = os.fstat(self.fd).st_size  # the whole lines written so far
        self.unacked: dict[AttemptKey, ExitRecord] = {}

    def append(self, records: list[ExitRecord],
               written: Callable[[], None] = lambda: None) -> None:
        """Write whole lines, call `written`, sync; on failure cut back to the last whole
        line, so a retry never leaves half a line before a whole one."""
        data = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            written()
            os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            raise
        self.size += len(data)
        for record in records:
            self.unacked[record.key] = record

    def ack(self, keys: list[tuple[str, str, int]]) -> None:
        for key in keys:
            self.unacked.pop(AttemptKey(*key), None)

    def close(self) -> None:
        """Close; remove the file when nothing in it is still needed."""
        os.close(self.fd)
        if not self.unacked:
            try:
                self.path.unlink()
            except OSError:
                pass


class Keeper:
    def __init__(self, keeper_dir: Path) -> None:
        from wfd.cgroups import AttemptCgroups
        from wfd.procs import LocalExecutor  # psutil and the rest, only in the keeper

        self.since = time.time()  # before it can be asked to start anything
        self.dir = keeper_dir
        self.layout = Layout(keeper_dir.parent)
        self.executor = LocalExecutor(self._ended, AttemptCgroups.find(str(keeper_dir)))
        self.journal = Journal(keeper_dir / f"{JOURNAL_PREFIX}{os.getpid()}.jsonl")
        self.writer: asyncio.StreamWriter | None = None
        self.started: dict[AttemptKey, float] = {}  # wall-clock start times
        self.timers: dict[AttemptKey, asyncio.TimerHandle] = {}
        # Tagged with the state dir, so the next keeper of it removes what this one leaves.
        self.outdirs = OutputDirs(hashlib.sha256(os.fsencode(keeper_dir)).hexdigest()[:8])
        self.outfiles: dict[AttemptKey, OutputFile] = {}  # each running attempt's $WFD_OUTPUT
        self._ends: list[ExitRecord] = []
        self._flush_scheduled = False
        self._retry = 0.0  # seconds before the next try of a failed journal write
        self._told: set[AttemptKey] = set()  # ends told while their write kept failing
        self._unreported: list[tuple[AttemptKey, object]] = []
        self.idle = asyncio.Event()
        self.stopping = False

    # -- the daemon's requests ---------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:  # the old daemon is gone: its connection with it
            self.writer.transport.abort()
        self.writer = writer
        self.idle.clear()
        try:
            while (body := await read_frame(reader)) is not None:
                self._handle(_request_decoder.decode(body))
        except (ConnectionError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("keeper: dropping the daemon's connection: %s", exc)
        finally:
            if self.writer is writer:
                self.writer = None
                self._check_idle()
            writer.transport.abort()

    def _handle(self, msg: KRequest) -> None:
        if isinstance(msg, KHello):
            self._send(KWelcome(
                version=KEEPER_PROTOCOL, pid=os.getpid(),
                running=[key_tuple(k) for k in self.executor.attempts],
                ended=list(self.journal.unacked.values()), since=self.since,
            ))
        elif isinstance(msg, KStart):
            self._start(msg)
        elif isinstance(msg, KKill):
            self.executor.kill(AttemptKey(msg.run_id, msg.step, msg.attempt), msg.reason,
                               msg.force)
        elif isinstance(msg, KStopAll):
            for key in list(self.executor.attempts):
                self.executor.kill(key, "stop", msg.force)
        elif isinstance(msg, KAck):
            self.journal.ack(msg.keys)

    def _send(self, msg: KMsg) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(frame(msg))

    # -- attempts --------------------------------------------------------------------

    def _start(self, msg: KStart) -> None:
        key = AttemptKey(msg.run_id, msg.step, msg.attempt)
        if key in self.executor.attempts or key in self.journal.unacked:
            return  # a daemon that resent it: this attempt runs or ran once, never twice
        self.started[key] = time.time()
        user = None if msg.uid is None else UserIds(msg.uid, msg.gid, tuple(msg.groups))
        try:  # one directory at a time, never through a symlink (eventlog.Layout)
            log_fd = self.layout.open_log_for_step(key.run_id, key.step, key.attempt)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._ended(key, None, None, start_error=f"cannot open log: {why}")
            return
        try:
            outfile = self.outfiles[key] = self.outdirs.new_file(user)
        except OSError as exc:
            os.close(log_fd)
            self._ended(key, None, None,
                        start_error=f"cannot make $WFD_OUTPUT: {exc.strerror or exc}")
            return
        env = {**msg.env, "WFD_OUTPUT": outfile.path}
        spec = AttemptSpec(key=key, argv=msg.argv, env=env, cwd=msg.cwd, log_fd=log_fd,
                           umask=msg.umask, kill_grace=msg.kill_grace, user=user)
        try:
            info = self.executor.start(spec)
        except StartFailed as exc:
            self._ended(key, None, None, start_error=str(exc))
            return
        finally:
            os.close(log_fd)
        if msg.timeout is not None:
            self.timers[key] = asyncio.get_running_loop().call_later(
                msg.timeout, self.executor.kill, key, "timeout")
        # Asked now: by the time the start is reported, a quick attempt may be over.
        info = info._replace(containment=self.executor.containment(key))
        self._unreported.append((key, info))
        if len(self._unreported) == 1:
            asyncio.get_running_loop().call_soon(self._report_starts)

    def _report_starts(self) -> None:
        """Reading a leader's start time waits while it is still in execve: done once per
        loop iteration, after every spawn of it."""
        starts, self._unreported = self._unreported, []
        for key, info in starts:
            info = self.executor.identify(info)  # type: ignore[attr-defined]
            self._send(KStarted(run_id=key.run_id, step=key.step, attempt=key.attempt,
                                pid=info.pid, start_time=info.start_time or 0.0,  # type: ignore[attr-defined]
                                boot_id=info.boot_id,  # type: ignore[attr-defined]
                                containment=info.containment or "session"))  # type: ignore[attr-defined]

    def _ended(self, key: AttemptKey, exit_code: int | None, kill_reason: str | None,
               start_error: str | None = None, usage: tuple[float, int] | None = None) -> None:
        """The executor's on_end: the attempt's tree is gone."""
        if self._unreported and any(k == key for k, _ in self._unreported):
            self._report_starts()  # its start before its end
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        cpu, max_rss = usage or (0.0, 0)
        why = "start-failed" if start_error is not None else (kill_reason or "exited")
        outputs, output_error = self._outputs(key, exit_code == 0 and why == "exited")
        self._ends.append(ExitRecord(
            run_id=key.run_id, step=key.step, attempt=key.attempt, exit_code=exit_code,
            why=why, error=start_error, started_at=self.started.pop(key, time.time()),
            ended_at=time.time(), cpu=cpu, max_rss=max_rss, outputs=outputs,
            output_error=output_error,
        ))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _outputs(self, key: AttemptKey, succeeded: bool) -> tuple[dict[str, str], str | None]:
        """A succeeded attempt's outputs (or why they are refused); its file is removed
        either way, since the record carries what it held."""
        outfile = self.outfiles.pop(key, None)
        if outfile is None:
            return {}, None
        try:
            return (parse_outputs(outfile.read()) if succeeded else {}), None
        except OutputInvalid as exc:
            return {}, str(exc)
        finally:
            outfile.remove()

    def _flush(self) -> None:
        """Make the ends durable in one sync, telling the daemon once their lines are in
        the file. A failed write or sync (ENOSPC, EIO) keeps them in memory and tries again
        with backoff until it succeeds; the daemon is told meanwhile (once), so that it
        records them in its own log if it can, and shows the storage error if it cannot.
        Nothing is dropped."""
        self._flush_scheduled = False
        try:
            self.journal.append(self._ends, lambda: self._tell(
                [r for r in self._ends if r.key not in self._told]))
        except OSError as exc:
            if not self._retry:
                log.error("keeper: cannot record %d attempt end(s): %s; retrying",
                          len(self._ends), exc.strerror or exc)
            self._tell([r for r in self._ends if r.key not in self._told])
            self._flush_scheduled = True
            self._retry = min(self._retry * 2, MAX_RETRY) if self._retry else 0.1
            asyncio.get_running_loop().call_later(self._retry, self._flush)
            return
        if self._retry:
            log.warning("keeper: attempt ends recorded again")
        self._retry = 0.0
        self._ends = []
        self._told.clear()
        self._check_idle()

    def _tell(self, records: list[ExitRecord]) -> None:
        for record in records:
            self._send(KEnded(record=record))
            self._told.add(record.key)

    def _check_idle(self) -> None:
        if self.writer is None and not self.executor.attempts and not self._ends:
            self.idle.set()

    async def stop(self) -> None:
        """SIGTERM to the keeper: stop every attempt and exit once all have ended."""
        self.stopping = True
        await self.executor.stop_all("stop")


def _hold_lock(keeper_dir: Path) -> int:
    fd = os.open(keeper_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("wfd keeper: another keeper holds this state dir", file=sys.stderr)
        raise SystemExit(1) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _main(keeper_dir: Path) -> int:
    _hold_lock(keeper_dir)  # held until the process exits (see the end)
    keeper = Keeper(keeper_dir)
    loop = asyncio.get_running_loop()
    keeper.executor.install(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    path = keeper_dir / SOCKET
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(keeper.serve, path=str(path))
    finally:
        os.umask(old)
    try:
        os.write(1, b"ready\n")  # the daemon waits for this line
    except OSError:
        pass  # that daemon died meanwhile: the next one finds this keeper by its lock
    os.close(1)
    os.open(os.devnull, os.O_WRONLY)  # fd 1 again, so nothing writes into a closed pipe
    keeper._check_idle()
    while True:
        idle = asyncio.ensure_future(keeper.idle.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([idle, stopped], return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        stopped.cancel()
        if stop.is_set():
            await keeper.stop()
            break
        try:  # a restarting daemon connects again in this time; a SIGTERM ends it
            await asyncio.wait_for(stop.wait(), LINGER)
        except asyncio.TimeoutError:
            pass
        if keeper.idle.is_set() or stop.is_set():
            await keeper.stop()
            break
    server.close()
    try:
        path.unlink()
    except OSError:
        pass
    keeper.journal.close()
    keeper.outdirs.close()
    if keeper.executor.cgroups is not None:
        keeper.executor.cgroups.close()
    # The lock fd stays open: the lock goes with the process itself, so "no keeper holds the
    # lock" means no keeper process is left (a daemon or a test may rely on that).
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keeper_dir = Path(argv[0])
    from wfd import systemd as sd

    sd.setup_logging(os.environ.get("WFD_KEEPER_LOG_LEVEL", "info"))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return asyncio.run(_main(keeper_dir))


if __name__ == "__main__":
    raise SystemExit(main())
