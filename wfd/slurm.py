"""The Slurm executor: attempts as batch jobs of an existing Slurm cluster
(docs/slurm.md; issue 17).

The engine records the intent (`AttemptSubmitting`, with a token) durably before
`start` is called; `start` then runs `sbatch` in the background, names the job
`wfd-<token>` and reports its id through `on_submitted` (the engine records
`AttemptSubmitted`). The job runs `python -m wfd.slurmjob`, the supervisor, which
runs the step as the keeper would and writes the attempt's exit record next to its
log in the run dir (the state dir must be shared with the nodes).

One poller learns how jobs end: the exit record first; then one `squeue` for every
job waited on (by name, so that it also finds a job whose id was never recorded);
then, for a job squeue no longer shows, `sacct` where accounting exists. A job gone
without a record is lost (`on_lost`), unless it was being killed. A controller that
does not answer is "unknown, keep waiting": `unreachable` says why, for `status`;
nothing fails for it.

Nothing is submitted twice: a job whose submission was cut short (the daemon died
after the intent, `sbatch` timed out or could not reach the controller) is looked
up by name until the controller answers; only once it says there is no such job,
and `RESUBMIT_AFTER` (`wfd --slurm-resubmit-after`) has passed since the intent
(an `sbatch` left running by a dead daemon may still get through), is the attempt
submitted again, under the same name.

A kill is `scancel --batch --signal=TERM` (the supervisor gives the step SIGTERM,
then SIGKILL after its kill_grace), then `scancel` of the whole job once the grace
and `ESCALATE_MARGIN` are over; a job still pending is cancelled at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import msgspec

from wfd import faults
from wfd.executor import AttemptKey, AttemptSpec, StaleAttempt
from wfd.slurmjob import JobSpec

log = logging.getLogger("wfd")

POLL = 1.0  # seconds between looks at the jobs waited on
SBATCH_TIMEOUT = 60.0  # seconds one sbatch may take before its outcome counts as unknown
SQUEUE_TIMEOUT = 30.0
RESUBMIT_AFTER = 90.0  # seconds after the intent before a job not found is submitted again
ESCALATE_MARGIN = 2.0  # seconds past kill_grace before the whole job is killed
STOP_UNREACHABLE = 10.0  # seconds a stop waits for a controller that does not answer
GONE_CHECKS = 2  # looks that must find a job gone before it counts as lost (slow NFS)
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})
SPEC_END = "WFD_ATTEMPT_SPEC_END"


def record_path(log_path: str) -> str:
    """Where the supervisor writes the attempt's exit record: next to its log."""
    return log_path[: -len(".log")] + ".exit" if log_path.endswith(".log") else log_path + ".exit"


def job_script(spec: JobSpec) -> str:
    """The batch script: the supervisor, fed the attempt on stdin (one JSON line, which
    cannot be the here-document's end marker)."""
    pythonpath = os.pathsep.join(path for path in sys.path if path)
    return (
        "#!/bin/sh\n"
        f"# wfd attempt {spec.attempt} of step {spec.step} of run {spec.run_id}\n"
        f"PYTHONPATH={shlex.quote(pythonpath)} exec {shlex.quote(sys.executable)} "
        f"-m wfd.slurmjob <<'{SPEC_END}'\n"
        f"{msgspec.json.encode(spec).decode()}\n{SPEC_END}\n"
    )


