"""The figures that are not workloads: validation, recovery, status round trip, RSS.

- validation: `parse_workflow` (what `wfctl validate` and the daemon run) on
  a 100,000-step chain and a 100,000-step layered DAG, from
  `bench/bench_validate.py`; and `wfctl validate FILE` as a whole process
  next to `python -c pass`.
- recovery: a state dir with 1,000 runs of about 1,000 events each, written
  directly in the on-disk format (docs/events.md; the event Structs of
  `wfd.events` encode it): most runs finished, every 100th one cut short with
  a step READY, RUNNING with no pid yet, or RUNNING with a dead pid. Timed
  from spawning `wfd` to its socket answering Hello, and to READY=1 on
  $NOTIFY_SOCKET (sent after the unfinished runs are adopted again). The
  unfinished runs' steps are `true`. Each repetition starts from a fresh copy.
- status: `wfctl status` against a daemon with a few runs, next to
  `python -c pass` run by the interpreter of wfctl's shebang; medians of 20,
  interleaved.
- idle RSS: a daemon with an empty state dir, 1 s after it answers.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench.daemon import Daemon, proc_cpu, tool, vm_kb
from bench.runners import timed, workflow_json
from bench.workloads import Step, chain
from wfd import events as ev
from wfd.eventlog import Submission


@dataclass
class Figure:
    key: str
    label: str
    value: float | None = None
    unit: str = "s"
    note: str = ""
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "label": self.label, "value": self.value, "unit": self.unit,
                "note": self.note, "error": self.error, "extra": self.extra}


def _guard(fig: Figure, fn: Callable[[Figure], None]) -> Figure:
    try:
        fn(fig)
    except Exception as exc:  # a failing figure is reported, the rest goes on
        fig.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    return fig


def shebang_python(script: str) -> str:
    """The interpreter a console script runs with (its `#!` line)."""
    with open(script, "rb") as f:
        first = f.readline().decode(errors="replace")
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return sys.executable


def _python_pass(python: str) -> float:
    return timed(lambda: subprocess.run([python, "-c", "pass"], check=True))


# ---- validation --------------------------------------------------------------------


def validation(steps: int, repeat: int, work: Path) -> list[Figure]:
    from bench import bench_validate as bv
    from wfd.workflow import parse_workflow

    figures = []
    layered_data = b""
    for label, make in (("chain", bv.chain), ("layered", bv.layered)):
        fig = Figure(f"validate_{label}", f"parse_workflow, {steps:,}-step {label}")

        def measure(fig: Figure, label: str = label, make: Callable[[int], bytes] = make) -> None:
            nonlocal layered_data
            data = make(steps)
            if label == "layered":
                layered_data = data
            wf = parse_workflow(data, label)
            assert len(wf.steps) == steps
            fig.value = bv.median_time(lambda: parse_workflow(data, label), repeat)
            floor = bv.median_time(lambda: msgspec.json.decode(data), repeat)
            fig.note = f"{len(data) / 1e6:.1f} MB; msgspec.json.decode alone {floor:.3f} s"

        figures.append(_guard(fig, measure))

    cli = Figure("validate_cli", f"wfctl validate, {steps:,}-step layered file")

    def measure_cli(fig: Figure) -> None:
        path = work / "validate.json"
        path.write_bytes(layered_data or bv.layered(steps))
        wfctl = tool("wfctl")
        python = shebang_python(wfctl)
        walls, floors = [], []
        for _ in range(repeat):
            walls.append(timed(lambda: subprocess.run([wfctl, "validate", str(path)],
                                                      check=True, capture_output=True)))
            floors.append(_python_pass(python))
        fig.value = statistics.median(walls)
        fig.extra["python_pass_s"] = statistics.median(floors)
        fig.note = f"whole process; python -c pass {fig.extra['python_pass_s']:.3f} s"

    figures.append(_guard(cli, measure_cli))
    return figures


# ---- recovery ----------------------------------------------------------------------


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class _Stream:
    """Builds one run's events with consecutive seq numbers and timestamps."""

    def __init__(self, ts_prefix: str) -> None:
        self.events: list[bytes] = []
        self.prefix = ts_prefix

    def add(self, kind: type[ev.Event], **fields: object) -> None:
        n = len(self.events) + 1
        ts = f"{self.prefix}.{n * 500 % 1_000_000:06d}Z"
        self.events.append(ev.encode_line(kind(seq=n, ts=ts, **fields)))


