"""The disk fails under the daemon, for real (issue 4, test 6).

ENOSPC: the state dir lives on a 1 MiB tmpfs that the test fills with a file
of its own while a run is going. EFBIG: the daemon runs under RLIMIT_FSIZE.
In both, once an append fails: a clear error is logged; the daemon stays up
and `status` answers and shows the storage error; `run` is refused with exit
6; the log stays whole lines only (a failed append is cut back, never left
for the next append to extend); nothing that depends on the lost events
happens (every step that ran has its claim on disk). When space comes back
(the filler is deleted), or when the daemon is restarted without the limit,
the run goes on and completes, with a log whose seqs have no gap. A stop
(SIGTERM) while nothing can be written still kills the steps and exits. A run
submitted when its workflow.json does not fit is refused and leaves nothing.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import Daemon, ask_shutdown, run_json, wait_for_state, wait_until, write_workflow

EXIT_STORAGE = 6
CHAIN = 40  # steps; ~650 bytes of events each, far more than a page of slack or the limit
FSIZE_LIMIT = 16384


def chain_workflow(root: Path, sleeper: bool = False) -> Path:
    """`gate` waits for a file to appear; then a chain of quick steps, each stamped;
    with `sleeper`, also a step that runs until it is killed."""
    stamps, gate = root / "stamps.txt", root / "gate"
    stamp = f'echo "$WFD_STEP_ID $WFD_ATTEMPT" >> {stamps}'
    steps = [{"id": "gate", "command": f"{stamp}; while [ ! -e {gate} ]; do sleep 0.02; done"}]
    for i in range(CHAIN):
        steps.append({"id": f"s{i}", "command": stamp,
                      "depends_on": [steps[-1]["id"]]})
    if sleeper:
        steps.append({"id": "sleeper",  # until killed; a later attempt just succeeds
                      "command": f'{stamp}; [ "$WFD_ATTEMPT" -gt 1 ] || exec sleep 1000',
                      "kill_grace": 0.5})
    return write_workflow(root, {"name": "chain", "steps": steps}, "chain.json")


def stamped(root: Path) -> set[tuple[str, int]]:
    path = root / "stamps.txt"
    if not path.exists():
        return set()
    return {(s, int(a)) for s, a in (line.split() for line in path.read_text().splitlines())}


def check_log(path: Path) -> list[dict]:
    """Whole lines only, each a JSON object, seqs 1, 2, 3, ... without a gap."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"half a line at the end of the log: {data[-80:]!r}"
    events = [json.loads(line) for line in data.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    return events


def check_nothing_acted_on_unpersisted(root: Path, events_path: Path) -> None:
    ran = stamped(root)  # first the stamps, then the log: a claim precedes its spawn
    claimed = {(e["step"], e["attempt"]) for e in check_log(events_path)
               if e["type"] == "AttemptClaimed"}
    assert ran <= claimed, f"steps ran without a durable claim: {sorted(ran - claimed)}"


def check_failing(d: Daemon, run_id: str, root: Path, wf: Path, reason: str) -> None:
    """What must hold while the daemon cannot persist events."""
    wait_until(lambda: "cannot persist events" in d.log_text(), timeout=20,
               message="the daemon to log that it cannot persist events")
    assert reason in d.log_text(), d.log_text()
    assert d.running, "the daemon died of a storage error"
    assert d.wfctl("status").returncode == 0
    status = run_json(d, run_id)
    assert status["state"] == "RUNNING", status
    assert reason in (status["error"] or ""), f"status does not show the storage error: {status}"
    before = d.run_ids()
    refused = d.wfctl("run", str(wf))
    assert refused.returncode == EXIT_STORAGE, (refused.returncode, refused.stderr)
    assert reason in refused.stderr and not refused.stdout.strip(), refused
    assert d.run_ids() == before, "a refused run left a run directory"
    events_path = d.state_dir / "runs" / run_id / "events.jsonl"
    check_nothing_acted_on_unpersisted(root, events_path)
    ran = stamped(root)
    time.sleep(0.5)  # still failing: nothing new may start meanwhile
    assert "cannot persist" in (run_json(d, run_id)["error"] or "")
    assert stamped(root) == ran, "steps started while their claims could not be persisted"
    check_nothing_acted_on_unpersisted(root, events_path)


def check_completed(d: Daemon, run_id: str, root: Path) -> None:
    status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=30)
    assert status["state"] == "SUCCEEDED", status
    assert status["error"] is None
    events = check_log(d.state_dir / "runs" / run_id / "events.jsonl")
    claims = [(e["step"], e["attempt"]) for e in events if e["type"] == "AttemptClaimed"]
    assert len(claims) == len(set(claims)), "an attempt was claimed twice"
    assert stamped(root) <= set(claims)
    replay = d.wfctl("replay", run_id)
    assert replay.returncode == 0 and "torn" not in replay.stderr, replay.stderr
    small = write_workflow(root, {"steps": [{"id": "x", "command": "true"}]}, "small.json")
    again = d.submit(small, "--wait")  # and new runs are accepted again
    assert run_json(d, again)["state"] == "SUCCEEDED"


