"""A step's environment, cwd, umask, stdin and argv through the real daemon (SPEC 1)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from helpers import Daemon, run_json, write_workflow

DUMP_ENV = ["python3", "-c",
            "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"]


def run_ok(d: Daemon, wf: Path, **kwargs) -> str:
    done = d.wfctl("run", str(wf), "--wait", **kwargs)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout.strip()


def test_env_layering_and_marks(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {
        "env": {"B": "workflow", "C": "workflow", "D": "workflow", "E": "workflow"},
        "defaults": {"env": {"C": "defaults", "D": "defaults"}},
        "steps": [
            {"id": "s", "command": [*DUMP_ENV, str(wfd_tmp / "s.env")], "env": {"D": "step"}},
            {"id": "t", "command": [*DUMP_ENV, str(wfd_tmp / "t.env")],
             "env": {"E": "", "C": "t"}, "retries": 1, "backoff": {"initial": 0.05}},
            {"id": "u", "command": f'[ "$WFD_ATTEMPT" = 2 ] && {" ".join(DUMP_ENV[:2])} '
                                   f'"{DUMP_ENV[2]}" {wfd_tmp / "u.env"}',
             "retries": 1, "backoff": {"initial": 0.05}},
        ],
    })
    d = daemon()
    client = {"A": "client", "B": "client", "C": "client", "D": "client", "E": "client",
              "SECRET_TOKEN": "s3cr3t"}
    run_id = run_ok(d, wf, env=client)

    s = json.loads((wfd_tmp / "s.env").read_text())
    assert (s["A"], s["B"], s["C"], s["D"], s["E"]) == (
        "client", "workflow", "defaults", "step", "workflow")
    assert s["SECRET_TOKEN"] == "s3cr3t"
    assert (s["WFD_RUN_ID"], s["WFD_STEP_ID"], s["WFD_ATTEMPT"]) == (run_id, "s", "1")
    t = json.loads((wfd_tmp / "t.env").read_text())
    assert (t["C"], t["D"], t["E"]) == ("t", "defaults", "")  # an empty value is a value
    u = json.loads((wfd_tmp / "u.env").read_text())
    assert (u["WFD_STEP_ID"], u["WFD_ATTEMPT"]) == ("u", "2")
    assert run_json(d, run_id)["steps"]["u"]["attempts"] == 2


def test_workflow_env_wins_over_login_variables(daemon: Callable[..., Daemon],
                                                wfd_tmp: Path) -> None:
    # SPEC 6: the passwd entry's HOME/USER/LOGNAME/SHELL override the *client's*; the
    # workflow's env comes later in SPEC 1's layering and wins over both.
    wf = write_workflow(wfd_tmp, {
        "env": {"HOME": str(wfd_tmp), "SHELL": "/bin/false"},
        "steps": [{"id": "s", "command": [*DUMP_ENV, str(wfd_tmp / "s.env")],
                   "env": {"USER": "someone", "LOGNAME": "someone"}}],
    })
    d = daemon()
    run_ok(d, wf)
    env = json.loads((wfd_tmp / "s.env").read_text())
    assert (env["HOME"], env["SHELL"], env["USER"], env["LOGNAME"]) == (
        str(wfd_tmp), "/bin/false", "someone", "someone")


def test_daemon_variables_are_not_passed(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "command": [*DUMP_ENV, str(wfd_tmp / "s.env")]}]})
    d = daemon()
    client = {
        "NOTIFY_SOCKET": "/run/systemd/notify", "LISTEN_FDS": "1", "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "wfd.socket", "JOURNAL_STREAM": "8:1234", "INVOCATION_ID": "abc",
        "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1",
        "WFD_RUN_ID": "20200101T000000Z-00000abc", "WFD_STEP_ID": "x", "WFD_ATTEMPT": "9",
        "KEEP_ME": "yes",
    }
    run_id = run_ok(d, wf, env=client)
    env = json.loads((wfd_tmp / "s.env").read_text())
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                 "JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in env, name
    assert (env["WFD_RUN_ID"], env["WFD_STEP_ID"], env["WFD_ATTEMPT"]) == (run_id, "s", "1")
    assert env["KEEP_ME"] == "yes"


def test_submitted_env_is_kept_private(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "command": "true"}]})
    d = daemon()
    run_id = run_ok(d, wf, env={"SECRET_TOKEN": "s3cr3t"})
    run_dir = d.state_dir / "runs" / run_id
    stored = json.loads((run_dir / "workflow.json").read_text())
    assert stored["env"]["SECRET_TOKEN"] == "s3cr3t"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for path in [run_dir / "workflow.json", run_dir / "events.jsonl",
                 *(run_dir / "logs").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_cwd_is_relative_to_the_workflow_file(daemon: Callable[..., Daemon],
                                              wfd_tmp: Path) -> None:
    proj = wfd_tmp / "proj"
    (proj / "sub" / "deeper").mkdir(parents=True)
    (wfd_tmp / "elsewhere").mkdir()
    abs_dir = wfd_tmp / "abs"
    abs_dir.mkdir()
    wf = write_workflow(proj, {
        "defaults": {"cwd": "sub"},
        "steps": [
            {"id": "default", "command": f"pwd > {wfd_tmp}/default.cwd"},
            {"id": "own", "command": f"pwd > {wfd_tmp}/own.cwd", "cwd": "sub/deeper"},
            {"id": "dot", "command": f"pwd > {wfd_tmp}/dot.cwd", "cwd": "."},
            {"id": "abs", "command": f"pwd > {wfd_tmp}/abs.cwd", "cwd": str(abs_dir)},
            {"id": "script", "command": ["./tool.sh"], "cwd": "."},
        ],
    })
    tool = proj / "tool.sh"
    tool.write_text(f"#!/bin/sh\npwd > {wfd_tmp}/script.cwd\n")
    tool.chmod(0o755)
    d = daemon()
    # submitted from another directory, with a relative path to the file
    run_ok(d, Path(os.path.relpath(wf, wfd_tmp / "elsewhere")), cwd=wfd_tmp / "elsewhere")

    def cwd_of(name: str) -> str:
        return (wfd_tmp / f"{name}.cwd").read_text().strip()

    assert cwd_of("default") == str(proj / "sub")
    assert cwd_of("own") == str(proj / "sub" / "deeper")
    assert cwd_of("dot") == str(proj)
    assert cwd_of("abs") == str(abs_dir)
    assert cwd_of("script") == str(proj)


def test_no_cwd_means_the_workflow_files_directory(daemon: Callable[..., Daemon],
                                                   wfd_tmp: Path) -> None:
    proj = wfd_tmp / "proj"
    proj.mkdir()
    wf = write_workflow(proj, {"steps": [{"id": "s", "command": "pwd > here"}]})
    d = daemon()
    run_ok(d, wf, cwd="/")
    assert (proj / "here").read_text().strip() == str(proj)


def test_umask_of_the_client(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "command": "touch f; mkdir d; umask > umask"}]})
    d = daemon()
    for umask, file_mode, dir_mode in ((0o027, 0o640, 0o750), (0o002, 0o664, 0o775)):
        for p in ("f", "d", "umask"):
            if (wfd_tmp / p).is_dir():
                (wfd_tmp / p).rmdir()
            else:
                (wfd_tmp / p).unlink(missing_ok=True)
        run_ok(d, wf, umask=umask)
        assert stat.S_IMODE((wfd_tmp / "f").stat().st_mode) == file_mode
        assert stat.S_IMODE((wfd_tmp / "d").stat().st_mode) == dir_mode
        assert int((wfd_tmp / "umask").read_text(), 8) == umask


def test_stdin_is_dev_null(daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "s", "command": "readlink /proc/self/fd/0 > stdin; cat > got; echo done",
         "timeout": 20}]})
    d = daemon()
    # the client's own stdin is an open pipe: the step must not inherit it
    run_id = run_ok(d, wf, input="from the client\n")
    assert (wfd_tmp / "stdin").read_text().strip() == "/dev/null"
    assert (wfd_tmp / "got").read_text() == ""
    assert run_json(d, run_id)["steps"]["s"]["state"] == "SUCCEEDED"


def test_list_command_runs_without_a_shell(daemon: Callable[..., Daemon],
                                           wfd_tmp: Path) -> None:
    args = ["$HOME", "a;b", "`id`", "$(echo hi)", "*", "x > y", "'q'", ""]
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "list", "command": ["python3", "-c",
                                   "import json, sys; print(json.dumps(sys.argv[1:]))", *args]},
        {"id": "shell", "command": "echo $((6 * 7)); echo a;echo b"},
    ]})
    d = daemon()
    run_id = run_ok(d, wf)
    out = d.wfctl("logs", run_id, "list")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == args
    assert not (wfd_tmp / "y").exists()
    assert d.wfctl("logs", run_id, "shell").stdout == "42\na\nb\n"
