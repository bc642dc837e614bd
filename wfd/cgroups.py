"""A cgroup v2 leaf per attempt, where one can be had.

A process that leaves its session and drops the marks (`setsid env -i sleep
1000 &`) cannot be told apart from a stranger by a tree walk; it cannot leave
its cgroup. So where the keeper can write a cgroup2 subtree (its own cgroup
delegated by systemd with `Delegate=yes`, or root with cgroup2 mounted), every
attempt's leader starts in a leaf of its own,
`<keeper's cgroup>/wfd-<hash of the state dir>/<run>.<step>.<attempt>`, and
everything in that leaf is the attempt's: signalled with the rest of its tree,
SIGKILLed through `cgroup.kill` when the grace is over, and the leaf removed
once it is empty. Elsewhere the session + marks method stays (`procs.py`).

The leader enters its leaf without a race: the (single-threaded) keeper moves
itself into the leaf, spawns, and moves back, so the leader is born inside it
and nothing it forks can be outside.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from wfd.executor import AttemptKey

log = logging.getLogger("wfd")


def _cgroup2_mount() -> Path | None:
    """Where the unified (v2) hierarchy is mounted, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def _own_cgroup() -> str | None:
    """This process's cgroup v2 path ("0::/path" in /proc/self/cgroup)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class AttemptCgroups:
    """The leaves of one state dir's attempts, under the caller's own cgroup."""

    def __init__(self, base: Path, home: Path) -> None:
        self.base = base  # the state dir's subtree
        self.home = home  # the caller's own cgroup, to move back to

    @classmethod
    def find(cls, state_key: str, spawner: bool = True) -> AttemptCgroups | None:
        """The subtree for `state_key` (e.g. the keeper dir's path), if this process can
        make leaves there and (a `spawner`) move itself in and out; None means: no
        cgroups here."""
        mount, own = _cgroup2_mount(), _own_cgroup()
        if mount is None or own is None:
            return None
        home = mount / own.lstrip("/")
        tag = hashlib.sha256(state_key.encode()).hexdigest()[:12]
        cgroups = cls(home / f"wfd-{tag}", home)
        if not spawner:
            return cgroups if cgroups.base.is_dir() else None
        try:
            cgroups.base.mkdir(exist_ok=True)
            probe = cgroups.base / f"probe-{os.getpid()}"
            probe.mkdir(exist_ok=True)
            with cgroups.inside(probe):
                pass
            probe.rmdir()
        except OSError as exc:
            log.info("no cgroup per attempt (%s); attempts are known by session and marks",
                     exc.strerror or exc)
            return None
        cgroups.sweep()
        return cgroups

    def leaf(self, key: AttemptKey) -> Path:
        return self.base / f"{key.run_id}.{key.step}.{key.attempt}"

    def create(self, key: AttemptKey) -> Path:
        leaf = self.leaf(key)
        leaf.mkdir(exist_ok=True)
        return leaf

    @contextlib.contextmanager
    def inside(self, leaf: Path) -> Iterator[None]:
        """Run the body with this process in `leaf` (what it spawns is born there)."""
        _write(leaf / "cgroup.procs", str(os.getpid()))
        try:
            yield
        finally:
            _write(self.home / "cgroup.procs", str(os.getpid()))

    def pids(self, leaf: Path) -> list[int]:
        try:
            return [int(pid) for pid in (leaf / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill(self, leaf: Path) -> None:
        """SIGKILL everything in the leaf at once (cgroup.kill, Linux 5.14)."""
        try:
            _write(leaf / "cgroup.kill", "1")
        except OSError:
            pass

    def remove(self, leaf: Path) -> None:
        try:
            leaf.rmdir()
        except OSError:
            pass  # still populated (a zombie): swept at the keeper's next start

    def close(self) -> None:
        """At the keeper's exit: remove the empty leaves and, if that empties it, the
        state dir's subtree."""
        self.sweep()
        self.remove(self.base)

    def sweep(self) -> None:
        """Remove the empty leaves earlier keepers left behind."""
        try:
            leaves = [p for p in self.base.iterdir() if p.is_dir()]
        except OSError:
            return
        for leaf in leaves:
            if not self.pids(leaf):
                self.remove(leaf)


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
