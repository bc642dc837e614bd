"""Torture: SIGKILL the daemon at random moments while a layered DAG runs (issue 4, test 1).

A 4 x 6 layered DAG (every step depends on every step of the layer before)
whose steps sleep a random short time and stamp `start`/`end` lines into a
shared file. While a step runs it holds an exclusive, non-blocking flock on a
lock file of its own: a second attempt of the same step running at the same
time cannot get it and writes `OVERLAP`. The daemon is killed with SIGKILL at
random moments (also during its own recovery) at least MIN_KILLS times and
restarted on the same state dir and socket each time; then the run must
succeed with nothing doubled, nothing overlapping, nothing out of order and
nothing left running.
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
MAX_SECONDS = 60.0
SLEEP_MIN, SLEEP_MAX = 0.05, 0.4
KILL_AFTER_MAX = 0.5  # a daemon lives 0..this long after it answers before it is killed,
KILL_SOON_MAX = 0.15  # or 0..this long while the kills lag behind the run's progress
EARLY_KILLS = 0.2  # share of restarts not waited for: the next kill may come before it answers

# The step: take the step's lock or report an overlap, stamp, sleep, stamp.
STEP_PY = r"""
import fcntl, os, random, sys, time
stamps, lock_dir, lo, hi = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
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
time.sleep(random.uniform(lo, hi))
stamp(f"end {step} {attempt} {time.time():.6f}")
"""


def step_id(layer: int, index: int) -> str:
    return f"L{layer}S{index}"


def layered_workflow(root: Path) -> tuple[Path, dict[str, list[str]], Path]:
    step_py = root / "step.py"
    step_py.write_text(STEP_PY)
    stamps = root / "stamps.txt"
    locks = root / "locks"
    locks.mkdir()
    deps: dict[str, list[str]] = {}
    steps = []
    for layer in range(LAYERS):
        for index in range(WIDTH):
            sid = step_id(layer, index)
            deps[sid] = [step_id(layer - 1, j) for j in range(WIDTH)] if layer else []
            steps.append({
                "id": sid,
                "command": [sys.executable, "-I", "-S", str(step_py), str(stamps), str(locks),
                            str(SLEEP_MIN), str(SLEEP_MAX)],
                "depends_on": deps[sid],
                "kill_grace": 1,
            })
    wf = write_workflow(root, {"name": "torture", "steps": steps})
    return wf, deps, stamps


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
    while b'"RunFinished"' not in (log := events_path.read_bytes()):
        # Kill sooner while the kills lag behind the progress (MIN_KILLS and a few more by
        # two thirds of the steps), so that enough of them land before the run ends, however
        # fast this machine is.
        done = log.count(b'"AttemptSucceeded"') / len(deps)
        lagging = kills < min(1.0, 1.5 * done) * MIN_KILLS + 2
        time.sleep(rng.uniform(0.0, KILL_SOON_MAX if lagging else KILL_AFTER_MAX))
        d.kill()
        kills += 1
        assert time.monotonic() - began < MAX_SECONDS, f"seed {seed}: not done after {kills} kills"
        # Now and then the next kill may land before the daemon answers: during its start,
        # its fold of the log, or the clean-up of the previous daemon's steps.
        d.start(wait=rng.random() >= EARLY_KILLS)
    d.wait_ready()

    final = wait_until(lambda: (s := run_json(d, run_id))["state"] != "RUNNING" and s,
                       timeout=30, message="the run to end")
    duration = time.monotonic() - began
    print(f"\ntorture: seed {seed}, {kills} SIGKILLs survived, {duration:.1f} s")
    overlaps, starts, ends = parse_stamps(stamps)
    assert not overlaps, f"seed {seed}: two attempts of a step ran at once: {overlaps}"
    assert final["state"] == "SUCCEEDED", f"seed {seed}: {final}"
    assert kills >= MIN_KILLS, f"seed {seed}: the run ended after only {kills} kills"

    events = read_events(d, run_id)

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
