"""The supervisor inside a Slurm job: runs one attempt as the keeper would, then writes
its exit record where the daemon looks first (docs/slurm.md).

`python -m wfd.slurmjob` reads the attempt (`JobSpec`, one JSON line) on stdin: the
job script the daemon submits feeds it from a here-document, so nothing but the run
dir has to be shared with the node. It runs the step through `procs.LocalExecutor`
(a session of its own, the marks, every process of the tree reaped and killed), with
stdout and stderr appended to the attempt's log, and enforces the step's `timeout`
itself, counted from when the job runs, not from its submission: a daemon that is
down cannot miss it. SIGTERM (`scancel --batch --signal=TERM`, or Slurm's time limit)
gives the tree SIGTERM, then SIGKILL after `kill_grace`, like every kill of wfd.

The exit record (`keeper.ExitRecord`, JSON) is written to a temporary name, synced
and renamed into place, so the daemon sees a whole record or none. The job's exit
status is 0 once the record is written: the step's own status is in the record.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import msgspec

from wfd.executor import AttemptKey, AttemptSpec, StartFailed


class JobSpec(msgspec.Struct, kw_only=True):
    """One Slurm attempt, as the daemon hands it to the job."""

    run_id: str
    step: str
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    kill_grace: float
    timeout: float | None = None
    log: str  # the attempt's log file (appended to)
    record: str  # where the exit record goes


def write_record(path: str, record: object) -> None:
    """Whole or not at all, durably (the daemon may read it at any moment)."""
    from wfd.eventlog import replace_file

    replace_file(path, msgspec.json.encode(record) + b"\n")


async def supervise(spec: JobSpec) -> object:
    """Run the attempt; its exit record once its whole tree is gone."""
    from wfd.keeper import ExitRecord
    from wfd.outfile import OutputDirs
    from wfd.procs import LocalExecutor

    key = AttemptKey(spec.run_id, spec.step, spec.attempt)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future = loop.create_future()

    def on_end(_key: AttemptKey, exit_code: int | None, kill_reason: str | None,
               start_error: str | None = None, usage: tuple[float, int] | None = None) -> None:
        if not ended.done():
            ended.set_result((exit_code, kill_reason, start_error, usage))

    executor = LocalExecutor(on_end)
    executor.install(loop)
    terminated: list[bool] = []

    def terminate() -> None:
        # "terminated": the daemon asked (it knows why: cancel, timeout, stop) or Slurm did
        terminated.append(True)
        executor.kill(key, "terminated")

    # Before the step starts: a SIGTERM from then on is never lost.
    loop.add_signal_handler(signal.SIGTERM, terminate)
    loop.add_signal_handler(signal.SIGINT, terminate)
    started_at = time.time()
    outfile = None
    outdirs = OutputDirs()
    try:
        log_fd = os.open(spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        on_end(key, None, None, start_error=f"cannot open log: {exc.strerror}")
    else:
        try:  # $WFD_OUTPUT on the node, as the keeper makes it for a local step
            outfile = outdirs.new_file(None)
            env = {**spec.env, "WFD_OUTPUT": outfile.path}
            executor.start(AttemptSpec(key=key, argv=spec.argv, env=env, cwd=spec.cwd,
                                       log_fd=log_fd, umask=spec.umask,
                                       kill_grace=spec.kill_grace))
        except OSError as exc:
            on_end(key, None, None, start_error=f"cannot make $WFD_OUTPUT: {exc.strerror}")
        except StartFailed as exc:
            on_end(key, None, None, start_error=str(exc))
        finally:
            os.close(log_fd)
    if terminated:
        executor.kill(key, "terminated")
    if spec.timeout is not None:
        loop.call_later(spec.timeout, executor.kill, key, "timeout")
    exit_code, kill_reason, start_error, usage = await ended
    # Slurm signals the batch step's whole tree (proctrack), so the step may die of the
    # SIGTERM before our handler has run: let a pending handler run, and count a death
    # that came with it as the daemon's kill, whose reason the daemon knows.
    await asyncio.sleep(0.05)
    if terminated and kill_reason is None and start_error is None and exit_code != 0:
        kill_reason = "terminated"
    cpu, max_rss = usage or (0.0, 0)
    why = "start-failed" if start_error is not None else (kill_reason or "exited")
    outputs, output_error = read_outputs(outfile, exit_code == 0 and why == "exited")
    outdirs.close()
    return ExitRecord(run_id=spec.run_id, step=spec.step, attempt=spec.attempt,
                      exit_code=exit_code, why=why, error=start_error, started_at=started_at,
                      ended_at=time.time(), cpu=cpu, max_rss=max_rss, outputs=outputs,
                      output_error=output_error)


def read_outputs(outfile: object, succeeded: bool) -> tuple[dict[str, str], str | None]:
    """A succeeded attempt's outputs, or why they are refused (the keeper's rules)."""
    from wfd.outputs import OutputInvalid, parse_outputs

    if outfile is None:
        return {}, None
    try:
        return (parse_outputs(outfile.read()) if succeeded else {}), None  # type: ignore[attr-defined]
    except OutputInvalid as exc:
        return {}, str(exc)
    finally:
        outfile.remove()  # type: ignore[attr-defined]


def main() -> int:
    try:
        spec = msgspec.json.decode(sys.stdin.buffer.readline(), type=JobSpec)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"wfd slurmjob: bad attempt spec: {exc}", file=sys.stderr)
        return 2
    sys.stdin.close()
    try:
        record = asyncio.run(supervise(spec))
    except Exception as exc:  # noqa: BLE001 - a record that says so beats a lost attempt
        from wfd.keeper import ExitRecord

        print(f"wfd slurmjob: {exc!r}", file=sys.stderr)
        now = time.time()
        record = ExitRecord(run_id=spec.run_id, step=spec.step, attempt=spec.attempt,
                            why="start-failed", error=f"wfd's Slurm supervisor failed: {exc!r}",
                            started_at=now, ended_at=now)
    try:
        write_record(spec.record, record)
    except OSError as exc:  # in the job's output, which is the attempt's log
        print(f"wfd slurmjob: cannot write the exit record {spec.record} on "
              f"{socket.gethostname()}: {exc.strerror or exc} (the state dir must be on a "
              "filesystem every node shares)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
