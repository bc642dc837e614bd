"""Schedules through the real daemon and wfctl (issue 13, prove-it 2, 3, 4 and 6):
slots fire once each with WFD_SCHEDULED_AT, pause/unpause, kill -9 at random moments,
catch-up after downtime, overlap skip and queue, fire, update, bad input."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

from wfd.events import parse_ts

pytestmark = pytest.mark.timeout(300)


# ---- what the state dir says --------------------------------------------------------


def created(d: Daemon) -> list[dict]:
    """The RunCreated event of every run in the state dir."""
    out = []
    for run_dir in sorted((d.state_dir / "runs").iterdir()):
        try:  # a run being created may have no events.jsonl yet
            data = (run_dir / "events.jsonl").read_bytes()
        except FileNotFoundError:
            continue
        first, newline, _ = data.partition(b"\n")
        if newline:
            out.append(json.loads(first))
    return out


def slots_of(d: Daemon, name: str) -> list[float]:
    return [e["slot"] for e in created(d) if e.get("schedule") == name]


def schedule_log(d: Daemon) -> list[dict]:
    text = (d.state_dir / "schedules.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def intents_have_runs(d: Daemon) -> bool:
    """Every SlotFired's run has its first event (recovery or the timer made it)."""
    made = {e["run_id"] for e in created(d)}
    return all(e["run_id"] in made for e in schedule_log(d) if e["type"] == "SlotFired")


def add(d: Daemon, name: str, wf: Path, *flags: str) -> None:
    done = d.wfctl("schedule", "add", name, str(wf), *flags)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"schedule {name} added; next run ")


def wfctl_ok(d: Daemon, *args: str) -> Any:
    done = d.wfctl(*args)
    assert done.returncode == 0, done.stderr
    return done


def check_every_slot_decided(d: Daemon, name: str, every: float = 1.0) -> dict[float, str]:
    """Each slot of the series from the first to the last decided has exactly one fate:
    one run (fired), or a recorded reason. Returns slot -> fate."""
    events = [e for e in schedule_log(d) if e.get("name") == name]
    anchor = next(e["anchor"] for e in events if e["type"] == "ScheduleAdded")
    fate: dict[float, str] = {}

    def decide(slot: float, what: str) -> None:
        assert slot not in fate, f"slot {slot} decided twice: {fate[slot]} and {what}"
        fate[slot] = what

    for e in events:
        if e["type"] == "SlotFired" and not e.get("manual"):
            decide(e["slot"], "fired " + e["run_id"])
        elif e["type"] == "SlotSkipped":
            slot = e["slot"]
            while slot <= e["until"]:
                decide(slot, "skipped " + e["reason"])
                slot += every
    queued = {e["slot"] for e in events if e["type"] == "SlotQueued"}
    # every slot up to the last decided one has a fate (queued ones fire later, once)
    last = max(fate) if fate else anchor
    missing = [anchor + k * every for k in range(1, round((last - anchor) / every) + 1)
               if anchor + k * every not in fate and anchor + k * every not in queued]
    assert not missing, f"slots without a run or a reason: {missing}"
    # every fired slot has its run, and no slot has two runs
    runs = Counter(slots_of(d, name))
    assert all(count == 1 for count in runs.values()), runs
    fired = {slot for slot, what in fate.items() if what.startswith("fired")}
    manual = {e["slot"] for e in events if e["type"] == "SlotFired" and e.get("manual")}
    assert set(runs) == fired | manual, (set(runs) ^ (fired | manual))
    return fate


def _ts(epoch: float) -> str:
    from wfd.events import format_ts

    return format_ts(epoch)


# ---- the tests -------------------------------------------------------------------------


