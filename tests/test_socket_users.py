"""Who may talk to wfd, and as whom steps run (SPEC 6), with real users.

Run as root: clients run as `nobody` and as test users made with useradd
(removed at teardown). A user daemon serves its own uid and root only, even
with its socket opened to everyone; a system daemon (`--system`) serves root
and its socket group's members, runs each run's steps as the user who
submitted it, and shows a user only their own runs: another user's run
answers exactly as an unknown id does.

`nobody` cannot run this venv's Python when it lies under a private home, so
the `foreign_python` fixture finds (or makes) a Python that any user can run
and copies wfd, wfctl and their dependencies next to it.
"""

from __future__ import annotations

import grp
import importlib.util
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, Daemon, _as_user, base_env, hello, wait_until, write_workflow

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not hasattr(os, "getgrouplist"),
    reason="needs root, to run clients as other users",
)

NOBODY = "nobody"
DEPENDENCIES = ("msgspec", "psutil", "platformdirs", "cronsim")


# ---- a Python for other users ------------------------------------------------------


@dataclass
class Runtime:
    """A Python any user can run, and a directory with wfd, wfctl and their deps."""

    python: str
    lib: Path

    def argv(self, module: str) -> list[str]:
        """Run `module.main()` isolated (-I: no env, no user site, no cwd on the path)."""
        boot = (f"import sys; sys.path.insert(0, {str(self.lib)!r}); "
                f"from {module} import main; raise SystemExit(main())")
        return [self.python, "-I", "-c", boot]


def _runs_as(user: str, argv: list[str]) -> bool:
    entry = pwd.getpwnam(user)
    try:
        done = subprocess.run(argv, user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                              cwd="/", capture_output=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})
    except OSError:
        return False
    return done.returncode == 0


def _copy_package(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _open_up(root: Path) -> None:
    """Make everything under `root` readable (and directories enterable) by anyone."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, os.stat(path).st_mode | 0o444)


@pytest.fixture(scope="session")
def foreign_python() -> Iterator[Runtime]:
    """This Python if `nobody` can run it, else the system's, with copies of wfd, wfctl
    and their dependencies; failing that a fresh venv outside any home, with the
    dependencies installed from the package index."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = Path(tempfile.mkdtemp(prefix="wfd-rt-", dir="/tmp"))
    try:
        lib = root / "lib"
        for package in ("wfd", "wfctl"):
            _copy_package(REPO / package, lib / package)
        bare = root / "bare"
        shutil.copytree(lib, bare)
        for name in DEPENDENCIES:
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.submodule_search_locations, name
            _copy_package(Path(list(spec.submodule_search_locations)[0]), lib / name)
        _open_up(root)
        probe = "import msgspec, psutil, platformdirs, wfctl.cli, wfd.daemon"
        candidates = dict.fromkeys(
            p for p in (sys.executable, "/usr/bin/python3", shutil.which("python3")) if p
        )
        for python in candidates:
            runtime = Runtime(python, lib)
            if _runs_as(NOBODY, [python, "-I", "-c",
                                 f"import sys; sys.path.insert(0, {str(lib)!r}); {probe}"]):
                yield runtime
                return
        # No Python here can load the copied compiled dependencies as nobody: a venv.
        base = next((p for p in candidates if _runs_as(NOBODY, [p, "-I", "-c", "pass"])), None)
        if base is None:
            pytest.skip("no Python that nobody can run")
        venv = root / "venv"
        made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              *DEPENDENCIES], capture_output=True, text=True, timeout=600)
        if made.returncode or pip.returncode:
            pytest.skip(f"cannot make a venv for nobody: {made.stderr}{pip.stderr}")
        _open_up(root)
        runtime = Runtime(str(venv / "bin" / "python"), bare)
        if not _runs_as(NOBODY, [runtime.python, "-I", "-c",
                                 f"import sys; sys.path.insert(0, {str(bare)!r}); {probe}"]):
            pytest.skip("the venv made for nobody does not work")
        yield runtime
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- test accounts ---------------------------------------------------------------------


