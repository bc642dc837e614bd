"""Every-byte torn tail (issue 4, test 2).

A real `events.jsonl` of a finished run is cut at every byte offset inside its
last line (and, since it is cheap, inside every other line too), into a fresh
state dir with the run's `workflow.json`, and recovered with the daemon's own
loading code: it never crashes, the run is never CORRUPT, its state equals the
fold of the whole lines before the cut, and the file is cut back to the last
newline. A few offsets go through the real daemon as well: `status --json`
equals that fold, and the lines the daemon appends afterwards start right at the
last newline (no torn bytes left between them).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import msgspec
import pytest
from helpers import Daemon, run_json, wait_for_state, write_workflow

from wfd import events as ev
from wfd import state as st
from wfd.engine import Engine
from wfd.eventlog import EVENTS, WORKFLOW, Layout
from wfd.store import default_name
from wfd.workflow import parse_workflow

FLAKY = "test \"$WFD_ATTEMPT\" -ge 2"  # fails its first attempt, so the log has a retry


def finished_run(daemon, root: Path) -> tuple[Daemon, str, Path]:
    """A real run with dependencies, a retry and parallel steps; its run dir."""
    wf = write_workflow(root, {
        "name": "torn",
        "steps": [
            {"id": "a", "command": "true"},
            {"id": "b", "command": FLAKY, "retries": 2,
             "backoff": {"initial": 0.05}},
            {"id": "c", "command": "true", "depends_on": ["a", "b"]},
            {"id": "d", "command": "true", "depends_on": ["a"]},
        ],
    })
    d = daemon()
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    d.stop()
    return d, run_id, d.state_dir / "runs" / run_id


def expected_status(run_dir: Path, data: bytes) -> dict | None:
    """The fold of the whole lines of `data`, as `status --json` shows it (None: no line)."""
    whole = data[: data.rfind(b"\n") + 1]
    if not whole:
        return None
    sub = json.loads((run_dir / WORKFLOW).read_bytes())
    wf = parse_workflow(sub["workflow"], default_name(sub["source"]))
    events = [ev.json_decoder.decode(line) for line in whole.splitlines()]
    return msgspec.to_builtins(st.run_status(st.fold(wf, events)))


def cut_copy(run_dir: Path, data: bytes, state_dir: Path) -> Path:
    """A fresh state dir holding the run with `data` as its events.jsonl."""
    target = state_dir / "runs" / run_dir.name
    target.mkdir(parents=True)
    shutil.copy2(run_dir / WORKFLOW, target / WORKFLOW)
    (target / "logs").mkdir()
    (target / EVENTS).write_bytes(data)
    return target


def run_of(engine: Engine, run_id: str) -> st.RunState | None:
    return asyncio.run(engine.get(run_id))


def recover(state_dir: Path) -> Engine:
    engine = Engine(Layout(state_dir), limit=4, system=False)
    engine.load_all()
    return engine


def test_every_byte_offset_recovers_to_the_fold_of_whole_lines(daemon, wfd_tmp: Path) -> None:
    _, run_id, run_dir = finished_run(daemon, wfd_tmp)
    data = (run_dir / EVENTS).read_bytes()
    assert data.endswith(b"\n")
    last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
    assert json.loads(data[last_start:])["type"] == "RunFinished"
    # Every cut inside the last line (its first byte .. the line without its newline), and
    # also every cut anywhere else: a crash can tear whichever line was being written.
    offsets = list(range(last_start, len(data))) + list(range(0, last_start))
    state_dir = wfd_tmp / "cut.state"
    copy = cut_copy(run_dir, b"", state_dir)
    checked = 0
    for offset in offsets:
        cut = data[:offset]
        (copy / EVENTS).write_bytes(cut)
        try:
            engine = recover(state_dir)  # a fresh engine each time, as a new daemon
        except Exception as exc:  # never a crash
            pytest.fail(f"recovery of a log cut at byte {offset} of {len(data)} raised {exc!r}")
        want = expected_status(run_dir, cut)
        good = cut[: cut.rfind(b"\n") + 1]
        assert (copy / EVENTS).read_bytes() == good, f"cut at {offset}: torn bytes not cut off"
        if want is None:  # not even RunCreated is whole: a run never acknowledged
            assert run_of(engine, run_id) is None, f"cut at {offset}"
        else:
            run = run_of(engine, run_id)
            assert run is not None, f"cut at {offset}"
            got = msgspec.to_builtins(st.run_status(run))
            assert got == want, f"cut at {offset} of {len(data)}: state is not the fold"
            assert got["state"] != "CORRUPT", f"cut at {offset}: {got['error']}"
            assert run.last_seq == good.count(b"\n")
        checked += 1
    assert checked == len(data)
    # The untouched log folds to the finished run.
    whole = recover(run_dir.parent.parent)
    assert run_id in whole.stubs  # a finished run is known by its ends until asked for
    assert run_of(whole, run_id).state == "SUCCEEDED"


@pytest.mark.parametrize("where", ["mid-last-line", "last-line-without-newline",
                                   "mid-earlier-line"])
def test_real_daemon_cuts_the_torn_tail_before_appending(daemon, wfd_tmp: Path,
                                                         where: str) -> None:
    _, run_id, run_dir = finished_run(daemon, wfd_tmp)
    data = (run_dir / EVENTS).read_bytes()
    lines = data.splitlines(keepends=True)
    if where == "mid-last-line":
        offset = len(data) - len(lines[-1]) // 2
    elif where == "last-line-without-newline":  # it parses, but is not committed
        offset = len(data) - 1
    else:  # inside the line of the second AttemptClaimed: the run is unfinished there
        claims = [i for i, line in enumerate(lines) if b'"AttemptClaimed"' in line]
        index = claims[1]
        offset = sum(map(len, lines[:index])) + len(lines[index]) // 3
    cut = data[:offset]
    good = cut[: cut.rfind(b"\n") + 1]
    want = expected_status(run_dir, cut)
    assert want is not None and want["state"] == "RUNNING"

    state_dir = wfd_tmp / "cut.state"
    copy = cut_copy(run_dir, cut, state_dir)
    d = daemon(name="cut", state_dir=state_dir, extra=["--no-resume"])
    # The fold alone cannot know that no daemon drives the run; status says so (issue 14).
    assert run_json(d, run_id) == {**want, "waiting_for_resume": True}
    assert (copy / EVENTS).read_bytes() == good, "torn tail not cut off at recovery"
    replay = d.wfctl("replay", run_id, "--json")
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["state"] == want
    d.stop()

    # Now let it resume the run and append: the new lines start right at the last newline.
    d.extra = []
    d.start()
    wait_for_state(d, run_id, "SUCCEEDED")
    after = (copy / EVENTS).read_bytes()
    assert after.startswith(good) and len(after) > len(good), "nothing appended"
    assert after.endswith(b"\n")
    seqs = [json.loads(line)["seq"] for line in after.splitlines()]  # every line whole
    assert seqs == list(range(1, len(seqs) + 1))
    replay = d.wfctl("replay", run_id)
    assert replay.returncode == 0 and "torn" not in replay.stderr, replay.stderr
    d.stop()
