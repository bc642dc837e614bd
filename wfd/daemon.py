"""`wfd`: the daemon's main: paths, lock, socket, signals, and the loop.

The loop, in order:
1. take the state dir's lock (one daemon per state dir);
2. fold every unfinished run's log (torn tails noted, damaged runs marked
   CORRUPT); finished runs are known by their first and last lines;
3. bind the socket (or take it from systemd), start serving, and tell systemd
   READY=1;
4. in the background: adopt unfinished runs (kill what is left of their old
   attempts, record those as interrupted, drive the runs again; a request for
   a run being adopted waits for it) and check finished runs' logs;
5. run until SIGTERM/SIGINT or `wfctl shutdown` (SIGHUP is ignored); if the
   event writer or the decide loop fails, log it once and exit 70;
6. stop: no new connections, kill every step tree (a second SIGTERM: SIGKILL
   at once), record the attempts as interrupted, flush, exit 0.
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
import time
from pathlib import Path

from wfd import __version__, logcap, paths
from wfd import systemd as sd
from wfd.engine import MAX_KILL_GRACE, Engine
from wfd.errors import EXIT_OK, EXIT_USAGE
from wfd.eventlog import Layout, UnsafeStateDir, check_state_dir, discard_unacknowledged
from wfd.executors import Executors
from wfd.kept import KeeperUnavailable, KeptExecutor
from wfd.pools import BadPools, PoolLimits, parse_option
from wfd.schedlog import ScheduleLog, ScheduleLogDamaged
from wfd.scheduling import Scheduling
from wfd.server import Server
from wfd.slurm import RESUBMIT_AFTER, SlurmExecutor

log = logging.getLogger("wfd")

EXIT_CANNOT_START = 1  # lock taken, socket answering, directory unusable
EXIT_BROKEN = 70  # the event writer or the decide loop failed (sysexits EX_SOFTWARE)
STATUS_DEBOUNCE = 0.25  # seconds between STATUS= updates while runs change
RETENTION_EVERY = 3600.0  # seconds between two applications of --keep-runs/--keep-days


class StartupError(Exception):
    """The daemon cannot start: one line for the person who started it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"wfd: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="wfd", usage="wfd [OPTIONS]\n       wfd install-units [--user] [--print]",
        description="wfd, the durable workflow daemon: runs the workflows wfctl submits, "
                    "and resumes unfinished runs when it starts.",
        epilog="wfd install-units [--user] [--print]: write systemd units (wfd.service, "
               "wfd.socket) whose ExecStart is this wfd, to /etc/systemd/system, or with "
               "--user to ~/.config/systemd/user; --print shows them instead. "
               "See `wfd install-units --help`.")
    parser.add_argument("--version", action="version", version=f"wfd {__version__}",
                        help="print the version and exit")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where runs are kept (default: $WFD_STATE_DIR, systemd's "
                             "$STATE_DIRECTORY, else the user state dir; /var/lib/wfd with "
                             "--system)")
    parser.add_argument("--socket", metavar="PATH",
                        help="the socket to serve (default: $WFD_SOCKET, "
                             "$RUNTIME_DIRECTORY/wfd.sock, else $XDG_RUNTIME_DIR/wfd/wfd.sock; "
                             "/run/wfd/wfd.sock with --system)")
    parser.add_argument("--max-parallel", type=int, default=2 * (os.cpu_count() or 1),
                        metavar="N",
                        help="most steps running at once, all runs together (default: twice "
                             "the CPUs)")
    parser.add_argument("--no-resume", action="store_true",
                        help="do not pick up unfinished runs at start: they wait for "
                             "`wfctl resume` or `wfctl resume-all`")
    parser.add_argument("--max-kill-grace", type=float, default=MAX_KILL_GRACE,
                        metavar="SECONDS",
                        help="cap on a step's kill_grace for runs not owned by root "
                             f"(default {MAX_KILL_GRACE:g})")
    parser.add_argument("--max-steps-per-user", type=int, metavar="N",
                        help="most running steps of one user at once (default: only the "
                             "global --max-parallel)")
    parser.add_argument("--max-runs-per-user", type=int, metavar="N",
                        help="most unfinished runs of one user; a submit over it is refused "
                             "(default: no limit)")
    parser.add_argument("--keep-runs", type=int, metavar="N",
                        help="remove finished runs beyond each user's newest N (checked at "
                             "start and hourly; with --keep-days, only those older too)")
    parser.add_argument("--keep-days", type=float, metavar="D",
                        help="remove finished runs that ended more than D days ago (with "
                             "--keep-runs, only those beyond each user's newest N)")
    parser.add_argument("--max-log-size", type=_size, default=logcap.DEFAULT_MAX,
                        metavar="SIZE",
                        help="cut a step's log that grows past SIZE (100M, 1G; 0: no cap) "
                             "with a marker line (default 100M)")
    parser.add_argument("--slurm-resubmit-after", type=float, default=RESUBMIT_AFTER,
                        metavar="SECONDS",
                        help="how long after its intent a Slurm job that the controller "
                             "does not know (its daemon died around sbatch) is submitted "
                             "again; longer than sbatch can take on your cluster "
                             f"(default {RESUBMIT_AFTER:g})")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME=N",
                        help="a pool of N slots that steps naming it (\"pool\": \"NAME\") "
                             "share across all runs and users; repeatable. `wfctl pool set "
                             "NAME N` changes it at run time, and that wins over this option "
                             "(across restarts) until this option's value for NAME changes")
    parser.add_argument("--system", action="store_true",
                        help="the machine's daemon (run as root by systemd): serves root and "
                             "the --socket-group; each run's steps run as its submitter")
    parser.add_argument("--socket-group", default="wfd", metavar="NAME",
                        help="with --system, the group whose members may use the socket "
                             "(default: wfd)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="what goes to stderr (the journal): default info, one line per "
                             "run and step transition")
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error("--max-parallel must be at least 1")
    if not args.max_kill_grace >= 0:
        parser.error("--max-kill-grace must be a number of seconds >= 0")
    if args.keep_runs is not None and args.keep_runs < 0:
        parser.error("--keep-runs must be 0 or more")
    if args.keep_days is not None and not args.keep_days > 0:
        parser.error("--keep-days must be a number of days > 0")
    pools: dict[str, int] = {}
    for text in args.pool:
        try:
            name, limit = parse_option(text)
        except BadPools as exc:
            parser.error(str(exc))
        if name in pools:
            parser.error(f"--pool {name} given twice")
        pools[name] = limit
    args.pools = pools
    for option in ("max_steps_per_user", "max_runs_per_user"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


def _size(text: str) -> int:
    try:
        return logcap.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def lock_state_dir(state_dir: Path, socket_path: Path | None = None) -> int:
    """Hold an exclusive lock on the state dir for the daemon's life, and announce in it
    our pid and socket: a wfctl without $XDG_RUNTIME_DIR (cron) finds us there."""
    fd = os.open(state_dir / paths.LOCK_NAME,
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    for pause in (0.05, 0.2, None):  # a wfctl testing the lock holds it for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if pause is None:
                other = paths.parse_lock(os.pread(fd, 4096, 0)).pid
                os.close(fd)
                raise StartupError(
                    f"another wfd (pid {other}) is using the state dir {state_dir}"
                ) from None
            time.sleep(pause)
    text = paths.lock_text(os.getpid(), socket_path)
    os.pwrite(fd, text, 0)  # over the old text in one write, then cut the rest: see parse_lock
    os.ftruncate(fd, len(text))
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
        self.stop_steps = False  # a stop leaves running attempts to the keeper

    def _prepare_state_dir(self) -> Layout:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.state_dir / "runs").mkdir(mode=0o700, exist_ok=True)
            check_state_dir(self.state_dir, self.system)
        except OSError as exc:
            raise StartupError(f"cannot create state dir {self.state_dir}: {exc}") from None
        except UnsafeStateDir as exc:
            raise StartupError(f"refusing the state dir: {exc}") from None
        self.lock_fd = lock_state_dir(self.state_dir, self.socket_path)
        layout = Layout(self.state_dir)
        self.schedule_log = ScheduleLog(self.state_dir)
        try:
            book = self.schedule_log.load()
        except (OSError, ScheduleLogDamaged) as exc:
            raise StartupError(f"cannot read the schedule log: {exc}") from None
        # Crashed submits: no run, and not CORRUPT for ever. A run a schedule's intent
        # names is kept: recovery creates it, with that id.
        discard_unacknowledged(layout, keep=set(book.intents()))
        if layout.remove_tombstones():  # what a crash left of a prune: gone, finish it
            log.info("finished deleting runs pruned before a crash")
        return layout

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
        try:
            pools = PoolLimits(self.state_dir, self.args.pools)
        except BadPools as exc:
            raise StartupError(str(exc)) from None
        engine = Engine(layout, self.args.max_parallel, self.system,
                        max_kill_grace=self.args.max_kill_grace,
                        max_steps_per_user=self.args.max_steps_per_user,
                        max_runs_per_user=self.args.max_runs_per_user, pools=pools)
        engine.max_log_size = self.args.max_log_size
        loop = asyncio.get_running_loop()
        executor = KeptExecutor(self.state_dir, engine.attempt_started, engine.attempt_ended)
        engine.executor = Executors(executor, SlurmExecutor(
            engine.attempt_submitted, engine.attempt_ended, engine.attempt_lost,
            engine.respawn, resubmit_after=self.args.slurm_resubmit_after))
        try:
            await executor.connect()
        except KeeperUnavailable as exc:
            raise StartupError(str(exc)) from None
        executor.lost_connection = lambda exc: engine.fail(
            exc or ConnectionError("the keeper closed its connection"))
        unfinished = engine.load_all()
        engine.schedules = Scheduling(engine, self.schedule_log)
        committer = engine.start()
        executor.listen()
        sock, inherited = self._listening_socket()
        server = Server(engine, self.system, self.args.socket_group)
        server.shutdown_requested = self._shutdown
        listener = await server.serve(sock)
        self._handle_signals(loop, engine)
        log.info("wfd %s serving %s, state in %s", __version__,
                 "socket from systemd" if inherited else self.socket_path, self.state_dir)
        # READY=1 once the logs are folded and the socket serves; clearing what is left of
        # old attempts can take a kill_grace per run, so it goes on in the background.
        background = [engine.supervise(engine.verify_stubs())]
        if unfinished and not self.args.no_resume:
            log.info("resuming %d unfinished run(s)", len(unfinished))
            background += engine.start_adoptions(unfinished)
        sd.ready(_with_storage_error(engine, f"{engine.active_runs()} active run(s)"))
        background.append(engine.supervise(self._status_loop(engine, committer)))
        if self.args.keep_runs is not None or self.args.keep_days is not None:
            background.append(engine.supervise(self._retention_loop(engine)))
        if self.args.max_log_size:
            background.append(engine.supervise(self._log_cap_loop(engine)))
        background.append(engine.supervise(engine.schedules.run()))
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait([stop, engine.fatal, committer], return_when=asyncio.FIRST_COMPLETED)
        for task in background:
            task.cancel()
        if not self.stop_requested.is_set():
            return self._broken(engine, committer, listener, inherited)
        sd.stopping()
        listener.close()
        if self.stop_steps:
            log.info("stopping: terminating running steps")
            self._extend_timeout_for_kills(engine)
        else:
            log.info("stopping; %d running step(s) go on under the keeper",
                     engine.executor.running)
        await engine.stop(self.stop_steps)
        committer.cancel()
        executor.close()
        if not inherited:
            self._remove_socket()
        log.info("stopped")
        return EXIT_OK

    def _shutdown(self, stop_steps: bool) -> None:
        """`wfctl shutdown [--stop-steps]`."""
        self.stop_steps = stop_steps
        self.stop_requested.set()

    def _handle_signals(self, loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
        """SIGTERM/SIGINT stop (asked again: kill what is dying at once); SIGHUP is
        ignored, said once in the log: wfd has no configuration to reload, and a closed
        terminal must not take the daemon and its steps with it."""
        def stop() -> None:
            if self.stop_requested.is_set() and self.stop_steps:
                log.warning("asked again to stop: killing running steps now (SIGKILL)")
                engine.force_stop()
            self.stop_requested.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored"))

    def _broken(self, engine: Engine, committer: asyncio.Task, listener: asyncio.AbstractServer,
                inherited: bool) -> int:
        """The writer or the decide loop failed: say so once and exit non-zero. systemd
        restarts the daemon, and the new one recovers from the log."""
        exc = engine.fatal.result() if engine.fatal.done() else committer.exception()
        log.critical("wfd cannot go on: its event writer failed", exc_info=exc)
        listener.close()
        if not inherited:
            self._remove_socket()
        return EXIT_BROKEN

    def _extend_timeout_for_kills(self, engine: Engine) -> None:
        """EXTEND_TIMEOUT_USEC= for the longest kill_grace of the running attempts, so
        TimeoutStopSec does not cut it short; never more than the kill_grace cap allows
        (a root run's longer grace is cut short by systemd rather than hold a stop)."""
        graces = [
            run.workflow.steps[run.steps[s].index].kill_grace
            for run in engine.runs.values() for s in run.running
        ]
        if graces:
            sd.extend_timeout(min(max(graces), self.args.max_kill_grace) + 10)

    async def _status_loop(self, engine: Engine, committer: asyncio.Task) -> None:
        """STATUS= soon after transitions (at most every STATUS_DEBOUNCE s) and WATCHDOG=1
        pings from the loop itself, only while the writer makes progress, so that a stuck
        loop or a stuck writer is what the watchdog catches."""
        interval = sd.watchdog_interval()
        changed = asyncio.Event()
        engine.on_transition = lambda run_id, event: changed.set()
        period = min(interval or 5.0, 5.0)
        while True:
            changed.clear()
            sd.status(_with_storage_error(engine, f"{engine.active_runs()} active run(s), "
                                              f"{engine.executor.running} step(s) running"))
            if interval is not None and _writer_alive(engine, committer, 2 * interval):
                sd.watchdog_ping()
            try:
                await asyncio.wait_for(changed.wait(), period)
                await asyncio.sleep(STATUS_DEBOUNCE)
            except asyncio.TimeoutError:
                pass

    async def _retention_loop(self, engine: Engine) -> None:
        """`--keep-runs` / `--keep-days`: at start, then every RETENTION_EVERY seconds. A
        prune that fails (a disk error) is logged and tried again next time."""
        while True:
            try:
                await engine.apply_policy(self.args.keep_runs, self.args.keep_days)
            except OSError as exc:
                log.error("applying --keep-runs/--keep-days: %s", exc.strerror or exc)
            await asyncio.sleep(RETENTION_EVERY)

    async def _log_cap_loop(self, engine: Engine) -> None:
        """`--max-log-size`: a look at the running attempts' logs every CHECK_EVERY
        seconds (and the engine looks once more as each ends)."""
        cap = engine.max_log_size
        while True:
            keys = engine.running_attempts()
            if keys:
                await asyncio.to_thread(logcap.cut_all, engine.layout, keys, cap)
            await asyncio.sleep(logcap.CHECK_EVERY)

    def _remove_socket(self) -> None:
        try:
            self.socket_path.unlink()
        except OSError:
            pass


def _writer_alive(engine: Engine, committer: asyncio.Task, within: float) -> bool:
    """The committer runs and has taken its work within `within` seconds."""
    return not committer.done() and engine.committer.idle_for() < within


def _with_storage_error(engine: Engine, text: str) -> str:
    """STATUS= text for `systemctl status wfd`: the storage error first, while there is one."""
    return f"{engine.storage_error}; {text}" if engine.storage_error else text
