"""`python -m bench`: run the workloads on the runners, print the tables.

Progress goes to stderr, the tables to stdout. Every workload gets a fresh
temporary work dir (removed afterwards); every daemon is stopped in a
`finally`, and SIGTERM/SIGHUP unwind the same way Ctrl-C does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench import extras, report, runners, workloads
from bench.runners import Options, Result

EXTRAS = ("validate", "recovery", "status")  # `recovery` also measures start-up and idle RSS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="wfd against a raw subprocess floor, a durable floor and its peers.",
    )
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per cell (median)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    ap.add_argument("--only", help="comma-separated workloads and figures: "
                    "W1..W6, validate, recovery, status (default: all)")
    ap.add_argument("--runners", help="comma-separated runners (default: all): raw, durable "
                    "(and its variants durable-nogc, durable-nolog, durable-nogc-nolog), "
                    "wfd, make, doit, snakemake, luigi")
    ap.add_argument("--big-peers", action="store_true",
                    help="also run Snakemake and Luigi on W5 and W6 (takes long)")
    ap.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def cpu_snapshot() -> tuple[float, float, float]:
    """(machine busy CPU s, machine total CPU s, this process + reaped children CPU s)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    me = sum(resource.getrusage(who)[i] for who in (resource.RUSAGE_SELF,
             resource.RUSAGE_CHILDREN) for i in (0, 1))
    return busy / hz, sum(ticks[:8]) / hz, me


def others_cpu(start: tuple[float, float, float]) -> tuple[float, float]:
    """CPU seconds the rest of the machine used since `start` (the bench's own processes,
    daemons and steps included, are all reaped children by now), and the machine's total."""
    end = cpu_snapshot()
    return max(0.0, (end[0] - start[0]) - (end[2] - start[2])), end[1] - start[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    sizes = workloads.QUICK if args.quick else workloads.FULL
    only = {x.strip() for x in args.only.split(",")} if args.only else None
    all_wl = workloads.build(sizes)
    known = {w.key for w in all_wl} | set(EXTRAS)
    if only and not only <= known:
        print(f"bench: unknown in --only: {', '.join(sorted(only - known))} "
              f"(known: {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    try:
        chosen = runners.select(args.runners.split(",") if args.runners else None)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    selected = [w for w in all_wl if only is None or w.key in only]
    opts = Options(repeat=args.repeat, big_peers=args.big_peers)

    started = time.perf_counter()
    start_date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0]
    cpu_start = cpu_snapshot()
    results: list[Result] = []
    figures: list[extras.Figure] = []
    root = Path(tempfile.mkdtemp(prefix="wfd-bench-"))
    try:
        for wl in selected:
            for runner in chosen:
                work = root / f"{wl.key}-{runner.name}"
                work.mkdir()
                progress(f"{wl.label()}: {runner.name} ({wl.step_count} steps)")
                result = runner.measure(wl, work, opts)
                results.append(result)
                shutil.rmtree(work, ignore_errors=True)
                if result.ok:
                    progress(f"  {result.wall:.3f} s, {result.overhead_ms:.2f} ms/step")
                else:
                    progress(f"  {result.skipped or 'ERROR ' + str(result.error)}")
        extras_root = root / "extras"
        extras_root.mkdir()
        if only is None or "validate" in only:
            progress(f"validation of {sizes.validate:,} steps")
            figures += extras.validation(sizes.validate, args.repeat, extras_root)
        if only is None or "recovery" in only:
            runs, per_run = sizes.recovery
            progress(f"daemon start, idle RSS, recovery of {runs * per_run:,} events")
            figures += extras.recovery(runs, per_run, args.repeat, extras_root)
        if only is None or "status" in only:
            progress(f"wfctl status round trip (median of {sizes.status_repeat})")
            figures += extras.status_round_trip(sizes.status_repeat, extras_root)
    except KeyboardInterrupt:
        progress("interrupted; printing what was measured")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"wfd bench, started {start_date}, "
          f"{'quick sizes, ' if args.quick else ''}median of {args.repeat}, "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"machine: {report.machine()}; load average {load:.2f} at the start")
    print("ovh ms/step = (wall - ideal) / steps; x floor = wall / `durable` wall "
          "(group commit + a log file per step);")
    print("cpu ms/step = the engine's own CPU time per step, not the steps' (raw, durable: "
          "the bench process; wfd: daemon + wfctl; W6: daemon only)")
    other, machine_cpu = others_cpu(cpu_start)
    print(f"CPU time used by other processes while the bench ran: {other:.0f} s of the "
          f"machine's {machine_cpu:.0f} s ({other / max(machine_cpu, 1e-9) * 100:.0f}%)"
          + ("; wall times may be inflated" if other > 0.05 * machine_cpu else ""))
    print()
    if results:
        print(report.workload_table(results))
        print()
    if figures:
        print(report.figures_table(figures))
        print()
    items = report.targets(results, figures)
    print("targets (issue 6)" + (" - quick sizes, not meaningful" if args.quick else ""))
    print(report.targets_table(items))
    if args.json:
        data = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": report.machine(), "quick": args.quick, "repeat": args.repeat,
            "results": [r.to_json() for r in results],
            "figures": [f.to_json() for f in figures],
            "targets": [{"target": t.text, "figure": t.figure, "verdict": t.verdict}
                        for t in items],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0
