"""The error tree of wfd, split by whose fault it is.

Every error a user can cause or meet derives from `WfdError` and carries the
exit code `wfctl` reports for it (SPEC 5), so the CLI maps classes to exit
codes in one place and never shows a traceback.
"""

from __future__ import annotations

# Exit codes of SPEC 5, named once.
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CANCELLED = 4
EXIT_CORRUPT = 5
EXIT_STORAGE = 6


class WfdError(Exception):
    """Base of every error wfd reports to a person; `exit_code` is what wfctl exits with."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WorkflowInvalid(WfdError):
    """The workflow file is malformed or breaks a rule of SPEC 1.

    Raised by validation with every problem found, one line each; nothing has
    been created or persisted. Fix the file and submit it again.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UsageError(WfdError):
    """The request is malformed or the run's state refuses it (unknown run id,
    resume of a SUCCEEDED run, bad flag). Nothing changed; check the arguments."""


class IllegalTransition(WfdError):
    """An event does not fit the step's current state.

    Raised by `state.apply` before anything changes. In the daemon it is a bug;
    in `wfctl replay` it means the log was written by something else or damaged.
    """

    exit_code = EXIT_CORRUPT


class StorageError(WfdError):
    """An event could not be persisted (ENOSPC, EIO, EFBIG).

    The daemon acts on nothing that depends on it and retries; free space or
    fix the disk and it goes on by itself.
    """

    exit_code = EXIT_STORAGE
