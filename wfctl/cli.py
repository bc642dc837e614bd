"""wfctl, the command-line client of wfd (SPEC 5).

Output: `run` writes only the run id to stdout; data a command was asked for
(status tables and JSON, replay, logs, validate's verdict) goes to stdout;
every message, progress line and summary goes to stderr.

Exit codes (SPEC 5, named in wfd.errors): 0 ok (`--wait`: SUCCEEDED), 1 run
FAILED, 2 bad usage or invalid input, 3 daemon unreachable or refusing us,
4 run CANCELLED, 5 damaged log, 6 storage error; an `Error` reply exits with
its `code`. Besides: 130 after Ctrl-C (a waiting client detaches, the run goes
on), 141 when stdout is a closed pipe (`wfctl logs ... | head`), and 70
(EX_SOFTWARE) for a bug in wfctl, so that a script never mistakes one for
"the run FAILED". No path prints a traceback.

Start-up is on the critical path of every `wfctl status`: this module imports
only the stdlib it needs; the socket and protocol code (msgspec) load when a
command needs the daemon, the workflow parser only for validate and run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from wfd.errors import (
    EXIT_CANCELLED,
    EXIT_CORRUPT,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    UsageError,
    WfdError,
)

if TYPE_CHECKING:
    from wfctl.conn import Connection
    from wfd.state import RunStatus
    from wfd.workflow import Workflow

EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a C tool would die with
TABLE_RUNS = 20  # runs `status` shows in its table without --all or --limit
RECONNECT_WAIT = 60.0  # a waiting client rides out a daemon restart this long

RUN_EXIT = {"SUCCEEDED": EXIT_OK, "FAILED": EXIT_RUN_FAILED,
            "CANCELLED": EXIT_CANCELLED, "CORRUPT": EXIT_CORRUPT}


class _Exit(Exception):
    """Leave with `code`; whatever had to be said was said already."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def say(line: str) -> None:
    """One line on stderr; a closed stderr must not turn a result into a crash."""
    if sys.stderr is None:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def out(line: str) -> None:
    sys.stdout.write(line + "\n")


def out_bytes(data: bytes) -> None:
    sys.stdout.flush()  # keep order with anything written through the text layer
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# ---- arguments ------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """Help formatter that finds the terminal width without importing shutil: argparse
    builds formatters on every add_argument, so this is on the path of every command."""

    def __init__(self, prog: str, **kwargs: int) -> None:
        if kwargs.get("width") is None:
            kwargs["width"] = _columns() - 2
        super().__init__(prog, **kwargs)  # type: ignore[arg-type]


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line and exits 2 through main."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)  # `--fol` is not `--follow` by accident
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("argument COMMAND: invalid choice: "):
            message = "unknown command " + _near_command(message.split(": ", 2)[2])
        raise UsageError(f"error: {message} (see wfctl --help)")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            say(message.rstrip("\n"))
        raise _Exit(status)


def _near_command(text: str) -> str:
    """argparse's "'stauts' (choose from ...)" with "did you mean 'status'?" first."""
    import difflib

    word = text.split(" (choose from", 1)[0].strip("'")
    near = difflib.get_close_matches(word, [name for name, _, _ in _COMMANDS], n=1)
    return f"{text[:len(word) + 2]}; did you mean {near[0]!r}?" if near else text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an attempt number 1, 2, ..., got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a count 1, 2, ..., got {text!r}")
    return int(text)


