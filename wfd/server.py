"""The Unix socket: peer checks, frames, and one small handler per request.

Each connection is checked with SO_PEERCRED before a byte of it is read: a
user daemon serves its own uid and root; a system daemon serves root and the
members of its socket group (from the group database: SO_PEERCRED carries
only the primary gid). Everyone else gets one `Error` (exit 3) and is closed.

Connections are capped (globally, below the descriptor limit, and per
non-root uid), so one user cannot take every descriptor. What a connection
may cost besides (deadlines, budgets for requests and replies) is
`wfd.channel`'s business; long replies go a part at a time (`_with_steps`,
`_send_runs`, `replay`), so that none is ever held whole.
"""

from __future__ import annotations

import asyncio
import collections
import grp
import logging
import os
import re
import resource
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from wfd import __version__, channel, history, retention, runref, store
from wfd import events as ev
from wfd import protocol as p
from wfd import schedules as sch
from wfd import state as st
from wfd.channel import Budget, Channel, Close
from wfd.engine import Engine
from wfd.errors import EXIT_UNREACHABLE, UsageError, WfdError
from wfd.eventlog import open_file, valid_run_id
from wfd.replay import Replay, events_after
from wfd.schedlog import Sched
from wfd.scheduling import Scheduling, owner_of
from wfd.users import describe as user_name
from wfd.users import in_group
from wfd.workflow import MAX_PARALLEL, POOL_RE, STEP_ID_RE, env_problems

log = logging.getLogger("wfd")

MAX_CONNECTIONS = 1024  # lowered to fit the descriptor limit
BACKLOG = 512  # connections the kernel queues before we accept them
FD_RESERVE = 128  # descriptors kept for the event log, step logs and spawns
MAX_PER_USER = 128  # connections of one non-root uid
EXIT_INTERNAL = 70  # a bug in wfd answered this request (sysexits EX_SOFTWARE)
LOG_CHUNK = 256 * 1024
LOG_POLL = 0.1
MAX_KEY = 256  # characters of an idempotency key (`wfctl run --key`)
KEY_RE = re.compile(rf"[^\x00-\x1f\x7f-\x9f]{{1,{MAX_KEY}}}")
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


