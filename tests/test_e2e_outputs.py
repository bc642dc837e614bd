"""Outputs between steps (issue 15) through the real `wfd`, keeper and `wfctl`.

A step writes KEY=VALUE lines to `$WFD_OUTPUT`; once it succeeds they are in
its AttemptSucceeded, and every step downstream of it, directly or not, gets
them as `WFD_OUT_<STEP>_<KEY>`. Proven here: a grandchild sees them (and a step
beside the producer does not), they show in `status --json`, `status` and
`replay`; they survive a kill -9 of the daemon while the producer runs (the
keeper's exit record carries them) and a restart that reruns the consumer;
`resume` does not recompute them; a file over the cap or with a bad line fails
the attempt with the reason; and in a system daemon a step of `nobody` writes
them through a file it may write but not replace.
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Daemon, replay_events, run_json, wait_for_state, wait_until, write_workflow

ENV_DUMP = "env | grep '^WFD_OUT_' | sort"


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def log_events(d: Daemon, run_id: str) -> list[dict]:
    """The run's log as it is on disk (readable while no daemon runs)."""
    text = (d.state_dir / "runs" / run_id / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def succeeded(events: list[dict], step: str) -> list[dict]:
    return [e for e in events if e["type"] == "AttemptSucceeded" and e["step"] == step]


@pytest.mark.timeout(120)
def test_outputs_reach_a_grandchild_and_show_in_status_and_replay(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "make-tar", "command": "echo FILE=/data/x.tar >> $WFD_OUTPUT; "
                                      "printf 'ROWS=3\\n\\nNOTE=a = b\\n' >> $WFD_OUTPUT"},
        {"id": "child", "command": f"echo B=2 >> $WFD_OUTPUT; {ENV_DUMP} > child.env; "
                                   'echo "$WFD_OUTPUT" > child.path',
         "depends_on": ["make-tar"]},
        {"id": "grandchild", "command": f"{ENV_DUMP} > grandchild.env; "
                                        'echo "$WFD_OUTPUT" > grandchild.path',
         "depends_on": ["child"]},
        {"id": "beside", "command": f"{ENV_DUMP} > beside.env"},
    ]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    assert lines(wfd_tmp / "child.env") == [
        "WFD_OUT_make_2Dtar_FILE=/data/x.tar", "WFD_OUT_make_2Dtar_NOTE=a = b",
        "WFD_OUT_make_2Dtar_ROWS=3"]
    assert lines(wfd_tmp / "grandchild.env") == [
        "WFD_OUT_child_B=2", "WFD_OUT_make_2Dtar_FILE=/data/x.tar",
        "WFD_OUT_make_2Dtar_NOTE=a = b", "WFD_OUT_make_2Dtar_ROWS=3"]
    assert lines(wfd_tmp / "beside.env") == []

    status = run_json(d, run_id)
    assert status["steps"]["make-tar"]["outputs"] == {
        "FILE": "/data/x.tar", "ROWS": "3", "NOTE": "a = b"}
    assert status["steps"]["child"]["outputs"] == {"B": "2"}
    assert status["steps"]["grandchild"]["outputs"] == {}
    [event] = succeeded(replay_events(d, run_id), "make-tar")
    assert event["outputs"] == {"FILE": "/data/x.tar", "ROWS": "3", "NOTE": "a = b"}
    replayed = json.loads(d.wfctl("replay", run_id, "--json").stdout)["state"]
    assert replayed["steps"] == status["steps"]
    human = d.wfctl("replay", run_id).stdout
    assert "make-tar: SUCCEEDED (attempt 1; outputs FILE, ROWS, NOTE)" in human
    shown = d.wfctl("status", run_id).stdout.splitlines()
    assert shown[shown.index("STEP      OUTPUT") + 1:] == [
        "make-tar  FILE=/data/x.tar", "make-tar  ROWS=3", "make-tar  NOTE=a = b",
        "child     B=2"]
    # each attempt's file is its own, in the keeper's directory for its user, and is gone
    # once the attempt is over
    paths = [Path(lines(wfd_tmp / f"{step}.path")[0]) for step in ("child", "grandchild")]
    assert paths[0] != paths[1] and paths[0].parent == paths[1].parent
    assert paths[0].parent.name == f"u{os.geteuid()}"
    assert paths[0].parent.parent.name.startswith("wfd-out-")
    assert not paths[0].exists() and not paths[1].exists()


