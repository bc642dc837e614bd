"""Tests of wfd.workflow: parsing, every validation message, merging, the DAG."""

from __future__ import annotations

import json
import math
import random

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wfd import workflow as wfmod
from wfd.errors import WorkflowInvalid
from wfd.workflow import (
    STEP_ID_RE,
    Backoff,
    Step,
    Workflow,
    build_workflow,
    env_problems,
    parse_workflow,
)

SPEC_EXAMPLE = """{
  "name": "nightly-etl",
  "max_parallel": 4,
  "env": {"DATA_DIR": "data"},
  "defaults": {"retries": 2, "timeout": 600},
  "steps": [
    {"id": "extract", "command": "./extract.sh > raw.json"},
    {"id": "transform", "command": ["python3", "transform.py"],
     "depends_on": ["extract"], "retries": 3,
     "backoff": {"initial": 1, "factor": 2, "max": 60, "jitter": 0.1},
     "timeout": 120, "env": {"MODE": "full"}, "cwd": "jobs"},
    {"id": "load", "command": "./load.sh", "depends_on": ["transform"]}
  ]
}"""


def parse(doc: object, name: str = "wf") -> Workflow:
    """Parse a Python object written out as JSON."""
    return parse_workflow(json.dumps(doc), name)


def problems(source: object) -> list[str]:
    """The problems reported for a document (an object, or raw str/bytes)."""
    text = source if isinstance(source, (str, bytes)) else json.dumps(source)
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(text, "wf")
    assert info.value.problems, "WorkflowInvalid without problems"
    assert str(info.value) == "\n".join(info.value.problems)
    for p in info.value.problems:
        assert "\n" not in p
    return info.value.problems


def one_step(**fields: object) -> dict[str, object]:
    """A workflow of one step `a` with the given fields added or replaced."""
    return {"steps": [{"id": "a", "command": "true", **fields}]}


def problem(doc: object) -> str:
    """The single problem reported for a document."""
    found = problems(doc)
    assert len(found) == 1, found
    return found[0]


def step_problem(**fields: object) -> str:
    return problem(one_step(**fields))


# ---------------------------------------------------------------------------
# A valid file


def test_spec_example_parses_with_defaults_merged() -> None:
    wf = parse_workflow(SPEC_EXAMPLE, "file-name")
    assert wf.name == "nightly-etl"
    assert wf.max_parallel == 4
    assert wf.env == {"DATA_DIR": "data"}
    extract, transform, load = wf.steps
    assert extract == Step(
        id="extract", command="./extract.sh > raw.json", retries=2, timeout=600.0
    )
    assert transform.command == ("python3", "transform.py")
    assert transform.depends_on == ("extract",)
    assert transform.retries == 3
    assert transform.backoff == Backoff(initial=1.0, factor=2.0, max=60.0, jitter=0.1)
    assert transform.timeout == 120.0
    assert transform.env == {"MODE": "full"}
    assert transform.cwd == "jobs"
    assert load.retries == 2 and load.timeout == 600.0 and load.kill_grace == 5.0
    assert load.cwd is None and load.backoff == Backoff()


def test_bytes_and_str_give_the_same_workflow() -> None:
    assert parse_workflow(SPEC_EXAMPLE.encode(), "x") == parse_workflow(SPEC_EXAMPLE, "x")


def test_name_defaults_to_the_callers_name() -> None:
    assert parse(one_step(), "from-file").name == "from-file"


def test_minimal_step_gets_every_default() -> None:
    wf = parse(one_step())
    assert wf.max_parallel is None and wf.env == {}
    assert wf.steps == (Step(id="a", command="true"),)
    step = wf.steps[0]
    assert step.retries == 0 and step.timeout is None and step.kill_grace == 5.0
    assert step.backoff == Backoff(initial=1.0, factor=2.0, max=300.0, jitter=0.0)
    assert step.env == {} and step.cwd is None and step.depends_on == ()


def test_seconds_are_stored_as_floats() -> None:
    step = parse(one_step(timeout=3, kill_grace=0, backoff={"initial": 2, "max": 9})).steps[0]
    assert type(step.timeout) is float and step.timeout == 3.0
    assert type(step.kill_grace) is float and step.kill_grace == 0.0
    assert type(step.backoff.initial) is float and type(step.backoff.max) is float


def test_no_two_steps_share_an_env_dict() -> None:
    doc = {
        "defaults": {"env": {"A": "1"}},
        "steps": [{"id": "a", "command": "x"}, {"id": "b", "command": "x"}],
    }
    a, b = parse(doc).steps
    assert a.env == b.env == {"A": "1"}
    assert a.env is not b.env


def test_leading_byte_order_mark_is_ignored() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(one_step()).encode()
    assert parse_workflow(data, "wf").steps[0].id == "a"


def test_ids_may_use_every_allowed_character_and_128_of_them() -> None:
    ids = ["a", "0", "A.b-c_d", "x" * 128, "9-._"]
    wf = parse({"steps": [{"id": i, "command": "x"} for i in ids]})
    assert [s.id for s in wf.steps] == ids
    assert STEP_ID_RE.fullmatch("x" * 129) is None


def test_null_max_parallel_means_the_daemons_limit() -> None:
    assert parse({"max_parallel": None, **one_step()}).max_parallel is None


def test_command_list_may_hold_empty_arguments_after_the_program() -> None:
    assert parse(one_step(command=["grep", "", "f"])).steps[0].command == ("grep", "", "f")


# ---------------------------------------------------------------------------
# Defaults merging


def test_defaults_env_is_merged_under_the_steps_env() -> None:
    doc = {
        "env": {"TOP": "t"},
        "defaults": {"env": {"A": "default", "B": "default"}},
        "steps": [
            {"id": "a", "command": "x", "env": {"B": "step", "C": "step"}},
            {"id": "b", "command": "x"},
        ],
    }
    a, b = parse(doc).steps
    assert a.env == {"A": "default", "B": "step", "C": "step"}
    assert b.env == {"A": "default", "B": "default"}
    assert parse(doc).env == {"TOP": "t"}  # the workflow's env stays apart


def test_backoff_merges_field_by_field_over_defaults() -> None:
    doc = {
        "defaults": {"backoff": {"initial": 5, "factor": 3, "max": 100}},
        "steps": [
            {"id": "a", "command": "x", "backoff": {"factor": 1.5, "jitter": 0.2}},
            {"id": "b", "command": "x"},
            {"id": "c", "command": "x", "backoff": {}},
        ],
    }
    a, b, c = parse(doc).steps
    assert a.backoff == Backoff(initial=5.0, factor=1.5, max=100.0, jitter=0.2)
    assert b.backoff == Backoff(initial=5.0, factor=3.0, max=100.0, jitter=0.0)
    assert c.backoff == b.backoff


