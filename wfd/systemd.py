"""systemd integration: readiness and watchdog (sd_notify), socket activation
(sd_listen_fds), journal-aware logging, and the unit files of `wfd install-units`.

Stdlib only, and every part is a no-op outside systemd: `notify` returns False when
$NOTIFY_SOCKET is unset, `listen_fds` returns [] without $LISTEN_PID, and logging
falls back to timestamped lines when stderr is not the journal.

The unit files live here as templates, once: `systemd/` in the repository holds
`render_units("/usr/bin/wfd", ...)` verbatim (a test keeps them equal; regenerate
them with `write_units`), and `wfd install-units` writes the same text with the
path of the installed `wfd`.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import grp
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

from wfd.text import printable

# --------------------------------------------------------------------------- sd_notify


class Notifier:
    """One datagram socket to the service manager's $NOTIFY_SOCKET, kept open so
    that frequent STATUS= and WATCHDOG=1 messages cost one sendto() each.

    `send` never raises: it returns False when there is no socket to send to or
    the send failed, and the caller decides whether that is worth a log line."""

    SEND_TIMEOUT = 2.0  # s; PID 1 drains its queue at once, this only bounds a wedged manager

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None

    @staticmethod
    def _sockaddr(address: str) -> str | None:
        if address.startswith("@"):  # abstract namespace: a leading NUL byte
            return "\0" + address[1:]
        if address.startswith("/"):
            return address
        return None  # e.g. vsock: addresses (systemd 253+ in VMs); not supported

    def send(self, message: str) -> bool:
        target = self._sockaddr(self.address)
        if target is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(self.SEND_TIMEOUT)
            self._sock.sendto(message.encode(), target)
        except (OSError, UnicodeError):
            self.close()
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_notifier: Notifier | None = None


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1", newline-separated assignments) to
    $NOTIFY_SOCKET. False when it is unset or the send failed; never raises."""
    global _notifier
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if _notifier is None or _notifier.address != address:
        if _notifier is not None:
            _notifier.close()
        _notifier = Notifier(address)
    return _notifier.send(message)


def _one_line(text: str) -> str:
    # A newline would start a new assignment inside the datagram.
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """READY=1: startup is complete (runs resumed, socket listening)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def stopping() -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """STATUS=text, shown by `systemctl status wfd`; newlines become spaces."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC=: ask for `seconds` more before TimeoutStartSec/TimeoutStopSec
    fire, counted from now. Repeat before it runs out while a long kill_grace lasts."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_ping() -> bool:
    """WATCHDOG=1: the main loop is alive."""
    return notify("WATCHDOG=1")


