"""The harness every daemon test uses: a sandbox per test, real daemons, leak checks.

`sandbox` is one short private temp dir (under /tmp, so socket paths stay
under 108 bytes) and a mark token for everything the test starts.
`daemon(...)` starts a real `wfd` in it and returns a `helpers.Daemon`.
Teardown stops every daemon, then fails the test if any process it started
is still alive: one whose command line names the sandbox, whose environment
has the test's `WFDTEST_MARK`, or whose `WFD_RUN_ID` is a run of this test.
Only a process proven that way is ever signalled. Zombies count as gone:
PID 1 here may not reap orphans.

Daemon stderr goes to a file in the sandbox and is attached to the report of
a failed test. The sandbox is removed after a passing test and kept (its path
reported) after a failing one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `helpers`, however pytest imports
from helpers import MARK_VAR, REPO, Daemon, wait_until  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LEAK_GRACE = 5.0  # processes may be exiting as the daemon stops: let them, then judge

_SANDBOX = pytest.StashKey["Sandbox"]()
_FAILED = pytest.StashKey[bool]()


class Sandbox:
    """One test's temp dir, mark, and the daemons it started."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wfd-", dir="/tmp"))
        self.mark = uuid.uuid4().hex
        self.daemons: list[Daemon] = []

    def daemon(self, **kwargs: Any) -> Daemon:
        start = kwargs.pop("start", True)
        name = kwargs.pop("name", f"d{len(self.daemons)}")
        daemon = Daemon(self.root, name, self.mark, **kwargs)
        self.daemons.append(daemon)
        if start:
            daemon.start()
        return daemon

    def run_ids(self) -> set[str]:
        """Every run id under the sandbox: the daemons' state dirs, and any other
        `runs` dir (an autostarted daemon's, a state dir a test chose)."""
        ids = set().union(*(d.run_ids() for d in self.daemons))
        for runs in [*self.root.glob("*/runs"), *self.root.glob("*/*/runs")]:
            ids.update(p.name for p in runs.iterdir() if p.is_dir())
        return ids

    def proof(self, proc: psutil.Process, run_ids: set[str]) -> str | None:
        """Why `proc` is this test's, or None when that is not proven (or it is a zombie)."""
        root = str(self.root)
        try:
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return None
                cmdline = proc.cmdline()
                if any(arg == root or root + os.sep in arg for arg in cmdline):
                    return f"its command line names {root}"
                env = proc.environ()
        except psutil.Error:
            return None
        if env.get(MARK_VAR) == self.mark:
            return f"it has {MARK_VAR}={self.mark}"
        if env.get("WFD_RUN_ID") in run_ids:
            return f"it has WFD_RUN_ID={env['WFD_RUN_ID']}"
        return None

    def leftovers(self) -> list[tuple[psutil.Process, str]]:
        me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        run_ids = self.run_ids()
        found = []
        for proc in psutil.process_iter():
            if proc.pid not in me:
                why = self.proof(proc, run_ids)
                if why:
                    found.append((proc, why))
        return found


def _describe(proc: psutil.Process, why: str) -> str:
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmd = "?"
    return f"pid {proc.pid} ({why}): {cmd}"


def _stop_daemons(box: Sandbox) -> list[str]:
    problems = []
    for daemon in box.daemons:
        if daemon.running:
            try:
                status = daemon.stop()
            except AssertionError as e:
                problems.append(str(e))
                continue
            if status != 0:
                problems.append(f"daemon {daemon.name} exited {status} on SIGTERM")
    for daemon in box.daemons:  # steps outlive a daemon: their keeper stops them
        daemon.stop_keeper()
    return problems


def _reap_leftovers(box: Sandbox) -> list[str]:
    """Wait briefly for the test's processes to go; kill and name those that stay."""
    try:
        wait_until(lambda: not box.leftovers(), LEAK_GRACE, interval=0.1)
        return []
    except AssertionError:
        pass
    found = box.leftovers()
    lines = [_describe(proc, why) for proc, why in found]
    for proc, _ in found:
        try:
            proc.kill()  # psutil refuses a pid that was reused since we proved it
        except psutil.Error:
            pass
    psutil.wait_procs([proc for proc, _ in found], timeout=5)
    return lines


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    box = Sandbox()
    request.node.stash[_SANDBOX] = box
    yield box
    problems = _stop_daemons(box)
    leaked = _reap_leftovers(box)
    if leaked:
        problems.append("processes left behind (killed now):\n  " + "\n  ".join(leaked))
    if problems or request.node.stash.get(_FAILED, False):
        print(f"sandbox kept: {box.root}")
    else:
        shutil.rmtree(box.root, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def wfd_tmp(sandbox: Sandbox) -> Path:
    """The test's short private temp dir (for workflows, sockets, state dirs)."""
    return sandbox.root


@pytest.fixture
def daemon(sandbox: Sandbox) -> Callable[..., Daemon]:
    """Factory: `daemon(max_parallel=4, extra=[...], start=True, state_dir=None,
    socket=None, env=None, name=None)` starts a real wfd and waits until it answers."""
    return sandbox.daemon


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or item.stash.get(_FAILED, False):
        return
    item.stash[_FAILED] = True  # attach the logs once, to the first failing phase
    box = item.stash.get(_SANDBOX, None)
    if box is None:
        return
    for daemon in box.daemons:
        report.sections.append((f"wfd {daemon.name} stderr", daemon.log_text()))
    report.sections.append(("wfd sandbox", f"{box.root} (at {time.strftime('%X')})"))
