"""Issue 17: a step's `executor` and `slurm` options, validated with their JSON paths and
merged from `defaults` field by field."""

import json

import pytest

from wfd.errors import WorkflowInvalid
from wfd.workflow import SlurmOptions, parse_workflow


def parse(doc: dict):
    return parse_workflow(json.dumps(doc), "t")


def problems(doc: dict) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse(doc)
    return str(info.value).splitlines()


def test_local_is_the_default():
    wf = parse({"steps": [{"id": "a", "command": "true"}]})
    assert wf.steps[0].executor == "local"
    assert wf.steps[0].slurm is None


def test_defaults_merge_field_by_field_and_steps_mix_executors():
    wf = parse({
        "defaults": {"executor": "slurm", "slurm": {"partition": "debug", "mem": 100}},
        "steps": [
            {"id": "a", "command": "true"},
            {"id": "b", "command": "true", "executor": "local"},
            {"id": "c", "command": "true", "slurm": {"cpus": 2, "time": "1-00:10",
                                                     "extra": ["--qos=low"]}},
        ],
    })
    a, b, c = wf.steps
    assert (a.executor, b.executor, c.executor) == ("slurm", "local", "slurm")
    assert a.slurm == SlurmOptions(partition="debug", mem="100")
    assert c.slurm == SlurmOptions(partition="debug", mem="100", cpus=2, time="1-00:10",
                                   extra=("--qos=low",))


def test_minutes_as_integer_become_slurm_text():
    wf = parse({"steps": [{"id": "a", "command": "true", "executor": "slurm",
                           "slurm": {"time": 90, "mem": "4G"}}]})
    assert wf.steps[0].slurm == SlurmOptions(time="90", mem="4G")


def test_every_problem_with_its_path():
    got = problems({
        "defaults": {"executor": "k8s", "slurm": {"time": "soon"}},
        "steps": [{"id": "a", "command": "x", "executor": 1,
                   "slurm": {"partition": "a b", "cpus": 0, "mem": "lots",
                             "extra": ["-p", 3, "--ok"], "nope": 1}}],
    })
    assert got == [
        '$.defaults.executor: expected "local" or "slurm", got "k8s"',
        '$.defaults.slurm.time: expected minutes (an integer >= 1) or Slurm\'s '
        '"D-HH:MM:SS" forms, got "soon"',
        '$.steps[0].executor: expected "local" or "slurm", got 1',
        '$.steps[0].slurm.partition: expected a name of letters, digits and _.:+- '
        '(at most 200), got "a b"',
        "$.steps[0].slurm.cpus: expected an integer from 1 to 1000000, got 0",
        '$.steps[0].slurm.mem: expected megabytes (an integer >= 1) or a size like '
        '"512M", "4G", got "lots"',
        '$.steps[0].slurm.extra[0]: expected an sbatch option "--name[=value]", got "-p"',
        '$.steps[0].slurm.extra[1]: expected an sbatch option "--name[=value]", got 3',
        "$.steps[0].slurm.nope: unknown field",
    ]


def test_slurm_must_be_an_object():
    assert problems({"steps": [{"id": "a", "command": "x", "slurm": []}]}) == [
        "$.steps[0].slurm: expected an object, got []"]
