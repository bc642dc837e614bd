"""Replies through the real daemon: none too big to send, none held whole, none that a
client can make the daemon hold (issue 10: 5, 6, 10; issue 11: 2, 8).

- A replay of a finished 20,000-step run, the status of a 100,000-step run, a list
  of runs, a run named with 16 MiB: each reply is over the 16 MiB frame limit and
  arrives whole (in parts, and fragments), as `wfctl` prints it and as a raw client
  reads it.
- `wfctl logs RUN STEP | (sleep 35; wc -c)` gets all of a 50 MB log: a slow reader is
  followed at its pace.
- A member who asks for a big status on 127 connections and never reads costs the
  daemon a few MiB, and another member's status stays fast; a member announcing
  16 MiB frames on 25 connections does not keep another member's 200 KB submit busy.
- A daemon stopped with clients connected logs no traceback; a storage error shows
  in the run list, not only in `status RUN`.

The big runs are written straight to disk (`bigruns`): running 20,000 steps would
take minutes. Users are made as in test_socket_users.py; their clients are a
standard-library script (`rawclient.py`) run by a Python they may run.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from bigruns import cancelled_run, run_id, step_ids, step_output, succeeded_run
from helpers import REPO, Daemon, base_env, run_json, wait_until, write_workflow
from test_socket_users import NOBODY, Accounts, accounts  # noqa: F401  (a fixture)

from wfd import protocol as p

MB = 1024 * 1024
RAWCLIENT = REPO / "tests" / "rawclient.py"


def connect(d: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(d.socket))
    return sock


def frames_of(sock: socket.socket, request: p.Message, until: type) -> list[p.Message]:
    """Send `request`; every message that comes (a Fragment's pieces put together) up to
    and including the first of type `until`."""
    p.send(sock, request)
    got = []
    while not isinstance(got[-1] if got else None, until):
        got.append(p.recv_message(sock))
        assert not isinstance(got[-1], p.Error), got[-1]
    return got


def assembled(messages: list[p.Message]) -> p.Message:
    assembler = p.Assembler()
    whole = [m for m in (assembler.add(msg) for msg in messages) if m is not None]
    assert len(whole) == 1, [type(m).__name__ for m in whole]
    return whole[0]


def over_a_frame(msg: p.Message) -> bool:
    return len(msgspec.msgpack.encode(msg)) > p.MAX_FRAME


# ---- replies over the frame limit (issue 10.5) --------------------------------------


def test_replay_and_watch_of_a_finished_20000_step_run(daemon: Callable[..., Daemon]) -> None:
    d = daemon(start=False)
    rid = run_id(1)
    run_dir = succeeded_run(d.state_dir, rid, step_ids(20_000, 40))
    d.start()
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert len(lines) == 80_002

    done = d.wfctl("replay", rid, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    doc = json.loads(done.stdout)
    assert doc["events"] == [json.loads(line) for line in lines]
    assert doc["state"]["state"] == "SUCCEEDED" and len(doc["state"]["steps"]) == 20_000
    assert doc["state"] == run_json(d, rid)
    text = d.wfctl("replay", rid, timeout=120)
    assert text.returncode == 0, text.stderr
    assert text.stdout.count(": SUCCEEDED (attempt 1)") == 20_000

    with connect(d) as sock:
        messages = frames_of(sock, p.Replay(run_id=rid), p.Replayed)
        sizes = sorted(len(msgspec.msgpack.encode(m)) for m in messages)
        assert len(messages) > 40 and sizes[-1] <= p.FRAGMENT_SIZE, sizes[-5:]
        assert over_a_frame(assembled(messages))  # the reply that did not fit in one frame
        # Watch: its history and its RunEnded, the same way
        messages = frames_of(sock, p.Watch(run_id=rid), p.RunEnded)
        events = [e for m in messages if isinstance(m, p.Progress) for e in m.events]
        assert [e.seq for e in events] == list(range(1, 80_003))
        assert len(assembled([m for m in messages if not isinstance(m, p.Progress)])
                   .status.steps) == 20_000


def test_status_of_a_100000_step_run(daemon: Callable[..., Daemon]) -> None:
    d = daemon(start=False)
    rid = run_id(2)
    steps = step_ids(100_000, 60)
    cancelled_run(d.state_dir, rid, steps)
    d.start()
    done = d.wfctl("status", rid, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "CANCELLED"
    assert list(status["steps"]) == steps
    assert {s["state"] for s in status["steps"].values()} == {"CANCELLED"}
    table = d.wfctl("status", rid, timeout=120)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 100_002  # header line, table header, steps
    with connect(d) as sock:
        info = assembled(frames_of(sock, p.Status(run_id=rid), p.RunInfo))
        assert over_a_frame(info) and len(info.status.steps) == 100_000


def test_a_list_of_runs_over_the_frame_limit(daemon: Callable[..., Daemon]) -> None:
    """4,000 runs with long names make a list as big as 115,000 ordinary runs (17 MB)."""
    d = daemon(start=False)
    ids = [run_id(i) for i in range(4_000)]
    for i, rid in enumerate(ids):
        succeeded_run(d.state_dir, rid, ["a"], name=f"{i:05d}" + "n" * 4_300)
    d.start()
    done = d.wfctl("status", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)
    assert [r["run_id"] for r in runs] == ids
    assert all(r["state"] == "SUCCEEDED" for r in runs)
    table = d.wfctl("status", "--all", timeout=120)  # without --all: the newest 20
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 4_001
    with connect(d) as sock:
        listing = assembled(frames_of(sock, p.Status(), p.RunList))
        assert over_a_frame(listing) and len(listing.runs) == 4_000


def test_a_name_of_16_mib_comes_in_fragments(daemon: Callable[..., Daemon]) -> None:
    """One item bigger than a frame: no reply size limits what a user can see."""
    d = daemon(start=False)
    rid, name = run_id(3), "N" * (p.MAX_FRAME - 64)
    succeeded_run(d.state_dir, rid, ["a"], name=name)
    d.start()
    for args in (["status", "--json"], ["status", rid, "--json"]):
        done = d.wfctl(*args, timeout=120)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert (doc[0] if isinstance(doc, list) else doc)["name"] == name
    done = d.wfctl("replay", rid, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["events"][0]["name"] == name
    with connect(d) as sock:
        p.send(sock, p.Status())
        fragments: list[p.Fragment] = []
        while not fragments or not fragments[-1].last:
            msg = p.decode_reply(_frame(sock))
            assert isinstance(msg, p.Fragment), msg
            fragments.append(msg)
        assert len(fragments) == 17  # 1 MiB each
        whole = msgspec.msgpack.decode(b"".join(f.data for f in fragments), type=p.RunList)
        assert whole.runs[0].name == name


def _frame(sock: socket.socket) -> bytes:
    length = p.frame_length(_exactly(sock, 4))
    assert length <= p.MAX_FRAME
    return _exactly(sock, length)


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the daemon closed the connection"
        data += chunk
    return bytes(data)


# ---- backpressure (issue 10.6) ------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_slow_reader_gets_all_of_a_50_mb_log(daemon: Callable[..., Daemon]) -> None:
    """`wfctl logs RUN STEP | (sleep 35; wc -c)`: for 35 s nothing is read (the pipe is
    full); the stream waits for its reader instead of cutting it off."""
    d = daemon(start=False)
    rid = run_id(4)
    step_output(succeeded_run(d.state_dir, rid, ["a"]), "a", 50 * MB)
    d.start()
    command = (f"{sys.executable} -m wfctl --socket {d.socket} logs {rid} a "
               "| (sleep 35; wc -c)")
    done = subprocess.run(["/bin/sh", "-c", command], env=base_env(d.mark), cwd=d.root,
                          capture_output=True, text=True, timeout=240)
    assert done.stdout.strip() == str(50 * MB), done.stderr
    assert done.stderr == ""
    assert d.running


# ---- one member against another (issue 11.2, 11.8) ----------------------------------


def _python_for(user: str) -> str:
    """A Python that `user` may run (this venv's may lie under a private home)."""
    entry = pwd.getpwnam(user)
    for python in dict.fromkeys(filter(None, (sys.executable, "/usr/bin/python3",
                                              shutil.which("python3")))):
        try:
            done = subprocess.run([python, "-I", "-c", "pass"], user=entry.pw_uid,
                                  group=entry.pw_gid, extra_groups=[], cwd="/",
                                  capture_output=True, timeout=60)
        except OSError:
            continue
        if done.returncode == 0:
            return python
    pytest.skip(f"no Python that {user} can run")


class Raw:
    """rawclient.py as a user, with the user's groups."""

    def __init__(self, d: Daemon, user: str) -> None:
        self.d = d
        self.entry = pwd.getpwnam(user)
        self.python = _python_for(user)

    def argv(self, *args: str) -> list[str]:
        return [self.python, "-I", str(RAWCLIENT), args[0], str(self.d.socket), *args[1:]]

    def kwargs(self) -> dict[str, Any]:
        return {"user": self.entry.pw_uid, "group": self.entry.pw_gid, "cwd": "/",
                "extra_groups": os.getgrouplist(self.entry.pw_name, self.entry.pw_gid),
                "env": base_env(self.d.mark)}

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                **self.kwargs())
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        return proc

    def call(self, frames: Path) -> tuple[p.Message, float]:
        """The first reply to the frames in `frames`, and the seconds it took."""
        done = subprocess.run(self.argv("call", str(frames)), capture_output=True,
                              timeout=120, **self.kwargs())
        assert done.returncode == 0, done.stderr
        return p.decode_reply(done.stdout), float(done.stderr)


def frames_file(root: Path, name: str, *msgs: p.Message) -> Path:
    path = root / name
    path.write_bytes(b"".join(p.encode_frame(m) for m in msgs))
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def system(daemon: Callable[..., Daemon], sandbox: Any,
           accounts: Accounts) -> Iterator[Daemon]:  # noqa: F811
    """A system daemon, not started: its socket group's members are `accounts.member`
    and nobody."""
    os.chmod(sandbox.root, 0o711)
    yield daemon(extra=["--system", "--socket-group", accounts.group],
                 socket=sandbox.root / "run" / "wfd.sock", start=False)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_member_who_never_reads_big_replies_cannot_grow_the_daemon(
        system: Daemon, sandbox: Any, accounts: Accounts) -> None:  # noqa: F811
    """Issue 11.2, scaled to run here in seconds: a member's run whose status is 3 MB,
    asked for on 127 connections (the most one member may open) and never read. The
    daemon grew by 1179 MiB before and a victim's status took 5.8 s; now a few MiB."""
    d = system
    member = pwd.getpwnam(accounts.member)
    rid = run_id(5)
    cancelled_run(d.state_dir, rid, step_ids(20_000, 40), uid=member.pw_uid,
                  owner=accounts.member)
    d.start()
    status = frames_file(sandbox.root, "status.bin", p.Status(run_id=rid))
    listing = frames_file(sandbox.root, "list.bin", p.Status())
    attacker, victim = Raw(d, accounts.member), Raw(d, NOBODY)
    first, _ = attacker.call(status)  # folds the run, as any first look does
    assert isinstance(first, (p.StepsPart, p.RunInfo)), first
    daemon_proc = psutil.Process(d.proc.pid)
    before = daemon_proc.memory_info().rss
    hold = attacker.start("hold", "127", str(status))
    try:
        peak, took = before, []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, daemon_proc.memory_info().rss)
            if len(took) < 3:
                reply, seconds = victim.call(listing)
                assert isinstance(reply, p.RunList) and reply.runs == [], reply
                took.append(seconds)
            time.sleep(0.1)
    finally:
        _stop(hold)
    grown = (peak - before) // MB
    print(f"daemon grew by {grown} MiB; the victim's status took {took} s")
    assert grown < 64, f"the daemon grew by {grown} MiB"
    assert max(took) < 2, took
    wait_until(lambda: d.wfctl("status").returncode == 0)
    assert d.running


