"""Finding and talking to a wfd daemon (SPEC 5, "socket choice").

A connection is a blocking AF_UNIX socket that has said Hello and got a
HelloReply: connect and Hello run under a short timeout, so a dead, hung or
foreign socket never hangs the client; afterwards the socket blocks without a
timeout, because a Cancel or a Watch may rightly take long. Requests then go
on the same connection.

Which socket: `--socket`, else $WFD_SOCKET (no fallback, no autostart), else
the user daemon's default socket if it answers, else the system daemon's, else
an autostarted user daemon. Only "nothing answers" moves on to the next
choice (and a system daemon refusing this user, who may not be in its group);
a daemon that answers and refuses us, or speaks another protocol, is reported
as it is.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from wfd import protocol
from wfd.errors import EXIT_UNREACHABLE, WfdError

HELLO_TIMEOUT = 8.0  # connect + Hello: a live daemon answers in ms, a starting one (socket
# activation, recovery of many runs) may take seconds before it accepts
AUTOSTART_WAIT = 10.0  # SPEC 5
AFTER_EXIT_WAIT = 2.0  # an autostarted daemon that exited may have lost a race to another
HINT = "(start it with `wfd` or `systemctl start wfd`)"

# Variables systemd sets for the unit wfctl may run in; a daemon we start is not that unit.
_SYSTEMD_VARS = (
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
    "WATCHDOG_PID", "RUNTIME_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM",
)


class ReplyError(WfdError):
    """The daemon answered a request with `Error`: its message, and its code as exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


class Unreachable(WfdError):
    """Nothing usable answers on a socket: no file, nobody listening, no answer in time,
    or not a wfd. The caller may try the next socket; the message names the path."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot reach wfd at {path}: {reason} {HINT}")
        self.path = str(path)
        self.reason = reason


class Lost(WfdError):
    """The connection broke after Hello: the daemon stopped, crashed or closed it."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, path: str, err: OSError) -> None:
        super().__init__(f"lost the connection to wfd at {path}: {_reason(err)}")
        self.path = path


class VersionError(WfdError):
    """The daemon speaks another protocol version: upgrade the older of the two."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, theirs: int) -> None:
        super().__init__(f"wfd speaks protocol {theirs}, this wfctl speaks {protocol.PROTOCOL}")


class BadReply(WfdError):
    """The daemon sent a frame this wfctl cannot decode, or a reply of the wrong kind."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, path: str, why: object) -> None:
        super().__init__(f"wfd at {path} sent a reply this wfctl cannot use: {why}")


def recv(sock: socket.socket, path: str) -> protocol.Reply:
    """Next reply; `Error` raises ReplyError; OSError (ConnectionError at EOF) as it comes."""
    try:
        reply = protocol.recv_reply(sock)
    except protocol.VersionMismatch as e:
        raise VersionError(e.theirs) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadReply(path, e) from None
    if isinstance(reply, protocol.Error):
        raise ReplyError(reply.message, reply.code)
    return reply


def expect(reply: protocol.Reply, kind: type, path: str) -> protocol.Reply:
    if not isinstance(reply, kind):
        raise BadReply(path, f"{type(reply).__name__} where {kind.__name__} was due")
    return reply


class Connection:
    """One open connection to a daemon that answered Hello."""

    def __init__(self, sock: socket.socket, path: str, hello: protocol.HelloReply) -> None:
        self.sock = sock
        self.path = path
        self.hello = hello

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: protocol.Message) -> None:
        try:
            protocol.send(self.sock, msg)
        except OSError as e:
            raise Lost(self.path, e) from None

    def recv(self) -> protocol.Reply:
        """Next reply (see `recv`); Lost when the daemon goes away."""
        try:
            return recv(self.sock, self.path)
        except OSError as e:
            raise Lost(self.path, e) from None

    def call(self, msg: protocol.Message, kind: type) -> protocol.Reply:
        """Send one request and return its one reply, which must be of type `kind`."""
        self.send(msg)
        return expect(self.recv(), kind, self.path)

    def stream(self, msg: protocol.Message) -> Iterator[protocol.Reply]:
        """Send a streaming request (Watch, Logs) and yield its replies as they come."""
        self.send(msg)
        while True:
            yield self.recv()


