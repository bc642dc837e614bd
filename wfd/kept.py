"""The daemon's side of the keeper: the executor the engine drives when attempts are
to outlive the daemon (docs/design.md, "Steps outlive the daemon").

`start` and `kill` are messages to the keeper; the keeper answers `KStarted`
and, once the attempt's tree is gone and its exit record durable, `KEnded`,
which this turns into the engine's `attempt_started` / `attempt_ended` calls.
After the engine has recorded an outcome durably it acknowledges the record
(`ack`), so the keeper can forget it.

At start-up `connect` finds the keeper of the state dir (its lock held, its
socket answering) or starts one. `reattach` then sorts the attempts the log
says are RUNNING: still running under the keeper (they go on; their end comes
as usual), ended with a record (in the keeper's unacknowledged ends or in a
journal a dead keeper left), unsent (claimed after this keeper began, yet
unknown to it: the daemon died between the claim and its `KStart`, so it never
ran and the engine starts it now), or lost (none of these: a reboot, or the
keeper was killed), which the engine handles per the step's `on_lost`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from wfd import keeper as k
from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt, StartInfo

log = logging.getLogger("wfd")

CONNECT_WAIT = 10.0  # seconds to wait for a keeper to answer (started, or starting)
LEAF_WAIT = 10.0  # seconds a lost attempt's cgroup leaf may take to empty after cgroup.kill


class KeeperUnavailable(Exception):
    """No keeper could be reached or started; the daemon cannot run attempts."""


class Reattached(NamedTuple):
    """What became of the attempts a previous daemon recorded RUNNING."""

    running: list[AttemptKey]
    ended: list[k.ExitRecord]
    lost: list[AttemptKey]
    unsent: list[AttemptKey]  # claimed, but the daemon died before the keeper got it


class KeptExecutor:
    wants_log_fd = False  # the keeper opens each attempt's log itself

    def __init__(self, state_dir: Path,
                 on_started: Callable[[AttemptKey, StartInfo], None],
                 on_end: Callable[..., None]) -> None:
        self.dir = state_dir / "keeper"
        self.on_started = on_started
        self.on_end = on_end
        self.attempts: set[AttemptKey] = set()  # started and not yet ended
        self.writer: asyncio.StreamWriter | None = None
        self.welcome: k.KWelcome | None = None
        self.reader_task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.lost_connection: Callable[[BaseException | None], None] = lambda exc: None

    @property
    def running(self) -> int:
        return len(self.attempts)

    # -- the connection ---------------------------------------------------------------

    async def connect(self) -> k.KWelcome:
        """Reach the state dir's keeper, starting one if none holds its lock."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        if not k.keeper_alive(self.dir):
            await self._spawn_keeper()
        deadline = asyncio.get_running_loop().time() + CONNECT_WAIT
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.dir / k.SOCKET))
                break
            except OSError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise KeeperUnavailable(f"cannot reach the keeper in {self.dir}: "
                                            f"{exc.strerror or exc}") from None
                if not k.keeper_alive(self.dir):
                    await self._spawn_keeper()
                await asyncio.sleep(0.05)
        writer.write(k.frame(k.KHello(version=k.KEEPER_PROTOCOL, daemon_pid=os.getpid())))
        body = await asyncio.wait_for(k.read_frame(reader), CONNECT_WAIT)
        welcome = k.decode_reply(body) if body is not None else None
        if not isinstance(welcome, k.KWelcome):
            raise KeeperUnavailable(f"the keeper in {self.dir} did not answer")
        self.writer = writer
        self.welcome = welcome
        self.attempts = {AttemptKey(*key) for key in welcome.running}
        self._idle.clear() if self.attempts else self._idle.set()
        self._reader = reader
        log.info("keeper pid %d: %d attempt(s) running, %d end(s) to record", welcome.pid,
                 len(welcome.running), len(welcome.ended))
        return welcome

    def listen(self) -> None:
        """Take the keeper's news from now on (once the runs they are about are loaded)."""
        self.reader_task = asyncio.create_task(self._read(self._reader))

    async def _spawn_keeper(self) -> None:
        """Start a keeper in a session of its own and wait for its "ready" line."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wfd.keeper", str(self.dir),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            start_new_session=True, env=_keeper_env(),
        )
        assert proc.stdout is not None
        try:
            await asyncio.wait_for(proc.stdout.readline(), CONNECT_WAIT)
        except asyncio.TimeoutError:
            pass  # connect() says what went wrong

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: BaseException | None = None
        try:
            while (body := await k.read_frame(reader)) is not None:
                self._dispatch(k.decode_reply(body))
        except Exception as exc:  # noqa: BLE001 - told to the daemon, which stops
            error = exc
        if not getattr(self, "closing", False):
            self.lost_connection(error)

    def _dispatch(self, msg: k.KReply) -> None:
        if isinstance(msg, k.KStarted):
            key = AttemptKey(msg.run_id, msg.step, msg.attempt)
            self.on_started(key, StartInfo(msg.pid, msg.start_time, msg.boot_id,
                                           msg.containment or None))
        elif isinstance(msg, k.KEnded):
            self._ended(msg.record)

    def _ended(self, record: k.ExitRecord) -> None:
        self.attempts.discard(record.key)
        if not self.attempts:
            self._idle.set()
        self.on_end(record.key, record.exit_code, record.kill_reason,
                    start_error=record.error, usage=(record.cpu, record.max_rss),
                    outputs=record.outputs, output_error=record.output_error)

    def _send(self, msg: k.KMsg) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(k.frame(msg))

    # -- the executor interface ----------------------------------------------------------

    def start(self, spec: AttemptSpec) -> None:
        """Ask the keeper to run the attempt; its start and end come back as calls."""
        user = spec.user
        self.attempts.add(spec.key)
        self._idle.clear()
        self._send(k.KStart(
            run_id=spec.key.run_id, step=spec.key.step, attempt=spec.key.attempt,
            argv=spec.argv, env=spec.env, cwd=spec.cwd, umask=spec.umask,
            kill_grace=spec.kill_grace, timeout=spec.timeout,
            uid=None if user is None else user.uid, gid=-1 if user is None else user.gid,
            groups=[] if user is None else list(user.groups),
        ))

    def identify(self, info: StartInfo) -> StartInfo:
        return info

    def kill(self, key: AttemptKey, reason: str, force: bool = False) -> None:
        if key in self.attempts:
            self._send(k.KKill(run_id=key.run_id, step=key.step, attempt=key.attempt,
                               reason=reason, force=force))

    def ack(self, keys: list[AttemptKey]) -> None:
        """These attempts' outcomes are durable in their logs: the keeper may forget them."""
        if keys:
            self._send(k.KAck(keys=[k.key_tuple(key) for key in keys]))

    async def stop_all(self, reason: str, force: bool = False) -> None:
        """Stop every attempt (`wfctl shutdown --stop-steps`) and wait for their ends."""
        self._send(k.KStopAll(force=force))
        await self._idle.wait()

    def reattach(self, stale: list[StaleAttempt]) -> Reattached:
        """Sort what a previous daemon left RUNNING (see the module's doc)."""
        welcome = self.welcome
        assert welcome is not None
        running = {AttemptKey(*key) for key in welcome.running}
        ended = {record.key: record for record in welcome.ended}
        journals: dict[AttemptKey, k.ExitRecord] | None = None
        result = Reattached([], [], [], [])
        for entry in stale:
            key = entry.key
            if key in running:
                result.running.append(key)
            elif key in ended:
                result.ended.append(ended[key])
            else:
                if journals is None:  # only when needed: a dead keeper's journal
                    journals = k.read_journals(self.dir)
                if key in journals:
                    result.ended.append(journals[key])
                elif welcome.since and (entry.claimed_at or 0.0) > welcome.since:
                    result.unsent.append(key)  # this keeper ran since the claim: never got it
                else:
                    result.lost.append(key)
        return result

    async def clear_stale(self, stale: list[StaleAttempt]) -> None:
        """Kill what is left of lost attempts (their keeper died: their processes may
        not): the local executor's proven-by-marks-or-leader hunt, from the daemon."""
        from wfd.cgroups import AttemptCgroups
        from wfd.procs import LocalExecutor

        hunter = LocalExecutor(lambda *args, **kwargs: None)
        hunter.loop = asyncio.get_running_loop()
        await hunter.clear_stale(stale)  # SIGTERM, kill_grace, SIGKILL, as every kill
        cgroups = AttemptCgroups.find(str(self.dir), spawner=False)
        if cgroups is None:
            return
        # A lost attempt's leaf holds all that is left of it, also what dropped the marks:
        # killed once the hunt (which gave the marked ones their SIGTERM) is over.
        leaves = [cgroups.leaf(entry.key) for entry in stale]
        for leaf in leaves:
            cgroups.kill(leaf)
        deadline = hunter.loop.time() + LEAF_WAIT
        while any(cgroups.pids(leaf) for leaf in leaves) and hunter.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for leaf in leaves:
            cgroups.remove(leaf)

    def close(self) -> None:
        """The daemon stops: leave the keeper and its attempts running."""
        self.closing = True
        if self.reader_task is not None:
            self.reader_task.cancel()
        if self.writer is not None:
            self.writer.close()


def _keeper_env() -> dict[str, str]:
    """The daemon's environment minus systemd's per-service variables (the keeper is no
    service's main process) and test switches the keeper must not see twice."""
    drop = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
            "WATCHDOG_PID")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    # The keeper imports what this interpreter imported, also when it was started with
    # -I or a sys.path of its own (a system python3 running another user's daemon).
    env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    level = logging.getLogger("wfd").getEffectiveLevel()
    env["WFD_KEEPER_LOG_LEVEL"] = logging.getLevelName(level).lower()
    return env
