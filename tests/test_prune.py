"""Retention (issue 14): which runs a prune chooses (`wfd.retention`, pure), and
`wfctl prune` through the real binaries: --dry-run, filters, never an unfinished run,
and a kill -9 in the middle of a prune (every run whole or gone, the daemon starts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from bigruns import finished_run
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

from wfd.errors import UsageError
from wfd.events import format_ts
from wfd.retention import check_states, choose, policy
from wfd.state import RunSummary

NOW = 1_800_000_000.0


def summary(i: int, state: str, name: str = "a", age_days: float = 0) -> RunSummary:
    ts = format_ts(NOW - age_days * 86400)
    return RunSummary(f"2027-{i:04d}", name, "root", state, ts, ts)


RUNS = [summary(0, "SUCCEEDED", "a", 10), summary(1, "FAILED", "b", 9),
        summary(2, "CORRUPT", "a", 8), summary(3, "CANCELLED", "a", 3),
        summary(4, "SUCCEEDED", "b", 2), summary(5, "RUNNING", "a", 1),
        summary(6, "SUCCEEDED", "a", 0.5)]


def ids(*indexes: int) -> list[str]:
    return [f"2027-{i:04d}" for i in indexes]


def test_choose_never_an_unfinished_run() -> None:
    assert choose(RUNS, NOW, keep=0) == ids(0, 1, 3, 4, 6)  # no RUNNING, no CORRUPT
    assert choose(RUNS, NOW, keep=2) == ids(0, 1, 3)
    assert choose(RUNS, NOW, older_than=5 * 86400) == ids(0, 1)
    assert choose(RUNS, NOW, keep=1, name="a") == ids(0, 3)
    assert choose(RUNS, NOW, states={"CORRUPT"}) == ids(2)  # only when asked for
    assert choose(RUNS, NOW, states={"SUCCEEDED"}, keep=1, older_than=86400) == ids(0, 4)
    assert choose(RUNS, NOW, states={"SUCCEEDED"}, keep=1, older_than=3 * 86400) == ids(0)
    assert choose(RUNS, NOW, keep=99) == []


def test_check_states() -> None:
    check_states(["FAILED", "CORRUPT"])
    with pytest.raises(UsageError, match="finished runs only, never RUNNING"):
        check_states(["RUNNING"])
    with pytest.raises(UsageError, match="unknown run state 'DONE'"):
        check_states(["DONE"])


def test_policy_is_per_user() -> None:
    runs = [(summary(i, "SUCCEEDED", age_days=10 - i), 1000 + i % 2) for i in range(8)]
    assert policy(runs, NOW, keep_runs=2, keep_days=None) == ids(0, 1, 2, 3)
    assert policy(runs, NOW, keep_runs=None, keep_days=5.5) == ids(0, 1, 2, 3, 4)
    assert policy(runs, NOW, keep_runs=1, keep_days=5.5) == ids(0, 1, 2, 3, 4)
    assert policy(runs, NOW, keep_runs=3, keep_days=7.5) == ids(0, 1)  # 2: among 3 kept
    assert policy(runs, NOW, None, None) == []


# ---- through the real binaries ---------------------------------------------------------


def write_runs(d: Daemon, count: int, days_apart: float = 1.0) -> list[str]:
    """`count` finished runs (every third FAILED), the oldest `count` days ago."""
    made = []
    now = time.time()
    for i in range(count):
        created = now - (count - i) * days_apart * 86400
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created)) + f"-{i:08x}"
        state = "FAILED" if i % 3 == 2 else "SUCCEEDED"
        finished_run(d.state_dir, run_id, state, ("etl", "backup")[i % 2], format_ts(created))
        made.append(run_id)
    return made


def listed(d: Daemon) -> list[str]:
    return [run["run_id"] for run in run_json(d)]


@pytest.mark.timeout(120)
def test_prune_dry_run_filters_and_unfinished(daemon: Callable[..., Daemon],
                                              wfd_tmp: Path) -> None:
    d = daemon(start=False)
    made = write_runs(d, 12)
    d.start()
    sleeper = write_workflow(wfd_tmp, {"name": "etl", "steps": [
        {"id": "s", "command": "sleep 60", "kill_grace": 1}]})
    running = d.submit(sleeper)
    wait_for_state(d, running, "RUNNING")

    dry = d.wfctl("prune", "--older-than", "9d12h", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == made[:3]  # 12, 11, 10 days old
    assert dry.stderr == "would remove 3 runs (--dry-run)\n"
    assert listed(d) == [*made, running]  # nothing removed
    assert all((d.state_dir / "runs" / run_id).is_dir() for run_id in made)

    done = d.wfctl("prune", "--older-than", "9d12h")
    assert (done.returncode, done.stdout.splitlines()) == (0, made[:3])
    assert done.stderr == "removed 3 runs\n"
    assert listed(d) == [*made[3:], running]
    assert not any((d.state_dir / "runs" / run_id).exists() for run_id in made[:3])

    failed = d.wfctl("prune", "--state", "failed", "--name", "backup", "--json")
    want = [r for i, r in enumerate(made) if i >= 3 and i % 3 == 2 and i % 2 == 1]
    assert json.loads(failed.stdout) == {"run_ids": want, "dry_run": False}

    everything = d.wfctl("prune", "--keep", "2")  # the running run is never chosen
    assert everything.returncode == 0, everything.stderr
    assert listed(d) == [*[r for r in made[3:] if r not in want][-2:], running]
    assert run_json(d, running)["state"] == "RUNNING"

    for argv, words in [(["--state", "RUNNING"], "finished runs only, never RUNNING"),
                        ([], "say which runs to prune"),
                        (["--older-than", "soon"], "expected a duration"),
                        (["--keep", "-1"], "expected a count")]:
        bad = d.wfctl("prune", *argv)
        assert bad.returncode == 2 and words in bad.stderr, (argv, bad.stderr)
    # a pruned run is unknown everywhere; a short reference no longer finds it
    gone = d.wfctl("status", made[0])
    assert gone.returncode == 2 and "no such run" in gone.stderr
    assert d.wfctl("cancel", running).returncode == 0


def whole_or_gone(d: Daemon, made: list[str]) -> set[str]:
    """Every run dir is whole (as written) or gone; the ids still there."""
    runs = d.state_dir / "runs"
    left = set()
    for run_id in made:
        path = runs / run_id
        if path.exists():
            assert sorted(p.name for p in path.iterdir()) == ["events.jsonl", "logs",
                                                              "workflow.json"], run_id
            assert (path / "events.jsonl").read_bytes().endswith(b'"state":"SUCCEEDED"}\n') \
                or b"FAILED" in (path / "events.jsonl").read_bytes()
            left.add(run_id)
    return left


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["prune-renamed=kill@20", "prune-delete=kill@7"])
def test_kill_9_in_the_middle_of_a_prune(daemon: Callable[..., Daemon], fault: str) -> None:
    d = daemon(start=False, env={"WFD_FAULTS": fault})
    made = write_runs(d, 40, days_apart=0.01)
    d.start()
    done = d.wfctl("prune", "--keep", "5")
    assert done.returncode != 0  # the daemon died under it
    d.proc.wait(30)
    left = whole_or_gone(d, made)
    assert set(made[-5:]) <= left  # the kept ones are untouched
    tombstones = [p.name for p in (d.state_dir / "runs").iterdir() if p.name.startswith(".")]
    assert tombstones  # the crash left some mid-way

    d.env.pop("WFD_FAULTS")
    d.start()  # starts, and finishes the deletion
    assert not [p for p in (d.state_dir / "runs").iterdir() if p.name.startswith(".")]
    assert sorted(listed(d)) == sorted(left)
    assert all(run["state"] in ("SUCCEEDED", "FAILED") for run in run_json(d))
    for run_id in left:  # none is damaged
        assert d.wfctl("replay", run_id).returncode == 0
    again = d.wfctl("prune", "--keep", "5")
    assert again.returncode == 0 and listed(d) == made[-5:]


@pytest.mark.timeout(60)
def test_a_half_deleted_tombstone_does_not_stop_the_start(daemon: Callable[..., Daemon]) -> None:
    d = daemon(start=False)
    made = write_runs(d, 3)
    runs = d.state_dir / "runs"
    (runs / made[0]).rename(runs / f".pruned-{made[0]}")
    (runs / f".pruned-{made[0]}" / "events.jsonl").unlink()
    d.start()
    assert listed(d) == made[1:]
    assert sorted(p.name for p in runs.iterdir()) == made[1:]


# ---- the daemon's own policy and the log cap --------------------------------------------


@pytest.mark.timeout(120)
def test_keep_runs_and_keep_days_at_start(daemon: Callable[..., Daemon]) -> None:
    d = daemon(start=False, extra=["--keep-runs", "3", "--keep-days", "5.5"])
    made = write_runs(d, 8)  # 8, 7, ..., 1 days old
    d.start()
    wait_until(lambda: len(listed(d)) < 8, timeout=30, message="the policy to prune")
    assert listed(d) == made[3:]  # beyond the newest 3 and older than 5.5 days: 8, 7, 6
    assert "pruned 3 run(s)" in d.log_text()


def test_wfd_refuses_bad_retention_options(wfd_tmp: Path) -> None:
    import subprocess
    import sys

    for argv, words in [(["--keep-runs", "-1"], "--keep-runs must be 0 or more"),
                        (["--keep-days", "0"], "--keep-days must be"),
                        (["--max-log-size", "lots"], "expected a size")]:
        done = subprocess.run([sys.executable, "-m", "wfd", "--state-dir", str(wfd_tmp / "s"),
                               *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and words in done.stderr, (argv, done.stderr)


WRITER = ("import sys, time\n"
          "line = b'x' * 1023 + b'\\n'\n"
          "for _ in range(4096): sys.stdout.buffer.write(line)\n"  # 4 MiB
          "sys.stdout.buffer.flush()\n"
          "time.sleep({sleep})\n"
          "sys.stdout.buffer.write(b'late line\\n' * 1000)\n")


@pytest.mark.timeout(120)
def test_a_log_past_max_log_size_is_cut_with_a_marker(daemon: Callable[..., Daemon],
                                                      wfd_tmp: Path) -> None:
    from wfd.logcap import marker

    cap = 64 * 1024
    d = daemon(extra=["--max-log-size", "64K"])
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "loud", "command": ["python3", "-c", WRITER.format(sleep=6)]},
        {"id": "quiet", "command": "echo fine"}]})
    run_id = d.submit(wf)
    log_file = d.state_dir / "runs" / run_id / "logs" / "loud.1.log"
    # cut while the step runs (it sleeps after its 4 MiB)
    wait_until(lambda: log_file.exists() and log_file.stat().st_size == cap + len(marker(cap)),
               timeout=20, message="the running step's log to be cut")
    assert run_json(d, run_id)["steps"]["loud"]["state"] == "RUNNING"
    wait_for_state(d, run_id, "SUCCEEDED", timeout=60)
    data = log_file.read_bytes()
    assert data == b"x" * 1023 + b"\n" + data[1024:cap] + marker(cap)
    assert len(data) == cap + len(marker(cap))  # the late lines were cut as well
    shown = d.wfctl("logs", run_id, "loud", text=False)
    assert shown.stdout.endswith(b"the rest of the output was dropped]\n")
    assert d.wfctl("logs", run_id, "quiet").stdout == "fine\n"
    assert "log passed 65536 bytes (--max-log-size); cut there" in d.log_text()
