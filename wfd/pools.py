"""The daemon's pool limits: from `wfd --pool NAME=N`, and set at run time by
`wfctl pool set NAME N`, kept in `pools.json` in the state dir.

Which limit wins
----------------
A limit set at run time wins over the command line, across restarts, for as
long as the command line says what it said when the limit was set: each stored
limit remembers the `--pool` value it overrode (or that there was none). When
an administrator changes `--pool db=...` (or drops it), that is a newer
decision, and the command line wins again; the stored limit is forgotten
(the file is rewritten at that start). So a `wfctl pool set db 3` survives
restarts of the same unit, and editing the unit's `--pool` is never silently
ignored.

The file is small and rewritten whole: a temp file, fsync, rename, fsync of
the directory; a torn write leaves the old file. A file that cannot be read or
parsed is reported at start (the daemon refuses to start rather than run with
limits nobody chose).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from wfd.eventlog import open_file, replace_file
from wfd.workflow import MAX_PARALLEL, POOL_RE

FILE_NAME = "pools.json"


class Stored(msgspec.Struct, forbid_unknown_fields=True):
    """One limit set at run time, and the `--pool` value it overrode (None: none)."""

    limit: int
    over: int | None = None


class PoolFile(msgspec.Struct, forbid_unknown_fields=True):
    pools: dict[str, Stored] = {}


class BadPools(Exception):
    """`pools.json` or a `--pool` option is unusable; the message says which and why."""


def parse_option(text: str) -> tuple[str, int]:
    """`NAME=N` of `wfd --pool`, or BadPools."""
    name, sep, value = text.partition("=")
    if not sep or not POOL_RE.fullmatch(name):
        raise BadPools(f"--pool {text!r}: expected NAME=N, NAME matching {POOL_RE.pattern}")
    return name, check_limit(value, f"--pool {text!r}")


def check_limit(value: int | str, what: str) -> int:
    """A pool limit: an integer from 0 (the pool's steps wait) to MAX_PARALLEL."""
    if isinstance(value, str):
        value = int(value) if value.isascii() and value.isdigit() else -1
    if not 0 <= value <= MAX_PARALLEL:
        raise BadPools(f"{what}: the limit must be an integer from 0 to {MAX_PARALLEL}")
    return value


class PoolLimits:
    """The limits in force, where each came from, and the file that keeps run-time ones."""

    def __init__(self, state_dir: Path, command_line: dict[str, int]) -> None:
        self.path = state_dir / FILE_NAME
        self.command_line = dict(command_line)
        found = self._read().pools
        self.stored = {name: entry for name, entry in found.items()
                       if entry.over == self.command_line.get(name)}
        if len(self.stored) < len(found):  # the command line changed: forget, for good
            try:
                self._write(PoolFile(self.stored))
            except OSError as exc:
                raise BadPools(f"cannot update {self.path}: {exc.strerror or exc}") from None
        self.limits = {**self.command_line,
                       **{name: entry.limit for name, entry in self.stored.items()}}

    def _read(self) -> PoolFile:
        try:
            fd = open_file(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return PoolFile()
        except OSError as exc:
            raise BadPools(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(1 << 20)
            found = msgspec.json.decode(data, type=PoolFile)
            for name, entry in found.pools.items():
                if not POOL_RE.fullmatch(name):
                    raise BadPools(f"{self.path}: bad pool name {name!r}")
                check_limit(entry.limit, f"{self.path}: pool {name!r}")
            return found
        except (OSError, msgspec.DecodeError) as exc:
            raise BadPools(f"cannot use {self.path}: {exc} (fix or remove it)") from None

    def source(self, name: str) -> str:
        """Where the limit in force comes from: "set" (at run time) or "option"."""
        return "set" if name in self.stored else "option"

    def set(self, name: str, limit: int) -> None:
        """Record a run-time limit durably (blocking I/O: call it off the event loop),
        then put it in force."""
        stored = {**self.stored, name: Stored(limit, self.command_line.get(name))}
        self._write(PoolFile(dict(sorted(stored.items()))))
        self.stored = stored
        self.limits[name] = limit

    def _write(self, content: PoolFile) -> None:
        replace_file(str(self.path), msgspec.json.encode(content) + b"\n")
