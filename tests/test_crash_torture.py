"""Torture: SIGKILL the daemon at random moments while a layered DAG runs (issue 4, test 1;
issue 12, test 4: steps outlive the daemon).

A 4 x 6 layered DAG (every step depends on every step of the layer before)
whose steps sleep a random short time and stamp `start`/`end` lines into a
shared file. While a step runs it holds an exclusive, non-blocking flock on a
lock file of its own: a second attempt of the same step running at the same
time cannot get it and writes `OVERLAP`. The daemon (never its keeper) is
killed with SIGKILL at random moments (also during its own recovery) at least
MIN_KILLS times and restarted on the same state dir and socket each time.
Its running attempts go on under the keeper meanwhile, and their ends are
recorded by whichever daemon is up next. A kill of wfd no longer slows the
run, so the steps of layer L also wait, before their sleep, until the test
has killed the daemon (L + 1) * MIN_KILLS / LAYERS times: the kills land
while every layer runs, however fast this machine is. So the run must succeed with every
step run exactly once (0 reruns: no attempt's keeper died), each outcome
recorded once, nothing overlapping, nothing out of order and nothing left
running. (Before issue 12 each kill interrupted the running attempts and they
ran again; a reboot, which still does, is test_crash_reboot's.)
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import psutil
from helpers import Daemon, run_json, wait_until, write_workflow

LAYERS = 4
WIDTH = 6
MIN_KILLS = 20
MAX_SECONDS = 40.0
SLEEP_MIN, SLEEP_MAX = 0.05, 0.4
KILL_AFTER_MAX = 0.5  # a daemon lives 0..this long after it answers before it is killed
EARLY_KILLS = 0.2  # share of restarts not waited for: the next kill may come before it answers

# The step: take the step's lock or report an overlap, stamp, wait for enough kills of the
# daemon, sleep, stamp.
STEP_PY = r"""
import fcntl, os, random, sys, time
stamps, lock_dir, lo, hi = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
kills, need = sys.argv[5], int(sys.argv[6])
step, attempt = os.environ["WFD_STEP_ID"], os.environ["WFD_ATTEMPT"]

def stamp(text):
    fd = os.open(stamps, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (text + "\n").encode())  # one O_APPEND write: lines never interleave
    finally:
        os.close(fd)