@dataclass
class Accounts:
    group: str  # the socket group; nobody and `member` are in it
    gid: int
    member: str  # a third user, in the group
    stranger: str  # a fourth user, not in the group


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    for tool in ("groupadd", "useradd", "gpasswd", "userdel", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    try:
        pwd.getpwnam(NOBODY)
    except KeyError:
        pytest.skip("needs a nobody user")
    tag = uuid.uuid4().hex[:8]
    group, member, stranger = f"wfdg{tag}", f"wfdm{tag}", f"wfds{tag}"
    users: list[str] = []
    made_group = False
    try:
        _run("groupadd", group)
        made_group = True
        _run("gpasswd", "-a", NOBODY, group)
        for name, groups in ((member, ["-G", group]), (stranger, [])):
            _run("useradd", "-M", "-N", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                 *groups, name)
            users.append(name)
        yield Accounts(group, grp.getgrnam(group).gr_gid, member, stranger)
    finally:
        for name in users:
            subprocess.run(["userdel", name], capture_output=True)
        if made_group:
            subprocess.run(["groupdel", group], capture_output=True)


# ---- clients and daemons as other users ----------------------------------------------


def client(rt: Runtime, d: Daemon, user: str, *args: str, extra_groups: list[int] | None = None,
           env: dict[str, str | None] | None = None, timeout: float = 30) -> Any:
    """`wfctl --socket S ARGS` as `user` (with its groups, unless `extra_groups`)."""
    full_env = base_env(d.mark, env)
    kwargs = _as_user(user, full_env)
    if extra_groups is not None:
        kwargs["extra_groups"] = extra_groups
    if env:
        full_env.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([*rt.argv("wfctl.cli"), "--socket", str(d.socket), *args],
                          env=full_env, cwd="/", capture_output=True, text=True,
                          timeout=timeout, **kwargs)


class ForeignDaemon(Daemon):
    """A user daemon run as another user, through the runtime that user can run."""

    def __init__(self, rt: Runtime, user: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rt = rt
        self.user_kwargs = _as_user(user, self.env)

    @property
    def argv(self) -> list[str]:
        return [*self.rt.argv("wfd.daemon"), "--state-dir", str(self.state_dir),
                "--socket", str(self.socket), "--max-parallel", str(self.max_parallel),
                *self.extra]

    def start(self, wait: bool = True) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                cwd="/", start_new_session=True, **self.user_kwargs)
        if wait:
            self.wait_ready()
        return self


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def nobody_dir(path: Path) -> Path:
    path.mkdir()
    entry = pwd.getpwnam(NOBODY)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o755)
    return path


def unknown_id_like(run_id: str) -> str:
    """A well-formed run id that names no run."""
    return run_id[:-8] + ("00000000" if not run_id.endswith("00000000") else "11111111")


def same_answer(theirs: Any, their_id: str, unknown: Any, unknown_id: str) -> None:
    """Another user's run answers exactly as an unknown id: same exit code, same words."""
    assert theirs.returncode == unknown.returncode == 2, (theirs, unknown)
    assert theirs.stdout == unknown.stdout == ""
    assert theirs.stderr.replace(their_id, "ID") == unknown.stderr.replace(unknown_id, "ID")
    assert theirs.stderr.strip() == f"wfctl: no such run: {their_id}"


# ---- user daemon --------------------------------------------------------------------


