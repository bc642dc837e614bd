"""`wfctl schedule ...`: add, list, show, pause, unpause, rm, update, fire (issue 13).

The workflow file is read here and sent with the schedule: the daemon never
opens a client's path (SPEC 6). Times are shown in local time; `--json` gives
the daemon's `ScheduleView`s as they are (UTC RFC 3339).
"""

from __future__ import annotations

import argparse
import os

from wfd.errors import EXIT_OK, UsageError

ACTIONS = ("add", "list", "show", "pause", "unpause", "rm", "update", "fire")


def add_parser(cmd: argparse.ArgumentParser) -> None:
    """The actions of `wfctl schedule`, as subcommands of `cmd`."""
    from wfd.schedules import CATCH_UP, MAX_CATCH_UP, OVERLAP

    actions = cmd.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser("add", help="add a schedule of a workflow file")
    add.add_argument("name", metavar="NAME")
    add.add_argument("file", metavar="FILE")
    add.add_argument("vars", metavar="KEY=VALUE", nargs="*",
                     help="a variable of every step, over the workflow's env")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR",
                      help='five cron fields ("30 2 * * 1-5") or @hourly, @daily, ...')
    when.add_argument("--every", metavar="DURATION",
                      help="a run every DURATION (30s, 15m, 2h30m, 1d) from now")
    add.add_argument("--tz", metavar="ZONE",
                     help="the IANA time zone of --cron (default: this machine's)")
    add.add_argument("--catch-up", choices=CATCH_UP, default="latest",
                     help="after downtime: run no missed slot, the latest one (default), "
                          "or all of them")
    add.add_argument("--max-catch-up", metavar="N", type=_count, default=MAX_CATCH_UP,
                     help=f"--catch-up all runs at most N missed slots (default "
                          f"{MAX_CATCH_UP}); the rest are recorded as skipped")
    add.add_argument("--overlap", choices=OVERLAP, default="skip",
                     help="while the previous run is unfinished: skip the slot (default), "
                          "queue it, or allow a second run")
    add.add_argument("--clear-env", action="store_true",
                     help="store no variable of this environment (see --env-keep)")
    add.add_argument("--env-keep", metavar="NAME", action="append", default=[],
                     help="with --clear-env: store this variable all the same (repeatable)")
    listing = actions.add_parser("list", help="your schedules: next slot, last run")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (("show", "one schedule in full"), ("pause", "stop firing slots"),
                         ("unpause", "fire slots again (those that fell meanwhile are "
                                     "recorded as skipped)"),
                         ("rm", "remove a schedule (its runs stay)"),
                         ("fire", "run it now (a slot of its own); print the run id")):
        one = actions.add_parser(action, help=text)
        one.add_argument("name", metavar="NAME")
        if action == "show":
            one.add_argument("--json", action="store_true", help="print JSON")
    update = actions.add_parser("update", help="later runs use this workflow file")
    update.add_argument("name", metavar="NAME")
    update.add_argument("file", metavar="FILE")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number 0, 1, 2, ..., got {text!r}")
    return int(text)


def cmd_schedule(args: argparse.Namespace, connect) -> int:
    if args.action is None:
        raise UsageError(f"error: schedule needs an action: {', '.join(ACTIONS)} "
                         "(see wfctl schedule --help)")
    return _HANDLERS[args.action](args, connect)


def _add(args: argparse.Namespace, connect) -> int:
    from wfctl.cli import load_workflow, parse_vars
    from wfd import protocol
    from wfd.durations import parse_duration

    text, _ = load_workflow(args.file)
    every = None
    if args.every is not None:
        try:
            every = parse_duration(args.every)
        except ValueError as exc:
            raise UsageError(f"--every {exc}") from None
    if args.env_keep and not args.clear_env:
        raise UsageError("--env-keep goes with --clear-env")
    request = protocol.ScheduleAdd(
        name=args.name, **_context(args.file, text), env=_env(args),
        umask=_umask(), vars=parse_vars(args.vars), cron=args.cron, every=every,
        tz=args.tz or local_zone(), catch_up=args.catch_up, max_catch_up=args.max_catch_up,
        overlap=args.overlap)
    view = connect(args).call(request, protocol.Schedules).schedules[0]
    _say(f"schedule {view.name} added; next run {_local(view.next_at)}")
    return EXIT_OK


def _update(args: argparse.Namespace, connect) -> int:
    from wfctl.cli import load_workflow
    from wfd import protocol

    text, _ = load_workflow(args.file)
    request = protocol.ScheduleUpdate(name=args.name, **_context(args.file, text))
    view = connect(args).call(request, protocol.Schedules).schedules[0]
    _say(f"schedule {view.name} updated; next run {_local(view.next_at)}")
    return EXIT_OK


