"""The daemon's executors behind one interface: each attempt goes to the executor its
step names (`"executor"` in the workflow): the keeper (`kept.KeptExecutor`) for local
steps, `slurm.SlurmExecutor` for Slurm steps. The engine sees one executor
(executor.py's contract); this only routes."""

from __future__ import annotations

import asyncio

from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt, StartInfo
from wfd.kept import KeptExecutor, Reattached
from wfd.slurm import SlurmExecutor


class Executors:
    wants_log_fd = False  # the keeper opens local logs, a Slurm job its own

    def __init__(self, local: KeptExecutor, slurm: SlurmExecutor) -> None:
        self.local = local
        self.slurm = slurm

    @property
    def running(self) -> int:
        return self.local.running + self.slurm.running

    def start(self, spec: AttemptSpec) -> StartInfo | None:
        if spec.executor == "slurm":
            self.slurm.start(spec)
            return None
        return self.local.start(spec)

    def identify(self, info: StartInfo) -> StartInfo:
        return self.local.identify(info)

    def kill(self, key: AttemptKey, reason: str, force: bool = False) -> None:
        if key in self.slurm:
            self.slurm.kill(key, reason, force)
        else:
            self.local.kill(key, reason, force)

    def ack(self, keys: list[AttemptKey]) -> None:
        self.local.ack(keys)

    async def stop_all(self, reason: str, force: bool = False) -> None:
        await asyncio.gather(self.local.stop_all(reason, force),
                             self.slurm.stop_all(reason, force))

    def reattach(self, stale: list[StaleAttempt]) -> Reattached:
        local = self.local.reattach([e for e in stale if e.executor != "slurm"])
        slurm = self.slurm.reattach([e for e in stale if e.executor == "slurm"])
        return Reattached(local.running + slurm.running,
                          local.ended + slurm.ended,  # type: ignore[operator]
                          local.lost + slurm.lost, local.unsent + slurm.unsent)

    async def clear_stale(self, stale: list[StaleAttempt]) -> None:
        """Only local attempts leave processes on this machine to hunt."""
        await self.local.clear_stale([e for e in stale if e.executor != "slurm"])

    def status_note(self) -> str | None:
        return self.slurm.status_note()
