"""Durations as people write them: `15m`, `2h30m`, `1d`, `1s`, `1.5h`; one parser.

A duration is one or more `NUMBER UNIT` parts, units `d`, `h`, `m`, `s` in that
order, each at most once; a bare number is seconds. Pure: `parse_duration`
returns seconds or raises `ValueError` with a message that says what is wrong
and what is expected, for wfctl to print as it is.
"""

from __future__ import annotations

import re

UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([a-z]?)")
EXPECTED = "expected a duration like 30s, 15m, 2h30m or 1d"


def parse_duration(text: str) -> float:
    """Seconds in `text`; ValueError with the reason if it is not a positive duration."""
    if not text or text != text.strip():
        raise ValueError(f"{text!r}: {EXPECTED}")
    total, pos, last_rank = 0.0, 0, -1
    order = list(UNITS)
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise ValueError(f"{text!r}: unexpected {text[pos:]!r}; {EXPECTED}")
        number, unit = match.groups()
        if not unit and match.end() < len(text):
            raise ValueError(f"{text!r}: a unit (d, h, m, s) must follow {number}")
        unit = unit or "s"
        if unit not in UNITS:
            raise ValueError(f"{text!r}: unknown unit {unit!r} (use d, h, m or s)")
        rank = order.index(unit)
        if rank <= last_rank:
            raise ValueError(f"{text!r}: units must come once each, largest first (d h m s)")
        last_rank = rank
        total += float(number) * UNITS[unit]
        pos = match.end()
    if total <= 0:
        raise ValueError(f"{text!r}: a duration must be more than 0")
    return total


def format_duration(seconds: float) -> str:
    """The inverse for whole seconds: 9000 -> `2h30m`; a fraction stays in the seconds."""
    whole, rest = divmod(seconds, 1)
    parts, left = [], int(whole)
    for unit, size in UNITS.items():
        count, left = divmod(left, int(size))
        if count:
            parts.append(f"{count}{unit}")
    if rest:
        parts = parts[:-1] if parts and parts[-1].endswith("s") else parts
        parts.append(f"{int(whole) % 60 + rest:g}s")
    return "".join(parts) or "0s"


def parse_since(text: str, now: float) -> float:
    """A point in time (epoch seconds): a duration back from `now` (`2h`: two hours ago)
    or a date or time (`2026-11-25`, `2026-11-25T14:00`, local time unless it names a
    zone, `...Z` or `+01:00`); ValueError saying what is expected."""
    from datetime import datetime

    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    stamp = text.strip()
    if stamp.endswith(("Z", "z")):
        stamp = stamp[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        raise ValueError(f"{text!r}: expected a duration (2h, 7d) or a time (2026-11-25, "
                         "2026-11-25T14:00)") from None
    return when.timestamp()  # a naive time is local time
