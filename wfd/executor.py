"""The executor interface: start an attempt, kill it, learn how it ended.

The engine drives attempts only through this interface, so that another way
of running them (a supervising runner per attempt that outlives the daemon, a
Slurm executor) plugs in without touching the core. `procs.LocalExecutor`
runs attempts as local process trees.

Contract:
- `start(spec)` spawns the attempt whose claim is already durable and returns
  what identifies it later (`StartInfo`, recorded in `AttemptStarted`), or
  raises `StartFailed` with a one-line reason. An asynchronous executor returns
  None and reports the start later (the keeper: `attempt_started`; Slurm: the
  job id, `attempt_submitted`, its intent made durable by the engine first).
- `identify(info)` fills in what `start` left out to return quickly (the
  leader's start time); the engine calls it off the critical path.
- `kill(key, reason, force=False)` ends the attempt's whole tree; idempotent,
  except that `force` (a cancel or stop asked twice) skips what is left of the
  grace. `reason` is "timeout", "cancel" or "stop" and comes back with the end.
- `on_end(key, exit_code, kill_reason, start_error=None)` is called exactly
  once per started attempt, when it is over: its leader exited and nothing of
  it is left. `start_error` is set when the program never ran (an executor
  may learn that only after `start` returned).
- `clear_stale(entries, on_cleared=None)` makes sure nothing of attempts
  recorded RUNNING by an earlier daemon is left, before they are recorded
  interrupted; `on_cleared(key)` as each one is clear, and it returns once all
  are. `kill(key, reason, force=True)` hurries one along.
- `stop_all(reason, force=False)` kills every attempt and returns once all
  have ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from wfd.users import UserIds


class AttemptKey(NamedTuple):
    run_id: str
    step: str
    attempt: int

    def marks(self) -> tuple[str, str, str]:
        return (self.run_id, self.step, str(self.attempt))


@dataclass
class AttemptSpec:
    """Everything needed to start one attempt; built by the daemon from the run's files."""

    key: AttemptKey
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log_fd: int  # -1 for executors that open the attempt's log themselves
    umask: int
    kill_grace: float
    user: UserIds | None = None
    timeout: float | None = None  # for executors that enforce it themselves
    # Chosen per step: "local" (the keeper) or "slurm" (wfd.slurm). A batch executor
    # opens no fd: it gets the log's path, the token naming its job (its intent durable),
    # when that intent was recorded, and the step's options for it (workflow.SlurmOptions).
    executor: str = "local"
    log_path: str | None = None
    token: str | None = None
    intent_at: float | None = None
    slurm: object = None


class StartInfo(NamedTuple):
    pid: int
    start_time: float | None  # None until `identify`; 0.0 if it ended before that
    boot_id: str
    containment: str | None = None  # "cgroup" or "session", where the executor says


class StartFailed(Exception):
    """The attempt could not start (missing program, bad cwd): the reason, one line."""



class StaleAttempt(NamedTuple):
    """An attempt a previous daemon recorded RUNNING, as its log identifies it."""

    key: AttemptKey
    pid: int | None
    start_time: float | None
    boot_id: str | None
    kill_grace: float
    uid: int | None = None  # the run owner's: only processes of this uid are the attempt's
    claimed_at: float | None = None  # when its AttemptClaimed was recorded (epoch seconds)
    # A batch attempt's (see AttemptSpec): its executor, the token of its job's name, the
    # job id once recorded, its log's path and when its intent was recorded.
    executor: str = "local"
    token: str | None = None
    job_id: str | None = None
    log_path: str | None = None
    intent_at: float | None = None


OnEnd = Callable[[AttemptKey, "int | None", "str | None"], None]


class Executor(Protocol):
    running: int

    def start(self, spec: AttemptSpec) -> StartInfo: ...

    def identify(self, info: StartInfo) -> StartInfo: ...

    def kill(self, key: AttemptKey, reason: str, force: bool = False) -> None: ...

    async def clear_stale(self, stale: list[StaleAttempt],
                          on_cleared: Callable[[AttemptKey], None] | None = None) -> None: ...

    async def stop_all(self, reason: str, force: bool = False) -> None: ...
