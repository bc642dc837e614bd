"""Shared by the Slurm tests (issue 17): the one-node cluster `tools/slurm-up` starts, and
looks at its queue through the real client commands."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_UP = REPO / "tools" / "slurm-up"


def cluster_or_skip() -> None:
    """Start the one-node cluster (idempotent); skip, saying why, if it cannot be had."""
    try:
        done = subprocess.run([str(SLURM_UP)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no one-node Slurm: tools/slurm-up: {exc}")
    if done.returncode != 0:
        pytest.skip(f"no one-node Slurm: {done.stderr.strip().splitlines()[-1:]}")


def jobs_named(prefix: str = "wfd-") -> list[tuple[str, str, str]]:
    """(job id, state, name) of every job the controller knows whose name starts so."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%j"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [tuple(line.strip().split("|", 2)) for line in out.splitlines() if "|" in line]
    return [row for row in rows if row[2].startswith(prefix)]  # type: ignore[misc]


def active_jobs(names: set[str]) -> list[tuple[str, str, str]]:
    """Jobs of these names still pending, running or completing."""
    return [row for row in jobs_named() if row[2] in names
            and row[1] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")]


def job_names(events: list[dict]) -> set[str]:
    """The job names a run's log gave its Slurm attempts."""
    return {f"wfd-{e['token']}" for e in events if e["type"] == "AttemptSubmitting"}
