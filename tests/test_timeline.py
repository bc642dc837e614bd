"""`wfctl timeline`: attempts, retries and waits from the events, a terminal Gantt at a
fixed width (exact text), and the command against a real run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, write_workflow

from wfctl import timeline as tl
from wfd import events as ev
from wfd.state import RunStatus, StepStatus

T0 = 1_790_000_000.0  # any fixed moment: everything below is relative to it


class Log:
    """Events of one story, seq and ts filled in; `at` is seconds after T0."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def add(self, kind: type, at: float, **fields: object) -> None:
        self.events.append(kind(seq=len(self.events) + 1, ts=ev.format_ts(T0 + at), **fields))


def story() -> Log:
    """`fetch` runs 0-2 s; `upload` waits for a slot 2-3 s, fails 3-4 s, waits to retry
    4-6 s, succeeds 6-9 s; `report` runs 9-10 s; the run ends at 10 s."""
    log = Log()
    log.add(ev.RunCreated, 0, run_id="r", name="demo", owner="alice", owner_uid=1000)
    log.add(ev.StepReady, 0, step="fetch")
    log.add(ev.AttemptClaimed, 0, step="fetch", attempt=1)
    log.add(ev.AttemptSucceeded, 2, step="fetch", attempt=1)
    log.add(ev.StepReady, 2, step="upload")
    log.add(ev.AttemptClaimed, 3, step="upload", attempt=1)
    log.add(ev.AttemptFailed, 4, step="upload", attempt=1, exit_code=75,
            error="exited with status 75", retry_at=ev.format_ts(T0 + 6))
    log.add(ev.RetryDue, 6, step="upload")
    log.add(ev.AttemptClaimed, 6, step="upload", attempt=2)
    log.add(ev.AttemptSucceeded, 9, step="upload", attempt=2)
    log.add(ev.StepReady, 9, step="report")
    log.add(ev.AttemptClaimed, 9, step="report", attempt=1)
    log.add(ev.AttemptSucceeded, 10, step="report", attempt=1)
    log.add(ev.RunFinished, 10, state="SUCCEEDED")
    return log


def status(state: str = "SUCCEEDED", end: float | None = 10,
           steps: dict[str, tuple[str, int]] | None = None) -> RunStatus:
    steps = steps or {"fetch": ("SUCCEEDED", 1), "upload": ("SUCCEEDED", 2),
                      "report": ("SUCCEEDED", 1)}
    return RunStatus(
        "20261125T095852Z-7f3a9c01", "demo", "alice", state, ev.format_ts(T0),
        None if end is None else ev.format_ts(T0 + end), None,
        {sid: StepStatus(s, n, 0, None, None, None) for sid, (s, n) in steps.items()},
    )


def test_segments_show_attempts_retries_and_waits() -> None:
    segs = tl.segments(story().events)
    upload = [(s.kind, s.start - T0, s.end - T0, s.attempt, s.outcome)
              for s in segs if s.step == "upload"]
    assert upload == [
        ("queued", 2, 3, 0, ""),
        ("attempt", 3, 4, 1, "failed"),
        ("retry_wait", 4, 6, 0, ""),
        ("attempt", 6, 9, 2, "succeeded"),
    ]


def test_open_segments_of_a_live_run_run_to_now() -> None:
    log = Log()
    log.add(ev.RunCreated, 0, run_id="r", name="demo", owner="alice", owner_uid=1000)
    log.add(ev.StepReady, 0, step="a")
    log.add(ev.AttemptClaimed, 1, step="a", attempt=1)
    log.add(ev.AttemptStarted, 1, step="a", attempt=1, pid=10, start_time=1.0, boot_id="b")
    log.add(ev.StepReady, 1, step="b")
    segs = tl.segments(log.events)
    assert [(s.step, s.kind, s.end, s.outcome) for s in segs] == [
        ("a", "queued", T0 + 1, ""), ("a", "attempt", None, "running"),
        ("b", "queued", None, "")]
    lines = tl.chart(status("RUNNING", None, {"a": ("RUNNING", 1), "b": ("READY", 0)}),
                     segs, now=T0 + 4, width=40, cs=tl.ASCII)
    # 5 columns a second: a queued 0-1 s, running 1-4 s (now); b queued since 1 s
    assert lines[2] == "a    -----##############> RUNNING      1"
    assert lines[3] == "b         --------------- READY        0"


