"""What `wfctl run` and `wfctl status` print, through the real daemon (SPEC 5)."""

from __future__ import annotations

import json
import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, run_json, wait_until, write_workflow

from wfd.events import parse_ts

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
# SPEC 5's keys in its order, then those added since (issue 14: running time, signal name)
RUN_KEYS = ["run_id", "name", "owner", "state", "created_at", "finished_at", "error", "steps",
            "schedule", "scheduled_at", "vars", "run_seconds", "running_since",
            "waiting_for_resume", "description", "on_exit"]
STEP_KEYS = ["state", "attempts", "exit_code", "started_at", "finished_at", "error",
             "depends_on", "cpu", "max_rss", "containment", "executor", "job_id", "outputs",
             "exit_signal", "pool", "waiting", "description"]
LIST_KEYS = ["run_id", "name", "owner", "state", "created_at", "finished_at", "schedule",
             "scheduled_at", "run_seconds", "running_since", "waiting_for_resume"]

MIXED = {"name": "mixed", "steps": [
    {"id": "ok", "command": "echo fine"},
    {"id": "bad", "command": "exit 4", "depends_on": ["ok"]},
    {"id": "skipped", "command": "true", "depends_on": ["bad"]},
]}


def test_run_prints_only_the_run_id(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "echo to-the-log"}]})
    d = daemon()
    ids = []
    for flags in ([], ["--wait"], ["--follow"], ["--wait", "--follow"]):
        done = d.wfctl("run", str(wf), *flags)
        assert done.returncode == 0, (flags, done.stderr)
        assert RUN_ID_RE.fullmatch(done.stdout.rstrip("\n")), (flags, done.stdout)
        assert done.stdout.count("\n") == 1
        ids.append(done.stdout.strip())
        # the id was returned only once the run's first event was durable
        events = d.state_dir / "runs" / ids[-1] / "events.jsonl"
        assert json.loads(events.read_text().splitlines()[0])["type"] == "RunCreated"
        if not flags:
            assert done.stderr == ""
    assert len(set(ids)) == 4
    assert ids == sorted(ids)  # run ids sort by creation time
    assert d.run_ids() == set(ids)


