"""wfctl through its real entry point (`python -m wfctl`), with no real daemon.

Where a daemon must answer, a fake one does: a small threaded socket server
speaking wfd.protocol that records each request and answers from a script.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import hello, popen_wfctl, run_wfctl, wait_until, write_workflow

from wfd import events as ev
from wfd import protocol as p
from wfd.state import RunStatus, RunSummary, StepStatus, describe

GOOD = {
    "name": "etl",
    "steps": [
        {"id": "extract", "command": "true"},
        {"id": "load", "command": ["true"], "depends_on": ["extract"]},
    ],
}
RUN_ID = "20261125T095852Z-7f3a9c01"
CLOSE = object()  # in a script: close the connection here
HANG = object()  # in a script: keep the connection open and say nothing until the test ends


def frame_v(version: int, msg: p.Message) -> bytes:
    """A frame as a daemon of protocol `version` would send it."""
    body = msgspec.msgpack.encode(p.Envelope(version, msgspec.Raw(msgspec.msgpack.encode(msg))))
    return p.HEADER.pack(len(body)) + body


def status_of(state: str = "SUCCEEDED", error: str | None = None) -> RunStatus:
    return RunStatus(
        run_id=RUN_ID, name="etl", owner="root", state=state,
        created_at="2026-11-25T09:58:52.123456Z", finished_at="2026-11-25T10:01:56.000001Z",
        error=error,
        steps={
            "extract": StepStatus("SUCCEEDED", 1, 0, "2026-11-25T09:58:52.200000Z",
                                  "2026-11-25T09:58:53.400000Z", None, cpu=0.734),
            "load": StepStatus("FAILED", 3, -9, "2026-11-25T09:58:53.500000Z",
                               "2026-11-25T10:01:56.000000Z", "timed out after 120 s"),
        },
    )


def events_of() -> list[ev.Event]:
    ts = "2026-11-25T09:58:52.123456Z"
    return [
        ev.RunCreated(seq=1, ts=ts, run_id=RUN_ID, name="etl", owner="root", owner_uid=0),
        ev.StepReady(seq=2, ts=ts, step="extract"),
        ev.AttemptClaimed(seq=3, ts=ts, step="extract", attempt=1),
        ev.AttemptSucceeded(seq=4, ts=ts, step="extract", attempt=1),
    ]


class FakeDaemon:
    """Answers Hello, records every request, answers others with `script(request)`:
    an iterable of Messages, raw frames (bytes), CLOSE or HANG."""

    def __init__(self, path: Path, script: Callable[[Any], Iterable[Any]] | None = None,
                 greeting: Iterable[Any] = ()) -> None:
        self.path = path
        self.script = script or (lambda request: [])
        self.greeting = list(greeting)
        self.requests: list[Any] = []
        self.connections = 0
        self.stopping = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def kinds(self) -> list[str]:
        return [type(r).__name__ for r in self.requests]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not self._send(conn, self.greeting):
                    return
                while True:
                    header = p._recv_exactly(conn, p.HEADER.size)
                    body = p._recv_exactly(conn, p.frame_length(header))
                    request = p.decode_request(body)
                    self.requests.append(request)
                    if isinstance(request, p.Hello):
                        replies: Iterable[Any] = [self.hello_reply()]
                    else:
                        replies = self.script(request)
                    if not self._send(conn, replies):
                        return
            except (OSError, ConnectionError):
                return

    def hello_reply(self) -> p.HelloReply:
        return p.HelloReply(version="0.1.0", protocol=p.PROTOCOL, pid=os.getpid(),
                            system=False, uid=os.getuid())

    def _send(self, conn: socket.socket, replies: Iterable[Any]) -> bool:
        """Send the replies; False when the script says to close."""
        for reply in replies:
            if reply is CLOSE:
                return False
            if reply is HANG:
                self.stopping.wait()
                return False
            conn.sendall(reply if isinstance(reply, bytes) else p.encode_frame(reply))
        return True


@pytest.fixture
def fake(wfd_tmp: Path) -> Iterable[Callable[..., FakeDaemon]]:
    started: list[FakeDaemon] = []

    def start(script: Callable[[Any], Iterable[Any]] | None = None, name: str = "fake.sock",
              greeting: Iterable[Any] = ()) -> FakeDaemon:
        server = FakeDaemon(wfd_tmp / name, script, greeting)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def wfctl(sandbox: Any) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("timeout", 30)
        return run_wfctl(*args, mark=sandbox.mark, **kwargs)

    return run


def assert_clean_error(done: subprocess.CompletedProcess, code: int) -> None:
    """Exit `code`, no traceback, and stderr's lines each say who speaks."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip(), "an error must say something"


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("wfctl: "), lines[0]
    return lines[0]


