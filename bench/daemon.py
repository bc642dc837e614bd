"""Starting, probing, measuring and stopping a private wfd daemon.

Every daemon the bench starts has its own state dir and socket in a short
/tmp path (a socket path must fit in 108 bytes), runs in its own session, and
is stopped by `Daemon.stop` (SIGTERM, then SIGKILL to its process group after
a grace period) from a `finally`: nothing is left behind, even when a
measurement fails or the bench is interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import msgspec

from wfd import protocol

STOP_GRACE = 15.0  # s for the daemon to stop its steps and exit after SIGTERM


def tool(name: str) -> str:
    """`wfd` / `wfctl` next to the running interpreter (the venv wfd is installed in)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither beside {sys.executable} nor on PATH")
    return found


def client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["WFD_NO_AUTOSTART"] = "1"
    for name in ("WFD_SOCKET", "WFD_STATE_DIR", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(name, None)
    return env


def short_tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def hello(path: str, timeout: float = 1.0) -> protocol.HelloReply | None:
    """One connect + Hello; None when nothing answers (yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        protocol.send(sock, protocol.Hello(client="bench"))
        reply = protocol.recv_reply(sock)
    except OSError:
        return None
    finally:
        sock.close()
    return reply if isinstance(reply, protocol.HelloReply) else None


def vm_kb(pid: int, field: str) -> int | None:
    """A `VmRSS` / `VmHWM` line of /proc/<pid>/status, in kB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu(pid: int) -> float:
    """A process's own utime + stime in seconds (not its reaped children's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's RSS every `interval` s in a thread; `peak_mb` is the largest."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        kb = vm_kb(self.pid, "VmRSS")
        if kb is not None:
            self.peak_kb = max(self.peak_kb, kb)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


class Daemon:
    """`wfd --max-parallel N` on a private state dir and socket.

    `start()` returns once the socket answers Hello; `stop()` always leaves no
    process behind. Use as a context manager."""

    def __init__(self, max_parallel: int = 8, state_dir: Path | None = None,
                 extra_args: tuple[str, ...] = (), notify_socket: str | None = None) -> None:
        self.base = short_tmpdir("wfdb-")
        self.state_dir = state_dir or self.base / "st"
        self.socket = str(self.base / "s.sock")
        self.log_path = self.base / "wfd.log"
        self.max_parallel = max_parallel
        self.extra_args = extra_args
        self.notify_socket = notify_socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        """Start the process; do not wait for it."""
        env = client_env()
        if self.notify_socket:
            env["NOTIFY_SOCKET"] = self.notify_socket
        argv = [tool("wfd"), "--state-dir", str(self.state_dir), "--socket", self.socket,
                "--max-parallel", str(self.max_parallel), *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env, start_new_session=True)

    def wait_hello(self, timeout: float = 60.0) -> float:
        """Poll until the socket answers Hello; the seconds since `spawn`."""
        assert self.proc is not None
        deadline = time.perf_counter() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wfd exited with {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.socket) and hello(self.socket) is not None:
                return time.perf_counter() - self.started_at
            if time.perf_counter() > deadline:
                raise TimeoutError(f"wfd did not answer within {timeout} s: {self.log_tail()}")
            time.sleep(0.002)

    def start(self) -> Daemon:
        self.spawn()
        self.wait_hello()
        return self

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            try:  # whatever is left in its session (steps in their own groups are its job)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- talking to it -------------------------------------------------------------

    def wfctl(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([tool("wfctl"), "--socket", self.socket, *args],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              env=client_env(), timeout=timeout)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.socket)
        protocol.send(sock, protocol.Hello(client="bench"))
        reply = protocol.recv_reply(sock)
        if not isinstance(reply, protocol.HelloReply):
            sock.close()
            raise RuntimeError(f"Hello answered with {reply!r}")
        return sock

    def submit(self, workflow: bytes, source: str, base_dir: str) -> tuple[socket.socket, str]:
        """Submit over a fresh connection as wfctl does; (the connection, the run id)."""
        sock = self.connect()
        umask = os.umask(0)
        os.umask(umask)
        protocol.send(sock, protocol.Submit(workflow=workflow.decode(), source=source,
                                            base_dir=base_dir, env=dict(os.environ),
                                            umask=umask))
        reply = protocol.recv_reply(sock)
        if not isinstance(reply, protocol.Submitted):
            sock.close()
            raise RuntimeError(f"Submit answered with {reply!r}")
        return sock, reply.run_id

    def wait_run(self, run_id: str, sock: socket.socket | None = None) -> str:
        """Watch `run_id` to its end (on `sock`, else a new connection, closed after);
        its final state."""
        sock = sock or self.connect()
        try:
            protocol.send(sock, protocol.Watch(run_id=run_id))
            while True:
                reply = protocol.recv_reply(sock)
                if isinstance(reply, protocol.RunEnded):
                    return reply.status.state
                if isinstance(reply, protocol.Error):
                    raise RuntimeError(f"Watch {run_id}: {reply.message}")
        finally:
            sock.close()

    def run_states(self) -> dict[str, str]:
        """run id -> state, from `wfctl status --json`."""
        done = self.wfctl("status", "--json")
        if done.returncode != 0:
            raise RuntimeError(f"wfctl status: {done.stderr.decode(errors='replace').strip()}")
        return {r["run_id"]: r["state"] for r in msgspec.json.decode(done.stdout)}