def sbatch_argv(spec: AttemptSpec, log_path: str, token: str) -> list[str]:
    """`sbatch`'s options: nothing of the daemon's environment is exported (the step's is
    in the script), output into the attempt's log, `--time` from the timeout unless
    given."""
    opts = spec.slurm
    argv = ["sbatch", "--parsable", "--no-requeue", f"--job-name=wfd-{token}",
            f"--chdir={spec.cwd}", "--export=NONE", f"--output={log_path}",
            f"--error={log_path}", "--open-mode=append"]
    time_limit = getattr(opts, "time", None)
    if time_limit is None and spec.timeout is not None:
        # a backstop only: the supervisor enforces the timeout, with kill_grace
        time_limit = str(math.ceil((spec.timeout + spec.kill_grace) / 60) + 1)
    if time_limit is not None:
        argv.append(f"--time={time_limit}")
    if getattr(opts, "partition", None):
        argv.append(f"--partition={opts.partition}")  # type: ignore[union-attr]
    if getattr(opts, "cpus", None):
        argv.append(f"--cpus-per-task={opts.cpus}")  # type: ignore[union-attr]
    if getattr(opts, "mem", None):
        argv.append(f"--mem={opts.mem}")  # type: ignore[union-attr]
    argv.extend(getattr(opts, "extra", ()))
    return argv


