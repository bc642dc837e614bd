"""The file a step writes its outputs to (`$WFD_OUTPUT`), made and read back by the keeper.

Where it lives: a directory of its own per attempt, `wfd-out-XXXXXXXX` in the
keeper's temp dir (made by `mkdtemp`: a fresh name, never one someone else
made first). Not in the run's directory: a system daemon's run directories
are root's alone (0700), and the step runs as its submitter. The directory
belongs to the keeper's user, mode 0710 with the step user's group (0700 when
the step runs as the keeper's own user), so the step's user may enter it but
not list it or add, rename or remove anything in it. In it, `output`, created
empty (O_EXCL, O_NOFOLLOW), mode 0600, owned by the step's user: the one file
there the step may write.

Read back once the attempt is over, as the keeper's user (root, for a system
daemon): opened from the directory's descriptor with O_NOFOLLOW (a symlink is
refused, never followed) and O_NONBLOCK (a FIFO cannot hang the keeper), it
must be a regular file owned by the step's user, and at most `MAX_OUTPUT + 1`
bytes are read. Then the file and its directory are removed. A keeper killed
while attempts run leaves their directories behind (the temp dir's cleaner
removes them); nothing reads them again.
"""

from __future__ import annotations

import os
import stat
import tempfile

from wfd.outputs import MAX_OUTPUT, OutputInvalid
from wfd.users import UserIds

NAME = "output"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputFile:
    """One attempt's output file: `create` it before the spawn, `read` and `remove` after."""

    def __init__(self, directory: str, uid: int) -> None:
        self.directory = directory
        self.uid = uid  # who may write it, and must own it when it is read

    @property
    def path(self) -> str:
        return os.path.join(self.directory, NAME)

    @classmethod
    def create(cls, user: UserIds | None) -> OutputFile:
        """A fresh directory and empty file for an attempt of `user` (None: the keeper's
        own user). OSError if it cannot be made; nothing is left behind then."""
        directory = tempfile.mkdtemp(prefix="wfd-out-")
        mine = user is None or user.uid == os.geteuid()
        uid = os.geteuid() if user is None else user.uid
        try:
            dir_fd = os.open(directory, _DIR)
            try:
                fd = os.open(NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
                try:
                    if not mine:
                        os.fchown(fd, user.uid, user.gid)  # type: ignore[union-attr]
                finally:
                    os.close(fd)
                if not mine:  # the step's group may enter, not list or change
                    os.fchown(dir_fd, -1, user.gid)  # type: ignore[union-attr]
                    os.fchmod(dir_fd, 0o710)
            finally:
                os.close(dir_fd)
        except OSError:
            cls(directory, uid).remove()
            raise
        return cls(directory, uid)

    def read(self) -> bytes:
        """What the step wrote: at most MAX_OUTPUT + 1 bytes (more is `parse_outputs`'s
        error to report); b"" if the file is gone. OutputInvalid if it is no longer a
        regular file of the step's user (a symlink or a FIFO in its place)."""
        try:
            dir_fd = os.open(self.directory, _DIR)
        except FileNotFoundError:
            return b""
        try:
            try:
                fd = os.open(NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            except FileNotFoundError:
                return b""
            except OSError as exc:
                raise OutputInvalid(f"cannot read the output file ($WFD_OUTPUT): "
                                    f"{exc.strerror or exc}") from None
        finally:
            os.close(dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != self.uid:
                raise OutputInvalid("the output file ($WFD_OUTPUT) was replaced by something "
                                    "that is not a regular file of the step's user")
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
        """Remove the file and its directory, whatever is left of them."""
        try:
            dir_fd = os.open(self.directory, _DIR)
        except OSError:
            return
        try:
            for name in os.listdir(dir_fd):  # only the keeper's user can add to it
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except OSError:
                    pass
        finally:
            os.close(dir_fd)
        try:
            os.rmdir(self.directory)
        except OSError:
            pass
