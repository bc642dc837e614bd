"""A socket another user planted gets nothing from wfctl (issue 11, finding 1).

Run as root, with users made for the test: an attacker (`accounts.stranger`)
listens where a victim's wfctl looks for its daemon, answering `Hello` and
`Submit` as a daemon would; the victim (`accounts.member`) runs wfctl with a
secret in its environment. wfctl must refuse, exit 3 with the reason, before
it sends a byte. The attacker's server logs what it got, so the test sees
whether anything was sent.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import _as_user, base_env, wait_until, write_workflow
from test_socket_users import Accounts, Runtime, accounts, foreign_python  # noqa: F401

from wfd import protocol as p

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not hasattr(os, "getgrouplist"),
    reason="needs root, to run clients as other users",
)

RUN_ID = "20261125T095852Z-7f3a9c01"

# A fake daemon in the stdlib only: answers the first frame with a HelloReply and
# every later one with Submitted; logs each connection and how many bytes came.
ATTACKER = r"""
import os, socket, struct, sys
path, log = sys.argv[1], sys.argv[2]
replies = [bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen(8)
def note(line):
    with open(log, "a") as f:
        f.write(line + "\n")
note("listening")
while True:
    conn, _ = srv.accept()
    note("connected")
    buf, total, frames = b"", 0, 0
    while True:
        try:
            chunk = conn.recv(1 << 20)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        total += len(chunk)
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            buf = buf[4 + struct.unpack(">I", buf[:4])[0]:]
            conn.sendall(replies[min(frames, 1)])
            frames += 1
    note(f"closed after {total} bytes")
    conn.close()
"""


class Attacker:
    """The fake daemon, run as `user` with `rt`'s Python, listening on `path`."""

    def __init__(self, rt: Runtime, user: str, path: Path, log: Path, victim_uid: int) -> None:
        self.log = log
        hello = p.encode_frame(p.HelloReply(version="0.1.0", protocol=p.PROTOCOL, pid=1,
                                            system=False, uid=victim_uid))
        env = {"PATH": "/usr/bin:/bin"}
        self.proc = subprocess.Popen(
            [rt.python, "-I", "-c", ATTACKER, str(path), str(log), hello.hex(),
             p.encode_frame(p.Submitted(RUN_ID)).hex()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", env=env, start_new_session=True, **_as_user(user, env))
        wait_until(lambda: "listening" in self.lines() or self.proc.poll() is not None,
                   message="the attacker's server")
        assert self.proc.poll() is None, "the attacker's server did not start"

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def scene(sandbox: Any, foreign_python: Runtime,  # noqa: F811
          accounts: Accounts) -> Iterator[dict[str, Any]]:  # noqa: F811
    """The victim's /tmp/wfd-<uid> (absent, cleaned up after), a workflow the victim can
    read, a directory of the attacker's, and the attackers started (stopped after)."""
    victim_uid = pwd.getpwnam(accounts.member).pw_uid
    planted = Path("/tmp") / f"wfd-{victim_uid}"
    shutil.rmtree(planted, ignore_errors=True)  # left by an earlier user of this fresh uid
    os.chmod(sandbox.root, 0o711)
    lair = sandbox.root / "attacker"
    lair.mkdir(mode=0o755)
    stranger = pwd.getpwnam(accounts.stranger)
    os.chown(lair, stranger.pw_uid, stranger.pw_gid)
    wf = write_workflow(sandbox.root, {"steps": [{"id": "a", "command": "true"}]})
    os.chmod(wf, 0o644)
    attackers: list[Attacker] = []

    def attack(path: Path) -> Attacker:
        attacker = Attacker(foreign_python, accounts.stranger, path,
                            lair / f"log{len(attackers)}", victim_uid)
        attackers.append(attacker)
        return attacker

    def wfctl_as(user: str, *args: str) -> subprocess.CompletedProcess:
        """wfctl as `user`, as from cron: no XDG_RUNTIME_DIR, a secret to lose."""
        env = base_env(sandbox.mark, {"XDG_RUNTIME_DIR": None, "TMPDIR": None,
                                      "WFD_NO_AUTOSTART": None,
                                      "SECRET_TOKEN": "hunter2"})
        return subprocess.run([*foreign_python.argv("wfctl.cli"), *args], env=env, cwd="/",
                              capture_output=True, text=True, timeout=60,
                              **_as_user(user, env))

    try:
        yield {"planted": planted, "lair": lair, "wf": wf, "attack": attack,
               "victim": lambda *args: wfctl_as(accounts.member, *args),
               "attacker": lambda *args: wfctl_as(accounts.stranger, *args),
               "victim_uid": victim_uid, "stranger": stranger}
    finally:
        for attacker in attackers:
            attacker.stop()
        shutil.rmtree(planted, ignore_errors=True)


def _no_byte_sent(attacker: Attacker, path: Path, connections: int) -> None:
    """The attacker saw `connections` connections, each closed with nothing sent. A last
    empty connection of our own marks the end: the server takes them in order."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(path))

    def closed() -> list[str] | None:
        ends = [x for x in attacker.lines() if x.startswith("closed")]
        return ends if len(ends) > connections else None

    ends = wait_until(closed, 10, message="the attacker's log")
    assert attacker.lines().count("connected") == connections + 1, attacker.lines()
    assert ends == ["closed after 0 bytes"] * (connections + 1), attacker.lines()


def test_a_planted_user_socket_directory_gets_nothing(scene: dict[str, Any]) -> None:
    # The attacker makes /tmp/wfd-<victim uid>/ before the victim's daemon does, open to
    # all, and listens there: without XDG_RUNTIME_DIR, that is the victim's default socket.
    planted: Path = scene["planted"]
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    stranger = scene["stranger"]
    os.chown(planted, stranger.pw_uid, stranger.pw_gid)
    attacker = scene["attack"](planted / "wfd.sock")
    for args in (["run", str(scene["wf"])], ["status"]):
        done = scene["victim"](*args)
        assert done.returncode == 3, done
        assert done.stdout == ""
        assert done.stderr == (
            f"wfctl: not talking to {planted}/wfd.sock: {planted} belongs to uid "
            f"{stranger.pw_uid}, not to this user; someone else may have put it there\n")
    _no_byte_sent(attacker, planted / "wfd.sock", 0)  # not even a connection


@pytest.mark.parametrize("how", ["moved into the victim's own directory", "--socket"])
def test_a_socket_served_by_another_user_gets_nothing(how: str, scene: dict[str, Any],
                                                      accounts: Accounts) -> None:  # noqa: F811
    # The directory passes (the victim's own, or not checked for a path given on the
    # command line): the peer's uid is what gives the attacker away.
    sock = scene["lair"] / "wfd.sock"
    attacker = scene["attack"](sock)
    stranger = scene["stranger"]
    if how == "--socket":
        args = ["--socket", str(sock)]
    else:
        planted: Path = scene["planted"]
        planted.mkdir(mode=0o700)
        os.chown(planted, scene["victim_uid"], -1)
        os.rename(sock, planted / "wfd.sock")  # as an admin's mistake, or a race, might
        sock = planted / "wfd.sock"
        args = []
    done = scene["victim"](*args, "run", str(scene["wf"]))
    assert done.returncode == 3, done
    assert done.stdout == ""
    assert done.stderr == (
        f"wfctl: not talking to {sock}: the process answering on it runs as uid "
        f"{stranger.pw_uid} ({accounts.stranger}), not as you (uid {scene['victim_uid']}) "
        "or root; it gets nothing from this wfctl\n")
    _no_byte_sent(attacker, sock, 1)


def test_the_fake_daemon_is_talked_to_by_its_own_user(scene: dict[str, Any]) -> None:
    # The control: its own user's wfctl talks to the same fake daemon, so the refusals
    # above come from the checks, not from a server that cannot answer.
    sock = scene["lair"] / "wfd.sock"
    attacker = scene["attack"](sock)
    done = scene["attacker"]("--socket", str(sock), "run", str(scene["wf"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout == RUN_ID + "\n"
    wait_until(lambda: any(x.startswith("closed after") and x != "closed after 0 bytes"
                           for x in attacker.lines()), message="the attacker's log")