# ---- validate -----------------------------------------------------------------------


def test_validate_ok(wfctl: Callable, wfd_tmp: Path) -> None:
    path = write_workflow(wfd_tmp, GOOD)
    done = wfctl("validate", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: ok (2 steps)\n"
    assert done.stderr == ""


BAD_WORKFLOWS = {
    "malformed JSON": ('{"steps": [', ["line 1, column"]),
    "wrong type": ({"steps": [{"id": "a", "command": "x", "retries": "2"}]},
                   ["$.steps[0].retries"]),
    "unknown field": ({"steps": [{"id": "a", "command": "x", "retrys": 2}]},
                      ["$.steps[0].retrys"]),
    "no steps": ({"steps": []}, ["$.steps"]),
    "duplicate id": ({"steps": [{"id": "a", "command": "x"}, {"id": "a", "command": "y"}]},
                     ["$.steps[1].id", "duplicate"]),
    "invalid id": ({"steps": [{"id": "-a", "command": "x"}]}, ["$.steps[0].id"]),
    "unknown dependency": ({"steps": [{"id": "a", "command": "x", "depends_on": ["zz"]}]},
                           ["$.steps[0].depends_on[0]", "zz"]),
    "self dependency": ({"steps": [{"id": "a", "command": "x", "depends_on": ["a"]}]},
                        ["$.steps[0].depends_on[0]"]),
    "cycle": ({"steps": [{"id": "load", "command": "x", "depends_on": ["clean"]},
                         {"id": "clean", "command": "x", "depends_on": ["load"]}]},
              ["cycle: "]),
}


@pytest.mark.parametrize("kind", sorted(BAD_WORKFLOWS))
def test_validate_reports_each_kind_of_problem(kind: str, wfctl: Callable, wfd_tmp: Path) -> None:
    obj, fragments = BAD_WORKFLOWS[kind]
    path = write_workflow(wfd_tmp, obj)
    done = wfctl("validate", str(path))
    assert_clean_error(done, 2)
    assert done.stdout == ""
    for line in done.stderr.splitlines():
        assert line.startswith(f"{path}: "), line
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


def test_validate_reports_every_problem_one_per_line(wfctl: Callable, wfd_tmp: Path) -> None:
    path = write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "x", "retries": -1},
        {"id": "b", "command": "", "depends_on": ["nope"]},
    ]})
    done = wfctl("validate", str(path))
    assert_clean_error(done, 2)
    lines = done.stderr.splitlines()
    assert len(lines) >= 3, lines
    assert any("$.steps[0].retries" in line for line in lines)
    assert any("$.steps[1].command" in line for line in lines)
    assert any("nope" in line for line in lines)


def test_validate_names_the_cycle_in_edge_order(wfctl: Callable, wfd_tmp: Path) -> None:
    path = write_workflow(wfd_tmp, {"steps": [
        {"id": "load", "command": "x", "depends_on": ["clean"]},
        {"id": "clean", "command": "x", "depends_on": ["load"]},
    ]})
    done = wfctl("validate", str(path))
    assert_clean_error(done, 2)
    assert ("cycle: load -> clean -> load" in done.stderr
            or "cycle: clean -> load -> clean" in done.stderr), done.stderr


@pytest.mark.parametrize("target", ["missing.json", "."])
def test_validate_unreadable_file(target: str, wfctl: Callable, wfd_tmp: Path) -> None:
    path = wfd_tmp / target
    done = wfctl("validate", str(path))
    assert_clean_error(done, 2)
    assert one_line(done).startswith(f"wfctl: cannot read {path}: ")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "socket"])
def test_validate_reads_only_regular_files(kind: str, wfctl: Callable, wfd_tmp: Path,
                                           fake: Callable) -> None:
    # A FIFO blocked the open for ever, /dev/zero was read without end: both are refused
    # by their type before a byte is read.
    if kind == "fifo":
        path, what = wfd_tmp / "wf.fifo", "a FIFO"
        os.mkfifo(path)
    elif kind == "socket":
        path, what = fake().path, "a socket"
    else:
        path, what = Path(kind), "a character device"
    for command in ("validate", "run"):
        done = wfctl(command, str(path), "--socket", str(wfd_tmp / "none.sock"), timeout=20)
        assert_clean_error(done, 2)
        assert one_line(done) == f"wfctl: cannot read {path}: not a regular file ({what})"


