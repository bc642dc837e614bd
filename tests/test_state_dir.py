"""The state dir is trusted only when it is safe, and what a crash leaves there is
cleaned up (issue 11 finding 7, issue 10 finding 3), through the real `wfd`/`wfctl`.

- A daemon refuses (exit 1, one line) a state dir or `runs/` that someone other
  than its user could write: a forged run planted there (`"uid": 0`) would
  otherwise run as root under a system daemon.
- Nothing under the state dir is reached through a symlink: a run dir or a
  run's `logs` that is a link is refused, never followed.
- A run dir that a crash left while the run was being created (no committed
  first event: the submit was never answered) is removed at the next start and
  logged once, instead of being CORRUPT for ever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
from helpers import Daemon, run_json, wait_for_state, wait_until, write_workflow

from wfd import events as ev
from wfd.eventlog import Submission

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, --system)")
REFUSED = 1  # wfd's exit status when it cannot start


def start_refused(d: Daemon) -> str:
    """Start `d`, which must exit 1 at once; its stderr."""
    d.start(wait=False)
    assert d.proc is not None
    try:
        code = d.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wfd started on an unsafe state dir:\n{d.log_text()}")
    assert code == REFUSED, d.log_text()
    return d.log_text().split("---- start")[-1]


def forge_run(state_dir: Path, run_id: str, command: str) -> None:
    """What someone who can write the state dir plants: a run of root's, never submitted."""
    run_dir = state_dir / "runs" / run_id
    (run_dir / "logs").mkdir(parents=True)
    workflow = msgspec.json.encode({"name": "forged", "steps": [{"id": "a", "command": command}]})
    sub = Submission(workflow=workflow.decode(), source="forged.json", base_dir="/", env={},
                     umask=0o022, uid=0, gid=0, owner="root",
                     submitted_at=ev.format_ts(time.time()))
    (run_dir / "workflow.json").write_bytes(msgspec.json.encode(sub))
    created = ev.RunCreated(seq=1, ts=ev.format_ts(time.time()), run_id=run_id, name="forged",
                            owner="root", owner_uid=0)
    (run_dir / "events.jsonl").write_bytes(ev.encode_line(created))


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, gid, follow_symlinks=False)


# ---- who may write the state dir --------------------------------------------------


