"""Shell completion of wfctl (issue 14) through argcomplete: commands, options, and run
references asked of the daemon. `wfctl completion bash|zsh|fish` prints the script a
shell sources; wfctl answers the shell's requests itself (argcomplete's protocol: the
shell runs wfctl with `_ARGCOMPLETE` and `COMP_LINE` set)."""

from __future__ import annotations

import argparse
import os

SHELLS = ("bash", "zsh", "fish")
RUN_COMPLETIONS = 200  # newest runs offered; a completion must answer at once


def script(shell: str) -> str:
    """The completion script of `shell` for the command `wfctl`."""
    import argcomplete

    return argcomplete.shellcode(["wfctl"], shell=shell)


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request and exit, if this is one (else return)."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    for action in _run_arguments(parser):
        action.completer = run_references  # type: ignore[attr-defined]
    argcomplete.autocomplete(parser, exclude=["-h"])


def _run_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _run_arguments(sub)
        elif action.dest in ("run_id", "target"):
            found.append(action)
    return found


def run_references(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    """Run ids, `@last` and `NAME@last` of the user's runs, from a daemon that answers
    now (never started for this: a completion must not spawn one)."""
    from wfctl.conn import open_connection
    from wfd import protocol
    from wfd.errors import WfdError

    try:
        conn = open_connection(getattr(parsed_args, "socket", None), False)
        runs = conn.call(protocol.Status(limit=RUN_COMPLETIONS), protocol.RunList).runs  # type: ignore[attr-defined]
    except (WfdError, OSError):
        return []
    names = {f"{run.name}@last" for run in runs if "@" not in run.name and " " not in run.name}
    words = ["@last", *sorted(names), *(run.run_id for run in reversed(runs))]
    return [word for word in words if word.startswith(prefix)]
