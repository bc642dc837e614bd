"""Printing: the workload x runner table, the other figures, and the targets.

Targets are the ones of issue 6 (also in bench/README.md). Each is PASS or
MISS from figures of this invocation, or n/a when a figure it needs was not
measured (a runner or figure not selected, or one that failed).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bench.extras import Figure
from bench.runners import Result

FLOOR = "durable"


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = "?"
    if shutil.which("df"):
        done = subprocess.run(["df", "-T", "/tmp"], capture_output=True, text=True)
        rows = done.stdout.split("\n")
        if len(rows) > 1 and rows[1].split():
            fs = rows[1].split()[1]
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"/tmp on {fs}, Python {platform.python_version()}")


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def workload_table(results: Sequence[Result]) -> str:
    floors = {r.workload.key: r.wall for r in results if r.runner == FLOOR and r.ok}
    header = ("workload", "runner", "wall s", "min s", "ovh ms/step", "x floor",
              "cpu ms/step", "note")
    rows: list[tuple[str, ...]] = []
    last = None
    for r in results:
        label = r.workload.label() if r.workload.key != last else ""
        last = r.workload.key
        if not r.ok:
            rows.append((label, r.runner, "-", "-", "-", "-", "-",
                         r.skipped or f"ERROR {r.error}"))
            continue
        floor = floors.get(r.workload.key)
        ratio = f"{r.wall / floor:.2f}" if floor else "-"
        cpu = "-" if r.cpu_ms is None else _fmt(r.cpu_ms, 2)
        rows.append((label, r.runner, _fmt(r.wall), _fmt(min(r.walls)),
                     _fmt(r.overhead_ms, 2), ratio, cpu, r.note))
    return _table(header, rows, right={2, 3, 4, 5, 6})


def figures_table(figures: Sequence[Figure]) -> str:
    header = ("figure", "value", "note")
    rows = []
    for f in figures:
        if f.error:
            rows.append((f.label, "-", f"ERROR {f.error}"))
        elif f.value is None:
            rows.append((f.label, "-", f.note))
        else:
            value = f"{f.value:.1f} {f.unit}" if f.unit == "MB" else f"{f.value:.3f} {f.unit}"
            rows.append((f.label, value, f.note))
    return _table(header, rows, right={1})


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    widths[-1] = len(header[-1])  # the last column (notes) is not padded

    def line(row: Sequence[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths[:-1]) + "  " + "-" * 4
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# ---- targets -----------------------------------------------------------------------


@dataclass
class Target:
    text: str
    figure: str
    ok: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "MISS")


def targets(results: Sequence[Result], figures: Sequence[Figure]) -> list[Target]:
    by = {(r.workload.key, r.runner): r for r in results if r.ok}
    fig = {f.key: f for f in figures if f.error is None and f.value is not None}
    out: list[Target] = []

    def wall(key: str, runner: str) -> float | None:
        r = by.get((key, runner))
        return r.wall if r else None

    for key in ("W1", "W3", "W2"):
        w, floor = wall(key, "wfd"), wall(key, FLOOR)
        out.append(Target(
            f"{key}: wfd <= 1.3x durable floor",
            f"{w:.3f} s / {floor:.3f} s = {w / floor:.2f}x" if w and floor else "-",
            None if not (w and floor) else w <= 1.3 * floor))
        if key != "W2":
            d = wall(key, "doit")
            out.append(Target(
                f"{key}: wfd <= doit (threads)",
                f"{w:.3f} s vs {d:.3f} s" if w and d else "-",
                None if not (w and d) else w <= d))

    w4 = by.get(("W4", "wfd"))
    if w4 is not None and "client_s" in w4.extra:
        bound = w4.workload.ideal + w4.extra["client_s"]
        out.append(Target(
            f"W4: wfd within 5% of {w4.workload.ideal:g} s + client start-up",
            f"{w4.wall:.3f} s vs {bound:.3f} s ({w4.extra['client_s']:.3f} s client) "
            f"= +{(w4.wall / bound - 1) * 100:.1f}%",
            w4.wall <= 1.05 * bound))
    else:
        out.append(Target("W4: wfd within 5% of ideal + client start-up", "-", None))

    w5 = by.get(("W5", "wfd"))
    out.append(Target("W5: submit < 1 s",
                      f"{w5.extra['submit_s']:.3f} s" if w5 else "-",
                      None if w5 is None else w5.extra["submit_s"] < 1.0))
    out.append(Target("W5: daemon peak RSS < 200 MB",
                      f"{w5.extra['peak_rss_mb']:.0f} MB" if w5 else "-",
                      None if w5 is None else w5.extra["peak_rss_mb"] < 200))

    w6 = by.get(("W6", "wfd"))
    if w6 is not None:
        runs = w6.workload.runs
        lost = int(w6.extra["not_succeeded"])
        out.append(Target(f"W6: all {runs} runs SUCCEEDED, none lost",
                          f"{runs - lost}/{runs} per repetition; {w6.extra['runs_per_s']:.1f} "
                          "runs/s", lost == 0))
    else:
        out.append(Target("W6: all runs SUCCEEDED, none lost", "-", None))

    for peer in ("snakemake", "luigi"):
        ratios, floor_ratios = [], []
        for key in ("W1", "W2", "W3"):
            w, p, f = by.get((key, "wfd")), by.get((key, peer)), by.get((key, FLOOR))
            if w and p:
                ratios.append((p.overhead_ms / w.overhead_ms, key))
                if f:
                    floor_ratios.append(f"{p.overhead_ms / f.overhead_ms:.1f}x")
        if ratios:
            worst = min(ratios)
            shown = ", ".join(f"{k} {x:.1f}x" for x, k in ratios)
            if len(floor_ratios) == len(ratios):
                shown += f" (the durable floor: {', '.join(floor_ratios)})"
            out.append(Target(f"wfd overhead/step >= 10x below {peer}", shown, worst[0] >= 10))
        else:
            out.append(Target(f"wfd overhead/step >= 10x below {peer}", "-", None))

    parse = [fig[k] for k in ("validate_chain", "validate_layered") if k in fig]
    if parse:
        worst_fig = max(parse, key=lambda f: f.value or 0.0)
        value = worst_fig.value or 0.0
        out.append(Target("validation of 100k steps < 1 s",
                          f"{value:.3f} s ({worst_fig.label})", value < 1.0))
    else:
        out.append(Target("validation of 100k steps < 1 s", "-", None))

    rec = fig.get("recovery")
    out.append(Target("recovery of 1M events < 2 s (start to READY)",
                      f"{rec.value:.3f} s" if rec and rec.value else "-",
                      None if rec is None or rec.value is None else rec.value < 2.0))

    st, py = fig.get("status"), fig.get("python_pass")
    if st and py and st.value and py.value:
        out.append(Target("wfctl status <= 1.5x python -c pass",
                          f"{st.value:.3f} s / {py.value:.3f} s = {st.value / py.value:.2f}x",
                          st.value <= 1.5 * py.value))
    else:
        out.append(Target("wfctl status <= 1.5x python -c pass", "-", None))

    idle = fig.get("idle_rss")
    out.append(Target("daemon idle RSS <= 40 MB",
                      f"{idle.value:.1f} MB" if idle and idle.value else "-",
                      None if idle is None or idle.value is None else idle.value <= 40))
    return out


def targets_table(items: Sequence[Target]) -> str:
    rows = [(t.verdict, t.text, t.figure) for t in items]
    return _table(("", "target", "figure"), rows, right=set())
