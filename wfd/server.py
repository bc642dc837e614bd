"""The Unix socket: peer checks, frames, and one small handler per request.

Each connection is checked with SO_PEERCRED before a byte of it is read: a
user daemon serves its own uid and root; a system daemon serves root and the
members of its socket group (from the group database: SO_PEERCRED carries
only the primary gid). Everyone else gets one `Error` (exit 3) and is closed.

Nothing a client sends or fails to send can hurt the daemon or other clients:

- connections are capped (globally, below the descriptor limit, and per
  non-root uid), so one user cannot take every descriptor;
- a frame's length is checked against the 16 MiB limit before its body is
  read; a body up to `SMALL_FRAME` is read straight away (each connection
  holds at most one), a larger one first waits, in arrival order, for its
  share of a global `BUDGET` of bytes in flight, so that however many clients
  announce 16 MiB, at most `BUDGET` bytes of large bodies exist at once and
  small requests never wait behind them;
- every read has a deadline: `IDLE_TIMEOUT` for a frame to begin, then
  `FRAME_TIMEOUT` for the rest of it, so a client that sends nothing or a
  byte a second costs one connection for a bounded time;
- every write has a deadline (`WRITE_TIMEOUT`): a client that does not read
  its replies is cut off and its buffered replies dropped;
- a frame that is oversize, not msgpack, not an envelope, of another
  protocol version, an unknown or malformed message gets an `Error` and the
  connection is closed.

Memory for requests is thus at most about BUDGET + connections x (SMALL_FRAME +
3 x READ_LIMIT), whatever clients do (with the defaults, 64 MiB + 1024 x 112 KiB).
"""

from __future__ import annotations

import asyncio
import collections
import grp
import logging
import os
import pwd
import resource
import select
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from wfd import __version__
from wfd import events as ev
from wfd import protocol as p
from wfd import state as st
from wfd.engine import Engine, fold_checked
from wfd.errors import EXIT_UNREACHABLE, EXIT_USAGE, StorageError, UsageError, WfdError
from wfd.eventlog import read_log, valid_run_id
from wfd.workflow import STEP_ID_RE

log = logging.getLogger("wfd")

IDLE_TIMEOUT = 300.0  # a connection that begins no frame for this long is closed
FRAME_TIMEOUT = 10.0  # the rest of a frame must arrive within this once it began
WRITE_TIMEOUT = 30.0  # a client that does not read its replies for this long is cut off
BUDGET_WAIT = 5.0  # a large frame waits this long for budget, then is answered "busy"
BUDGET = 64 * 1024 * 1024  # bytes of large frame bodies being read, across all clients
SMALL_FRAME = 64 * 1024  # bodies up to this size are read without the budget
READ_LIMIT = 16 * 1024  # what a connection buffers ahead of what its handler reads
READ_CHUNK = 256 * 1024  # one read of a large body, once it has its budget
MAX_CONNECTIONS = 1024  # lowered to fit the descriptor limit
BACKLOG = 512  # connections the kernel queues before we accept them
FD_RESERVE = 128  # descriptors kept for the event log, step logs and spawns
MAX_PER_USER = 128  # connections of one non-root uid
PROGRESS_BATCH = 1000  # events per Progress frame, far below the frame limit
EXIT_INTERNAL = 70  # a bug in wfd answered this request (sysexits EX_SOFTWARE)
LOG_CHUNK = 256 * 1024
LOG_POLL = 0.1
GONE_POLL = 1.0  # how often a stream with no news checks that its client is still there


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


