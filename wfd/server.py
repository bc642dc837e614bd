"""The Unix socket: peer checks, frames, and one small handler per request.

Each connection is checked with SO_PEERCRED before a byte of it is read: a
user daemon serves its own uid and root; a system daemon serves root and the
members of its socket group. A frame's length is checked against the 16 MiB
limit and a global budget of bytes in flight before its body is read, every
read has a deadline, and every write too, so a slow, idle, hostile or
non-reading client costs one connection and bounded memory, and everyone
else is served meanwhile.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from wfd import __version__
from wfd import events as ev
from wfd import protocol as p
from wfd import state as st
from wfd.engine import Engine, fold_checked
from wfd.errors import EXIT_UNREACHABLE, EXIT_USAGE, StorageError, WfdError
from wfd.eventlog import LogRead, read_log, valid_run_id
from wfd.workflow import STEP_ID_RE

log = logging.getLogger("wfd")

IDLE_TIMEOUT = 300.0  # a connection that sends nothing for this long is closed
BODY_TIMEOUT = 30.0  # the rest of a frame must arrive within this once it started
WRITE_TIMEOUT = 30.0  # a client that does not read its replies for this long is dropped
BUDGET = 64 * 1024 * 1024  # bytes of frame bodies being read, across all clients
LOG_CHUNK = 256 * 1024
LOG_POLL = 0.1


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def root(self) -> bool:
        return self.uid == 0


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


def in_group(uid: int, gid: int) -> bool:
    """Membership from the group database: SO_PEERCRED carries only the primary gid."""
    try:
        entry = pwd.getpwuid(uid)
        return gid in os.getgrouplist(entry.pw_name, entry.pw_gid)
    except KeyError:
        return False


class Refused(WfdError):
    """The request names a run the peer may not see, or is otherwise refused."""


class Server:
    def __init__(self, engine: Engine, system: bool, group: str | None) -> None:
        self.engine = engine
        self.system = system
        self.uid = os.getuid()
        self.gid = self._group_gid(group) if system else None
        self.budget = BUDGET
        self.budget_free = asyncio.Condition()
        self.connections: set[asyncio.Task] = set()
        self.shutdown_requested: Callable[[], None] = lambda: None
        self.handlers: dict[type, Callable[[Peer, object, Callable], Awaitable[None]]] = {
            p.Hello: self.hello, p.Submit: self.submit, p.Status: self.status,
            p.Cancel: self.cancel, p.Replay: self.replay, p.Resume: self.resume,
            p.ResumeAll: self.resume_all, p.Watch: self.watch, p.Logs: self.logs,
            p.Shutdown: self.shutdown,
        }

    @staticmethod
    def _group_gid(group: str | None) -> int | None:
        if not group:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning("socket group %r does not exist; only root may connect", group)
            return None

    def allowed(self, peer: Peer) -> bool:
        if peer.root or peer.uid == self.uid:
            return True
        return self.system and self.gid is not None and in_group(peer.uid, self.gid)

    # ---- connections -------------------------------------------------------------

    async def serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._connection, sock=sock, limit=1 << 16)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        try:
            await self._serve_peer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except Exception:
            log.exception("error serving a client")
        finally:
            if task is not None:
                self.connections.discard(task)
            writer.close()

    async def _serve_peer(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))

        async def send(msg: p.Message) -> None:
            writer.write(p.encode_frame(msg))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

        if not self.allowed(peer):
            await send(p.Error(EXIT_UNREACHABLE, f"wfd refuses uid {peer.uid}: this daemon serves "
                               f"{'root and group members' if self.system else 'its own user'}"))
            return
        while True:
            header = await asyncio.wait_for(reader.readexactly(p.HEADER.size), IDLE_TIMEOUT)
            length = p.frame_length(header)
            if length > p.MAX_FRAME:
                await send(p.Error(EXIT_USAGE, f"frame of {length} bytes is over the "
                                               f"{p.MAX_FRAME} byte limit"))
                return
            body = await self._read_body(reader, length)
            request = await self._decode(body, send)
            if request is None:
                return
            try:
                await self.handlers[type(request)](peer, request, send)
            except WfdError as exc:
                await send(p.Error(exc.exit_code, exc.message))

    async def _read_body(self, reader: asyncio.StreamReader, length: int) -> bytes:
        """Read a body within the global budget, so many large frames cannot exhaust memory."""
        async with self.budget_free:
            await asyncio.wait_for(
                self.budget_free.wait_for(lambda: self.budget >= length), BODY_TIMEOUT
            )
            self.budget -= length
        try:
            return await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT)
        finally:
            async with self.budget_free:
                self.budget += length
                self.budget_free.notify_all()

    async def _decode(self, body: bytes, send: Callable) -> object | None:
        try:
            return p.decode_request(body)
        except p.VersionMismatch as exc:
            await send(p.Error(EXIT_UNREACHABLE, f"wfd speaks protocol {p.PROTOCOL}, "
                                                 f"this client speaks {exc.theirs}"))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await send(p.Error(EXIT_USAGE, f"bad request: {exc}"))
        return None

    # ---- helpers ----------------------------------------------------------------

    def run_for(self, peer: Peer, run_id: str) -> st.RunState:
        """The run, if the peer may see it; another user's run answers like an unknown one."""
        if not valid_run_id(run_id):
            raise Refused(f"malformed run id {run_id!r}")
        run = self.engine.runs.get(run_id)
        if run is None or not self.visible(peer, run):
            raise Refused(f"no such run: {run_id}")
        return run

    def visible(self, peer: Peer, run: st.RunState) -> bool:
        if peer.root or not self.system:
            return True
        return run.owner_uid == peer.uid

    # ---- handlers -----------------------------------------------------------------

    async def hello(self, peer: Peer, req: p.Hello, send: Callable) -> None:
        await send(p.HelloReply(version=__version__, protocol=p.PROTOCOL, pid=os.getpid(),
                                system=self.system, uid=self.uid))

    async def submit(self, peer: Peer, req: p.Submit, send: Callable) -> None:
        new = self.engine.submit(
            req.workflow, req.source, req.base_dir, req.env, req.umask, peer.uid, peer.gid
        )
        # workflow.json is durable before the first event, the first event before the reply.
        try:
            await asyncio.to_thread(self.engine.layout.create_run, new.run_id, new.sub)
        except OSError as exc:
            await asyncio.to_thread(self.engine.layout.remove_run, new.run_id)
            raise StorageError(f"cannot create run directory: {exc.strerror or exc}") from None
        self.engine.start_run(new)
        await self.engine.flushed()
        await send(p.Submitted(new.run_id))

    async def status(self, peer: Peer, req: p.Status, send: Callable) -> None:
        if req.run_id is None:
            runs = [st.run_summary(r) for r in self.engine.runs.values() if self.visible(peer, r)]
            await send(p.RunList(runs))
            return
        await send(p.RunInfo(self.status_of(self.run_for(peer, req.run_id))))

    def status_of(self, run: st.RunState) -> st.RunStatus:
        status = st.run_status(run)
        if run.state == st.RUNNING and self.engine.storage_error:
            status.error = self.engine.storage_error
        return status

    async def cancel(self, peer: Peer, req: p.Cancel, send: Callable) -> None:
        run = self.run_for(peer, req.run_id)
        if run.finished:
            await send(p.Cancelled(run.state, True))
            return
        await self.engine.cancel(req.run_id)
        await self.engine.finished(req.run_id)
        await send(p.Cancelled(run.state, False))

    async def replay(self, peer: Peer, req: p.Replay, send: Callable) -> None:
        run = self.run_for(peer, req.run_id)
        await send(await asyncio.to_thread(replay_run, self.engine, req.run_id, run))

    async def resume(self, peer: Peer, req: p.Resume, send: Callable) -> None:
        run = self.run_for(peer, req.run_id)
        if req.run_id in self.engine.order:
            raise Refused(f"run {req.run_id} is running already")
        if run.state in (st.SUCCEEDED, st.CORRUPT):
            raise Refused(f"run {req.run_id} is {run.state}; only a FAILED, CANCELLED or "
                          "unfinished run can be resumed")
        await self.engine.resume([req.run_id])
        await send(p.Resumed([req.run_id]))

    async def resume_all(self, peer: Peer, req: p.ResumeAll, send: Callable) -> None:
        run_ids = [
            run_id for run_id, run in self.engine.runs.items()
            if not run.finished and run_id not in self.engine.order and self.visible(peer, run)
        ]
        await self.engine.resume(run_ids)
        await send(p.Resumed(run_ids))

    async def watch(self, peer: Peer, req: p.Watch, send: Callable) -> None:
        run = self.run_for(peer, req.run_id)
        queue = self.engine.watch(req.run_id)
        try:
            last = req.after_seq
            past = await asyncio.to_thread(self._committed_events, req.run_id)
            fresh = [e for e in past if e.seq > last]
            if fresh:
                await send(p.Progress(fresh))
                last = fresh[-1].seq
            while not (run.finished and last >= self._durable_seq(run)):
                event = await queue.get()
                batch = [event] + _drain(queue)
                batch = [e for e in batch if e.seq > last]
                if batch:
                    await send(p.Progress(batch))
                    last = batch[-1].seq
            await send(p.RunEnded(self.status_of(run)))
        finally:
            self.engine.unwatch(req.run_id, queue)

    def _durable_seq(self, run: st.RunState) -> int:
        if run.state == st.CORRUPT:
            return 0
        return run.last_seq

    def _committed_events(self, run_id: str) -> list[ev.Event]:
        try:
            return read_log(self.engine.layout.events(run_id), repair=False).events
        except OSError:
            return []

    async def logs(self, peer: Peer, req: p.Logs, send: Callable) -> None:
        run = self.run_for(peer, req.run_id)
        if not STEP_ID_RE.fullmatch(req.step) or req.step not in run.steps:
            raise Refused(f"run {req.run_id} has no step {req.step!r}")
        rec = run.steps[req.step]
        if req.attempt is not None and not 1 <= req.attempt <= rec.attempts:
            raise Refused(f"step {req.step} has no attempt {req.attempt} "
                          f"(it has {rec.attempts})")
        attempt = req.attempt if req.attempt is not None else rec.attempts
        offset = req.offset
        while True:
            if attempt >= 1:
                offset = await self._send_log(req.run_id, req.step, attempt, offset, send)
            if not req.follow:
                break
            running = rec.state == st.RUNNING and rec.attempts == attempt
            if running or (attempt == 0 and rec.attempts == 0 and not _over(run, rec)):
                await asyncio.sleep(LOG_POLL)
                continue
            if attempt >= 1:
                offset = await self._send_log(req.run_id, req.step, attempt, offset, send)
            if req.attempt is None and rec.attempts > attempt:
                attempt, offset = attempt + 1, 0
                continue
            if req.attempt is not None or _over(run, rec):
                break
            await asyncio.sleep(LOG_POLL)  # waiting for the step's next attempt
        await send(p.LogEnd(attempt if attempt >= 1 else None, rec.state))

    async def _send_log(self, run_id: str, step: str, attempt: int, offset: int,
                        send: Callable) -> int:
        path = self.engine.layout.log(run_id, step, attempt)
        while True:
            chunk = await asyncio.to_thread(_read_chunk, path, offset)
            if not chunk:
                return offset
            await send(p.LogData(attempt, chunk))
            offset += len(chunk)

    async def shutdown(self, peer: Peer, req: p.Shutdown, send: Callable) -> None:
        await send(p.Ok())
        self.shutdown_requested()