def _reason(err: OSError) -> str:
    if isinstance(err, TimeoutError):  # socket.timeout is TimeoutError from 3.10 on
        return "no answer in time"
    return err.strerror or str(err) or type(err).__name__


def connect(path: Path | str, timeout: float = HELLO_TIMEOUT) -> Connection:
    """Connect and say Hello within `timeout`. Raises Unreachable when nothing usable
    answers; ReplyError when the daemon refuses us; VersionError on another protocol."""
    path = str(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise Unreachable(path, _reason(e)) from None
        hello = _hello(sock, path)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, path, hello)


def _hello(sock: socket.socket, path: str) -> protocol.HelloReply:
    try:
        protocol.send(sock, protocol.Hello(client="wfctl"))
    except OSError:
        # A daemon refusing this user sends an Error and closes at once, maybe before our
        # Hello arrived (EPIPE); its Error is still there to read, so read before judging.
        pass
    try:
        reply = expect(recv(sock, path), protocol.HelloReply, path)
    except OSError as e:
        raise Unreachable(path, _reason(e)) from None
    except BadReply:
        raise Unreachable(path, "it does not speak the wfd protocol") from None
    return reply  # type: ignore[return-value]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def open_connection(socket_arg: str | None, autostart: bool) -> Connection:
    """The connection SPEC 5 chooses (see the module docstring)."""
    explicit = socket_arg or os.environ.get("WFD_SOCKET")
    if explicit:
        return connect(explicit)
    from wfd.paths import SYSTEM_SOCKET, user_socket

    user = user_socket()
    try:
        return connect(user)
    except Unreachable as e:
        first = e
    refused: ReplyError | None = None
    try:
        return connect(SYSTEM_SOCKET)
    except Unreachable:
        pass
    except ReplyError as e:
        # A system daemon that refuses this user (not in its group) is not theirs to use;
        # their own daemon is.
        refused = e
    if not autostart or _env_flag("WFD_NO_AUTOSTART"):
        raise refused or first
    return _autostart(user)


# ---- autostart ----------------------------------------------------------------


def _daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
    if env.get("WFD_STATE_DIR"):
        # The daemon runs in /, so a relative state dir must mean what it means here.
        env["WFD_STATE_DIR"] = os.path.abspath(env["WFD_STATE_DIR"])
    # Run the same wfd as this wfctl, also when it is importable only from the current
    # directory (a checkout) rather than from site-packages.
    import site

    import wfd

    home = os.path.dirname(os.path.dirname(os.path.abspath(wfd.__file__)))
    installed = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if home not in installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, env.get("PYTHONPATH")]))
    return env


def _spawn_daemon() -> tuple[object, Path]:
    import subprocess

    from wfd.paths import state_dir

    state = state_dir(None, False).absolute()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = state / "wfd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wfd"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
            env=_daemon_env(), start_new_session=True, close_fds=True,
        )
    return proc, log_path


def _autostart(path: Path) -> Connection:
    """Start a user daemon in the background and wait until it answers on `path`."""
    print(f"wfctl: starting wfd (socket {path})", file=sys.stderr)
    proc, log_path = _spawn_daemon()
    deadline = time.monotonic() + AUTOSTART_WAIT
    status = None
    while True:
        try:
            return connect(path, timeout=1.0)
        except Unreachable as e:
            last = e
        if status is None:
            status = proc.poll()  # type: ignore[attr-defined]
            if status is not None:
                deadline = min(deadline, time.monotonic() + AFTER_EXIT_WAIT)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if status is not None:
        why = f"the wfd it started exited with status {status}; see {log_path}"
    else:
        why = f"{last.reason}, {AUTOSTART_WAIT:g} s after starting wfd; see {log_path}"
    raise Unreachable(path, why)


def reconnect(path: str, within: float) -> Connection:
    """Connect again to the daemon at `path`, which went away, retrying for `within`
    seconds (it may be restarting); never autostarts. Raises the last Unreachable."""
    deadline = time.monotonic() + within
    while True:
        try:
            return connect(path, timeout=1.0)
        except Unreachable:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.2)
