"""Where a workload's time goes in the daemon: `python -m bench.profile W1`.

Starts a private daemon, runs the workload once to warm up, then runs it
`--repeat` times under `py-spy record` attached to the daemon (py-spy is not
a dependency: `pip install py-spy` into the interpreter that runs this), and
prints the daemon's CPU time next to the wall time, and the functions with the
most samples, by own time and including callees. Every thread is sampled; a
thread waiting (in epoll, in a lock) is not counted unless `--idle`.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench import workloads
from bench.daemon import Daemon, proc_cpu, short_tmpdir
from bench.runners import workflow_json


def short(frame: str) -> str:
    """`fn (/long/path/wfd/engine.py:123)` -> `fn (wfd/engine.py:123)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = Path(path).parts
    keep = "/".join(parts[-2:]) if parts else where
    return f"{name} ({keep}:{line})" if line else f"{name} ({keep})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    ap.add_argument("workload", choices=["W1", "W2", "W3", "W4", "W5"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--idle", action="store_true", help="count waiting threads too")
    ap.add_argument("--raw", help="keep py-spy's collapsed stacks in this file")
    args = ap.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench.profile: py-spy not found; pip install py-spy", file=sys.stderr)
        return 2
    wl = next(w for w in workloads.build(workloads.FULL) if w.key == args.workload)
    work = short_tmpdir("wfdp-")
    raw = Path(args.raw) if args.raw else work / "stacks.txt"
    try:
        path = work / "wf.json"
        path.write_bytes(workflow_json(wl.key, wl.steps, wl.parallel))
        with Daemon(wl.parallel) as daemon:
            daemon.wfctl("run", str(path), "--wait")  # warm-up
            spy_argv = [py_spy, "record", "-p", str(daemon.pid), "-r", str(args.rate),
                        "-f", "raw", "-o", str(raw), "--threads", "--nonblocking"]
            if args.idle:
                spy_argv.append("--idle")
            spy = subprocess.Popen(spy_argv, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)  # let py-spy attach
                cpu0, start = proc_cpu(daemon.pid), time.perf_counter()
                walls = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    done = daemon.wfctl("run", str(path), "--wait")
                    walls.append(time.perf_counter() - t)
                    if done.returncode != 0:
                        raise RuntimeError(done.stderr.decode(errors="replace"))
                elapsed, cpu = time.perf_counter() - start, proc_cpu(daemon.pid) - cpu0
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
    finally:
        if not args.raw:
            stacks = raw.read_text() if raw.exists() else ""
        shutil.rmtree(work, ignore_errors=True)
    if args.raw:
        stacks = raw.read_text()
    steps = wl.step_count * args.repeat
    print(f"{wl.label()}: {args.repeat} runs, wall per run "
          + ", ".join(f"{w:.3f}" for w in walls) + " s")
    print(f"daemon CPU {cpu:.2f} s in {elapsed:.2f} s wall "
          f"= {cpu / steps * 1000:.2f} ms CPU per step")
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        print("no samples")
        return 1
    print(f"\n{total} samples; own time:")
    for frame, n in own.most_common(args.top):
        print(f"  {n / total * 100:5.1f}%  {frame}")
    print("\nincluding callees:")
    for frame, n in incl.most_common(args.top):
        print(f"  {n / total * 100:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