def _count_or_zero(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a count 0, 1, 2, ..., got {text!r}")
    return int(text)


def _duration(text: str) -> float:
    from wfd.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _since(text: str) -> float:
    import time

    from wfd.durations import parse_since

    try:
        return parse_since(text, time.time())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _width(text: str) -> int:
    from wfctl.timeline import MIN_WIDTH

    if not text.isdigit() or int(text) < MIN_WIDTH:
        raise argparse.ArgumentTypeError(f"expected a width of at least {MIN_WIDTH} "
                                         f"columns, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return int(text)


def _common(parser: argparse.ArgumentParser, top: bool, shown: bool = True) -> None:
    """--socket and --no-autostart, accepted before and after the command name (SPEC 5:
    every command); not `shown` in the help of a command that needs no daemon."""
    # Below the command the default is SUPPRESS, so an option given before it survives.
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--socket", metavar="PATH", default=default,
                        help="the daemon's socket (default: $WFD_SOCKET, the user daemon's, "
                             "then the system daemon's)" if shown else argparse.SUPPRESS)
    parser.add_argument("--no-autostart", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="do not start a daemon when none answers "
                             "(also WFD_NO_AUTOSTART=1)" if shown else argparse.SUPPRESS)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; given `argv`, only the command named there gets its arguments
    (the others keep their one-line help): building all of them costs start-up time."""
    wanted = None if argv is None else _command_in(argv)
    parser = _Parser(prog="wfctl", description="Client of wfd, the durable workflow daemon.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, args in _COMMANDS:
        full = wanted is None or name == wanted
        cmd = sub.add_parser(name, help=help_text, description=help_text, add_help=full)
        if full:
            for flags, kwargs in args:
                cmd.add_argument(*flags, **kwargs)
            _common(cmd, top=False, shown=name not in OFFLINE)
            if name == "schedule":
                from wfctl import schedcli

                schedcli.add_parser(cmd)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command name in `argv`: the first word that is not an option or the value
    of `--socket`. A wrong guess costs nothing: argparse judges the real argv."""
    words = iter(argv)
    for word in words:
        if word == "--socket":
            next(words, None)
        elif word == "--":
            return next(words, None)
        elif not word.startswith("-"):
            return word
    return None


_JSON = (("--json",), {"action": "store_true", "help": "print JSON"})
OFFLINE = frozenset({"validate", "completion"})  # commands that never talk to a daemon: no --socket
TAIL_LINES = 10
_TAIL = (("--tail",), {"metavar": "N", "type": _count_or_zero, "default": TAIL_LINES,
                       "help": f"show the last N lines of each failed step's log under the "
                               f"run's table (default {TAIL_LINES}; 0: none)"})
_RUN_ID = (("run_id",), {"metavar": "RUN_ID",
                         "help": "a run id or a reference: 5c9b, @last, NAME@last, NAME@-2"})
_WAIT = [(("--wait",), {"action": "store_true", "help": "wait until the run ends"}),
         (("--follow",), {"action": "store_true",
                          "help": "wait, and show each transition on stderr"})]
_COMMANDS: list[tuple[str, str, list[tuple[tuple[str, ...], dict]]]] = [
    ("validate", "check a workflow file; no daemon needed",
     [(("file",), {"metavar": "FILE"}), _JSON]),
    ("run", "submit a workflow; print its run id",
     [(("file",), {"metavar": "FILE"}),
      (("vars",), {"metavar": "KEY=VALUE", "nargs": "*",
                   "help": "a variable of every step, over the workflow's env"}),
      (("--wait",), {"action": "store_true", "help": "wait until the run ends"}),
      (("--follow",), {"action": "store_true",
                       "help": "wait, and show each transition on stderr"}),
      (("--key",), {"metavar": "K",
                    "help": "submit once: if a run of yours has this key, print its id "
                            "instead (a script may retry safely)"}),
      _TAIL]),
    ("status", "show one run, or your runs (oldest first, the newest at the bottom)",
     [(("run_id",), {"metavar": "RUN", "nargs": "?",
                     "help": "a run id or reference (5c9b, @last, NAME@last, NAME@-2)"}),
      _JSON,
      (("--state",), {"metavar": "S", "action": "append", "type": str.upper, "default": [],
                      "help": "only runs in state S (repeatable: any of them)"}),
      (("--name",), {"metavar": "N", "help": "only runs of workflow N"}),
      (("--since",), {"metavar": "WHEN", "type": _since,
                      "help": "only runs created since: a duration back (2h, 7d) or a "
                              "time (2026-11-25, 2026-11-25T14:00)"}),
      (("--limit",), {"metavar": "N", "type": _count,
                      "help": "only the newest N (default: 20 in the table, all in JSON)"}),
      (("--all",), {"action": "store_true", "help": "every run, not the newest 20"}),
      _TAIL]),
    ("cancel", "cancel a run", [_RUN_ID, _JSON]),
    ("replay", "re-fold a run's event log and check it", [_RUN_ID, _JSON]),
    ("resume", "continue a FAILED or CANCELLED run", [_RUN_ID, *_WAIT, _JSON]),
    ("retry", "run steps of a finished run again, in that run (the others keep their "
              "results)",
     [_RUN_ID, (("steps",), {"metavar": "STEP", "nargs": "+", "help": "a step to run again"}),
      (("--downstream",), {"action": "store_true",
                           "help": "and every step after them"}),
      *_WAIT, _JSON]),
    ("rerun", "run a run's workflow again, as a new run (same directory, environment and "
              "variables; KEY=VALUE over them); print its run id",
     [_RUN_ID, (("vars",), {"metavar": "KEY=VALUE", "nargs": "*",
                            "help": "a variable of every step, over the run's own"}),
      *_WAIT]),
    ("resume-all", "resume every unfinished run the daemon is not running", [_JSON]),
    ("logs", "print a step attempt's output, or without STEP every step's, line by line "
             "prefixed with its step",
     [_RUN_ID, (("step",), {"metavar": "STEP", "nargs": "?",
                            "help": "this step (default: every step, in the order its "
                                    "attempts started)"}),
      (("--attempt",), {"metavar": "N", "type": _positive,
                        "help": "this attempt (default: the latest)"}),
      (("--follow",), {"action": "store_true", "help": "stream output as it comes"})]),
    ("prune", "remove finished runs (yours; root: anyone's), their logs and outputs",
     [(("--keep",), {"metavar": "N", "type": _count_or_zero,
                     "help": "keep the newest N of the runs selected"}),
      (("--older-than",), {"metavar": "DURATION", "type": _duration,
                           "help": "only runs that finished more than DURATION ago (7d, 12h)"}),
      (("--state",), {"metavar": "S", "action": "append", "type": str.upper, "default": [],
                      "help": "only runs in state S (repeatable; default: SUCCEEDED, FAILED "
                              "and CANCELLED; never an unfinished run)"}),
      (("--name",), {"metavar": "N", "help": "only runs of workflow N"}),
      (("--dry-run",), {"action": "store_true", "help": "only list what would be removed"}),
      _JSON]),
    ("shutdown", "stop the daemon as SIGTERM would (running steps go on)",
     [(("--stop-steps",), {"action": "store_true",
                           "help": "stop the running steps first (they run again on the "
                                   "next start)"}),
      _JSON]),
    ("pool", "list the daemon's shared pools, or set one's limit: pool list | pool set NAME N",
     [(("action",), {"choices": ("list", "set"), "metavar": "list|set"}),
      (("name",), {"metavar": "NAME", "nargs": "?"}),
      (("limit",), {"metavar": "N", "nargs": "?",
                    "help": "the pool's new limit, 0 or more (0: its steps wait)"}),
      _JSON]),
    ("graph", "draw the DAG of a workflow file or of a run (coloured by state)",
     [(("target",), {"metavar": "FILE|RUN"}),
      (("--format",), {"choices": ("mermaid", "dot", "svg"), "default": "svg",
                       "help": "output format (default: svg)"})]),
    ("timeline", "a terminal Gantt chart of a run's attempts, retries and waits",
     [_RUN_ID, (("--width",), {"metavar": "N", "type": _width,
                               "help": "columns (default: the terminal's)"})]),
    ("schedule", "run a workflow on a schedule: add, list, show, pause, unpause, rm, "
                 "update, fire", []),
    ("completion", "print the shell completion script: wfctl completion bash > "
                   "~/.local/share/bash-completion/completions/wfctl",
     [(("shell",), {"choices": ("bash", "zsh", "fish"), "metavar": "bash|zsh|fish"})]),
    ("web", "serve a live web page of your runs on 127.0.0.1 (needs wfd[web])",
     [(("--port",), {"metavar": "N", "type": _port, "default": 0,
                     "help": "port (default: a free one)"}),
      (("--open",), {"action": "store_true", "help": "open it in a browser"})]),
]


# ---- shared steps -----------------------------------------------------------------


def _connect(args: argparse.Namespace, autostart: bool = True) -> Connection:
    from wfctl.conn import open_connection

    return open_connection(args.socket, autostart and not args.no_autostart)


def read_workflow(path: str) -> bytes:
    """A workflow file's bytes: a regular file of at most the frame limit (a bigger one
    could never be submitted). The type and size are checked before anything is read,
    so `/dev/zero` is not read without end and a FIFO does not block."""
    import stat

    from wfd.protocol import MAX_FRAME

    try:
        mode = os.stat(path).st_mode
        # A device is refused unopened; O_NONBLOCK: a FIFO put there after the stat must
        # not block the open (the fstat below refuses it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if stat.S_ISREG(mode) else -1
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if fd < 0:
        raise UsageError(f"cannot read {path}: {_not_regular(mode)}")
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"cannot read {path}: {_not_regular(info.st_mode)}")
        try:
            data = f.read(MAX_FRAME + 1) if info.st_size <= MAX_FRAME else b""
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    size = max(info.st_size, len(data))
    if size > MAX_FRAME:
        raise UsageError(f"{path}: too large ({size} bytes; a workflow may have at most "
                         f"{MAX_FRAME} bytes, 16 MiB)")
    return data


