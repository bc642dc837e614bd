"""Bad input through the real `wfctl` and `wfd` (SPEC 1 "Validation", SPEC 5 exit codes).

Every rejected workflow, bad flag, missing file and unknown or malformed run id
gets one clear line per problem on stderr, exit 2, no traceback, and leaves
nothing behind in the daemon's state dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from helpers import Daemon, base_env, run_wfctl, write_workflow

GOOD = {"name": "ok", "steps": [{"id": "a", "command": "true"},
                                {"id": "b", "command": ["true"], "depends_on": ["a"]}]}

# One workflow with every kind of problem SPEC 1 names (but malformed JSON and no steps,
# which cannot share a file with the others), and the line each must produce.
MANY_PROBLEMS = {
    "name": "broken",
    "bogus": 1,
    "defaults": {"retries": 1, "colour": "red"},
    "steps": [
        {"id": "a", "command": "true", "retries": -1},
        {"id": "a", "command": "true"},
        {"id": "-bad", "command": "true"},
        {"id": "c", "command": "true", "depends_on": ["c", "nope"]},
        {"id": "load", "command": "true", "depends_on": ["clean"], "tmeout": 3},
        {"id": "clean", "command": "true", "depends_on": ["load"]},
    ],
}
EXPECTED = [
    ("$.bogus", "unknown field"),
    ("$.defaults.colour", "unknown field"),
    ("$.steps[0].retries", "-1"),
    ("$.steps[1].id", "duplicate"),
    ("$.steps[2].id", "invalid id"),
    ("$.steps[3].depends_on[0]", "depends on itself"),
    ("$.steps[3].depends_on[1]", "unknown step"),
    ("$.steps[4].tmeout", "unknown field"),
    ("cycle: load -> clean -> load", ""),
]


def assert_no_traceback(done: subprocess.CompletedProcess) -> None:
    for stream in (done.stdout, done.stderr):
        assert "Traceback" not in stream, stream
        assert "Error:" not in stream.replace("error:", ""), stream


def assert_one_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert_no_traceback(done)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].strip(), done.stderr
    return lines[0]


def state_files(d: Daemon) -> list[str]:
    """Every file and dir under the state dir but the lock and the keeper's own: what a
    run would leave."""
    found = []
    for dirpath, dirnames, filenames in os.walk(d.state_dir):
        rel = os.path.relpath(dirpath, d.state_dir)
        found += [os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames]
    return sorted(f for f in found
                  if f not in ("lock", "runs") and f.split(os.sep)[0] != "keeper")


# ---- validate and run of bad workflows ----------------------------------------------


def test_validate_good_workflow(wfd_tmp: Path, sandbox) -> None:
    path = write_workflow(wfd_tmp, GOOD)
    done = run_wfctl("validate", str(path), mark=sandbox.mark)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    assert_no_traceback(done)


def test_every_problem_is_reported_one_line_each(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    d = daemon()
    path = write_workflow(wfd_tmp, MANY_PROBLEMS)
    for command in ("validate", "run"):
        done = d.wfctl(command, str(path))
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert_no_traceback(done)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == len(EXPECTED), done.stderr
        for (where, what), line in zip(EXPECTED, lines, strict=True):
            assert where in line and what in line, (where, what, line)
    assert state_files(d) == []
    assert d.run_ids() == set()
    assert d.wfctl("status", "--json").stdout.strip() == "[]"


def test_malformed_json_names_line_and_column(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    d = daemon()
    path = write_workflow(wfd_tmp, '{"steps": [\n  {"id": "a",, "command": "true"}]}')
    for command in ("validate", "run"):
        line = assert_one_line(d.wfctl(command, str(path)))
        assert "line 2" in line and "column 14" in line, line  # the second comma
    assert state_files(d) == []


SINGLE = [
    ({"steps": []}, "$.steps"),
    ({"name": "x"}, "steps"),
    ({"steps": [{"id": "a", "command": ["ls", 3]}]}, "$.steps[0].command[1]"),
    ({"steps": [{"id": "a", "command": "true", "timeout": 0}]}, "$.steps[0].timeout"),
    ({"steps": [{"id": "a", "command": "true", "backoff": {"factor": 0.5}}]},
     "$.steps[0].backoff.factor"),
    ({"steps": [{"id": "a", "command": "true", "env": {"X": 1}}]}, "$.steps[0].env"),
    ({"max_parallel": 0, "steps": [{"id": "a", "command": "true"}]}, "$.max_parallel"),
    ([1, 2], "$"),
]


def test_single_problem_kinds(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    for i, (doc, where) in enumerate(SINGLE):
        path = write_workflow(wfd_tmp, doc, f"wf{i}.json")
        for command in ("validate", "run"):
            line = assert_one_line(d.wfctl(command, str(path)))
            assert where in line, (doc, line)
    assert state_files(d) == []


CONTROL = [
    ({"name": "a\u0085b"}, "$.name", "control characters"),  # C1: NEL
    ({"name": "a\u009b2J"}, "$.name", "control characters"),  # C1: CSI
    ({"cwd": "/tmp/\u001b[31mred\nFORGED"}, "$.steps[0].cwd", "control characters"),
    ({"env": {"A\u001bB": "1"}}, '$.steps[0].env["A', "control characters"),
    ({"env": {"A\u007f": "1"}}, '$.steps[0].env["A', "control characters"),
]


def test_control_characters_are_refused_with_their_path(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    # Names, directories and variable names reach terminals and logs: refused, and the
    # message shows the value escaped (never a raw ESC, newline or C1 on stderr).
    d = daemon()
    for i, (fields, where, what) in enumerate(CONTROL):
        step = {"id": "a", "command": "true", **{k: v for k, v in fields.items() if k != "name"}}
        doc = {"steps": [step], **({"name": fields["name"]} if "name" in fields else {})}
        path = write_workflow(wfd_tmp, doc, f"ctl{i}.json")
        for command in ("validate", "run"):
            line = assert_one_line(d.wfctl(command, str(path)))
            assert where in line and what in line, (fields, line)
            assert not any(0x80 <= ord(c) <= 0x9F or ord(c) < 0x20 or ord(c) == 0x7F
                           for c in line), repr(line)
    assert state_files(d) == []
    # A command is a shell script: a newline, a tab, even an ESC in it stay allowed.
    path = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true\n\ttrue \u001b"}]})
    assert d.wfctl("validate", str(path)).returncode == 0


def test_cycle_named_in_edge_order(wfd_tmp: Path, sandbox) -> None:
    doc = {"steps": [
        {"id": "x", "command": "true", "depends_on": ["z"]},
        {"id": "y", "command": "true", "depends_on": ["x"]},
        {"id": "z", "command": "true", "depends_on": ["y"]},
    ]}
    done = run_wfctl("validate", str(write_workflow(wfd_tmp, doc)), mark=sandbox.mark)
    line = assert_one_line(done)
    cycle = line.split("cycle: ", 1)[1]
    names = cycle.split(" -> ")
    assert names[0] == names[-1] and sorted(names[:-1]) == ["x", "y", "z"], line
    deps = {"x": "z", "y": "x", "z": "y"}  # `a -> b`: a depends on b
    for a, b in pairwise(names):
        assert deps[a] == b, line


def test_missing_file(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    for command in ("validate", "run"):
        line = assert_one_line(d.wfctl(command, str(wfd_tmp / "nope.json")))
        assert "nope.json" in line
    assert state_files(d) == []


def test_not_utf8(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    path = write_workflow(wfd_tmp, b'{"steps": [{"id": "a", "command": "echo \xff"}]}')
    for command in ("validate", "run"):
        done = d.wfctl(command, str(path))
        assert done.returncode == 2
        assert_no_traceback(done)
        assert done.stderr.strip()
    assert state_files(d) == []


# ---- bad flags --------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--bogus"], ["frobnicate"], ["run"], ["run", "a.json", "--bogus"],
    ["status", "--nope"], ["logs", "r1", "--attempt", "1"], ["logs", "r1", "a", "--attempt", "0"],
    ["logs", "r1", "a", "--attempt", "x"], ["cancel"], ["replay"], ["resume"],
    ["validate", "a.json", "b.json"], [],
])
def test_bad_flags(argv: list[str], sandbox) -> None:
    # rejected before any daemon is contacted: the socket does not even exist
    assert_one_line(run_wfctl("--socket", str(sandbox.root / "none.sock"), *argv,
                              mark=sandbox.mark))


def test_wfd_bad_flags(wfd_tmp: Path, sandbox) -> None:
    env = base_env(sandbox.mark)
    for argv in (["--bogus"], ["--max-parallel", "0"], ["--max-parallel", "x"],
                 ["--log-level", "loud"]):
        done = subprocess.run(
            [sys.executable, "-m", "wfd", "--state-dir", str(wfd_tmp / "s"),
             "--socket", str(wfd_tmp / "s.sock"), *argv],
            capture_output=True, text=True, env=env, timeout=30,
        )
        assert_one_line(done)
    assert not (wfd_tmp / "s.sock").exists()


# ---- unknown and malformed run ids ------------------------------------------------------


UNKNOWN = "20200101T000000Z-00000abc"
MALFORMED = ["../etc", "bad/id", "_x", "a" * 65, "has space", "é"]


def test_unknown_or_malformed_run_id(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    d.submit(write_workflow(wfd_tmp, GOOD), "--wait")  # one known run, not these
    for run_id in [UNKNOWN, *MALFORMED]:
        for argv in (["status", run_id], ["status", run_id, "--json"], ["cancel", run_id],
                     ["logs", run_id, "a"], ["replay", run_id], ["replay", run_id, "--json"],
                     ["resume", run_id]):
            done = d.wfctl(*argv)
            line = assert_one_line(done)
            assert done.stdout == "", argv
            want = "no such run" if run_id == UNKNOWN else "malformed"
            assert want in line, (argv, line)
    assert d.running


def test_unknown_step_and_attempt_in_logs(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(write_workflow(wfd_tmp, GOOD), "--wait")
    assert_one_line(d.wfctl("logs", run_id, "zz"))
    assert_one_line(d.wfctl("logs", run_id, "../x"))
    line = assert_one_line(d.wfctl("logs", run_id, "a", "--attempt", "2"))
    assert "attempt" in line