def test_step_without_backoff_and_no_default_backoff_uses_the_builtin_one() -> None:
    doc = {"steps": [{"id": "a", "command": "x", "backoff": {"max": 7}}]}
    assert parse(doc).steps[0].backoff == Backoff(max=7.0)


def test_explicit_null_timeout_overrides_defaults_timeout() -> None:
    doc = {
        "defaults": {"timeout": 600},
        "steps": [
            {"id": "a", "command": "x", "timeout": None},
            {"id": "b", "command": "x"},
            {"id": "c", "command": "x", "timeout": 5.5},
        ],
    }
    a, b, c = parse(doc).steps
    assert a.timeout is None
    assert b.timeout == 600.0
    assert c.timeout == 5.5


def test_defaults_timeout_null_is_no_timeout() -> None:
    doc = {"defaults": {"timeout": None}, "steps": [{"id": "a", "command": "x"}]}
    assert parse(doc).steps[0].timeout is None


def test_explicit_null_cwd_overrides_defaults_cwd() -> None:
    doc = {
        "defaults": {"cwd": "/srv"},
        "steps": [
            {"id": "a", "command": "x", "cwd": None},
            {"id": "b", "command": "x"},
            {"id": "c", "command": "x", "cwd": "rel/dir"},
        ],
    }
    assert [s.cwd for s in parse(doc).steps] == [None, "/srv", "rel/dir"]


def test_retries_and_kill_grace_defaults_apply_unless_the_step_sets_them() -> None:
    doc = {
        "defaults": {"retries": 4, "kill_grace": 1},
        "steps": [
            {"id": "a", "command": "x"},
            {"id": "b", "command": "x", "retries": 0, "kill_grace": 0},
        ],
    }
    a, b = parse(doc).steps
    assert (a.retries, a.kill_grace) == (4, 1.0)
    assert (b.retries, b.kill_grace) == (0, 0.0)


# ---------------------------------------------------------------------------
# The DAG: index, deps, dependents


def test_index_deps_and_dependents_follow_file_order() -> None:
    doc = {
        "steps": [
            {"id": "d", "command": "x", "depends_on": ["c", "a"]},
            {"id": "a", "command": "x"},
            {"id": "b", "command": "x", "depends_on": ["a"]},
            {"id": "c", "command": "x", "depends_on": ["b", "a"]},
        ]
    }
    wf = parse(doc)
    assert wf.index == {"d": 0, "a": 1, "b": 2, "c": 3}
    assert wf.deps == ((3, 1), (), (1,), (2, 1))
    assert wf.dependents == ((), (0, 2, 3), (3,), (0,))


def test_build_workflow_agrees_with_parse() -> None:
    wf = parse_workflow(SPEC_EXAMPLE, "x")
    assert build_workflow(wf.name, wf.max_parallel, wf.env, wf.steps) == wf


def test_workflow_round_trips_through_msgspec() -> None:
    wf = parse_workflow(SPEC_EXAMPLE, "x")
    assert msgspec.json.decode(msgspec.json.encode(wf), type=Workflow) == wf
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(wf), type=Workflow) == wf


def test_structs_are_frozen() -> None:
    wf = parse_workflow(SPEC_EXAMPLE, "x")
    with pytest.raises(AttributeError):
        wf.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        wf.steps[0].retries = 9  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Messages: structure


def test_top_level_must_be_an_object() -> None:
    assert problem([1, 2]) == "$: expected an object, got [1,2]"
    assert problem("null") == "$: expected an object, got null"
    assert problem('"steps"') == '$: expected an object, got "steps"'


def test_missing_steps() -> None:
    assert problem({"name": "x"}) == '$: missing required field "steps"'
    assert problem({}) == '$: missing required field "steps"'


def test_steps_must_be_a_non_empty_list() -> None:
    assert problem({"steps": []}) == "$.steps: must not be empty"
    assert problem({"steps": {}}) == "$.steps: expected a non-empty list of steps, got {}"
    assert problem({"steps": None}) == "$.steps: expected a non-empty list of steps, got null"


def test_step_must_be_an_object() -> None:
    doc = {"steps": [{"id": "a", "command": "x"}, "b", 3]}
    assert problems(doc) == [
        '$.steps[1]: expected an object, got "b"',
        "$.steps[2]: expected an object, got 3",
    ]


def test_missing_step_fields() -> None:
    doc = {"steps": [{"id": "a"}, {"command": "x"}, {}]}
    assert problems(doc) == [
        '$.steps[0]: missing required field "command"',
        '$.steps[1]: missing required field "id"',
        '$.steps[2]: missing required field "id"',
        '$.steps[2]: missing required field "command"',
    ]


def test_unknown_fields_at_every_level() -> None:
    doc = {
        "colour": "red",
        "defaults": {"id": "x", "command": "y", "depends_on": [], "backoff": {"min": 1}},
        "steps": [
            {"id": "a", "command": "x"},
            {"id": "b", "command": "x", "colour": 1, "backoff": {"initail": 1}},
        ],
    }
    assert problems(doc) == [
        "$.colour: unknown field",
        "$.defaults.id: unknown field",
        "$.defaults.command: unknown field",
        "$.defaults.depends_on: unknown field",
        "$.defaults.backoff.min: unknown field",
        "$.steps[1].colour: unknown field",
        "$.steps[1].backoff.initail: unknown field; did you mean 'initial'?",
    ]


def test_odd_keys_are_quoted_in_paths() -> None:
    doc = {"bad key": 1, "steps": [{"id": "a", "command": "x", "é": 1, "": 2}]}
    assert problems(doc) == [
        '$["bad key"]: unknown field',
        '$.steps[0]["é"]: unknown field',
        '$.steps[0][""]: unknown field',
    ]


def test_defaults_must_be_an_object() -> None:
    assert problem({"defaults": [], **one_step()}) == "$.defaults: expected an object, got []"


# ---------------------------------------------------------------------------
# Messages: ids and dependencies


def test_invalid_ids() -> None:
    pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
    for bad in ["a b", "", "-a", ".a", "_a", "a/b", "é", "x" * 129, "a\n"]:
        shown = json.dumps(bad, ensure_ascii=False)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        assert step_problem(id=bad) == (
            f"$.steps[0].id: invalid id {shown} (must match {pattern})"
        ), bad