def connection_limit() -> int:
    """MAX_CONNECTIONS, or fewer if the descriptor limit would not leave FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, soft - FD_RESERVE))


class Refused(WfdError):
    """The request names a run the peer may not see, or is otherwise refused."""


class Server:
    def __init__(self, engine: Engine, system: bool, group: str | None) -> None:
        self.engine = engine
        self.system = system
        self.uid = os.getuid()
        self.group = group
        self.gid = self._group_gid(group) if system else None
        self.budget = Budget(channel.BUDGET, channel.BUDGET_SHARE)
        self.reply_budget = Budget(channel.REPLY_BUDGET, channel.REPLY_SHARE)
        self.max_connections = connection_limit()
        self.per_uid: collections.Counter[int] = collections.Counter()
        self.connections: set[asyncio.Task] = set()
        self.shutdown_requested: Callable[[bool], None] = lambda stop_steps: None
        self.handlers: dict[type, Callable[[Peer, object, Channel], Awaitable[None]]] = {
            p.Hello: self.hello, p.Submit: self.submit, p.Status: self.status,
            p.Cancel: self.cancel, p.Replay: self.replay, p.Resume: self.resume,
            p.ResumeAll: self.resume_all, p.Watch: self.watch, p.Logs: self.logs,
            p.Rerun: self.rerun, p.Retry: self.retry, p.Prune: self.prune,
            p.Shutdown: self.shutdown, p.PoolList: self.pool_list, p.PoolSet: self.pool_set,
            p.ScheduleAdd: self.schedule_add,
            p.ScheduleUpdate: self.schedule_update, p.ScheduleCommand: self.schedule_command,
            p.ScheduleList: self.schedule_list,
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
        return await asyncio.start_unix_server(self._connection, sock=sock,
                                               limit=channel.READ_LIMIT, backlog=BACKLOG,
                                               **extra)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        conn = Channel(reader, writer, self.budget, self.reply_budget)
        clean = True
        try:
            await self._serve_peer(conn)
        except Close:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            clean = False
        except asyncio.CancelledError:
            # The daemon is stopping: close at once, and end quietly (a connection task
            # that ends cancelled makes asyncio log a traceback: Python 3.10, 3.11).
            clean = False
        except Exception:
            log.exception("error serving a client")
            clean = False
        finally:
            if task is not None:
                self.connections.discard(task)
            await conn.close(clean)

    async def _serve_peer(self, conn: Channel) -> None:
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
        # each user draws on a share of the byte budgets; root and our own user on all
        conn.key = None if peer.root or peer.uid == self.uid else peer.uid
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

    async def _handle(self, peer: Peer, request: p.Message, conn: Channel) -> None:
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
            raise Close from None

    # ---- helpers ----------------------------------------------------------------

    async def run_for(self, peer: Peer, ref: str) -> st.RunState:
        """The run `ref` names (a run id or a short reference, `wfd.runref`), if the peer
        may see it; another user's run answers like an unknown one."""
        run = await self.engine.get(ref) if valid_run_id(ref) else None
        if run is None:  # not a whole run id: resolving costs a look at every run
            run = await self.engine.get(self.resolve(peer, ref))
        if run is None or not self.visible(peer, run):
            raise Refused(f"no such run: {_shown(ref)[1:-1]}")
        return run

    def resolve(self, peer: Peer, ref: str) -> str:
        """A short reference resolved among the runs the peer may see, and only those:
        an ambiguous prefix must not list (or count) another user's runs."""
        runs = [runref.Candidate(summary.run_id, summary.name, summary.created_at)
                for summary, owner_uid in self.engine.summaries()
                if peer.root or not self.system or owner_uid == peer.uid]
        return runref.resolve(ref, runs)

    def visible(self, peer: Peer, run: st.RunState) -> bool:
        if peer.root or not self.system:
            return True
        return run.owner_uid == peer.uid

    # ---- handlers -----------------------------------------------------------------

    async def hello(self, peer: Peer, req: p.Hello, send: Channel) -> None:
        await send(p.HelloReply(version=__version__, protocol=p.PROTOCOL, pid=os.getpid(),
                                system=self.system, uid=self.uid))

    async def submit(self, peer: Peer, req: p.Submit, send: Channel) -> None:
        check_submission(req)
        # workflow.json is durable before the first event, the first event before the reply.
        existing = req.key is not None and self.engine.key_taken(peer.uid, req.key)
        run_id = await self.engine.submit(
            req.workflow, req.source, req.base_dir, req.env, req.umask, peer.uid, peer.gid,
            req.vars, req.key,
        )
        await send(p.Submitted(run_id, existing))

    async def status(self, peer: Peer, req: p.Status, send: Channel) -> None:
        if req.run_id is None:
            await self._send_runs(peer, req, send)
            return
        run = await self.run_for(peer, req.run_id)
        header = self.engine.status(run, steps=False)
        await send.send_parts(_with_steps(p.RunInfo(header), header, run,
                                          self.engine.sched.pool_full))

    async def _send_runs(self, peer: Peer, req: p.Status, send: Channel) -> None:
        """The runs the peer may see that pass the request's filters, a part at a time
        (the list held meanwhile is of references, not of replies)."""
        unknown = sorted(set(req.states) - st.RUN_STATES)
        if unknown:
            raise UsageError(f"unknown run state {_shown(unknown[0])} (one of "
                             f"{', '.join(sorted(st.RUN_STATES))})")
        since = None if req.since is None else ev.format_ts(req.since)
        runs = (self.engine.summary(summary) for summary, owner_uid in self.engine.summaries()
                if peer.root or not self.system or owner_uid == peer.uid)
        chosen = history.select(runs, set(req.states), req.name, since, req.limit)

        def parts() -> Iterator[p.Message]:
            for group, last in p.packed(chosen.runs):
                if last:
                    yield p.RunList(group, self.engine.storage_error, chosen.matched,
                                    chosen.counts)
                else:
                    yield p.RunsPart(group)

        await send.send_parts(parts())

    # ---- schedules: each belongs to its owner; others see it as unknown --------

    def _schedules(self) -> Scheduling:
        if self.engine.schedules is None:
            raise UsageError("this wfd has no schedules")
        return self.engine.schedules

    def _owner(self, peer: Peer) -> int:
        return owner_of(self.system, self.uid, peer.uid)

    async def schedule_add(self, peer: Peer, req: p.ScheduleAdd, send: Channel) -> None:
        check_submission(req)  # the same context fields as a Submit's
        fields = {f: getattr(req, f) for f in (
            "workflow", "source", "base_dir", "env", "umask", "vars", "cron", "every", "tz",
            "catch_up", "max_catch_up", "overlap")}
        gid = peer.gid if self.system else os.getgid()
        sched = await self._schedules().add(self._owner(peer), gid, req.name, fields)
        await send(p.Schedules([self.schedule_view(sched)]))

    async def schedule_update(self, peer: Peer, req: p.ScheduleUpdate, send: Channel) -> None:
        if "\0" in req.base_dir or not os.path.isabs(req.base_dir):
            raise UsageError(f"bad request: base_dir must be an absolute path, got "
                             f"{_shown(req.base_dir)}")
        sched = await self._schedules().update(self._owner(peer), req.name, req.workflow,
                                               req.source, req.base_dir)
        await send(p.Schedules([self.schedule_view(sched)]))

    async def schedule_command(self, peer: Peer, req: p.ScheduleCommand,
                               send: Channel) -> None:
        schedules, owner = self._schedules(), self._owner(peer)
        if req.action == "fire":
            await send(p.Submitted(await schedules.fire(owner, req.name)))
            return
        if req.action in ("pause", "unpause"):
            await schedules.pause(owner, req.name, req.action == "pause")
        elif req.action == "remove":
            await schedules.remove(owner, req.name)
        else:
            raise UsageError(f"bad request: unknown schedule action {_shown(req.action)}")
        await send(p.Ok())

    async def schedule_list(self, peer: Peer, req: p.ScheduleList, send: Channel) -> None:
        schedules = self._schedules()
        if req.name is not None:
            shown = [schedules.get(self._owner(peer), req.name)]
        else:
            everyone = peer.root and self.system
            shown = schedules.visible(None if everyone else self._owner(peer))
        views = [self.schedule_view(s) for s in sorted(shown, key=lambda s: s.key[1])]
        await send(p.Schedules(views))

    def schedule_view(self, sched: Sched) -> p.ScheduleView:
        a, schedules = sched.added, self._schedules()
        last = self.engine.runs.get(sched.last_run) if sched.last_run else None
        stub = self.engine.stubs.get(sched.last_run) if sched.last_run else None
        state = last.state if last is not None else (stub.summary.state if stub else None)
        next_at = None
        if not sched.paused:
            after = max(self.engine.clock.now(), sched.last_slot or a.anchor)
            next_at = ev.format_ts(sch.next_slot(sched.timing, after))
        return p.ScheduleView(
            name=a.name, owner=a.owner, cron=a.cron, every=a.every, tz=a.tz,
            catch_up=a.catch_up, max_catch_up=a.max_catch_up, overlap=a.overlap,
            paused=sched.paused, added_at=a.ts, workflow=store.default_name(sched.source),
            next_at=next_at, last_slot=_ts(sched.last_slot),
            queued=_ts(sched.queued if sched.queued is not None else schedules._waiting(sched)),
            last_run=sched.last_run, last_run_state=state, vars=a.vars, env=sorted(a.env),
        )

    async def cancel(self, peer: Peer, req: p.Cancel, send: Channel) -> None:
        run = await self.run_for(peer, req.run_id)
        if run.finished:
            await send(p.Cancelled(run.state, True, run.run_id))
            return
        await self.engine.cancel(run.run_id)
        await send(p.Cancelled(run.state, False, run.run_id))

    async def replay(self, peer: Peer, req: p.Replay, send: Channel) -> None:
        """The log re-folded in a worker thread, a block at a time, from the file and the
        run's immutable workflow only; each block is sent before the next is read."""
        run = await self.run_for(peer, req.run_id)
        path = self.engine.events_path(run.run_id)
        if run.run_id in self.engine.ctx:
            replay = Replay(path, run.workflow)
        else:  # workflow.json is unreadable: nothing to fold against
            replay = Replay(path, None, self.engine.status(run), run.error)
        blocks = replay.blocks()
        while True:
            await send.reserve()  # before the block is read: a waiting reply holds nothing
            block = await asyncio.to_thread(next, blocks, None)
            if block is None:
                break
            await send.send_parts(
                p.ReplayPart([line for line, _ in group],
                             [text for _, text in group if text is not None])
                for group, _ in p.packed(block))
        end, folded = replay.result()
        await send.send_parts(_with_steps(end, end.status, folded))

    async def rerun(self, peer: Peer, req: p.Rerun, send: Channel) -> None:
        problems = vars_problems(req.vars)
        if problems:
            raise UsageError("bad request: " + "; ".join(problems[:5]))
        run = await self.run_for(peer, req.run_id)
        run_id = await self.engine.rerun(run.run_id, peer.uid, peer.gid, req.vars)
        await send(p.Submitted(run_id))

    async def retry(self, peer: Peer, req: p.Retry, send: Channel) -> None:
        run = await self.run_for(peer, req.run_id)
        after = run.last_seq
        steps = await self.engine.retry(run.run_id, req.steps, req.downstream)
        await send(p.Retried(run.run_id, steps, after))

    async def resume(self, peer: Peer, req: p.Resume, send: Channel) -> None:
        run = await self.run_for(peer, req.run_id)
        after = run.last_seq
        await self.engine.resume(run.run_id)
        await send(p.Resumed([run.run_id], {run.run_id: after}))

    async def resume_all(self, peer: Peer, req: p.ResumeAll, send: Channel) -> None:
        run_ids = await self.engine.resume_all(lambda run: self.visible(peer, run))
        await send(p.Resumed(run_ids))

    async def watch(self, peer: Peer, req: p.Watch, send: Channel) -> None:
        run = await self.run_for(peer, req.run_id)
        queue = self.engine.watch(run.run_id)
        try:
            # the log as it is now (read after the queue is there: nothing falls between)
            last = req.after_seq
            history = events_after(self.engine.events_path(run.run_id), last)
            while True:
                await send.reserve()  # before the block is read
                block = await asyncio.to_thread(next, history, None)
                if block is None:
                    break
                last = await _send_progress(send, block, last)
            send.unreserve()
            while not (run.finished and last >= self._durable_seq(run)):
                try:
                    event = await asyncio.wait_for(queue.get(), GONE_POLL)
                except asyncio.TimeoutError:
                    if send.gone():
                        return
                    continue
                last = await _send_progress(send, [event, *_drain(queue)], last)
            header = self.engine.status(run, steps=False)
            await send.send_parts(_with_steps(p.RunEnded(header), header, run,
                                                  self.engine.sched.pool_full))
        finally:
            self.engine.unwatch(run.run_id, queue)

    def _durable_seq(self, run: st.RunState) -> int:
        if run.state == st.CORRUPT:
            return 0
        return self.engine.durable_seq(run.run_id)

    async def logs(self, peer: Peer, req: p.Logs, send: Channel) -> None:
        run = await self.run_for(peer, req.run_id)
        if not STEP_ID_RE.fullmatch(req.step) or req.step not in run.steps:
            raise Refused(f"run {run.run_id} has no step {_shown(req.step)}"
                          f"{st.near_step(req.step, run)}")
        rec = run.steps[req.step]
        if req.attempt is not None and not 1 <= req.attempt <= rec.attempts:
            raise Refused(f"step {req.step} has no attempt {req.attempt} "
                          f"(it has {rec.attempts})")
        attempt = req.attempt if req.attempt is not None else rec.attempts
        offset = req.offset
        if req.tail and attempt >= 1:
            path = self.engine.log_path(run.run_id, req.step, attempt)
            offset = await asyncio.to_thread(_tail_offset, path, req.tail)
        while True:
            if attempt >= 1:
                offset = await self._send_log(run.run_id, req.step, attempt, offset, send)
            if not req.follow:
                break
            if send.gone():
                return
            running = rec.state == st.RUNNING and rec.attempts == attempt
            if running or (attempt == 0 and rec.attempts == 0 and not _over(run, rec)):
                await asyncio.sleep(LOG_POLL)
                continue
            if attempt >= 1:
                offset = await self._send_log(run.run_id, req.step, attempt, offset, send)
            if req.attempt is None and rec.attempts > attempt:
                attempt, offset = attempt + 1, 0
                continue
            if req.attempt is not None or _over(run, rec):
                break
            await asyncio.sleep(LOG_POLL)  # waiting for the step's next attempt
        await send(p.LogEnd(attempt if attempt >= 1 else None, rec.state))

    async def _send_log(self, run_id: str, step: str, attempt: int, offset: int,
                        send: Channel) -> int:
        path = self.engine.log_path(run_id, step, attempt)
        while True:
            await send.reserve()  # before the chunk is read: a waiting stream holds nothing
            chunk = await asyncio.to_thread(_read_chunk, path, offset)
            if not chunk:
                send.unreserve()
                return offset
            await send(p.LogData(attempt, chunk))
            offset += len(chunk)

    async def prune(self, peer: Peer, req: p.Prune, send: Channel) -> None:
        """Finished runs of the peer's (root: anyone's) that the request selects."""
        retention.check_states(req.states)
        if req.keep is None and req.older_than is None and not req.states and req.name is None:
            raise UsageError("say which runs to prune: --keep N, --older-than DURATION, "
                             "--state S or --name N (all finished runs: --keep 0)")
        mine = (summary for summary, owner_uid in self.engine.summaries()
                if peer.root or not self.system or owner_uid == peer.uid)
        chosen = retention.choose(mine, self.engine.clock.now(), keep=req.keep,
                                  older_than=req.older_than, states=req.states, name=req.name)
        if not req.dry_run:
            chosen = await self.engine.prune(chosen)
        await send(p.Pruned(chosen, req.dry_run))

    async def shutdown(self, peer: Peer, req: p.Shutdown, send: Channel) -> None:
        if not (peer.root or peer.uid == self.uid):
            # A group member must not stop the daemon that serves everyone.
            raise Refused(f"only root may stop the system daemon ({user_name(peer.uid)} asked)")
        await send(p.Ok())
        self.shutdown_requested(req.stop_steps)


    async def pool_list(self, peer: Peer, req: p.PoolList, send: Channel) -> None:
        await send(self._pools())

    async def pool_set(self, peer: Peer, req: p.PoolSet, send: Channel) -> None:
        if not (peer.root or peer.uid == self.uid):
            # A pool is shared by every user: one member must not take it from the others.
            raise Refused(f"only root may change the system daemon's pools "
                          f"({user_name(peer.uid)} asked)")
        if not POOL_RE.fullmatch(req.name):
            raise UsageError(f"bad pool name {_shown(req.name)} (must match {POOL_RE.pattern})")
        if req.limit > MAX_PARALLEL:
            raise UsageError(f"a pool's limit is at most {MAX_PARALLEL}, got {req.limit}")
        await self.engine.set_pool(req.name, req.limit)
        await send(self._pools())

    def _pools(self) -> p.Pools:
        return p.Pools([p.PoolInfo(*row) for row in self.engine.pool_table()])