def user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def connection_limit() -> int:
    """MAX_CONNECTIONS, or fewer if the descriptor limit would not leave FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - FD_RESERVE))


class Refused(WfdError):
    """The request names a run the peer may not see, or is otherwise refused."""


class _Close(Exception):
    """End this connection (what had to be said was sent)."""


class Budget:
    """Bytes of large frame bodies in flight, across all clients, granted first come
    first served: a large request is never overtaken forever by smaller large ones."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, size: int, timeout: float) -> bool:
        """Take `size` bytes (at most `total`); False if they were not free within
        `timeout` seconds."""
        if size > self.total:
            raise ValueError(f"{size} bytes is more than the whole budget")
        if not self.waiters and self.free >= size:
            self.free -= size
            return True
        future = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self.waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException as exc:  # timed out, or the connection is being cancelled
            if future.done():  # granted just as we gave up: give it back
                self.release(size)
            else:
                future.cancel()
                self.waiters.remove(entry)
                self._grant()  # this one may have been the head, holding others back
            if isinstance(exc, asyncio.TimeoutError):
                return False
            raise
        return True

    def release(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self.waiters and self.free >= self.waiters[0][0]:
            size, future = self.waiters.popleft()
            self.free -= size
            future.set_result(None)


class _Conn:
    """One client connection: framed reads and writes under their deadlines."""

    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self._read_ahead(READ_LIMIT)

    def _read_ahead(self, size: int) -> None:
        """How much one recv() may take in: asyncio's selector transport reads 256 KiB at
        a time whatever the reader's limit, which for a thousand connections that send
        more than they are asked for would be 256 MiB nobody budgeted."""
        if hasattr(self.writer.transport, "max_size"):
            self.writer.transport.max_size = size  # type: ignore[attr-defined]

    async def send(self, msg: p.Message) -> None:
        """Send one reply; a client that does not take it in time is cut off."""
        frame = p.encode_frame(msg)
        if len(frame) - p.HEADER.size > p.MAX_FRAME:
            frame = p.encode_frame(p.Error(EXIT_USAGE, (
                f"the reply ({type(msg).__name__}, {len(frame)} bytes) is over the "
                f"{p.MAX_FRAME} byte frame limit")))
        self.writer.write(frame)
        try:
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT)
        except asyncio.TimeoutError:
            self.writer.transport.abort()  # drop what it did not read
            raise ConnectionError("client does not read its replies") from None

    async def __call__(self, msg: p.Message) -> None:
        """Handlers get the connection as their `send`."""
        await self.send(msg)

    async def error(self, code: int, message: str) -> None:
        await self.send(p.Error(code, message))

    def gone(self) -> bool:
        """The client closed its end for good (not just its writing half): a stream
        waiting for news need not wait any longer."""
        if self.writer.is_closing():
            return True
        sock = self.writer.get_extra_info("socket")
        poller = select.poll()
        poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    async def close(self, clean: bool) -> None:
        """Close; a clean close delivers what is buffered, within WRITE_TIMEOUT."""
        if not clean:
            self.writer.transport.abort()
            return
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), WRITE_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            self.writer.transport.abort()

    async def request(self) -> p.Message | None:
        """The next request, or None at a clean end of the connection. A bad frame is
        answered with an Error and raises _Close."""
        first = await asyncio.wait_for(self.reader.read(1), IDLE_TIMEOUT)
        if not first:
            return None
        deadline = _now() + FRAME_TIMEOUT
        try:
            length = p.frame_length(first + await _within(self.reader.readexactly(3), deadline))
            if length > p.MAX_FRAME:
                await self.error(EXIT_USAGE, f"frame of {length} bytes is over the "
                                             f"{p.MAX_FRAME} byte limit")
                raise _Close
            if length <= SMALL_FRAME:
                body = await _within(self.reader.readexactly(length), deadline)
                return await self._decode(body)
            return await self._large(length)
        except asyncio.TimeoutError:
            await self.error(EXIT_USAGE, f"frame not complete within {FRAME_TIMEOUT:g} s "
                                         "of its first byte; closing")
            raise _Close from None

    async def _large(self, length: int) -> p.Message:
        budget = self.server.budget
        if not await budget.acquire(length, BUDGET_WAIT):
            await self.error(EXIT_UNREACHABLE, "wfd is busy reading other large requests; "
                                               "try again")
            raise _Close
        self._read_ahead(READ_CHUNK)
        try:
            body = await self._read_into(length, _now() + FRAME_TIMEOUT)
            return await self._decode(body)  # the body is dropped before the budget returns
        finally:
            self._read_ahead(READ_LIMIT)
            budget.release(length)

    async def _read_into(self, length: int, deadline: float) -> bytearray:
        """Read a body into one buffer of its size (readexactly would hold it twice)."""
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        try:
            while got < length:
                chunk = await _within(self.reader.read(min(READ_CHUNK, length - got)), deadline)
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(view[:got]), length)
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        finally:
            view.release()
        return body

    async def _decode(self, body: bytes | bytearray) -> p.Message:
        try:
            return p.decode_request(body)
        except p.VersionMismatch as exc:
            await self.error(EXIT_UNREACHABLE, f"wfd speaks protocol {p.PROTOCOL}, this "
                                               f"{p.peer_name(body)} speaks {exc.theirs}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.error(EXIT_USAGE, f"bad request: {exc}")
        raise _Close


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _within(awaitable: Awaitable, deadline: float):  # noqa: ANN202
    return await asyncio.wait_for(awaitable, max(0.0, deadline - _now()))


class Server:
    def __init__(self, engine: Engine, system: bool, group: str | None) -> None:
        self.engine = engine
        self.system = system
        self.uid = os.getuid()
        self.group = group
        self.gid = self._group_gid(group) if system else None
        self.budget = Budget(BUDGET)
        self.max_connections = connection_limit()
        self.per_uid: collections.Counter[int] = collections.Counter()
        self.connections: set[asyncio.Task] = set()
        self.shutdown_requested: Callable[[], None] = lambda: None
        self.handlers: dict[type, Callable[[Peer, object, _Conn], Awaitable[None]]] = {
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

    def refusal(self, peer: Peer) -> str:
        if self.system:
            return (f"wfd refuses {user_name(peer.uid)}: this system daemon serves root and "
                    f"the members of group {self.group!r} (ask an administrator to add you)")
        return (f"wfd refuses {user_name(peer.uid)}: this daemon serves only its own user, "
                f"{user_name(self.uid)}, and root (start your own with `wfd`)")

    def _refusal_if_any(self, peer: Peer) -> str | None:
        return None if self.allowed(peer) else self.refusal(peer)

    def _admit(self, peer: Peer) -> str | None:
        """Count the connection in, or say why not."""
        if len(self.connections) > self.max_connections:
            return (f"wfd is serving {self.max_connections} connections, its limit; "
                    "try again later")
        if not peer.root and peer.uid != self.uid and self.per_uid[peer.uid] >= MAX_PER_USER:
            return (f"{user_name(peer.uid)} has {MAX_PER_USER} connections to wfd open, "
                    "the limit per user; close some")
        self.per_uid[peer.uid] += 1
        return None

    # ---- connections -------------------------------------------------------------

    async def serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        extra = {}
        if sys.version_info >= (3, 13):
            # 3.13 unlinks the socket file on close; systemd's socket must outlive us, and
            # the daemon removes a socket it bound itself.
            extra["cleanup_socket"] = False
        return await asyncio.start_unix_server(self._connection, sock=sock, limit=READ_LIMIT,
                                               backlog=BACKLOG, **extra)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        conn = _Conn(self, reader, writer)
        clean = True
        try:
            await self._serve_peer(conn)
        except _Close:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            clean = False
        except asyncio.CancelledError:  # the daemon is stopping: no waiting for anyone
            clean = False
            raise
        except Exception:
            log.exception("error serving a client")
            clean = False
        finally:
            if task is not None:
                self.connections.discard(task)
            await conn.close(clean)

    async def _serve_peer(self, conn: _Conn) -> None:
        # Who is there, before a byte of theirs is read.
        peer = peer_of(conn.writer.get_extra_info("socket"))
        if not (peer.root or peer.uid == self.uid):
            # the user and group databases may be remote (NSS): not on the event loop
            refusal = await asyncio.to_thread(self._refusal_if_any, peer)
            if refusal is not None:
                log.warning("refused a connection from %s (pid %d)",
                            user_name(peer.uid), peer.pid)
                await conn.error(EXIT_UNREACHABLE, refusal)
                return
        busy = self._admit(peer)
        if busy is not None:
            await conn.error(EXIT_UNREACHABLE, busy)
            return
        try:
            while True:
                request = await conn.request()
                if request is None:
                    return
                await self._handle(peer, request, conn)
        finally:
            self.per_uid[peer.uid] -= 1
            if not self.per_uid[peer.uid]:
                del self.per_uid[peer.uid]

    async def _handle(self, peer: Peer, request: p.Message, conn: _Conn) -> None:
        try:
            await self.handlers[type(request)](peer, request, conn)
        except WfdError as exc:
            await conn.error(exc.exit_code, exc.message)
        except (ConnectionError, asyncio.TimeoutError):
            raise
        except Exception as exc:
            log.exception("error answering %s", type(request).__name__)
            await conn.error(EXIT_INTERNAL, f"wfd failed on this {type(request).__name__} "
                                            f"request (a bug; see its log): {exc}")
            raise _Close from None

    # ---- helpers ----------------------------------------------------------------

    def run_for(self, peer: Peer, run_id: str) -> st.RunState:
        """The run, if the peer may see it; another user's run answers like an unknown one."""
        if not valid_run_id(run_id):
            raise Refused(f"malformed run id {_shown(run_id)}")
        run = self.engine.run(run_id)
        if run is None or not self.visible(peer, run):
            raise Refused(f"no such run: {run_id}")
        return run

    def visible(self, peer: Peer, run: st.RunState) -> bool:
        if peer.root or not self.system:
            return True
        return run.owner_uid == peer.uid

    # ---- handlers -----------------------------------------------------------------

    async def hello(self, peer: Peer, req: p.Hello, send: _Conn) -> None:
        await send(p.HelloReply(version=__version__, protocol=p.PROTOCOL, pid=os.getpid(),
                                system=self.system, uid=self.uid))

    async def submit(self, peer: Peer, req: p.Submit, send: _Conn) -> None:
        check_submission(req)
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

    async def status(self, peer: Peer, req: p.Status, send: _Conn) -> None:
        if req.run_id is None:
            runs = [summary for summary, owner_uid in self.engine.summaries()
                    if peer.root or not self.system or owner_uid == peer.uid]
            await send(p.RunList(runs))
            return
        await send(p.RunInfo(self.status_of(self.run_for(peer, req.run_id))))

    def status_of(self, run: st.RunState) -> st.RunStatus:
        status = st.run_status(run)
        if run.state == st.RUNNING and self.engine.storage_error:
            status.error = self.engine.storage_error
        return status

    async def cancel(self, peer: Peer, req: p.Cancel, send: _Conn) -> None:
        run = self.run_for(peer, req.run_id)
        if run.finished:
            await send(p.Cancelled(run.state, True))
            return
        await self.engine.cancel(req.run_id)
        await self.engine.finished(req.run_id)
        await send(p.Cancelled(run.state, False))

    async def replay(self, peer: Peer, req: p.Replay, send: _Conn) -> None:
        run = self.run_for(peer, req.run_id)
        await send(await asyncio.to_thread(replay_run, self.engine, req.run_id, run))

    async def resume(self, peer: Peer, req: p.Resume, send: _Conn) -> None:
        run = self.run_for(peer, req.run_id)
        if req.run_id in self.engine.order:
            raise Refused(f"run {req.run_id} is running already")
        if run.state in (st.SUCCEEDED, st.CORRUPT):
            raise Refused(f"run {req.run_id} is {run.state}; only a FAILED, CANCELLED or "
                          "unfinished run can be resumed")
        await self.engine.resume([req.run_id])
        await send(p.Resumed([req.run_id]))

    async def resume_all(self, peer: Peer, req: p.ResumeAll, send: _Conn) -> None:
        run_ids = [
            run_id for run_id, run in self.engine.runs.items()
            if not run.finished and run_id not in self.engine.order and self.visible(peer, run)
        ]
        await self.engine.resume(run_ids)
        await send(p.Resumed(run_ids))

    async def watch(self, peer: Peer, req: p.Watch, send: _Conn) -> None:
        run = self.run_for(peer, req.run_id)
        queue = self.engine.watch(req.run_id)
        try:
            last = req.after_seq
            past = await asyncio.to_thread(self._committed_events, req.run_id)
            fresh = [e for e in past if e.seq > last]
            for start in range(0, len(fresh), PROGRESS_BATCH):
                await send(p.Progress(fresh[start:start + PROGRESS_BATCH]))
            if fresh:
                last = fresh[-1].seq
            while not (run.finished and last >= self._durable_seq(run)):
                try:
                    event = await asyncio.wait_for(queue.get(), GONE_POLL)
                except asyncio.TimeoutError:
                    if send.gone():
                        return
                    continue
                batch = [event] + _drain(queue, PROGRESS_BATCH - 1)
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

    async def logs(self, peer: Peer, req: p.Logs, send: _Conn) -> None:
        run = self.run_for(peer, req.run_id)
        if not STEP_ID_RE.fullmatch(req.step) or req.step not in run.steps:
            raise Refused(f"run {req.run_id} has no step {_shown(req.step)}")
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
            if send.gone():
                return
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
                        send: _Conn) -> int:
        path = self.engine.layout.log(run_id, step, attempt)
        while True:
            chunk = await asyncio.to_thread(_read_chunk, path, offset)
            if not chunk:
                return offset
            await send(p.LogData(attempt, chunk))
            offset += len(chunk)

    async def shutdown(self, peer: Peer, req: p.Shutdown, send: _Conn) -> None:
        if not (peer.root or peer.uid == self.uid):
            # A group member must not stop the daemon that serves everyone.
            raise Refused(f"only root may stop the system daemon ({user_name(peer.uid)} asked)")
        await send(p.Ok())
        self.shutdown_requested()


def _over(run: st.RunState, rec: st.StepRec) -> bool:
    """No further attempt of this step will come (until someone resumes the run)."""
    return rec.state in st.TERMINAL or run.finished


def _drain(queue: asyncio.Queue, limit: int) -> list:
    items = []
    while not queue.empty() and len(items) < limit:
        items.append(queue.get_nowait())
    return items


def _shown(text: str, limit: int = 80) -> str:
    """A client-supplied string quoted for a message, cut short if long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_submission(req: p.Submit) -> None:
    """What the workflow parser does not check: the client's context. The daemon never
    opens `base_dir`; it is only the step's working directory, entered by the step."""
    problems = []
    if "\0" in req.base_dir or not os.path.isabs(req.base_dir):
        problems.append(f"base_dir must be an absolute path, got {_shown(req.base_dir)}")
    for key, value in req.env.items():
        if not key or "=" in key or "\0" in key:
            problems.append(f"env: invalid variable name {_shown(key)}")
        elif "\0" in value:
            problems.append(f"env.{_shown(key)}: must not contain a NUL character")
    if problems:
        raise UsageError("bad request: " + "; ".join(problems[:5]))


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
    lines = [line.decode(errors="replace") for line in read.lines]
    if run_id not in engine.subs:  # workflow.json unreadable: nothing to fold against
        return p.Replayed(lines, [_transition(e) for e in read.events], st.run_status(run),
                          [run.error or "workflow.json unreadable"], read.torn_tail)
    folded, problem = fold_checked(run.workflow, read)
    problems = [problem] if problem else []
    transitions = [_transition(e) for e in read.events[:folded.last_seq]]
    if problem:
        folded.state = st.CORRUPT
        folded.error = problem
    return p.Replayed(lines, transitions, st.run_status(folded), problems, read.torn_tail)


def _transition(event: ev.Event) -> str:
    return f"{event.seq:>6}  {event.ts}  {st.describe(event)}"