def test_id_must_be_a_string() -> None:
    assert step_problem(id=1) == "$.steps[0].id: expected a string, got 1"
    assert step_problem(id=None) == "$.steps[0].id: expected a string, got null"


def test_duplicate_ids() -> None:
    doc = {
        "steps": [
            {"id": "x", "command": "c"},
            {"id": "load", "command": "c"},
            {"id": "y", "command": "c"},
            {"id": "load", "command": "c"},
            {"id": "load", "command": "c"},
        ]
    }
    assert problems(doc) == [
        '$.steps[3].id: duplicate id "load" (first at $.steps[1])',
        '$.steps[4].id: duplicate id "load" (first at $.steps[1])',
    ]


def test_unknown_dependency() -> None:
    doc = {
        "steps": [
            {"id": "a", "command": "c"},
            {"id": "b", "command": "c"},
            {"id": "c", "command": "c", "depends_on": ["nope", "a"]},
        ]
    }
    assert problems(doc) == ['$.steps[2].depends_on[0]: unknown step "nope"']


def test_dependency_may_name_a_later_step() -> None:
    doc = {"steps": [{"id": "a", "command": "c", "depends_on": ["b"]}, {"id": "b", "command": "c"}]}
    assert parse(doc).deps == ((1,), ())


def test_self_dependency() -> None:
    doc = {
        "steps": [
            {"id": "x", "command": "c"},
            {"id": "y", "command": "c"},
            {"id": "load", "command": "c", "depends_on": ["load"]},
        ]
    }
    assert problems(doc) == ['$.steps[2].depends_on[0]: step "load" depends on itself']


def test_duplicate_dependency() -> None:
    doc = {
        "steps": [
            {"id": "a", "command": "c"},
            {"id": "b", "command": "c", "depends_on": ["a", "a", "a"]},
        ]
    }
    assert problems(doc) == [
        '$.steps[1].depends_on[1]: duplicate dependency "a" (first at $.steps[1].depends_on[0])',
        '$.steps[1].depends_on[2]: duplicate dependency "a" (first at $.steps[1].depends_on[0])',
    ]


def test_depends_on_must_be_a_list_of_strings() -> None:
    assert step_problem(depends_on="b") == (
        '$.steps[0].depends_on: expected a list of step ids, got "b"'
    )
    doc = {"steps": [{"id": "a", "command": "c", "depends_on": [1, None, ["a"]]}]}
    assert problems(doc) == [
        "$.steps[0].depends_on[0]: expected a step id (string), got 1",
        "$.steps[0].depends_on[1]: expected a step id (string), got null",
        '$.steps[0].depends_on[2]: expected a step id (string), got ["a"]',
    ]


def test_empty_depends_on_is_fine() -> None:
    assert parse(one_step(depends_on=[])).steps[0].depends_on == ()


# ---------------------------------------------------------------------------
# Messages: cycles


def chain_doc(edges: dict[str, list[str]]) -> dict[str, object]:
    return {"steps": [{"id": s, "command": "c", "depends_on": d} for s, d in edges.items()]}


def test_two_step_cycle() -> None:
    doc = chain_doc({"load": ["clean"], "clean": ["load"]})
    assert problems(doc) == ["cycle: load -> clean -> load"]


def test_cycle_starts_at_its_first_step_in_the_file() -> None:
    doc = chain_doc({"clean": ["load"], "load": ["clean"]})
    assert problems(doc) == ["cycle: clean -> load -> clean"]


def test_three_step_cycle_follows_dependency_edges() -> None:
    # a depends on c, c on b, b on a.
    doc = chain_doc({"a": ["c"], "b": ["a"], "c": ["b"]})
    assert problems(doc) == ["cycle: a -> c -> b -> a"]


def test_two_separate_cycles_are_each_reported_in_file_order() -> None:
    doc = chain_doc(
        {
            "root": [],
            "p": ["q"],
            "x": ["z", "root"],
            "q": ["p"],
            "y": ["x"],
            "z": ["y"],
            "after": ["x", "p"],  # downstream of both cycles, on neither
        }
    )
    assert problems(doc) == ["cycle: p -> q -> p", "cycle: x -> z -> y -> x"]


def test_one_message_per_component_with_the_shortest_cycle_through_its_first_step() -> None:
    # a -> b -> c -> a and a -> c -> a share one component.
    doc = chain_doc({"a": ["b", "c"], "b": ["c"], "c": ["a"]})
    assert problems(doc) == ["cycle: a -> c -> a"]


def test_cycles_come_after_every_other_problem() -> None:
    doc = {
        "steps": [
            {"id": "a", "command": "c", "depends_on": ["b"]},
            {"id": "b", "command": "c", "depends_on": ["a"], "retries": -1},
        ],
        "colour": 1,
    }
    assert problems(doc) == [
        "$.steps[1].retries: expected an integer from 0 to 1000, got -1",
        "$.colour: unknown field",
        "cycle: a -> b -> a",
    ]


def test_cycle_is_found_despite_other_dependency_problems() -> None:
    doc = chain_doc({"a": ["b", "nope", "a"], "b": ["a"]})
    assert problems(doc) == [
        '$.steps[0].depends_on[1]: unknown step "nope"',
        '$.steps[0].depends_on[2]: step "a" depends on itself',
        "cycle: a -> b -> a",
    ]


def test_long_ring_is_reported_without_recursion() -> None:
    n = 20_000
    steps = [{"id": f"s{i}", "command": "c", "depends_on": [f"s{(i - 1) % n}"]} for i in range(n)]
    (msg,) = problems({"steps": steps})
    names = msg.removeprefix("cycle: ").split(" -> ")
    assert names[0] == names[-1] == "s0"
    assert names[1] == f"s{n - 1}" and len(names) == n + 1


# ---------------------------------------------------------------------------
# Messages: field values


@pytest.mark.parametrize(
    ("value", "shown"),
    [("3", '"3"'), (-1, "-1"), (1001, "1001"), (1.0, "1.0"), (True, "true"), (None, "null")],
)
def test_retries_must_be_an_integer_from_0_to_1000(value: object, shown: str) -> None:
    assert step_problem(retries=value) == (
        f"$.steps[0].retries: expected an integer from 0 to 1000, got {shown}"
    )


