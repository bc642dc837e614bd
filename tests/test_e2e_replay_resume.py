"""`wfctl replay` and `wfctl resume` through the real daemon (SPEC 3 log checks,
SPEC 5 `replay`, `resume`, `resume-all`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

from wfd.events import parse_ts

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def replay(d: Daemon, run_id: str) -> dict:
    done = d.wfctl("replay", run_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def events_file(d: Daemon, run_id: str) -> Path:
    return d.state_dir / "runs" / run_id / "events.jsonl"


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ---- replay -----------------------------------------------------------------------------


def test_replay_is_deterministic_and_equals_status(daemon: Callable[..., Daemon],
                                                   wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "echo a"},
        {"id": "flaky", "command": '[ "$WFD_ATTEMPT" = 2 ]', "retries": 2,
         "backoff": {"initial": 0.05}, "depends_on": ["a"]},
        {"id": "bad", "command": "exit 2", "depends_on": ["a"]},
        {"id": "skip", "command": "true", "depends_on": ["bad"]},
    ]})
    d = daemon()
    run_id = d.wfctl("run", str(wf), "--wait").stdout.strip()
    first = d.wfctl("replay", run_id, "--json")
    second = d.wfctl("replay", run_id, "--json")
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stderr == ""
    doc = json.loads(first.stdout)
    assert list(doc) == ["events", "state"]
    assert doc["state"] == run_json(d, run_id)
    assert doc["state"]["state"] == "FAILED"

    events = doc["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "RunCreated" and events[0]["run_id"] == run_id
    assert events[-1] == {**events[-1], "type": "RunFinished", "state": "FAILED"}
    for e in events:
        assert TS_RE.fullmatch(e["ts"]), e
    stamps = [parse_ts(e["ts"]) for e in events]
    assert stamps == sorted(stamps)
    # the events are the log's own lines
    assert [json.loads(line) for line in lines_of(events_file(d, run_id))] == events
    # each attempt: claimed, then started with pid and boot id, then an outcome
    claims = [e for e in events if e["type"] == "AttemptClaimed"]
    starts = [e for e in events if e["type"] == "AttemptStarted"]
    assert [(e["step"], e["attempt"]) for e in claims] == [(e["step"], e["attempt"])
                                                           for e in starts]
    for claim, start in zip(claims, starts, strict=True):
        assert claim["seq"] < start["seq"] and start["pid"] > 0 and start["boot_id"]

    text = d.wfctl("replay", run_id)
    assert text.returncode == 0
    assert text.stdout == d.wfctl("replay", run_id).stdout
    assert "flaky: RETRY_WAIT" in text.stdout and "run: FAILED" in text.stdout
    assert "STEP" in text.stdout


def test_first_event_carries_the_log_format(daemon: Callable[..., Daemon],
                                            wfd_tmp: Path) -> None:
    # SPEC 3: "each run's first event carries a log format version" (docs/events.md: now 1)
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}))
    first = json.loads(lines_of(events_file(d, run_id))[0])
    assert first["type"] == "RunCreated" and first["seq"] == 1
    assert first.get("format") == 1, first


def test_replay_of_a_running_run_equals_status(daemon: Callable[..., Daemon],
                                               wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "sleep 30",
                                             "kill_grace": 0.1}]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: run_json(d, run_id)["steps"]["a"]["state"] == "RUNNING", 15)
    wait_until(lambda: any(e["type"] == "AttemptStarted" for e in replay(d, run_id)["events"]))
    assert replay(d, run_id)["state"] == run_json(d, run_id)
    assert d.wfctl("cancel", run_id).returncode == 0


def damage_and_restart(d: Daemon, run_id: str, edit: Callable[[list[str]], list[str]]) -> None:
    d.stop()
    path = events_file(d, run_id)
    path.write_text("".join(line + "\n" for line in edit(lines_of(path))))
    d.start()


def two_step_run(d: Daemon, wfd_tmp: Path, name: str) -> str:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "true"}, {"id": "b", "command": "true", "depends_on": ["a"]},
    ]}, f"{name}.json")
    return d.submit(wf, "--wait")


def test_replay_finds_a_seq_gap(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = two_step_run(d, wfd_tmp, "damaged")
    healthy = two_step_run(d, wfd_tmp, "healthy")
    n = len(lines_of(events_file(d, run_id)))
    damage_and_restart(d, run_id, lambda lines: lines[:4] + lines[5:])  # drop seq 5

    done = d.wfctl("replay", run_id)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert "seq" in done.stderr and "5" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    as_json = d.wfctl("replay", run_id, "--json")
    assert as_json.returncode == 5
    doc = json.loads(as_json.stdout)
    assert doc["state"]["state"] == "CORRUPT" and doc["state"]["error"]
    assert len(doc["events"]) < n

    status = run_json(d, run_id)
    assert status["state"] == "CORRUPT"
    assert "seq" in status["error"]
    table = d.wfctl("status", run_id)
    assert table.returncode == 0 and "CORRUPT" in table.stdout and status["error"] in table.stdout
    # other runs go on, and the daemon takes new ones
    assert d.wfctl("replay", healthy).returncode == 0
    assert run_json(d, healthy)["state"] == "SUCCEEDED"
    two_step_run(d, wfd_tmp, "after")
    # a CORRUPT run cannot be resumed
    refused = d.wfctl("resume", run_id)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert "CORRUPT" in d.log_text()


def test_replay_finds_an_illegal_transition(daemon: Callable[..., Daemon],
                                            wfd_tmp: Path) -> None:
    d = daemon()
    run_id = two_step_run(d, wfd_tmp, "wf")

    def illegal(lines: list[str]) -> list[str]:
        # a's AttemptSucceeded becomes a RetryDue: RUNNING + RetryDue is not in the table
        i = next(i for i, line in enumerate(lines)
                 if json.loads(line)["type"] == "AttemptSucceeded")
        old = json.loads(lines[i])
        new = {"type": "RetryDue", "seq": old["seq"], "ts": old["ts"], "step": old["step"]}
        return lines[:i] + [json.dumps(new)] + lines[i + 1:]

    damage_and_restart(d, run_id, illegal)
    done = d.wfctl("replay", run_id)
    assert done.returncode == 5, (done.stdout, done.stderr)
    assert "RetryDue" in done.stderr and "RUNNING" in done.stderr and "a" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert run_json(d, run_id)["state"] == "CORRUPT"


def test_replay_finds_a_damaged_line(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = two_step_run(d, wfd_tmp, "wf")
    damage_and_restart(d, run_id, lambda lines: lines[:3] + ['{"seq": 4, "ty'] + lines[4:])
    done = d.wfctl("replay", run_id)
    assert done.returncode == 5
    assert "line 4" in done.stderr, done.stderr
    assert run_json(d, run_id)["state"] == "CORRUPT"


def test_replay_notes_a_torn_tail(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = two_step_run(d, wfd_tmp, "wf")
    before = replay(d, run_id)
    path = events_file(d, run_id)
    with path.open("a") as f:
        f.write('{"seq": 99, "ts": "2026-')
    done = d.wfctl("replay", run_id, "--json")
    assert done.returncode == 0, done.stderr
    assert "torn" in done.stderr and len(done.stderr.splitlines()) == 1
    assert json.loads(done.stdout) == before
    # a last line without its newline is torn even if it parses
    d.stop()
    text = path.read_text()
    good = text[:text.rindex("\n") + 1]  # without the torn part written above
    path.write_text(good + '{"seq": 1, "ts": "2026-11-25T09:58:52.123456Z", "type": "X"}')
    d.start()
    # recovery cut the tail off the file
    assert path.read_text() == good
    assert d.wfctl("replay", run_id).returncode == 0
    assert run_json(d, run_id)["state"] == "SUCCEEDED"


# ---- resume -----------------------------------------------------------------------------


def test_resume_a_failed_run(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    flag, counter = wfd_tmp / "flag", wfd_tmp / "counter"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": f"echo a >> {counter}"},
        {"id": "b", "command": f'echo "b try $WFD_ATTEMPT"; test -e {flag}',
         "depends_on": ["a"], "retries": 1, "backoff": {"initial": 0.05}},
        {"id": "c", "command": f"echo c >> {counter}", "depends_on": ["b"]},
        {"id": "side", "command": f"echo side >> {counter}"},
    ]})
    d = daemon()
    failed = d.wfctl("run", str(wf), "--wait")
    assert failed.returncode == 1
    run_id = failed.stdout.strip()
    status = run_json(d, run_id)
    assert status["steps"]["b"] == {**status["steps"]["b"], "state": "FAILED", "attempts": 2}
    assert status["steps"]["c"]["state"] == "SKIPPED"

    flag.touch()
    done = d.wfctl("resume", run_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and run_id in done.stderr
    # it returned once the run was durably RUNNING again
    assert any(json.loads(line)["type"] == "RunResumed"
               for line in lines_of(events_file(d, run_id)))
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED" and final["error"] is None
    b = final["steps"]["b"]
    assert b["state"] == "SUCCEEDED" and b["attempts"] == 3 and b["exit_code"] == 0
    # SUCCEEDED steps were not rerun; c ran once, after the resume
    assert sorted(counter.read_text().split()) == ["a", "c", "side"]
    assert final["steps"]["a"] == status["steps"]["a"]
    # attempt numbers go on, old logs are kept
    logs = d.state_dir / "runs" / run_id / "logs"
    assert {p.name for p in logs.glob("b.*.log")} == {"b.1.log", "b.2.log", "b.3.log"}
    for n in (1, 2, 3):
        assert d.wfctl("logs", run_id, "b", "--attempt", str(n)).stdout == f"b try {n}\n"

    events = replay(d, run_id)["events"]
    types = [e["type"] for e in events]
    assert types.count("RunResumed") == 1 and types.count("RunFinished") == 2
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    # a SUCCEEDED run is refused
    again = d.wfctl("resume", run_id)
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1
    assert "SUCCEEDED" in again.stderr


def test_resume_a_cancelled_run_with_a_fresh_retry_budget(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    flag = wfd_tmp / "flag"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "slow", "command": f"test -e {flag} || sleep 30", "kill_grace": 0.1},
        {"id": "retry", "command": f'test -e {flag}', "retries": 1,
         "backoff": {"initial": 0.05}},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: run_json(d, run_id)["steps"]["retry"]["state"] == "FAILED", 15)
    assert d.wfctl("cancel", run_id).returncode == 0
    status = run_json(d, run_id)
    assert status["state"] == "CANCELLED"
    assert status["steps"]["slow"]["state"] == "CANCELLED"
    flag.touch()
    assert d.wfctl("resume", run_id).returncode == 0
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED"
    assert final["steps"]["slow"]["attempts"] == 2
    assert final["steps"]["retry"]["attempts"] == 3


def test_resume_of_a_running_run_is_refused(daemon: Callable[..., Daemon],
                                            wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "sleep 30",
                                             "kill_grace": 0.1}]})
    d = daemon()
    run_id = d.submit(wf)
    done = d.wfctl("resume", run_id)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "running" in done.stderr
    everything = d.wfctl("resume-all")
    assert everything.returncode == 0 and "no runs to resume" in everything.stderr
    assert [e["type"] for e in replay(d, run_id)["events"]].count("AttemptClaimed") == 1
    assert d.wfctl("cancel", run_id).returncode == 0


def test_no_resume_then_resume_and_resume_all(daemon: Callable[..., Daemon],
                                              wfd_tmp: Path) -> None:
    counter = wfd_tmp / "counter"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "first", "command": f"echo first >> {counter}"},
        {"id": "long", "command": f'echo "long $WFD_ATTEMPT" >> {counter}; '
                                  f'[ "$WFD_ATTEMPT" -ge 2 ] || sleep 30',
         "depends_on": ["first"], "kill_grace": 0.2},
    ]})
    d = daemon()
    run_ids = [d.submit(wf) for _ in range(3)]
    for run_id in run_ids:
        wait_until(lambda r=run_id: run_json(d, r)["steps"]["long"]["state"] == "RUNNING", 15)
    wait_until(lambda: counter.read_text().count("long 1") == 3, 15)
    # Stopping wfd leaves steps running (issue 12): stop them, so they are READY again.
    assert d.wfctl("shutdown", "--stop-steps").returncode == 0
    assert d.proc.wait(30) == 0
    d.extra.append("--no-resume")
    d.start()
    for run_id in run_ids:
        status = run_json(d, run_id)
        assert status["state"] == "RUNNING" and status["steps"]["long"]["state"] == "READY"
    assert "long 2" not in counter.read_text()  # nothing was picked up

    done = d.wfctl("resume", run_ids[0])
    assert done.returncode == 0, done.stderr
    assert wait_for_state(d, run_ids[0], *ENDED)["state"] == "SUCCEEDED"
    assert run_json(d, run_ids[1])["steps"]["long"]["state"] == "READY"

    everything = d.wfctl("resume-all")
    assert everything.returncode == 0, everything.stderr
    for run_id in run_ids[1:]:
        assert run_id in everything.stderr
        final = wait_for_state(d, run_id, *ENDED)
        assert final["state"] == "SUCCEEDED"
        assert final["steps"]["long"]["attempts"] == 2  # the interrupted one cost no retry
    text = counter.read_text().split("\n")
    assert text.count("first") == 3 and text.count("long 1") == 3 and text.count("long 2") == 3
    assert "no runs to resume" in d.wfctl("resume-all").stderr
