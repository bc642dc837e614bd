"""A run's attempts over time: segments from its events, a terminal Gantt, an SVG Gantt.

Pure: events (as the daemon's `Replay` or `Watch` gives them), the run's
status and `now` in, segments and text out; no I/O, no clock.

A step's row shows, in time order:
- `queued`: READY, waiting for a free slot (from StepReady, RetryDue or an
  interruption to the next AttemptClaimed);
- `attempt`: claimed to its end, with its outcome (succeeded, failed,
  interrupted by a daemon stop, cancelled, or still running);
- `retry_wait`: RETRY_WAIT, from a failed attempt to its RetryDue.
A segment still open at the end of the events runs to `now` while the run is
RUNNING, else to the run's end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from wfd import events as ev

if TYPE_CHECKING:
    from wfd.state import RunStatus

MIN_WIDTH = 40

ATTEMPT = "attempt"
QUEUED = "queued"
RETRY_WAIT = "retry_wait"

SUCCEEDED = "succeeded"
FAILED = "failed"
INTERRUPTED = "interrupted"
CANCELLED = "cancelled"
RUNNING = "running"


@dataclass(frozen=True)
class Segment:
    """One stretch of a step's time; `end` None while it goes on."""

    step: str
    kind: str
    start: float
    end: float | None
    attempt: int = 0
    outcome: str = ""


class _Open:
    """Segments in progress while the events are read."""

    def __init__(self) -> None:
        self.done: list[Segment] = []
        self.attempt: dict[str, tuple[int, float]] = {}
        self.wait: dict[str, tuple[str, float]] = {}  # step -> (kind, since)

    def close_wait(self, step: str, at: float) -> None:
        kind, since = self.wait.pop(step, ("", 0.0))
        if kind and at > since:  # a wait of no time (claimed at once) is no wait
            self.done.append(Segment(step, kind, since, at))

    def open_wait(self, step: str, kind: str, at: float) -> None:
        self.close_wait(step, at)
        self.wait[step] = (kind, at)

    def end_attempt(self, step: str, at: float, outcome: str) -> None:
        number, since = self.attempt.pop(step, (0, at))
        self.done.append(Segment(step, ATTEMPT, since, at, number, outcome))


def decode(lines: Iterable[str]) -> list[ev.Event]:
    """A log's lines (as `Replay` sends them) as events; a damaged line is left out (the
    reply's `problems` name it)."""
    import msgspec

    events = []
    for line in lines:
        try:
            events.append(ev.json_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return events


def segments(events: Iterable[ev.Event]) -> list[Segment]:
    """Every queued wait, attempt and retry wait the events describe, by start time."""
    state = _Open()
    for event in events:
        at = ev.parse_ts(event.ts)
        kind = type(event)
        step = getattr(event, "step", "")
        if kind in (ev.StepReady, ev.RetryDue):
            state.open_wait(step, QUEUED, at)
        elif kind is ev.AttemptClaimed:
            state.close_wait(step, at)
            state.attempt[step] = (event.attempt, at)  # type: ignore[attr-defined]
        elif kind is ev.AttemptSucceeded:
            state.end_attempt(step, at, SUCCEEDED)
        elif kind is ev.AttemptFailed:
            state.end_attempt(step, at, FAILED)
            state.open_wait(step, RETRY_WAIT, at)
        elif kind is ev.StepFailed:
            state.end_attempt(step, at, FAILED)
        elif kind is ev.AttemptInterrupted:
            state.end_attempt(step, at, INTERRUPTED)
            state.open_wait(step, QUEUED, at)
        elif kind is ev.StepCancelled:
            if step in state.attempt:
                state.end_attempt(step, at, CANCELLED)
            state.close_wait(step, at)
        elif kind is ev.RunResumed:
            for waiting in list(state.wait):
                state.close_wait(waiting, at)
    done = list(state.done)
    done += [Segment(s, ATTEMPT, since, None, n, RUNNING)
             for s, (n, since) in state.attempt.items()]
    done += [Segment(s, kind, since, None) for s, (kind, since) in state.wait.items()]
    return sorted(done, key=lambda seg: (seg.start, seg.kind != ATTEMPT))


def bounds(status: RunStatus, segs: Sequence[Segment], now: float) -> tuple[float, float]:
    """The chart's time span: the run's creation to its end (or `now` while it runs)."""
    starts = [s.start for s in segs]
    t0 = ev.parse_ts(status.created_at) if status.created_at else min(starts, default=now)
    if status.state != "RUNNING" and status.finished_at:
        t1 = ev.parse_ts(status.finished_at)
    elif status.state == "RUNNING":
        t1 = now
    else:  # CORRUPT, or finished with no time: as far as anything is known
        t1 = max([s.end or s.start for s in segs] + [t0])
    return t0, max(t1, t0)


def _end(seg: Segment, t1: float) -> float:
    return t1 if seg.end is None else seg.end


# ---- text ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Charset:
    attempt: str
    running: str
    queued: str
    retry_wait: str
    marks: dict[str, str]  # last cell of an attempt by outcome (SUCCEEDED: none)
    cut: str  # end of a cut step id


UNICODE = Charset("█", "▶", "░", "·",
                  {FAILED: "x", INTERRUPTED: "!", CANCELLED: "c"}, "…")
ASCII = Charset("#", ">", "-", ".", {FAILED: "x", INTERRUPTED: "!", CANCELLED: "c"}, "~")

# ANSI colours by what a cell shows (only when asked for: a terminal without NO_COLOR).
_COLOUR = {SUCCEEDED: "32", FAILED: "31", RUNNING: "33", INTERRUPTED: "35", CANCELLED: "35",
           QUEUED: "34", RETRY_WAIT: "33;2"}


def _nice_step(span: float, columns: int, min_cols: int = 12) -> float:
    """A round tick interval giving at least `min_cols` columns between labels."""
    per_col = span / max(columns, 1)
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600,
                 7200, 10800, 21600, 43200, 86400, 172800, 604800):
        if step / max(per_col, 1e-9) >= min_cols:
            return float(step)
    return max(span, 1.0)