def _not_regular(mode: int) -> str:
    import stat

    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(mode)), "not a file")
    return f"not a regular file ({kind})"


def load_workflow(path: str) -> tuple[str, Workflow]:
    """Read and validate a workflow file (`-`: stdin), JSON or YAML: its JSON text and
    the workflow. Problems are reported as `FILE: problem` (YAML: `FILE:LINE:COL:
    problem`), one a line, and end the command with exit 2."""
    data = read_stdin() if path == "-" else read_workflow(path)
    from wfctl.yamlfile import is_yaml
    from wfd.errors import WorkflowInvalid
    from wfd.workflow import parse_workflow

    doc = None
    try:
        if is_yaml(path, data):
            from wfctl.yamlfile import Document

            doc = Document(data)
            data = doc.text.encode()
        workflow = parse_workflow(data, default_name=_stem(path))
    except WorkflowInvalid as e:
        for problem in e.problems:
            placed = problem if doc is None else doc.where(problem)
            say(f"{path}:{placed}" if placed[:1].isdigit() else f"{path}: {placed}")
        raise _Exit(EXIT_USAGE) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # the parser should have said so; never send mojibake
        raise UsageError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return text, workflow


def _stem(path: str) -> str:
    return "stdin" if path == "-" else os.path.splitext(os.path.basename(path))[0]