def test_follow_shows_progress_on_stderr(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    done = d.wfctl("run", str(write_workflow(wfd_tmp, MIXED)), "--follow")
    assert done.returncode == 1, done.stderr
    run_id = done.stdout.strip()
    err = done.stderr
    events = json.loads(d.wfctl("replay", run_id, "--json").stdout)["events"]
    # one progress line per transition, in order
    for needle in ("ok: READY", "ok: RUNNING (attempt 1)", "ok: SUCCEEDED", "bad: RUNNING",
                   "bad: FAILED", "skipped: SKIPPED", "run: FAILED"):
        assert needle in err, (needle, err)
    order = [err.index(n) for n in ("ok: READY", "ok: SUCCEEDED", "bad: FAILED",
                                    "skipped: SKIPPED", "run: FAILED")]
    assert order == sorted(order)
    progress = [line for line in err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert len(progress) == len(events), (progress, events)
    assert "exited with status 4" in err


def test_wait_exit_codes(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    ok = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}, "ok.json")
    bad = write_workflow(wfd_tmp, MIXED, "bad.json")
    done = d.wfctl("run", str(ok), "--wait")
    assert done.returncode == 0 and "SUCCEEDED" in done.stderr
    done = d.wfctl("run", str(bad), "--wait")
    assert done.returncode == 1 and "FAILED" in done.stderr and "bad" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_json_schema(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    wf = write_workflow(wfd_tmp, MIXED, "mixed-file.json")
    run_id = d.wfctl("run", str(wf), "--wait").stdout.strip()
    done = d.wfctl("status", run_id, "--json")
    assert done.returncode == 0 and done.stderr == ""
    status = json.loads(done.stdout)
    assert list(status) == RUN_KEYS
    assert status["run_id"] == run_id and status["name"] == "mixed"
    assert status["owner"] == pwd.getpwuid(os.getuid()).pw_name
    assert status["state"] == "FAILED" and status["error"] is None
    assert TS_RE.fullmatch(status["created_at"]) and TS_RE.fullmatch(status["finished_at"])
    assert list(status["steps"]) == ["ok", "bad", "skipped"]
    for step in status["steps"].values():
        assert list(step) == STEP_KEYS
    ok, bad, skipped = (status["steps"][s] for s in ("ok", "bad", "skipped"))
    assert ok == {**ok, "state": "SUCCEEDED", "attempts": 1, "exit_code": 0, "error": None}
    assert bad == {**bad, "state": "FAILED", "attempts": 1, "exit_code": 4,
                   "error": "exited with status 4"}
    assert skipped == {"state": "SKIPPED", "attempts": 0, "exit_code": None, "started_at": None,
                       "finished_at": skipped["finished_at"],
                       "error": "skipped: upstream step 'bad' failed", "depends_on": ["bad"],
                       "cpu": None, "max_rss": None, "containment": None,
                       "executor": None, "job_id": None, "outputs": {},
                       "exit_signal": None, "pool": None, "waiting": None,
                       "description": ""}  # it never ran
    for step in (ok, bad):
        # what wait4 measured of its attempt (issue 12): CPU seconds and peak RSS in KiB
        assert isinstance(step["cpu"], float) and step["cpu"] >= 0, step
        assert isinstance(step["max_rss"], int) and step["max_rss"] > 0, step
        assert TS_RE.fullmatch(step["started_at"]) and TS_RE.fullmatch(step["finished_at"])
        assert parse_ts(status["created_at"]) <= parse_ts(step["started_at"]) \
            <= parse_ts(step["finished_at"]) <= parse_ts(status["finished_at"])
    assert parse_ts(ok["finished_at"]) <= parse_ts(bad["started_at"])

    # the list form; a name defaults to the file's name without extension
    unnamed = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "sleep 30"}]},
                             "my-file.json")
    running = d.submit(unnamed)
    runs = json.loads(d.wfctl("status", "--json").stdout)
    assert [r["run_id"] for r in runs] == [run_id, running]
    for r in runs:
        assert list(r) == LIST_KEYS
    assert runs[0] == {k: status[k] for k in LIST_KEYS}
    assert runs[1]["name"] == "my-file" and runs[1]["state"] == "RUNNING"
    assert runs[1]["finished_at"] is None and TS_RE.fullmatch(runs[1]["created_at"])
    one = run_json(d, running)
    assert one["finished_at"] is None and one["steps"]["a"]["finished_at"] is None
    wait_until(lambda: run_json(d, running)["steps"]["a"]["state"] == "RUNNING", 15)
    a = run_json(d, running)["steps"]["a"]
    assert a["exit_code"] is None and TS_RE.fullmatch(a["started_at"])
    assert d.wfctl("cancel", running).returncode == 0


def test_status_tables(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    assert d.wfctl("status").returncode == 0
    run_id = d.wfctl("run", str(write_workflow(wfd_tmp, MIXED)), "--wait").stdout.strip()
    done = d.wfctl("status", run_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert run_id in lines[0] and "mixed" in lines[0] and "FAILED" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("STEP"))
    assert lines[header].split() == ["STEP", "STATE", "ATTEMPTS", "EXIT", "DURATION", "CPU",
                                     "ERROR"]
    table = lines[header + 1:lines.index("", header)]  # under it: the failed step's tail
    rows = {line.split()[0]: line.split() for line in table}
    assert lines[lines.index("", header) + 1] == "bad (attempt 1) failed with no output"
    assert set(rows) == {"ok", "bad", "skipped"}
    assert rows["ok"][1:4] == ["SUCCEEDED", "1", "0"]
    assert rows["bad"][1:4] == ["FAILED", "1", "4"] and "exited with status 4" in \
        " ".join(rows["bad"])
    assert rows["skipped"][1:6] == ["SKIPPED", "0", "-", "-", "-"]  # never ran: no CPU
    assert rows["ok"][5].endswith("s")  # measured CPU time of its attempt
    listing = d.wfctl("status")
    assert listing.returncode == 0
    first, *others = listing.stdout.splitlines()
    assert first.split()[:3] == ["RUN_ID", "NAME", "STATE"]
    assert any(line.split()[:3] == [run_id, "mixed", "FAILED"] for line in others)


def test_status_exits_0_whatever_the_state(daemon: Callable[..., Daemon],
                                           wfd_tmp: Path) -> None:
    d = daemon()
    failed = d.wfctl("run", str(write_workflow(wfd_tmp, MIXED)), "--wait").stdout.strip()
    for argv in (["status"], ["status", "--json"], ["status", failed], ["status", failed,
                                                                          "--json"]):
        assert d.wfctl(*argv).returncode == 0
