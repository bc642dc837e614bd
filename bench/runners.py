"""The runners: how each one runs a workload and what is timed.

Every runner gets a fresh work dir per workload and returns a `Result`: the
wall seconds of each repetition (the median is reported), or why it was
skipped or failed. A runner that cannot run a workload says why.
"""

from __future__ import annotations

import itertools
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from bench import floor, peers
from bench.daemon import Daemon, RssSampler, proc_cpu, vm_kb
from bench.workloads import Step, Workload

BIG_PEER_STEPS = 2000  # Snakemake and Luigi skip workloads larger than this without --big-peers


@dataclass
class Result:
    workload: Workload
    runner: str
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # engine CPU s per repetition, if known
    skipped: str | None = None
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.error is None and bool(self.walls)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def overhead_ms(self) -> float:
        return (self.wall - self.workload.ideal) / self.workload.step_count * 1000

    @property
    def cpu_ms(self) -> float | None:
        """The engine's own CPU time per step (not the steps'), median; None if unknown."""
        if not self.cpus:
            return None
        return statistics.median(self.cpus) / self.workload.step_count * 1000

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "workload": self.workload.key, "title": self.workload.title, "runner": self.runner,
            "steps": self.workload.step_count, "ideal_s": self.workload.ideal,
            "walls_s": self.walls, "engine_cpu_s": self.cpus, "skipped": self.skipped,
            "error": self.error,
            "extra": self.extra, "note": self.note,
        }
        if self.ok:
            out["wall_s"] = self.wall
            out["overhead_ms_per_step"] = self.overhead_ms
            out["engine_cpu_ms_per_step"] = self.cpu_ms
        return out