def test_validate_refuses_a_file_over_the_frame_limit(wfctl: Callable, wfd_tmp: Path) -> None:
    path = wfd_tmp / "huge.json"
    with open(path, "wb") as f:
        f.truncate(p.MAX_FRAME + 1)  # sparse: costs no disk, and nothing may read it all
    done = wfctl("validate", str(path))
    assert_clean_error(done, 2)
    assert one_line(done) == (f"wfctl: {path}: too large ({p.MAX_FRAME + 1} bytes; a workflow "
                              f"may have at most {p.MAX_FRAME} bytes, 16 MiB)")


# ---- usage --------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [], ["bogus"], ["status", "--bogus"], ["--bogus", "status"], ["cancel"],
    ["logs", RUN_ID, "--attempt", "1"], ["logs", RUN_ID, "s", "--attempt", "x"],
    ["logs", RUN_ID, "s", "--attempt", "0"], ["validate", "a.json", "b.json"],
    ["status", "--socket"], ["run", "--fol", "x.json"],
])
def test_bad_usage_is_one_line_and_exit_2(argv: list[str], wfctl: Callable) -> None:
    done = wfctl(*argv)
    assert_clean_error(done, 2)
    assert one_line(done).startswith("wfctl: error: ")
    assert "usage:" not in done.stderr
    assert done.stdout == ""


def test_unknown_command_is_named(wfctl: Callable) -> None:
    done = wfctl("frobnicate")
    assert_clean_error(done, 2)
    assert "unknown command 'frobnicate'" in one_line(done)


