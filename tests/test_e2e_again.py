"""Again (issue 14), through the real binaries: `wfctl rerun` (a new run of a run's
stored workflow, context and variables), `wfctl retry RUN STEP... [--downstream]` (steps
again in the same run; succeeded steps upstream are not rerun), and --wait / --follow on
resume, retry and rerun."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, replay_events, run_json, wait_for_state, write_workflow


def counted(name: str, work: Path, extra: str = "") -> str:
    """A command that appends its step's name and attempt to `ran`, then runs `extra`."""
    return f'echo "{name} $WFD_ATTEMPT" >> {work / "ran"}; {extra or "true"}'


def ran(work: Path) -> list[str]:
    return (work / "ran").read_text().splitlines()


@pytest.mark.timeout(180)
def test_retry_named_steps_and_downstream(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"name": "chain", "steps": [
        {"id": "a", "command": counted("a", wfd_tmp)},
        {"id": "b", "command": counted("b", wfd_tmp, f"test -e {gate}"), "depends_on": ["a"]},
        {"id": "c", "command": counted("c", wfd_tmp), "depends_on": ["b"]},
        {"id": "d", "command": counted("d", wfd_tmp)},
    ]})
    first = d.wfctl("run", str(wf), "--wait")
    assert first.returncode == 1, first.stderr
    run_id = first.stdout.strip()
    assert sorted(ran(wfd_tmp)) == ["a 1", "b 1", "d 1"]

    refused = d.wfctl("retry", run_id, "c")
    assert refused.returncode == 2
    assert "step 'c' depends on 'b', which is FAILED: retry 'b' too" in refused.stderr
    unknown = d.wfctl("retry", run_id, "bb")
    assert unknown.returncode == 2
    assert "has no step 'bb'; did you mean 'b'? its steps: a, b, c, d" in unknown.stderr

    gate.touch()
    only_b = d.wfctl("retry", "chain@last", "b", "--wait")
    # c stays SKIPPED (not named); no step FAILED, so the run SUCCEEDED (issue 15's rule)
    assert only_b.returncode == 0, only_b.stderr
    assert only_b.stderr.splitlines()[0] == f"run {run_id} retrying b"
    status = run_json(d, run_id)
    assert [status["steps"][s]["state"] for s in "abcd"] == [
        "SUCCEEDED", "SUCCEEDED", "SKIPPED", "SUCCEEDED"]
    assert status["steps"]["b"]["attempts"] == 2

    again = d.wfctl("retry", run_id, "b", "--downstream", "--follow")
    assert again.returncode == 0, again.stderr
    assert f"run {run_id} retrying b, c" in again.stderr
    assert "b: SUCCEEDED (attempt 3)" in again.stderr and "c: SUCCEEDED" in again.stderr
    assert "a: RUNNING" not in again.stderr  # --follow shows this retry, not the history
    assert sorted(ran(wfd_tmp)) == ["a 1", "b 1", "b 2", "b 3", "c 1", "d 1"]  # a, d once
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    kinds = [e["type"] for e in replay_events(d, run_id)]
    assert kinds.count("StepsRetried") == 2 and kinds.count("RunFinished") == 3
    assert d.wfctl("replay", run_id).returncode == 0  # the log folds cleanly

    # a succeeded step is rerun when named, with what follows it
    everything = d.wfctl("retry", run_id, "a", "--downstream", "--wait")
    assert everything.returncode == 0, everything.stderr
    assert sorted(ran(wfd_tmp))[-4:] == ["b 4", "c 1", "c 2", "d 1"]
    assert ran(wfd_tmp).count("d 1") == 1 and "a 2" in ran(wfd_tmp)


@pytest.mark.timeout(120)
def test_retry_of_a_running_run_is_refused(daemon: Callable[..., Daemon],
                                           wfd_tmp: Path) -> None:
    d = daemon()
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "sleep 60",
                                             "kill_grace": 1}]})
    run_id = d.submit(wf)
    wait_for_state(d, run_id, "RUNNING")
    done = d.wfctl("retry", run_id, "s")
    assert done.returncode == 2 and "is running" in done.stderr
    assert d.wfctl("cancel", run_id).returncode == 0


@pytest.mark.timeout(120)
def test_resume_wait_and_follow(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    gate = wfd_tmp / "gate"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "ok", "command": "true"},
        {"id": "gated", "command": f"test -e {gate}", "depends_on": ["ok"]}]})
    assert d.wfctl("run", str(wf), "--wait").returncode == 1
    still = d.wfctl("resume", "@last", "--wait")
    assert still.returncode == 1 and "FAILED" in still.stderr
    gate.touch()
    done = d.wfctl("resume", "@last", "--follow")
    assert done.returncode == 0, done.stderr
    assert "run: RUNNING (resumed)" in done.stderr and "gated: SUCCEEDED" in done.stderr
    assert "ok: RUNNING" not in done.stderr  # from the resume on, not the run's history


@pytest.mark.timeout(120)
def test_rerun_uses_the_stored_workflow_context_and_variables(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    sub = wfd_tmp / "sub"
    sub.mkdir()
    wf = write_workflow(wfd_tmp, {"name": "report", "steps": [
        {"id": "s", "command": 'echo "$X $Y $(pwd) $WFD_RUN_ID" >> out', "cwd": "sub"}]})
    first = d.submit(wf, "X=1", "Y=a", "--wait")
    wf.write_text("this file changed since: the stored workflow is what runs again")

    second = d.wfctl("rerun", "report@last", "--wait")
    assert second.returncode == 0, second.stderr
    second_id = second.stdout.strip()
    third = d.wfctl("rerun", first, "X=2", "--follow")
    assert third.returncode == 0, third.stderr
    third_id = third.stdout.strip()
    assert "s: SUCCEEDED" in third.stderr
    assert len({first, second_id, third_id}) == 3
    assert (sub / "out").read_text().splitlines() == [
        f"1 a {sub} {first}", f"1 a {sub} {second_id}", f"2 a {sub} {third_id}"]
    assert replay_events(d, third_id)[0]["vars"] == {"X": "2", "Y": "a"}

    for argv, words in [(["rerun", "nope@last"], "no runs of workflow 'nope'"),
                        (["rerun", first, "WFD_X=1"], "WFD_"),
                        (["rerun", first, "novalue"], "KEY=VALUE")]:
        bad = d.wfctl(*argv)
        assert bad.returncode == 2 and words in bad.stderr, (argv, bad.stderr)
