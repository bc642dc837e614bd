"""`wfctl run FILE KEY=VALUE...`: variables of every step, over every level of the
workflow's env, stored apart from the client's environment (issue 13)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, replay_events, run_json, write_workflow

DUMP_ENV = ["python3", "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]

pytestmark = pytest.mark.timeout(120)


def test_vars_win_over_every_level(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {
        "env": {"A": "workflow", "B": "workflow"},
        "defaults": {"env": {"C": "defaults"}},
        "steps": [{"id": "s", "command": [*DUMP_ENV, str(wfd_tmp / "s.env")],
                   "env": {"D": "step"}}],
    })
    d = daemon()
    client = {"A": "client", "E": "client"}
    # Before and after an option: argparse leaves the later ones over; both count.
    done = d.wfctl("run", str(wf), "A=var", "C=var", "--wait", "D=var", "F=a=b", "G=",
                   env=client)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    env = json.loads((wfd_tmp / "s.env").read_text())
    assert (env["A"], env["B"], env["C"], env["D"], env["E"], env["F"], env["G"]) == (
        "var", "workflow", "var", "var", "client", "a=b", "")
    # Stored with the run, apart from the client's environment.
    status = run_json(d, run_id)
    assert status["vars"] == {"A": "var", "C": "var", "D": "var", "F": "a=b", "G": ""}
    created = replay_events(d, run_id)[0]
    assert created["type"] == "RunCreated" and created["vars"] == status["vars"]
    submission = json.loads((d.state_dir / "runs" / run_id / "workflow.json").read_text())
    assert "F" not in submission["env"] and submission["env"]["A"] == "client"
    shown = d.wfctl("status", run_id)
    assert "vars A=var C=var D=var F=a=b G=" in shown.stdout


def test_vars_survive_a_restart(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    # The step runs after a daemon restart: its vars come from the log, not from memory.
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": ["sleep", "1.5"]},
        {"id": "b", "command": [*DUMP_ENV, str(wfd_tmp / "b.env")], "depends_on": ["a"]}]})
    d = daemon()
    run_id = d.submit(wf, "X=1")
    d.kill()
    d.start()
    done = d.wfctl("status", run_id, "--json")
    assert done.returncode == 0
    from helpers import wait_for_state
    wait_for_state(d, run_id, "SUCCEEDED", timeout=60)
    assert json.loads((wfd_tmp / "b.env").read_text())["X"] == "1"


@pytest.mark.parametrize(("words", "message"), [
    (["WFD_RUN_ID=x"], "WFD_RUN_ID: WFD_* variables are set by wfd, not by the caller"),
    (["NOEQUALS"], "expected KEY=VALUE, got 'NOEQUALS'"),
    (["=value"], "expected KEY=VALUE, got '=value'"),
    (["A\x01=1"], "invalid variable name (must not contain control characters)"),
])
def test_bad_vars_are_usage_errors(daemon: Callable[..., Daemon], wfd_tmp: Path,
                                   words: list[str], message: str) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    d = daemon()
    done = d.wfctl("run", str(wf), *words)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert d.run_ids() == set()


def test_daemon_refuses_wfd_vars_from_any_client(daemon: Callable[..., Daemon],
                                                 wfd_tmp: Path) -> None:
    # wfctl refuses them first; the daemon must too, for a client that is not wfctl.
    import socket

    from wfd import protocol as p

    d = daemon()
    submit = p.Submit(workflow='{"steps": [{"id": "s", "command": "true"}]}', source="x",
                      base_dir=str(wfd_tmp), env={}, umask=0o22,
                      vars={"OK": "1", "WFD_SCHEDULE": "forged"})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(d.socket))
        p.send(sock, submit)
        reply = p.recv_reply(sock)
    assert isinstance(reply, p.Error) and reply.code == 2
    assert "vars['WFD_SCHEDULE']: WFD_* variables are set by wfd" in reply.message
    assert d.run_ids() == set()
