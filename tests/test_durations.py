"""The one duration parser (issue 13): every form, and clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wfd.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1), ("15m", 900), ("2h30m", 9000), ("1d", 86400), ("1d2h3m4s", 93784),
    ("90", 90), ("1.5h", 5400), ("0.5s", 0.5), ("2h", 7200), ("10m30s", 630),
])
def test_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected a duration like 30s, 15m, 2h30m or 1d"),
    ("m", "unexpected 'm'"),
    ("5x", "unknown unit 'x'"),
    ("30m2h", "units must come once each, largest first"),
    ("1h1h", "units must come once each"),
    ("0s", "must be more than 0"),
    ("-5m", "unexpected '-5m'"),
    (" 5m", "expected a duration"),
    ("5 m", "a unit (d, h, m, s) must follow 5"),
    ("5M", "a unit (d, h, m, s) must follow 5"),
])
def test_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert message in str(info.value) and repr(text) in str(info.value)


@given(st.integers(1, 10**7))
def test_format_parses_back(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
