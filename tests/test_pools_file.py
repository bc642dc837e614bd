"""pools.json: a limit set at run time wins over `--pool` until that option changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from wfd.pools import BadPools, PoolLimits, parse_option


def test_a_set_limit_wins_until_the_option_changes(tmp_path: Path) -> None:
    first = PoolLimits(tmp_path, {"db": 2})
    assert (first.limits, first.source("db")) == ({"db": 2}, "option")
    first.set("db", 5)
    first.set("net", 1)  # a pool the command line never named

    same = PoolLimits(tmp_path, {"db": 2})
    assert same.limits == {"db": 5, "net": 1}
    assert (same.source("db"), same.source("net")) == ("set", "set")
    changed = PoolLimits(tmp_path, {"db": 3})
    assert changed.limits == {"db": 3, "net": 1} and changed.source("db") == "option"
    back = PoolLimits(tmp_path, {"db": 2})  # forgotten for good, not only while it differs
    assert back.limits == {"db": 2, "net": 1} and back.source("db") == "option"


def test_an_option_dropped_is_a_change_too(tmp_path: Path) -> None:
    PoolLimits(tmp_path, {"db": 2}).set("db", 5)
    assert PoolLimits(tmp_path, {}).limits == {}


def test_a_damaged_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "pools.json").write_text('{"pools": {"db": {"limit": -3}}}')
    with pytest.raises(BadPools, match="limit must be an integer from 0"):
        PoolLimits(tmp_path, {})
    (tmp_path / "pools.json").write_text("{not json")
    with pytest.raises(BadPools, match="fix or remove it"):
        PoolLimits(tmp_path, {})


@pytest.mark.parametrize("text", ["db", "db=", "=1", "db=x", "db=-1", "a b=1", "db=1.5",
                                  "db=1000001"])
def test_bad_options(text: str) -> None:
    with pytest.raises(BadPools):
        parse_option(text)


def test_good_option() -> None:
    assert parse_option("db.main-2=0") == ("db.main-2", 0)
