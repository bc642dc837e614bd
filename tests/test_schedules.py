"""The pure slot logic of schedules (issue 13, prove-it 5), with an injected clock:
DST in Europe/Berlin and America/New_York, end of month, leap day, catch-up, overlap."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wfd import schedules as s
from wfd.schedules import Decision, Policy, ScheduleError, Timing

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


def at(zone: str, *parts: int, fold: int = 0) -> float:
    return dt.datetime(*parts, tzinfo=ZoneInfo(zone), fold=fold).timestamp()


def wall(zone: str, epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")


def cron(expr: str, zone: str = "UTC", anchor: float = 0.0) -> Timing:
    return Timing(s.cron_expression(expr), None, zone, anchor)


def walls(timing: Timing, after: float, count: int) -> list[str]:
    slots = s.slots_after(timing, after)
    return [wall(timing.tz, next(slots)) for _ in range(count)]


# ---- DST ---------------------------------------------------------------------------


@pytest.mark.parametrize(("zone", "day"), [(BERLIN, (2026, 3, 29)), (NEW_YORK, (2026, 3, 8))])
def test_a_slot_in_the_skipped_hour_fires_once(zone: str, day: tuple[int, int, int]) -> None:
    before = at(zone, *day, 0, 0)
    # 02:30 does not exist that day: it fires once, right after the gap
    y, m, d = day
    assert walls(cron("30 2 * * *", zone), before - 86400, 3)[1:] == [
        wall(zone, at(zone, y, m, d, 3, 0)), wall(zone, at(zone, y, m, d + 1, 2, 30))]
    # every 15 minutes: the skipped hour's four slots are one, at 03:00
    got = walls(cron("*/15 * * * *", zone), at(zone, *day, 1, 30), 4)
    assert [w[11:16] for w in got] == ["01:45", "03:00", "03:15", "03:30"]


@pytest.mark.parametrize(("zone", "day"), [(BERLIN, (2026, 10, 25)), (NEW_YORK, (2026, 11, 1))])
def test_a_repeated_hour_does_not_fire_twice(zone: str, day: tuple[int, int, int]) -> None:
    hour = 2 if zone == BERLIN else 1  # the wall hour that happens twice
    timing = cron(f"30 {hour} * * *", zone)
    slots = list(_take(s.slots_after(timing, at(zone, *day, 0, 0)), 2))
    assert slots[0] == at(zone, *day, hour, 30, fold=0)  # the first 02:30, summer time
    assert slots[1] - slots[0] == 86400 + 3600  # next day's, not the second 02:30
    every_half = list(_take(s.slots_after(cron("*/30 * * * *", zone),
                                          at(zone, *day, hour - 1, 45)), 4))
    stamps = [wall(zone, x) for x in every_half]
    assert [x[11:16] for x in stamps] == [f"{hour:02}:00", f"{hour:02}:30",
                                          f"{hour + 1:02}:00", f"{hour + 1:02}:30"]
    # the second pass through the hour has no slots: 1 h of real time between 02:30 and 03:00
    assert every_half[2] - every_half[1] == 1800 + 3600


def test_every_ignores_dst() -> None:
    anchor = at(BERLIN, 2026, 3, 29, 1, 0)
    timing = Timing(None, 3600.0, BERLIN, anchor)
    got = walls(timing, anchor, 3)
    assert [w[11:16] for w in got] == ["03:00", "04:00", "05:00"]  # 02:00 does not exist


# ---- calendar edges ----------------------------------------------------------------


def test_end_of_month_and_leap_day() -> None:
    zone = BERLIN
    assert walls(cron("0 12 31 * *", zone), at(zone, 2027, 1, 1), 3) == [
        "2027-01-31 12:00 CET", "2027-03-31 12:00 CEST", "2027-05-31 12:00 CEST"]
    assert walls(cron("0 0 29 2 *", zone), at(zone, 2026, 1, 1), 2) == [
        "2028-02-29 00:00 CET", "2032-02-29 00:00 CET"]
    assert walls(cron("@monthly", zone), at(zone, 2028, 2, 15), 2) == [
        "2028-03-01 00:00 CET", "2028-04-01 00:00 CEST"]
    # a daily job across the leap day
    assert walls(cron("@daily", "UTC"), at("UTC", 2028, 2, 28, 1), 2) == [
        "2028-02-29 00:00 UTC", "2028-03-01 00:00 UTC"]


# ---- specs ------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "message"), [
    ("61 * * * *", "bad minute field '61' (field 1)"),
    ("* 25 * * *", "bad hour field '25' (field 2)"),
    ("* * 32 * *", "bad day-of-month field '32' (field 3)"),
    ("* * * 13 *", "bad month field '13' (field 4)"),
    ("* * * * 9", "bad day-of-week field '9' (field 5)"),
    ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
    ("@dayly", "unknown nickname '@dayly'"),
])
def test_bad_cron_names_the_field(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError) as info:
        s.cron_expression(expr)
    assert message in str(info.value) and repr(expr) in str(info.value)


def test_nicknames_and_zones() -> None:
    assert s.cron_expression("@hourly") == "0 * * * *"
    assert s.cron_expression(" 0  3 * * 1-5 ") == "0 3 * * 1-5"
    for bad in ("Mars/Olympus", "../../etc/passwd", "", "/etc/localtime"):
        with pytest.raises(ScheduleError, match="unknown time zone"):
            s.zone(bad)
    s.zone("America/New_York")
    for bad in ("", "-x", "a b", "x" * 65, "é"):
        with pytest.raises(ScheduleError, match="bad schedule name"):
            s.check_name(bad)
    s.check_name("nightly.etl-2")


# ---- decisions --------------------------------------------------------------------

EVERY_MIN = Timing(None, 60.0, "UTC", 1_000_000.0)


def decide(now: float, last: float | None = None, busy: bool = False,
           queued: float | None = None, **policy: object) -> Decision:
    return s.decide(EVERY_MIN, Policy(**policy), last, now, busy, queued)  # type: ignore[arg-type]


def slot(k: int) -> float:
    return EVERY_MIN.anchor + 60 * k


def test_on_time_slot_fires_once() -> None:
    assert decide(slot(1) - 1).empty
    d = decide(slot(1) + 0.2)
    assert d.fire == [slot(1)] and not d.skipped and d.next_at == slot(2)
    assert decide(slot(1) + 5, last=slot(1)).empty  # decided already: never again


def test_catch_up_after_downtime() -> None:
    now = slot(5) + 40  # slots 1..5 missed (40 s late is over half the period)
    assert decide(now, catch_up="none").fire == []
    assert decide(now, catch_up="none").skipped == [(slot(1), slot(5), s.MISSED)]
    latest = decide(now, catch_up="latest")
    assert latest.fire == [slot(5)] and latest.skipped == [(slot(1), slot(4), s.MISSED)]
    every = decide(now, catch_up="all")
    assert every.fire == [slot(k) for k in range(1, 6)] and not every.skipped
    bounded = decide(slot(25) + 40, catch_up="all", max_catch_up=3)
    assert bounded.fire == [slot(23), slot(24), slot(25)]
    assert bounded.skipped == [(slot(1), slot(22), s.MISSED_OVER_LIMIT)]
    # back just in time for slot 6: the missed ones per policy, then the current one
    assert decide(slot(6) + 1, catch_up="latest").fire == [slot(5), slot(6)]


def test_a_long_downtime_is_counted_not_listed() -> None:
    timing = Timing(None, 1.0, "UTC", 0.0)
    d = s.decide(timing, Policy("all", 10, "allow"), None, 365 * 86400 + 0.9, False, None)
    assert d.fire == [365 * 86400 - 9.0 + k for k in range(10)]
    assert d.skipped == [(1.0, 365 * 86400 - 10.0, s.MISSED_OVER_LIMIT)]


def test_overlap() -> None:
    now = slot(1) + 0.1
    assert decide(now, busy=True, overlap="allow").fire == [slot(1)]
    skip = decide(now, busy=True, overlap="skip")
    assert skip.fire == [] and skip.skipped == [(slot(1), slot(1), s.OVERLAP_SKIP)]
    queue = decide(now, busy=True, overlap="queue")
    assert queue.fire == [] and queue.queued == slot(1) and not queue.skipped
    full = decide(slot(2) + 0.1, last=slot(1), busy=True, queued=slot(1), overlap="queue")
    assert full.queued is None and full.skipped == [(slot(2), slot(2), s.OVERLAP_QUEUE_FULL)]
    assert decide(now, busy=False, overlap="skip").fire == [slot(1)]


def test_paused_range() -> None:
    assert s.skip_paused(EVERY_MIN, slot(2), slot(7) + 3) == (slot(3), slot(7))
    assert s.skip_paused(EVERY_MIN, slot(2), slot(2) + 30) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 400.0), min_size=1, max_size=30),
       st.sampled_from(s.CATCH_UP), st.integers(1, 5), st.sampled_from(s.OVERLAP),
       st.booleans())
def test_every_slot_decided_once(gaps: list[float], catch_up: str, limit: int, overlap: str,
                                 busy: bool) -> None:
    """Whatever the wake-ups, each due slot is fired, queued or skipped exactly once."""
    policy = Policy(catch_up, limit, overlap)
    now, last, seen = EVERY_MIN.anchor, None, []
    for gap in gaps:
        now += gap
        d = s.decide(EVERY_MIN, policy, last, now, busy, None)
        decided = d.fire + ([d.queued] if d.queued is not None else [])
        for first, end, _ in d.skipped:
            decided += [x for x in _slots_in(first, end)]
        decided.sort()
        seen += decided
        if decided:
            last = decided[-1]
    expected = _slots_in(slot(1), EVERY_MIN.anchor + 60 * ((now - EVERY_MIN.anchor) // 60))
    assert seen == expected


def _slots_in(first: float, last: float) -> list[float]:
    return [first + 60 * k for k in range(int((last - first) // 60) + 1)] if last >= first else []


def _take(it, n):
    for _ in range(n):
        yield next(it)