def _run_events(run_id: str, steps: tuple[Step, ...], limit: int, finished: bool,
                interrupt_first: bool, prefix: str, uid: int, owner: str, boot: str,
                pid: int) -> list[bytes]:
    """A chain run's events in wfd's order, cut at `limit` events when not `finished`.

    With `interrupt_first`, step 0's attempt 1 was claimed and interrupted before it
    was spawned (a crash between claim and spawn), so its success is attempt 2."""
    out = _Stream(prefix)
    out.add(ev.RunCreated, run_id=run_id, name="recovery", owner=owner, owner_uid=uid)
    for i, step in enumerate(steps):
        out.add(ev.StepReady, step=step.id)
        attempt = 1
        if i == 0 and interrupt_first:
            out.add(ev.AttemptClaimed, step=step.id, attempt=1)
            out.add(ev.AttemptInterrupted, step=step.id, attempt=1, reason="daemon restarted")
            attempt = 2
        out.add(ev.AttemptClaimed, step=step.id, attempt=attempt)
        out.add(ev.AttemptStarted, step=step.id, attempt=attempt, pid=pid,
                start_time=1577836800.0, boot_id=boot)
        out.add(ev.AttemptSucceeded, step=step.id, attempt=attempt)
        if not finished and len(out.events) >= limit:
            return out.events[:limit]
    if not finished:
        raise ValueError("an unfinished run needs more steps than its event limit")
    out.add(ev.RunFinished, state="SUCCEEDED")
    return out.events