def test_retries_bounds_are_inclusive() -> None:
    assert parse(one_step(retries=1000)).steps[0].retries == 1000
    assert parse(one_step(retries=0)).steps[0].retries == 0


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0, "0"), (-1.5, "-1.5"), (True, "true"), ("5", '"5"'), (2e9, "2000000000.0")],
)
def test_timeout_must_be_positive_seconds_or_null(value: object, shown: str) -> None:
    assert step_problem(timeout=value) == (
        f"$.steps[0].timeout: expected a number of seconds > 0 (at most 1e9) or null, got {shown}"
    )


def test_timeout_accepts_ints_floats_and_the_upper_bound() -> None:
    assert parse(one_step(timeout=0.001)).steps[0].timeout == 0.001
    assert parse(one_step(timeout=1_000_000_000)).steps[0].timeout == 1e9


@pytest.mark.parametrize(("value", "shown"), [(-1, "-1"), (False, "false"), (None, "null")])
def test_kill_grace_must_be_non_negative_seconds(value: object, shown: str) -> None:
    assert step_problem(kill_grace=value) == (
        f"$.steps[0].kill_grace: expected a number of seconds >= 0 (at most 1e9), got {shown}"
    )


def test_backoff_values() -> None:
    doc = one_step(backoff={"initial": 0, "factor": 0.5, "max": -1, "jitter": 1.5})
    assert problems(doc) == [
        "$.steps[0].backoff.initial: expected a number of seconds > 0 (at most 1e9), got 0",
        "$.steps[0].backoff.factor: expected a number >= 1, got 0.5",
        "$.steps[0].backoff.max: expected a number of seconds >= 0 (at most 1e9), got -1",
        "$.steps[0].backoff.jitter: expected a number from 0 to 1, got 1.5",
    ]


def test_backoff_rejects_bools_and_must_be_an_object() -> None:
    doc = one_step(backoff={"initial": True, "factor": True, "max": False, "jitter": False})
    assert [p.split(", got ")[1] for p in problems(doc)] == ["true", "true", "false", "false"]
    assert step_problem(backoff=[]) == "$.steps[0].backoff: expected an object, got []"


def test_backoff_edges_are_accepted() -> None:
    b = parse(one_step(backoff={"initial": 1e9, "factor": 1, "max": 0, "jitter": 1})).steps[0]
    assert b.backoff == Backoff(initial=1e9, factor=1.0, max=0.0, jitter=1.0)


def test_command_values() -> None:
    cases = {
        "": "$.steps[0].command: must not be empty",
        "  \t": "$.steps[0].command: must not be only whitespace",
        "a\0b": "$.steps[0].command: must not contain a NUL character",
        3: "$.steps[0].command: expected a non-empty string or a non-empty list of strings, got 3",
        None: (
            "$.steps[0].command: expected a non-empty string or a non-empty list of strings,"
            " got null"
        ),
        (): "$.steps[0].command: must not be empty",
    }
    for value, message in cases.items():
        command = list(value) if isinstance(value, tuple) else value
        assert step_problem(command=command) == message, value


def test_command_list_items() -> None:
    assert problems(one_step(command=["", 3, "a\0", "ok", ""])) == [
        "$.steps[0].command[0]: must not be empty (it is the program to run)",
        "$.steps[0].command[1]: expected a string, got 3",
        "$.steps[0].command[2]: must not contain a NUL character",
    ]


def test_env_values() -> None:
    doc = {
        "env": {"OK": "1", "N": 2, "A=B": "x", "": "y", "Z": "a\0b", "L": ["v"]},
        **one_step(env="nope"),
    }
    assert problems(doc) == [
        "$.env.N: expected a string, got 2",
        '$.env["A=B"]: invalid variable name (must be non-empty, without "=" or NUL)',
        '$.env[""]: invalid variable name (must be non-empty, without "=" or NUL)',
        "$.env.Z: must not contain a NUL character",
        '$.env.L: expected a string, got ["v"]',
        '$.steps[0].env: expected an object of strings, got "nope"',
    ]


def test_defaults_env_is_checked_too() -> None:
    doc = {"defaults": {"env": {"X": None}}, **one_step()}
    assert problem(doc) == "$.defaults.env.X: expected a string, got null"


def test_cwd_values() -> None:
    assert step_problem(cwd="") == "$.steps[0].cwd: must not be empty"
    assert step_problem(cwd=1) == "$.steps[0].cwd: expected a string or null, got 1"
    assert step_problem(cwd="a\0") == "$.steps[0].cwd: must not contain a NUL character"


def test_control_characters_are_refused_in_names_cwds_and_env_names() -> None:
    # C0, DEL and C1 (U+0080-U+009F): they would reach terminals and the daemon's log.
    for bad, shown in [("a\x85b", '"a\\x85b"'), ("a\x9bc", '"a\\x9bc"'),
                       ("\x7f", '"\\x7f"'), ("a\tb", '"a\\tb"')]:
        assert problem({"name": bad, **one_step()}) == (
            f"$.name: expected a non-empty string without control characters, got {shown}"
        ), bad
    esc = "/tmp/\x1b[2J\nx"
    assert step_problem(cwd=esc) == (
        '$.steps[0].cwd: must not contain control characters, got "/tmp/\\u001b[2J\\nx"'
    )
    assert problem({"defaults": {"cwd": "a\x85"}, **one_step()}) == (
        '$.defaults.cwd: must not contain control characters, got "a\\x85"'
    )
    assert problems({"env": {"A\x1bB": "1", "C\x90": "2", "OK": "\x1b[0m\n"}, **one_step()}) == [
        '$.env["A\\u001bB"]: invalid variable name (must not contain control characters)',
        '$.env["C\\x90"]: invalid variable name (must not contain control characters)',
    ]
    # Commands are shell scripts: tabs, newlines, even ESC stay allowed.
    assert parse(one_step(command="printf '\\033[1m'\n\tdone")).steps[0].command


def test_env_problems_is_the_one_rule_for_environments() -> None:
    assert env_problems({"OK": "x", "": "1", "A=B": "2", "N\0": "3", "T\t": "4",
                         "V": "a\0b", "W": "tab\tand\x1b are fine"}) == [
        ('[""]', 'invalid variable name (must be non-empty, without "=" or NUL)'),
        ('["A=B"]', 'invalid variable name (must be non-empty, without "=" or NUL)'),
        ('["N\\u0000"]', 'invalid variable name (must be non-empty, without "=" or NUL)'),
        ('["T\\t"]', "invalid variable name (must not contain control characters)"),
        (".V", "must not contain a NUL character"),
    ]