def test_cancel_and_interruption_are_marked() -> None:
    log = Log()
    log.add(ev.RunCreated, 0, run_id="r", name="demo", owner="alice", owner_uid=1000)
    log.add(ev.StepReady, 0, step="a")
    log.add(ev.AttemptClaimed, 0, step="a", attempt=1)
    log.add(ev.AttemptInterrupted, 2, step="a", attempt=1, reason="daemon stopped")
    log.add(ev.AttemptClaimed, 3, step="a", attempt=2)
    log.add(ev.RunCancelRequested, 5)
    log.add(ev.StepCancelled, 6, step="a", attempt=2, exit_code=-15)
    log.add(ev.RunFinished, 6, state="CANCELLED")
    segs = tl.segments(log.events)
    assert [(s.kind, s.outcome) for s in segs] == [
        ("attempt", "interrupted"), ("queued", ""), ("attempt", "cancelled")]
    lines = tl.chart(status("CANCELLED", 6, {"a": ("CANCELLED", 2)}), segs, T0 + 100,
                     width=40, cs=tl.ASCII)
    assert lines[2] == "a    ######!---#########c CANCELLED    2"  # 3.3 columns a second


def test_chart_at_a_fixed_width() -> None:
    lines = tl.chart(status(), tl.segments(story().events), now=T0 + 99, width=60)
    assert lines == [
        "run 20261125T095852Z-7f3a9c01  demo  SUCCEEDED  10s",
        # 38 columns for 10 s: 3.8 a second
        "STEP   0s                5s               10s STATE      ATT",
        "fetch  ████████                               SUCCEEDED    1",
        "upload         ░░░████x······█████████████    SUCCEEDED    2",
        "report                                   ████ SUCCEEDED    1",
        "█ attempt  x failed  ! interrupted  c cancelled  ▶ running",
        "░ ready, waiting for a slot  · retry wait",
    ]
    assert all(len(line) <= 60 for line in lines)


def test_chart_fits_every_width_and_cuts_long_ids() -> None:
    long_status = status(steps={"fetch": ("SUCCEEDED", 1), "u" * 90: ("SUCCEEDED", 2),
                                "report": ("SUCCEEDED", 1)})
    events = [e if getattr(e, "step", "") != "upload" else
              type(e)(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "step": "u" * 90})
              for e in story().events]
    for width in (40, 41, 57, 80, 133, 250):
        lines = tl.chart(long_status, tl.segments(events), T0 + 99, width)
        assert all(len(line) <= width for line in lines), (width, lines)
        assert any(line.startswith("u" * 8) and "…" in line for line in lines)
        assert any("x" in line for line in lines[2:5])  # the failed attempt never vanishes


def test_colour_only_when_asked() -> None:
    segs = tl.segments(story().events)
    plain = tl.chart(status(), segs, T0 + 99, 60)
    coloured = tl.chart(status(), segs, T0 + 99, 60, colour=True)
    assert "\x1b[" not in "".join(plain)
    assert "\x1b[31mx\x1b[0m" in coloured[3]  # the failure in red


def test_gantt_svg_has_a_bar_per_attempt() -> None:
    svg = tl.gantt_svg(status(), tl.segments(story().events), T0 + 99)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if "attempt" in r.get("class", "")]
    assert [(r.get("data-step"), r.get("class")) for r in bars] == [
        ("fetch", "seg attempt succeeded"), ("upload", "seg attempt failed"),
        ("upload", "seg attempt succeeded"), ("report", "seg attempt succeeded")]
    waits = [r.get("class") for r in root.iter(f"{ns}rect") if "attempt" not in r.get("class")]
    assert sorted(waits) == ["seg queued ", "seg retry_wait "]


RETRYING = {"name": "flaky", "steps": [
    {"id": "first", "command": "true"},
    {"id": "flaky", "command": "test -e flag || { touch flag; exit 75; }",
     "depends_on": ["first"], "retries": 1, "backoff": {"initial": 1.5}},
    {"id": "last", "command": "true", "depends_on": ["flaky"]},
]}


def test_timeline_of_a_real_run(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, RETRYING), "--wait")
    done = d.wfctl("timeline", run_id, "--width", "72")
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert all(len(line) <= 72 for line in lines)
    assert lines[0].startswith(f"run {run_id}  flaky  SUCCEEDED")
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert list(rows) == ["first", "flaky", "last"]
    # the failed attempt, the retry wait (1.5 s of a ~1.6 s run) and the second attempt
    assert "x··" in rows["flaky"] and rows["flaky"].rstrip().endswith("SUCCEEDED    2")
    assert rows["flaky"].index("x") < rows["flaky"].rindex("█")  # then attempt 2
    assert rows["last"].index("█") > rows["flaky"].index("x")
    # the replay's events, which the chart is drawn from, agree
    events = json.loads(d.wfctl("replay", run_id, "--json").stdout)["events"]
    assert [e["type"] for e in events if e.get("step") == "flaky"].count("AttemptClaimed") == 2


def test_timeline_errors(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    done = d.wfctl("timeline", "20261125T095852Z-00000000")
    assert done.returncode == 2
    assert done.stderr == "wfctl: no such run: 20261125T095852Z-00000000\n"
    done = d.wfctl("timeline", "x", "--width", "12")
    assert done.returncode == 2 and "at least 40 columns" in done.stderr
