"""The benchmark's smoke test: `python -m bench --quick` still runs and prints every row.

The full benchmark is not part of the suite (it takes minutes and its figures
are machine-dependent); this runs it with tiny sizes, on the runners that need
nothing beyond wfd itself, so that the bench cannot rot unnoticed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")
RUNNERS = ("raw", "durable", "durable-nogc", "durable-nolog", "durable-nogc-nolog", "wfd")
FIGURES = ("validate_chain", "validate_layered", "validate_cli", "start_empty", "idle_rss",
           "recovery_hello", "recovery", "recovery_idle", "status", "python_pass")


def bench_daemons() -> set[int]:
    """Daemons the bench starts: their sockets live in /tmp/wfdb-*."""
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("wfd" in part for part in cmdline[:2]) and any(
            part.startswith("/tmp/wfdb-") for part in cmdline
        ):
            pids.add(proc.pid)
    return pids


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(workload, runner) -> the row's cells, from the first table of the output."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("workload "))
    rows: dict[tuple[str, str], list[str]] = {}
    workload = None
    for line in lines[start + 2:]:
        if not line.strip():
            break
        match = re.match(r"(W\d) ", line)
        if match:
            workload = match.group(1)
        cells = line.split()
        runner_at = next(i for i, c in enumerate(cells) if c in RUNNERS)
        rows[(workload or "?", cells[runner_at])] = cells[runner_at + 1:]
    return rows


def test_quick_bench_prints_every_row(tmp_path: Path) -> None:
    before = bench_daemons()
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runners", "raw,durable,wfd",
         "--repeat", "1", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    rows = table_rows(done.stdout)
    for workload in WORKLOADS:
        for runner in RUNNERS:
            cells = rows.get((workload, runner))
            assert cells is not None, f"no row for {workload} {runner}:\n{done.stdout}"
            assert re.fullmatch(r"\d+\.\d+", cells[0]), f"{workload} {runner}: {cells}"

    data = json.loads(out_json.read_text())
    cells = {(r["workload"], r["runner"]): r for r in data["results"]}
    assert set(cells) == {(w, r) for w in WORKLOADS for r in RUNNERS}
    for key, result in cells.items():
        assert result["error"] is None and result["skipped"] is None, (key, result)
        assert result["wall_s"] > 0
    assert cells[("W6", "wfd")]["extra"]["not_succeeded"] == 0
    assert cells[("W5", "wfd")]["extra"]["submit_s"] > 0

    figures = {f["key"]: f for f in data["figures"]}
    assert set(FIGURES) <= set(figures)
    for key in FIGURES:
        assert figures[key]["error"] is None, figures[key]
        assert figures[key]["value"] > 0, figures[key]
    assert "targets (issue 6)" in done.stdout

    assert bench_daemons() <= before, "the bench left a daemon running"