def read_stdin() -> bytes:
    """A workflow from stdin (`wfctl run -`), at most the frame limit."""
    from wfd.protocol import MAX_FRAME

    try:
        data = sys.stdin.buffer.read(MAX_FRAME + 1)
    except (OSError, AttributeError, ValueError) as e:
        raise UsageError(f"cannot read stdin: {e}") from None
    if len(data) > MAX_FRAME:
        raise UsageError(f"stdin: too large (a workflow may have at most {MAX_FRAME} "
                         "bytes, 16 MiB)")
    return data


def _print_json(obj: object) -> None:
    import msgspec

    out_bytes(msgspec.json.format(msgspec.json.encode(obj), indent=2) + b"\n")


def _event_line(event: object) -> str:
    from wfctl.render import local_time
    from wfd.state import describe

    return f"{local_time(event.ts, '%H:%M:%S')} {describe(event)}"  # type: ignore[attr-defined]


# ---- commands ---------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    if args.json:
        return _validate_json(args.file)
    _, workflow = load_workflow(args.file)
    steps = len(workflow.steps)
    out(f"{args.file}: ok ({steps} step{'' if steps == 1 else 's'})")
    if workflow.params:  # what `wfctl run FILE NAME=VALUE` takes
        from wfctl.render import table

        rows = [[name, "(required)" if param.required else
                 ("(unset)" if param.default is None else param.default),
                 param.description or "-"] for name, param in workflow.params.items()]
        for line in table(["PARAM", "DEFAULT", "DESCRIPTION"], rows):
            out(line)
    return EXIT_OK


def _validate_json(path: str) -> int:
    """`{"file", "ok", "steps", "problems"}` on stdout, exit 0 or 2: for editors and CI."""
    import contextlib
    import io

    problems = io.StringIO()
    steps = None
    try:
        with contextlib.redirect_stderr(problems):
            steps = len(load_workflow(path)[1].steps)
    except _Exit:
        pass
    except UsageError as e:  # unreadable: one problem like any other
        problems.write(e.message + "\n")
    found = problems.getvalue().splitlines()
    _print_json({"file": path, "ok": not found, "steps": steps, "problems": found})
    return EXIT_USAGE if found else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from wfd import protocol

    text, workflow = load_workflow(args.file)  # before anything is contacted
    variables = parse_vars(args.vars)
    from wfd.params import resolve_vars

    resolve_vars(workflow, variables)  # a typo or a missing param ends it here (the daemon
    # checks again, and fills in the defaults itself)
    umask = os.umask(0o077)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    base_dir = os.path.dirname(os.path.abspath(args.file))
    if not _is_text(base_dir):
        raise UsageError(f"{args.file}: its directory's path is not UTF-8, and the steps' "
                         "working directory travels to wfd as text")
    submit = protocol.Submit(
        workflow=text, base_dir=base_dir,
        source="stdin" if args.file == "-" else _as_text(os.path.basename(args.file)),
        env=submitted_env(), umask=umask, vars=variables, key=args.key,
    )
    size = len(protocol.encode_frame(submit)) - protocol.HEADER.size
    if size > protocol.MAX_FRAME:  # the daemon would cut us off mid-send ("Broken pipe")
        raise UsageError(f"{args.file}: too large to submit ({size} bytes with the "
                         f"environment; at most {protocol.MAX_FRAME} bytes, 16 MiB)")
    conn = _connect(args)
    submitted = conn.call(submit, protocol.Submitted)
    run_id = submitted.run_id  # type: ignore[attr-defined]
    if submitted.existing:  # type: ignore[attr-defined]
        say(f"wfctl: run {run_id} has key {args.key!r} already; not submitted again")
    out(run_id)
    sys.stdout.flush()  # a script reading the id must get it now, not at exit
    return _wait_if_asked(args, conn, run_id)


