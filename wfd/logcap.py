"""`wfd --max-log-size`: a step's log that grows past the cap is cut, with a marker line.

A step writes its output straight into its log file (no copy passes through the keeper
or the daemon: that is what lets it outlive both), so the cap cannot stop a write. The
daemon looks at the logs of the running attempts every CHECK_EVERY seconds instead,
and at each one once more when its end is reported: a log past the cap is truncated to it and
the marker written after; what the step writes later (its file is O_APPEND) is cut
again at the next look. So a runaway step holds at most the cap, the marker and what
it writes in CHECK_EVERY seconds, and cannot fill the disk under the event log.
"""

from __future__ import annotations

import logging
import os
import re

from wfd.eventlog import Layout
from wfd.executor import AttemptKey

log = logging.getLogger("wfd")

DEFAULT_MAX = 100 * 1024 * 1024
CHECK_EVERY = 1.0  # seconds between looks at the running attempts' logs
_SIZE_RE = re.compile(r"([0-9]+)\s*([KMGT]?)(i?B)?", re.I)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Bytes in `100M`, `1G`, `512KiB`, `4096` (binary units); ValueError otherwise."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a size such as 100M, 1G or 4096 (bytes), got {text!r}")
    number, unit, _ = match.groups()
    return int(number) * 1024 ** _POWERS[unit.upper()]


def marker(cap: int) -> bytes:
    return (f"\n[wfd: this log was cut at {cap} bytes (wfd --max-log-size); the rest of "
            "the output was dropped]\n").encode()


def cut(layout: Layout, key: AttemptKey, cap: int) -> bool:
    """Cut the attempt's log at `cap` if it is longer (and not cut already); whether it
    was cut now. A log that is not there (yet, or any more) is left alone."""
    try:
        fd = layout.log(key.run_id, key.step, key.attempt).open(os.O_RDWR)
    except OSError:
        return False
    try:
        mark = marker(cap)
        size = os.fstat(fd).st_size
        if size <= cap:
            return False
        if size == cap + len(mark) and os.pread(fd, len(mark), cap) == mark:
            return False
        already = os.pread(fd, len(mark), cap) == mark
        os.ftruncate(fd, cap)
        os.pwrite(fd, mark, cap)
        os.ftruncate(fd, cap + len(mark))  # what the step appended meanwhile
        return not already
    finally:
        os.close(fd)


def cut_all(layout: Layout, keys: list[AttemptKey], cap: int) -> None:
    """`cut` each attempt's log (in a worker thread: many files may be looked at)."""
    for key in keys:
        try:
            if cut(layout, key, cap):
                log.warning("%s %s: attempt %d's log passed %d bytes (--max-log-size); cut "
                            "there", key.run_id, key.step, key.attempt, cap)
        except OSError as exc:
            log.warning("%s %s: cannot cut attempt %d's log: %s", key.run_id, key.step,
                        key.attempt, exc.strerror or exc)
