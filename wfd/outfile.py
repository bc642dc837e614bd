"""The file a step writes its outputs to (`$WFD_OUTPUT`): where the keeper puts it, and
how it reads it back without trusting it.

Where: one directory per keeper process, `wfd-out-XXXXXXXX` in its temp dir (made by
`mkdtemp`, mode 0711, the keeper's: nobody else may add to it), and in it one directory
per step user, `u<uid>` (0700, that user's), made the first time that user's step runs.
Not in the run's directory: a system daemon's run directories are root's alone, and the
step runs as its submitter. `$WFD_OUTPUT` names a file in the user's directory that does
not exist yet, with a random name of its own per attempt: a step that writes no outputs
costs the keeper no file at all, only one failed open at its end.

Read back once the attempt is over, as the keeper's user (root, for a system daemon).
The user's directory is theirs, so anything may be in the file's place: it is opened
from the directory's descriptor with O_PATH|O_NOFOLLOW (no side effect, and a symlink is
refused, never followed), must be a regular file owned by the step's user (a hard link
to another user's file is refused), and only then is it opened for reading, at most
`MAX_OUTPUT + 1` bytes. Then it is removed. A keeper killed while attempts run leaves
its directory behind; the next keeper of the same state dir (its name carries a tag of
the state dir's) removes it when it makes its own: only one keeper per state dir runs
(its lock), so another directory with that tag is a dead keeper's.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile

from wfd.outputs import MAX_OUTPUT, OutputInvalid
from wfd.users import UserIds

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputFile:
    """One attempt's $WFD_OUTPUT: `path` for its environment, `read` and `remove` after."""

    def __init__(self, dir_fd: int, directory: str, uid: int) -> None:
        self.dir_fd = os.dup(dir_fd)  # the user's directory; its own, closed by `remove`
        self.name = secrets.token_hex(8)
        self.path = os.path.join(directory, self.name)
        self.uid = uid  # who writes it, and must own it when it is read

    def read(self) -> bytes:
        """What the step wrote, at most MAX_OUTPUT + 1 bytes (more is `parse_outputs`'s
        error to report); b"" if it wrote nothing. OutputInvalid if something other than a
        regular file of the step's user is in its place."""
        try:
            handle = os.open(self.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self.dir_fd)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise OutputInvalid(f"cannot read the output file ($WFD_OUTPUT): "
                                f"{exc.strerror or exc}") from None
        try:
            info = os.fstat(handle)
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode) \
                    or info.st_uid != self.uid:
                raise OutputInvalid("the output file ($WFD_OUTPUT) is not a regular file "
                                    "of the step's user")
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(handle)
        try:
            chunks, left = [], MAX_OUTPUT + 1
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Remove the file (if any) and close the directory: call it once, last."""
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)  # unlink never follows a symlink
        except OSError:
            pass
        os.close(self.dir_fd)


class OutputDirs:
    """The keeper's output directories: its own, and one per step user in it."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag  # names the state dir: "" for no sweep of old directories
        self.base: str | None = None
        self._users: dict[int, tuple[int, int, int]] = {}  # uid -> (dir fd, st_dev, st_ino)

    def new_file(self, user: UserIds | None) -> OutputFile:
        """A fresh $WFD_OUTPUT for an attempt of `user` (None: the keeper's own user).
        OSError if its directory cannot be made."""
        uid = os.geteuid() if user is None else user.uid
        fd = self._user_dir(uid, user)
        return OutputFile(fd, os.path.join(self.base, f"u{uid}"), uid)  # type: ignore[arg-type]

    def _user_dir(self, uid: int, user: UserIds | None) -> int:
        """The user's directory, made again if the temp dir's cleaner removed it."""
        known = self._users.get(uid)
        if known is not None:
            try:
                info = os.lstat(os.path.join(self.base, f"u{uid}"))  # type: ignore[arg-type]
                if (info.st_dev, info.st_ino) == known[1:]:
                    return known[0]
            except OSError:
                pass
            del self._users[uid]  # gone (a temp dir cleaner): made again below
            os.close(known[0])
        if self.base is None or not os.path.isdir(self.base):
            prefix = f"wfd-out-{self.tag}-" if self.tag else "wfd-out-"
            self.base = tempfile.mkdtemp(prefix=prefix)
            os.chmod(self.base, 0o711)  # users pass through to their own directory only
            if self.tag:
                sweep(prefix, self.base)
        base_fd = os.open(self.base, _DIR)
        try:
            name = f"u{uid}"
            try:
                os.mkdir(name, 0o700, dir_fd=base_fd)
            except FileExistsError:
                pass
            fd = os.open(name, _DIR, dir_fd=base_fd)
        finally:
            os.close(base_fd)
        try:
            if uid != os.geteuid():
                os.fchown(fd, uid, user.gid if user is not None else -1)
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._users[uid] = (fd, info.st_dev, info.st_ino)
        return fd

    def close(self) -> None:
        """Close the directories and remove those that are empty (what a user left in
        theirs stays: the keeper removes nothing in a user's directory but its files)."""
        users, self._users = self._users, {}
        for uid, (fd, _, _) in users.items():
            os.close(fd)
            if self.base is not None:
                try:
                    os.rmdir(os.path.join(self.base, f"u{uid}"))
                except OSError:
                    pass
        if self.base is not None:
            try:
                os.rmdir(self.base)
            except OSError:
                pass
            else:
                self.base = None


def sweep(prefix: str, keep: str) -> None:
    """Remove what dead keepers of this state dir left in the temp dir: directories named
    `prefix...` of this user's, but `keep`. In a user's directory only what is not a
    directory is removed (unlink follows no symlink); what is left stays."""
    parent = os.path.dirname(keep)
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or path == keep:
            continue
        try:
            base_fd = os.open(path, _DIR)
        except OSError:
            continue
        try:
            if os.fstat(base_fd).st_uid != os.geteuid():
                continue
            for user_dir in os.listdir(base_fd):
                _empty(base_fd, user_dir)
                try:
                    os.rmdir(user_dir, dir_fd=base_fd)
                except OSError:
                    pass
        finally:
            os.close(base_fd)
        try:
            os.rmdir(path)
        except OSError:
            pass


def _empty(base_fd: int, name: str) -> None:
    try:
        fd = os.open(name, _DIR, dir_fd=base_fd)
    except OSError:
        return
    try:
        for entry in os.listdir(fd):
            try:
                os.unlink(entry, dir_fd=fd)
            except OSError:
                pass
    finally:
        os.close(fd)