def test_name_values() -> None:
    for bad, shown in [("", '""'), (3, "3"), ("a\nb", '"a\\nb"'), (None, "null")]:
        doc = {"name": bad, **one_step()}
        assert problem(doc) == (
            f"$.name: expected a non-empty string without control characters, got {shown}"
        )


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0, "0"), (True, "true"), (1.5, "1.5"), ("2", '"2"'), (10**6 + 1, "1000001")],
)
def test_max_parallel_values(value: object, shown: str) -> None:
    assert problem({"max_parallel": value, **one_step()}) == (
        f"$.max_parallel: expected an integer from 1 to 1000000 or null, got {shown}"
    )


def test_top_level_env_must_be_an_object() -> None:
    assert problem({"env": ["A=1"], **one_step()}) == (
        '$.env: expected an object of strings, got ["A=1"]'
    )


def test_long_values_are_cut_to_about_40_characters() -> None:
    msg = step_problem(retries="x" * 100)
    assert msg == '$.steps[0].retries: expected an integer from 0 to 1000, got "' + "x" * 36 + "..."
    assert len(msg.split(", got ")[1]) == 40


def test_numbers_beyond_a_double_are_reported_as_values() -> None:
    text = '{"steps": [{"id": "a", "command": "x", "timeout": 1e400, "kill_grace": -1e999}]}'
    assert problems(text) == [
        "$.steps[0].timeout: expected a number of seconds > 0 (at most 1e9) or null, got 1e400",
        "$.steps[0].kill_grace: expected a number of seconds >= 0 (at most 1e9), got -1e999",
    ]


def test_huge_integers_are_reported_as_values() -> None:
    digits = "9" * 5000
    text = '{"steps": [{"id": "a", "command": "x", "retries": ' + digits + "}]}"
    assert problems(text) == [
        "$.steps[0].retries: expected an integer from 0 to 1000, got " + "9" * 37 + "..."
    ]
    text = '{"steps": [{"id": "a", "command": "x", "retries": ' + "9" * 300 + "}]}"
    assert problems(text) == [
        "$.steps[0].retries: expected an integer from 0 to 1000, got " + "9" * 37 + "..."
    ]


def test_huge_factor_is_accepted_and_delay_stays_finite() -> None:
    step = parse(one_step(backoff={"factor": 1e300})).steps[0]
    assert step.backoff.delay(3, 0.0) == 300.0
    assert step_problem(backoff={"factor": 10**400}).startswith(
        "$.steps[0].backoff.factor: expected a number >= 1, got 1000"
    )


# ---------------------------------------------------------------------------
# Several problems at once, in document order


def test_every_problem_is_reported_in_document_order() -> None:
    doc = {
        "max_parallel": 0,
        "steps": [
            {"id": "a b", "command": 3, "retries": "3", "colour": 1},
            {"id": "x", "command": "y", "depends_on": ["x", "nope", "x", 4]},
            {"id": "x", "command": ["", 3]},
            {"id": "ok", "command": "y"},
        ],
        "defaults": {"timeout": -1},
        "bad key": 1,
    }
    assert problems(doc) == [
        "$.max_parallel: expected an integer from 1 to 1000000 or null, got 0",
        '$.steps[0].id: invalid id "a b" (must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$)',
        "$.steps[0].command: expected a non-empty string or a non-empty list of strings, got 3",
        '$.steps[0].retries: expected an integer from 0 to 1000, got "3"',
        "$.steps[0].colour: unknown field",
        '$.steps[1].depends_on[0]: step "x" depends on itself',
        '$.steps[1].depends_on[1]: unknown step "nope"',
        '$.steps[1].depends_on[2]: duplicate dependency "x" (first at $.steps[1].depends_on[0])',
        "$.steps[1].depends_on[3]: expected a step id (string), got 4",
        '$.steps[2].id: duplicate id "x" (first at $.steps[1])',
        "$.steps[2].command[0]: must not be empty (it is the program to run)",
        "$.steps[2].command[1]: expected a string, got 3",
        "$.defaults.timeout: expected a number of seconds > 0 (at most 1e9) or null, got -1",
        '$["bad key"]: unknown field',
    ]


def test_missing_fields_come_before_the_objects_other_problems() -> None:
    doc = {"colour": 1, "steps_": []}
    assert problems(doc) == [
        '$: missing required field "steps"',
        "$.colour: unknown field",
        "$.steps_: unknown field; did you mean 'steps'?",
    ]


# ---------------------------------------------------------------------------
# Malformed input


def test_malformed_json_names_line_and_column() -> None:
    assert problems(b'{"steps": [\n  {"id": "a",\n    x}]}') == [
        "invalid JSON at line 3, column 5: object keys must be strings"
    ]
    assert problems(b'{"steps": [\n  {"id": "a",\n    "command": x}]}') == [
        'invalid JSON at line 3, column 16: invalid character "x"'
    ]


def test_columns_count_characters_not_bytes() -> None:
    text = '{"name": "éé€", "steps": x}'
    assert problems(text.encode()) == ['invalid JSON at line 1, column 26: invalid character "x"']
    assert text.index("x") + 1 == 26


def test_malformed_json_alone_is_reported() -> None:
    # The unknown field would be a problem too, but nothing after a syntax
    # error can be trusted.
    assert len(problems('{"colour": 1, "steps": [}')) == 1


def test_truncated_json() -> None:
    assert problems('{"steps": [\n') == [
        "invalid JSON at line 2, column 1: unexpected end of input"
    ]


def test_trailing_characters() -> None:
    assert problems('{"steps": []} x') == ["invalid JSON at line 1, column 15: trailing characters"]
    assert problems('{"steps": []}x') == ["invalid JSON at line 1, column 14: trailing characters"]
    assert problems('{"é": []}\n\n  ]') == ["invalid JSON at line 3, column 3: trailing characters"]
    assert problems("1 2") == ["invalid JSON at line 1, column 3: trailing characters"]


def test_trailing_comma() -> None:
    assert problems('{"steps": [1,]}') == [
        "invalid JSON at line 1, column 14: trailing comma in array"
    ]