def test_user_daemon_refuses_a_foreign_uid_even_with_its_socket_opened_up(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime) -> None:
    d = daemon()
    assert mode(d.socket) == 0o600
    assert mode(sandbox.root) == 0o700
    os.chmod(d.socket, 0o777)
    os.chmod(sandbox.root, 0o777)
    wf = write_workflow(sandbox.root, {"steps": [{"id": "a", "command": "true"}]})
    os.chmod(wf, 0o644)
    started = time.monotonic()
    for args in (["status"], ["run", str(wf)]):
        done = client(foreign_python, d, NOBODY, *args)
        assert done.returncode == 3, done
        assert done.stdout == ""
        assert done.stderr == (
            "wfctl: wfd refuses uid 65534 (nobody): this daemon serves only its own user, "
            "uid 0 (root), and root (start your own with `wfd`)\n")
    assert time.monotonic() - started < 20  # two interpreter starts; no waiting on a deadline
    assert d.run_ids() == set()
    assert "refused a connection from uid 65534 (nobody)" in d.log_text()
    done = d.wfctl("status")
    assert done.returncode == 0, done.stderr


def test_run_directories_are_0700_and_their_files_0600(
        daemon: Callable[..., Daemon], wfd_tmp: Path) -> None:
    d = daemon()
    assert mode(d.state_dir) == 0o700
    assert mode(d.state_dir / "runs") == 0o700
    run_id = d.submit(write_workflow(wfd_tmp, {"steps": [
        {"id": "a", "command": "echo out", "retries": 1},
        {"id": "b", "command": "echo b", "depends_on": ["a"]}]}), "--wait")
    run_dir = d.state_dir / "runs" / run_id
    found = []
    for dirpath, _dirnames, filenames in os.walk(run_dir):
        assert mode(Path(dirpath)) == 0o700, dirpath
        for name in filenames:
            assert mode(Path(dirpath) / name) == 0o600, name
            found.append(name)
    assert sorted(found) == ["a.1.log", "b.1.log", "events.jsonl", "workflow.json"]


def test_user_daemon_of_another_user_serves_that_user_and_root_only(
        sandbox: Any, foreign_python: Runtime, accounts: Accounts) -> None:
    os.chmod(sandbox.root, 0o711)
    home = nobody_dir(sandbox.root / "nobody")
    d = ForeignDaemon(foreign_python, NOBODY, sandbox.root, "nb", sandbox.mark,
                      state_dir=home / "state", socket=home / "wfd.sock")
    sandbox.daemons.append(d)
    d.start()
    assert mode(d.socket) == 0o600
    assert d.socket.stat().st_uid == pwd.getpwnam(NOBODY).pw_uid
    # its own user, and root, whom the daemon serves ...
    assert client(foreign_python, d, NOBODY, "status").returncode == 0
    assert hello(d.socket) is not None
    wf = write_workflow(home, {"steps": [{"id": "who", "command": "id -u > who.txt"}]})
    done = client(foreign_python, d, NOBODY, "run", str(wf), "--wait")
    assert done.returncode == 0, done.stderr
    assert (home / "who.txt").read_text().strip() == "65534"
    run_id = done.stdout.strip()
    status = json.loads(client(foreign_python, d, NOBODY, "status", run_id, "--json").stdout)
    assert status["owner"] == NOBODY
    # ... and root, who names the socket: the run is still the daemon user's (SPEC 5)
    run_id = d.submit(wf, "--wait")
    assert (home / "who.txt").read_text().strip() == "65534"
    status = json.loads(d.wfctl("status", run_id, "--json").stdout)
    assert status["owner"] == NOBODY
    # anyone else: their wfctl refuses first, and the daemon's peer check would, even with
    # the socket open to all (tests/test_client_trust.py shows nothing is sent)
    os.chmod(d.socket, 0o777)
    done = client(foreign_python, d, accounts.member, "status")
    member_uid = pwd.getpwnam(accounts.member).pw_uid
    assert done.returncode == 3, done
    assert done.stderr == (
        f"wfctl: not talking to {d.socket}: the process answering on it runs as uid 65534 "
        f"(nobody), not as you (uid {member_uid}) or root; it gets nothing from this wfctl\n")


# ---- system daemon ---------------------------------------------------------------------