def watchdog_interval(env: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when systemd
    expects none: $WATCHDOG_USEC unset or invalid, or $WATCHDOG_PID naming another
    process (sd_watchdog_enabled(3)). Ping from the main loop, not from a thread, so
    that a stuck loop is what the watchdog catches."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env.get("WATCHDOG_PID") or os.getpid())
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2_000_000


# --------------------------------------------------------------------------- sd_listen_fds

LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(env: MutableMapping[str, str] | None = None) -> list[tuple[socket.socket, str]]:
    """The sockets systemd passed to this process (sd_listen_fds_with_names(3)), in
    the order of the socket unit, each with its name ("wfd.socket" unless the unit sets
    FileDescriptorName=; "unknown" when $LISTEN_FDNAMES is missing).

    Only when $LISTEN_PID is this process; the fds start at 3 and are made
    close-on-exec. $LISTEN_PID, $LISTEN_FDS and $LISTEN_FDNAMES are removed from
    `env` (os.environ by default) in every case, so no child inherits them.
    Raises OSError if a passed fd is not a socket."""
    env = os.environ if env is None else env
    values = {name: env.pop(name, "") for name in _LISTEN_VARS}
    try:
        pid, count = int(values["LISTEN_PID"]), int(values["LISTEN_FDS"])
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    names += ["unknown"] * (count - len(names))
    return [_adopt(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _adopt(fd: int, name: str) -> tuple[socket.socket, str]:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(f"fd {fd} ({name}) passed by systemd is not a socket")
    return socket.socket(fileno=fd), name


# --------------------------------------------------------------------------- logging


def stderr_is_journal(env: MutableMapping[str, str] | None = None) -> bool:
    """True when stderr is still the journal stream systemd connected: $JOURNAL_STREAM
    ("device:inode") matches fd 2 (systemd.exec(5)); a redirected stderr does not."""
    env = os.environ if env is None else env
    try:
        device, inode = (int(part) for part in env.get("JOURNAL_STREAM", "").split(":"))
        info = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def syslog_priority(level: int) -> int:
    """The syslog priority journald should record for a Python logging level."""
    for threshold, priority in (
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
    ):
        if level >= threshold:
            return priority
    return 7


def journal_prefix(level: int) -> str:
    """`<N>` (sd-daemon(3) priority prefix) when stderr is the journal, else ''."""
    return f"<{syslog_priority(level)}>" if stderr_is_journal() else ""


class JournalFormatter(logging.Formatter):
    """Lines for stderr. To the journal: `<6>message` (journald adds time, pid and
    level). Elsewhere: `2026-11-25T09:58:52.123Z wfd[PID] LEVEL message`, UTC.
    Each line of a multi-line record (a traceback) gets the same prefix, so every
    line stands alone in the journal and in grep."""

    def __init__(self, journal: bool | None = None) -> None:
        super().__init__()
        self.journal = stderr_is_journal() if journal is None else journal

    def format(self, record: logging.LogRecord) -> str:
        prefix = self._prefix(record)
        return "\n".join(prefix + line for line in super().format(record).splitlines())

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        # The message may quote what users chose (a run name, a cwd): a newline in it
        # must not forge a line of its own, nor an ESC sequence reach a terminal.
        # A traceback, added after this, keeps its lines.
        return printable(super().formatMessage(record))

    def _prefix(self, record: logging.LogRecord) -> str:
        if self.journal:
            return f"<{syslog_priority(record.levelno)}>"
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{when}.{int(record.msecs):03d}Z wfd[{record.process}] {record.levelname} "


def setup_logging(level_name: str) -> logging.Handler:
    """Send the "wfd" logger's records at `level_name` (DEBUG, INFO, ...) and above to
    stderr, one line each, journal-aware. Calling it again replaces the handler.
    Raises ValueError for an unknown level name."""
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {level_name!r} (use DEBUG, INFO, WARNING, ERROR)")
    logger = logging.getLogger("wfd")
    for old in [h for h in logger.handlers if getattr(h, "_wfd_stderr", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter())
    handler._wfd_stderr = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


# --------------------------------------------------------------------------- unit files

_EXEC = "@EXEC@"  # replaced by the quoted path of wfd and its arguments

_HARDENING = """\
# Hardening. Every step of every user runs inside this service: same cgroup,
# namespaces, seccomp filter and capability bounding set. So any option here applies
# to the users' commands too, and only what a login shell would not notice is set:
#   UMask=0077: files the daemon creates are private; each step gets the umask of
#     the wfctl that submitted it.
# Not set, on purpose:
#   ProtectHome=, ProtectSystem=, ReadOnlyPaths=: steps run in their owners' homes and
#     write wherever their owner may (a root step may upgrade packages).
#   PrivateTmp=: steps share /tmp and /var/tmp with their owner's other programs.
#   NoNewPrivileges=: steps may run sudo, su, ping, fusermount and other setuid or
#     file-capability programs.
#   PrivateDevices=, DeviceAllow=, ProtectClock= (implies DeviceAllow=, which closes
#     every other device): steps may use GPUs, /dev/kvm, serial and USB devices.
#   PrivateNetwork=, RestrictAddressFamilies=, IPAddressDeny=: steps use the network.
#   User=, DynamicUser=, PrivateUsers=, CapabilityBoundingSet=: the daemon is root so
#     that it can start each step as its owner (uid, gid, supplementary groups).
#   ProtectKernelTunables=, ProtectKernelModules=, ProtectKernelLogs=,
#     ProtectControlGroups=, ProtectHostname=, PrivateMounts=, PrivateIPC=: each one
#     gives the service its own mount, UTS or IPC namespace: a mount made by a step
#     (sshfs, a backup disk) would not be seen outside it, a renamed host would keep
#     its old name inside, SysV IPC with the owner's other programs would fail, and
#     /usr/lib/modules (DKMS builds) or /sys would be hidden or read-only.
#   ProtectProc=, ProcSubset=: ps and top in a step would see less than in a shell.
#   SystemCallFilter=, SystemCallArchitectures=, MemoryDenyWriteExecute=,
#     LockPersonality=, RestrictNamespaces=, RestrictRealtime=, RestrictSUIDSGID=:
#     they break system call sets, 32-bit programs, JITs (Java, Node.js, PyPy),
#     sandboxes and containers (bwrap, podman, browsers), setarch and gdb, chrt, and
#     setgid directories.
#   KeyringMode=: the default (private) already keeps root's keyring out.
UMask=0077
"""

_SERVICE_COMMON = """\
Type=notify
# Only the daemon itself may send READY=1, STATUS=, WATCHDOG=1: not its steps.
NotifyAccess=main
ExecStart=@EXEC@
# Steps outlive the daemon: they run under wfd's keeper, a process of its own in
# this cgroup. A stop or restart signals the daemon only and leaves the keeper and
# the running steps alone (as containerd.service does with its shims); the next
# daemon re-attaches to them. `wfctl shutdown --stop-steps` stops the steps too.
KillMode=process
# The daemon stops in well under a second; a `--stop-steps` stop waits out the
# steps' kill_grace (EXTEND_TIMEOUT_USEC= while it does).
TimeoutStopSec=90s
# READY=1 comes once the logs are folded and the socket serves; re-attaching and
# clearing what a lost attempt left go on in the background.
TimeoutStartSec=90s
# Restart after a crash, a watchdog abort or a kill -9; the new daemon resumes
# every unfinished run. A clean stop (SIGTERM, exit 0) is not restarted.
Restart=on-failure
RestartSec=1s
# The daemon's main loop pings every WatchdogSec/2 (watchdog_interval()); a loop
# stuck for a minute is aborted (SIGABRT) and restarted.
WatchdogSec=60s
# A step killed by the kernel's OOM killer is a failed attempt of that step, not a
# reason to stop the daemon (the default OOMPolicy=stop would stop every run).
OOMPolicy=continue
SyslogIdentifier=wfd
"""

_SYSTEM_SERVICE = f"""\
# wfd system service, written by `wfd install-units`; run it again to update
# ExecStart. Change settings with `systemctl edit wfd` (a drop-in survives that).
[Unit]
Description=wfd durable workflow daemon
# The socket unit owns /run/wfd/wfd.sock, so clients can connect while the daemon
# (re)starts; the daemon takes the socket over with LISTEN_FDS.
Requires=wfd.socket
After=wfd.socket
# Runs resumed at boot may need the network, remote home directories, and user
# lookups (NSS, LDAP) to start steps as their owners.
Wants=network-online.target
After=network-online.target remote-fs.target nss-user-lookup.target

[Service]
{_SERVICE_COMMON}# $RUNTIME_DIRECTORY=/run/wfd, where wfd.socket puts the socket. Kept when the
# service stops, or the socket node would go with it. The socket (0660, group wfd)
# is the access control; the directory is 0755 like the socket unit's DirectoryMode=,
# since systemd cannot give it group wfd without running the daemon as that group.
RuntimeDirectory=wfd
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
# $STATE_DIRECTORY=/var/lib/wfd: every user's runs; only the daemon reads it.
StateDirectory=wfd
StateDirectoryMode=0700
{_HARDENING}
[Install]
# Started at boot, not only on the first client: unfinished runs resume by themselves.
WantedBy=multi-user.target
Also=wfd.socket
"""

_SYSTEM_SOCKET = """\
# wfd system socket, written by `wfd install-units`.
# The group wfd must exist (groupadd --system wfd); its members may use wfctl.
[Unit]
Description=wfd durable workflow daemon socket

[Socket]
ListenStream=/run/wfd/wfd.sock
SocketUser=root
SocketGroup=wfd
SocketMode=0660
# As RuntimeDirectoryMode= of wfd.service (which re-applies its own mode on start).
DirectoryMode=0755

[Install]
WantedBy=sockets.target
"""

_USER_SERVICE = f"""\
# wfd user service, written by `wfd install-units --user`; run it again to update
# ExecStart. Change settings with `systemctl --user edit wfd`.
# No StateDirectory=: the daemon's own default state dir is used, the same one an
# autostarted `wfctl` daemon uses (systemd versions disagree on where
# StateDirectory= lies for user services).
[Unit]
Description=wfd durable workflow daemon (user)
Requires=wfd.socket
After=wfd.socket

[Service]
{_SERVICE_COMMON}# $RUNTIME_DIRECTORY=$XDG_RUNTIME_DIR/wfd, private, where wfd.socket puts the
# socket; kept when the service stops, or the socket node would go with it.
RuntimeDirectory=wfd
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
# A user manager cannot sandbox much anyway; the reasons for leaving out each
# hardening option are in the system unit (systemd/wfd.service).
UMask=0077

[Install]
# With `loginctl enable-linger`, started at boot: unfinished runs resume by themselves.
WantedBy=default.target
Also=wfd.socket
"""

_USER_SOCKET = """\
# wfd user socket, written by `wfd install-units --user`.
[Unit]
Description=wfd durable workflow daemon socket (user)

[Socket]
ListenStream=%t/wfd/wfd.sock
SocketMode=0600
# As RuntimeDirectoryMode= of wfd.service (which re-applies its own mode on start).
DirectoryMode=0700

[Install]
WantedBy=sockets.target
"""


def exec_path(path: str) -> str:
    """`path` written as the command of an ExecStart= line (systemd.syntax(7)):
    quoted when it holds spaces or quotes, and `%` doubled against specifier
    expansion. Raises ValueError for a relative path or one systemd cannot hold."""
    if not os.path.isabs(path):
        raise ValueError(f"the wfd path must be absolute, not {path!r}")
    if "$" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"a systemd unit cannot run {path!r} ($ or a control character)")
    path = path.replace("%", "%%")
    if any(c in path for c in " \t\"'\\"):
        path = '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return path


def render_units(wfd_path: str, user: bool) -> dict[str, str]:
    """Unit file name -> text for the system units, or with `user` the user units,
    with ExecStart running the `wfd` at `wfd_path` (absolute)."""
    command = exec_path(wfd_path)
    if user:
        service, sock, args = _USER_SERVICE, _USER_SOCKET, ""
    else:
        service, sock, args = _SYSTEM_SERVICE, _SYSTEM_SOCKET, " --system"
    service = service.replace(_EXEC, command + args)
    return {"wfd.service": service, "wfd.socket": sock}


def write_units(directory: Path, wfd_path: str, user: bool) -> list[Path]:
    """Write `render_units(wfd_path, user)` into `directory` (created if missing),
    each file replaced atomically, mode 0644. Returns the paths written.

    Regenerate the shipped units with
    `python -c 'from pathlib import Path; from wfd.systemd import write_units;
    write_units(Path("systemd"), "/usr/bin/wfd", False);
    write_units(Path("systemd/user"), "/usr/bin/wfd", True)'`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_units(wfd_path, user).items():
        target = directory / name
        tmp = directory / f".{name}.tmp"  # systemd loads no file ending in .tmp
        try:
            tmp.write_text(text)
            tmp.chmod(0o644)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written


# --------------------------------------------------------------------------- install-units


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_wfd(argv0: str | None = None, executable: str | None = None) -> str | None:
    """The absolute path of this installation's `wfd` command: the running script
    when it is an executable named wfd (a venv or pipx path as typed, symlinks kept),
    else the `wfd` next to the Python running us, else `wfd` on $PATH."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    candidates = [os.path.abspath(argv0)] if os.path.basename(argv0) == "wfd" else []
    if executable:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(executable)), "wfd"))
    found = shutil.which("wfd")
    if found:
        candidates.append(os.path.abspath(found))
    return next((path for path in candidates if _is_executable(path)), None)