def test_empty_file() -> None:
    assert problems("") == ["invalid JSON at line 1, column 1: the file is empty"]
    assert problems(" \n ") == ["invalid JSON at line 1, column 1: the file is empty"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_malformed(literal: str) -> None:
    text = '{"steps": [{"id": "a", "command": "x", "timeout": ' + literal + "}]}"
    column = text.index(literal.lstrip("-")) + 1
    assert problems(text) == [
        f'invalid JSON at line 1, column {column}: invalid character "{literal.lstrip("-")[0]}"'
    ]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_after_an_out_of_range_number_is_still_malformed(literal: str) -> None:
    # msgspec stops at 1e400; the rest is checked by the stdlib decoder.
    text = '{"steps": [{"id": "a", "command": "x", "timeout": 1e400,\n"x": "NaN", "y": ' + literal
    column = text.split("\n")[1].rindex(literal.lstrip("-")) + 1
    assert problems(text + "}]}") == [
        f'invalid JSON at line 2, column {column}: invalid character "{literal.lstrip("-")[0]}"'
    ]


def test_syntax_error_after_an_out_of_range_number() -> None:
    text = '{"steps": [{"id": "a", "command": "x", "timeout": 1e400,\n "x" 1}]}'
    assert problems(text) == ["invalid JSON at line 2, column 6: Expecting ':' delimiter"]


def test_invalid_utf8() -> None:
    assert problems(b'{"name": "ab\xff"}') == ["invalid UTF-8 at byte 12"]
    assert problems(b'{"name": \xc3}') == ["invalid UTF-8 at byte 9"]
    # A byte order mark does not shift the count.
    assert problems(b'\xef\xbb\xbf{"name": "ab\xff"}') == ["invalid UTF-8 at byte 15"]


def test_str_with_escaped_bad_bytes_reports_the_byte() -> None:
    text = b'{"name": "ab\xff"}'.decode("utf-8", "surrogateescape")
    assert problems(text) == ["invalid UTF-8 at byte 12"]


def test_lone_surrogate_escapes_are_malformed() -> None:
    assert problems(r'{"name": "a\ud800", "steps": []}') == [
        "invalid JSON at line 1, column 18: unexpected end of escaped utf-16 surrogate pair"
    ]
    # Also when an out-of-range number sends the document to the stdlib decoder.
    text = r'{"timeout": 1e400, "timeout": 5, "name": "\ud83d\ude00\udc00", "steps": []}'
    column = text.index("\\udc00") + 1
    assert problems(text) == [
        f"invalid JSON at line 1, column {column}: invalid utf-16 surrogate pair"
    ]


def test_escaped_surrogate_pairs_and_backslashes_are_fine() -> None:
    text = r'{"name": "\ud83d\ude00 \\ud800", "steps": [{"id": "a", "command": "x"}]}'
    assert parse_workflow(text, "x").name == "\U0001f600 \\ud800"


def test_duplicate_keys_last_one_wins() -> None:
    text = '{"steps": [{"id": "a", "command": "x", "retries": 1, "retries": 2}]}'
    assert parse_workflow(text, "x").steps[0].retries == 2
    # Even when the first one held a number too big to decode.
    text = '{"steps": [{"id": "a", "command": "x", "timeout": 1e400, "timeout": 2}]}'
    assert parse_workflow(text, "x").steps[0].timeout == 2.0


def test_deep_nesting_is_a_clean_error() -> None:
    (msg,) = problems(b"[" * 100_000)
    assert msg == "invalid JSON at line 1, column 100000: nested too deeply"
    (msg,) = problems("[" * 100_000)
    assert msg.endswith("nested too deeply")


def test_deep_nesting_inside_a_workflow() -> None:
    text = '{"steps": [], "x": ' + "[" * 5000 + "]" * 5000 + "}"
    (msg,) = problems(text)
    assert msg == f"invalid JSON at line 1, column {20 + 4999}: nested too deeply"


def test_deep_nesting_ignores_brackets_in_strings() -> None:
    text = '{"s": "[[[[[[[[", "steps": ' + "[" * 3000 + "]" * 3000 + "}"
    deepest = text.index("[" * 20) + 3000  # the strings' brackets do not count
    assert problems(text) == [f"invalid JSON at line 1, column {deepest}: nested too deeply"]


def test_moderate_nesting_in_a_bad_value_is_shown() -> None:
    value: object = 1
    for _ in range(500):
        value = [value]
    msg = step_problem(retries=value)
    assert msg.startswith("$.steps[0].retries: expected an integer from 0 to 1000, got [[[[")


def test_non_text_input_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        parse_workflow(None, "x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Scale


def test_100000_step_chain_validates() -> None:
    n = 100_000
    steps = [{"id": "s0", "command": "true"}]
    steps += [{"id": f"s{i}", "command": "true", "depends_on": [f"s{i - 1}"]} for i in range(1, n)]
    wf = parse({"steps": steps})
    assert len(wf.steps) == n
    assert wf.deps[n - 1] == (n - 2,)
    assert wf.dependents[0] == (1,)


def test_100000_step_chain_with_a_cycle_at_the_end() -> None:
    n = 100_000
    steps = [{"id": f"s{i}", "command": "true", "depends_on": [f"s{i + 1}"]} for i in range(n - 1)]
    steps.append({"id": f"s{n - 1}", "command": "true", "depends_on": [f"s{n - 2}"]})
    assert problems({"steps": steps}) == [f"cycle: s{n - 2} -> s{n - 1} -> s{n - 2}"]


def test_parsing_leaves_the_garbage_collector_as_it_was() -> None:
    import gc

    assert gc.isenabled()
    parse_workflow(SPEC_EXAMPLE, "x")
    problems("[")
    assert gc.isenabled()
    gc.disable()
    try:
        parse_workflow(SPEC_EXAMPLE, "x")
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------
# Backoff.delay


def test_delay_grows_by_factor() -> None:
    b = Backoff(initial=1, factor=2, max=300, jitter=0)
    assert [b.delay(n, 0.5) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]


def test_delay_is_capped_at_max() -> None:
    b = Backoff(initial=10, factor=3, max=60)
    assert [b.delay(n, 0.0) for n in (1, 2, 3, 4)] == [10.0, 30.0, 60.0, 60.0]
    assert Backoff(initial=100, max=5).delay(1, 0.3) == 5.0


def test_delay_with_zero_max_is_immediate() -> None:
    assert Backoff(max=0).delay(7, 0.9) == 0.0


def test_delay_jitter_bounds() -> None:
    b = Backoff(initial=10, factor=1, max=100, jitter=0.1)
    assert b.delay(1, 0.0) == pytest.approx(9.0)
    assert b.delay(1, 0.5) == pytest.approx(10.0)
    assert b.delay(1, 0.999999) == pytest.approx(11.0, abs=1e-4)


@pytest.mark.parametrize("n", [1000, 10_000, 10**9])
def test_delay_does_not_overflow(n: int) -> None:
    assert Backoff(initial=1, factor=2, max=300).delay(n, 0.5) == 300.0
    assert Backoff(initial=1, factor=1e300, max=300, jitter=1).delay(n, 0.75) == 450.0
    assert Backoff(initial=1, factor=1, max=300).delay(n, 0.0) == 1.0


@given(
    initial=st.floats(min_value=1e-6, max_value=1e9),
    factor=st.floats(min_value=1, max_value=1e300),
    max_=st.floats(min_value=0, max_value=1e9),
    jitter=st.floats(min_value=0, max_value=1),
    n=st.integers(min_value=1, max_value=100_000),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_delay_stays_within_bounds(
    initial: float, factor: float, max_: float, jitter: float, n: int, rand: float
) -> None:
    d = Backoff(initial, factor, max_, jitter).delay(n, rand)
    base = min(max_, initial)
    assert math.isfinite(d)
    assert base * (1 - jitter) * (1 - 1e-9) <= d <= max_ * (1 + jitter) * (1 + 1e-9)


# ---------------------------------------------------------------------------
# Property tests: nothing but WorkflowInvalid, whatever the input

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def only_workflow_invalid(text: str | bytes) -> None:
    try:
        wf = parse_workflow(text, "fuzz")
    except WorkflowInvalid as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        assert all("\n" not in p for p in e.problems)
    else:
        assert isinstance(wf, Workflow)


@given(json_values)
def test_random_json_values_only_raise_workflow_invalid(value: object) -> None:
    only_workflow_invalid(json.dumps(value))


@given(st.lists(json_values, max_size=4), json_values)
def test_random_steps_only_raise_workflow_invalid(steps: list[object], defaults: object) -> None:
    only_workflow_invalid(json.dumps({"steps": steps, "defaults": defaults}))


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_workflow_invalid(data: bytes) -> None:
    only_workflow_invalid(data)


@given(st.text(max_size=200))
def test_random_text_only_raise_workflow_invalid(text: str) -> None:
    only_workflow_invalid(text)


def valid_doc() -> dict[str, object]:
    return json.loads(SPEC_EXAMPLE)


def slots(value: object, out: list[tuple[object, object]]) -> list[tuple[object, object]]:
    """Every (container, key) in a document, found without recursion."""
    todo = [value]
    while todo:
        v = todo.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, child in items:
            out.append((v, k))
            todo.append(child)
    return out


@st.composite
def mutated_docs(draw: st.DrawFn) -> str:
    doc = valid_doc()
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        places = slots(doc, [])
        container, key = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "delete", "add", "truncate"]))
        if action == "replace":
            container[key] = draw(json_values)  # type: ignore[index]
        elif action == "delete":
            del container[key]  # type: ignore[attr-defined]
        elif action == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "add" and isinstance(container, list):
            container.append(draw(json_values))
    text = json.dumps(doc)
    if draw(st.booleans()):
        return text
    # Cut or splice the text too, to reach the syntax errors.
    cut = draw(st.integers(min_value=0, max_value=len(text)))
    return text[:cut] + draw(st.text(max_size=3)) + text[cut + draw(st.integers(0, 3)) :]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_docs())
