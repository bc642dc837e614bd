"""`python -m bench.history`: how long the daemon takes to list 10,000 finished runs.

Issue 14's target: listing 10,000 finished runs stays under 0.2 s in the daemon. The
runs are written straight into a state dir (`tests/bigruns.py`, the on-disk format:
a tenth FAILED, a tenth CANCELLED, two workflow names); a daemon is started on it and
left until it is idle (it folds every finished run once in the background at start).
Then, over one connection each, medians of `--repeat`:

- baseline `Hello`: one request round trip on the socket, nothing listed;
- baseline raw transfer: the same 10,000 summaries as msgpack through a socketpair
  and decoded (what moving the list costs, with no daemon);
- `Status` (every run: `wfctl status --json`), `Status(limit=20)` (the table),
  `Status(states=[FAILED], limit=20)` (a filter);
- and `wfctl status` as a whole process, for what a person waits.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.daemon import Daemon, client_env, proc_cpu, short_tmpdir, tool
from wfd import protocol as p
from wfd.events import format_ts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bigruns import finished_run  # noqa: E402

TARGET = 0.2  # seconds, issue 14


def write_runs(state_dir: Path, count: int) -> None:
    base = time.time() - count * 60
    for i in range(count):
        created = base + i * 60
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created)) + f"-{i:08x}"
        state = "FAILED" if i % 10 == 3 else "CANCELLED" if i % 10 == 7 else "SUCCEEDED"
        finished_run(state_dir, run_id, state, ("etl", "backup")[i % 2], format_ts(created))


def wait_idle(pid: int, quiet: float = 0.05, window: float = 1.0, limit: float = 600) -> None:
    """Until the daemon used less than `quiet` CPU seconds in a `window`."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = proc_cpu(pid)
        time.sleep(window)
        if proc_cpu(pid) - before < quiet:
            return


def ask(sock: socket.socket, request: p.Message) -> p.Message:
    p.send(sock, request)
    reply = p.recv_reply(sock)
    if isinstance(reply, p.Error):
        raise RuntimeError(f"{type(request).__name__}: {reply.message}")
    return reply


def median_of(repeat: int, fn: Callable[[], object]) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_transfer(runs: list) -> Callable[[], object]:
    """Encode the list, send it through a socketpair, read it back, decode it."""
    def once() -> object:
        a, b = socket.socketpair()
        try:
            sender = threading.Thread(target=p.send, args=(a, p.RunList(runs)))
            sender.start()
            reply = p.recv_reply(b)
            sender.join()
            return reply
        finally:
            a.close()
            b.close()
    return once


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    work = short_tmpdir("wfdh-")
    try:
        return measure(work, args.runs, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(work: Path, count: int, repeat: int) -> int:
    started = time.perf_counter()
    write_runs(work / "st", count)
    print(f"bench: wrote {count} runs in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    with Daemon(4, state_dir=work / "st") as daemon:
        wait_idle(daemon.pid)
        sock = daemon.connect()
        try:
            every = ask(sock, p.Status())
            assert len(every.runs) == count, len(every.runs)  # type: ignore[attr-defined]
            rows = [
                ("baseline: Hello round trip", lambda: ask(sock, p.Hello(client="bench"))),
                (f"baseline: {count} summaries through a socketpair",
                 raw_transfer(every.runs)),  # type: ignore[attr-defined]
                (f"Status: all {count} runs (status --json)", lambda: ask(sock, p.Status())),
                ("Status: the newest 20 (the status table)",
                 lambda: ask(sock, p.Status(limit=20))),
                ("Status: FAILED, the newest 20",
                 lambda: ask(sock, p.Status(states=["FAILED"], limit=20))),
            ]
            figures = [(label, median_of(repeat, fn)) for label, fn in rows]
        finally:
            sock.close()
        argv_status = [tool("wfctl"), "--socket", daemon.socket, "status"]
        env = client_env()
        figures.append(("wfctl status (whole process, table of 20)", median_of(
            max(3, repeat // 4),
            lambda: subprocess.run(argv_status, check=True, capture_output=True, env=env))))
    print(f"listing {count} finished runs; median of {repeat} (target for the "
          f"full list in the daemon < {TARGET} s)")
    for label, seconds in figures:
        print(f"  {label:<48} {seconds * 1000:8.1f} ms")
    full = figures[2][1]
    print(f"{'MET' if full < TARGET else 'MISS'}  full list {full:.3f} s < {TARGET} s")
    return 0 if full < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
