"""Shared pools through the real daemon (issue 15): `wfd --pool`, a step's `pool`,
`wfctl pool list|set`, and the limit kept across restarts.

Steps stamp `RUN:STEP start|end TIME` into a ledger with `date +%s.%N` (see
test_e2e_dag.py): a stamp written inside a step lies within the daemon's own start
and end of it, so the stamps' overlap is a lower bound of the real one."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, run_json, wait_until, write_workflow
from test_e2e_dag import max_overlap, read_stamps


def stamped(stamps: Path, sleep: float, go: Path) -> str:
    """Stamp the start; wait for `go` to exist, then `sleep`; stamp the end."""
    name = "$WFD_RUN_ID:$WFD_STEP_ID"
    return (f'echo "{name} start $(date +%s.%N)" >> {stamps}; '
            f'while [ ! -e {go} ]; do sleep 0.05; done; sleep {sleep}; '
            f'echo "{name} end $(date +%s.%N)" >> {stamps}')


def pools(d: Daemon) -> dict[str, dict]:
    done = d.wfctl("pool", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {pool["name"]: pool for pool in json.loads(done.stdout)}


def steps_in(d: Daemon, run_id: str, state: str) -> list[str]:
    return [sid for sid, step in run_json(d, run_id)["steps"].items() if step["state"] == state]


@pytest.mark.timeout(120)
def test_two_runs_sharing_a_pool_of_one_never_overlap(daemon: Callable[..., Daemon],
                                                      wfd_tmp: Path) -> None:
    ledger, go = wfd_tmp / "ledger", wfd_tmp / "go"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": stamped(ledger, 0.3, go), "pool": "db"},
        {"id": "b", "command": stamped(ledger, 0.3, go), "pool": "db"},
        {"id": "free", "command": "true"},
    ]})
    d = daemon(max_parallel=4, extra=["--pool", "db=1"])

    runs = [d.submit(wf), d.submit(wf)]
    # While one holds the slot, a READY step of the pool says what it waits for.
    wait_until(lambda: [
        (run_id, sid) for run_id in runs
        for sid, step in run_json(d, run_id)["steps"].items()
        if step["waiting"] == "pool db" and step["state"] == "READY"], timeout=30)
    wait_until(lambda: any("waiting for pool db" in d.wfctl("status", run_id).stdout
                           for run_id in runs), timeout=30)
    go.touch()  # until now the first step holds the slot
    for run_id in runs:
        wait_until(lambda r=run_id: run_json(d, r)["state"] == "SUCCEEDED", timeout=60)

    intervals = read_stamps(ledger)
    assert len(intervals) == 4  # two runs, two pooled steps each
    assert max_overlap(list(intervals.values())) == 1, intervals
    assert pools(d)["db"] == {"name": "db", "limit": 1, "running": 0, "waiting": 0,
                              "source": "option"}


@pytest.mark.timeout(120)
def test_a_limit_raised_at_run_time_takes_effect_and_is_kept(daemon: Callable[..., Daemon],
                                                             wfd_tmp: Path) -> None:
    go = wfd_tmp / "go"
    hold = f"while [ ! -e {go} ]; do sleep 0.05; done"
    wf = write_workflow(wfd_tmp, {"defaults": {"pool": "db"}, "steps": [
        {"id": f"s{i}", "command": hold} for i in range(3)]})
    d = daemon(max_parallel=4, extra=["--pool", "db=1"])
    run_id = d.submit(wf)
    wait_until(lambda: len(steps_in(d, run_id, "RUNNING")) == 1
               and len(steps_in(d, run_id, "READY")) == 2, timeout=30)
    assert pools(d)["db"]["running"] == 1 and pools(d)["db"]["waiting"] == 2

    done = d.wfctl("pool", "set", "db", "3")

    assert done.returncode == 0, done.stderr
    assert "pool db: limit 3" in done.stderr
    wait_until(lambda: len(steps_in(d, run_id, "RUNNING")) == 3, timeout=30)
    assert pools(d)["db"]["limit"] == 3 and pools(d)["db"]["source"] == "set"
    listed = d.wfctl("pool", "list").stdout.splitlines()
    assert listed[0].split() == ["POOL", "LIMIT", "RUNNING", "WAITING", "SET", "BY"]
    assert listed[1].split() == ["db", "3", "3", "0", "wfctl", "pool", "set"]
    go.touch()
    wait_until(lambda: run_json(d, run_id)["state"] == "SUCCEEDED", timeout=30)

    d.restart()  # the same --pool db=1: the limit set at run time still wins
    assert pools(d)["db"]["limit"] == 3
    d.stop()
    d.extra = ["--pool", "db=2"]  # the command line changed: it wins again
    d.start()
    assert pools(d)["db"] == {"name": "db", "limit": 2, "running": 0, "waiting": 0,
                              "source": "option"}


@pytest.mark.timeout(60)
def test_a_pool_set_at_run_time_is_a_new_pool_and_lowering_lets_steps_finish(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    go = wfd_tmp / "go"
    hold = f"while [ ! -e {go} ]; do sleep 0.05; done"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": f"s{i}", "command": hold, "pool": "net"} for i in range(3)]})
    d = daemon(max_parallel=4)
    refused = d.wfctl("run", str(wf))
    assert refused.returncode == 2
    assert "names pool 'net', which wfd does not have (its pools: none)" in refused.stderr
    assert d.wfctl("pool", "set", "net", "2").returncode == 0
    run_id = d.submit(wf)
    wait_until(lambda: len(steps_in(d, run_id, "RUNNING")) == 2, timeout=30)

    assert d.wfctl("pool", "set", "net", "0").returncode == 0

    assert len(steps_in(d, run_id, "RUNNING")) == 2  # lowering stops nothing
    go.touch()
    wait_until(lambda: not steps_in(d, run_id, "RUNNING"), timeout=30)
    assert steps_in(d, run_id, "READY") == ["s2"]  # and starts nothing over the limit
    assert run_json(d, run_id)["steps"]["s2"]["waiting"] == "pool net"
    assert d.wfctl("pool", "set", "net", "1").returncode == 0
    wait_until(lambda: run_json(d, run_id)["state"] == "SUCCEEDED", timeout=30)


@pytest.mark.timeout(60)
def test_bad_pool_input_is_one_line_and_exit_2(daemon: Callable[..., Daemon],
                                               wfd_tmp: Path) -> None:
    d = daemon()
    for args, says in [
        (("pool", "set", "a b", "2"), "bad pool name 'a b'"),
        (("pool", "set", "db", "-1"), "a pool's limit is an integer 0 or more"),
        (("pool", "set", "db"), "pool set needs NAME and N"),
        (("pool", "list", "db"), "pool list takes no NAME"),
    ]:
        done = d.wfctl(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert pools(d) == {}
    for option in ("db", "db=x", "=2", "db=-1"):
        bad = Daemon(wfd_tmp, "bad", d.mark, extra=["--pool", option])
        done = subprocess.run(bad.argv, env=bad.env, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2, (option, done.stderr)
        assert done.stderr.startswith("wfd: error: --pool"), done.stderr
