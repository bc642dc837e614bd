"""Where the daemon keeps its state and its socket (SPEC 4 and 5).

Shared by the daemon and the client, so both agree on the defaults without
the client importing daemon internals.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/wfd")
SYSTEM_SOCKET = Path("/run/wfd/wfd.sock")
SOCKET_NAME = "wfd.sock"


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


def check_private(path: Path) -> None:
    """Refuse a directory that is not ours or that others could write to."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDir(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafeDir(f"{path} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o022:
        raise UnsafeDir(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o})")
