"""The workflow fields of pools and one-run-at-a-time: `pool`, `concurrency`, `on_busy`."""

from __future__ import annotations

import json

import pytest

from wfd.errors import WorkflowInvalid
from wfd.workflow import parse_workflow


def parse(doc: dict) -> object:
    return parse_workflow(json.dumps(doc), "wf")


def problems(doc: dict) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse(doc)
    return info.value.problems


def test_pool_from_defaults_a_step_overrides_or_clears_it() -> None:
    wf = parse({"defaults": {"pool": "db"}, "steps": [
        {"id": "a", "command": "true"},
        {"id": "b", "command": "true", "pool": "net"},
        {"id": "c", "command": "true", "pool": None},
    ]})
    assert [s.pool for s in wf.steps] == ["db", "net", None]  # type: ignore[attr-defined]


def test_no_pool_no_concurrency_by_default() -> None:
    wf = parse({"steps": [{"id": "a", "command": "true"}]})
    assert wf.steps[0].pool is None  # type: ignore[attr-defined]
    assert (wf.concurrency, wf.on_busy) == (None, "queue")  # type: ignore[attr-defined]


def test_concurrency_and_on_busy() -> None:
    wf = parse({"concurrency": 1, "on_busy": "skip", "steps": [{"id": "a", "command": "x"}]})
    assert (wf.concurrency, wf.on_busy) == (1, "skip")  # type: ignore[attr-defined]


def test_every_bad_value_is_reported_with_its_path() -> None:
    found = problems({"concurrency": 0, "on_busy": "wait", "defaults": {"pool": ""},
                      "steps": [{"id": "a", "command": "x", "pool": "a b"},
                                {"id": "b", "command": "x", "pool": 3}]})
    assert found == [
        "$.concurrency: expected an integer from 1 to 1000000 or null, got 0",
        '$.on_busy: expected "queue" or "skip", got "wait"',
        '$.defaults.pool: expected a pool name (matching ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$) '
        'or null, got ""',
        '$.steps[0].pool: expected a pool name (matching ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$) '
        'or null, got "a b"',
        '$.steps[1].pool: expected a pool name (matching ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$) '
        'or null, got 3',
    ]