def _wait_if_asked(args: argparse.Namespace, conn: Connection, run_id: str,
                   after_seq: int = 0) -> int:
    """`--wait` / `--follow`: watch the run to its end (from `after_seq`); exit as the run
    ended. Without them, 0 at once."""
    if not (args.wait or args.follow):
        return EXIT_OK
    try:
        status = watch(conn, run_id, args.follow, after_seq)
    except KeyboardInterrupt:
        say(f"wfctl: detached; run {run_id} goes on")
        return EXIT_INTERRUPTED
    tail = getattr(args, "tail", TAIL_LINES)  # `run` has --tail; the others the default
    return _ended(status, args.follow, lambda: _connect(args), tail)


def parse_vars(words: list[str]) -> dict[str, str]:
    """`KEY=VALUE` arguments as a dict (a later KEY wins). A word without `=`, an empty or
    bad name, or a WFD_* name (the daemon's own) is a usage error."""
    from wfd.workflow import env_problems

    variables: dict[str, str] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not eq or not name:
            raise UsageError(f"expected KEY=VALUE, got {word!r}")
        if name.startswith("WFD_"):
            raise UsageError(f"{name}: WFD_* variables are set by wfd, not by the caller")
        if not (_is_text(name) and _is_text(value)):
            raise UsageError(f"{name!r}: not UTF-8 (wfd carries variables as text)")
        variables[name] = value
    problems = env_problems(variables)
    if problems:
        where, why = problems[0]
        raise UsageError(f"KEY=VALUE {where}: {why}")
    return variables


def submitted_env() -> dict[str, str]:
    """This environment, for the steps, without the variables that are not UTF-8 (the
    protocol carries text; Python holds such bytes as lone surrogates): each is named
    in one warning on stderr, rather than failing the run."""
    env, dropped = {}, []
    for name, value in os.environ.items():
        if _is_text(name) and _is_text(value):
            env[name] = value
        else:
            dropped.append(repr(os.fsencode(name))[2:-1])  # the raw bytes, escaped
    if dropped:
        say(f"wfctl: warning: not passing {', '.join(dropped)} to the steps: "
            "not UTF-8 (wfd carries the environment as text)")
    return env


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value: str) -> str:
    """A name that is only shown (the run's default name): undecodable bytes become U+FFFD."""
    return os.fsencode(value).decode(errors="replace")


def watch(conn: Connection, run_id: str, follow: bool, after_seq: int = 0) -> RunStatus:
    """Watch the run to its end from after `after_seq`, printing transitions if `follow`;
    on a lost connection reconnect (the daemon may be restarting) and go on after the
    last seq seen."""
    from wfctl.conn import Lost, expect, reconnect
    from wfd import protocol

    last = after_seq
    while True:
        try:
            conn.send(protocol.Watch(run_id=run_id, after_seq=last))
            while True:
                reply = conn.recv()
                if isinstance(reply, protocol.RunEnded):
                    return reply.status
                for event in expect(reply, protocol.Progress, conn.path).events:
                    if event.seq > last:  # a resent event after a reconnect is not news
                        last = event.seq
                        if follow:
                            say(_event_line(event))
        except Lost as e:
            conn.close()
            say(f"wfctl: {e.message}; reconnecting (run {run_id} goes on)")
            conn = reconnect(conn.path, RECONNECT_WAIT, conn.trust)


