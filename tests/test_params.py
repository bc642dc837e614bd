"""Declared workflow `params` (issue 15), the pure parts: their validation, with JSON
paths (wfd/workflow.py), and how a run's KEY=VALUE variables are checked against them
and completed with defaults (wfd/params.py)."""

from __future__ import annotations

import json

import pytest

from wfd.errors import UsageError, WorkflowInvalid
from wfd.params import resolve_vars
from wfd.workflow import Param, parse_workflow

STEPS = [{"id": "a", "command": "true"}]


def workflow(params: object) -> str:
    return json.dumps({"name": "deploy", "params": params, "steps": STEPS})


def problems(params: object) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(workflow(params), "wf")
    return info.value.problems


def test_params_are_parsed_with_their_defaults() -> None:
    wf = parse_workflow(workflow({
        "BRANCH": {"default": "main", "description": "what to deploy"},
        "TARGET": {"required": True},
        "_OPT": {},
    }), "wf")
    assert wf.params == {
        "BRANCH": Param(default="main", description="what to deploy"),
        "TARGET": Param(required=True),
        "_OPT": Param(),
    }
    assert parse_workflow(json.dumps({"steps": STEPS}), "wf").params == {}


def test_every_problem_is_reported_with_its_path() -> None:
    assert problems({
        "1x": {}, "A": {"required": "yes", "default": 3, "colour": 1},
        "B": {"required": True, "default": "x"}, "C": "x", "WFD_X": {},
        "D": {"default": "a\0b", "description": None},
    }) == [
        '$.params["1x"]: invalid parameter name "1x" (must match '
        "[A-Za-z_][A-Za-z0-9_]{0,127}, not WFD_*)",
        '$.params.A.required: expected true or false, got "yes"',
        "$.params.A.default: expected a string, got 3",
        "$.params.A.colour: unknown field",
        "$.params.B: a required parameter cannot have a default",
        '$.params.C: expected an object ({"default", "required", "description"}), got "x"',
        '$.params.WFD_X: invalid parameter name "WFD_X" (must match '
        "[A-Za-z_][A-Za-z0-9_]{0,127}, not WFD_*)",
        "$.params.D.default: must not contain a NUL character",
        "$.params.D.description: expected a string, got null",
    ]
    assert problems([]) == ["$.params: expected an object of parameters, got []"]


def declared() -> object:
    return parse_workflow(workflow({
        "BRANCH": {"default": "main"}, "TARGET": {"required": True}, "NOTE": {},
    }), "wf")


def test_defaults_fill_in_and_given_values_win() -> None:
    wf = declared()
    assert resolve_vars(wf, {"TARGET": "web1"}) == {"BRANCH": "main", "TARGET": "web1"}
    assert resolve_vars(wf, {"TARGET": "web1", "BRANCH": "dev", "NOTE": ""}) == {
        "BRANCH": "dev", "TARGET": "web1", "NOTE": ""}


def test_a_typo_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(UsageError) as info:
        resolve_vars(declared(), {"TARGET": "web1", "BRANHC": "dev"})
    assert str(info.value) == ("unknown param 'BRANHC' (did you mean 'BRANCH'?); "
                               "workflow 'deploy' declares BRANCH, TARGET, NOTE")
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match=r"^unknown param 'ZZZ'; workflow"):
        resolve_vars(declared(), {"TARGET": "web1", "ZZZ": "1"})


def test_a_missing_required_param_is_an_error_and_every_problem_is_named() -> None:
    with pytest.raises(UsageError) as info:
        resolve_vars(declared(), {"TARGETT": "web1"})
    assert str(info.value) == (
        "unknown param 'TARGETT' (did you mean 'TARGET'?); workflow 'deploy' declares "
        "BRANCH, TARGET, NOTE; missing required param 'TARGET' (wfctl run FILE TARGET=VALUE)")


def test_without_declared_params_any_variable_goes() -> None:
    wf = parse_workflow(json.dumps({"steps": STEPS}), "wf")
    assert resolve_vars(wf, {"ANY": "1"}) == {"ANY": "1"}