def test_every_second_fires_each_slot_once_and_pause_stops_it(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    out = wfd_tmp / "out"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "command": f'echo "$WFD_SCHEDULE $WFD_SCHEDULED_AT $WHO" >> {out}'}]})
    d = daemon()
    add(d, "tick", wf, "--every", "1s", "WHO=me")
    wait_until(lambda: len(slots_of(d, "tick")) >= 4, 60, 0.1, "four runs")
    wfctl_ok(d, "schedule", "pause", "tick")
    paused_at = time.time()
    count = len(slots_of(d, "tick"))
    time.sleep(3)
    assert len(slots_of(d, "tick")) == count  # paused: no new slot fires
    listing = json.loads(wfctl_ok(d, "schedule", "list", "--json").stdout)
    assert [(s["name"], s["paused"], s["every"]) for s in listing] == [("tick", True, 1.0)]
    wfctl_ok(d, "schedule", "unpause", "tick")
    wait_until(lambda: len(slots_of(d, "tick")) >= count + 2, 60, 0.1, "runs after unpause")
    wfctl_ok(d, "schedule", "pause", "tick")  # a fixed set of runs to look at
    fate = check_every_slot_decided(d, "tick")
    assert any(what == "skipped paused" and slot > paused_at for slot, what in fate.items())

    # each run's steps saw its own slot, as RFC 3339 UTC to the second
    slots = sorted(slots_of(d, "tick"))
    for run in created(d):
        wait_for_state(d, run["run_id"], "SUCCEEDED")
    lines = out.read_text().splitlines()
    seen = sorted(parse_ts(line.split()[1]) for line in lines)
    assert seen == slots and all(line.split()[0] == "tick" for line in lines)
    assert all(line.endswith(" me") for line in lines)
    assert all(len(line.split()[1]) == len("2026-01-01T00:00:00Z") for line in lines)
    status = run_json(d, created(d)[0]["run_id"])
    assert status["schedule"] == "tick" and parse_ts(status["scheduled_at"]) == slots[0]
    assert status["vars"] == {"WHO": "me"}
    table = wfctl_ok(d, "status", created(d)[0]["run_id"]).stdout
    assert "schedule tick  slot " in table


def test_kill_9_at_random_moments_never_fires_a_slot_twice(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    d = daemon()
    add(d, "torture", wf, "--every", "1s", "--overlap", "allow", "--catch-up", "all")
    rng = random.Random(13)
    kills = 0
    while kills < 12:
        time.sleep(rng.uniform(0.05, 1.6))
        d.kill()
        kills += 1
        d.start()
    wait_until(lambda: len(schedule_log(d)) > 3, 30)
    time.sleep(2)
    d.stop()
    d.start()  # recovery creates any run an intent names
    wfctl_ok(d, "schedule", "pause", "torture")
    wait_until(lambda: intents_have_runs(d), 30, 0.1, "every intent's run")
    d.stop()
    fate = check_every_slot_decided(d, "torture")
    fired = sum(1 for what in fate.values() if what.startswith("fired"))
    assert fired >= 5, fate
    for run in created(d):
        assert run["schedule"] == "torture"


@pytest.mark.parametrize("policy", ["latest", "all", "none"])
def test_downtime_catch_up(daemon: Callable[..., Daemon], wfd_tmp: Path, policy: str) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    d = daemon()
    add(d, "back", wf, "--every", "1s", "--catch-up", policy, "--max-catch-up", "3",
        "--overlap", "allow")
    wait_until(lambda: len(slots_of(d, "back")) >= 1, 30, 0.05, "a first run")
    d.stop()
    if not intents_have_runs(d):  # stopped between an intent and its run: recovery makes it
        d.start()
        wait_until(lambda: intents_have_runs(d), 30, 0.05, "every intent's run")
        d.stop()
    last_before = max(e.get("until", e.get("slot", 0)) for e in schedule_log(d)
                      if e["type"] in ("SlotFired", "SlotSkipped"))
    time.sleep(6.5)  # six slots or so go by while it is down
    restart = time.time()
    d.start()
    wait_until(lambda: any(e["type"] in ("SlotFired", "SlotSkipped") and
                           e.get("until", e.get("slot")) >= restart - 1.0
                           for e in schedule_log(d)), 30, 0.05, "the missed slots decided")
    wait_until(lambda: intents_have_runs(d), 30, 0.05, "every intent's run")
    d.stop()
    fate = check_every_slot_decided(d, "back")
    # The first pass after the restart decided every slot since the last one decided, in
    # one batch (up to its SlotsSettled): the newest may have been on time (it fires
    # whatever the policy); the others were missed while the daemon was down.
    log = schedule_log(d)
    begin = next(i for i, e in enumerate(log)
                 if e["type"] in ("SlotFired", "SlotSkipped") and parse_ts(e["ts"]) >= restart)
    batch = []
    for e in log[begin:]:
        if e["type"] == "SlotsSettled":
            break
        batch.append(e)
    decided = sorted(s for s in fate if any(
        e["slot"] <= s <= e.get("until", e["slot"]) for e in batch))
    assert decided and decided[0] > last_before and len(decided) >= 5, (decided, batch)
    fired = [s for s in decided if fate[s].startswith("fired")]
    # catch-up's share of the missed slots, plus the newest if it was on time
    share = {"none": 0, "latest": 1, "all": 3}[policy]
    assert fired in (decided[len(decided) - share:] if share else [],
                     decided[len(decided) - share - 1:]), (policy, fired, decided)
    if policy == "all":
        runs = [e["run_id"] for e in created(d) if e.get("slot") in fired]
        assert runs == sorted(runs)  # created in slot order
    reasons = {e["reason"] for e in schedule_log(d) if e["type"] == "SlotSkipped"}
    assert reasons <= {"missed", "missed, over --max-catch-up"}, reasons


@pytest.mark.parametrize("overlap", ["skip", "queue"])
def test_overlap_with_a_step_that_outlasts_the_interval(
        daemon: Callable[..., Daemon], wfd_tmp: Path, overlap: str) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "sleep 2.5"}]})
    d = daemon()
    add(d, "long", wf, "--every", "1s", "--overlap", overlap)
    wait_until(lambda: len(slots_of(d, "long")) >= 3, 90, 0.1, "three runs")
    wfctl_ok(d, "schedule", "pause", "long")
    runs = [e for e in created(d) if e.get("schedule") == "long"]
    for run in runs:
        wait_for_state(d, run["run_id"], "SUCCEEDED", timeout=60)
    statuses = [run_json(d, run["run_id"]) for run in runs]
    # never two at once: each run's step started after the run before had finished
    for prev, nxt in zip(statuses, statuses[1:], strict=False):
        started = parse_ts(nxt["steps"]["s"]["started_at"])
        assert started >= parse_ts(prev["finished_at"]), (prev, nxt)
    log = [e for e in schedule_log(d) if e.get("name") == "long"]
    skips = [e for e in log if e["type"] == "SlotSkipped"]
    assert skips and all(e["reason"].startswith("overlap") for e in skips)
    assert not any(e["type"] == "SlotQueued" for e in log)
    waited = [e for e in created(d) if e.get("schedule") == "long" and e.get("queued")]
    if overlap == "queue":
        # a slot due while the last run ran became a run at once, QUEUED behind it (one
        # at most: the other slots meanwhile were skipped), and started when it ended
        assert waited and all(e["queue"] == "schedule:long" for e in waited)
        assert all(e["concurrency"] == 1 for e in created(d) if e.get("schedule") == "long")
    else:
        assert not waited
    check_every_slot_decided(d, "long")