def one_line(stderr: bytes, fallback: str) -> str:
    """Slurm's own message, one line: its last line that says something."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else fallback


def unreachable_text(message: str) -> bool:
    text = message.lower()
    return ("unable to contact slurm controller" in text or "connection refused" in text
            or "socket timed out" in text or "communication" in text)


class Found(NamedTuple):
    """What the previous daemon left RUNNING on Slurm, sorted (see KeptExecutor.reattach)."""

    running: list[AttemptKey]
    ended: list[object]  # keeper.ExitRecord
    lost: list[AttemptKey]
    unsent: list[AttemptKey]


@dataclass
class _Job:
    key: AttemptKey
    token: str
    record: str  # the exit record's path
    kill_grace: float
    intent_at: float  # when the intent was recorded (epoch seconds)
    spec: AttemptSpec | None = None  # None for a job re-attached (never resubmitted here)
    job_id: str | None = None
    state: str | None = None  # as squeue last said
    submitting: bool = False  # an sbatch runs
    killing: str | None = None  # the reason of the kill asked
    kill_sent: bool = False
    escalate_at: float | None = None
    gone: int = 0  # looks that found no such job (or an ended one) and no record
    asked_sacct: bool = False  # once it left squeue without a record
    asking: bool = False
    sacct_state: str | None = None
    ended: bool = False


class SlurmExecutor:
    wants_log_fd = False

    def __init__(self, on_submitted: Callable[[AttemptKey, str], None],
                 on_end: Callable[..., None], on_lost: Callable[[AttemptKey, str], None],
                 on_resubmit: Callable[[AttemptKey], None],
                 resubmit_after: float = RESUBMIT_AFTER) -> None:
        self.on_submitted = on_submitted
        self.resubmit_after = resubmit_after  # `wfd --slurm-resubmit-after`
        self.on_end = on_end
        self.on_lost = on_lost
        self.on_resubmit = on_resubmit  # a re-attached job found never submitted: start it
        self.jobs: dict[AttemptKey, _Job] = {}
        self.unreachable: str | None = None  # why the controller did not answer, if not
        self._poller: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return len(self.jobs)

    def __contains__(self, key: AttemptKey) -> bool:
        return key in self.jobs

    # -- start ----------------------------------------------------------------------

    def start(self, spec: AttemptSpec) -> None:
        """Submit in the background (the intent is durable); the id comes back through
        `on_submitted`, a refusal through `on_end` with Slurm's message."""
        assert spec.token is not None and spec.log_path is not None
        job = self.jobs.get(spec.key)
        if job is None:
            job = _Job(spec.key, spec.token, record_path(spec.log_path), spec.kill_grace,
                       spec.intent_at or time.time(), spec)
            self._add(job)
        job.spec = spec
        job.submitting = True
        asyncio.get_running_loop().create_task(self._submit(job, spec))

    def _add(self, job: _Job) -> None:
        self.jobs[job.key] = job
        self._idle.clear()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _submit(self, job: _Job, spec: AttemptSpec) -> None:
        log_path = spec.log_path
        assert log_path is not None
        jobspec = JobSpec(run_id=spec.key.run_id, step=spec.key.step, attempt=spec.key.attempt,
                          argv=spec.argv, env=spec.env, cwd=spec.cwd, umask=spec.umask,
                          kill_grace=spec.kill_grace, timeout=spec.timeout, log=log_path,
                          record=job.record)
        argv = sbatch_argv(spec, log_path, job.token)
        try:
            code, out, err = await run(argv, job_script(jobspec).encode(), SBATCH_TIMEOUT)
        except FileNotFoundError:
            job.submitting = False
            self._end(job, None, None, "cannot submit to Slurm: sbatch not found on wfd's "
                                       "PATH (install the Slurm client commands)")
            return
        job.submitting = False
        if job.ended:
            return
        if code is None:  # timed out: it may have been accepted all the same
            log.warning("%s: sbatch timed out; looking the job up by name", _name(job.key))
            self._wake.set()
            return
        if code != 0:
            message = one_line(err, f"sbatch exited with status {code}")
            if unreachable_text(message):  # not accepted; look up, then submit again
                self.unreachable = message
                return
            self._end(job, None, None, message)
            return
        job_id = out.decode(errors="replace").strip().split(";")[0]
        faults.hit("slurm-submitted")  # tests: the daemon dies before the id is recorded
        self._submitted(job, job_id)

    def _submitted(self, job: _Job, job_id: str) -> None:
        job.job_id = job_id
        self.on_submitted(job.key, job_id)
        if job.killing is not None:
            self._send_kill(job)

    # -- kill -----------------------------------------------------------------------

    def kill(self, key: AttemptKey, reason: str, force: bool = False) -> None:
        job = self.jobs.get(key)
        if job is None or job.ended:
            return
        if job.killing is None:
            job.killing = reason
        if force:
            job.escalate_at = 0.0  # asked again (or a forced stop): the whole job now
        self._send_kill(job)

    def _send_kill(self, job: _Job) -> None:
        """Start (or go on with) the kill; what the controller refused is sent again at the
        next look."""
        if job.job_id is None or job.state is None:
            # The next look finds the job (or finds there is none) and says whether it runs
            # yet: `scancel --batch` of a pending job only retries until it times out.
            self._wake.set()
            return
        if not job.kill_sent:
            job.kill_sent = True
            if job.escalate_at is None:
                job.escalate_at = time.time() + job.kill_grace + ESCALATE_MARGIN
            if job.state == "PENDING":
                job.escalate_at = 0.0  # nothing runs yet
            else:
                asyncio.get_running_loop().create_task(
                    self._scancel(job, ["--batch", "--signal=TERM"]))
        self._wake.set()

    async def _scancel(self, job: _Job, options: list[str]) -> None:
        try:
            code, _, err = await run(["scancel", *options, str(job.job_id)], b"",
                                     SQUEUE_TIMEOUT)
        except FileNotFoundError:
            code, err = 1, b"scancel not found"
        if code != 0:
            message = one_line(err, "scancel failed")
            log.warning("%s: scancel %s: %s", _name(job.key), " ".join(options), message)
            if unreachable_text(message):
                self.unreachable = message
                if not options:
                    job.escalate_at = 0.0
                else:
                    job.kill_sent = False  # send it again at the next look
            elif options:  # no batch shell to signal (still pending): cancel it whole
                job.escalate_at = 0.0
            self._wake.set()

    async def stop_all(self, reason: str, force: bool = False) -> None:
        """Kill every job and wait for their ends; while the controller does not answer
        (for STOP_UNREACHABLE s), leave them: still RUNNING in the log, the next daemon
        re-attaches to them."""
        for key in list(self.jobs):
            self.kill(key, reason, force)
        unreachable_since = None
        while not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), POLL)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            unreachable_since = (unreachable_since or now) if self.unreachable else None
            if unreachable_since is not None and now - unreachable_since > STOP_UNREACHABLE:
                log.warning("stopping with %d Slurm job(s) left: the controller does not "
                            "answer (%s)", len(self.jobs), self.unreachable)
                return

    # -- re-attach --------------------------------------------------------------------

    def reattach(self, stale: list[StaleAttempt]) -> Found:
        """Slurm attempts an earlier daemon left RUNNING: an exit record says how one
        ended; one with a token is waited on (by its id, or looked up by name); one with
        no intent recorded never reached Slurm."""
        found = Found([], [], [], [])
        for entry in stale:
            if entry.token is None or entry.log_path is None:
                found.unsent.append(entry.key)
                continue
            job = _Job(entry.key, entry.token, record_path(entry.log_path), entry.kill_grace,
                       entry.intent_at or 0.0, job_id=entry.job_id)
            record = read_record(job.record)
            if record is not None:
                found.ended.append(record)
                continue
            self._add(job)
            found.running.append(entry.key)
        return found

    # -- learning ends --------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while self.jobs:
            self._wake.clear()
            try:
                await self._look()
            except Exception:  # noqa: BLE001 - one bad look must not end the watch
                log.exception("looking at the Slurm jobs failed")
            try:
                await asyncio.wait_for(self._wake.wait(), POLL)
            except asyncio.TimeoutError:
                pass
        self._idle.set()

    async def _look(self) -> None:
        """One look: exit records, then one squeue for every job waited on."""
        for job in list(self.jobs.values()):
            self._check_record(job)
        jobs = [job for job in self.jobs.values() if not job.submitting]
        if not jobs:
            return
        rows = await squeue([f"wfd-{job.token}" for job in jobs])
        if isinstance(rows, str):
            if self.unreachable is None:
                log.warning("the Slurm controller does not answer: %s", rows)
            self.unreachable = rows
            return
        if self.unreachable is not None:
            log.info("the Slurm controller answers again")
        self.unreachable = None
        now = time.time()
        for job in jobs:
            if not job.ended and not job.submitting:
                self._seen(job, rows.get(f"wfd-{job.token}"), now)

    def _check_record(self, job: _Job) -> bool:
        record = read_record(job.record)
        if record is None:
            return False
        if record.why == "terminated":  # our SIGTERM: the kill's reason, as for local steps
            record.why = job.killing or "terminated"
        self._end(job, record.exit_code, record.kill_reason, record.error,
                  (record.cpu, record.max_rss), record.outputs, record.output_error)
        return True

    def _seen(self, job: _Job, row: tuple[str, str] | None, now: float) -> None:
        """What one squeue said of a job (None: nothing by its name)."""
        if row is not None and job.job_id is None:
            self._submitted(job, row[0])
        job.state = row[1] if row is not None else None
        if row is not None and row[1] not in ENDED:
            job.gone = 0
            if job.killing is not None and job.escalate_at is not None \
                    and now >= job.escalate_at:
                job.escalate_at = now + POLL * 5  # again later if it lingers
                asyncio.get_running_loop().create_task(self._scancel(job, []))
            elif job.killing is not None and not job.kill_sent:
                self._send_kill(job)
            return
        job.gone += 1
        if job.gone < GONE_CHECKS or self._check_record(job):
            return
        if row is None and job.job_id is None:  # never accepted, as far as Slurm knows
            self._never_accepted(job, now)
        elif job.killing is not None:
            self._end(job, None, job.killing, None)
        elif row is not None and row[1] == "TIMEOUT":  # Slurm's --time backstop
            self._end(job, None, "timeout", None)
        elif row is None and not job.asked_sacct:  # left squeue: accounting may know more
            job.asked_sacct = job.asking = True
            asyncio.get_running_loop().create_task(self._ask_sacct(job))
        elif not job.asking:
            state = row[1] if row is not None else (job.sacct_state or "gone from the queue")
            self._lost(job, f"Slurm job {job.job_id} ended ({state}) without an exit record "
                            "(is the state dir shared with the nodes?)")

    async def _ask_sacct(self, job: _Job) -> None:
        """Where accounting exists, what it says of a job squeue no longer shows: still
        pending or running means keep waiting (as if squeue had said so). Untested on the
        one-node cluster, which has no accounting (sacct fails: then lost, as before)."""
        try:
            code, out, _ = await run(["sacct", "--noheader", "--parsable2", "--allocations",
                                      "--format=State", f"--jobs={job.job_id}"], b"",
                                     SQUEUE_TIMEOUT)
        except FileNotFoundError:
            code, out = 1, b""
        finally:
            job.asking = False
        states = out.decode(errors="replace").split() if code == 0 else []
        if states and states[0].upper() not in ENDED:
            job.gone, job.asked_sacct = 0, False  # not over: look again later
        elif states:
            job.sacct_state = states[0]
        self._wake.set()

    def _never_accepted(self, job: _Job, now: float) -> None:
        if job.killing is not None:
            self._end(job, None, job.killing, None)
        elif now < job.intent_at + self.resubmit_after:
            return  # a dead daemon's sbatch may still get through: wait, look again
        elif job.spec is not None:
            log.info("%s: no Slurm job by its name; submitting it again", _name(job.key))
            self.start(job.spec)
        else:
            del self.jobs[job.key]
            log.info("%s: its job was never accepted; submitting it now", _name(job.key))
            self.on_resubmit(job.key)

    def _lost(self, job: _Job, why: str) -> None:
        job.ended = True
        self.jobs.pop(job.key, None)
        self.on_lost(job.key, why)

    def _end(self, job: _Job, exit_code: int | None, kill_reason: str | None,
             start_error: str | None, usage: tuple[float, int] | None = None,
             outputs: dict[str, str] | None = None, output_error: str | None = None) -> None:
        if job.ended:
            return
        job.ended = True
        self.jobs.pop(job.key, None)
        self.on_end(job.key, exit_code, kill_reason, start_error=start_error, usage=usage,
                    outputs=outputs, output_error=output_error)

    def ack(self, keys: list[AttemptKey]) -> None:
        """The outcome is durable: the job's exit record may go."""
        # Records are small; they stay next to the logs as what the job said.

    def status_note(self) -> str | None:
        if self.unreachable is None or not self.jobs:
            return None
        return f"Slurm controller unreachable ({self.unreachable}); waiting for it"