def system_daemon(daemon: Callable[..., Daemon], sandbox: Any, accounts: Accounts) -> Daemon:
    """`wfd --system --socket-group G` with a private state dir and socket in the sandbox,
    whose root any user may pass through (but not list)."""
    os.chmod(sandbox.root, 0o711)
    return daemon(extra=["--system", "--socket-group", accounts.group],
                  socket=sandbox.root / "run" / "wfd.sock")


def test_system_daemon_runs_steps_as_the_submitter_and_keeps_runs_apart(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,
        accounts: Accounts) -> None:
    rt = foreign_python
    d = system_daemon(daemon, sandbox, accounts)
    assert mode(d.socket) == 0o660 and d.socket.stat().st_gid == accounts.gid
    assert mode(d.socket.parent) == 0o750 and d.socket.parent.stat().st_gid == accounts.gid
    work = nobody_dir(sandbox.root / "work")
    report = ('{ id -u; id -g; id -G; echo "$HOME"; echo "$USER"; echo "$LOGNAME"; '
              'echo "$SHELL"; pwd; } > who.txt')
    who = write_workflow(work, {"steps": [{"id": "who", "command": report}]}, "who.json")
    sleeper = write_workflow(work, {"steps": [{"id": "nap", "command": "sleep 60",
                                               "kill_grace": 1}]}, "nap.json")
    for path in (who, sleeper):
        os.chmod(path, 0o644)

    # nobody submits; the step runs as nobody, with nobody's passwd entry and groups
    lie = {"HOME": "/tmp/fake", "USER": "fake", "LOGNAME": "fake", "SHELL": "/bin/fake"}
    done = client(rt, d, NOBODY, "run", str(who), "--wait", env=lie)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    lines = (work / "who.txt").read_text().splitlines()
    nobody = pwd.getpwnam(NOBODY)
    assert lines[0:2] == [str(nobody.pw_uid), str(nobody.pw_gid)]
    assert sorted(lines[2].split()) == sorted({str(nobody.pw_gid), str(accounts.gid)})
    assert lines[3:] == [nobody.pw_dir, NOBODY, NOBODY, nobody.pw_shell, str(work)]
    assert (work / "who.txt").stat().st_uid == nobody.pw_uid
    done = client(rt, d, NOBODY, "run", str(sleeper))
    assert done.returncode == 0, done.stderr
    napping = done.stdout.strip()

    # root sees both, owned by nobody
    status = json.loads(d.wfctl("status", run_id, "--json").stdout)
    assert (status["owner"], status["state"]) == (NOBODY, "SUCCEEDED")
    listing = d.wfctl("status").stdout
    assert run_id in listing and napping in listing and f"  {NOBODY}  " in listing
    assert d.wfctl("logs", run_id, "who").returncode == 0

    # a third user, also in the socket group, sees neither: exactly like unknown ids
    member = accounts.member
    for args in (["status", "{}"], ["status", "{}", "--json"], ["cancel", "{}"],
                 ["resume", "{}"], ["replay", "{}"], ["logs", "{}", "who"],
                 ["logs", "{}", "nap", "--follow"]):
        for theirs in (run_id, napping):
            their_args = [a.format(theirs) for a in args]
            unknown = unknown_id_like(theirs)
            same_answer(client(rt, d, member, *their_args), theirs,
                        client(rt, d, member, *[a.format(unknown) for a in args]), unknown)
    done = client(rt, d, member, "status", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
    done = client(rt, d, member, "resume-all")
    assert done.returncode == 0 and done.stderr == "no runs to resume\n"
    assert json.loads(d.wfctl("status", napping, "--json").stdout)["state"] == "RUNNING"

    # nobody sees and cancels its own; may not stop the daemon that serves everyone
    mine = json.loads(client(rt, d, NOBODY, "status", "--json").stdout)
    assert sorted(r["run_id"] for r in mine) == sorted([run_id, napping])
    done = client(rt, d, NOBODY, "shutdown")
    assert done.returncode == 2
    assert done.stderr == ("wfctl: only root may stop the system daemon "
                           "(uid 65534 (nobody) asked)\n")
    done = client(rt, d, NOBODY, "cancel", napping)
    assert done.returncode == 0, done.stderr
    assert json.loads(d.wfctl("status", napping, "--json").stdout)["state"] == "CANCELLED"
    assert d.running


def test_system_daemon_enters_cwd_as_the_user(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,
        accounts: Accounts) -> None:
    d = system_daemon(daemon, sandbox, accounts)
    private = sandbox.root / "private"
    private.mkdir(mode=0o700)  # root may enter it; nobody may not
    work = nobody_dir(sandbox.root / "work")
    wf = write_workflow(work, {"steps": [
        {"id": "in-private", "command": "pwd", "cwd": str(private)},
        {"id": "in-work", "command": "pwd > here.txt"},
    ]})
    os.chmod(wf, 0o644)
    done = client(foreign_python, d, NOBODY, "run", str(wf), "--wait")
    assert done.returncode == 1, done.stderr
    status = json.loads(d.wfctl("status", done.stdout.strip(), "--json").stdout)
    step = status["steps"]["in-private"]
    assert (step["state"], step["exit_code"]) == ("FAILED", None)
    assert step["error"] == f"cannot start: cannot enter {private} as nobody: Permission denied"
    assert status["steps"]["in-work"]["state"] == "SUCCEEDED"
    assert (work / "here.txt").read_text().strip() == str(work)


def test_system_daemon_membership_comes_from_the_group_database(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,
        accounts: Accounts) -> None:
    d = system_daemon(daemon, sandbox, accounts)
    # a user outside the group cannot even reach the socket's directory ...
    stranger_uid = pwd.getpwnam(accounts.stranger).pw_uid
    done = client(foreign_python, d, accounts.stranger, "status")
    assert done.returncode == 3
    assert done.stderr == (f"wfctl: cannot reach wfd at {d.socket}: Permission denied "
                           "(start it with `wfd` or `systemctl start wfd`)\n")
    # ... and once everything is opened up, the daemon itself decides, from the group
    # database: nobody is in the group, also when its process carries no such group ...
    os.chmod(d.socket.parent, 0o755)
    os.chmod(d.socket, 0o666)
    done = client(foreign_python, d, NOBODY, "status", extra_groups=[])
    assert done.returncode == 0, done.stderr
    # ... and the stranger is not, also when its process claims the socket group
    for extra in (None, [accounts.gid]):
        started = time.monotonic()
        done = client(foreign_python, d, accounts.stranger, "status", extra_groups=extra)
        assert done.returncode == 3, done
        assert done.stderr == (
            f"wfctl: wfd refuses uid {stranger_uid} ({accounts.stranger}): this system daemon "
            f"serves root and the members of group {accounts.group!r} (ask an administrator "
            "to add you)\n")
        assert time.monotonic() - started < 10
    wait_until(lambda: "refused a connection" in d.log_text())


def test_system_daemon_prunes_only_the_askers_runs(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,
        accounts: Accounts) -> None:
    """`wfctl prune` (issue 14) never removes another user's runs, except root's prune;
    a short reference never resolves to (or lists) another user's run."""
    from bigruns import finished_run, run_id

    os.chmod(sandbox.root, 0o711)
    d = daemon(extra=["--system", "--socket-group", accounts.group],
               socket=sandbox.root / "run" / "wfd.sock", start=False)
    owners = [(pwd.getpwnam(accounts.member).pw_uid, accounts.member),
              (pwd.getpwnam(NOBODY).pw_uid, NOBODY)]  # nobody's run is the newest
    made = {name: [] for _, name in owners}
    for i in range(6):
        uid, name = owners[i % 2]
        made[name].append(finished_run(d.state_dir, run_id(i), "SUCCEEDED", uid=uid,
                                       owner=name).name)
    d.start()
    # short references see only the asker's runs (issue 14)
    done = client(foreign_python, d, accounts.member, "status", "@last", "--json")
    assert json.loads(done.stdout)["run_id"] == made[accounts.member][-1]
    assert made[accounts.member][-1] == run_id(4)
    assert json.loads(d.wfctl("status", "@last", "--json").stdout)["run_id"] == run_id(5)
    done = client(foreign_python, d, accounts.member, "status", run_id(0)[:6])
    assert done.returncode == 2
    assert done.stderr.splitlines()[1:] == [f"  {r}  small" for r in
                                            reversed(made[accounts.member])]
    done = client(foreign_python, d, accounts.member, "prune", "--keep", "0", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == made[accounts.member]
    done = client(foreign_python, d, accounts.member, "prune", "--keep", "1")
    assert done.stdout.splitlines() == made[accounts.member][:2]
    left = sorted(r["run_id"] for r in json.loads(d.wfctl("status", "--json").stdout))
    assert left == sorted(made[NOBODY] + made[accounts.member][2:])
    done = d.wfctl("prune", "--keep", "1")  # root: everyone's runs, the newest one kept
    assert done.stdout.splitlines() == sorted(made[NOBODY][:-1] + made[accounts.member][2:])
    assert [r["run_id"] for r in json.loads(d.wfctl("status", "--json").stdout)] == \
        made[NOBODY][-1:]


def test_system_daemon_schedules_belong_to_their_owner(
        daemon: Callable[..., Daemon], sandbox: Any, foreign_python: Runtime,
        accounts: Accounts) -> None:
    """Issue 13, prove-it 7: nobody's schedule runs as nobody; another member of the
    socket group cannot list, show, pause, fire or remove it: it answers as unknown."""
    rt = foreign_python
    d = system_daemon(daemon, sandbox, accounts)
    work = nobody_dir(sandbox.root / "work")
    wf = write_workflow(work, {"steps": [{"id": "who", "command": "id -u >> who.txt"}]})
    os.chmod(wf, 0o644)
    done = client(rt, d, NOBODY, "schedule", "add", "mine", str(wf), "--cron", "@yearly",
                  "--tz", "UTC")
    assert done.returncode == 0, done.stderr
    member = accounts.member
    done = client(rt, d, member, "schedule", "list", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
    for action in ("show", "pause", "unpause", "fire", "rm"):
        theirs = client(rt, d, member, "schedule", action, "mine")
        unknown = client(rt, d, member, "schedule", action, "nosuch")
        assert theirs.returncode == unknown.returncode == 2, (action, theirs.stderr)
        assert theirs.stderr == "wfctl: no such schedule: mine\n"
        assert unknown.stderr == "wfctl: no such schedule: nosuch\n"
    # the member may have a schedule of the same name: a schedule is (owner, name)
    done = client(rt, d, member, "schedule", "add", "mine", str(wf), "--every", "1d")
    assert done.returncode == 0, done.stderr
    # root sees both; nobody's is still there, unpaused, and fires as nobody
    listing = json.loads(d.wfctl("schedule", "list", "--json").stdout)
    assert sorted((s["name"], s["owner"], s["paused"]) for s in listing) == [
        ("mine", NOBODY, False), ("mine", member, False)]
    done = client(rt, d, NOBODY, "schedule", "fire", "mine")
    assert done.returncode == 0, done.stderr
    status = wait_until(lambda: _finished(d, done.stdout.strip()), 60)
    assert (status["owner"], status["state"], status["schedule"]) == (
        NOBODY, "SUCCEEDED", "mine")
    assert (work / "who.txt").read_text().split() == [str(pwd.getpwnam(NOBODY).pw_uid)]


def _finished(d: Daemon, run_id: str) -> Any:
    status = json.loads(d.wfctl("status", run_id, "--json").stdout)
    return status if status["state"] in ("SUCCEEDED", "FAILED") else None
