"""How long `parse_workflow` takes on 100,000-step workflows (SPEC 1, 7).

Run: `python bench/bench_validate.py [--steps N] [--repeat R]`.

Two shapes: a chain (step i depends on step i-1, the deepest DAG there is)
and a wide, layered DAG (layers of 1,000 steps, each depending on three steps
of the layer before, some with retries, backoff, timeout and env). Each is
timed as the median of R runs, next to `msgspec.json.decode` of the same
bytes, which is the floor: everything above it is the validation walk,
cycle detection and building the Structs. The floor is shown twice, as is and
with the cyclic garbage collector paused (parse_workflow pauses it; with it
running, most of a plain decode's time is collections rescanning the
half-built document). Target: under 1 s per shape.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wfd.workflow import parse_workflow  # noqa: E402


def chain(n: int) -> bytes:
    steps: list[dict[str, object]] = [{"id": "s0", "command": "true"}]
    steps += [
        {"id": f"s{i}", "command": f"echo {i}", "depends_on": [f"s{i - 1}"]} for i in range(1, n)
    ]
    return msgspec.json.encode({"name": "chain", "steps": steps})


def layered(n: int, width: int = 1000, fan_in: int = 3) -> bytes:
    steps: list[dict[str, object]] = []
    for i in range(n):
        layer, pos = divmod(i, width)
        step: dict[str, object] = {"id": f"l{layer}.s{pos}", "command": ["python3", "-c", "pass"]}
        if layer:
            step["depends_on"] = [f"l{layer - 1}.s{(pos + k * 7) % width}" for k in range(fan_in)]
        if i % 10 == 0:
            step.update(
                retries=2,
                backoff={"initial": 0.5, "jitter": 0.1},
                timeout=60,
                env={"PART": str(pos)},
            )
        steps.append(step)
    return msgspec.json.encode(
        {
            "name": "layered",
            "max_parallel": 8,
            "env": {"DATA": "d"},
            "defaults": {"retries": 1, "timeout": 600, "backoff": {"max": 30}},
            "steps": steps,
        }
    )


def decode_gc_paused(data: bytes) -> object:
    gc.disable()
    try:
        return msgspec.json.decode(data)
    finally:
        gc.enable()


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    worst = 0.0
    for label, make in (("chain", chain), ("layered", layered)):
        data = make(args.steps)
        wf = parse_workflow(data, label)  # also checks the input is valid
        assert len(wf.steps) == args.steps
        full = median_time(lambda d=data, lb=label: parse_workflow(d, lb), args.repeat)
        raw = median_time(lambda d=data: msgspec.json.decode(d), args.repeat)
        raw_nogc = median_time(lambda d=data: decode_gc_paused(d), args.repeat)
        worst = max(worst, full)
        print(f"validate {args.steps}-step {label} ({len(data) / 1e6:.1f} MB): {full:.3f} s")
        print(
            f"  msgspec.json.decode alone: {raw:.3f} s"
            f" ({raw_nogc:.3f} s with the garbage collector paused, as parse_workflow does)"
        )
    print(f"target < 1 s: {'ok' if worst < 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
