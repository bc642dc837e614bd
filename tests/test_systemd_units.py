"""systemd integration (SPEC 4, issue 7), checked against systemd's own code where
this machine has it: the unit files pass `systemd-analyze verify` with nothing on
stderr, sd_notify datagrams reach a socket bound like PID 1's, socket activation
works under `systemd-socket-activate`, and log lines carry journald's `<N>` prefixes.

PID 1 here need not be systemd: nothing below talks to a running manager.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wfd import systemd

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {False: REPO / "systemd", True: REPO / "systemd" / "user"}
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -c` child that imports this checkout's wfd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX socket paths must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="wfd-sd-") as name:
        yield Path(name)


def _stand_in(directory: Path) -> str:
    directory.mkdir(parents=True)
    exe = directory / "wfd"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.fixture
def wfd_exes(tmp_path: Path) -> list[str]:
    """Real executables named wfd: the venv's console script when installed, and a
    stand-in in a directory whose name ExecStart must quote (a space and a %)."""
    installed = Path(sys.executable).parent / "wfd"
    found = [str(installed)] if installed.is_file() and os.access(installed, os.X_OK) else []
    return [*found, _stand_in(tmp_path / "my venv %i" / "bin")]


@pytest.fixture
def wfd_exe(wfd_exes: list[str]) -> str:
    return wfd_exes[0]


# ------------------------------------------------------------------ unit files


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_shipped_units_are_the_templates(user: bool) -> None:
    rendered = systemd.render_units("/usr/bin/wfd", user)
    shipped = {p.name: p.read_text() for p in SHIPPED[user].glob("wfd.*")}
    assert shipped == rendered, (
        "systemd/ differs from wfd/systemd.py's templates; regenerate with wfd.systemd.write_units"
    )


def _verify(unit_dir: Path, user: bool, runtime_dir: Path,
            wrap: Callable[[list[str]], list[str]] = list) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze [--user] verify` on both units of `unit_dir`, by path."""
    command = [ANALYZE or "systemd-analyze", *(["--user"] if user else []), "verify"]
    command += [str(unit_dir / "wfd.service"), str(unit_dir / "wfd.socket")]
    # The user manager's search path and %t need a runtime dir; the test's own keeps
    # verify away from any real user session. The group wfd need not exist:
    # SocketGroup= is resolved when the socket starts, not by verify.
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir), SYSTEMD_LOG_COLOR="0")
    return subprocess.run(wrap(command), capture_output=True, text=True, env=env, timeout=60)


def _assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    # verify exits 0 on unknown keys and bad values ("ignoring"), so stderr must be empty.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_verify(user: bool, wfd_exes: list[str], tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for i, exe in enumerate(wfd_exes):
        unit_dir = tmp_path / f"units{i}"
        systemd.write_units(unit_dir, exe, user)
        assert f"ExecStart={systemd.exec_path(exe)}" in (unit_dir / "wfd.service").read_text()
        _assert_clean(_verify(unit_dir, user, runtime))


def _with_usr_bin_wfd(command: list[str], stand_in: Path) -> list[str]:
    """`command` run where /usr/bin/wfd exists: as it is when this machine has one,
    else in a private mount namespace with `stand_in` overlaid on /usr/bin (the
    host's /usr/bin is not touched)."""
    if os.access("/usr/bin/wfd", os.X_OK):
        return command
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    overlay = f"mount -t overlay overlay -o lowerdir={stand_in}:/usr/bin /usr/bin"
    return [*unshare, "sh", "-c", f'{overlay} && exec "$@"', "sh", *command]


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_shipped_units_verify(user: bool, tmp_path: Path) -> None:
    stand_in = Path(_stand_in(tmp_path / "bin")).parent
    probe = ["test", "-x", "/usr/bin/wfd"]
    if shutil.which("unshare") is None or subprocess.run(
            _with_usr_bin_wfd(probe, stand_in), capture_output=True, timeout=30).returncode:
        pytest.skip("cannot provide /usr/bin/wfd in a private mount namespace here"
                    " (test_rendered_units_verify covers the same text)")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    _assert_clean(_verify(SHIPPED[user], user, runtime,
                          wrap=lambda command: _with_usr_bin_wfd(command, stand_in)))