def _over(run: st.RunState, rec: st.StepRec) -> bool:
    """No further attempt of this step will come (until someone resumes the run)."""
    return rec.state in st.TERMINAL or run.finished


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def _send_progress(send: Channel, events: list[ev.Event], last: int) -> int:
    """The events after seq `last`, in Progress frames of about a part's size; the last
    seq sent."""
    fresh = [event for event in events if event.seq > last]
    await send.send_parts(p.Progress(group) for group, _ in p.packed(fresh))
    return fresh[-1].seq if fresh else last


def _with_steps(msg: p.Message, status: st.RunStatus | None, run: st.RunState | None,
                pool_full: st.PoolFull | None = None) -> Iterator[p.Message]:
    """`msg`, whose `status` holds `run`'s status without its steps, after StepsParts:
    the steps are made as the parts are, and the last of them go in `msg`."""
    if status is None or run is None:
        yield msg
        return
    for group, last in p.packed(st.step_statuses(run, pool_full)):
        if last:
            status.steps = dict(group)
            yield msg
        else:
            yield p.StepsPart(dict(group))


def _ts(epoch: float | None) -> str | None:
    return None if epoch is None else ev.format_ts(epoch)


def _shown(text: str, limit: int = 80) -> str:
    """A client-supplied string quoted for a message, cut short if long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_submission(req: p.Submit | p.ScheduleAdd) -> None:
    """What the workflow parser does not check: the client's context. The daemon never
    opens `base_dir`; it is only the step's working directory, entered by the step."""
    problems = []
    if "\0" in req.base_dir or not os.path.isabs(req.base_dir):
        problems.append(f"base_dir must be an absolute path, got {_shown(req.base_dir)}")
    problems += [f"env{where}: {why}" for where, why in env_problems(req.env)]
    key = getattr(req, "key", None)  # a ScheduleAdd has the same context, and no key
    if key is not None and not KEY_RE.fullmatch(key):
        problems.append(f"key must be 1 to {MAX_KEY} printable characters, "
                        f"got {_shown(key)}")
    problems += vars_problems(req.vars)
    if problems:
        raise UsageError("bad request: " + "; ".join(problems[:5]))