def test_mutations_of_a_valid_workflow_only_raise_workflow_invalid(text: str) -> None:
    only_workflow_invalid(text)


ids = st.one_of(
    st.none(), st.integers(), st.text(max_size=5),
    st.text(alphabet="ab.-_\n\x85", max_size=4), st.from_regex(r"[A-Za-z0-9][._-]?[a-z]*"),
)


@settings(max_examples=300)
@given(st.lists(ids, min_size=1, max_size=6))
def test_the_bulk_id_check_is_step_id_re_on_each_id(values: list[object]) -> None:
    # The one regex call over all ids says yes exactly when STEP_ID_RE says yes to each.
    each = all(isinstance(v, str) and wfmod.STEP_ID_RE.fullmatch(v) for v in values)
    assert wfmod._all_ids_valid(values) == each


@settings(max_examples=300)
@given(mutated_docs())
def test_a_step_is_judged_the_same_with_and_without_the_bulk_id_check(text: str) -> None:
    # Where every id is valid, the walk may skip the per-id regex: same problems, same edges.
    try:
        doc = json.loads(text)
    except ValueError:
        return
    steps = doc.get("steps") if isinstance(doc, dict) else None
    assume(isinstance(steps, list))
    assume(wfmod._all_ids_valid([s.get("id") if isinstance(s, dict) else None for s in steps]))
    first: dict[str, int] = {}
    for i, s in enumerate(steps):
        first.setdefault(s["id"], i)
    for i, s in enumerate(steps):
        walks = []
        for ids_ok in (True, False):
            v = wfmod._Validator("x")
            v.first = first
            walks.append((v._walk_step(i, s, ids_ok), v.problems))
        assert walks[0] == walks[1], s


def test_all_ids_valid_is_not_fooled_by_newlines() -> None:
    assert wfmod._all_ids_valid(["a", "b"])
    assert not wfmod._all_ids_valid(["a\nb"])
    assert not wfmod._all_ids_valid(["a", None])
    assert not wfmod._all_ids_valid(["a", "b c"])


# ---------------------------------------------------------------------------
# Property tests: DAGs and cycles


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[str], dict[str, list[str]]]:
    """A random acyclic graph: ids in file order and each id's dependencies."""
    n = draw(st.integers(min_value=1, max_value=25))
    topo = [f"s{i}" for i in range(n)]  # a topological order: deps come earlier
    deps = {
        s: draw(st.lists(st.sampled_from(topo[:k]), unique=True, max_size=4)) if k else []
        for k, s in enumerate(topo)
    }
    file_order = draw(st.permutations(topo))
    return file_order, deps


def dag_doc(order: list[str], deps: dict[str, list[str]]) -> dict[str, object]:
    return {"steps": [{"id": s, "command": "c", "depends_on": deps[s]} for s in order]}


def components_with_cycles(deps: dict[str, list[str]]) -> int:
    """Strongly connected components of 2+ steps, by brute-force reachability."""
    reach = {s: set(d) for s, d in deps.items()}
    changed = True
    while changed:
        changed = False
        for s in reach:
            new = set().union(*(reach[d] for d in reach[s])) - reach[s]
            if new:
                reach[s] |= new
                changed = True
    comps = {frozenset({t for t in reach if t in reach[s] and s in reach[t]}) for s in reach}
    return sum(1 for c in comps if len(c) > 1)