def _list(args: argparse.Namespace, connect) -> int:
    from wfctl.cli import _print_json, out, say
    from wfd import protocol

    views = connect(args).call(protocol.ScheduleList(), protocol.Schedules).schedules
    if args.json:
        _print_json(views)
    elif not views:
        say("no schedules")
    else:
        out("\n".join(list_lines(views)))
    return EXIT_OK


def _show(args: argparse.Namespace, connect) -> int:
    from wfctl.cli import _print_json, out
    from wfd import protocol

    view = connect(args).call(protocol.ScheduleList(name=args.name),
                              protocol.Schedules).schedules[0]
    if args.json:
        _print_json(view)
    else:
        out("\n".join(show_lines(view)))
    return EXIT_OK


def _command(action: str):
    def run(args: argparse.Namespace, connect) -> int:
        from wfctl.cli import out
        from wfd import protocol

        request = protocol.ScheduleCommand(name=args.name, action=action)
        if action == "fire":
            out(connect(args).call(request, protocol.Submitted).run_id)
            return EXIT_OK
        connect(args).call(request, protocol.Ok)
        _say(f"schedule {args.name} {_DONE[action]}")
        return EXIT_OK

    return run


_DONE = {"pause": "paused", "unpause": "unpaused", "remove": "removed"}
_HANDLERS = {
    "add": _add, "update": _update, "list": _list, "show": _show,
    "pause": _command("pause"), "unpause": _command("unpause"), "rm": _command("remove"),
    "fire": _command("fire"),
}


# ---- what is sent ------------------------------------------------------------------


def _context(path: str, text: str) -> dict[str, str]:
    from wfctl.cli import _as_text, _is_text

    base_dir = os.path.dirname(os.path.abspath(path))
    if not _is_text(base_dir):
        raise UsageError(f"{path}: its directory's path is not UTF-8")
    return {"workflow": text, "source": _as_text(os.path.basename(path)), "base_dir": base_dir}


def _env(args: argparse.Namespace) -> dict[str, str]:
    """The environment stored with the schedule: this one, or with --clear-env only the
    --env-keep variables."""
    from wfctl.cli import submitted_env

    env = submitted_env()
    if args.clear_env:
        env = {name: env[name] for name in args.env_keep if name in env}
    return env


def _umask() -> int:
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def local_zone() -> str:
    """This machine's IANA zone name: $TZ if it is one, else /etc/localtime's target;
    UTC if neither says."""
    from wfd.schedules import ScheduleError, zone

    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                zone(name)
                return name
            except ScheduleError:
                continue
    return "UTC"


# ---- what is shown -----------------------------------------------------------------


def _local(ts: str | None) -> str:
    from wfctl.render import local_time

    return "-" if ts is None else local_time(ts)


def when(view) -> str:
    from wfd.durations import format_duration

    if view.cron is not None:
        return f"cron {view.cron} ({view.tz})"
    return f"every {format_duration(view.every)}"


def list_lines(views) -> list[str]:
    from wfctl.render import table

    rows = [[v.name, when(v), "paused" if v.paused else _local(v.next_at),
             v.last_run or "-", v.last_run_state or "-"] for v in views]
    return table(["NAME", "WHEN", "NEXT", "LAST_RUN", "STATE"], rows)


def show_lines(v) -> list[str]:
    from wfd.text import printable

    lines = [
        f"schedule   {v.name}  (owner {v.owner})",
        f"workflow   {v.workflow}",
        f"when       {when(v)}",
        f"catch-up   {v.catch_up} (at most {v.max_catch_up})",
        f"overlap    {v.overlap}",
        f"state      {'paused' if v.paused else 'active'}",
        f"next       {'-' if v.paused else _local(v.next_at)}",
        f"last slot  {_local(v.last_slot)}",
        f"last run   {v.last_run or '-'} {v.last_run_state or ''}".rstrip(),
        f"added      {_local(v.added_at)}",
    ]
    if v.queued:
        lines.append(f"queued     {_local(v.queued)}")
    if v.vars:
        lines.append("vars       " + " ".join(f"{k}={val}" for k, val in v.vars.items()))
    lines.append(f"env        {len(v.env)} variable(s) stored" +
                 (f": {' '.join(v.env)}" if len(v.env) <= 8 else ""))
    return [printable(line) for line in lines]


def _say(line: str) -> None:
    from wfctl.cli import say

    say(line)

