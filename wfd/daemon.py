"""`wfd`: the daemon's main: paths, lock, socket, signals, and the loop.

The loop, in order:
1. take the state dir's lock (one daemon per state dir);
2. fold every run's log (torn tails cut, damaged runs marked CORRUPT);
3. bind the socket (or take it from systemd) and start serving;
4. resume unfinished runs: kill what is left of their old attempts, record
   those attempts as interrupted, and drive the runs again;
5. tell systemd READY=1 once the resumed runs' next attempts are recorded and
   started (or STATUS= says why events cannot be persisted), then run until
   SIGTERM/SIGINT or `wfctl shutdown`;
6. stop: no new connections, kill every step tree, record the attempts as
   interrupted, flush, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import grp
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from wfd import __version__, paths
from wfd import systemd as sd
from wfd.engine import Engine
from wfd.errors import EXIT_OK, EXIT_USAGE
from wfd.eventlog import Layout
from wfd.procs import LocalExecutor
from wfd.server import Server

log = logging.getLogger("wfd")

EXIT_CANNOT_START = 1  # lock taken, socket answering, directory unusable
STATUS_DEBOUNCE = 0.25  # seconds between STATUS= updates while runs change


class StartupError(Exception):
    """The daemon cannot start: one line for the person who started it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"wfd: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="wfd", description="the wfd workflow daemon")
    parser.add_argument("--version", action="version", version=f"wfd {__version__}")
    parser.add_argument("--state-dir")
    parser.add_argument("--socket")
    parser.add_argument("--max-parallel", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--system", action="store_true")
    parser.add_argument("--socket-group", default="wfd")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error("--max-parallel must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-units"]:
        return sd.install_units(argv[1:])
    args = parse_args(argv)
    sd.setup_logging(args.log_level)
    try:
        return asyncio.run(Daemon(args).run())
    except StartupError as exc:
        print(f"wfd: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except KeyboardInterrupt:
        return EXIT_OK


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state dir for the daemon's life."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"another wfd (pid {other}) is using the state dir {state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_socket(path: Path, system: bool, group: str | None) -> socket.socket:
    """Bind the listening socket; replace a stale one, never one that answers."""
    parent = path.parent
    try:
        if system:
            paths.ensure_group_dir(parent, _gid(group))
        else:
            paths.ensure_private_dir(parent)
    except (OSError, paths.UnsafeDir) as exc:
        raise StartupError(f"cannot use socket directory {parent}: {exc}") from None
    if path.exists() or path.is_symlink():
        if socket_answers(path):
            raise StartupError(f"a daemon already answers on {path}; not taking it over")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket has its mode from the start: no window in which it is open to others,
    # and no chmod that a swapped-in symlink could redirect.
    old = os.umask(0o117 if system else 0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    if system:
        os.chown(path, -1, _gid(group), follow_symlinks=False)
    sock.listen(512)
    return sock


def _gid(group: str | None) -> int:
    """The socket group's gid; -1 (leave it) if there is none."""
    try:
        return grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        return -1


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.system = args.system
        self.state_dir = paths.state_dir(args.state_dir, args.system)
        self.socket_path = paths.daemon_socket(args.socket, args.system)
        self.stop_requested = asyncio.Event()

    def _prepare_state_dir(self) -> Layout:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.state_dir / "runs").mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create state dir {self.state_dir}: {exc}") from None
        self.lock_fd = lock_state_dir(self.state_dir)
        return Layout(self.state_dir)

    def _listening_socket(self) -> tuple[socket.socket, bool]:
        """(socket, inherited): systemd's socket if passed, else our own."""
        inherited = sd.listen_fds()
        if inherited:
            return inherited[0][0], True
        group = self.args.socket_group if self.system else None
        return bind_socket(self.socket_path, self.system, group), False

    async def run(self) -> int:
        # A write over RLIMIT_FSIZE must fail with EFBIG, not kill the daemon.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        layout = self._prepare_state_dir()
        engine = Engine(layout, self.args.max_parallel, self.system)
        executor = LocalExecutor(engine._attempt_ended)
        engine.executor = executor
        loop = asyncio.get_running_loop()
        executor.install(loop)
        unfinished = engine.load_all()
        committer = asyncio.create_task(engine.committer())
        sock, inherited = self._listening_socket()
        server = Server(engine, self.system, self.args.socket_group)
        server.shutdown_requested = self.stop_requested.set
        listener = await server.serve(sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        log.info("wfd %s serving %s, state in %s", __version__,
                 "socket from systemd" if inherited else self.socket_path, self.state_dir)
        if unfinished and not self.args.no_resume:
            log.info("resuming %d unfinished run(s)", len(unfinished))
            self._extend_timeout_for_kills(engine)  # their old trees get their kill_grace
            await engine.adopt(unfinished, "daemon restarted")
            await self._settled(engine)
        sd.ready(_with_storage_error(engine, f"{engine.active_runs()} active run(s)"))
        verifier = asyncio.create_task(engine.verify_stubs())
        watchdog = asyncio.create_task(self._status_loop(engine))
        await self.stop_requested.wait()
        log.info("stopping: terminating running steps")
        sd.stopping()
        listener.close()
        self._extend_timeout_for_kills(engine)
        await engine.stop()
        watchdog.cancel()
        verifier.cancel()
        committer.cancel()
        if not inherited:
            self._remove_socket()
        log.info("stopped")
        return EXIT_OK

    async def _settled(self, engine: Engine) -> None:
        """Wait until what resuming set off is durable and done, so that READY=1 means
        the runs run again: the interruptions, the claims of the next attempts, and
        their spawns, each recorded in a commit after the one it depends on. Stop
        waiting when events cannot be persisted (the engine retries; READY=1 then says
        why in STATUS=, rather than systemd killing a daemon that never got ready) or
        when a stop is asked for."""
        async def three_commits() -> None:
            for _ in range(3):
                await engine.flushed()

        commits = asyncio.ensure_future(three_commits())
        while not commits.done():
            if engine.storage_error is not None or self.stop_requested.is_set():
                commits.cancel()
                return
            await asyncio.wait({commits}, timeout=0.1)

    def _extend_timeout_for_kills(self, engine: Engine) -> None:
        """EXTEND_TIMEOUT_USEC= for the longest kill_grace of the running (or, at
        startup, left-over) attempts, so TimeoutStartSec/TimeoutStopSec do not cut
        it short."""
        graces = [
            run.workflow.steps[run.steps[s].index].kill_grace
            for run in engine.runs.values() for s in run.running
        ]
        if graces:
            sd.extend_timeout(max(graces) + 10)

    async def _status_loop(self, engine: Engine) -> None:
        """STATUS= soon after transitions (at most every STATUS_DEBOUNCE s) and WATCHDOG=1
        pings from the loop itself, so that a stuck loop is what the watchdog catches."""
        interval = sd.watchdog_interval()
        changed = asyncio.Event()
        engine.on_transition = lambda run_id, event: changed.set()
        period = min(interval or 5.0, 5.0)
        while True:
            changed.clear()
            sd.status(_with_storage_error(engine, f"{engine.active_runs()} active run(s), "
                                              f"{engine.executor.running} step(s) running"))
            if interval is not None:
                sd.watchdog_ping()
            try:
                await asyncio.wait_for(changed.wait(), period)
                await asyncio.sleep(STATUS_DEBOUNCE)
            except asyncio.TimeoutError:
                pass

    def _remove_socket(self) -> None:
        try:
            self.socket_path.unlink()
        except OSError:
            pass


def _with_storage_error(engine: Engine, text: str) -> str:
    """STATUS= text for `systemctl status wfd`: the storage error first, while there is one."""
    return f"{engine.storage_error}; {text}" if engine.storage_error else text