def test_fire_update_show_rm(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    one = write_workflow(wfd_tmp, {"name": "one", "steps": [{"id": "s", "command": "true"}]})
    two = write_workflow(wfd_tmp, {"name": "two", "steps": [{"id": "t", "command": "true"}]},
                         "two.json")
    d = daemon()
    add(d, "nightly", one, "--cron", "@daily", "--tz", "America/New_York", "--clear-env",
        "--env-keep", "KEEP")
    run_id = wfctl_ok(d, "schedule", "fire", "nightly").stdout.strip()
    status = wait_for_state(d, run_id, "SUCCEEDED")
    assert status["name"] == "one" and status["schedule"] == "nightly"
    wfctl_ok(d, "schedule", "update", "nightly", str(two))
    again = wfctl_ok(d, "schedule", "fire", "nightly").stdout.strip()
    assert wait_for_state(d, again, "SUCCEEDED")["name"] == "two"
    view = json.loads(wfctl_ok(d, "schedule", "show", "nightly", "--json").stdout)
    assert (view["cron"], view["tz"], view["workflow"], view["last_run"]) == (
        "0 0 * * *", "America/New_York", "two", again)
    assert parse_ts(view["next_at"]) > time.time()
    assert view["env"] == []  # --clear-env; KEEP is not set in the test's environment
    text = wfctl_ok(d, "schedule", "show", "nightly").stdout
    assert "when       cron 0 0 * * * (America/New_York)" in text
    listing = wfctl_ok(d, "schedule", "list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "WHEN", "NEXT", "LAST_RUN", "STATE"]
    assert listing[1].startswith("nightly") and again in listing[1]
    wfctl_ok(d, "schedule", "rm", "nightly")
    done = d.wfctl("schedule", "show", "nightly")
    assert done.returncode == 2 and done.stderr == "wfctl: no such schedule: nightly\n"
    assert wfctl_ok(d, "schedule", "list").stderr == "no schedules\n"
    # the schedule log survives a restart: removed stays removed
    d.restart()
    assert wfctl_ok(d, "schedule", "list", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize(("args", "message"), [
    (["--cron", "61 * * * *"], "cron expression '61 * * * *': bad minute field '61' (field 1)"),
    (["--cron", "* * * *"], "expected 5 fields"),
    (["--every", "5x"], "--every '5x': unknown unit 'x'"),
    (["--every", "1s", "--tz", "Mars/Base"], "unknown time zone 'Mars/Base'"),
    (["--every", "1s", "WFD_SCHEDULE=x"], "WFD_SCHEDULE: WFD_* variables are set by wfd"),
    (["--every", "1s", "--env-keep", "HOME"], "--env-keep goes with --clear-env"),
    ([], "one of the arguments --cron --every is required"),
])
def test_bad_schedules_are_usage_errors(daemon: Callable[..., Daemon], wfd_tmp: Path,
                                        args: list[str], message: str) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    d = daemon()
    done = d.wfctl("schedule", "add", "x", str(wf), *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert json.loads(wfctl_ok(d, "schedule", "list", "--json").stdout) == []


def test_names_are_unique_and_bad_names_refused(daemon: Callable[..., Daemon],
                                                wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    d = daemon()
    add(d, "a", wf, "--cron", "0 3 * * *")
    done = d.wfctl("schedule", "add", "a", str(wf), "--every", "1h")
    assert done.returncode == 2 and "schedule a exists already" in done.stderr
    done = d.wfctl("schedule", "add", "../x", str(wf), "--every", "1h")
    assert done.returncode == 2 and "bad schedule name '../x'" in done.stderr
    for action in ("pause", "unpause", "rm", "fire", "show"):
        done = d.wfctl("schedule", action, "nope")
        assert (done.returncode, done.stderr) == (2, "wfctl: no such schedule: nope\n")


@pytest.mark.parametrize("leftover", ["none", "empty dir", "workflow.json only",
                                      "empty events.jsonl"])
def test_an_intent_without_its_run_gets_that_run(daemon: Callable[..., Daemon], wfd_tmp: Path,
                                                 leftover: str) -> None:
    """A crash between SlotFired and the run's first event: the next start creates the
    run the intent names, with that id, and the clean-up of half-made run dirs keeps
    (then replaces) what the crash left of it."""
    import os

    from wfd import events as ev

    d = daemon(start=False)
    runs = d.state_dir / "runs"
    runs.mkdir(parents=True, mode=0o700)
    os.chmod(d.state_dir, 0o700)
    anchor = float(int(time.time()) + 3600)  # the series' own slots are an hour away
    run_id = "20260101T000000Z-00000abc"
    added = ev.ScheduleAdded(seq=1, ts=ev.format_ts(anchor), name="late", owner="root",
                             owner_uid=os.getuid(), gid=os.getgid(), every=3600.0,
                             anchor=anchor, workflow='{"steps": [{"id": "s", "command": '
                             '"echo $WFD_SCHEDULED_AT"}]}', source="late.json",
                             base_dir=str(wfd_tmp))
    fired = ev.SlotFired(seq=2, ts=ev.format_ts(anchor), name="late", owner_uid=os.getuid(),
                         slot=anchor - 60, run_id=run_id)
    (d.state_dir / "schedules.jsonl").write_bytes(ev.encode_line(added) + ev.encode_line(fired))
    half = runs / run_id
    if leftover != "none":
        half.mkdir(mode=0o700)
    if leftover in ("workflow.json only", "empty events.jsonl"):
        (half / "workflow.json").write_text("{}")
    if leftover == "empty events.jsonl":
        (half / "events.jsonl").write_bytes(b"")
    d.start()
    status = wait_for_state(d, run_id, "SUCCEEDED", timeout=60)
    assert status["schedule"] == "late"
    assert parse_ts(status["scheduled_at"]) == anchor - 60
    assert [r["run_id"] for r in created(d)] == [run_id]  # that run, and only it
    assert "CORRUPT" not in wfctl_ok(d, "status").stdout
