"""Finding and talking to a wfd daemon (SPEC 5, "socket choice").

A connection is a blocking AF_UNIX socket that has said Hello and got a
HelloReply: connect and Hello run under a short timeout, so a dead, hung or
foreign socket never hangs the client; afterwards the socket blocks without a
timeout, because a Cancel or a Watch may rightly take long. Requests then go
on the same connection.

Which socket: `--socket`, else $WFD_SOCKET (no fallback, no autostart), else
the first of these that answers: the user daemon's default socket
($XDG_RUNTIME_DIR/wfd/wfd.sock, or /tmp/wfd-<uid>/wfd.sock without it),
/run/user/<uid>/wfd/wfd.sock, the socket announced by the daemon holding the
user's state dir (so cron and `su` find a running daemon), the system
daemon's; else an autostarted user daemon, but never a second one for a
state dir that is in use. Only "nothing answers" moves on to the next choice
(and a system daemon refusing this user, who may not be in its group); a
daemon that answers and refuses us, or speaks another protocol, is reported
as it is.

Before a byte is sent, the client checks whom it talks to (docs/protocol.md):
a default socket's directory must be the user's (root's for the system
socket) and closed to others, and the peer (SO_PEERCRED) must run as the user
or root (root only for the system socket), also on a socket given by path. A
socket someone else planted gets nothing: not the environment, not the
workflow.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from wfd import protocol
from wfd.errors import EXIT_UNREACHABLE, UsageError, WfdError

if TYPE_CHECKING:
    from wfd.paths import Holder

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


@dataclass(frozen=True)
class Trust:
    """Whom a socket may belong to: the uids that may answer on it (SO_PEERCRED), and
    the uid that must own its directory (None: not checked, a path the user gave)."""

    peers: frozenset[int] | None  # None: any (root naming a socket itself)
    dir_owner: int | None


def user_trust(dir_checked: bool = True) -> Trust:
    """A user daemon's socket: served by this user or root."""
    return Trust(frozenset({os.getuid(), 0}), os.getuid() if dir_checked else None)


SYSTEM_TRUST = Trust(frozenset({0}), 0)


def explicit_trust() -> Trust:
    """A socket the user named: its directory is their choice; its peer must be them or
    root, except for root, who may submit to any user's daemon by naming its socket (the
    run is that daemon user's, SPEC 5)."""
    if os.getuid() == 0:
        return Trust(None, None)
    return user_trust(dir_checked=False)