def test_version(wfctl: Callable) -> None:
    import wfd

    done = wfctl("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"wfctl {wfd.__version__}")


def test_help_exits_0(wfctl: Callable) -> None:
    done = wfctl("--help")
    assert done.returncode == 0
    for command in ("validate", "run", "status", "cancel", "replay", "resume", "resume-all",
                    "logs", "shutdown"):
        assert command in done.stdout


# ---- reaching the daemon ------------------------------------------------------------


def test_run_of_an_invalid_workflow_contacts_nothing(wfctl: Callable, wfd_tmp: Path,
                                                    fake: Callable) -> None:
    server = fake()
    path = write_workflow(wfd_tmp, {"steps": []})
    for socket_path in (wfd_tmp / "nonexistent.sock", server.path):
        done = wfctl("run", str(path), "--socket", str(socket_path))
        assert_clean_error(done, 2)
        assert done.stdout == ""
    assert server.connections == 0


def test_unreachable_socket_exit_3(wfctl: Callable, wfd_tmp: Path) -> None:
    path = wfd_tmp / "nonexistent.sock"
    done = wfctl("status", "--socket", str(path))
    assert_clean_error(done, 3)
    line = one_line(done)
    assert f"cannot reach wfd at {path}" in line
    assert "systemctl start wfd" in line


@pytest.fixture
def no_default_daemon(wfd_tmp: Path) -> dict[str, str | None]:
    """An environment whose default sockets are certainly dead."""
    if Path("/run/wfd/wfd.sock").exists():
        pytest.skip("a system wfd socket exists on this machine")
    runtime = wfd_tmp / "xdg"
    runtime.mkdir(mode=0o700)
    return {"XDG_RUNTIME_DIR": str(runtime), "WFD_STATE_DIR": str(wfd_tmp / "state")}


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_autostart_and_no_daemon_exit_3(how: str, wfctl: Callable, wfd_tmp: Path,
                                          no_default_daemon: dict[str, str | None]) -> None:
    env = dict(no_default_daemon)
    if how == "flag":
        done = wfctl("status", "--no-autostart", env={**env, "WFD_NO_AUTOSTART": None})
    else:
        done = wfctl("status", env={**env, "WFD_NO_AUTOSTART": "1"})
    assert_clean_error(done, 3)
    line = one_line(done)
    assert f"cannot reach wfd at {wfd_tmp / 'xdg' / 'wfd' / 'wfd.sock'}" in line
    assert not (wfd_tmp / "state").exists(), "nothing may be started"


def test_a_default_socket_in_a_directory_open_to_others_gets_nothing(
    wfctl: Callable, wfd_tmp: Path, fake: Callable,
) -> None:
    # Without XDG_RUNTIME_DIR the user socket is <tmp>/wfd-<uid>/wfd.sock: in a shared
    # temp dir, someone may have made that directory first. (The same with other users,
    # and a peer of another uid: tests/test_client_trust.py.)
    if Path("/run/wfd/wfd.sock").exists():
        pytest.skip("a system wfd socket exists on this machine")
    tmp = wfd_tmp / "tmp"
    planted = tmp / f"wfd-{os.getuid()}"
    planted.mkdir(parents=True)
    server = fake(lambda request: [p.RunList([])], name=f"tmp/wfd-{os.getuid()}/wfd.sock")
    planted.chmod(0o777)
    env = {"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": None, "WFD_NO_AUTOSTART": None,
           "WFD_STATE_DIR": str(wfd_tmp / "state")}
    done = wfctl("status", env=env)
    assert_clean_error(done, 3)
    assert one_line(done) == (f"wfctl: not talking to {server.path}: {planted} is writable by "
                              "others (mode 777); someone else may have put it there")
    assert server.connections == 0
    assert not (wfd_tmp / "state").exists(), "nothing may be started"
    planted.chmod(0o700)  # the same directory, closed: now it is the user's daemon
    done = wfctl("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert server.kinds() == ["Hello", "Status"]


def test_the_documented_hello_timeout_is_the_one_used() -> None:
    from wfctl.conn import HELLO_TIMEOUT

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert f" {HELLO_TIMEOUT:g}-second timeout" in doc


@pytest.mark.parametrize("position", ["before", "after"])
def test_socket_option_before_or_after_the_command(position: str, wfctl: Callable,
                                                   fake: Callable) -> None:
    server = fake(lambda request: [p.RunList([])])
    opt = ["--socket", str(server.path)]
    done = wfctl(*(opt + ["status"] if position == "before" else ["status"] + opt))
    assert done.returncode == 0, done.stderr
    assert server.kinds() == ["Hello", "Status"]


def test_wfd_socket_env_is_used(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [p.RunList([])])
    done = wfctl("status", "--json", env={"WFD_SOCKET": str(server.path)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_version_mismatch_exit_3(wfctl: Callable, fake: Callable) -> None:
    server = fake()
    server.hello_reply = lambda: frame_v(99, p.HelloReply("9.0", 99, 1, False, 0))  # type: ignore
    done = wfctl("status", "--socket", str(server.path))
    assert_clean_error(done, 3)
    assert one_line(done) == f"wfctl: wfd speaks protocol 99, this wfctl speaks {p.PROTOCOL}"


def test_refused_peer_exit_3(wfctl: Callable, fake: Callable) -> None:
    refusal = p.Error(3, "wfd refuses uid 1000: this daemon serves its own user")
    server = fake(greeting=[refusal, CLOSE])
    done = wfctl("status", "--socket", str(server.path))
    assert_clean_error(done, 3)
    assert one_line(done) == f"wfctl: {refusal.message}"


def test_silent_daemon_does_not_hang(wfctl: Callable, fake: Callable) -> None:
    server = fake(greeting=[HANG])
    started = time.monotonic()
    done = wfctl("status", "--socket", str(server.path), timeout=20)
    assert_clean_error(done, 3)
    assert "no answer" in one_line(done)
    assert time.monotonic() - started < 10


def test_daemon_closing_at_once_exit_3(wfctl: Callable, fake: Callable) -> None:
    server = fake(greeting=[CLOSE])
    done = wfctl("status", "--socket", str(server.path))
    assert_clean_error(done, 3)
    one_line(done)


def test_garbage_reply_exit_3(wfctl: Callable, fake: Callable) -> None:
    server = fake(greeting=[b"\x00\x00\x00\x03abc"])
    done = wfctl("status", "--socket", str(server.path))
    assert_clean_error(done, 3)
    one_line(done)


@pytest.mark.parametrize("code", [2, 5, 6])
def test_error_reply_code_is_the_exit_code(code: int, wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [p.Error(code, f"no luck ({code})")])
    done = wfctl("cancel", RUN_ID, "--socket", str(server.path))
    assert_clean_error(done, code)
    assert one_line(done) == f"wfctl: no luck ({code})"


# ---- run ----------------------------------------------------------------------------


def submitted(request: Any) -> list[Any]:
    return [p.Submitted(RUN_ID)] if isinstance(request, p.Submit) else []


def test_run_prints_only_the_run_id(wfctl: Callable, wfd_tmp: Path, fake: Callable) -> None:
    server = fake(submitted)
    path = write_workflow(wfd_tmp, GOOD, name="etl.json")
    done = wfctl("run", str(path), "--socket", str(server.path),
                 env={"WFCTL_TEST_VAR": "hello"}, cwd="/", umask=0o027)
    assert done.returncode == 0, done.stderr
    assert done.stdout == RUN_ID + "\n"
    submit = server.requests[-1]
    assert isinstance(submit, p.Submit)
    assert submit.workflow == path.read_text()
    assert submit.source == "etl.json"
    assert submit.base_dir == str(wfd_tmp)
    assert submit.env["WFCTL_TEST_VAR"] == "hello"
    assert submit.umask == 0o027


def test_run_with_a_relative_path_sends_an_absolute_base_dir(
    wfctl: Callable, wfd_tmp: Path, fake: Callable,
) -> None:
    server = fake(submitted)
    (wfd_tmp / "sub").mkdir()
    write_workflow(wfd_tmp / "sub", GOOD)
    done = wfctl("run", "sub/wf.json", "--socket", str(server.path), cwd=wfd_tmp)
    assert done.returncode == 0, done.stderr
    assert server.requests[-1].base_dir == str(wfd_tmp / "sub")


def test_run_over_the_frame_limit_is_exit_2_and_contacts_nothing(
    wfctl: Callable, wfd_tmp: Path, fake: Callable,
) -> None:
    # The file fits, the file with the environment does not: the daemon would cut the
    # frame off ("Broken pipe", exit 3), so wfctl measures it before it connects.
    server = fake(submitted)
    filler = "x" * (p.MAX_FRAME - 1000)
    path = write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true",
                                               "env": {"FILLER": filler}}]})
    assert path.stat().st_size <= p.MAX_FRAME
    done = wfctl("run", str(path), "--socket", str(server.path),
                 env={"WFCTL_TEST_BIG": "y" * 100_000})
    assert_clean_error(done, 2)
    line = one_line(done)
    assert line.startswith(f"wfctl: {path}: too large to submit (")
    assert line.endswith(f"bytes with the environment; at most {p.MAX_FRAME} bytes, 16 MiB)")
    assert server.connections == 0