def settings(text: str) -> dict[str, list[str]]:
    """"Section.Key" -> values, in order (keys such as After= may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(f"{section}.{key}", []).append(value)
    return found


def seconds(span: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "": 1}
    value, unit = re.fullmatch(r"(\d+)(ms|s|min|)", span).groups()  # type: ignore[union-attr]
    return int(value) * units[unit]


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_say_what_spec_4_says(user: bool) -> None:
    units = systemd.render_units("/opt/wfd/bin/wfd", user)
    service, sock = settings(units["wfd.service"]), settings(units["wfd.socket"])
    for key, value in {"Type": "notify", "KillMode": "process", "Restart": "on-failure",
                       "RuntimeDirectory": "wfd", "RuntimeDirectoryPreserve": "yes",
                       "NotifyAccess": "main"}.items():
        assert service[f"Service.{key}"] == [value], key
    assert seconds(service["Service.TimeoutStopSec"][0]) >= 5 + 30  # kill_grace 5 s + margin
    assert seconds(service["Service.WatchdogSec"][0]) > 0  # the daemon pings when it is set
    # The socket unit makes the directory first, the service re-applies its own mode.
    assert sock["Socket.DirectoryMode"] == service["Service.RuntimeDirectoryMode"]
    assert sock["Install.WantedBy"] == ["sockets.target"]
    if user:
        assert service["Service.ExecStart"] == ["/opt/wfd/bin/wfd"]
        assert "Service.StateDirectory" not in service
        assert service["Service.RuntimeDirectoryMode"] == ["0700"]
        assert sock["Socket.ListenStream"] == ["%t/wfd/wfd.sock"]
        assert sock["Socket.SocketMode"] == ["0600"]
    else:
        assert service["Service.ExecStart"] == ["/opt/wfd/bin/wfd --system"]
        assert service["Service.StateDirectory"] == ["wfd"]
        assert sock["Socket.ListenStream"] == ["/run/wfd/wfd.sock"]
        assert (sock["Socket.SocketMode"], sock["Socket.SocketGroup"]) == (["0660"], ["wfd"])


def test_exec_path_quotes_what_systemd_would_split() -> None:
    assert systemd.exec_path("/usr/bin/wfd") == "/usr/bin/wfd"
    assert systemd.exec_path("/home/a b/100%/wfd") == '"/home/a b/100%%/wfd"'
    assert systemd.exec_path('/x/"q"\\/wfd') == '"/x/\\"q\\"\\\\/wfd"'
    for bad in ("wfd", "bin/wfd", "/x/$HOME/wfd", "/x/a\nb/wfd"):
        with pytest.raises(ValueError):
            systemd.exec_path(bad)


# ------------------------------------------------------------------ install-units


def test_find_wfd_prefers_the_running_script(wfd_exe: str, tmp_path: Path) -> None:
    assert systemd.find_wfd(argv0=wfd_exe, executable="/nonexistent/python") == wfd_exe
    # `python -m wfd`: the wfd next to that python.
    main = "/somewhere/wfd/__main__.py"
    python = str(Path(wfd_exe).parent / "python3")
    assert systemd.find_wfd(argv0=main, executable=python) == wfd_exe


def test_install_units_print(wfd_exe: str, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", [wfd_exe, "install-units"])
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert systemd.install_units(["--print"]) == 0
    out = capsys.readouterr().out
    assert f"ExecStart={systemd.exec_path(wfd_exe)} --system\n" in out
    assert "ListenStream=/run/wfd/wfd.sock" in out
    assert systemd.install_units(["--user", "--print"]) == 0
    out = capsys.readouterr().out
    assert f"ExecStart={systemd.exec_path(wfd_exe)}\n" in out
    assert "ListenStream=%t/wfd/wfd.sock" in out
    assert not (tmp_path / "config").exists()  # --print writes nothing


def test_install_units_user_writes_both_units(wfd_exe: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", [wfd_exe])
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(systemd, "systemd_running", lambda: False)  # no daemon-reload here
    assert systemd.install_units(["--user"]) == 0
    unit_dir = tmp_path / "config" / "systemd" / "user"
    assert sorted(p.name for p in unit_dir.iterdir()) == ["wfd.service", "wfd.socket"]
    assert (unit_dir / "wfd.service").read_text() == systemd.render_units(wfd_exe, True)[
        "wfd.service"]
    assert (unit_dir / "wfd.socket").stat().st_mode & 0o777 == 0o644
    out = capsys.readouterr().out
    assert "systemctl --user enable --now wfd.socket wfd.service" in out
    assert "loginctl enable-linger" in out


def test_install_units_cannot_write(wfd_exe: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(sys, "argv", [wfd_exe])
    monkeypatch.setattr(systemd, "unit_dir", lambda user: blocker / "system")
    assert systemd.install_units([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wfd install-units: cannot write the units to ") and err.count("\n") == 1


def test_install_units_bad_usage() -> None:
    with pytest.raises(SystemExit) as exit_info:
        systemd.install_units(["--bogus"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------ sd_notify


def _receiver(address: str) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    return receiver


def _exchange(notify_socket: str, bind_to: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket)
    with _receiver(bind_to) as receiver:
        assert systemd.ready()
        assert systemd.status("2 runs active\n1 waiting")
        assert systemd.extend_timeout(7.5)
        assert systemd.watchdog_ping()
        assert systemd.stopping()
        got = [receiver.recv(4096) for _ in range(5)]
    assert got == [b"READY=1", b"STATUS=2 runs active 1 waiting",
                   b"EXTEND_TIMEOUT_USEC=7500000", b"WATCHDOG=1", b"STOPPING=1"]


def test_notify_to_a_socket_path(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(short_dir / "notify")
    _exchange(path, path, monkeypatch)


def test_notify_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wfd-test-{uuid.uuid4().hex}"
    _exchange("@" + name, "\0" + name, monkeypatch)


def test_notify_from_a_child_process(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    code = "from wfd import systemd; assert systemd.ready('resumed 3 runs')"
    with _receiver(path) as receiver:
        subprocess.run([sys.executable, "-c", code], env=child_env(NOTIFY_SOCKET=path),
                       check=True, timeout=30)
        assert receiver.recv(4096) == b"READY=1\nSTATUS=resumed 3 runs"


def test_notify_keeps_one_socket(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    notifier = systemd.Notifier(path)
    with _receiver(path) as receiver:
        assert notifier.send("STATUS=a")
        first = notifier._sock
        assert notifier.send("STATUS=b")
        assert notifier._sock is first
        assert [receiver.recv(64), receiver.recv(64)] == [b"STATUS=a", b"STATUS=b"]
    notifier.close()


def test_notify_without_systemd_is_a_quiet_no(short_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.ready() is False


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# ------------------------------------------------------------------ socket activation

# The child reports what listen_fds gave it, then serves one connection. Given
# `self|other FD`, it first moves the inherited FD to 3 and sets LISTEN_PID itself.
ACTIVATED = textwrap.dedent("""
    import fcntl, json, os, socket, sys
    from wfd import systemd
    if sys.argv[1:]:
        mode, fd = sys.argv[1], int(sys.argv[2])
        if fd != 3:
            os.dup2(fd, 3)
            os.close(fd)
        os.environ["LISTEN_PID"] = str(os.getpid()) if mode == "self" else "1"
    fds = systemd.listen_fds()
    report = {
        "names": [name for _, name in fds],
        "fds": [s.fileno() for s, _ in fds],
        "types": [[s.family == socket.AF_UNIX, s.type == socket.SOCK_STREAM] for s, _ in fds],
        "cloexec": [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                    for s, _ in fds],
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    if fds:
        conn, _ = fds[0][0].accept()
        conn.sendall(json.dumps(report).encode())
        conn.close()
    else:
        print(json.dumps(report))
""")


def _read_all(path: Path, deadline: float) -> bytes:
    """Connect to `path` (retrying until it exists) and read until EOF."""
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(max(0.1, deadline - time.monotonic()))
                client.connect(str(path))
                return b"".join(iter(lambda: client.recv(65536), b""))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_listen_fds_under_systemd_socket_activate(short_dir: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = short_dir / "wfd.sock"
    # systemd-socket-activate passes only the variables named with -E.
    command = [activate, "-l", str(path), "--fdname=wfd.socket", "-E", f"PYTHONPATH={REPO}",
               sys.executable, "-c", ACTIVATED]
    with subprocess.Popen(command, env=child_env()) as proc:
        try:
            report = json.loads(_read_all(path, time.monotonic() + 20))
        finally:
            proc.wait(timeout=20)
    assert report == {"names": ["wfd.socket"], "fds": [3], "types": [[True, True]],
                      "cloexec": [True], "env": []}


def _run_with_fd3(sock: socket.socket, mode: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ACTIVATED, which moves `sock` to its fd 3 and sets LISTEN_PID by `mode`."""
    fd = sock.fileno()
    return subprocess.Popen([sys.executable, "-c", ACTIVATED, mode, str(fd)], env=env,
                            pass_fds=[fd], stdout=subprocess.PIPE)


def test_listen_fds_with_listen_pid_set_by_the_child(short_dir: Path) -> None:
    path = short_dir / "wfd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        env = child_env(LISTEN_FDS="1", LISTEN_FDNAMES="wfd.socket")
        with _run_with_fd3(listener, "self", env) as proc:
            report = json.loads(_read_all(path, time.monotonic() + 20))
            proc.wait(timeout=20)
    assert report == {"names": ["wfd.socket"], "fds": [3], "types": [[True, True]],
                      "cloexec": [True], "env": []}


def test_listen_fds_for_another_pid_are_ignored(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(short_dir / "wfd.sock"))
        listener.listen()
        env = child_env(LISTEN_FDS="1", LISTEN_FDNAMES="wfd.socket")
        with _run_with_fd3(listener, "other", env) as proc:
            out, _ = proc.communicate(timeout=20)
    assert json.loads(out) == {"names": [], "fds": [], "types": [], "cloexec": [], "env": []}


def test_listen_fds_malformed_or_absent() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "three", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # removed in every case, so no child inherits them
    assert systemd.listen_fds({}) == []


# ------------------------------------------------------------------ logging


def test_syslog_priorities() -> None:
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [systemd.syslog_priority(level) for level in levels] == [7, 6, 4, 3, 2]


def test_journal_prefix_when_stderr_is_the_journal_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    info = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    assert systemd.journal_prefix(logging.INFO) == "<6>"
    assert systemd.journal_prefix(logging.ERROR) == "<3>"
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")  # stderr moved
    assert systemd.journal_prefix(logging.INFO) == ""
    monkeypatch.delenv("JOURNAL_STREAM")
    assert systemd.journal_prefix(logging.INFO) == ""


LOGS = textwrap.dedent("""
    import logging
    from wfd import systemd
    systemd.setup_logging("info")
    log = logging.getLogger("wfd.daemon")
    log.debug("hidden")
    log.info("run 42 started")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("step failed")
""")


def _log_lines(tmp_path: Path, journal: bool) -> list[str]:
    path = tmp_path / "stderr"
    with path.open("w") as stderr:
        info = os.fstat(stderr.fileno())
        env = child_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}" if journal else "0:0")
        subprocess.run([sys.executable, "-c", LOGS], stderr=stderr, env=env, check=True,
                       timeout=30)
    return path.read_text().splitlines()


def test_log_lines_for_the_journal(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, journal=True)
    assert lines[:2] == ["<6>run 42 started", "<3>step failed"]
    assert lines[2] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in lines[1:])


def test_log_lines_without_the_journal(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, journal=False)
    head = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z wfd\[\d+\] "
    assert re.fullmatch(head + "INFO run 42 started", lines[0])
    assert re.fullmatch(head + "ERROR step failed", lines[1])
    assert all(re.match(head + "ERROR ", line) for line in lines[1:])
    assert lines[-1].endswith("ZeroDivisionError: division by zero")


def test_setup_logging_replaces_its_handler_and_rejects_bad_levels() -> None:
    logger = logging.getLogger("wfd")
    before = list(logger.handlers)
    try:
        first = systemd.setup_logging("DEBUG")
        second = systemd.setup_logging("warning")
        assert second in logger.handlers and first not in logger.handlers
        assert logger.level == logging.WARNING
        with pytest.raises(ValueError, match="unknown log level"):
            systemd.setup_logging("loud")
    finally:
        logger.handlers[:] = before
        logger.setLevel(logging.NOTSET)