def _ended(status: RunStatus, follow: bool, connect: Callable[[], Connection] | None = None,
           tail: int = TAIL_LINES) -> int:
    """The end of a waiting command: the table (--follow), the last lines of each failed
    step's log (given `connect`: the watch may have reconnected meanwhile), the summary
    line; all on stderr. The exit code."""
    from wfctl.render import run_lines, summary_line

    if follow:
        for line in run_lines(status, None):
            say(line)
    if connect is not None and tail:
        from wfctl.logview import failure_tails

        for line in failure_tails(connect, status, tail):
            say(line)
    say(summary_line(status))
    code = RUN_EXIT.get(status.state)
    if code is None:
        from wfctl.conn import BadReply

        raise BadReply("wfd", f"the run ended in state {status.state}")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from wfctl import render
    from wfd import protocol

    filters = args.state or args.name is not None or args.since is not None
    if args.run_id and (filters or args.limit or args.all):
        raise UsageError("error: --state, --name, --since, --limit and --all list runs; "
                         "they do not go with a RUN (see wfctl status --help)")
    if args.all and args.limit:
        raise UsageError("error: --all and --limit do not go together")
    conn = _connect(args)
    if args.run_id:
        status = conn.call(protocol.Status(run_id=args.run_id), protocol.RunInfo).status
        if args.json:
            _print_json(status)
        else:
            from wfctl.logview import failure_tails

            out("\n".join(render.run_lines(status, time.time())
                          + failure_tails(lambda: conn, status, args.tail)))
        return EXIT_OK
    # The table shows a screenful, the newest at the bottom; JSON (for scripts) every run.
    limit = args.limit or (None if args.json or args.all else TABLE_RUNS)
    request = protocol.Status(states=args.state, name=args.name, since=args.since, limit=limit)
    reply = conn.call(request, protocol.RunList)
    if reply.storage_error:  # type: ignore[attr-defined]
        say(f"wfctl: warning: wfd {reply.storage_error}; "  # type: ignore[attr-defined]
            "no run makes progress until it can")
    runs = reply.runs  # type: ignore[attr-defined]
    if args.json:
        _print_json(runs)
        return EXIT_OK
    if not runs:
        say("no runs match" if filters else "no runs")
        return EXIT_OK
    matched = max(reply.matched, len(runs))  # type: ignore[attr-defined]
    counts = reply.counts or _count_states(runs)  # type: ignore[attr-defined]
    older = matched - len(runs)
    if older > 0:
        say(f"{older} older run{'' if older == 1 else 's'} not shown (--all)")
    out("\n".join(render.runs_lines(runs, time.time())))
    sys.stdout.flush()  # the table before the summary under it
    say(render.counts_line(matched, counts))
    return EXIT_OK