@settings(max_examples=300)
@given(dags())
def test_random_dags_validate(dag: tuple[list[str], dict[str, list[str]]]) -> None:
    order, deps = dag
    wf = parse(dag_doc(order, deps))
    assert [s.id for s in wf.steps] == order
    for i, step in enumerate(wf.steps):
        assert [wf.steps[d].id for d in wf.deps[i]] == deps[step.id]
        assert list(wf.dependents[i]) == sorted(
            j for j, other in enumerate(wf.steps) if step.id in other.depends_on
        )


@settings(max_examples=300)
@given(dags(), st.data())
def test_a_back_edge_always_yields_a_true_cycle(
    dag: tuple[list[str], dict[str, list[str]]], data: st.DataObject
) -> None:
    order, deps = dag
    with_deps = [s for s in order if deps[s]]
    assume(with_deps)
    # Walk down from `top` along dependencies, then make the bottom depend on `top`.
    top = data.draw(st.sampled_from(with_deps))
    bottom = top
    while deps[bottom] and (bottom == top or data.draw(st.booleans())):
        bottom = data.draw(st.sampled_from(deps[bottom]))
    deps = {s: list(d) for s, d in deps.items()}
    deps[bottom].append(top)
    found = problems(dag_doc(order, deps))
    assert all(p.startswith("cycle: ") for p in found)
    assert len(found) == components_with_cycles(deps)
    for p in found:
        names = p.removeprefix("cycle: ").split(" -> ")
        assert names[0] == names[-1] and len(set(names)) == len(names) - 1
        for a, b in zip(names, names[1:], strict=False):
            assert b in deps[a], f"{a} does not depend on {b}"
        # It starts at its step that comes first in the file.
        assert min(order.index(n) for n in names) == order.index(names[0])


def test_random_graphs_match_brute_force_component_count() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 12)
        ids = [f"n{i}" for i in range(n)]
        deps = {
            s: rng.sample([t for t in ids if t != s], rng.randint(0, min(3, n - 1))) for s in ids
        }
        doc = dag_doc(ids, deps)
        expected = components_with_cycles(deps)
        if expected == 0:
            parse(doc)
        else:
            assert len(problems(doc)) == expected


def test_on_lost_defaults_to_rerun_and_merges_like_every_shared_field() -> None:
    wf = parse({"defaults": {"on_lost": "fail"}, "steps": [
        {"id": "a", "command": "true"},
        {"id": "b", "command": "true", "on_lost": "rerun"},
    ]})
    assert [s.on_lost for s in wf.steps] == ["fail", "rerun"]
    assert parse({"steps": [{"id": "a", "command": "true"}]}).steps[0].on_lost == "rerun"


def test_on_lost_takes_only_rerun_or_fail() -> None:
    assert problems({"defaults": {"on_lost": 1}, "steps": [
        {"id": "a", "command": "true", "on_lost": "again"},
    ]}) == [
        '$.defaults.on_lost: expected "rerun" or "fail", got 1',
        '$.steps[0].on_lost: expected "rerun" or "fail", got "again"',
    ]


# ---- run_if (issue 15) ------------------------------------------------------------------


def test_run_if_defaults_to_succeeded_and_takes_done_and_failed() -> None:
    wf = parse({"steps": [
        {"id": "main", "command": "true"},
        {"id": "cleanup", "command": "true", "depends_on": ["main"], "run_if": "done"},
        {"id": "alert", "command": "true", "depends_on": ["main"], "run_if": "failed"},
        {"id": "report", "command": "true", "depends_on": ["main"], "run_if": "succeeded"},
    ]})
    assert [s.run_if for s in wf.steps] == ["succeeded", "done", "failed", "succeeded"]


def test_run_if_problems_are_reported_with_their_paths() -> None:
    assert problems({"defaults": {"run_if": "done"}, "steps": [
        {"id": "a", "command": "true", "run_if": "always"},
        {"id": "b", "command": "true", "run_if": "failed"},
        {"id": "c", "command": "true", "depends_on": ["a"], "run_if": 1},
        {"id": "d", "command": "true", "run_if": "done"},
    ]}) == [
        "$.defaults.run_if: unknown field",
        '$.steps[0].run_if: expected "succeeded", "done" or "failed", got "always"',
        '$.steps[1].run_if: "failed" needs depends_on (with no dependency that could fail, '
        "it would never run)",
        '$.steps[2].run_if: expected "succeeded", "done" or "failed", got 1',
    ]


def test_on_exit_steps_come_last_with_defaults_merged_and_a_run_timeout() -> None:
    wf = parse({"timeout": 90, "defaults": {"retries": 2}, "steps": [
        {"id": "a", "command": "true"},
    ], "on_exit": [
        {"id": "notify", "command": "true"},
        {"id": "page", "command": "true", "when": ["FAILED"], "retries": 0},
    ]})
    assert [s.id for s in wf.steps] == ["a", "notify", "page"]
    assert (wf.exits, wf.timeout) == (2, 90.0)
    assert wf.index == {"a": 0, "notify": 1, "page": 2}
    assert wf.deps == ((), (), ()) and wf.dependents == ((), (), ())
    assert [s.when for s in wf.steps] == [None, ("SUCCEEDED", "FAILED", "CANCELLED"),
                                          ("FAILED",)]
    assert [s.retries for s in wf.steps] == [2, 2, 0]


def test_on_exit_problems_have_paths_and_ids_are_shared_with_steps() -> None:
    assert problems({"steps": [
        {"id": "a", "command": "true", "depends_on": ["n"]},
    ], "on_exit": [
        {"id": "n", "command": "true", "run_if": "done"},
        {"id": "n", "when": []},
        "x",
    ]}) == [
        '$.steps[0].depends_on[0]: unknown step "n"',
        "$.on_exit[0].run_if: an on_exit step has no run_if (it runs once the run has ended)",
        '$.on_exit[1]: missing required field "command"',
        '$.on_exit[1].id: duplicate id "n" (first at $.on_exit[0])',
        '$.on_exit[1].when: expected a non-empty list of distinct run states out of '
        '"SUCCEEDED", "FAILED" and "CANCELLED", got []',
        '$.on_exit[2]: expected an object, got "x"',
    ]
    assert problems({"steps": [{"id": "a", "command": "true"}], "on_exit": {}}) == [
        "$.on_exit: expected a list of steps, got {}"]
