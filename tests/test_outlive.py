"""Steps outlive the daemon (issue 12, "Prove it" 1, 2, 3, 5 and 7), through the real
`wfd` and `wfctl`.

A `kill -9` of wfd, `wfctl shutdown` or SIGTERM leave running attempts to the
keeper, which goes on running, timing out, reaping and recording them; the
next daemon re-attaches or records what ended meanwhile, once. Only the loss
of the keeper and the step processes (a reboot, simulated here by SIGKILLing
the daemon, the keeper and every step process) interrupts an attempt, and
then the step's `on_lost` says what happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import (
    Daemon,
    base_env,
    pid_gone,
    pids_in,
    run_json,
    wait_for_state,
    wait_until,
    why_no_cgroups,
    write_workflow,
)

from wfd.events import parse_ts

ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")
ENDS = ("AttemptSucceeded", "AttemptFailed", "StepFailed", "AttemptInterrupted",
        "StepCancelled")


def events(d: Daemon, run_id: str) -> list[dict]:
    """The run's log as it is on disk (readable while no daemon runs)."""
    text = (d.state_dir / "runs" / run_id / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def of(log: list[dict], step: str, *types: str) -> list[dict]:
    return [e for e in log if e.get("step") == step and e["type"] in types]


def started(d: Daemon, run_id: str, count: int) -> dict[str, dict]:
    """Wait until `count` steps have a durable AttemptStarted; step -> its last one."""
    def enough() -> dict[str, dict] | None:
        found = {e["step"]: e for e in events(d, run_id) if e["type"] == "AttemptStarted"}
        return found if len(found) >= count else None

    return wait_until(enough, 15, message=f"{count} AttemptStarted events")


def journal_records(d: Daemon, run_id: str) -> list[dict]:
    """The exit records the keeper made durable for this run (its journals' lines)."""
    records = []
    for path in (d.state_dir / "keeper").glob("exits-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["run_id"] == run_id:
                records.append(record)
    return records


def gone(pid: int) -> bool:
    return pid_gone(pid)


# ---- 1. kill -9 while three steps run ------------------------------------------------------


def test_kill_9_while_three_steps_run_each_has_one_attempt(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": s, "command": 'echo "one $$"; sleep 4; echo "two $$"'} for s in "abc"]})
    d = daemon()
    run_id = d.submit(wf)
    first = started(d, run_id, 3)
    logs = d.state_dir / "runs" / run_id / "logs"
    wait_until(lambda: all((logs / f"{s}.1.log").exists()
                           and "one" in (logs / f"{s}.1.log").read_text() for s in "abc"),
               10, message="every step's first line")
    d.kill()
    pids = {s: first[s]["pid"] for s in "abc"}
    assert not [s for s, pid in pids.items() if gone(pid)], "a crash of wfd stopped a step"
    assert d.keeper() is not None
    d.start()
    still = sum(not gone(pid) for pid in pids.values())
    final = wait_for_state(d, run_id, *ENDED, timeout=30)
    assert final["state"] == "SUCCEEDED", final
    log = events(d, run_id)
    for s, pid in pids.items():
        assert final["steps"][s]["attempts"] == 1, final["steps"][s]
        assert [e["attempt"] for e in of(log, s, "AttemptClaimed")] == [1]
        assert [e["pid"] for e in of(log, s, "AttemptStarted")] == [pid]
        assert [e["type"] for e in of(log, s, *ENDS)] == ["AttemptSucceeded"]
        out = d.wfctl("logs", run_id, s)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"one {pid}\ntwo {pid}\n", out.stdout
    print(f"\n{still} of 3 steps still ran when the new daemon answered")


# ---- 2. steps that end while no daemon runs ----------------------------------------------


def test_ends_while_no_daemon_runs_are_recorded_once_with_real_exit_codes(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    gate = wfd_tmp / "gate"
    wait = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    wf = write_workflow(wfd_tmp, {"steps": [
        {"id": "ok", "command": f"{wait}; exit 0"},
        {"id": "three", "command": f'[ "$WFD_ATTEMPT" -ge 2 ] && exit 0; {wait}; exit 3',
         "retries": 1, "backoff": {"initial": 0.1, "jitter": 0}},
    ]})
    d = daemon()
    run_id = d.submit(wf)
    pids = [e["pid"] for e in started(d, run_id, 2).values()]
    d.kill()
    gate.touch()
    wait_until(lambda: all(gone(pid) for pid in pids), 15, message="both steps to end")
    records = wait_until(lambda: len(r := journal_records(d, run_id)) == 2 and r, 10,
                         message="the keeper's exit records")
    assert sorted((r["step"], r["exit_code"], r["why"]) for r in records) == [
        ("ok", 0, "exited"), ("three", 3, "exited")]
    assert not [e for e in events(d, run_id) if e["type"] in ENDS], "no daemon was up"

    d.start()
    final = wait_for_state(d, run_id, *ENDED, timeout=30)
    assert final["state"] == "SUCCEEDED", final
    d.kill()  # and once more: what the keeper still holds is never recorded twice
    d.start()
    assert run_json(d, run_id)["state"] == "SUCCEEDED"
    log = events(d, run_id)
    assert [(e["type"], e["attempt"]) for e in of(log, "ok", *ENDS)] == [
        ("AttemptSucceeded", 1)]
    assert [(e["type"], e["attempt"], e.get("exit_code")) for e in of(log, "three", *ENDS)] == [
        ("AttemptFailed", 1, 3), ("AttemptSucceeded", 2, None)]
    assert final["steps"]["ok"]["attempts"] == 1
    assert final["steps"]["three"]["attempts"] == 2  # the retry happened
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))


# ---- 3. a timeout that expires while no daemon runs --------------------------------------

TERM_PY = r"""
import os, signal, sys, time
out = sys.argv[1]
with open(out + ".start", "w") as f:
    f.write(f"{time.time():.6f}")
def on_term(signum, frame):
    with open(out + ".tmp", "w") as f:
        f.write(f"{time.time():.6f}")
    os.rename(out + ".tmp", out)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.02)
"""
TIMEOUT = 3.0


def test_timeout_fires_on_time_while_no_daemon_runs(daemon: Callable[..., Daemon],
                                                     wfd_tmp: Path) -> None:
    (wfd_tmp / "term.py").write_text(TERM_PY)
    out = wfd_tmp / "term"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "slow", "command": [sys.executable, "-I", "-S", str(wfd_tmp / "term.py"),
                                  str(out)],
        "timeout": TIMEOUT, "kill_grace": 5,
    }]})
    d = daemon()
    run_id = d.submit(wf)
    pid = started(d, run_id, 1)["slow"]["pid"]
    d.kill()
    [claim] = of(events(d, run_id), "slow", "AttemptClaimed")
    wait_until(lambda: out.exists() and gone(pid), TIMEOUT + 10, message="the timeout's kill")
    term_at = float(out.read_text())
    began = float(Path(f"{out}.start").read_text())
    # The attempt began between its claim and its first line; its deadline is T later.
    assert term_at >= parse_ts(claim["ts"]) + TIMEOUT, "killed before its deadline"
    assert term_at <= began + TIMEOUT + 1.0, f"killed {term_at - began - TIMEOUT:.2f} s late"
    assert not [e for e in events(d, run_id) if e["type"] in ENDS], "no daemon was up"

    d.start()
    final = wait_for_state(d, run_id, *ENDED, timeout=30)
    assert final["state"] == "FAILED", final
    assert final["steps"]["slow"]["error"] == f"timed out after {TIMEOUT:g} s", final
    assert final["steps"]["slow"]["attempts"] == 1
    assert [e["type"] for e in of(events(d, run_id), "slow", *ENDS)] == ["StepFailed"]


