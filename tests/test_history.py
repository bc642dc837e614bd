"""Run lists: the pure filters (`wfd.history`), durations (`wfd.durations`), and
`wfctl status` with filters, order, limit and summary over a few hundred runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from bigruns import finished_run
from helpers import Daemon, write_workflow

from wfctl.render import counts_line
from wfd.durations import parse_since
from wfd.events import format_ts
from wfd.history import select
from wfd.state import RunSummary


def summary(i: int, state: str, name: str) -> RunSummary:
    ts = f"2026-11-25T10:{i:02d}:00.000000Z"
    return RunSummary(f"20261125T10{i:02d}00Z-0000{i:04x}", name, "root", state, ts, ts)


RUNS = [summary(i, state, name) for i, (state, name) in enumerate(
    [("SUCCEEDED", "a"), ("FAILED", "b"), ("SUCCEEDED", "a"), ("RUNNING", "a"),
     ("CANCELLED", "b"), ("SUCCEEDED", "b")])]


def test_select_filters_counts_and_keeps_the_newest() -> None:
    everything = select(RUNS)
    assert everything.runs == RUNS and everything.matched == 6
    assert everything.counts == {"SUCCEEDED": 3, "FAILED": 1, "RUNNING": 1, "CANCELLED": 1}
    newest = select(RUNS, limit=2)
    assert newest.runs == RUNS[4:] and newest.matched == 6  # still oldest first
    assert select(RUNS, states={"FAILED", "CANCELLED"}).runs == [RUNS[1], RUNS[4]]
    only_a = select(RUNS, name="a", limit=1)
    assert only_a.runs == [RUNS[3]] and only_a.matched == 3
    assert only_a.counts == {"SUCCEEDED": 2, "RUNNING": 1}
    assert select(RUNS, since="2026-11-25T10:04:00.000000Z").runs == RUNS[4:]
    assert select(RUNS, states={"SUCCEEDED"}, name="b").runs == [RUNS[5]]
    assert select(RUNS, name="zzz") == ([], 0, {})


def test_counts_line() -> None:
    assert counts_line(42, {"RUNNING": 1, "SUCCEEDED": 39, "FAILED": 2}) == \
        "42 runs: 39 SUCCEEDED, 2 FAILED, 1 RUNNING"
    assert counts_line(1, {"FAILED": 1}) == "1 run: 1 FAILED"


def test_since() -> None:
    now = 1_800_000_000.0
    assert parse_since("2h", now) == now - 7200
    assert parse_since("2026-11-25T10:00:00Z", now) == 1795600800.0
    local = datetime(2026, 11, 25, 14, 0).timestamp()
    assert parse_since("2026-11-25T14:00", now) == local
    assert parse_since("2026-11-25 14:00", now) == local
    with pytest.raises(ValueError, match="expected a duration .* or a time"):
        parse_since("yesterday", now)
    assert parse_since("90", now) == now - 90  # a bare number is seconds


# ---- through the real binaries ---------------------------------------------------------

STATES = ["SUCCEEDED"] * 7 + ["FAILED", "CANCELLED"]


@pytest.mark.timeout(180)
def test_status_lists_filters_and_summarises(daemon: Callable[..., Daemon],
                                             wfd_tmp: Path) -> None:
    d = daemon(start=False)
    now = time.time()
    made = []  # (run_id, name, state, created) oldest first: one every minute until 2h ago
    for i in range(300):
        created = now - 2 * 3600 - (300 - i) * 60
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created)) + f"-{i:08x}"
        name, state = ("etl", "backup")[i % 2], STATES[i % len(STATES)]
        finished_run(d.state_dir, run_id, state, name, format_ts(created))
        made.append((run_id, name, state))
    d.start()
    sleeper = write_workflow(wfd_tmp, {"name": "etl", "steps": [
        {"id": "s", "command": "sleep 60"}]})
    running = d.submit(sleeper)  # the newest, created now
    made.append((running, "etl", "RUNNING"))

    table = d.wfctl("status")
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["RUN_ID", "NAME", "STATE", "OWNER", "CREATED", "DURATION"]
    assert [row.split()[0] for row in rows[1:]] == [m[0] for m in made[-20:]]  # newest last
    counts = {s: sum(m[2] == s for m in made) for s in ("SUCCEEDED", "FAILED", "CANCELLED")}
    assert table.stderr.splitlines() == [
        "281 older runs not shown (--all)",
        f"301 runs: {counts['SUCCEEDED']} SUCCEEDED, {counts['CANCELLED']} CANCELLED, "
        f"{counts['FAILED']} FAILED, 1 RUNNING"]

    every = d.wfctl("status", "--all")
    assert [row.split()[0] for row in every.stdout.splitlines()[1:]] == [m[0] for m in made]
    assert "not shown" not in every.stderr

    failed = d.wfctl("status", "--state", "failed", "--state", "RUNNING", "--name", "etl")
    want = [m[0] for m in made if m[1] == "etl" and m[2] in ("FAILED", "RUNNING")]
    assert [row.split()[0] for row in failed.stdout.splitlines()[1:]] == want[-20:]
    assert failed.stderr.splitlines()[-1] == \
        f"{len(want)} runs: {len(want) - 1} FAILED, 1 RUNNING"

    recent = d.wfctl("status", "--since", "2h30m", "--json")  # the last 29 finished + 1
    listed = json.loads(recent.stdout)
    assert [r["run_id"] for r in listed] == [m[0] for m in made[-30:]]

    limited = json.loads(d.wfctl("status", "--json", "--limit", "5").stdout)
    assert [r["run_id"] for r in limited] == [m[0] for m in made[-5:]]
    assert len(json.loads(d.wfctl("status", "--json").stdout)) == 301  # JSON: every run

    since_time = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 3600))
    only_now = d.wfctl("status", "--since", since_time)
    assert [row.split()[0] for row in only_now.stdout.splitlines()[1:]] == [running]

    nothing = d.wfctl("status", "--name", "nope")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "no runs match\n")
    assert d.wfctl("cancel", running).returncode == 0


@pytest.mark.timeout(60)
def test_status_bad_filters(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    for argv, words in [
        (["--state", "sleepy"], "unknown run state 'SLEEPY'"),
        (["--since", "yesterday"], "expected a duration (2h, 7d) or a time"),
        (["--limit", "0"], "expected a count"),
        (["--all", "--limit", "3"], "do not go together"),
        (["@last", "--state", "FAILED"], "do not go with a RUN"),
    ]:
        done = d.wfctl("status", *argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert words in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