def _count_states(runs: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    return counts


def cmd_cancel(args: argparse.Namespace) -> int:
    from wfd import protocol

    reply = _connect(args).call(protocol.Cancel(run_id=args.run_id), protocol.Cancelled)
    run_id = reply.run_id or args.run_id  # type: ignore[attr-defined]
    if args.json:
        _print_json({"run_id": run_id, "state": reply.state,  # type: ignore[attr-defined]
                     "was_finished": reply.was_finished})  # type: ignore[attr-defined]
    elif reply.was_finished:  # type: ignore[attr-defined]
        say(f"run {run_id} already finished: {reply.state}")  # type: ignore[attr-defined]
    else:
        say(f"run {run_id} cancelled")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from wfctl.render import run_lines
    from wfd import protocol

    reply = _connect(args).call(protocol.Replay(run_id=args.run_id), protocol.Replayed)
    if args.json:
        # Same log, same bytes: lines keep their stored key order, state is a Struct.
        _print_json({"events": [_line_object(line) for line in reply.lines],
                     "state": reply.status})
    else:
        text = list(reply.transitions)
        if reply.status is not None:
            text += ["", *run_lines(reply.status, None)]  # no clock: replay is of the log
        if text:
            out("\n".join(text))
    sys.stdout.flush()
    for problem in reply.problems:
        say(f"wfctl: {problem}")
    if reply.torn_tail:
        say(f"wfctl: note: {reply.torn_tail}")
    return EXIT_CORRUPT if reply.problems else EXIT_OK


def _line_object(line: str) -> object:
    """A log line as its JSON object; a damaged line (also named in `problems`) as the
    string it is, so that nothing is silently left out."""
    import msgspec

    try:
        value = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return line
    return value if isinstance(value, dict) else line


def cmd_resume(args: argparse.Namespace) -> int:
    from wfd import protocol

    conn = _connect(args)
    reply = conn.call(protocol.Resume(run_id=args.run_id), protocol.Resumed)
    _report_resumed(reply.run_ids, args.json)  # type: ignore[attr-defined]
    [run_id] = reply.run_ids  # type: ignore[attr-defined]
    return _wait_if_asked(args, conn, run_id, reply.after_seq.get(run_id, 0))  # type: ignore[attr-defined]


def cmd_retry(args: argparse.Namespace) -> int:
    from wfd import protocol

    conn = _connect(args)
    request = protocol.Retry(run_id=args.run_id, steps=args.steps, downstream=args.downstream)
    reply = conn.call(request, protocol.Retried)
    if args.json:
        _print_json({"run_id": reply.run_id, "steps": reply.steps})  # type: ignore[attr-defined]
    else:
        say(f"run {reply.run_id} retrying {', '.join(reply.steps)}")  # type: ignore[attr-defined]
    return _wait_if_asked(args, conn, reply.run_id, reply.after_seq)  # type: ignore[attr-defined]


def cmd_rerun(args: argparse.Namespace) -> int:
    from wfd import protocol

    conn = _connect(args)
    request = protocol.Rerun(run_id=args.run_id, vars=parse_vars(args.vars))
    run_id = conn.call(request, protocol.Submitted).run_id  # type: ignore[attr-defined]
    out(run_id)
    sys.stdout.flush()  # a script reading the id must get it now, not at exit
    return _wait_if_asked(args, conn, run_id)


def cmd_resume_all(args: argparse.Namespace) -> int:
    from wfd import protocol

    reply = _connect(args).call(protocol.ResumeAll(), protocol.Resumed)
    return _report_resumed(reply.run_ids, args.json)  # type: ignore[attr-defined]


def _report_resumed(run_ids: list[str], json: bool = False) -> int:
    if json:
        _print_json({"run_ids": run_ids})
        return EXIT_OK
    for run_id in run_ids:
        say(f"run {run_id} resumed")
    if not run_ids:
        say("no runs to resume")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from wfctl.conn import expect
    from wfd import protocol

    if args.step is None:
        if args.attempt is not None:
            raise UsageError("error: --attempt needs a STEP (see wfctl logs --help)")
        return _all_logs(args)
    request = protocol.Logs(run_id=args.run_id, step=args.step,
                            attempt=args.attempt, follow=args.follow)
    conn = _connect(args)
    shown = None
    sink = sys.stdout.buffer
    for reply in conn.stream(request):
        if isinstance(reply, protocol.LogEnd):
            if reply.attempt is None:  # nothing to show, and why
                say(f"step {args.step} never started (it is {reply.step_state})")
            break
        chunk = expect(reply, protocol.LogData, conn.path)
        if shown is not None and chunk.attempt != shown:  # type: ignore[attr-defined]
            # --follow went on to the next attempt: say so where it cannot mix with output
            say(f"wfctl: attempt {chunk.attempt} of {args.step}")  # type: ignore[attr-defined]
        shown = chunk.attempt  # type: ignore[attr-defined]
        sink.write(chunk.data)  # type: ignore[attr-defined]
        sink.flush()
    return EXIT_OK


def _all_logs(args: argparse.Namespace) -> int:
    from wfctl.logview import all_logs

    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    try:
        status = all_logs(_connect(args), args.run_id, args.follow, write)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if not any(step.attempts for step in status.steps.values()):
        say(f"run {status.run_id}: no step has started yet")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from wfd import protocol

    request = protocol.Prune(keep=args.keep, older_than=args.older_than, states=args.state,
                             name=args.name, dry_run=args.dry_run)
    reply = _connect(args).call(request, protocol.Pruned)
    run_ids = reply.run_ids  # type: ignore[attr-defined]
    if args.json:
        _print_json({"run_ids": run_ids, "dry_run": args.dry_run})
        return EXIT_OK
    if run_ids:
        out("\n".join(run_ids))
    count = f"{len(run_ids)} run{'' if len(run_ids) == 1 else 's'}"
    say(f"would remove {count} (--dry-run)" if args.dry_run else f"removed {count}")
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    from wfd import protocol

    # Starting a daemon only to stop it helps nobody.
    _connect(args, autostart=False).call(protocol.Shutdown(stop_steps=args.stop_steps),
                                         protocol.Ok)
    if args.json:
        _print_json({"stopping": True, "stop_steps": args.stop_steps})
        return EXIT_OK
    say("wfd stopping" + (" its steps, then itself" if args.stop_steps else
                          "; running steps go on"))
    return EXIT_OK


def cmd_pool(args: argparse.Namespace) -> int:
    from wfctl import render
    from wfd import protocol

    if args.action == "list":
        if args.name is not None:
            raise UsageError("error: pool list takes no NAME (see wfctl pool --help)")
        request: protocol.Message = protocol.PoolList()
    else:
        if args.name is None or args.limit is None:
            raise UsageError("error: pool set needs NAME and N (see wfctl pool --help)")
        if not (args.limit.isascii() and args.limit.isdigit()):
            raise UsageError(f"error: a pool's limit is an integer 0 or more, got "
                             f"{args.limit!r}")
        request = protocol.PoolSet(name=args.name, limit=int(args.limit))
    pools = _connect(args).call(request, protocol.Pools).pools  # type: ignore[attr-defined]
    if args.action == "set":
        say(f"pool {args.name}: limit {int(args.limit)}")
        if not args.json:
            return EXIT_OK
    if args.json:
        _print_json(pools)
    elif pools:
        out("\n".join(render.pools_lines(pools)))
    else:
        say("no pools (start wfd with --pool NAME=N, or wfctl pool set NAME N)")
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    from wfctl import graph

    if _names_file(args.target):
        _, workflow = load_workflow(args.target)
        picture = graph.from_workflow(workflow)
    else:
        from wfd import protocol

        request = protocol.Status(run_id=args.target)
        picture = graph.from_status(_connect(args).call(request, protocol.RunInfo).status)
    out_bytes(graph.render(picture, args.format).encode())
    return EXIT_OK


def _names_file(target: str) -> bool:
    """FILE or RUN: an existing path, or a word shaped like one (a run id never has a `/`
    or an extension), is a file; anything else is a run for the daemon to find."""
    return (os.path.exists(target) or "/" in target
            or target.endswith((".json", ".yaml", ".yml")))


def cmd_timeline(args: argparse.Namespace) -> int:
    import shutil
    import time

    from wfctl import timeline
    from wfd import protocol

    reply = _connect(args).call(protocol.Replay(run_id=args.run_id), protocol.Replayed)
    for problem in reply.problems:
        say(f"wfctl: {problem}")
    if reply.status is None:
        return EXIT_CORRUPT
    width = args.width or shutil.get_terminal_size().columns
    utf8 = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    segs = timeline.segments(timeline.decode(reply.lines))
    lines = timeline.chart(reply.status, segs, time.time(), width,
                           timeline.UNICODE if utf8 else timeline.ASCII, colour)
    out("\n".join(lines))
    return EXIT_CORRUPT if reply.problems else EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from wfctl.completion import script

    out(script(args.shell).rstrip("\n"))
    return EXIT_OK


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from wfctl.web.app import serve
    except ImportError as e:
        if not (e.name or "").startswith(("aiohttp", "multidict", "yarl")):
            raise
        raise UsageError("wfctl web needs the web extra: pip install 'wfd[web]'") from None
    return serve(_connect(args), args.port, args.open)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": cmd_validate, "run": cmd_run, "status": cmd_status, "cancel": cmd_cancel,
    "replay": cmd_replay, "resume": cmd_resume, "resume-all": cmd_resume_all,
    "logs": cmd_logs, "retry": cmd_retry, "rerun": cmd_rerun, "prune": cmd_prune,
    "shutdown": cmd_shutdown, "pool": cmd_pool,
    "graph": cmd_graph, "timeline": cmd_timeline, "web": cmd_web,
    "completion": cmd_completion,
    "schedule": lambda args: cmd_schedule(args),
}


