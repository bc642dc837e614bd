"""Where the daemon keeps its state and its socket (SPEC 4 and 5).

Shared by the daemon and the client, so both agree on the defaults without
the client importing daemon internals.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/wfd")
SYSTEM_SOCKET = Path("/run/wfd/wfd.sock")
SOCKET_NAME = "wfd.sock"
LOCK_NAME = "lock"  # in the state dir: flock'd by its daemon, which writes its pid and socket
RUN_USER = Path("/run/user")  # logind's runtime dirs, also there for cron and ssh sessions


class UnsafeDir(Exception):
    """A directory meant to be private is not ours or is open to others."""


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def state_dir(arg: str | None, system: bool, env: Mapping[str, str] | None = None) -> Path:
    """`--state-dir`, else $WFD_STATE_DIR, else systemd's $STATE_DIRECTORY, else the default."""
    env = _env(env)
    if arg:
        return Path(arg)
    if env.get("WFD_STATE_DIR"):
        return Path(env["WFD_STATE_DIR"])
    if env.get("STATE_DIRECTORY"):
        # systemd passes a colon-separated list when several are configured.
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if system:
        return SYSTEM_STATE_DIR
    import platformdirs

    return Path(platformdirs.user_state_dir("wfd"))


def daemon_socket(arg: str | None, system: bool, env: Mapping[str, str] | None = None) -> Path:
    """The daemon's socket: `--socket`, $WFD_SOCKET, $RUNTIME_DIRECTORY, then the default."""
    env = _env(env)
    if arg:
        return Path(arg)
    if env.get("WFD_SOCKET"):
        return Path(env["WFD_SOCKET"])
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if system:
        return SYSTEM_SOCKET
    return user_socket(env)


def _usable_runtime_dir(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and os.access(path, os.W_OK | os.X_OK)
    )


def user_socket(env: Mapping[str, str] | None = None) -> Path:
    """The user daemon's default socket: $XDG_RUNTIME_DIR/wfd/wfd.sock, else a private
    `wfd-<uid>` directory under the temp dir."""
    env = _env(env)
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and _usable_runtime_dir(runtime):
        return Path(runtime) / "wfd" / SOCKET_NAME
    return Path(tempfile.gettempdir()) / f"wfd-{os.getuid()}" / SOCKET_NAME


def run_user_socket() -> Path | None:
    """/run/user/<uid>/wfd/wfd.sock, where a user service's socket is, when that runtime
    dir exists and is ours: found also without $XDG_RUNTIME_DIR (cron, su, ssh)."""
    runtime = RUN_USER / str(os.getuid())
    return runtime / "wfd" / SOCKET_NAME if _usable_runtime_dir(str(runtime)) else None


def ensure_private_dir(path: Path, mode: int = 0o700) -> None:
    """Create `path` with `mode` if missing; refuse one owned by another user or open to
    others (a shared temp dir is where someone could plant a socket for us to talk to)."""
    try:
        path.mkdir(mode=mode, parents=True)
    except FileExistsError:
        pass
    check_private(path)


def ensure_group_dir(path: Path, gid: int, mode: int = 0o750) -> None:
    """A system daemon's socket directory: made `mode` with group `gid` (-1: leave it)
    if missing, else left as it is; refused if it is not ours or if others could swap
    the socket in it."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    else:
        os.chown(path, -1, gid, follow_symlinks=False)
        os.chmod(path, mode)
    check_private(path)


def check_private(path: Path, owner: int | None = None) -> None:
    """Refuse a directory that is not `owner`'s (default: ours) or that others could
    write to. The daemon checks its socket's directory so before it binds, the client
    before it connects."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDir(f"{path} is not a directory")
    if owner is None:
        owner = os.getuid()
    if info.st_uid != owner:
        whose = "this user" if owner == os.getuid() else f"uid {owner}"
        raise UnsafeDir(f"{path} belongs to uid {info.st_uid}, not to {whose}")
    if info.st_mode & 0o022:
        raise UnsafeDir(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o})")


# ---- the state dir's lock: who holds it, and where that daemon listens ------------------


@dataclass(frozen=True)
class Holder:
    """The daemon holding a state dir's lock: its pid and the socket it announced
    (None when it did not say: a wfd older than the announcement)."""

    pid: str
    socket: Path | None


def lock_text(pid: int, socket: Path | None) -> bytes:
    """The lock file's content: the pid, then the socket's absolute path, a line each."""
    lines = [str(pid)]
    if socket is not None and "\n" not in str(socket):
        lines.append(os.path.abspath(socket))
    return "".join(f"{line}\n" for line in lines).encode(errors="surrogateescape")


def parse_lock(data: bytes) -> Holder:
    """Read `lock_text`. Only whole lines count: the daemon writes the new text over the
    old in one write, then cuts what is left of the old, so whole lines are never mixed."""
    lines = data.decode(errors="surrogateescape").split("\n")[:-1]  # the last is unfinished
    pid = lines[0].strip() if lines and lines[0].strip().isdigit() else "?"
    socket = Path(lines[1]) if len(lines) > 1 and lines[1].startswith("/") else None
    return Holder(pid, socket)


def state_dir_holder(state: Path) -> Holder | None:
    """The daemon that holds `state`'s lock now, or None when none does. The test is a
    non-blocking shared flock, released at once; a daemon taking the lock at that very
    moment retries (daemon.lock_state_dir)."""
    try:
        fd = os.open(state / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return parse_lock(os.pread(fd, 4096, 0))
        except OSError:
            return None
        return None  # nobody holds it; closing the file drops our lock
    finally:
        os.close(fd)
