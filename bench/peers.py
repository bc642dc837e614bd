"""The peers: GNU make, doit, Snakemake and Luigi, each given the same DAG.

make is the system's; doit, Snakemake and Luigi go into a bench-only venv,
`bench/.venv` (made with `python -m venv` and `pip install doit snakemake
luigi` the first time a peer is asked for; they are not dependencies of wfd).
Each peer gets generated input in a fresh directory, runs the workload's
commands at the workload's parallelism, and is timed from its process start
to its exit, so its own start-up counts, as `wfctl`'s does for wfd.

How each one runs a step:
- make: a phony target per step, `make -s -jN`. make execs a recipe without a
  shell when it has no shell metacharacters (`true`, `sleep 0.2`).
- doit: one sub-task per step with `task_dep`, a string action (a shell),
  `doit -n N -P thread`; its dep db is removed before each repetition.
- Snakemake: one wildcard rule, `output: touch(...)` (Snakemake creates the
  file a step needs for its dependency bookkeeping), `shell: "{params.cmd}"`,
  `--cores N`; outputs are removed before each repetition.
- Luigi: one Task class with `requires()` for the dependencies, `run()`
  calls `subprocess.run(cmd, shell=True)` and writes its output target;
  `luigi.build(workers=N, local_scheduler=True)` (a process per running task).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.workloads import Step

BENCH_DIR = Path(__file__).resolve().parent
VENV = BENCH_DIR / ".venv"
PEER_PACKAGES = ("doit", "snakemake", "luigi")
PEER_TIMEOUT = 1800.0  # s per invocation

_venv_state: tuple[Path | None, str] | None = None


def venv_python() -> tuple[Path | None, str]:
    """The bench venv's python with the peers installed, or (None, why not)."""
    global _venv_state
    if _venv_state is None:
        _venv_state = _make_venv()
    return _venv_state


def _has_peers(python: Path) -> bool:
    code = "import doit, snakemake, luigi"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def _make_venv() -> tuple[Path | None, str]:
    python = VENV / "bin" / "python"
    if python.exists() and _has_peers(python):
        return python, "ready"
    print(f"bench: installing {', '.join(PEER_PACKAGES)} into {VENV} (once)", file=sys.stderr,
          flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True,
                           capture_output=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES],
                       check=True, capture_output=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
        return None, f"bench venv install failed: {last[0][:120]}"
    if not _has_peers(python):
        return None, "bench venv: peers installed but not importable"
    return python, "installed"


def peer_version(python: Path, module: str) -> str:
    code = (f"import importlib.metadata as m; print(m.version({module!r}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def run_timed(argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
              timeout: float = PEER_TIMEOUT) -> float:
    """Run a peer to its exit in its own session; wall seconds. Raises RuntimeError with
    the tail of its output when it fails; kills its whole session on timeout."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    wall = time.perf_counter() - start
    try:  # a peer's stray children must not outlive the measurement
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)[:300]}")
    return wall


def _steps_json(steps: Sequence[Step], work: Path) -> None:
    data = [{"id": s.id, "command": s.command, "deps": list(s.deps)} for s in steps]
    (work / "steps.json").write_text(json.dumps(data))


# ---- make --------------------------------------------------------------------------


def make_prepare(steps: Sequence[Step], work: Path) -> None:
    lines = [".PHONY: all " + " ".join(s.id for s in steps), "",
             "all: " + " ".join(s.id for s in steps), ""]
    for s in steps:
        lines += [f"{s.id}: {' '.join(s.deps)}".rstrip(), f"\t@{s.command}", ""]
    (work / "Makefile").write_text("\n".join(lines))


def make_argv(parallel: int) -> list[str]:
    return ["make", "-s", f"-j{parallel}", "-f", "Makefile", "all"]


def make_available() -> str | None:
    return None if shutil.which("make") else "make is not installed"


# ---- doit --------------------------------------------------------------------------

DODO = '''\
import json

DOIT_CONFIG = {"verbosity": 0}
STEPS = json.load(open("steps.json"))


def task_s():
    for s in STEPS:
        yield {"name": s["id"], "actions": [s["command"]],
               "task_dep": ["s:" + d for d in s["deps"]], "verbosity": 0}
'''


def doit_prepare(steps: Sequence[Step], work: Path) -> None:
    _steps_json(steps, work)
    (work / "dodo.py").write_text(DODO)


def doit_reset(work: Path) -> None:
    for p in work.glob(".doit.db*"):
        p.unlink()


def doit_argv(python: Path, parallel: int) -> list[str]:
    return [str(python), "-m", "doit", "-f", "dodo.py", "--db-file", ".doit.db",
            "-n", str(parallel), "-P", "thread"]


# ---- Snakemake ---------------------------------------------------------------------

SNAKEFILE = '''\
import json

STEPS = {s["id"]: s for s in json.load(open("steps.json"))}

wildcard_constraints:
    s="[A-Za-z0-9_.-]+"

rule all:
    input: expand("out/{s}", s=list(STEPS))

rule step:
    output: touch("out/{s}")
    input: lambda wc: ["out/" + d for d in STEPS[wc.s]["deps"]]
    params: cmd=lambda wc: STEPS[wc.s]["command"]
    shell: "{params.cmd}"
'''


def snakemake_prepare(steps: Sequence[Step], work: Path) -> None:
    _steps_json(steps, work)
    (work / "Snakefile").write_text(SNAKEFILE)


def snakemake_reset(work: Path) -> None:
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.rmtree(work / ".snakemake", ignore_errors=True)


def snakemake_argv(python: Path, parallel: int) -> list[str]:
    snakemake = python.parent / "snakemake"
    # `--quiet all`: no progress output at all; the target is the first rule, `all`.
    return [str(snakemake), "--snakefile", "Snakefile", "--cores", str(parallel),
            "--quiet", "all"]


# ---- Luigi -------------------------------------------------------------------------

LUIGI = '''\
import json
import os
import subprocess
import sys

import luigi

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {s["id"]: s for s in json.load(open(os.path.join(HERE, "steps.json")))}


class Step(luigi.Task):
    sid = luigi.Parameter()

    def requires(self):
        return [Step(sid=d) for d in STEPS[self.sid]["deps"]]

    def output(self):
        return luigi.LocalTarget(os.path.join(HERE, "out", self.sid))

    def run(self):
        subprocess.run(STEPS[self.sid]["command"], shell=True, check=True)
        with self.output().open("w"):
            pass


class All(luigi.WrapperTask):
    def requires(self):
        return [Step(sid=s) for s in STEPS]


if __name__ == "__main__":
    ok = luigi.build([All()], workers=int(sys.argv[1]), local_scheduler=True,
                     log_level="WARNING")
    sys.exit(0 if ok else 1)
'''


def luigi_prepare(steps: Sequence[Step], work: Path) -> None:
    _steps_json(steps, work)
    (work / "luigi_steps.py").write_text(LUIGI)
    (work / "out").mkdir(exist_ok=True)


def luigi_reset(work: Path) -> None:
    shutil.rmtree(work / "out", ignore_errors=True)
    (work / "out").mkdir()


def luigi_argv(python: Path, parallel: int) -> list[str]:
    return [str(python), "luigi_steps.py", str(parallel)]