def read_record(path: str) -> object | None:
    from wfd.keeper import ExitRecord

    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    try:
        return msgspec.json.decode(data, type=ExitRecord)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not whole yet: the supervisor renames a whole one into place


async def run(argv: list[str], stdin: bytes, timeout: float
              ) -> tuple[int | None, bytes, bytes]:
    """A Slurm command: (exit status or None if it timed out and was killed, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()  # our own child, not yet reaped: its pid is still its own
        await proc.wait()
        return None, b"", b""
    return proc.returncode, out, err


async def squeue(names: list[str]) -> dict[str, tuple[str, str]] | str:
    """One squeue for the jobs of these names: name -> (job id, state); the error, one
    line, if the controller did not answer. Of two jobs of one name, the first."""
    argv = ["squeue", "--noheader", "--states=all", "--format=%i|%T|%j",
            f"--name={','.join(names)}"]
    try:
        code, out, err = await run(argv, b"", SQUEUE_TIMEOUT)
    except FileNotFoundError:
        return "squeue not found on wfd's PATH"
    if code is None:
        return f"squeue gave no answer in {SQUEUE_TIMEOUT:g} s"
    if code != 0:
        return one_line(err, f"squeue exited with status {code}")
    rows: dict[str, tuple[str, str]] = {}
    for line in out.decode(errors="replace").splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3:
            rows.setdefault(parts[2], (parts[0], parts[1]))
    return rows


def sbatch_found() -> bool:
    return shutil.which("sbatch") is not None


def _name(key: AttemptKey) -> str:
    return f"{key.run_id} {key.step} attempt {key.attempt}"