def cmd_schedule(args: argparse.Namespace) -> int:
    from wfctl import schedcli

    return schedcli.cmd_schedule(args, _connect)


# ---- entry point -------------------------------------------------------------------


def _dispatch(argv: list[str]) -> int:
    if "_ARGCOMPLETE" in os.environ:  # a shell asks for completions (wfctl completion)
        from wfctl.completion import complete

        complete(build_parser(None))
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE words after an option (`run FILE --wait A=1`): argparse leaves them over.
    if extra and hasattr(args, "vars") and not any(w.startswith("-") for w in extra):
        args.vars = [*args.vars, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from wfd import __version__
        from wfd.protocol import PROTOCOL

        out(f"wfctl {__version__} (protocol {PROTOCOL})")
        return EXIT_OK
    if args.command is None:
        raise UsageError("error: no command given (see wfctl --help)")
    return HANDLERS[args.command](args)


def _silence_stdout() -> None:
    """stdout is a closed pipe: point it at /dev/null so the flush at exit is quiet too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one wfctl command; returns the exit code and never raises (but SystemExit)."""
    try:
        code = _dispatch(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()
        return code
    except _Exit as e:
        return e.code
    except WfdError as e:
        say(f"wfctl: {e.message}")
        return e.exit_code
    except KeyboardInterrupt:
        say("")  # end the line the terminal's ^C left open
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Socket errors arrive wrapped (wfctl.conn.Lost), so this is stdout or stderr.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:  # a bug: one line, no traceback, an exit code of its own
        say(f"wfctl: internal error: {type(e).__name__}: {e}")
        return EXIT_INTERNAL
