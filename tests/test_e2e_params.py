"""Declared workflow `params` through the real `wfctl` and `wfd` (issue 15): a typo or a
missing required param is refused (exit 2, nothing created) by wfctl and by the daemon
itself; defaults fill in, are recorded with the run and reach the steps, above every
level of `env`, as any `KEY=VALUE` variable."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Daemon, replay_events, run_json, run_wfctl, write_workflow

from wfd import protocol as p

pytestmark = pytest.mark.timeout(120)

DUMP_ENV = ["python3", "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]


def deploy(tmp: Path) -> Path:
    return write_workflow(tmp, {
        "name": "deploy",
        "params": {"BRANCH": {"default": "main", "description": "the branch"},
                   "TARGET": {"required": True}, "NOTE": {}},
        "env": {"BRANCH": "workflow-env", "OTHER": "workflow-env"},
        "steps": [{"id": "s", "command": [*DUMP_ENV, str(tmp / "s.env")],
                   "env": {"BRANCH": "step-env"}}],
    })


def test_defaults_fill_in_and_reach_the_steps(daemon: Callable[..., Daemon],
                                              wfd_tmp: Path) -> None:
    d = daemon()
    run_id = d.submit(deploy(wfd_tmp), "TARGET=web1", "--wait")
    env = json.loads((wfd_tmp / "s.env").read_text())
    assert (env["BRANCH"], env["TARGET"], env["OTHER"]) == ("main", "web1", "workflow-env")
    assert "NOTE" not in env  # no default, not given: not set
    status = run_json(d, run_id)
    assert status["vars"] == {"BRANCH": "main", "TARGET": "web1"}
    assert replay_events(d, run_id)[0]["vars"] == status["vars"]

    d.submit(deploy(wfd_tmp), "TARGET=web2", "BRANCH=v2", "NOTE=", "--wait")
    env = json.loads((wfd_tmp / "s.env").read_text())
    assert (env["BRANCH"], env["TARGET"], env["NOTE"]) == ("v2", "web2", "")


@pytest.mark.parametrize(("words", "message"), [
    (["TARGET=web1", "BRANHC=dev"],
     "wfctl: unknown param 'BRANHC' (did you mean 'BRANCH'?); workflow 'deploy' declares "
     "BRANCH, TARGET, NOTE\n"),
    ([], "wfctl: missing required param 'TARGET' (wfctl run FILE TARGET=VALUE)\n"),
])
def test_wfctl_refuses_a_typo_and_a_missing_param(daemon: Callable[..., Daemon],
                                                  wfd_tmp: Path, words: list[str],
                                                  message: str) -> None:
    d = daemon()
    done = d.wfctl("run", str(deploy(wfd_tmp)), *words, "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (2, "", message)
    assert d.run_ids() == set()


def submit_raw(d: Daemon, tmp: Path, variables: dict[str, str]) -> object:
    """A Submit straight on the socket: a client that is not wfctl checks nothing."""
    submit = p.Submit(workflow=deploy(tmp).read_text(), source="deploy.json",
                      base_dir=str(tmp), env={}, umask=0o22, vars=variables)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(d.socket))
        p.send(sock, submit)
        return p.recv_reply(sock)


def test_the_daemon_checks_params_and_fills_in_defaults_itself(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    reply = submit_raw(d, wfd_tmp, {"TARGETT": "web1"})
    assert isinstance(reply, p.Error) and reply.code == 2
    assert reply.message == (
        "unknown param 'TARGETT' (did you mean 'TARGET'?); workflow 'deploy' declares "
        "BRANCH, TARGET, NOTE; missing required param 'TARGET' (wfctl run FILE TARGET=VALUE)")
    assert d.run_ids() == set()
    reply = submit_raw(d, wfd_tmp, {"TARGET": "web1"})
    assert isinstance(reply, p.Submitted)
    assert replay_events(d, reply.run_id)[0]["vars"] == {"BRANCH": "main", "TARGET": "web1"}


def test_validate_lists_the_params(wfd_tmp: Path) -> None:
    path = deploy(wfd_tmp)
    done = run_wfctl("validate", str(path), mark="params")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        f"{path}: ok (1 step)",
        "PARAM   DEFAULT     DESCRIPTION",
        "BRANCH  main        the branch",
        "TARGET  (required)  -",
        "NOTE    (unset)     -",
    ]
