"""Human-readable text for wfctl: tables of runs and steps, times and durations.

Pure functions from the protocol's status views to lines; `now` is passed in,
so the output of a given status at a given moment is fixed (and testable).
Times are shown by one rule: local time, with the zone's abbreviation after
every date and time (`2026-12-04 09:30:08 CET`; UTC where TZ says so), and as
`HH:MM:SS` alone on progress lines. Durations are rounded for the eye, and a
run's duration is its running time (a resumed run's time FAILED does not count). Whatever
came from a user or the daemon (names, errors) is passed through
`printable`: a control character is shown as an escape, never sent to the
terminal.
"""

from __future__ import annotations

import time

from wfd.events import parse_ts
from wfd.state import (
    CANCELLED,
    FAILED,
    RETRY_WAIT,
    RUNNING,
    RunStatus,
    RunSummary,
    StepStatus,
    signal_name,
)
from wfd.text import printable


def local_time(ts: str | None, fmt: str = "%Y-%m-%d %H:%M:%S %Z") -> str:
    """An RFC 3339 UTC time as local time with its zone; `-` when unknown."""
    if not ts:
        return "-"
    try:
        return time.strftime(fmt, time.localtime(parse_ts(ts)))
    except ValueError:
        return ts  # shown as stored rather than hidden