def _short(seconds: float) -> str:
    """Elapsed time for an axis label: `0s`, `1.5s`, `30s`, `2m`, `1h30m`, `2d`."""
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m" + (f"{whole % 60:02d}s" if whole % 60 else "")
    if whole < 86400:
        return f"{whole // 3600}h" + (f"{whole % 3600 // 60:02d}m" if whole % 3600 // 60 else "")
    return f"{whole // 86400}d" + (f"{whole % 86400 // 3600:02d}h" if whole % 86400 // 3600 else "")


def _axis(t0: float, t1: float, columns: int) -> str:
    """Elapsed-time labels at round intervals, none overlapping, the last at the end."""
    cells = [" "] * columns
    span = t1 - t0
    if span <= 0:
        return "0s"
    step = _nice_step(span, columns)
    free = 0
    for k in range(int(span / step) + 1):
        tick = k * step
        col = int(tick / span * (columns - 1))
        text = _short(tick)
        if col >= free and col + len(text) <= columns:
            cells[col:col + len(text)] = text
            free = col + len(text) + 2
    end = _short(span)  # the run's length, at its end, when a tick did not land there
    if free <= columns - len(end) and not "".join(cells).rstrip().endswith(end):
        cells[columns - len(end):] = end
    return "".join(cells).rstrip()


def _paint(cells: list[tuple[str, str]], seg: Segment, t0: float, t1: float, cs: Charset,
           scale: float) -> None:
    columns = len(cells)
    start = (seg.start - t0) * scale
    end = (_end(seg, t1) - t0) * scale
    if seg.kind == ATTEMPT:
        # An attempt always shows, if only as one cell: a retry must be visible.
        first = min(int(start), columns - 1)
        last = max(first, min(int(end - 1e-9) if end > start else first, columns - 1))
        for c in range(first, last + 1):
            cells[c] = (cs.attempt, seg.outcome)
        mark = cs.running if seg.outcome == RUNNING else cs.marks.get(seg.outcome)
        if mark:
            cells[last] = (mark, seg.outcome)
        return
    # A wait shows where it covers cells, and never over an attempt.
    char = cs.queued if seg.kind == QUEUED else cs.retry_wait
    for c in range(max(0, round(start)), min(columns, round(end))):
        if cells[c][0] == " ":
            cells[c] = (char, seg.kind)


def _colour(cells: list[tuple[str, str]]) -> str:
    out = []
    for char, what in cells:
        code = _COLOUR.get(what)
        out.append(f"\x1b[{code}m{char}\x1b[0m" if code and char != " " else char)
    return "".join(out)


def chart(status: RunStatus, segs: Sequence[Segment], now: float, width: int,
          cs: Charset = UNICODE, colour: bool = False) -> list[str]:
    """The terminal Gantt: a header, an axis, one row per step (file order), a legend;
    no line longer than `width` (at least MIN_WIDTH) characters."""
    width = max(width, MIN_WIDTH)
    t0, t1 = bounds(status, segs, now)
    ids = list(status.steps)
    name_w = min(max([len(s) for s in ids] + [4]), max(8, width // 4))
    right_w = 1 + 10 + 1 + 3  # " STATE      ATT"
    columns = width - name_w - 1 - right_w
    scale = columns / (t1 - t0) if t1 > t0 else 0.0
    by_step: dict[str, list[Segment]] = {sid: [] for sid in ids}
    for seg in segs:
        by_step.setdefault(seg.step, []).append(seg)
    head = f"run {status.run_id}  {status.name}  {status.state}  {_short(t1 - t0)}"
    lines = [_fit(head, width, cs),
             f"{'STEP':<{name_w}} {_axis(t0, t1, columns):<{columns}} {'STATE':<10} ATT"]
    for sid, step in status.steps.items():
        cells = [(" ", "")] * columns
        for seg in sorted(by_step.get(sid, []), key=lambda s: s.kind == ATTEMPT):
            _paint(cells, seg, t0, t1, cs, scale)
        name = sid if len(sid) <= name_w else sid[:name_w - 1] + cs.cut
        bar = _colour(cells) if colour else "".join(c for c, _ in cells)
        lines.append(f"{name:<{name_w}} {bar} {step.state[:10]:<10} {step.attempts:>3}")
    legend = (f"{cs.attempt} attempt  {cs.marks[FAILED]} failed  {cs.marks[INTERRUPTED]} "
              f"interrupted  {cs.marks[CANCELLED]} cancelled  {cs.running} running  "
              f"{cs.queued} ready, waiting for a slot  {cs.retry_wait} retry wait")
    lines.extend(_wrap(legend, width))
    return lines


def _fit(text: str, width: int, cs: Charset) -> str:
    return text if len(text) <= width else text[:width - 1] + cs.cut


def _wrap(text: str, width: int) -> list[str]:
    """Legend items (two spaces apart) on as few lines as fit."""
    lines, line = [], ""
    for item in text.split("  "):
        if line and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line}  {item}" if line else item
    return lines + [line] if line else lines


# ---- SVG (the web page's Gantt) ----------------------------------------------------------


SEGMENT_COLOURS = {SUCCEEDED: "#43a047", FAILED: "#e53935", RUNNING: "#f9a825",
                   INTERRUPTED: "#8d6e63", CANCELLED: "#6d4c41", QUEUED: "#90caf9",
                   RETRY_WAIT: "#ffb74d"}
ROW_H = 18
BAR_H = 12
WAIT_H = 4


def gantt_svg(status: RunStatus, segs: Sequence[Segment], now: float, width: int = 1200) -> str:
    """The Gantt as SVG: a row per step, attempts as bars coloured by outcome, waits thin;
    each bar's tooltip names step, attempt, outcome and duration."""
    t0, t1 = bounds(status, segs, now)
    ids = list(status.steps)
    label_w = min(max([len(s) for s in ids] + [4]), 32) * 7.3 + 12
    plot_w = width - label_w - 40  # room for the last tick's label
    scale = plot_w / (t1 - t0) if t1 > t0 else 0.0
    top = 22
    height = top + ROW_H * len(ids) + 8
    row = {sid: i for i, sid in enumerate(ids)}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gantt" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">',
        "<style>text{font:11px ui-monospace,'DejaVu Sans Mono',monospace;fill:#333}"
        ".grid{stroke:#e0e0e0}</style>",
    ]
    step = _nice_step(t1 - t0, int(plot_w / 7.3), 10) if t1 > t0 else 1.0
    for k in range(int((t1 - t0) / step) + 1 if t1 > t0 else 0):
        x = label_w + k * step * scale
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" '
                     f'y2="{height - 8}"/><text x="{x + 2:.1f}" y="{top - 8}">'
                     f"{_short(k * step)}</text>")
    for sid in ids:
        y = top + row[sid] * ROW_H
        shown = sid if len(sid) <= 32 else sid[:31] + "…"
        parts.append(f'<text x="4" y="{y + 13}">{escape(shown)}</text>')
    for seg in sorted(segs, key=lambda s: s.kind == ATTEMPT):
        if seg.step not in row:
            continue
        x = label_w + (seg.start - t0) * scale
        w = max((_end(seg, t1) - seg.start) * scale, 2.0 if seg.kind == ATTEMPT else 0.0)
        if w <= 0:
            continue
        y = top + row[seg.step] * ROW_H
        if seg.kind == ATTEMPT:
            h, dy, colour = BAR_H, (ROW_H - BAR_H) / 2, SEGMENT_COLOURS[seg.outcome]
            tip = f"{seg.step} attempt {seg.attempt}: {seg.outcome}"
        else:
            h, dy, colour = WAIT_H, (ROW_H - WAIT_H) / 2, SEGMENT_COLOURS[seg.kind]
            tip = f"{seg.step}: " + ("ready, waiting for a slot" if seg.kind == QUEUED
                                     else "waiting to retry")
        tip += f", {_short(_end(seg, t1) - seg.start)}"
        parts.append(f'<rect class="seg {seg.kind} {seg.outcome}" data-step={quoteattr(seg.step)}'
                     f' x="{x:.1f}" y="{y + dy:.1f}" width="{w:.1f}" height="{h}" rx="2" '
                     f'fill="{colour}"><title>{escape(tip)}</title></rect>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