@ROOT_ONLY
def test_a_system_daemon_refuses_a_state_dir_a_user_planted_a_run_in(
        daemon, wfd_tmp: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    state = wfd_tmp / "planted.state"
    marker = wfd_tmp / "ran-as-root"
    forge_run(state, "20260101T000000Z-00000001", f"id -u > {marker}")
    chown_tree(state, nobody.pw_uid, nobody.pw_gid)  # the user made it all
    d = daemon(name="sys", state_dir=state, extra=["--system"], start=False)
    said = start_refused(d)
    assert f"refusing the state dir: {state} belongs to uid {nobody.pw_uid}" in said, said
    assert not marker.exists()

    # Owned by root but open to a group or to everyone: the same.
    chown_tree(state, 0, 0)
    for mode, who in ((0o770, "its group"), (0o757, "others")):
        os.chmod(state, mode)
        said = start_refused(d)
        assert f"{state} is writable by {who}" in said, said
    os.chmod(state, 0o755)
    os.chmod(state / "runs", 0o777)
    said = start_refused(d)
    assert f"{state / 'runs'} is writable by its group and others (mode 0777)" in said, said
    assert not marker.exists()

    # The run itself is a valid one: once root owns the dir (as if root made it), it runs.
    # So what stopped it above was the check alone.
    os.chmod(state / "runs", 0o700)
    d.start()
    wait_until(lambda: marker.exists() and marker.read_text().strip(), timeout=20,
               message="the run to run once the state dir is root's")


@ROOT_ONLY
def test_a_user_daemon_refuses_a_state_dir_of_another_user(daemon, wfd_tmp: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    state = wfd_tmp / "theirs.state"
    (state / "runs").mkdir(parents=True, mode=0o700)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    said = start_refused(daemon(state_dir=state, start=False))
    assert f"{state} belongs to uid {nobody.pw_uid}, not to uid {os.geteuid()}" in said, said


def test_a_user_daemon_refuses_a_state_dir_everyone_can_write(daemon, wfd_tmp: Path) -> None:
    state = wfd_tmp / "open.state"
    (state / "runs").mkdir(parents=True, mode=0o700)
    os.chmod(state, 0o777)
    said = start_refused(daemon(state_dir=state, start=False))
    assert f"{state} is writable by others (mode 0777)" in said, said
    # A user daemon allows its group to write (user private groups); others never.
    os.chmod(state, 0o770)
    d = daemon(state_dir=state)
    assert run_json(d) == []


def test_runs_as_a_symlink_is_refused(daemon, wfd_tmp: Path) -> None:
    state, elsewhere = wfd_tmp / "link.state", wfd_tmp / "elsewhere"
    state.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (state / "runs").symlink_to(elsewhere)
    said = start_refused(daemon(state_dir=state, start=False))
    assert f"{state / 'runs'} is a symlink or not a directory" in said, said
    assert list(elsewhere.iterdir()) == []


# ---- no symlink followed under the state dir ---------------------------------------


def failing(root: Path) -> Path:
    """A workflow whose one step counts its attempts in a file and fails."""
    stamp = f'echo "$WFD_RUN_ID $WFD_ATTEMPT" >> {root / "stamps"}'
    return write_workflow(root, {"name": "failing", "steps": [
        {"id": "a", "command": f"{stamp}; exit 1"},
    ]})


def stamps(root: Path, run_id: str) -> int:
    path = root / "stamps"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(line.split()[0] == run_id for line in lines)


def failed_run(d: Daemon, root: Path) -> str:
    """A FAILED run (attempt 1 of its step `a` ran), which `resume` would run again."""
    done = d.wfctl("run", "--wait", str(failing(root)))
    assert done.returncode == 1, done.stderr  # exit 1: the run FAILED
    run_id = done.stdout.strip()
    assert run_json(d, run_id)["state"] == "FAILED"
    assert stamps(root, run_id) == 1
    return run_id


def test_a_run_dir_that_is_a_symlink_is_corrupt_and_not_followed(
        daemon, wfd_tmp: Path) -> None:
    d = daemon()
    run_id = failed_run(d, wfd_tmp)
    assert d.stop() == 0
    real = d.state_dir / "runs" / run_id
    moved = wfd_tmp / "outside" / run_id
    moved.parent.mkdir()
    real.rename(moved)
    real.symlink_to(moved, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in moved.rglob("*") if p.is_file()}

    d.start()
    status = run_json(d, run_id)
    assert status["state"] == "CORRUPT", status
    assert {r["run_id"]: r["state"] for r in run_json(d)} == {run_id: "CORRUPT"}
    assert d.wfctl("replay", run_id).returncode == 5
    assert d.wfctl("resume", run_id).returncode == 2  # a FAILED run would run again
    fresh = failed_run(d, wfd_tmp)  # the daemon goes on with other runs
    assert fresh != run_id
    # Nothing behind the link was run, or written.
    assert stamps(wfd_tmp, run_id) == 1
    assert {p.name: p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before
    assert real.is_symlink()


def test_a_logs_dir_that_is_a_symlink_is_not_written_through(daemon, wfd_tmp: Path) -> None:
    d = daemon()
    run_id = failed_run(d, wfd_tmp)
    logs = d.state_dir / "runs" / run_id / "logs"
    trap = wfd_tmp / "trap"
    trap.mkdir()
    shutil.rmtree(logs)
    logs.symlink_to(trap, target_is_directory=True)

    resumed = d.wfctl("resume", run_id)  # attempt 2 cannot open its log through the link
    assert resumed.returncode == 0, resumed.stderr
    status = wait_for_state(d, run_id, "SUCCEEDED", "FAILED", "CANCELLED", timeout=20)
    step = status["steps"]["a"]
    assert status["state"] == "FAILED" and step["attempts"] == 2, status
    assert "log" in (step["error"] or ""), step
    assert list(trap.iterdir()) == [], "a log file was created through the symlink"
    assert stamps(wfd_tmp, run_id) == 1  # attempt 2 never ran


# ---- runs that were never acknowledged -------------------------------------------------


def test_runs_a_crash_left_half_created_are_removed_at_start_and_logged_once(
        daemon, wfd_tmp: Path) -> None:
    wf = write_workflow(wfd_tmp, {"name": "ok", "steps": [{"id": "a", "command": "true"}]})
    d = daemon()
    real = d.submit(wf, "--wait")
    assert d.stop() == 0
    runs = d.state_dir / "runs"
    sub = (runs / real / "workflow.json").read_bytes()
    first_line = (runs / real / "events.jsonl").read_bytes().split(b"\n")[0] + b"\n"

    def make(run_id: str, files: dict[str, bytes | None]) -> str:
        run_dir = runs / run_id
        run_dir.mkdir(mode=0o700)
        for name, data in files.items():
            if data is None:
                (run_dir / name).mkdir(mode=0o700)
            else:
                (run_dir / name).write_bytes(data)
        return run_id

    # Every state create_run passes through, and a crash can stop it at.
    half = [
        make("20000101T000000Z-00000001", {}),
        make("20000101T000000Z-00000002", {"logs": None}),
        make("20000101T000000Z-00000003", {"logs": None, "workflow.json": sub[:40]}),
        make("20000101T000000Z-00000004", {"logs": None, "workflow.json": sub}),
        make("20000101T000000Z-00000005", {"logs": None, "workflow.json": sub,
                                           "events.jsonl": b""}),
        make("20000101T000000Z-00000006", {"logs": None, "workflow.json": sub,
                                           "events.jsonl": first_line[:-1]}),  # torn
    ]
    # Not a crashed submit: left for loading to judge.
    acknowledged = make("20000101T000000Z-00000007", {"events.jsonl": first_line})
    foreign = make("20000101T000000Z-00000008", {"workflow.json": sub, "notes": b"mine"})

    d.start()
    assert sorted(p.name for p in runs.iterdir()) == sorted([real, acknowledged, foreign])
    listed = {r["run_id"]: r["state"] for r in run_json(d)}
    assert listed == {real: "SUCCEEDED", acknowledged: "CORRUPT", foreign: "CORRUPT"}
    assert (runs / foreign / "notes").read_bytes() == b"mine"
    d.restart()  # said once: the next start has nothing left to say about them
    assert run_json(d, real)["state"] == "SUCCEEDED"
    log = d.log_text()
    for run_id in half:
        said = [line for line in log.splitlines() if run_id in line]
        assert len(said) == 1 and "never acknowledged" in said[0], said
    assert "never acknowledged" not in "\n".join(
        line for line in log.splitlines() if acknowledged in line or foreign in line)
    fresh = d.submit(wf, "--wait")  # new runs are made as before
    assert run_json(d, fresh)["state"] == "SUCCEEDED"
