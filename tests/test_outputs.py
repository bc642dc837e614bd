"""Outputs between steps (issue 15), the pure parts: the `$WFD_OUTPUT` file's rules
(wfd/outputs.py), the one-to-one variable names, which steps a step inherits from,
the fold of outputs (state.py), the outcome of an attempt whose file is refused
(scheduler.outcome), and the keeper's file (wfd/outfile.py) against a planted
symlink, a FIFO, another user's file and an oversized file.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from test_state import Story, make_step, make_workflow

from wfd import events as ev
from wfd import scheduler
from wfd import state as st
from wfd.outfile import OutputDirs
from wfd.outputs import (
    MAX_OUTPUT,
    OutputInvalid,
    output_env,
    parse_outputs,
    split_var,
    upstream,
    var_name,
)
from wfd.workflow import STEP_ID_RE

VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---- the file's rules ------------------------------------------------------------------


def test_key_value_lines_blank_lines_and_the_last_value_wins() -> None:
    data = b"FILE=/data/x.tar\n\nROWS=3\nEMPTY=\nEQ=a=b=c\nROWS=4\n"
    assert parse_outputs(data) == {"FILE": "/data/x.tar", "ROWS": "4", "EMPTY": "",
                                   "EQ": "a=b=c"}
    assert parse_outputs(b"") == {}
    assert parse_outputs(b"A=1") == {"A": "1"}  # no final newline needed


@pytest.mark.parametrize(("data", "words"), [
    (b"A=1\nnot a pair\n", 'line 2: expected KEY=VALUE, got "not a pair"'),
    (b"1A=x\n", 'line 1: invalid key "1A" (must match'),
    (b"A-B=x\n", 'invalid key "A-B"'),
    (b"=x\n", 'invalid key ""'),
    (b"_A=x\n", 'invalid key "_A"'),
    (b"A=x\0y\n", "line 1: the value of A holds a NUL character"),
    (b"A=\xff\n", "invalid UTF-8 at byte 2"),
    (b"A\x1b[2J=x\n", 'invalid key "A\\x1b[2J"'),
])
def test_a_bad_file_is_refused_with_one_clear_line(data: bytes, words: str) -> None:
    with pytest.raises(OutputInvalid) as info:
        parse_outputs(data)
    assert words in str(info.value)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_the_cap_is_64_kib() -> None:
    assert MAX_OUTPUT == 65536
    line = b"K=" + b"v" * (MAX_OUTPUT - 3) + b"\n"
    assert len(line) == MAX_OUTPUT
    assert parse_outputs(line)["K"] == "v" * (MAX_OUTPUT - 3)
    with pytest.raises(OutputInvalid, match=r"is over 65536 bytes"):
        parse_outputs(line + b"\n")


# ---- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "key", "name"), [
    ("extract", "ROWS", "WFD_OUT_extract_ROWS"),
    ("make_tar", "FILE", "WFD_OUT_make__tar_FILE"),
    ("load-db", "n", "WFD_OUT_load_2Ddb_n"),
    ("v1.2", "X_Y", "WFD_OUT_v1_2E2_X_Y"),
    ("9", "A", "WFD_OUT_9_A"),
])
def test_names(step: str, key: str, name: str) -> None:
    assert var_name(step, key) == name
    assert split_var(name) == (step, key)


def test_ids_that_would_collide_without_the_escapes_do_not() -> None:
    # `a_b` + `c` and `a` + `b_c` are one name if `_` is kept as it is.
    assert var_name("a_b", "c") != var_name("a", "b_c")
    assert var_name("a-b", "c") != var_name("a_b", "c") != var_name("a.b", "c")
    assert var_name("a_2D", "K") != var_name("a-", "K")


ids = hs.from_regex(STEP_ID_RE, fullmatch=True)
keys = hs.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True)


@settings(max_examples=500, deadline=None)
@given(ids, keys, ids, keys)
def test_names_are_one_to_one_and_valid_variable_names(s1: str, k1: str, s2: str,
                                                       k2: str) -> None:
    name = var_name(s1, k1)
    assert VAR_RE.fullmatch(name)
    assert split_var(name) == (s1, k1)
    assert (var_name(s2, k2) == name) == ((s1, k1) == (s2, k2))


def test_split_var_says_none_for_other_names() -> None:
    for name in ("PATH", "WFD_OUT_", "WFD_OUT_a", "WFD_OUT_a_", "WFD_OUT_a_9x", "WFD_OUT__A"):
        assert split_var(name) is None, name


# ---- who inherits what ------------------------------------------------------------------


def test_upstream_finds_producers_directly_or_not_and_nothing_downstream() -> None:
    # 0 -> 1 -> 2 -> 3, and 4 alone; 5 depends on 2 and 4
    deps = [[], [0], [1], [2], [], [2, 4]]
    producers = {0, 4}
    memo: dict[int, frozenset[int]] = {}
    found = {i: upstream(deps, i, producers.__contains__, memo) for i in range(6)}
    assert found == {0: set(), 1: {0}, 2: {0}, 3: {0}, 4: set(), 5: {0, 4}}


def test_upstream_of_a_long_chain_is_linear() -> None:
    n = 100_000
    deps = [[]] + [[i - 1] for i in range(1, n)]
    memo: dict[int, frozenset[int]] = {}
    looks = 0

    def producer(i: int) -> bool:
        nonlocal looks
        looks += 1
        return i == 0

    for i in range(n):  # as the steps of the chain start, one after another
        assert upstream(deps, i, producer, memo) == ({0} if i else set())
    assert looks < 2 * n
    assert upstream(deps, n - 1, producer, {}) == {0}  # and cold, without recursion


def test_output_env_names_every_output() -> None:
    env = output_env([("a", {"X": "1", "Y": "2"}), ("b-c", {"X": "3"})])
    assert env == {"WFD_OUT_a_X": "1", "WFD_OUT_a_Y": "2", "WFD_OUT_b_2Dc_X": "3"}


# ---- the fold -----------------------------------------------------------------------------


def chain() -> Story:
    return Story(make_workflow(make_step("a"), make_step("b", "a"), make_step("c", "b"))).create()


def succeed_with(story: Story, step: str, outputs: dict[str, str]) -> None:
    story.ready(step)
    attempt = story.claim(step)
    story.emit(ev.AttemptSucceeded, step=step, attempt=attempt, outputs=outputs)


def test_outputs_are_folded_and_shown_in_the_status() -> None:
    story = chain()
    succeed_with(story, "a", {"FILE": "x.tar"})
    assert story.run.producers == {"a": None}
    status = st.run_status(story.run)
    assert status.steps["a"].outputs == {"FILE": "x.tar"}
    assert status.steps["b"].outputs == {}
    # the same events folded again give the same state, outputs and all
    again = st.fold(story.run.workflow, story.events)
    assert again.producers == story.run.producers
    assert st.run_status(again) == status


def test_an_event_without_outputs_is_written_as_before() -> None:
    story = chain()
    succeed_with(story, "a", {})
    line = ev.encode_line(story.events[-1])
    assert b"outputs" not in line
    assert ev.json_decoder.decode(line.rstrip()).outputs == {}
    with_outputs = ev.encode_line(ev.AttemptSucceeded(seq=9, ts="t", step="a", attempt=1,
                                                      outputs={"K": "v"}))
    assert b'"outputs":{"K":"v"}' in with_outputs


def test_resume_keeps_the_outputs_of_succeeded_steps() -> None:
    story = chain()
    succeed_with(story, "a", {"FILE": "x.tar"})
    story.ready("b")
    story.fail("b")
    story.emit(ev.StepSkipped, step="c", cause="b")
    story.finish(st.FAILED)
    seq = story.run.producers_seq
    story.emit(ev.RunResumed)
    assert story.run.steps["a"].outputs == {"FILE": "x.tar"}
    assert story.run.producers_seq == seq  # nothing to compute again


def test_a_step_that_goes_back_to_pending_forgets_its_outputs() -> None:
    # (a step that had succeeded and is reset: what a resume does to cleanup steps)
    story = chain()
    succeed_with(story, "a", {"FILE": "x.tar"})
    rec = story.run.steps["a"]
    st._forget_outputs(story.run, rec, 99)
    assert rec.outputs == {} and story.run.producers == {} and story.run.producers_seq == 99


# ---- the outcome -----------------------------------------------------------------------------


def running(step: str = "a") -> Story:
    story = chain()
    story.ready(step)
    story.claim(step)
    return story


def test_a_success_carries_its_outputs() -> None:
    story = running()
    emit = scheduler.outcome(story.run, "a", 1, 0, now=0.0, rand=0.0, outputs={"K": "v"})
    assert (emit.kind, emit.fields["outputs"]) == (ev.AttemptSucceeded, {"K": "v"})
    emit = scheduler.outcome(story.run, "a", 1, 0, now=0.0, rand=0.0)
    assert emit.kind is ev.AttemptSucceeded and "outputs" not in emit.fields


def test_a_refused_output_file_fails_an_attempt_that_exited_0() -> None:
    story = running()
    why = "output file ($WFD_OUTPUT) is over 65536 bytes"
    emit = scheduler.outcome(story.run, "a", 1, 0, now=0.0, rand=0.0, output_error=why)
    assert emit.kind is ev.StepFailed
    assert (emit.fields["exit_code"], emit.fields["error"]) == (0, why)


# ---- the keeper's file --------------------------------------------------------------------


@pytest.fixture
def dirs():
    made = OutputDirs()
    yield made
    made.close()


def test_no_file_until_the_step_writes_one_and_none_after(dirs: OutputDirs) -> None:
    out = dirs.new_file(None)
    directory = os.path.dirname(out.path)
    assert os.path.basename(os.path.dirname(directory)).startswith("wfd-out-")
    assert os.stat(os.path.dirname(directory)).st_mode & 0o777 == 0o711
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert not os.path.exists(out.path)
    assert out.read() == b""  # wrote nothing: no outputs, not an error
    with open(out.path, "a") as f:
        f.write("A=1\n")
    assert parse_outputs(out.read()) == {"A": "1"}
    out.remove()
    assert not os.path.exists(out.path)
    other = dirs.new_file(None)
    assert other.path != out.path and os.path.dirname(other.path) == directory
    other.remove()
    dirs.close()
    assert not os.path.exists(os.path.dirname(directory))


def test_reading_stops_past_the_cap(dirs: OutputDirs) -> None:
    out = dirs.new_file(None)
    with open(out.path, "ab") as f:
        f.write(b"K=" + b"v" * (4 * MAX_OUTPUT))
    assert len(out.read()) == MAX_OUTPUT + 1
    out.remove()


def test_a_symlink_a_fifo_or_someone_elses_file_is_refused_not_followed(
        dirs: OutputDirs, tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("SECRET=1\n")
    plants = [lambda p: os.symlink(secret, p), os.mkfifo, os.mkdir]
    if os.geteuid() == 0:  # a file of another user's, where the step's should be
        plants.append(lambda p: (open(p, "w").write("X=1\n"), os.chown(p, 12345, 12345)))
    for plant in plants:
        out = dirs.new_file(None)
        plant(out.path)
        with pytest.raises(OutputInvalid, match="not a regular file of the step's user"):
            out.read()
        out.remove()


def test_a_directory_removed_by_a_temp_cleaner_is_made_again(dirs: OutputDirs) -> None:
    out = dirs.new_file(None)
    out.remove()
    directory = os.path.dirname(out.path)
    os.rmdir(directory)
    os.rmdir(os.path.dirname(directory))
    again = dirs.new_file(None)
    with open(again.path, "w") as f:
        f.write("B=2\n")
    assert parse_outputs(again.read()) == {"B": "2"}
    again.remove()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to make a directory for nobody")
def test_another_users_directory_is_theirs(dirs: OutputDirs) -> None:
    import pwd

    from wfd.users import UserIds

    nobody = pwd.getpwnam("nobody")
    out = dirs.new_file(UserIds(nobody.pw_uid, nobody.pw_gid, ()))
    info = os.stat(os.path.dirname(out.path))
    assert (info.st_uid, info.st_mode & 0o777) == (nobody.pw_uid, 0o700)
    with open(out.path, "w") as f:
        f.write("A=1\n")
    with pytest.raises(OutputInvalid):  # root's file, not nobody's
        out.read()
    os.chown(out.path, nobody.pw_uid, nobody.pw_gid)
    assert out.read() == b"A=1\n"
    out.remove()


def test_the_next_keeper_of_a_state_dir_sweeps_what_a_dead_one_left(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_text("keep me\n")
    dead = OutputDirs("t35t")  # a keeper killed with attempts running: never closed
    left = dead.new_file(None)
    with open(left.path, "w") as f:
        f.write("A=1\n")
    os.symlink(target, os.path.join(os.path.dirname(left.path), "link"))
    other = OutputDirs("0th3r")  # another state dir's keeper, alive
    theirs = other.new_file(None)
    try:
        after = OutputDirs("t35t")
        mine = after.new_file(None)
        assert not os.path.exists(dead.base)
        assert target.read_text() == "keep me\n"  # the link went, not what it named
        assert os.path.isdir(other.base) and os.path.isdir(os.path.dirname(mine.path))
        mine.remove()
        after.close()
    finally:
        theirs.remove()
        other.close()
        left.remove()


def test_a_welcome_with_many_ends_full_of_outputs_can_be_read() -> None:
    """A daemon down while 300 attempts each wrote 64 KiB of outputs: the keeper's welcome
    (over 16 MiB) must still reach the next daemon, or it could never start."""
    import asyncio

    from wfd import keeper as k

    value = "v" * (MAX_OUTPUT - 8)
    ended = [k.ExitRecord(run_id="r", step=f"s{i}", attempt=1, exit_code=0,
                          outputs={"K": value}) for i in range(300)]
    data = k.frame(k.KWelcome(version=k.KEEPER_PROTOCOL, pid=1, running=[], ended=ended))
    assert len(data) > 16 * 1024 * 1024

    async def read() -> object:
        reader = asyncio.StreamReader(limit=len(data) + 1)
        reader.feed_data(data)
        reader.feed_eof()
        return k.decode_reply(await k.read_frame(reader))

    welcome = asyncio.run(read())
    assert len(welcome.ended) == 300 and welcome.ended[-1].outputs == {"K": value}


@settings(max_examples=300, deadline=None)
@given(hs.data())
def test_upstream_agrees_with_a_brute_force_closure_on_random_dags(data: hs.DataObject) -> None:
    """Steps finish in a random topological order, some with outputs; each step, as it
    starts, must get exactly the producers among its ancestors that finished before it,
    with the memo kept while no producer is added and dropped when one is (the engine's
    rule, `producers_seq`)."""
    n = data.draw(hs.integers(1, 12))
    deps = [sorted(data.draw(hs.sets(hs.integers(0, i - 1), max_size=3)) if i else [])
            for i in range(n)]
    makes_outputs = data.draw(hs.lists(hs.booleans(), min_size=n, max_size=n))
    ancestors: list[set[int]] = []
    for i in range(n):
        ancestors.append(set().union(*({d} | ancestors[d] for d in deps[i])))
    done: set[int] = set()
    producers: set[int] = set()
    memo: dict[int, frozenset[int]] = {}
    while len(done) < n:
        startable = [i for i in range(n) if i not in done and set(deps[i]) <= done]
        i = data.draw(hs.sampled_from(startable))
        assert upstream(deps, i, producers.__contains__, memo) == ancestors[i] & producers
        done.add(i)
        if makes_outputs[i]:
            producers.add(i)
            memo = {}  # a new producer: the engine drops the memo (producers_seq moved)
