"""The workloads: DAGs of shell commands, the same for every runner.

A `Workload` is one DAG (`steps`) run at `parallel` steps at a time, or, for
W6, `runs` copies of a small DAG submitted as separate runs. Runners that have
no notion of separate runs (raw, durable, make, the peers) run the union of
the copies as one DAG (`flat_steps`), at the same parallelism: the same
commands, the same dependencies, the same limit.

`ideal` is the wall time of a runner with zero overhead: W4's 64 x 0.2 s at 8
at a time is 1.6 s; `true` costs nothing ideally. The overhead per step is
`(wall - ideal) / step count`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    id: str
    command: str  # run by /bin/sh -c, as wfd runs a string command
    deps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    key: str  # "W1"
    title: str
    steps: tuple[Step, ...]  # one run's DAG
    parallel: int
    ideal: float = 0.0
    runs: int = 1  # W6: separate runs of `steps`
    clients: int = 1  # W6: client threads submitting the runs

    @property
    def step_count(self) -> int:
        return len(self.steps) * self.runs

    def flat_steps(self) -> tuple[Step, ...]:
        """All steps of all runs as one DAG (ids prefixed by the run's number)."""
        if self.runs == 1:
            return self.steps
        width = len(str(self.runs - 1))
        flat: list[Step] = []
        for r in range(self.runs):
            prefix = f"r{r:0{width}d}_"
            flat.extend(
                Step(prefix + s.id, s.command, tuple(prefix + d for d in s.deps))
                for s in self.steps
            )
        return tuple(flat)

    def label(self) -> str:
        return f"{self.key} {self.title}"


def wide(n: int, command: str = "true") -> tuple[Step, ...]:
    width = len(str(n - 1))
    return tuple(Step(f"s{i:0{width}d}", command) for i in range(n))


def chain(n: int) -> tuple[Step, ...]:
    width = len(str(n - 1))
    ids = [f"c{i:0{width}d}" for i in range(n)]
    return tuple(Step(ids[i], "true", (ids[i - 1],) if i else ()) for i in range(n))


def layered(layers: int, width: int, fan_in: int | None = None) -> tuple[Step, ...]:
    """`layers` x `width` steps; each depends on every step of the layer before
    (`fan_in` None) or on `fan_in` of them, spread over the layer."""
    lw, sw = len(str(layers - 1)), len(str(width - 1))

    def sid(layer: int, pos: int) -> str:
        return f"l{layer:0{lw}d}_s{pos:0{sw}d}"

    steps: list[Step] = []
    for layer in range(layers):
        for pos in range(width):
            if layer == 0:
                deps: tuple[str, ...] = ()
            elif fan_in is None:
                deps = tuple(sid(layer - 1, p) for p in range(width))
            else:
                picks = dict.fromkeys((pos + k * 7) % width for k in range(fan_in))
                deps = tuple(sid(layer - 1, p) for p in picks)
            steps.append(Step(sid(layer, pos), "true", deps))
    return tuple(steps)


@dataclass(frozen=True)
class Sizes:
    w1: int = 500
    w2: int = 200
    w3: tuple[int, int] = (20, 25)
    w4: tuple[int, float] = (64, 0.2)
    w5: tuple[int, int, int] = (100, 100, 3)  # layers, width, fan-in
    w6: tuple[int, int, int] = (1000, 3, 16)  # runs, chain length, client threads
    validate: int = 100_000
    recovery: tuple[int, int] = (1000, 1000)  # runs, events per run
    status_repeat: int = 20


FULL = Sizes()
QUICK = Sizes(
    w1=16, w2=8, w3=(3, 4), w4=(8, 0.1), w5=(5, 20, 3), w6=(24, 3, 4),
    validate=2000, recovery=(8, 100), status_repeat=3,
)

PARALLEL = 8


def build(sizes: Sizes) -> list[Workload]:
    n4, sleep = sizes.w4
    layers3, width3 = sizes.w3
    layers5, width5, fan5 = sizes.w5
    runs6, len6, clients6 = sizes.w6
    ideal4 = -(-n4 // PARALLEL) * sleep
    return [
        Workload("W1", f"wide {sizes.w1} x true", wide(sizes.w1), PARALLEL),
        Workload("W2", f"chain {sizes.w2} x true", chain(sizes.w2), PARALLEL),
        Workload("W3", f"layered {layers3}x{width3}, full fan-in",
                 layered(layers3, width3), PARALLEL),
        Workload("W4", f"sleepy {n4} x sleep {sleep:g}", wide(n4, f"sleep {sleep:g}"),
                 PARALLEL, ideal=ideal4),
        Workload("W5", f"big {layers5}x{width5}, fan-in {fan5}",
                 layered(layers5, width5, fan5), PARALLEL),
        Workload("W6", f"{runs6} runs x chain {len6}, {clients6} clients", chain(len6),
                 PARALLEL, runs=runs6, clients=clients6),
    ]