@dataclass
class Options:
    repeat: int
    big_peers: bool = False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def self_cpu() -> float:
    """CPU seconds of this process, every thread (not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (a wfctl; not the daemon's steps)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Runner:
    """Base: `measure` calls `prepare` once, then `reset` + a timed `run_once` per repeat."""

    name = "?"
    description = ""
    in_process = False  # the engine is this process: its CPU time is the engine's

    def unavailable(self, wl: Workload, opts: Options) -> str | None:
        """Why this runner cannot or will not run `wl`; None if it will."""
        return None

    def measure(self, wl: Workload, work: Path, opts: Options) -> Result:
        result = Result(wl, self.name)
        why = self.unavailable(wl, opts)
        if why is not None:
            result.skipped = why
            return result
        try:
            self.prepare(wl, work, result)
            for _ in range(opts.repeat):
                self.reset(work)
                cpu = self_cpu()
                result.walls.append(self.run_once(wl, work))
                if self.in_process:
                    result.cpus.append(self_cpu() - cpu)
        except Exception as exc:  # one runner failing must not stop the table
            result.error = _one_line(exc)
        return result

    def prepare(self, wl: Workload, work: Path, result: Result) -> None:
        pass

    def reset(self, work: Path) -> None:
        pass

    def run_once(self, wl: Workload, work: Path) -> float:
        raise NotImplementedError


class Raw(Runner):
    name = "raw"
    description = "Python threads + subprocess.run, nothing persisted"
    in_process = True

    def run_once(self, wl: Workload, work: Path) -> float:
        steps = wl.flat_steps()
        return timed(lambda: floor.run_raw(steps, wl.parallel))


class DurableRunner(Runner):
    in_process = True

    def __init__(self, variant: floor.Durable) -> None:
        self.variant = variant
        self.name = variant.name
        self.description = "raw + 3 fsync'd events per step: " + variant.describe()

    def reset(self, work: Path) -> None:
        shutil.rmtree(work / "durable", ignore_errors=True)

    def run_once(self, wl: Workload, work: Path) -> float:
        steps = wl.flat_steps()
        return timed(lambda: floor.run_durable(steps, wl.parallel, self.variant,
                                               work / "durable"))


class Make(Runner):
    name = "make"
    description = "GNU make -j8, a phony target per step"

    def unavailable(self, wl: Workload, opts: Options) -> str | None:
        return peers.make_available()

    def prepare(self, wl: Workload, work: Path, result: Result) -> None:
        peers.make_prepare(wl.flat_steps(), work)
        if wl.runs > 1:
            result.note = f"one DAG of {wl.step_count} steps"

    def run_once(self, wl: Workload, work: Path) -> float:
        return peers.run_timed(peers.make_argv(wl.parallel), work)


class VenvPeer(Runner):
    """doit, Snakemake, Luigi: from the bench venv."""

    big = False  # slow per step: skip workloads over BIG_PEER_STEPS unless --big-peers
    module = ""

    def unavailable(self, wl: Workload, opts: Options) -> str | None:
        if self.big and wl.step_count > BIG_PEER_STEPS and not opts.big_peers:
            return (f"skipped: {wl.step_count:,} steps at its 10-20 ms/step take minutes "
                    "per repetition (--big-peers runs it)")
        python, why = peers.venv_python()
        return None if python is not None else why

    @property
    def python(self) -> Path:
        python, _ = peers.venv_python()
        assert python is not None
        return python

    def prepare(self, wl: Workload, work: Path, result: Result) -> None:
        self.write_inputs(wl.flat_steps(), work)
        if wl.runs > 1:
            result.note = f"one DAG of {wl.step_count} steps"

    def write_inputs(self, steps: Sequence[Step], work: Path) -> None:
        raise NotImplementedError


class Doit(VenvPeer):
    name = "doit"
    description = "doit -n 8 -P thread, a sub-task per step"
    module = "doit"

    def write_inputs(self, steps: Sequence[Step], work: Path) -> None:
        peers.doit_prepare(steps, work)

    def reset(self, work: Path) -> None:
        peers.doit_reset(work)

    def run_once(self, wl: Workload, work: Path) -> float:
        return peers.run_timed(peers.doit_argv(self.python, wl.parallel), work)


class Snakemake(VenvPeer):
    name = "snakemake"
    description = "snakemake --cores 8, one wildcard rule"
    module = "snakemake"
    big = True

    def write_inputs(self, steps: Sequence[Step], work: Path) -> None:
        peers.snakemake_prepare(steps, work)

    def reset(self, work: Path) -> None:
        peers.snakemake_reset(work)

    def run_once(self, wl: Workload, work: Path) -> float:
        return peers.run_timed(peers.snakemake_argv(self.python, wl.parallel), work)


class Luigi(VenvPeer):
    name = "luigi"
    description = "luigi.build(workers=8, local_scheduler=True)"
    module = "luigi"
    big = True

    def write_inputs(self, steps: Sequence[Step], work: Path) -> None:
        peers.luigi_prepare(steps, work)

    def reset(self, work: Path) -> None:
        peers.luigi_reset(work)

    def run_once(self, wl: Workload, work: Path) -> float:
        return peers.run_timed(peers.luigi_argv(self.python, wl.parallel), work)


# ---- wfd ---------------------------------------------------------------------------


def workflow_json(name: str, steps: Sequence[Step], parallel: int) -> bytes:
    out = []
    for s in steps:
        step: dict[str, object] = {"id": s.id, "command": s.command}
        if s.deps:
            step["depends_on"] = list(s.deps)
        out.append(step)
    return msgspec.json.encode({"name": name, "max_parallel": parallel, "steps": out})


def _check(done: subprocess.CompletedProcess[bytes], what: str) -> str:
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()[-2:]
        raise RuntimeError(f"{what}: exit {done.returncode}: {' | '.join(err)}")
    return done.stdout.decode().strip()


class Wfd(Runner):
    name = "wfd"
    description = "wfd --max-parallel 8; wfctl run FILE --wait, timed around the client"

    def measure(self, wl: Workload, work: Path, opts: Options) -> Result:
        result = Result(wl, self.name)
        path = work / f"{wl.key.lower()}.json"
        path.write_bytes(workflow_json(wl.key, wl.steps, wl.parallel))
        try:
            if wl.runs > 1:
                self._many_runs(wl, path, opts, result)
            elif wl.key == "W5":
                self._big(path, opts, result)
            else:
                with Daemon(wl.parallel) as daemon:
                    if wl.key == "W4":
                        result.extra["client_s"] = client_startup(daemon, work, opts.repeat)
                    for _ in range(opts.repeat):
                        cpu = proc_cpu(daemon.pid) + children_cpu()
                        result.walls.append(timed(
                            lambda d=daemon: _check(d.wfctl("run", str(path), "--wait"),
                                                    "wfctl run --wait")))
                        result.cpus.append(proc_cpu(daemon.pid) + children_cpu() - cpu)
                    result.extra["daemon_rss_mb"] = (vm_kb(daemon.pid, "VmHWM") or 0) / 1024
        except Exception as exc:
            result.error = _one_line(exc)
        return result

    def _big(self, path: Path, opts: Options, result: Result) -> None:
        """W5: a fresh daemon per repetition, so its peak RSS is that of one big run."""
        submits, peaks = [], []
        for _ in range(opts.repeat):
            with Daemon(result.workload.parallel) as daemon, RssSampler(daemon.pid) as rss:
                cpu = proc_cpu(daemon.pid) + children_cpu()
                start = time.perf_counter()
                run_id = _check(daemon.wfctl("run", str(path)), "wfctl run")
                submits.append(time.perf_counter() - start)
                state = daemon.wait_run(run_id)
                result.walls.append(time.perf_counter() - start)
                result.cpus.append(proc_cpu(daemon.pid) + children_cpu() - cpu)
                if state != "SUCCEEDED":
                    raise RuntimeError(f"run {run_id} ended {state}")
                hwm = vm_kb(daemon.pid, "VmHWM") or 0
            peaks.append(max(rss.peak_kb, hwm) / 1024)
        result.extra["submit_s"] = statistics.median(submits)
        result.extra["peak_rss_mb"] = max(peaks)
        result.note = (f"submit {result.extra['submit_s']:.3f} s, "
                       f"peak RSS {result.extra['peak_rss_mb']:.0f} MB")

    def _many_runs(self, wl: Workload, path: Path, opts: Options, result: Result) -> None:
        """W6: `wl.clients` threads, each submitting runs over the socket (as `wfctl run
        --wait` does: Submit, then Watch on the same connection) until `wl.runs` are in."""
        data = path.read_bytes()
        lost_total = 0
        with Daemon(wl.parallel) as daemon:
            for _ in range(opts.repeat):
                run_ids: list[str] = []
                problems: list[str] = []
                counter = itertools.count()
                lock = threading.Lock()

                def client(d: Daemon = daemon, ids: list[str] = run_ids,
                           probs: list[str] = problems, count: itertools.count = counter,
                           mutex: threading.Lock = lock) -> None:
                    while True:
                        with mutex:
                            if next(count) >= wl.runs:
                                return
                        try:
                            sock, run_id = d.submit(data, path.name, str(path.parent))
                            with mutex:
                                ids.append(run_id)
                            state = d.wait_run(run_id, sock)
                            if state != "SUCCEEDED":
                                with mutex:
                                    probs.append(f"{run_id} {state}")
                        except Exception as exc:
                            with mutex:
                                probs.append(_one_line(exc))

                threads = [threading.Thread(target=client) for _ in range(wl.clients)]
                cpu = proc_cpu(daemon.pid)  # the clients are this process: not counted
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                result.walls.append(time.perf_counter() - start)
                result.cpus.append(proc_cpu(daemon.pid) - cpu)
                states = daemon.run_states()
                succeeded = sum(states.get(r) == "SUCCEEDED" for r in run_ids)
                lost_total += wl.runs - succeeded
                if problems:
                    raise RuntimeError(f"{len(problems)} client problem(s): {problems[0]}")
        result.extra["runs_per_s"] = wl.runs / statistics.median(result.walls)
        result.extra["not_succeeded"] = lost_total
        result.note = (f"{result.extra['runs_per_s']:.1f} runs/s; "
                       + ("all SUCCEEDED" if lost_total == 0
                          else f"{lost_total} run(s) not SUCCEEDED"))


def client_startup(daemon: Daemon, work: Path, repeat: int) -> float:
    """Median wall of `wfctl run --wait` of a one-step `true` workflow: the client's own
    start-up and round trip, which W4's target allows on top of the ideal 1.6 s."""
    path = work / "one.json"
    path.write_bytes(workflow_json("one", [Step("only", "true")], 1))
    walls = [timed(lambda: _check(daemon.wfctl("run", str(path), "--wait"), "wfctl run"))
             for _ in range(max(5, repeat))]
    return statistics.median(walls)


def all_runners() -> list[Runner]:
    runners: list[Runner] = [Raw()]
    runners += [DurableRunner(v) for v in floor.DURABLE_VARIANTS]
    runners += [Wfd(), Make(), Doit(), Snakemake(), Luigi()]
    return runners


def select(names: Sequence[str] | None) -> list[Runner]:
    """Runners by name, in table order; a name also selects its variants (`durable`
    selects `durable`, `durable-nogc`, `durable-nolog` and `durable-nogc-nolog`)."""
    runners = all_runners()
    if names is None:
        return runners
    chosen: set[str] = set()
    for name in names:
        matches = {r.name for r in runners if r.name == name or r.name.startswith(name + "-")}
        if not matches:
            known = ", ".join(r.name for r in runners)
            raise ValueError(f"unknown runner {name!r} (known: {known})")
        chosen |= matches
    return [r for r in runners if r.name in chosen]