@pytest.mark.timeout(120)
def test_each_step_gets_the_outputs_of_its_own_upstream_only(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """Two branches whose producers end at different times (the engine memoizes which
    steps upstream have outputs): each branch gets its own, and a join gets both."""
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "echo A=1 >> $WFD_OUTPUT"},
        {"id": "b", "command": "while [ ! -f c.env ]; do sleep 0.05; done; "
                               "echo B=2 >> $WFD_OUTPUT"},
        {"id": "c", "command": f"{ENV_DUMP} > c.env.tmp; mv c.env.tmp c.env",
         "depends_on": ["a"]},
        {"id": "d", "command": f"{ENV_DUMP} > d.env", "depends_on": ["b"]},
        {"id": "e", "command": f"{ENV_DUMP} > e.env", "depends_on": ["c", "d"]},
    ]})
    d = daemon()
    d.submit(wf, "--wait")
    assert lines(wfd_tmp / "c.env") == ["WFD_OUT_a_A=1"]
    assert lines(wfd_tmp / "d.env") == ["WFD_OUT_b_B=2"]
    assert lines(wfd_tmp / "e.env") == ["WFD_OUT_a_A=1", "WFD_OUT_b_B=2"]


@pytest.mark.timeout(120)
def test_a_cleanup_step_rerun_by_resume_gets_the_outputs_of_the_rerun(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "test -f ok && echo A=done >> $WFD_OUTPUT"},
        {"id": "cleanup", "run_if": "done", "depends_on": ["a"],
         "command": f"{ENV_DUMP} >> cleanup.env; echo --- >> cleanup.env"},
    ]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    (wfd_tmp / "ok").touch()
    assert d.wfctl("resume", done.stdout.strip()).returncode == 0
    wait_for_state(d, done.stdout.strip(), "SUCCEEDED")
    assert lines(wfd_tmp / "cleanup.env") == ["---", "WFD_OUT_a_A=done", "---"]


@pytest.mark.timeout(180)
def test_outputs_survive_a_kill_9_between_producer_and_consumer(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    """The daemon dies while the producer runs; the producer ends with no daemon up (its
    outputs go into the keeper's exit record); the next daemon records them and starts the
    consumer with them. Then a stop interrupts the consumer, and the daemon after that
    (which knows the outputs from the log alone) gives them to its second attempt."""
    seen = wfd_tmp / "seen"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "produce", "command": "echo KEY=from-produce >> $WFD_OUTPUT; touch wrote; "
                                     "while [ ! -f go ]; do sleep 0.05; done"},
        {"id": "consume", "command": f'echo "$WFD_ATTEMPT $WFD_OUT_produce_KEY" >> {seen}; '
                                     "while [ ! -f go2 ]; do sleep 0.05; done",
         "depends_on": ["produce"]},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    wait_until(lambda: (wfd_tmp / "wrote").exists(), 30, message="the producer to write")
    d.kill()
    (wfd_tmp / "go").touch()
    journals = d.state_dir / "keeper"

    def recorded() -> bool:
        return any("from-produce" in p.read_text() for p in journals.glob("exits-*.jsonl"))

    wait_until(recorded, 30, message="the keeper's exit record with the outputs")
    assert not succeeded(log_events(d, run_id), "produce")  # no daemon recorded it
    d.start()
    wait_until(lambda: lines(seen) == ["1 from-produce"], 30, message="the consumer's start")
    [event] = succeeded(log_events(d, run_id), "produce")
    assert event["outputs"] == {"KEY": "from-produce"}

    d.stop()  # stops the consumer: interrupted, and run again by the next daemon
    d.start()
    wait_until(lambda: lines(seen) == ["1 from-produce", "2 from-produce"], 30,
               message="the consumer's second attempt")
    (wfd_tmp / "go2").touch()
    status = wait_for_state(d, run_id, "SUCCEEDED", timeout=60)
    assert status["steps"]["produce"]["attempts"] == 1
    assert status["steps"]["produce"]["outputs"] == {"KEY": "from-produce"}


@pytest.mark.timeout(120)
def test_the_next_keeper_removes_what_a_killed_keeper_left(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "held", "on_lost": "fail",
        "command": 'echo "$WFD_OUTPUT" > path; echo A=1 >> "$WFD_OUTPUT"; echo $$ > pid; '
                   "exec sleep 60"}]})
    d = daemon()
    run_id = d.submit(wf)
    pid = int(wait_until(lambda: lines(wfd_tmp / "pid"), 30, message="the step's pid")[0])
    left = Path(lines(wfd_tmp / "path")[0])
    d.kill()
    d.kill_keeper()  # as a reboot would, but the step is still there: end it
    os.kill(pid, 9)
    assert left.exists()
    d.start()
    wait_for_state(d, run_id, "FAILED")
    d.submit(write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}, "b.json"),
             "--wait")
    assert not left.parent.parent.exists()