class Untrusted(WfdError):
    """A socket that may not be ours: its directory is someone else's or open to others,
    or a process of another user answers on it. Nothing was sent to it."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"not talking to {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class Held(WfdError):
    """A daemon holds the user's state dir but does not answer where we looked: starting
    another would fail, so say which one it is and how to reach it."""

    exit_code = EXIT_UNREACHABLE


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
    """One open connection to a daemon that answered Hello; `trust` is what was checked
    of it, and what a reconnect checks again."""

    def __init__(self, sock: socket.socket, path: str, hello: protocol.HelloReply,
                 trust: Trust | None = None) -> None:
        self.sock = sock
        self.path = path
        self.hello = hello
        self.trust = trust or user_trust(dir_checked=False)

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: protocol.Message) -> None:
        try:
            protocol.send(self.sock, msg)
        except OSError as e:
            raise Lost(self.path, e) from None
        except UnicodeEncodeError:  # an argument with bytes the locale could not decode
            raise UsageError(f"cannot send {type(msg).__name__}: an argument is not "
                             "UTF-8 (wfd carries text)") from None

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


def connect(path: Path | str, timeout: float = HELLO_TIMEOUT,
            trust: Trust | None = None) -> Connection:
    """Check, connect and say Hello within `timeout`. Raises Untrusted when the socket
    fails `trust` (default: a user daemon's, directory unchecked), before anything is
    sent; Unreachable when nothing usable answers; ReplyError when the daemon refuses
    us; VersionError on another protocol."""
    path = str(path)
    trust = trust or user_trust(dir_checked=False)
    if trust.dir_owner is not None:
        _check_dir(path, trust.dir_owner)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)  # sends no byte: the daemon sees only our credentials
        except OSError as e:
            raise Unreachable(path, _reason(e)) from None
        _check_peer(sock, path, trust)
        hello = _hello(sock, path)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, path, hello, trust)


def _check_dir(path: str, owner: int) -> None:
    """The socket's directory must be `owner`'s and closed to others, as the daemon
    checks it before it binds: in a directory others can write, anyone could have put
    the socket there (/tmp/wfd-<uid> without $XDG_RUNTIME_DIR)."""
    from wfd.paths import UnsafeDir, check_private

    parent = os.path.dirname(path) or "."
    try:
        check_private(Path(parent), owner)
    except UnsafeDir as e:
        raise Untrusted(path, f"{e}; someone else may have put it there") from None
    except OSError as e:
        raise Unreachable(path, _reason(e)) from None


def _check_peer(sock: socket.socket, path: str, trust: Trust) -> None:
    """The process that listens must run as one of `trust.peers` (SO_PEERCRED: the
    kernel's word, taken when it called listen)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if trust.peers is None or uid in trust.peers:
        return
    wanted = "root" if trust.peers == {0} else f"you (uid {os.getuid()}) or root"
    raise Untrusted(path, f"the process answering on it runs as {_user(uid)}, not as "
                          f"{wanted}; it gets nothing from this wfctl")


def _user(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


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
        return connect(explicit, trust=explicit_trust())
    from wfd import paths

    user = paths.user_socket()
    unreachable: list[Unreachable] = []
    untrusted: list[Untrusted] = []
    refused: list[ReplyError] = []
    state = paths.state_dir(None, False)
    holder = None
    tried: set[Path] = set()
    for path, trust in _candidates(user):
        if path is None:  # the state dir's holder is looked up only when it is needed
            holder = paths.state_dir_holder(state)
            if holder is None or holder.socket is None:
                continue
            path = holder.socket
        if path in tried:
            continue
        tried.add(path)
        try:
            return connect(path, trust=trust)
        except Unreachable as e:
            unreachable.append(e)
        except Untrusted as e:
            untrusted.append(e)
        except ReplyError as e:
            if trust is not SYSTEM_TRUST:
                raise
            # A system daemon that refuses this user (not in its group) is not theirs to
            # use; their own daemon is.
            refused.append(e)
    if holder is not None:
        return _wait_for_holder(state, holder, user)
    if untrusted:  # autostart would find the same socket directory, and refuse it too
        raise untrusted[0]
    if not autostart or _env_flag("WFD_NO_AUTOSTART"):
        raise (refused or unreachable)[0]
    return _autostart(user)


def _candidates(user: Path) -> Iterator[tuple[Path | None, Trust]]:
    """The sockets to try in order (see the module docstring); None stands for the one
    the holder of the user's state dir announces."""
    from wfd.paths import SYSTEM_SOCKET, run_user_socket

    yield user, user_trust()
    run_user = run_user_socket()
    if run_user is not None:
        yield run_user, user_trust()
    yield None, user_trust()
    yield SYSTEM_SOCKET, SYSTEM_TRUST


def _wait_for_holder(state: Path, holder: Holder, user: Path) -> Connection:
    """A daemon holds the user's state dir, but none of the sockets answered. It may be
    starting (it announces its socket before it binds): wait for it as for an autostarted
    one. Never start a second daemon: it would only find the state dir taken."""
    from wfd.paths import state_dir_holder

    deadline = time.monotonic() + AUTOSTART_WAIT
    reason = "it does not say where its socket is (an older wfd)"
    while holder.socket is not None:
        try:
            return connect(holder.socket, timeout=1.0, trust=user_trust())
        except Unreachable as e:
            reason = f"it announced {holder.socket}, which does not answer: {e.reason}"
        except Untrusted as e:
            reason = f"it announced {holder.socket}, which this wfctl refuses: {e.reason}"
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
        now = state_dir_holder(state)
        if now is None:
            reason = "it stopped while wfctl waited for it to answer"
            break
        holder = now
    raise Held(f"wfd (pid {holder.pid}) holds the state dir {state}, but wfctl cannot "
               f"reach it: {reason}; reach it with --socket PATH (or WFD_SOCKET=PATH), "
               f"or stop it (kill {holder.pid}) and let wfctl start one on {user}")


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
            return connect(path, timeout=1.0, trust=user_trust())
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


def reconnect(path: str, within: float, trust: Trust | None = None) -> Connection:
    """Connect again to the daemon at `path`, which went away, retrying for `within`
    seconds (it may be restarting), with the checks `trust` asks for (those the first
    connection passed); never autostarts. Raises the last Unreachable."""
    deadline = time.monotonic() + within
    while True:
        try:
            return connect(path, timeout=1.0, trust=trust)
        except Unreachable:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.2)