def test_run_drops_environment_variables_that_are_not_utf8(
    wfctl: Callable, wfd_tmp: Path, fake: Callable,
) -> None:
    # `env $'X=\xff' wfctl run` was an internal error (exit 70): such variables cannot
    # travel as text, so they are left out, and named.
    server = fake(submitted)
    path = write_workflow(wfd_tmp, GOOD)
    bad_value, bad_name = os.fsdecode(b"\xff"), os.fsdecode(b"WFCTL_N\xfeAME")
    done = wfctl("run", str(path), "--socket", str(server.path),
                 env={"WFCTL_BAD_VALUE": bad_value, bad_name: "x", "WFCTL_FINE": "ok"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == RUN_ID + "\n"
    assert done.stderr == ("wfctl: warning: not passing WFCTL_BAD_VALUE, WFCTL_N\\xfeAME "
                           "to the steps: not UTF-8 (wfd carries the environment as text)\n")
    env = server.requests[-1].env
    assert env["WFCTL_FINE"] == "ok"
    assert not {k for k in env if k.startswith(("WFCTL_BAD", "WFCTL_N"))}


def test_arguments_that_are_not_utf8_are_bad_usage(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [p.RunList([])])
    done = wfctl("cancel", os.fsdecode(b"run-\xff"), "--socket", str(server.path))
    assert_clean_error(done, 2)
    assert one_line(done) == ("wfctl: cannot send Cancel: an argument is not UTF-8 "
                              "(wfd carries text)")


def watched(final: RunStatus, events: list[ev.Event] | None = None) -> Callable:
    def script(request: Any) -> list[Any]:
        if isinstance(request, p.Submit):
            return [p.Submitted(RUN_ID)]
        if isinstance(request, p.Watch):
            fresh = [e for e in (events or events_of()) if e.seq > request.after_seq]
            return [p.Progress(fresh[:2]), p.Progress(fresh[2:]), p.RunEnded(final)]
        return logs_answer(request)

    return script


def logs_answer(request: Any) -> list[Any]:
    """What the daemon answers a failed step's tail (`Logs` with `tail`): its last lines."""
    if isinstance(request, p.Logs):
        return [p.LogData(3, b"last words\n"), p.LogEnd(3, "FAILED")]
    return []


def status_and_logs(status: RunStatus) -> Callable:
    return lambda request: logs_answer(request) or [p.RunInfo(status)]


@pytest.mark.parametrize(("state", "code"), [
    ("SUCCEEDED", 0), ("FAILED", 1), ("CANCELLED", 4), ("CORRUPT", 5),
])
def test_run_wait_exit_code_follows_the_run(state: str, code: int, wfctl: Callable,
                                            wfd_tmp: Path, fake: Callable) -> None:
    server = fake(watched(status_of(state, "damaged line 7" if state == "CORRUPT" else None)))
    path = write_workflow(wfd_tmp, GOOD)
    done = wfctl("run", str(path), "--wait", "--socket", str(server.path))
    assert done.returncode == code, done.stderr
    assert done.stdout == RUN_ID + "\n"
    assert "Traceback" not in done.stderr
    assert state in done.stderr
    watch = [r for r in server.requests if isinstance(r, p.Watch)]
    assert watch == [p.Watch(RUN_ID, 0)]


def test_run_follow_shows_each_transition(wfctl: Callable, wfd_tmp: Path,
                                          fake: Callable) -> None:
    server = fake(watched(status_of("FAILED")))
    path = write_workflow(wfd_tmp, GOOD)
    done = wfctl("run", str(path), "--follow", "--socket", str(server.path),
                 env={"TZ": "UTC"})
    assert done.returncode == 1, done.stderr
    assert done.stdout == RUN_ID + "\n"
    lines = done.stderr.splitlines()
    assert lines[:4] == [f"09:58:52 {describe(e)}" for e in events_of()]
    assert lines[2] == "09:58:52 extract: RUNNING (attempt 1)"
    assert any(line.startswith("load") and "killed by SIGKILL (timeout)" in line
               for line in lines)
    assert lines[-1].startswith(f"run {RUN_ID} FAILED")


def test_run_wait_rides_out_a_daemon_restart(wfctl: Callable, wfd_tmp: Path,
                                             fake: Callable) -> None:
    """The first Watch breaks after two events; wfctl reconnects and asks for the rest."""
    events = events_of()
    watches: list[int] = []

    def script(request: Any) -> list[Any]:
        if isinstance(request, p.Submit):
            return [p.Submitted(RUN_ID)]
        if isinstance(request, p.Watch):
            watches.append(request.after_seq)
            if len(watches) == 1:
                return [p.Progress(events[:2]), CLOSE]
            fresh = [e for e in events if e.seq > request.after_seq]
            return [p.Progress(fresh), p.RunEnded(status_of("SUCCEEDED"))]
        return logs_answer(request)

    server = fake(script)
    path = write_workflow(wfd_tmp, GOOD)
    done = wfctl("run", str(path), "--follow", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    assert watches == [0, 2]
    assert "reconnecting" in done.stderr
    shown = [line for line in done.stderr.splitlines() if "extract: " in line]
    assert len(shown) == 3, done.stderr  # each transition once, none lost or repeated


def test_ctrl_c_while_waiting_detaches(sandbox: Any, wfd_tmp: Path, fake: Callable) -> None:
    def script(request: Any) -> list[Any]:
        if isinstance(request, p.Submit):
            return [p.Submitted(RUN_ID)]
        if isinstance(request, p.Watch):
            return [p.Progress(events_of()[:1]), HANG]
        return []

    server = fake(script)
    path = write_workflow(wfd_tmp, GOOD)
    proc = popen_wfctl("run", str(path), "--wait", "--socket", str(server.path),
                       mark=sandbox.mark)
    try:
        wait_until(lambda: "Watch" in server.kinds(), message="the Watch request")
        time.sleep(0.2)  # let it block in recv: the case Ctrl-C meets in real life
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert out == RUN_ID + "\n"
    assert err.strip().splitlines()[-1] == f"wfctl: detached; run {RUN_ID} goes on"
    assert "Traceback" not in err
    assert "Cancel" not in server.kinds()


# ---- status, replay, cancel, resume, logs, shutdown ----------------------------------


def test_status_json_is_the_run_status_in_spec_order(wfctl: Callable, fake: Callable) -> None:
    status = status_of("FAILED")
    server = fake(status_and_logs(status))
    done = wfctl("status", RUN_ID, "--json", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    expected = msgspec.json.format(msgspec.json.encode(status), indent=2) + b"\n"
    assert done.stdout.encode() == expected
    doc = json.loads(done.stdout, object_pairs_hook=lambda pairs: pairs)
    # SPEC's keys first, in SPEC's order; added ones after them (issue 14: running time)
    assert [k for k, _ in doc] == ["run_id", "name", "owner", "state", "created_at",
                                   "finished_at", "error", "steps", "schedule",
                                   "scheduled_at", "vars", "run_seconds", "running_since",
                                   "waiting_for_resume", "description", "on_exit"]
    steps = dict(doc)["steps"]
    assert [k for k, _ in dict(steps)["load"]] == ["state", "attempts", "exit_code",
                                                    "started_at", "finished_at", "error",
                                                    "depends_on", "cpu", "max_rss",
                                                    "containment", "executor", "job_id",
                                                    "outputs", "exit_signal", "pool", "waiting",
                                                    "description"]
    assert msgspec.json.decode(done.stdout, type=RunStatus) == status


def test_status_list_json(wfctl: Callable, fake: Callable) -> None:
    runs = [RunSummary(RUN_ID, "etl", "root", "RUNNING", "2026-11-25T09:58:52.123456Z", None)]
    server = fake(lambda request: [p.RunList(runs)])
    done = wfctl("status", "--json", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout, object_pairs_hook=lambda pairs: pairs)
    assert [k for k, _ in doc[0]] == ["run_id", "name", "owner", "state", "created_at",
                                      "finished_at", "schedule", "scheduled_at",
                                      "run_seconds", "running_since", "waiting_for_resume"]
    assert msgspec.json.decode(done.stdout, type=list[RunSummary]) == runs


def test_status_table(wfctl: Callable, fake: Callable) -> None:
    server = fake(status_and_logs(status_of("FAILED")))
    done = wfctl("status", RUN_ID, "--socket", str(server.path), env={"TZ": "UTC"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(
        f"run {RUN_ID}  etl  FAILED  owner root  created 2026-11-25 09:58:52"
    )
    assert lines[1].split() == ["STEP", "STATE", "ATTEMPTS", "EXIT", "DURATION", "CPU",
                                "ERROR"]
    assert lines[2].split() == ["extract", "SUCCEEDED", "1", "0", "1.2s", "0.73s", "-"]
    assert lines[3].split()[:6] == ["load", "FAILED", "3", "SIGKILL", "3m02s", "-"]
    assert lines[3].endswith("killed by SIGKILL (timeout)")  # not "-9" (issue 14)


def test_status_of_a_corrupt_run_shows_its_error(wfctl: Callable, fake: Callable) -> None:
    status = status_of("CORRUPT", "events.jsonl line 7 is damaged")
    server = fake(status_and_logs(status))
    done = wfctl("status", RUN_ID, "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    assert "CORRUPT" in done.stdout
    assert "events.jsonl line 7 is damaged" in done.stdout


def test_status_of_all_runs(wfctl: Callable, fake: Callable) -> None:
    runs = [RunSummary(RUN_ID, "etl", "root", "SUCCEEDED", "2026-11-25T09:58:52.123456Z",
                       "2026-11-25T09:59:02.123456Z")]
    server = fake(lambda request: [p.RunList(runs)])
    done = wfctl("status", "--socket", str(server.path), env={"TZ": "UTC"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["RUN_ID", "NAME", "STATE", "OWNER", "CREATED", "DURATION"]
    # local time with its zone (issue 14's one rule)
    assert lines[1].split() == [RUN_ID, "etl", "SUCCEEDED", "root", "2026-11-25", "09:58:52",
                                "UTC", "10.0s"]


def replayed(problems: list[str] = (), torn: str | None = None) -> p.Replayed:  # type: ignore
    lines = [msgspec.json.encode(e).decode() for e in events_of()]
    return p.Replayed(lines=lines, transitions=[f"{i}: t" for i in range(len(lines))],
                      status=status_of("RUNNING"), problems=list(problems), torn_tail=torn)


def test_replay_json_is_deterministic(wfctl: Callable, fake: Callable) -> None:
    reply = replayed()
    server = fake(lambda request: [reply])
    first = wfctl("replay", RUN_ID, "--json", "--socket", str(server.path), text=False)
    second = wfctl("replay", RUN_ID, "--json", "--socket", str(server.path), text=False,
                   env={"TZ": "Asia/Tokyo"})
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    doc = json.loads(first.stdout)
    assert list(doc) == ["events", "state"]
    assert doc["events"] == [json.loads(line) for line in reply.lines]
    assert doc["state"] == json.loads(msgspec.json.encode(reply.status))


def test_replay_text_prints_transitions_then_state(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [replayed()])
    done = wfctl("replay", RUN_ID, "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["0: t", "1: t", "2: t", "3: t"]
    assert lines[5].startswith(f"run {RUN_ID}")


def test_replay_problems_exit_5(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [replayed(["line 3: seq 5 after seq 2 (gap)"])])
    done = wfctl("replay", RUN_ID, "--json", "--socket", str(server.path))
    assert_clean_error(done, 5)
    assert "line 3: seq 5 after seq 2 (gap)" in done.stderr
    json.loads(done.stdout)


def test_replay_torn_tail_is_noted_exit_0(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [replayed(torn='line 5 has no newline: {"seq": 5')])
    done = wfctl("replay", RUN_ID, "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    assert "line 5 has no newline" in done.stderr


@pytest.mark.parametrize(("finished", "message"), [
    (True, f"run {RUN_ID} already finished: SUCCEEDED"), (False, f"run {RUN_ID} cancelled"),
])
def test_cancel(finished: bool, message: str, wfctl: Callable, fake: Callable) -> None:
    state = "SUCCEEDED" if finished else "CANCELLED"
    server = fake(lambda request: [p.Cancelled(state, finished)])
    done = wfctl("cancel", RUN_ID, "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == message
    assert server.requests[-1] == p.Cancel(RUN_ID)


def test_resume_and_resume_all(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [p.Resumed([RUN_ID, "r2"] if isinstance(request, p.ResumeAll)
                                             else [request.run_id])])
    done = wfctl("resume", RUN_ID, "--socket", str(server.path))
    assert (done.returncode, done.stderr) == (0, f"run {RUN_ID} resumed\n")
    done = wfctl("resume-all", "--socket", str(server.path))
    assert (done.returncode, done.stderr) == (0, f"run {RUN_ID} resumed\nrun r2 resumed\n")


def test_logs_streams_raw_bytes(wfctl: Callable, fake: Callable) -> None:
    chunks = [b"hello\r\n", b"\x00\xff binary\n", b"no newline"]
    server = fake(lambda request: [*(p.LogData(2, c) for c in chunks), p.LogEnd(2, "FAILED")])
    done = wfctl("logs", RUN_ID, "load", "--attempt", "2", "--follow",
                 "--socket", str(server.path), text=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"".join(chunks)
    assert server.requests[-1] == p.Logs(RUN_ID, "load", attempt=2, follow=True)


def test_logs_into_a_closed_pipe_is_quiet(sandbox: Any, fake: Callable) -> None:
    big = b"x" * 65536 + b"\n"
    server = fake(lambda request: [*(p.LogData(1, big) for _ in range(64)), p.LogEnd(1, "OK")])
    proc = popen_wfctl("logs", RUN_ID, "s", "--socket", str(server.path), mark=sandbox.mark,
                       text=False)
    proc.stdout.read(10)  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read()  # type: ignore[union-attr]
    proc.wait(10)
    assert proc.returncode == 141
    assert b"Traceback" not in err
    assert err == b""


def test_shutdown(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [p.Ok()])
    done = wfctl("shutdown", "--socket", str(server.path))
    assert (done.returncode, done.stderr) == (0, "wfd stopping; running steps go on\n")
    assert server.kinds() == ["Hello", "Shutdown"]
    assert server.requests[-1].stop_steps is False
    done = wfctl("shutdown", "--stop-steps", "--socket", str(server.path))
    assert (done.returncode, done.stderr) == (0, "wfd stopping its steps, then itself\n")
    assert server.requests[-1].stop_steps is True


def test_unexpected_reply_is_an_error_not_a_traceback(wfctl: Callable, fake: Callable) -> None:
    server = fake(lambda request: [p.Ok()])
    done = wfctl("status", RUN_ID, "--socket", str(server.path))
    assert_clean_error(done, 3)
    assert "RunInfo" in one_line(done)


# ---- autostart (needs the real daemon module, but no running daemon) -----------------


def test_autostart_starts_a_user_daemon(wfctl: Callable, wfd_tmp: Path,
                                        no_default_daemon: dict[str, str | None]) -> None:
    pytest.importorskip("wfd.daemon")
    env = {**no_default_daemon, "WFD_NO_AUTOSTART": None}
    done = wfctl("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    socket_path = wfd_tmp / "xdg" / "wfd" / "wfd.sock"
    reply = wait_until(lambda: hello(socket_path), message="the autostarted daemon")
    assert (wfd_tmp / "state" / "wfd.log").exists()
    done = wfctl("shutdown", env=env)
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: not _alive(reply.pid), message="the daemon to stop")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_huge_name_does_not_widen_every_row(wfctl: Callable, fake: Callable) -> None:
    from wfctl.render import MAX_CELL

    huge = "n" * 1_000_000
    runs = [RunSummary(RUN_ID, huge, "root", "SUCCEEDED", "2026-11-25T09:58:52.123456Z",
                       "2026-11-25T09:58:53.123456Z"),
            RunSummary(RUN_ID[:-1] + "9", "small", "root", "FAILED",
                       "2026-11-25T09:58:52.123456Z", "2026-11-25T09:58:53.123456Z")]
    server = fake(lambda request: [p.RunList(runs)])
    done = wfctl("status", "--socket", str(server.path))
    assert done.returncode == 0, done.stderr
    assert max(len(line) for line in done.stdout.splitlines()) < 3 * MAX_CELL
    assert "small" in done.stdout and "n" * (MAX_CELL - 3) + "..." in done.stdout
