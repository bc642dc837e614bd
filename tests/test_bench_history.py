"""`python -m bench.history` (issue 14's list of 10,000 runs) still runs: with 200 runs,
every row is printed, the verdict is MET, and no daemon or work dir is left behind."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("baseline: Hello round trip", "baseline: 200 summaries through a socketpair",
        "Status: all 200 runs", "Status: the newest 20", "Status: FAILED, the newest 20",
        "wfctl status (whole process")


def history_processes() -> set[int]:
    """Processes of a bench.history run: their state dir is in /tmp/wfdh-* (other
    benches, maybe running now, use others)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any("/tmp/wfdh-" in part for part in proc.info["cmdline"] or []):
            found.add(proc.pid)
    return found


@pytest.mark.timeout(300)
def test_bench_history_runs() -> None:
    before, running = set(glob.glob("/tmp/wfdh-*")), history_processes()
    done = subprocess.run([sys.executable, "-m", "bench.history", "--runs", "200",
                           "--repeat", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for row in ROWS:
        assert any(line.strip().startswith(row) and line.endswith(" ms") for line in lines), row
    assert lines[-1].startswith("MET  full list ")
    assert set(glob.glob("/tmp/wfdh-*")) == before
    # its daemon is gone, and its keeper once its idle linger is over
    wait_until(lambda: history_processes() <= running, timeout=30,
               message="the bench's daemon and keeper to exit")