# ---- 5. reboot simulation --------------------------------------------------------------

HOLD_PY = "import time; time.sleep(1000)"


def marked(run_id: str) -> list[psutil.Process]:
    """Live processes proven to be steps of `run_id` by their marks (all of them)."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ() if proc.status() != psutil.STATUS_ZOMBIE else {}
            if (env.get("WFD_RUN_ID") == run_id and env.get("WFD_STEP_ID")
                    and env.get("WFD_ATTEMPT")):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def reboot(d: Daemon, run_id: str) -> None:
    """What a reboot does to wfd: the daemon, the keeper and every step process die."""
    d.kill()
    d.kill_keeper()
    victims = marked(run_id)
    assert victims, "the steps were not running"
    for proc in victims:
        proc.send_signal(signal.SIGKILL)  # psutil refuses a pid that was reused
    psutil.wait_procs(victims, timeout=5)
    wait_until(lambda: not marked(run_id), 5, message="the step processes to be gone")


class Strangers:
    """Processes of the same user that are not the step's: no clean-up may touch them."""

    def __init__(self, root: Path, mark: str, run_id: str) -> None:
        base = base_env(mark, {"WFD_RUN_ID": None, "WFD_STEP_ID": None, "WFD_ATTEMPT": None})
        marks = {
            "no marks": {},
            "another run's marks": {"WFD_RUN_ID": "20200101T000000Z-0000beef",
                                    "WFD_STEP_ID": "once", "WFD_ATTEMPT": "1"},
            "an empty attempt mark": {"WFD_RUN_ID": run_id, "WFD_STEP_ID": "once",
                                      "WFD_ATTEMPT": ""},
        }
        self.procs = {name: subprocess.Popen([sys.executable, "-c", HOLD_PY, str(root)],
                                             env={**base, **env}, start_new_session=True)
                      for name, env in marks.items()}

    def assert_alive(self) -> None:
        dead = [name for name, p in self.procs.items() if p.poll() is not None]
        assert not dead, f"a stranger was killed: {dead}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def lost_workflow(root: Path, **fields: object) -> Path:
    """Two steps whose first attempt hangs and whose later ones succeed."""
    command = '[ "$WFD_ATTEMPT" -ge 2 ] && exit 0; exec sleep 1000'
    defaults = fields.pop("defaults", None)
    return write_workflow(root, {
        **({"defaults": defaults} if defaults else {}),
        "steps": [{"id": sid, "command": command, "retries": 0, **extra}
                  for sid, extra in fields.items()]})