def unit_dir(user: bool, env: MutableMapping[str, str] | None = None) -> Path:
    """Where install-units writes: /etc/systemd/system, or for --user
    $XDG_CONFIG_HOME/systemd/user (~/.config/systemd/user)."""
    if not user:
        return Path("/etc/systemd/system")
    env = os.environ if env is None else env
    config = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "systemd" / "user"


def systemd_running() -> bool:
    """True when this machine was booted with systemd (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")


def _writable_by_others(path: str) -> str | None:
    """The first of `path` (resolved) and its directories that a non-root user could
    change, which would let them run code as root through the system service."""
    current = Path(os.path.realpath(path))
    for part in [current, *current.parents]:
        try:
            info = part.stat()
        except OSError:
            continue
        shared = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
        if info.st_uid != 0 or shared:
            return str(part)
    return None


def _parse_install_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wfd install-units",
        description="Write the systemd units of this wfd (ExecStart = its path), "
        "reload systemd, and print the commands that start the service.",
    )
    parser.add_argument("--user", action="store_true", help="user units, for `systemctl --user`")
    parser.add_argument("--print", action="store_true", help="only print the units to stdout")
    return parser.parse_args(argv)


def install_units(argv: list[str]) -> int:
    """`wfd install-units [--user] [--print]`. Exit 0 on success, 1 when the units
    cannot be written (one line on stderr saying why), 2 for bad usage."""
    args = _parse_install_args(argv)
    wfd_path = find_wfd()
    if wfd_path is None:
        print("wfd install-units: cannot find the wfd command: install wfd "
              "(pipx install wfd) and run its wfd install-units", file=sys.stderr)
        return 1
    if args.print:
        for name, text in render_units(wfd_path, args.user).items():
            print(f"# {name}\n{text}")
        return 0
    directory = unit_dir(args.user)
    try:
        written = write_units(directory, wfd_path, args.user)
    except OSError as err:
        hint = "" if args.user else " (run it as root: sudo \"$(command -v wfd)\" install-units)"
        print(f"wfd install-units: cannot write the units to {directory}: "
              f"{err.strerror or err}{hint}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not args.user:
        _warn_unsafe_path(wfd_path)
    reloaded = _daemon_reload(args.user)
    _print_next_steps(args.user, reloaded)
    return 0


def _warn_unsafe_path(wfd_path: str) -> None:
    unsafe = _writable_by_others(wfd_path)
    if unsafe:
        print(f"warning: {unsafe} can be changed by a user other than root, who could then "
              "run code as root through wfd.service; install wfd as root outside any home "
              "(e.g. pip install into /opt/wfd)", file=sys.stderr)


def _daemon_reload(user: bool) -> bool:
    """`systemctl [--user] daemon-reload` when systemd runs; False if it did not run
    or failed (then its error is on stderr and the next steps include it)."""
    if not systemd_running():
        print("systemd is not running on this machine (no /run/systemd/system): "
              "the units take effect where it does", file=sys.stderr)
        return False
    command = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
    try:
        return subprocess.run(command, check=False).returncode == 0
    except OSError as err:
        print(f"warning: cannot run {' '.join(command)}: {err.strerror}", file=sys.stderr)
        return False


def _print_next_steps(user: bool, reloaded: bool) -> None:
    systemctl = "systemctl --user" if user else "systemctl"
    steps = [] if reloaded else [f"{systemctl} daemon-reload"]
    if not user and not _group_exists("wfd"):
        steps.append("groupadd --system wfd    # the socket's group; then: usermod -aG wfd USER")
    steps.append(f"{systemctl} enable --now wfd.socket wfd.service")
    if user:
        steps.append(f"loginctl enable-linger {getpass.getuser()}    "
                     "# keep it running after logout and start it at boot")
    steps.append(f"{systemctl} status wfd")
    print("next:\n" + "\n".join(f"  {step}" for step in steps))


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