@pytest.fixture
def tmpfs(sandbox):
    mount = sandbox.root / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        for d in sandbox.daemons:  # nothing may hold the mount when it goes
            if d.running:
                d.stop()
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)])


def fill(path: Path) -> int:
    """Write `path` until the filesystem is full; the bytes written."""
    written = 0
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n = f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            written += n


def test_enospc_on_a_full_filesystem(daemon, tmpfs: Path, wfd_tmp: Path) -> None:
    wf = chain_workflow(wfd_tmp)
    d = daemon(state_dir=tmpfs / "state")
    run_id = d.submit(wf)
    wait_until(lambda: ("gate", 1) in stamped(wfd_tmp), timeout=10, message="the gate step")
    filler = tmpfs / "filler"
    assert fill(filler) > 0
    (wfd_tmp / "gate").touch()

    check_failing(d, run_id, wfd_tmp, wf, "No space left on device")
    status = run_json(d, run_id)
    assert status["steps"][f"s{CHAIN - 1}"]["state"] == "PENDING", "the chain never blocked"

    filler.unlink()  # space again: the daemon goes on by itself
    check_completed(d, run_id, wfd_tmp)
    assert "events persist again" in d.log_text()


def test_enospc_at_submit_creates_nothing(daemon, tmpfs: Path, wfd_tmp: Path) -> None:
    """No room for the new run's workflow.json: refused with exit 6, nothing left behind,
    and accepted once there is room."""
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "x", "command": "true"}]})
    d = daemon(state_dir=tmpfs / "state")
    filler = tmpfs / "filler"
    fill(filler)
    refused = d.wfctl("run", str(wf))
    assert refused.returncode == EXIT_STORAGE, (refused.returncode, refused.stderr)
    assert "No space left on device" in refused.stderr and not refused.stdout.strip()
    assert d.run_ids() == set(), "a refused run left a run directory"
    assert d.wfctl("status").returncode == 0
    filler.unlink()
    run_id = d.submit(wf, "--wait")
    assert run_json(d, run_id)["state"] == "SUCCEEDED"


class LimitedDaemon(Daemon):
    """A daemon started through a wrapper that sets RLIMIT_FSIZE, then execs wfd."""

    limit: int | None = FSIZE_LIMIT

    @property
    def argv(self) -> list[str]:
        argv = super().argv
        if self.limit is None:
            return argv
        wrapper = ("import os, resource, sys; "
                   f"resource.setrlimit(resource.RLIMIT_FSIZE, ({self.limit}, {self.limit})); "
                   "os.execv(sys.executable, sys.argv[1:])")
        return [sys.executable, "-c", wrapper, *argv]


def limited_daemon(sandbox) -> LimitedDaemon:
    d = LimitedDaemon(sandbox.root, "limited", sandbox.mark, extra=["--log-level", "warning"])
    sandbox.daemons.append(d)  # stopped and checked for leaks like any other
    return d.start()


def test_efbig_under_rlimit_fsize_then_crash_and_restart(sandbox, wfd_tmp: Path) -> None:
    wf = chain_workflow(wfd_tmp)
    d = limited_daemon(sandbox)
    run_id = d.submit(wf)
    (wfd_tmp / "gate").touch()
    check_failing(d, run_id, wfd_tmp, wf, "File too large")
    events_path = d.state_dir / "runs" / run_id / "events.jsonl"
    assert events_path.stat().st_size <= FSIZE_LIMIT

    d.kill()  # a crash while appends fail: the next daemon finds whole lines only
    check_log(events_path)
    d.limit = None
    d.start()
    check_completed(d, run_id, wfd_tmp)
    assert events_path.stat().st_size > FSIZE_LIMIT


def test_stop_steps_while_events_cannot_be_persisted(sandbox, wfd_tmp: Path) -> None:
    """Stop on a broken disk: the step trees still go and the daemon still exits (it
    cannot record the interruptions; the next daemon does), rather than hang. Since
    issue 12 a plain SIGTERM leaves steps running, so the stop here is `wfctl shutdown
    --stop-steps` (changed on purpose)."""
    wf = chain_workflow(wfd_tmp, sleeper=True)
    d = limited_daemon(sandbox)
    run_id = d.submit(wf)
    wait_until(lambda: ("sleeper", 1) in stamped(wfd_tmp), timeout=10, message="the sleeper")
    sleeper = [p for p in psutil.process_iter()
               if _env(p).get("WFD_RUN_ID") == run_id and _env(p).get("WFD_STEP_ID") == "sleeper"]
    assert sleeper, "the sleeper step's processes"
    (wfd_tmp / "gate").touch()
    check_failing(d, run_id, wfd_tmp, wf, "File too large")
    events_path = d.state_dir / "runs" / run_id / "events.jsonl"

    assert ask_shutdown(d.socket, stop_steps=True)
    try:
        d.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        d.kill()
        pytest.fail("the daemon hung on SIGTERM while it could not persist events")
    finally:
        check_log(events_path)
    _, alive = psutil.wait_procs(sleeper, timeout=0)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, "the daemon exited and left a step running"

    d.limit = None  # the disk is fine again
    d.start()
    check_completed(d, run_id, wfd_tmp)


def _env(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}