def vars_problems(variables: dict[str, str]) -> list[str]:
    """KEY=VALUE variables: the rules of an environment, and no WFD_* name (those are the
    daemon's: a run's marks, its schedule's slot)."""
    problems = [f"vars{where}: {why}" for where, why in env_problems(variables)]
    problems += [f"vars[{name!r}]: WFD_* variables are set by wfd, not by the caller"
                 for name in variables if name.startswith("WFD_")]
    return problems


def _tail_offset(path, lines: int) -> int:
    """Where the last `lines` lines of the file begin (a last line without its newline
    counts), looking back at most TAIL_WINDOW bytes; 0 for a missing file."""
    try:
        fd = open_file(path, os.O_RDONLY)  # no symlink followed, also above the file
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - p.TAIL_WINDOW)
        window = os.pread(fd, size - start, start)
    finally:
        os.close(fd)
    return start + tail_start(window, lines, whole=start == 0)


def tail_start(data: bytes, lines: int, whole: bool) -> int:
    """The index in `data` where its last `lines` lines begin. `whole`: `data` is the
    entire file; else its first, maybe partial, line is never shown."""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, end)
        if cut < 0:
            return 0 if whole else min(len(data), data.find(b"\n") + 1)
        end = cut
    return end + 1


def _read_chunk(path, offset: int) -> bytes:
    try:
        fd = open_file(path, os.O_RDONLY)  # no symlink followed, also above the file
    except OSError:
        return b""
    try:
        return os.pread(fd, LOG_CHUNK, offset)
    finally:
        os.close(fd)
