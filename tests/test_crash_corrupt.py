"""A damaged log marks its run CORRUPT, and only that run (issue 4, test 5).

Several unfinished runs are interrupted (daemon SIGTERM); then one line in the
middle of some of their logs is damaged, each in another way, and one run's
`workflow.json`. The restarted daemon must report each damaged run CORRUPT
with an error that names the line (`status`, and `replay`, which exits 5),
leave it alone (its log untouched, none of its steps rerun, resume refused),
and drive every other run to the end, old and new.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

DAMAGED_LINE = 5  # AttemptSucceeded of step a: in the middle (the log has 9 lines)

# How to damage line DAMAGED_LINE (1-based) of a log; the error must name that line.
DAMAGES = {
    "garbage": lambda lines, k: lines[:k - 1] + [b'{"seq": 5, "type": "AttemptSu\xff\n']
    + lines[k:],
    "not-an-event": lambda lines, k: lines[:k - 1] + [
        b'{"seq":5,"ts":"2026-01-01T00:00:00.000000Z","type":"NoSuchEvent"}\n'] + lines[k:],
    "blank-line": lambda lines, k: lines[:k - 1] + [b"\n"] + lines[k - 1:],
    "joined-lines": lambda lines, k: lines[:k - 1] + [lines[k - 1].rstrip(b"\n") + lines[k]]
    + lines[k + 1:],
    "seq-gap": lambda lines, k: lines[:k - 1] + lines[k:],
    "illegal-transition": lambda lines, k: lines[:k - 1] + [
        lines[k - 1].replace(b'"step":"a"', b'"step":"c"')] + lines[k:],
}


def gated_workflow(root: Path) -> Path:
    gate, stamps = root / "gate", root / "stamps.txt"
    stamp = f'echo "$WFD_RUN_ID $WFD_STEP_ID $WFD_ATTEMPT" >> {stamps}'
    return write_workflow(root, {"name": "gated", "steps": [
        {"id": "a", "command": stamp},
        {"id": "b", "command": f"{stamp}; while [ ! -e {gate} ]; do sleep 0.05; done",
         "depends_on": ["a"], "kill_grace": 1},
        {"id": "c", "command": stamp, "depends_on": ["b"]},
    ]})


def stamped(root: Path, run_id: str) -> list[str]:
    path = root / "stamps.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if line.split()[0] == run_id]


def events_path(d: Daemon, run_id: str) -> Path:
    return d.state_dir / "runs" / run_id / "events.jsonl"


def test_damaged_runs_are_corrupt_and_the_others_go_on(daemon, wfd_tmp: Path) -> None:
    wf = gated_workflow(wfd_tmp)
    d = daemon(max_parallel=16)
    names = [*DAMAGES, "workflow.json", "healthy"]
    runs = {name: d.submit(wf) for name in names}
    wait_until(lambda: all(len(stamped(wfd_tmp, r)) == 2 for r in runs.values()),
               timeout=20, message="every run's step b to run")
    assert d.stop() == 0  # every run is left RUNNING, its step b interrupted

    before = {}
    for name, run_id in runs.items():
        path = events_path(d, run_id)
        lines = path.read_bytes().splitlines(keepends=True)
        assert len(lines) == 9 and b'"AttemptInterrupted"' in lines[-1], lines
        assert b'"AttemptSucceeded"' in lines[DAMAGED_LINE - 1]
        if name in DAMAGES:
            path.write_bytes(b"".join(DAMAGES[name](lines, DAMAGED_LINE)))
        elif name == "workflow.json":
            sub = path.parent / "workflow.json"
            sub.write_bytes(sub.read_bytes()[:-20])
        before[name] = (path.read_bytes(), len(stamped(wfd_tmp, run_id)))

    d.start()
    healthy = runs["healthy"]
    wait_until(lambda: len(stamped(wfd_tmp, healthy)) == 3, timeout=15,
               message="the healthy run to rerun step b")
    (wfd_tmp / "gate").touch()
    assert wait_for_state(d, healthy, "SUCCEEDED", "FAILED", timeout=15)["state"] == "SUCCEEDED"
    fresh = d.submit(wf, "--wait")  # a new run in the same daemon completes too
    assert run_json(d, fresh)["state"] == "SUCCEEDED"

    # Every damaged run is CORRUPT, and left alone: log untouched, nothing rerun, no resume.
    listed = {r["run_id"]: r["state"] for r in run_json(d)}
    for name in [*DAMAGES, "workflow.json"]:
        run_id = runs[name]
        status = run_json(d, run_id)
        assert status["state"] == listed[run_id] == "CORRUPT", (name, status)
        resumed = d.wfctl("resume", run_id)
        assert resumed.returncode == 2, (name, resumed.returncode, resumed.stderr)
        assert events_path(d, run_id).read_bytes() == before[name][0], f"{name}: log touched"
        assert len(stamped(wfd_tmp, run_id)) == before[name][1], f"{name}: a step reran"

    # Each says what is wrong, and where: status and replay (exit 5) name the line.
    problems = []
    for name in DAMAGES:
        run_id = runs[name]
        status = run_json(d, run_id)
        if f"line {DAMAGED_LINE}" not in (status["error"] or ""):
            problems.append(f"{name}: status error does not name line {DAMAGED_LINE}: "
                            f"{status['error']!r}")
        replay = d.wfctl("replay", run_id)
        if replay.returncode != 5 or f"line {DAMAGED_LINE}" not in replay.stderr:
            problems.append(f"{name}: replay exited {replay.returncode}, stderr "
                            f"{replay.stderr.strip()!r}")
    status = run_json(d, runs["workflow.json"])
    if "workflow.json" not in (status["error"] or ""):
        problems.append(f"workflow.json: status error {status['error']!r}")
    replay = d.wfctl("replay", runs["workflow.json"])
    if replay.returncode != 5 or "workflow.json" not in replay.stderr:
        problems.append(f"workflow.json: replay exited {replay.returncode}, stderr "
                        f"{replay.stderr.strip()!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("damage", ["truncated", "not-json", "missing"])
def test_damaged_workflow_json_of_a_finished_run(daemon, wfd_tmp: Path, damage: str) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    d.stop()
    sub = d.state_dir / "runs" / run_id / "workflow.json"
    if damage == "truncated":
        sub.write_bytes(sub.read_bytes()[: len(sub.read_bytes()) // 2])
    elif damage == "not-json":
        sub.write_text(json.dumps({"format": 1, "workflow": "{not json"}))
    else:
        sub.unlink()
    d.start()
    status = run_json(d, run_id)
    assert status["state"] == "CORRUPT" and "workflow.json" in status["error"], status
    other = d.submit(wf, "--wait")
    assert run_json(d, other)["state"] == "SUCCEEDED"


def test_a_finished_run_damaged_in_the_middle_shows_corrupt_in_the_list(
    daemon, wfd_tmp: Path
) -> None:
    """Finished runs are folded in the background after the start: a damaged one is
    listed CORRUPT soon, without anyone asking for that run by id."""
    wf = write_workflow(wfd_tmp, {"name": "done", "steps": [
        {"id": "a", "command": "true"}, {"id": "b", "command": "true", "depends_on": ["a"]},
    ]})
    d = daemon()
    damaged, intact = d.submit(wf, "--wait"), d.submit(wf, "--wait")
    assert d.stop() == 0
    path = events_path(d, damaged)
    lines = path.read_bytes().splitlines(keepends=True)
    assert b'"RunFinished"' in lines[-1]
    path.write_bytes(b"".join(DAMAGES["garbage"](lines, DAMAGED_LINE)))

    d.start()

    def listed() -> dict[str, str]:
        return {r["run_id"]: r["state"] for r in run_json(d)}

    wait_until(lambda: listed()[damaged] == "CORRUPT", timeout=15,
               message="the damaged finished run to be listed CORRUPT")
    assert listed()[intact] == "SUCCEEDED"
    assert f"line {DAMAGED_LINE}" in run_json(d, damaged)["error"]