def test_reboot_reruns_a_lost_attempt_and_touches_no_stranger(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf = lost_workflow(wfd_tmp, again={})  # on_lost "rerun" is the default
    d = daemon()
    run_id = d.submit(wf)
    started(d, run_id, 1)
    strangers = Strangers(wfd_tmp, d.mark, run_id)
    try:
        reboot(d, run_id)
        d.start()
        final = wait_for_state(d, run_id, *ENDED, timeout=30)
        strangers.assert_alive()
    finally:
        strangers.stop()
    assert final["state"] == "SUCCEEDED", final
    assert final["steps"]["again"]["attempts"] == 2  # with retries 0: no retry was used
    ends = of(events(d, run_id), "again", *ENDS)
    assert [(e["type"], e["attempt"]) for e in ends] == [
        ("AttemptInterrupted", 1), ("AttemptSucceeded", 2)]
    assert ends[0]["reason"].startswith("attempt lost: "), ends[0]


def test_reboot_fails_a_lost_attempt_with_on_lost_fail(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf = lost_workflow(wfd_tmp, defaults={"on_lost": "fail"}, once={},
                       rerun={"on_lost": "rerun"})
    d = daemon()
    run_id = d.submit(wf)
    started(d, run_id, 2)
    strangers = Strangers(wfd_tmp, d.mark, run_id)
    try:
        reboot(d, run_id)
        d.start()
        final = wait_for_state(d, run_id, *ENDED, timeout=30)
        strangers.assert_alive()
    finally:
        strangers.stop()
    assert final["state"] == "FAILED", final
    once = final["steps"]["once"]
    assert once["state"] == "FAILED" and once["attempts"] == 1, once
    assert once["error"].startswith("attempt lost: "), once
    assert final["steps"]["rerun"]["state"] == "SUCCEEDED"  # the step's own field wins
    assert final["steps"]["rerun"]["attempts"] == 2
    shown = d.wfctl("replay", run_id)
    assert shown.returncode == 0 and once["error"] in shown.stdout, shown.stdout

    # `resume` may run it again: whoever resumes has checked it is safe to.
    assert d.wfctl("resume", run_id).returncode == 0
    final = wait_for_state(d, run_id, *ENDED, timeout=30)
    assert final["state"] == "SUCCEEDED" and final["steps"]["once"]["attempts"] == 2, final


# ---- 7. shutdown ---------------------------------------------------------------------


def gated_step(root: Path) -> tuple[Path, Path, Path]:
    gate, pid_file = root / "gate", root / "pid"
    wf = write_workflow(root, {"steps": [{
        "id": "s", "retries": 0, "kill_grace": 0.5,
        "command": f"echo $$ >> {pid_file}; while [ ! -e {gate} ]; do sleep 0.05; done",
    }]})
    return wf, gate, pid_file


def test_shutdown_leaves_the_step_running_and_the_next_daemon_records_its_end(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf, gate, pid_file = gated_step(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    [pid] = pids_in(pid_file, 1)
    done = d.wfctl("shutdown")
    assert done.returncode == 0, done.stderr
    assert d.proc.wait(30) == 0
    assert not gone(pid), "wfctl shutdown stopped a running step"
    assert d.wfctl("status").returncode == 3  # no daemon
    d.start()
    assert run_json(d, run_id)["steps"]["s"]["state"] == "RUNNING"
    assert not gone(pid)
    gate.touch()
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED" and final["steps"]["s"]["attempts"] == 1, final
    log = events(d, run_id)
    assert [e["pid"] for e in of(log, "s", "AttemptStarted")] == [pid]
    assert [e["type"] for e in of(log, "s", *ENDS)] == ["AttemptSucceeded"]
    assert pid_file.read_text().split() == [str(pid)]  # it ran once


def test_shutdown_stop_steps_stops_them_and_they_rerun_without_a_retry(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    wf, gate, pid_file = gated_step(wfd_tmp)
    d = daemon()
    run_id = d.submit(wf)
    [pid] = pids_in(pid_file, 1)
    done = d.wfctl("shutdown", "--stop-steps")
    assert done.returncode == 0, done.stderr
    assert d.proc.wait(30) == 0
    assert gone(pid), "the step outlived `wfctl shutdown --stop-steps`"
    last = events(d, run_id)[-1]
    assert (last["type"], last["attempt"], last["reason"]) == (
        "AttemptInterrupted", 1, "daemon stopped")
    gate.touch()
    d.start()
    final = wait_for_state(d, run_id, *ENDED)
    assert final["state"] == "SUCCEEDED" and final["steps"]["s"]["attempts"] == 2, final
    assert len(pid_file.read_text().split()) == 2


# ---- the keeper outlives the daemon that started it, from its first moment -------------


def test_a_keeper_whose_starter_died_before_its_ready_line_still_serves(sandbox) -> None:
    """A daemon killed while its keeper starts never reads the keeper's "ready" line: the
    keeper must go on (the next daemon finds it by its lock), not die of a broken pipe."""
    import socket as sk

    from wfd import keeper as k

    keeper_dir = sandbox.root / "keeper"
    keeper_dir.mkdir(mode=0o700)
    reader, writer = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "wfd.keeper", str(keeper_dir)],
                            stdin=subprocess.DEVNULL, stdout=writer, start_new_session=True,
                            env=base_env(sandbox.mark))
    os.close(writer)
    os.close(reader)  # as if the daemon that started it was SIGKILLed

    def hello() -> k.KWelcome | None:
        conn = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
        conn.settimeout(5)
        try:
            conn.connect(str(keeper_dir / k.SOCKET))
            conn.sendall(k.frame(k.KHello(version=k.KEEPER_PROTOCOL, daemon_pid=os.getpid())))
            data = b""
            while len(data) < 4 or len(data) < 4 + k.HEADER.unpack(data[:4])[0]:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
            return k.decode_reply(data[4:])  # type: ignore[return-value]
        except OSError:
            return None
        finally:
            conn.close()

    try:
        welcome = wait_until(hello, 10, interval=0.05, message="the keeper to answer")
        assert isinstance(welcome, k.KWelcome) and welcome.pid == proc.pid, welcome
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


# ---- a lost attempt's leftovers: SIGTERM first, then its whole cgroup leaf -------------


def test_a_lost_attempts_leftovers_get_sigterm_then_its_leaf_is_emptied(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    """The keeper is killed, the step's processes are not: the next daemon kills them as
    every kill goes (SIGTERM, kill_grace, SIGKILL) and, with a cgroup leaf per attempt,
    also what left the session and dropped the marks, before attempt 2 runs."""
    if (why := why_no_cgroups()) is not None:
        pytest.skip(why)
    term, escaped_file = wfd_tmp / "term", wfd_tmp / "escaped"
    wf = write_workflow(wfd_tmp, {"steps": [{"id": "s", "kill_grace": 2, "command": (
        f'[ "$WFD_ATTEMPT" -ge 2 ] && exit 0; trap "echo TERM >> {term}; exit 0" TERM; '
        f"setsid env -i sh -c 'echo $$ > {escaped_file}; exec sleep 1000' & "
        "while :; do sleep 0.05; done")}]})
    d = daemon()
    run_id = d.submit(wf)
    leader = started(d, run_id, 1)["s"]["pid"]
    escaped = psutil.Process(int(wait_until(
        lambda: escaped_file.exists() and escaped_file.read_text().strip(), 10)))
    try:
        assert escaped.environ().get("WFD_RUN_ID") is None  # only its leaf knows it
        d.kill()
        d.kill_keeper()
        assert not gone(leader) and not gone(escaped.pid), "gone with the keeper"
        d.start()
        final = wait_for_state(d, run_id, *ENDED, timeout=30)
        assert final["state"] == "SUCCEEDED" and final["steps"]["s"]["attempts"] == 2, final
        assert term.read_text() == "TERM\n", "the lost attempt's leader got no SIGTERM"
        assert gone(escaped.pid), "a lost attempt's process outside its session survived"
        assert [e.get("containment") for e in of(events(d, run_id), "s", "AttemptStarted")] == [
            "cgroup", "cgroup"]
    finally:
        if not gone(escaped.pid):
            escaped.kill()  # psutil refuses a pid that was reused since


# ---- a claim whose spawn never reached the keeper -------------------------------------


def test_an_attempt_claimed_but_never_sent_to_the_keeper_starts_once_and_is_not_lost(
    sandbox, wfd_tmp: Path,
) -> None:
    """The daemon dies after the claim is durable and before the keeper gets the attempt
    (here: a fault point SIGKILLs it there). The keeper, alive since before the claim,
    never ran it, so it is not lost (`on_lost: fail` must not fail it): the next daemon
    starts that same attempt."""
    runs = wfd_tmp / "runs"
    wf = write_workflow(wfd_tmp, {"steps": [{
        "id": "once", "on_lost": "fail", "command": f"echo $WFD_ATTEMPT >> {runs}"}]})
    d = sandbox.daemon(env={"WFD_FAULTS": "spawn=kill"})
    keeper = d.keeper()
    assert keeper is not None
    client = d.popen("run", str(wf))  # its answer may die with the daemon
    wait_until(lambda: not d.running, 15, message="the daemon to die at the fault point")
    client.communicate(timeout=30)
    [run_id] = d.run_ids()
    log = events(d, run_id)
    assert [e["type"] for e in log][-1] == "AttemptClaimed", log
    assert d.keeper() is not None and d.keeper().pid == keeper.pid
    d.env.pop("WFD_FAULTS")
    d.start()
    final = wait_for_state(d, run_id, *ENDED, timeout=30)
    assert final["state"] == "SUCCEEDED", final
    assert final["steps"]["once"]["attempts"] == 1, final
    assert runs.read_text() == "1\n"  # it ran once
    assert [e["type"] for e in of(events(d, run_id), "once", *ENDS)] == ["AttemptSucceeded"]


def test_an_attempt_that_ends_at_once_still_reports_its_cgroup(
    daemon: Callable[..., Daemon], wfd_tmp: Path,
) -> None:
    """A leader that exits before the keeper reports its start is still said to have run
    in its cgroup leaf (the keeper asks at the spawn, not once it is over)."""
    if (why := why_no_cgroups()) is not None:
        pytest.skip(why)
    wf = write_workflow(wfd_tmp, {"steps": [{"id": f"s{i}", "command": ["true"]}
                                            for i in range(12)]})
    d = daemon()
    run_id = d.submit(wf, "--wait")
    status = run_json(d, run_id)
    assert status["state"] == "SUCCEEDED", status
    said = {sid: step["containment"] for sid, step in status["steps"].items()}
    assert set(said.values()) == {"cgroup"}, said