@pytest.mark.timeout(120)
def test_resume_does_not_recompute_outputs(daemon: Callable[..., Daemon],
                                           wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "echo run >> a.runs; echo V=$(wc -l < a.runs) >> $WFD_OUTPUT"},
        {"id": "b", "command": 'test -f ok && echo "$WFD_OUT_a_V" > got',
         "depends_on": ["a"]},
    ]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    run_id = done.stdout.strip()
    (wfd_tmp / "ok").touch()
    done = d.wfctl("resume", run_id)
    assert done.returncode == 0, done.stderr
    status = wait_for_state(d, run_id, "SUCCEEDED")
    assert lines(wfd_tmp / "a.runs") == ["run"]
    assert lines(wfd_tmp / "got") == ["1"]
    assert status["steps"]["a"]["outputs"] == {"V": "1"}


@pytest.mark.timeout(120)
def test_a_file_over_the_cap_or_with_a_bad_line_fails_the_attempt(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "big", "retries": 1, "backoff": {"initial": 0.1},
         "command": "head -c 70000 /dev/zero | tr '\\0' x | sed 's/^/K=/' >> $WFD_OUTPUT"},
        {"id": "after-big", "command": "true", "depends_on": ["big"]},
        {"id": "bad", "command": "echo A=1 >> $WFD_OUTPUT; echo 'no equals' >> $WFD_OUTPUT"},
        {"id": "key", "command": "echo 'my-key=1' >> $WFD_OUTPUT"},
        {"id": "fine", "command": "printf 'K=%065000d\\n' 0 >> $WFD_OUTPUT"},
    ]})
    d = daemon()
    done = d.wfctl("run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    steps = run_json(d, done.stdout.strip())["steps"]
    big = steps["big"]
    assert (big["state"], big["attempts"], big["exit_code"]) == ("FAILED", 2, 0)
    assert big["error"] == "output file ($WFD_OUTPUT) is over 65536 bytes"
    assert big["outputs"] == {}
    assert steps["after-big"]["state"] == "SKIPPED"
    assert steps["bad"]["state"] == "FAILED"
    assert steps["bad"]["error"] == ('output file ($WFD_OUTPUT) line 2: expected KEY=VALUE, '
                                     'got "no equals"')
    assert steps["key"]["error"] == ('output file ($WFD_OUTPUT) line 1: invalid key "my-key" '
                                     "(must match [A-Za-z][A-Za-z0-9_]{0,127})")
    assert steps["fine"]["state"] == "SUCCEEDED"
    assert len(steps["fine"]["outputs"]["K"]) == 65000


# ---- a system daemon: the step runs as nobody ----------------------------------------------

try:
    from test_socket_users import (  # noqa: F401 - fixtures
        NOBODY,
        accounts,
        client,
        foreign_python,
        nobody_dir,
        system_daemon,
    )
except ImportError:  # pragma: no cover
    NOBODY = "nobody"


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run steps as nobody")
def test_system_daemon_steps_of_nobody_pass_outputs(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Any,
        accounts: Any) -> None:
    """$WFD_OUTPUT is in a directory of nobody's own (the run dir is root's): what the
    step writes there reaches the next step; a symlink to a root-only file planted in its
    place is refused, never followed by the root keeper."""
    d = system_daemon(daemon, sandbox, accounts)
    work = nobody_dir(sandbox.root / "work")
    secret = sandbox.root / "secret"
    secret.write_text("SECRET=root-only\n")
    os.chmod(secret, 0o600)
    wf = write_workflow(work, {"steps": [
        {"id": "produce", "command": 'id -u > who; echo "$WFD_OUTPUT" > where; '
                                     'echo "WHO=$(id -un)" >> "$WFD_OUTPUT"'},
        {"id": "consume", "command": 'echo "$WFD_OUT_produce_WHO" > got',
         "depends_on": ["produce"]},
        {"id": "plant", "command": f'ln -s {secret} "$WFD_OUTPUT"'},
    ]})
    os.chmod(wf, 0o644)
    done = client(foreign_python, d, NOBODY, "run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    nobody = pwd.getpwnam(NOBODY)
    assert lines(work / "who") == [str(nobody.pw_uid)]
    assert lines(work / "got") == [NOBODY]
    path = Path(lines(work / "where")[0])
    assert str(d.state_dir) not in str(path)
    mine, base = path.parent.stat(), path.parent.parent.stat()
    assert (mine.st_uid, mine.st_mode & 0o777) == (nobody.pw_uid, 0o700)
    assert (base.st_uid, base.st_mode & 0o777) == (0, 0o711)
    status = json.loads(d.wfctl("status", done.stdout.strip(), "--json").stdout)
    assert status["steps"]["produce"]["outputs"] == {"WHO": NOBODY}
    plant = status["steps"]["plant"]
    assert (plant["state"], plant["exit_code"], plant["outputs"]) == ("FAILED", 0, {})
    assert plant["error"] == ("the output file ($WFD_OUTPUT) is not a regular file of the "
                              "step's user")
    assert "root-only" not in (d.state_dir / "runs" / done.stdout.strip()
                               / "events.jsonl").read_text()