def make_state_dir(root: Path, runs: int, events_per_run: int, base_dir: Path) -> dict[str, int]:
    """Write `runs` runs of about `events_per_run` events; every 100th one unfinished.
    Returns counts: events, finished, unfinished."""
    uid = os.getuid()
    owner = pwd.getpwuid(uid).pw_name
    boot = boot_id()
    # 1 RunCreated + 4 per step + 1 RunFinished, + 2 for an interrupted claim
    n_steps = max(1, (events_per_run - 2) // 4)
    interrupt = events_per_run - 2 - 4 * n_steps >= 2
    finished_steps = chain(n_steps)
    longer = chain(n_steps + 3)  # an unfinished run is cut before its end
    wf_finished = workflow_json("recovery", finished_steps, 8).decode()
    wf_unfinished = workflow_json("recovery", longer, 8).decode()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    runs_dir = root / "runs"
    runs_dir.mkdir(parents=True, mode=0o700)
    counts = {"events": 0, "finished": 0, "unfinished": 0}
    base = 1577836800  # 2020-01-01T00:00:00Z
    encoder = msgspec.json.Encoder()
    for r in range(runs):
        t = time.gmtime(base + r)
        run_id = time.strftime("%Y%m%dT%H%M%SZ", t) + f"-{r:08x}"
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", t)
        unfinished = r % 100 == 99 or (runs < 100 and r == runs - 1)
        variant = (r // 100) % 3  # where the unfinished ones stop
        if unfinished:
            # variant 0: RUNNING with a (dead) pid; 1: READY; 2: RUNNING, not spawned yet
            limit = events_per_run - (1 if variant == 2 else 0)
            lines = _run_events(run_id, longer, limit, False, variant == 1, prefix, uid,
                                owner, boot, pid=4_190_000 + r)
        else:
            lines = _run_events(run_id, finished_steps, 0, True, interrupt, prefix, uid, owner,
                                boot, pid=4_190_000 + r)
        run_dir = runs_dir / run_id
        (run_dir / "logs").mkdir(parents=True, mode=0o700)
        sub = Submission(workflow=wf_unfinished if unfinished else wf_finished,
                         source="recovery.json", base_dir=str(base_dir), env=env, umask=0o022,
                         uid=uid, gid=os.getgid(), owner=owner,
                         submitted_at=f"{prefix}.000000Z")
        (run_dir / "workflow.json").write_bytes(encoder.encode(sub))
        (run_dir / "events.jsonl").write_bytes(b"".join(lines))
        for name in ("workflow.json", "events.jsonl"):
            os.chmod(run_dir / name, 0o600)
        run_dir.chmod(0o700)
        counts["events"] += len(lines)
        counts["unfinished" if unfinished else "finished"] += 1
    return counts


class NotifyListener:
    """A $NOTIFY_SOCKET stand-in: the perf_counter time READY=1 arrived."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.ready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set() and self.ready_at is None:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data.split(b"\n"):
                self.ready_at = time.perf_counter()

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        return self.ready_at

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def timed_start(state_dir: Path, work: Path) -> tuple[float, float, Daemon]:
    """Start a daemon on `state_dir`: (s to Hello, s to READY=1, the running daemon)."""
    notify = NotifyListener(work / f"notify-{time.monotonic_ns()}.sock")
    daemon = Daemon(8, state_dir=state_dir, notify_socket=notify.path)
    try:
        daemon.spawn()
        hello_s = daemon.wait_hello(timeout=120)
        ready_at = notify.wait(120)
        if ready_at is None:
            raise TimeoutError(f"no READY=1 within 120 s: {daemon.log_tail()}")
        return hello_s, ready_at - daemon.started_at, daemon
    except BaseException:
        daemon.stop()
        raise
    finally:
        notify.close()


def busy_until(pid: int, quiet: float = 0.5, timeout: float = 120.0) -> float:
    """Poll a process's CPU time until it has not grown for `quiet` s; the perf_counter
    time it last grew (when the daemon finished what it was doing in the background)."""
    last_cpu, last_change = proc_cpu(pid), time.perf_counter()
    deadline = last_change + timeout
    while time.perf_counter() - last_change < quiet and time.perf_counter() < deadline:
        time.sleep(0.01)
        cpu = proc_cpu(pid)
        if cpu != last_cpu:
            last_cpu, last_change = cpu, time.perf_counter()
    return last_change


def recovery(runs: int, events_per_run: int, repeat: int, work: Path) -> list[Figure]:
    empty = Figure("start_empty", "wfd start, empty state dir: to READY=1")
    idle = Figure("idle_rss", "daemon idle RSS (empty state dir, 1 s after start)", unit="MB")
    rec = Figure("recovery", "recovery: wfd start to READY=1")
    rec_hello = Figure("recovery_hello", "recovery: wfd start to answering Hello")
    rec_idle = Figure("recovery_idle", "recovery: wfd start until its CPU is idle again")

    def measure_empty(fig: Figure) -> None:
        readies, hellos = [], []
        for i in range(repeat):
            hello_s, ready_s, daemon = timed_start(work / f"empty{i}", work)
            try:
                readies.append(ready_s)
                hellos.append(hello_s)
                if i == repeat - 1:
                    time.sleep(1.0)
                    idle.value = (vm_kb(daemon.pid, "VmRSS") or 0) / 1024
                    idle.note = f"VmHWM {(vm_kb(daemon.pid, 'VmHWM') or 0) / 1024:.1f} MB"
            finally:
                daemon.stop()
            shutil.rmtree(work / f"empty{i}", ignore_errors=True)
        fig.value = statistics.median(readies)
        fig.note = f"Hello answered after {statistics.median(hellos):.3f} s"

    def measure_recovery(fig: Figure) -> None:
        template = work / "recovery-template"
        start = time.perf_counter()
        counts = make_state_dir(template, runs, events_per_run, work)
        made = time.perf_counter() - start
        readies, hellos, idles = [], [], []
        for i in range(repeat):
            state_dir = work / f"recovery{i}"
            shutil.copytree(template, state_dir, symlinks=True)
            hello_s, ready_s, daemon = timed_start(state_dir, work)
            try:
                readies.append(ready_s)
                hellos.append(hello_s)
                if i == 0:
                    states = daemon.run_states()
                    corrupt = sum(s == "CORRUPT" for s in states.values())
                    if len(states) != runs or corrupt:
                        raise RuntimeError(f"{len(states)} runs loaded, {corrupt} CORRUPT: "
                                           f"{daemon.log_tail(2)}")
                idles.append(busy_until(daemon.pid) - daemon.started_at)
                if i == 0:
                    corrupt = sum(s == "CORRUPT" for s in daemon.run_states().values())
                    if corrupt:
                        raise RuntimeError(f"{corrupt} runs CORRUPT after background checks")
            finally:
                daemon.stop()
            shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(template, ignore_errors=True)
        fig.value = statistics.median(readies)
        fig.extra.update({k: float(v) for k, v in counts.items()})
        fig.note = (f"{counts['events']:,} events in {runs:,} runs "
                    f"({counts['unfinished']} unfinished, resumed); written in {made:.1f} s")
        rec_hello.value = statistics.median(hellos)
        rec_idle.value = statistics.median(idles)
        rec_idle.note = ("everything the daemon does after READY included: resumed runs, "
                         "logs folded or checked in the background")

    _guard(empty, measure_empty)
    if empty.error and idle.value is None:
        idle.error = empty.error
    _guard(rec, measure_recovery)
    if rec.error:
        rec_hello.error = rec_idle.error = rec.error
    return [empty, idle, rec_hello, rec, rec_idle]


# ---- status round trip -------------------------------------------------------------


def status_round_trip(repeat: int, work: Path) -> list[Figure]:
    fig = Figure("status", "wfctl status round trip")
    floor = Figure("python_pass", "python -c pass, wfctl's interpreter")

    def measure(fig: Figure) -> None:
        path = work / "status.json"
        path.write_bytes(workflow_json("status", chain(3), 8))
        wfctl = tool("wfctl")
        python = shebang_python(wfctl)
        with Daemon(8) as daemon:
            for _ in range(5):
                done = daemon.wfctl("run", str(path), "--wait")
                if done.returncode != 0:
                    raise RuntimeError(f"wfctl run: {done.stderr.decode().strip()}")
            argv = [wfctl, "--socket", daemon.socket, "status"]
            subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
            _python_pass(python)
            walls, floors = [], []
            for _ in range(repeat):
                walls.append(timed(lambda: subprocess.run(argv, check=True, capture_output=True)))
                floors.append(_python_pass(python))
        fig.value = statistics.median(walls)
        floor.value = statistics.median(floors)
        fig.note = f"5 runs listed; {fig.value / floor.value:.2f}x python -c pass"
        floor.note = python

    _guard(fig, measure)
    if fig.error:
        floor.error = fig.error
    return [fig, floor]