lock = os.open(os.path.join(lock_dir, step + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    stamp(f"OVERLAP {step} {attempt} {time.time():.6f}")
    sys.exit(1)
stamp(f"start {step} {attempt} {time.time():.6f}")
while int(open(kills).read() or 0) < need:
    time.sleep(0.02)
time.sleep(random.uniform(lo, hi))
stamp(f"end {step} {attempt} {time.time():.6f}")
"""


ENDS = ("AttemptSucceeded", "AttemptFailed", "StepFailed", "AttemptInterrupted",
        "StepCancelled")


def step_id(layer: int, index: int) -> str:
    return f"L{layer}S{index}"


def layered_workflow(root: Path) -> tuple[Path, dict[str, list[str]], Path]:
    step_py = root / "step.py"
    step_py.write_text(STEP_PY)
    stamps = root / "stamps.txt"
    locks = root / "locks"
    locks.mkdir()
    count_kills(root, 0)
    deps: dict[str, list[str]] = {}
    steps = []
    for layer in range(LAYERS):
        for index in range(WIDTH):
            sid = step_id(layer, index)
            deps[sid] = [step_id(layer - 1, j) for j in range(WIDTH)] if layer else []
            steps.append({
                "id": sid,
                "command": [sys.executable, "-I", "-S", str(step_py), str(stamps), str(locks),
                            str(SLEEP_MIN), str(SLEEP_MAX), str(root / "kills"),
                            str((layer + 1) * MIN_KILLS // LAYERS)],
                "depends_on": deps[sid],
                "kill_grace": 1,
            })
    wf = write_workflow(root, {"name": "torture", "steps": steps})
    return wf, deps, stamps


def count_kills(root: Path, kills: int) -> None:
    """Tell the steps how often the daemon was killed (one rename: never half a number)."""
    (root / "kills.tmp").write_text(str(kills))
    (root / "kills.tmp").rename(root / "kills")


def read_events(daemon: Daemon, run_id: str) -> list[dict]:
    path = daemon.state_dir / "runs" / run_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def parse_stamps(path: Path) -> tuple[list[str], dict, dict]:
    """(OVERLAP lines, {(step, attempt): start time}, {(step, attempt): end time})."""
    overlaps, starts, ends = [], {}, {}
    for line in path.read_text().splitlines():
        kind, step, attempt, when = line.split()
        key = (step, int(attempt))
        if kind == "OVERLAP":
            overlaps.append(line)
        elif kind == "start":
            assert key not in starts, f"attempt {key} started twice (attempt number reused)"
            starts[key] = float(when)
        else:
            assert kind == "end", line
            ends[key] = float(when)
    return overlaps, starts, ends


def step_processes(run_id: str) -> list[psutil.Process]:
    """Live (non-zombie) processes carrying this run's mark."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("WFD_RUN_ID") == run_id:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_sigkill_torture(daemon, wfd_tmp: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    wf, deps, stamps = layered_workflow(wfd_tmp)
    d = daemon(max_parallel=WIDTH)
    began = time.monotonic()
    run_id = d.submit(wf)

    events_path = d.state_dir / "runs" / run_id / "events.jsonl"
    kills = 0
    keepers: set[int] = set()  # pids of the keepers seen at the kills
    while b'"RunFinished"' not in events_path.read_bytes():
        time.sleep(rng.uniform(0.0, KILL_AFTER_MAX))
        d.kill()
        kills += 1
        count_kills(wfd_tmp, kills)
        if (keeper := d.keeper()) is not None:
            keepers.add(keeper.pid)
        assert time.monotonic() - began < MAX_SECONDS, f"seed {seed}: not done after {kills} kills"
        # Now and then the next kill may land before the daemon answers: during its start,
        # its fold of the log, or the clean-up of the previous daemon's steps.
        d.start(wait=rng.random() >= EARLY_KILLS)
    d.wait_ready()

    final = wait_until(lambda: (s := run_json(d, run_id))["state"] != "RUNNING" and s,
                       timeout=30, message="the run to end")
    duration = time.monotonic() - began
    overlaps, starts, ends = parse_stamps(stamps)
    events = read_events(d, run_id)
    claims = [(e["step"], e["attempt"]) for e in events if e["type"] == "AttemptClaimed"]
    reruns = len(claims) - len(deps)
    print(f"\ntorture: seed {seed}, {kills} SIGKILLs of wfd, {len(keepers)} keeper(s), "
          f"{len(claims)} attempts of {len(deps)} steps, {reruns} reruns, "
          f"{len(overlaps)} overlaps, {duration:.1f} s")
    assert not overlaps, f"seed {seed}: two attempts of a step ran at once: {overlaps}"
    assert final["state"] == "SUCCEEDED", f"seed {seed}: {final}"
    assert kills >= MIN_KILLS, f"seed {seed}: the run ended after only {kills} kills"

    # Every step ran exactly once: a kill of wfd interrupts nothing, and each attempt's
    # end was recorded once, by whichever daemon was up.
    assert sorted(claims) == sorted((step, 1) for step in deps), (
        f"seed {seed}: reruns: {[c for c in claims if c[1] != 1]}")
    assert sorted(starts) == sorted(claims), f"seed {seed}: {sorted(starts)}"
    outcomes = [(e["type"], e["step"], e["attempt"]) for e in events
                if e["type"] in ENDS]
    assert sorted(outcomes) == sorted(("AttemptSucceeded", step, 1) for step in deps), (
        f"seed {seed}: outcomes {outcomes}")

    # Nothing recorded SUCCEEDED ran again.
    succeeded: dict[str, int] = {}
    for event in events:
        step = event.get("step")
        if event["type"] == "AttemptSucceeded":
            assert step not in succeeded, f"{step} SUCCEEDED twice"
            succeeded[step] = event["attempt"]
        elif event["type"] == "AttemptClaimed":
            assert step not in succeeded, (
                f"seed {seed}: {step} SUCCEEDED (attempt {succeeded.get(step)}) and was "
                f"claimed again (attempt {event['attempt']}, seq {event['seq']})"
            )
    assert set(succeeded) == set(deps)
    for (step, attempt) in starts:
        assert attempt <= succeeded[step], (
            f"seed {seed}: {step} attempt {attempt} ran after attempt {succeeded[step]} "
            "was recorded SUCCEEDED"
        )

    # Every start of a step came after the successful end of each of its dependencies.
    for step, dep_ids in deps.items():
        won = (step, succeeded[step])
        assert won in starts and won in ends, f"{won} SUCCEEDED without its stamps"
        for dep in dep_ids:
            dep_end = ends[(dep, succeeded[dep])]
            early = [k for k, t in starts.items() if k[0] == step and t < dep_end]
            assert not early, (
                f"seed {seed}: {early} started before dependency {dep} ended ({dep_end})"
            )

    assert not step_processes(run_id), "step processes left after the run succeeded"
    assert duration < MAX_SECONDS
