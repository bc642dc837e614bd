"""Idempotent submit (issue 14): `wfctl run --key K` a second time, by the same user,
prints the first run's id and makes no run; across a restart, and under a race."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, replay_events, run_json, write_workflow


@pytest.mark.timeout(120)
def test_a_key_submits_once(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    wf = write_workflow(wfd_tmp, {"name": "nightly", "steps": [{"id": "s", "command": "true"}]})
    first = d.wfctl("run", str(wf), "--key", "nightly-2026-12-03", "--wait")
    assert first.returncode == 0, first.stderr
    run_id = first.stdout.strip()
    assert replay_events(d, run_id)[0]["key"] == "nightly-2026-12-03"

    again = d.wfctl("run", str(wf), "--key", "nightly-2026-12-03", "--wait")
    assert (again.returncode, again.stdout.strip()) == (0, run_id)
    assert again.stderr.splitlines()[0] == (f"wfctl: run {run_id} has key "
                                            "'nightly-2026-12-03' already; not submitted again")
    other = d.submit(wf, "--key", "nightly-2026-12-04")
    plain = d.submit(wf)
    assert len({run_id, other, plain}) == 3
    assert d.run_ids() == {run_id, other, plain}

    d.restart()  # the key is in the log: it survives
    assert d.submit(wf, "--key", "nightly-2026-12-03") == run_id
    assert len(run_json(d)) == 3

    # once the run is pruned, its key names nothing: a new run
    assert d.wfctl("prune", "--name", "nightly", "--keep", "2").stdout.split() == [run_id]
    fresh = d.submit(wf, "--key", "nightly-2026-12-03")
    assert fresh not in (run_id, other, plain)

    bad = d.wfctl("run", str(wf), "--key", "a\nb")
    assert bad.returncode == 2 and "key must be 1 to 256 printable characters" in bad.stderr


@pytest.mark.timeout(120)
def test_racing_submits_with_one_key_make_one_run(daemon: Callable[..., Daemon],
                                                   wfd_tmp: Path) -> None:
    d = daemon()
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    procs = [d.popen("run", str(wf), "--key", "once", stdout=-1, stderr=-1, text=True)
             for _ in range(6)]
    outs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    ids = {out.strip() for out, _ in outs}
    assert len(ids) == 1 and d.run_ids() == ids
    assert sum("not submitted again" in err for _, err in outs) == 5
    assert [r["run_id"] for r in json.loads(d.wfctl("status", "--json").stdout)] == list(ids)
