"""Tests of wfd.eventlog.parse_log and read_log: committed lines, torn tails, damage.

A log image is built from known events; the tests cut it or damage it and
check what the reader keeps, drops and names (SPEC 3: a line is committed only
once its newline is written; a damaged line elsewhere is named, never skipped).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from wfd import events as ev
from wfd.eventlog import (
    AppendLog,
    Layout,
    Submission,
    UnsafeStateDir,
    check_state_dir,
    discard_unacknowledged,
    parse_log,
    read_log,
)

TS = "2026-11-25T09:58:52.123456Z"

# One event of every type, numbered in order (parse_log reads lines; it does not fold).
SAMPLES: list[ev.Event] = [
    ev.RunCreated(seq=1, ts=TS, run_id="20261125T095852Z-7f3a9c01", name="nightly",
                  owner="alice", owner_uid=1000),
    ev.StepReady(seq=2, ts=TS, step="extract"),
    ev.AttemptClaimed(seq=3, ts=TS, step="extract", attempt=1),
    ev.AttemptStarted(seq=4, ts=TS, step="extract", attempt=1, pid=4242,
                      start_time=1_764_064_732.5, boot_id="3f2c-boot"),
    ev.AttemptFailed(seq=5, ts=TS, step="extract", attempt=1, exit_code=1,
                     error="exited with status 1", retry_at=TS),
    ev.RetryDue(seq=6, ts=TS, step="extract"),
    ev.AttemptInterrupted(seq=7, ts=TS, step="extract", attempt=2, reason="daemon stopped"),
    ev.AttemptSucceeded(seq=8, ts=TS, step="extract", attempt=3),
    ev.StepFailed(seq=9, ts=TS, step="load", attempt=1, exit_code=-9,
                  error="killed by SIGKILL \u00e9\u00e8 \"quoted\"\nnewline"),
    ev.StepSkipped(seq=10, ts=TS, step="report", cause="load"),
    ev.RunCancelRequested(seq=11, ts=TS),
    ev.StepCancelled(seq=12, ts=TS, step="clean", attempt=1, exit_code=-15),
    ev.RunFinished(seq=13, ts=TS, state="CANCELLED"),
    ev.RunResumed(seq=14, ts=TS),
    ev.AttemptSubmitting(seq=15, ts=TS, step="clean", attempt=2, executor="slurm",
                         token="3f2c0a"),
    ev.AttemptSubmitted(seq=16, ts=TS, step="clean", attempt=2, job_id="4711"),
    ev.StepsRetried(seq=17, ts=TS, steps=["load", "report"]),
    ev.RunDequeued(seq=18, ts=TS),
]
N = len(SAMPLES)


def image(events: list[ev.Event]) -> bytes:
    return b"".join(ev.encode_line(e) for e in events)


def line_starts(data: bytes) -> list[int]:
    """Offsets where each line begins."""
    return [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")][:-1]


def with_line(data: bytes, index: int, replacement: bytes) -> bytes:
    """`data` with its line `index` (0-based) replaced; the newline stays."""
    lines = data.split(b"\n")
    lines[index] = replacement
    return b"\n".join(lines)


# ---- a whole log --------------------------------------------------------------------


def test_a_whole_log_gives_every_event_and_line() -> None:
    data = image(SAMPLES)

    read = parse_log(data)

    assert read.events == SAMPLES
    assert read.lines == [ev.encode_line(e)[:-1] for e in SAMPLES]
    assert read.good_size == len(data)
    assert read.torn_tail is None
    assert read.problem is None


def test_every_event_type_survives_its_line() -> None:
    assert {type(e) for e in SAMPLES} == set(ev.EVENT_TYPES)
    for event in SAMPLES:
        line = ev.encode_line(event)
        assert line.count(b"\n") == 1 and line.endswith(b"\n")
        assert ev.json_decoder.decode(line) == event


def test_an_empty_file_is_an_empty_log() -> None:
    read = parse_log(b"")
    assert (read.events, read.lines, read.good_size) == ([], [], 0)
    assert read.torn_tail is None
    assert read.problem is None


# ---- torn tails -----------------------------------------------------------------------


LAST = line_starts(image(SAMPLES))[-1]


@pytest.mark.parametrize("cut", range(LAST + 1, len(image(SAMPLES))))
def test_a_cut_inside_the_last_line_is_a_torn_tail(cut: int) -> None:
    data = image(SAMPLES)[:cut]

    read = parse_log(data)

    assert read.events == SAMPLES[:-1]
    assert read.good_size == LAST
    assert read.torn_tail is not None
    assert f"{cut - LAST} bytes without a newline" in read.torn_tail
    assert read.problem is None


def test_a_last_line_that_parses_but_lacks_its_newline_is_still_torn() -> None:
    data = image(SAMPLES)[:-1]
    assert ev.json_decoder.decode(data[LAST:]) == SAMPLES[-1]

    read = parse_log(data)

    assert read.events == SAMPLES[:-1]
    assert read.torn_tail is not None
    assert read.good_size == LAST


def test_a_cut_at_a_line_end_is_not_torn() -> None:
    read = parse_log(image(SAMPLES)[:LAST])
    assert read.events == SAMPLES[:-1]
    assert read.torn_tail is None
    assert read.problem is None


def test_half_a_first_line_is_torn_and_gives_no_events() -> None:
    read = parse_log(image(SAMPLES)[:10])
    assert read.events == []
    assert read.good_size == 0
    assert read.torn_tail is not None
    assert read.problem is None


def test_a_torn_tail_after_a_damaged_line_reports_both() -> None:
    data = with_line(image(SAMPLES), 3, b"{oops")[:-5]

    read = parse_log(data)

    assert read.problem is not None and read.problem.startswith("damaged line 4:")
    assert read.torn_tail is not None
    assert read.events == SAMPLES[:3]


# ---- damage --------------------------------------------------------------------------


GARBAGE = [
    pytest.param(b"{not json", id="syntax"),
    pytest.param(b'{"seq": 5, "ts": "x"', id="truncated-object"),
    pytest.param(b"\x00\x00\x00\x00", id="nul-bytes"),
    pytest.param(b'{"type": "Nope", "seq": 5, "ts": "x"}', id="unknown-type"),
    pytest.param(b'{"type": "StepReady", "seq": "five", "ts": "x", "step": "a"}',
                 id="wrong-field-type"),
    pytest.param(b'{"type": "StepReady", "seq": 5, "ts": "x"}', id="missing-field"),
    pytest.param(b"[1, 2, 3]", id="not-an-object"),
    pytest.param(b"\xff\xfe garbage", id="bad-utf8"),
    pytest.param(b"", id="blank-line"),
    pytest.param(b"   \t", id="whitespace-only"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("index", [0, 1, 6, N - 2, N - 1])
def test_a_damaged_line_is_named_with_the_events_before_it(garbage: bytes, index: int) -> None:
    data = with_line(image(SAMPLES), index, garbage)

    read = parse_log(data)

    assert read.problem is not None
    assert read.problem.startswith(f"damaged line {index + 1}:")
    assert read.events == SAMPLES[:index]
    assert read.lines == [ev.encode_line(e)[:-1] for e in SAMPLES[:index]]
    assert read.torn_tail is None  # the damaged line has its newline: it is not a tail


# ---- hypothesis ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(count=hs.integers(0, N), cut_at=hs.floats(0, 1))
def test_any_truncation_keeps_exactly_the_whole_lines_before_the_cut(
    count: int, cut_at: float
) -> None:
    full = image(SAMPLES[:count])
    cut = round(cut_at * len(full))
    data = full[:cut]

    read = parse_log(data)

    whole = data.count(b"\n")
    assert read.events == SAMPLES[:whole]
    assert read.lines == data.split(b"\n")[:whole]
    assert read.good_size == len(image(SAMPLES[:whole]))
    assert (read.torn_tail is not None) == (cut != read.good_size)
    assert read.problem is None


@settings(max_examples=200, deadline=None)
@given(
    index=hs.integers(0, N - 1),
    garbage=hs.binary(max_size=40).filter(lambda b: b"\n" not in b),
    cut_back=hs.integers(0, 3),
)
def test_random_damage_names_its_line(index: int, garbage: bytes, cut_back: int) -> None:
    data = with_line(image(SAMPLES), index, garbage)
    data = data[: len(data) - cut_back] if index < N - 1 else data

    read = parse_log(data)

    assert read.problem is not None
    assert read.problem.startswith(f"damaged line {index + 1}:")
    assert read.events == SAMPLES[:index]


# ---- read_log on a file ------------------------------------------------------------------


def test_read_log_with_repair_cuts_the_torn_tail_off_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(image(SAMPLES)[:-7])

    read = read_log(path, repair=True)
    with path.open("ab") as f:
        f.write(ev.encode_line(SAMPLES[-1]))

    assert read.torn_tail is not None
    assert parse_log(path.read_bytes()).events == SAMPLES


def test_read_log_without_repair_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    torn = image(SAMPLES)[:-7]
    path.write_bytes(torn)

    read = read_log(path, repair=False)

    assert read.events == SAMPLES[:-1]
    assert path.read_bytes() == torn


def test_read_log_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(image(SAMPLES))
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)

    with pytest.raises(OSError):
        read_log(link, repair=True)


# ---- run dirs: no symlink anywhere, the state dir's owner, crashed creations ------------

RUN = "20261125T095852Z-7f3a9c01"


def submission() -> Submission:
    return Submission(workflow='{"steps": [{"id": "a", "command": "true"}]}', source="wf.json",
                      base_dir="/", env={}, umask=0o022, uid=os.getuid(), gid=os.getgid(),
                      owner="me", submitted_at=TS)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    (tmp_path / "state" / "runs").mkdir(parents=True, mode=0o700)
    made = Layout(tmp_path / "state")
    yield made
    made.close()


def test_a_created_run_is_read_back_through_its_run_paths(layout: Layout) -> None:
    layout.create_run(RUN, submission())
    assert layout.run_ids() == [RUN]
    assert layout.read_submission(RUN) == submission()
    AppendLog(layout.events(RUN), 0).append(ev.encode_line(SAMPLES[0]))
    assert read_log(layout.events(RUN), repair=False).events == SAMPLES[:1]
    fd = layout.open_log_for_step(RUN, "a", 1)
    os.close(fd)
    assert (layout.runs / RUN / "logs" / "a.1.log").is_file()
    assert os.fspath(layout.events(RUN)) == str(layout.runs / RUN / "events.jsonl")
    assert layout.events(RUN).name == "events.jsonl"


@pytest.mark.parametrize("where", ["run dir", "logs", "file"])
def test_a_symlink_at_any_level_under_runs_is_refused(
        layout: Layout, tmp_path: Path, where: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "logs").mkdir(parents=True)
    (elsewhere / "events.jsonl").write_bytes(image(SAMPLES))
    run_dir = layout.runs / RUN
    if where == "run dir":
        run_dir.symlink_to(elsewhere)
    else:
        run_dir.mkdir()
        if where == "logs":
            (run_dir / "logs").symlink_to(elsewhere / "logs")
            (run_dir / "events.jsonl").write_bytes(b"")
        else:
            (run_dir / "logs").mkdir()
            (run_dir / "events.jsonl").symlink_to(elsewhere / "events.jsonl")
    ops = {
        "read": lambda: read_log(layout.events(RUN), repair=True),
        "append": lambda: AppendLog(layout.events(RUN), 0).append(b"x\n"),
        "submission": lambda: layout.read_submission(RUN),
        "log": lambda: os.close(layout.open_log_for_step(RUN, "a", 1)),
    }
    behind = {"run dir": list(ops), "logs": ["log"], "file": ["read", "append"]}[where]
    for name in behind:
        with pytest.raises(OSError) as raised:
            ops[name]()
        assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR), name
    assert list((elsewhere / "logs").iterdir()) == []
    assert (elsewhere / "events.jsonl").read_bytes() == image(SAMPLES)


def test_malformed_run_ids_never_become_paths(layout: Layout) -> None:
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            layout.events(bad)


def test_check_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "runs").mkdir(parents=True, mode=0o700)
    os.chmod(state, 0o700)
    check_state_dir(state, system=False)
    check_state_dir(state, system=os.geteuid() == 0)
    os.chmod(state, 0o770)  # a group may write a user daemon's state dir, not a system one's
    check_state_dir(state, system=False)
    with pytest.raises(UnsafeStateDir, match="writable by its group"):
        check_state_dir(state, system=True)
    os.chmod(state, 0o707)
    with pytest.raises(UnsafeStateDir, match=r"writable by others \(mode 0707\)"):
        check_state_dir(state, system=False)
    os.chmod(state, 0o700)
    os.chmod(state / "runs", 0o703)
    with pytest.raises(UnsafeStateDir, match="runs is writable by others"):
        check_state_dir(state, system=False)
    os.rmdir(state / "runs")
    (state / "runs").symlink_to(tmp_path)
    with pytest.raises(UnsafeStateDir, match="runs is a symlink"):
        check_state_dir(state, system=False)


def test_discard_unacknowledged_keeps_runs_and_what_it_is_told_to(layout: Layout) -> None:
    layout.create_run(RUN, submission())  # no first event yet: a crashed submit
    acked = RUN[:-1] + "2"
    layout.create_run(acked, submission())
    AppendLog(layout.events(acked), 0).append(ev.encode_line(SAMPLES[0]))
    intent = RUN[:-1] + "3"
    layout.create_run(intent, submission())

    assert discard_unacknowledged(layout, keep={intent}) == [RUN]
    assert layout.run_ids() == [acked, intent]
    layout.remove_run(acked)  # never a run with a committed event, whoever asks
    assert layout.run_ids() == [acked, intent]
    layout.remove_run(intent)
    assert layout.run_ids() == [acked]
