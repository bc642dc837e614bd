"""Outputs between steps: what a step writes to `$WFD_OUTPUT`, and how later steps see it.

Pure core: bytes in, a dict or `OutputInvalid` out; names; which outputs a step
gets. The file itself (where it lives, who may write it, reading it back
safely) is `outfile.py`'s, in the keeper.

The file holds `KEY=VALUE` lines (UTF-8, `\\n`-separated; blank lines are
ignored; the value is everything after the first `=`, possibly empty; a later
line for the same KEY wins). KEY matches `KEY_RE`. At most `MAX_OUTPUT` bytes.
A file that breaks a rule fails the attempt that wrote it, with the reason.

A step gets the outputs of every SUCCEEDED step it depends on, directly or
not, as `WFD_OUT_<STEP>_<KEY>`. Step ids may hold `.`, `-` and `_`, which a
variable name cannot (or, for `_`, which would make the split between STEP and
KEY ambiguous), so STEP is the id with `_` written `__`, `-` written `_2D` and
`.` written `_2E` (an underscore, then the character's code in hex). Read left
to right, an `_` followed by `_` or a digit is part of the id and an `_`
followed by a letter starts the KEY (a KEY starts with a letter), so every
(step, key) pair has its own name and the name gives back the pair.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from wfd.text import printable

MAX_OUTPUT = 64 * 1024  # bytes of one attempt's output file
KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}")
PREFIX = "WFD_OUT_"
_ESCAPES = {"_": "__", "-": "_2D", ".": "_2E"}
_UNESCAPES = {"2D": "-", "2E": "."}
_SHOW = 60  # characters of a bad line quoted in an error


class OutputInvalid(Exception):
    """The output file breaks a rule; the message is the attempt's error, one line."""


def parse_outputs(data: bytes) -> dict[str, str]:
    """The outputs a step wrote, or OutputInvalid naming the first problem."""
    if len(data) > MAX_OUTPUT:
        raise OutputInvalid(f"output file ($WFD_OUTPUT) is over {MAX_OUTPUT} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OutputInvalid(f"output file ($WFD_OUTPUT): invalid UTF-8 at byte {exc.start}"
                            ) from None
    outputs: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise OutputInvalid(f"output file ($WFD_OUTPUT) line {number}: expected KEY=VALUE, "
                                f"got {_show(line)}")
        if not KEY_RE.fullmatch(key):
            raise OutputInvalid(f"output file ($WFD_OUTPUT) line {number}: invalid key "
                                f"{_show(key)} (must match {KEY_RE.pattern})")
        if "\0" in value:
            raise OutputInvalid(f"output file ($WFD_OUTPUT) line {number}: the value of "
                                f"{key} holds a NUL character")
        outputs[key] = value
    return outputs


def _show(text: str) -> str:
    cut = text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."
    return '"' + printable(cut) + '"'


def step_var(step_id: str) -> str:
    """The STEP part of `WFD_OUT_<STEP>_<KEY>` (see the module's doc)."""
    if step_id.isalnum() and step_id.isascii():
        return step_id
    return "".join(_ESCAPES.get(char, char) for char in step_id)


def var_name(step_id: str, key: str) -> str:
    return f"{PREFIX}{step_var(step_id)}_{key}"


def split_var(name: str) -> tuple[str, str] | None:
    """The (step id, key) a `WFD_OUT_` name stands for, or None if it is not one."""
    if not name.startswith(PREFIX):
        return None
    rest, i, step = name[len(PREFIX):], 0, []
    while i < len(rest):
        char = rest[i]
        if char != "_":
            step.append(char)
            i += 1
            continue
        if rest[i + 1 : i + 2] == "_":
            step.append("_")
            i += 2
        elif rest[i + 1 : i + 3] in _UNESCAPES:
            step.append(_UNESCAPES[rest[i + 1 : i + 3]])
            i += 3
        elif KEY_RE.fullmatch(rest[i + 1 :]) and step:
            return "".join(step), rest[i + 1 :]
        else:
            return None
    return None


def upstream(deps: Sequence[Sequence[int]], index: int, producer: Callable[[int], bool],
             memo: dict[int, frozenset[int]]) -> frozenset[int]:
    """The steps upstream of step `index` (directly or not) for which `producer` is true.

    `deps[i]` are step i's dependencies. `memo` keeps each step's answer, so that the
    steps of a long chain cost one look each, not one walk each; it stays valid as long
    as `producer` gives the same answers. Iterative: a 100,000-step chain is fine."""
    stack = [index]
    while stack:
        i = stack[-1]
        if i in memo:
            stack.pop()
            continue
        todo = [d for d in deps[i] if d not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        found: frozenset[int] = frozenset()
        for d in deps[i]:
            mine = memo[d] | {d} if producer(d) else memo[d]
            found = mine if not found else found | mine
        memo[i] = found
    return memo[index]


def output_env(producers: Iterable[tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """`WFD_OUT_<STEP>_<KEY>` for each output of each (step id, outputs) pair."""
    return {var_name(step_id, key): value
            for step_id, outputs in producers for key, value in outputs.items()}