def _over(run: st.RunState, rec: st.StepRec) -> bool:
    """No further attempt of this step will come (until someone resumes the run)."""
    return rec.state in st.TERMINAL or run.finished


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _read_chunk(path, offset: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, LOG_CHUNK, offset)
    finally:
        os.close(fd)


def replay_run(engine: Engine, run_id: str, run: st.RunState) -> p.Replayed:
    """Re-fold the persisted log from scratch and report what it says."""
    path = engine.layout.events(run_id)
    try:
        read = read_log(path, repair=False)
    except OSError as exc:
        return p.Replayed([], [], None, [f"cannot read {path.name}: {exc.strerror}"])
    folded, problem = fold_checked(run.workflow, read)
    problems = [problem] if problem else []
    count = folded.last_seq
    lines = [line.decode() for line in read.lines[:count]] if problem else [
        line.decode() for line in read.lines
    ]
    transitions = [_transition(e) for e in read.events[:count]]
    if problem:
        folded.state = st.CORRUPT
        folded.error = problem
    return p.Replayed(lines, transitions, st.run_status(folded), problems, read.torn_tail)


def _transition(event: ev.Event) -> str:
    return f"{event.seq:>6}  {event.ts}  {st.describe(event)}"


__all__ = ["Server", "LogRead", "replay_run"]