def duration(seconds: float) -> str:
    """`0.4s`, `12.3s`, `3m04s`, `2h05m`, `3d04h`: short, and sortable by eye."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def span(start: str | None, end: str | None, now: float | None, running: bool) -> str:
    """Duration from `start` to `end`, or to `now` while still running; `-` if unknown
    (also while running when `now` is None, as for a replayed log)."""
    if not start:
        return "-"
    try:
        if end:
            return duration(parse_ts(end) - parse_ts(start))
        if running and now is not None:
            return duration(now - parse_ts(start))
    except ValueError:
        pass
    return "-"


MAX_CELL = 64  # a padded column is never wider: one huge name must not widen every row


def _cell(text: str) -> str:
    text = printable(text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is not padded. Cells are
    escaped first, so the widths are those of what the terminal shows, and a padded
    cell is cut at MAX_CELL (a 16 MiB name would pad every row to 16 MiB)."""
    rows = [[_cell(cell) for cell in row[:-1]] + [printable(row[-1])] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return lines


def _one_line(text: str | None) -> str:
    return "-" if not text else printable(" ".join(text.split()))


def cpu_time(seconds: float | None) -> str:
    """CPU seconds of a step's attempts (user + system), "-" where none was measured."""
    if seconds is None:
        return "-"
    return f"{seconds:.2f}s" if seconds < 60 else f"{seconds / 60:.1f}min"


WAITING = "waiting for resume-all"  # an unfinished run no daemon drives (--no-resume)


def run_state(run: RunStatus | RunSummary) -> str:
    return WAITING if run.waiting_for_resume else run.state


def run_duration(run: RunStatus | RunSummary, now: float | None) -> str:
    """Running time: the spans since creation and each resume, not the time a run sat
    FAILED before a resume; a run nobody drives does not count on."""
    seconds = run.run_seconds
    if seconds is None:  # a daemon that did not say: its age
        return span(run.created_at, run.finished_at, now, run.state == RUNNING)
    if run.running_since and not run.waiting_for_resume:
        if now is None:
            return "-"
        try:
            seconds += now - parse_ts(run.running_since)
        except ValueError:
            return "-"
    elif not run.finished_at and not run.waiting_for_resume:
        return "-"  # no span known: a CORRUPT run, say
    return duration(seconds)


def exit_cell(code: int | None) -> str:
    """EXIT: the status, or the signal's name (`SIGTERM`, not -15)."""
    if code is None:
        return "-"
    return signal_name(code) or str(code)


def step_error(step: StepStatus) -> str:
    """Why a step did not succeed, in words: `killed by SIGTERM (timeout)`."""
    name = signal_name(step.exit_code)
    if name:
        if step.state == CANCELLED:
            return f"killed by {name} (cancel)"
        if (step.error or "").startswith("timed out"):
            return f"killed by {name} (timeout)"
        if step.state in (FAILED, RETRY_WAIT):
            return f"killed by {name}"
    return _one_line(step.error)


def run_lines(status: RunStatus, now: float | None) -> list[str]:
    """A run's header line, its error if any, and a table of its steps; `now` as in `span`."""
    head = (
        f"run {status.run_id}  {status.name}  {run_state(status)}  owner {status.owner}  "
        f"created {local_time(status.created_at)}"
    )
    if status.finished_at:
        head += (f"  finished {local_time(status.finished_at)} "
                 f"(ran {run_duration(status, now)})")
    elif status.waiting_for_resume:
        head += f"  (ran {run_duration(status, now)}; wfctl resume {status.run_id})"
    lines = [printable(head)]
    if status.description:
        lines.append(_one_line(status.description))
    if status.schedule is not None:
        lines.append(printable(f"schedule {status.schedule}  slot "
                               f"{local_time(status.scheduled_at)} ({status.scheduled_at})"))
    if status.vars:
        lines.append(printable("vars " + " ".join(f"{k}={v}" for k, v in status.vars.items())))
    if status.error:
        lines.append(f"error: {printable(status.error)}")
    # A JOB column (executor and job id) only when some step went to a batch system.
    batch = any(step.executor for step in status.steps.values())
    rows = _step_rows(status.steps, now, batch)
    if rows:
        header = ["STEP", "STATE", "ATTEMPTS", "EXIT", "DURATION", "CPU"]
        lines += table(header + (["JOB"] if batch else []) + ["ERROR"], rows)
    # on_exit steps (issue 15): their own section, since they never decide the run's state.
    exits = _step_rows(status.on_exit, now, False)
    if exits:
        header = ["ON EXIT", "STATE", "ATTEMPTS", "EXIT", "DURATION", "CPU", "ERROR"]
        lines += ["", *table(header, exits)]
    outputs = [[step_id, f"{key}={_cut(value)}"] for step_id, step in status.steps.items()
               for key, value in step.outputs.items()]
    if outputs:
        lines += ["", *table(["STEP", "OUTPUT"], outputs)]
    described = [[step_id, _one_line(step.description)]
                 for step_id, step in status.steps.items() if step.description]
    if described:
        lines += ["", *table(["STEP", "DESCRIPTION"], described)]
    return lines


def _step_rows(steps: dict[str, StepStatus], now: float | None, batch: bool,
               ) -> list[list[str]]:
    return [
        [
            step_id, step.state, str(step.attempts),
            exit_cell(step.exit_code),
            span(step.started_at, step.finished_at, now, step.state == RUNNING),
            cpu_time(step.cpu),
            *([_job_cell(step.executor, step.job_id)] if batch else []),
            f"waiting for {step.waiting}" if step.waiting else step_error(step),
        ]
        for step_id, step in steps.items()
    ]


MAX_OUTPUT_SHOWN = 200  # characters of an output's value in `status` (--json has it all)


def _cut(value: str) -> str:
    value = printable(value)
    return value if len(value) <= MAX_OUTPUT_SHOWN else value[: MAX_OUTPUT_SHOWN - 3] + "..."


def _job_cell(executor: str | None, job_id: str | None) -> str:
    """`slurm 1234` (`slurm ?` until its id is known); `-` for a local step."""
    if executor is None:
        return "-"
    return printable(f"{executor} {job_id or '?'}")


def runs_lines(runs: list[RunSummary], now: float | None) -> list[str]:
    """A table of runs, oldest first as the daemon sends them; a SCHEDULE column (the
    schedule and slot a run came from) when any run came from a schedule."""
    scheduled = any(run.schedule is not None for run in runs)
    rows = [
        [
            run.run_id, run.name, run_state(run), run.owner, local_time(run.created_at),
            run_duration(run, now),
            *([_schedule_cell(run)] if scheduled else []),
        ]
        for run in runs
    ]
    header = ["RUN_ID", "NAME", "STATE", "OWNER", "CREATED", "DURATION"]
    return table(header + (["SCHEDULE"] if scheduled else []), rows)


def _schedule_cell(run: RunSummary) -> str:
    if run.schedule is None:
        return "-"
    return f"{run.schedule}@{local_time(run.scheduled_at)}"


def counts_line(matched: int, counts: dict[str, int]) -> str:
    """`42 runs: 39 SUCCEEDED, 2 FAILED, 1 RUNNING`: the most common state first."""
    parts = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    noun = "run" if matched == 1 else "runs"
    return f"{matched} {noun}: " + ", ".join(f"{n} {state}" for state, n in parts)


def pools_lines(pools: list) -> list[str]:
    """`wfctl pool list`: each pool's limit, running and waiting steps, and whether its
    limit was set at run time (`wfctl pool set`) or comes from `wfd --pool`."""
    rows = [[pool.name, str(pool.limit), str(pool.running), str(pool.waiting),
             "wfctl pool set" if pool.source == "set" else "wfd --pool"] for pool in pools]
    return table(["POOL", "LIMIT", "RUNNING", "WAITING", "SET BY"], rows)


def summary_line(status: RunStatus) -> str:
    """One line for the end of `run --wait`: state, and which steps did not succeed."""
    line = f"run {status.run_id} {status.state}"
    if status.error:
        line += f": {status.error}"
    failed = [sid for sid, step in status.steps.items() if step.state == "FAILED"]
    if failed:
        line += f" (failed: {', '.join(failed)})"
    return printable(line)


def transition_lines(transitions: list[str]) -> list[str]:
    """`replay`'s transition lines as sent by the daemon, escaped for the terminal."""
    return [printable(line) for line in transitions]