def test_a_member_announcing_large_frames_does_not_keep_anothers_submit_busy(
        system: Daemon, sandbox: Any, accounts: Accounts, wfd_tmp: Path) -> None:  # noqa: F811
    """Issue 11.8: 25 connections of one member announce 16 MiB frames and send them a
    byte at a time, again and again; another member's 200 KB submit gets through."""
    d = system
    d.start()
    workflow = json.dumps({"name": "big", "env": {"PAD": "x" * 200_000},
                           "steps": [{"id": "a", "command": "true"}]})
    submit = frames_file(sandbox.root, "submit.bin", p.Submit(
        workflow=workflow, source="big.json", base_dir="/", env={"PATH": "/usr/bin:/bin"},
        umask=0o022))
    flood = Raw(d, accounts.member).start("flood", "25", "25")
    try:
        time.sleep(1)  # the flood holds its share of the budget, and queues for more
        for _ in range(3):
            reply, seconds = Raw(d, NOBODY).call(submit)
            assert isinstance(reply, p.Submitted), reply
            assert seconds < 3, seconds
    finally:
        flood.kill()  # our own child, which we started
        flood.wait()
    assert d.running


# ---- stopping and storage errors (issue 10.10) --------------------------------------


def test_a_stop_with_clients_connected_logs_no_traceback(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    rid = d.submit(write_workflow(wfd_tmp, {"steps": [{"id": "a", "command": "true"}]}),
                   "--wait")
    idle = [connect(d) for _ in range(3)]
    mid_request = connect(d)
    mid_request.sendall(p.encode_frame(p.Status(run_id=rid))[:10])  # half a request
    try:
        assert d.stop() == 0
    finally:
        for sock in [*idle, mid_request]:
            sock.close()
    text = d.log_text()
    assert "Traceback" not in text and "CancelledError" not in text, text


def test_a_storage_error_shows_in_the_run_list(sandbox: Any, wfd_tmp: Path) -> None:
    from test_crash_disk import chain_workflow, limited_daemon

    d = limited_daemon(sandbox)
    wf = chain_workflow(wfd_tmp)
    rid = d.submit(wf)
    (wfd_tmp / "gate").touch()
    wait_until(lambda: "cannot persist events" in d.log_text(), timeout=20,
               message="the daemon to log that it cannot persist events")
    for args, summary in ((["status"], "1 run: 1 RUNNING\n"), (["status", "--json"], "")):
        done = d.wfctl(*args)
        assert done.returncode == 0, done.stderr
        assert rid in done.stdout
        assert done.stderr == ("wfctl: warning: wfd cannot persist events: File too large; "
                               "no run makes progress until it can\n" + summary)
    d.proc.send_signal(signal.SIGTERM)  # a stop on a broken disk still ends
    d.proc.wait(30)
