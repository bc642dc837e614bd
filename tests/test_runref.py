"""Short run references resolved by the pure `wfd.runref.resolve` (issue 14)."""

from __future__ import annotations

import pytest

from wfd.errors import EXIT_USAGE, UsageError
from wfd.runref import AmbiguousRef, Candidate, resolve

RUNS = [  # oldest first, as the daemon gives them
    Candidate("20261125T095852Z-0a1b2aaa", "etl"),
    Candidate("20261125T100000Z-0a1b3bbb", "build"),
    Candidate("20261125T100500Z-77c00ccc", "etl"),
    Candidate("20261126T080000Z-ffe01ddd", "etl"),
    Candidate("20261126T090000Z-12345eee", "team@x"),
]


def test_whole_id() -> None:
    assert resolve("20261125T100000Z-0a1b3bbb", RUNS) == "20261125T100000Z-0a1b3bbb"


def test_unique_prefix_of_the_id_or_of_its_random_part() -> None:
    assert resolve("20261126T08", RUNS) == "20261126T080000Z-ffe01ddd"
    assert resolve("77c0", RUNS) == "20261125T100500Z-77c00ccc"
    assert resolve("ffe01d", RUNS) == "20261126T080000Z-ffe01ddd"
    assert resolve("0a1b2", RUNS) == "20261125T095852Z-0a1b2aaa"


def test_last_and_back_from_the_newest() -> None:
    assert resolve("@last", RUNS) == "20261126T090000Z-12345eee"
    assert resolve("@-1", RUNS) == "20261126T090000Z-12345eee"
    assert resolve("@-5", RUNS) == "20261125T095852Z-0a1b2aaa"
    assert resolve("etl@last", RUNS) == "20261126T080000Z-ffe01ddd"
    assert resolve("etl@-2", RUNS) == "20261125T100500Z-77c00ccc"
    assert resolve("etl@-3", RUNS) == "20261125T095852Z-0a1b2aaa"
    assert resolve("team@x@last", RUNS) == "20261126T090000Z-12345eee"  # last @ splits


def test_ambiguous_prefix_lists_the_candidates_newest_first() -> None:
    with pytest.raises(AmbiguousRef) as caught:
        resolve("0a1b", RUNS)
    assert caught.value.exit_code == EXIT_USAGE
    assert caught.value.matches == ["20261125T100000Z-0a1b3bbb", "20261125T095852Z-0a1b2aaa"]
    lines = caught.value.message.splitlines()
    assert lines[0] == "run reference '0a1b' matches 2 runs; give more characters:"
    assert lines[1:] == ["  20261125T100000Z-0a1b3bbb  build", "  20261125T095852Z-0a1b2aaa  etl"]
    with pytest.raises(AmbiguousRef):
        resolve("2026", RUNS)  # a prefix of every id


def test_ambiguous_list_is_cut_at_ten() -> None:
    many = [Candidate(f"20261125T1000{i:02d}Z-abcd0{i:03x}", "x") for i in range(30)]
    with pytest.raises(AmbiguousRef) as caught:
        resolve("abcd", many)
    lines = caught.value.message.splitlines()
    assert len(lines) == 12 and lines[-1] == "  ... and 20 more"
    assert len(caught.value.matches) == 30


@pytest.mark.parametrize(("ref", "words"), [
    ("abcd", "no such run: abcd"),
    ("20200101T000000Z-00000abc", "no such run: 20200101T000000Z-00000abc"),
    ("abc", "too short"),
    ("nope@last", "no runs of workflow 'nope'"),
    ("build@-2", "there are only 1 runs of workflow 'build'"),
    ("@-6", "there are only 5 runs of yours"),
    ("../etc", "malformed run id '../etc'"),
    ("a" * 65, "malformed run id"),
    ("has space", "malformed run id"),
    ("é", "malformed run id"),
    ("@-0", "malformed run id"),
    ("@first", "malformed run id"),
])
def test_unknown_and_malformed(ref: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        resolve(ref, RUNS)
    assert words in caught.value.message
    assert not isinstance(caught.value, AmbiguousRef)


def test_no_runs_at_all() -> None:
    with pytest.raises(UsageError, match="no runs of yours"):
        resolve("@last", [])


def test_a_long_reference_is_cut_in_the_message() -> None:
    with pytest.raises(UsageError) as caught:
        resolve("x" * 100_000 + "@last", RUNS)
    assert len(caught.value.message) < 300  # not 100,000
