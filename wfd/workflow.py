"""Workflow files: parse, validate, and the DAG derived from them (SPEC 1).

Pure core: text in, a frozen `Workflow` (or `WorkflowInvalid` with every
problem) out. No I/O, no clock; stdlib and msgspec only.

Theory of operation
-------------------
1. Decode the JSON into plain objects with msgspec. A syntax error is the one
   and only problem reported (nothing after it can be trusted); it names the
   1-based line and column, counting columns in characters.
2. Walk the plain objects, not Structs: msgspec stops at the first error, and
   a Struct cannot tell an absent field from an explicit `null` (a step's
   `"timeout": null` overrides `defaults.timeout`). Every problem is
   collected with its JSON path, in the order the walk meets them, which is
   document order (object keys in the order written).
3. Find dependency cycles with Kahn's algorithm, then one cycle per strongly
   connected component (iterative Tarjan, then a BFS). Cycle messages come
   last, ordered by their first step.
4. Only when nothing is wrong, merge `defaults` into each step and build the
   Structs, with `index`, `deps` and `dependents` precomputed for the runner.

Nothing recurses, so a 100,000-step chain is as easy as a 3-step one, and the
work is linear in the size of the file. There is one walk and one check per
field, so what is accepted and what is reported cannot drift apart; it stays
fast because the checks cost little when nothing is wrong (paths and messages
are only built for a problem) and every id is matched against `STEP_ID_RE` in
one regex call over all ids. The cyclic garbage collector is paused
meanwhile: it would otherwise rescan the growing document many times over
(see bench/bench_validate.py).

Decisions where SPEC 1 is silent
--------------------------------
- A cycle reads along dependency edges: `load -> clean` means "load
  depends_on clean". It starts and ends at its step that comes first in the
  file, and is a shortest cycle through that step. One cycle is reported per
  strongly connected component that has one.
- Numbers of seconds accept int or float, are finite and at most 1e9 (about
  31 years), so no timer downstream overflows. Ints are stored as floats.
  `backoff.max` may be 0 (retry at once); `backoff.initial` may exceed `max`
  (then every delay is `max`). `backoff.factor` is any finite number >= 1.
- `null` is accepted for `timeout` (no timeout), `cwd` (the workflow's
  directory, even when `defaults.cwd` is set) and `max_parallel` (the
  daemon's limit); each means the same as leaving the field out at top level.
- `max_parallel` is at most 1,000,000, so it always fits a msgpack int.
- `params` names are variable names (`^[A-Za-z_][A-Za-z0-9_]{0,127}$`, not
  `WFD_*`: those are the daemon's); a param is `{"default": str,
  "required": bool, "description": str}`, all optional; a required param
  with a default is an error (it could never be missing).
- `pool` (a step's, or `defaults.pool`) names one of the daemon's shared limits; a
  name matches `POOL_RE`. Whether the daemon has that pool is checked at submit,
  not here (the validator does not know the daemon). `"pool": null` in a step
  overrides `defaults.pool` (no pool).
- `concurrency` is 1 to 1,000,000 or null (no limit); `on_busy` is "queue" (the
  default) or "skip", and says nothing without `concurrency`.
- Strings that reach `exec` (command, env names and values, cwd) must not
  contain NUL. Env names must be non-empty and without "=". Env names and
  `cwd` must not contain control characters (C0, DEL, C1: they end up in
  messages and on terminals); env values and commands may (a command is a
  shell script; what is printed of it is escaped). In a command list
  the program (item 0) must be non-empty; later arguments may be "".
  A command string must not be empty or only whitespace.
- `name` is a non-empty string without control characters, C1 (U+0080 to
  U+009F) included (it is printed in one-line listings and logs).
- Duplicate entries in `depends_on` are an error. A duplicate key in a JSON
  object is not detected: the last one wins, as in every JSON parser.
- A leading UTF-8 byte order mark is ignored. `invalid UTF-8 at byte N` counts
  bytes from 0, like `hexdump`.
- A number beyond the range of a double (`1e400`) or an int of more than 4300
  digits is not a syntax error: its field reports it as a wrong value.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from wfd.errors import WorkflowInvalid
from wfd.text import CONTROL_RE, printable

__all__ = [
    "POOL_RE",
    "STEP_ID_RE",
    "Backoff",
    "Step",
    "Workflow",
    "build_workflow",
    "env_problems",
    "parse_workflow",
]

_STEP_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
STEP_ID_RE: re.Pattern[str] = re.compile(f"^{_STEP_ID}$")
# A pool's name: also what `wfd --pool` and `wfctl pool set` accept.
POOL_RE: re.Pattern[str] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ON_BUSY = ("queue", "skip")

MAX_SECONDS = 1e9
MAX_RETRIES = 1000
MAX_PARALLEL = 1_000_000

_SHOW_MAX = 40  # characters of a bad value quoted in a message
_BOM = b"\xef\xbb\xbf"


class _Model(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of the workflow model.

    Frozen, because a run's workflow never changes once submitted; unknown
    fields forbidden, so that a Workflow decoded from elsewhere (a stored
    run, a message) is as strict as one parsed here. `Step` and `Workflow`
    are also untracked by the cyclic collector (`gc=False`): they hold only
    strings, numbers, tuples and dicts of strings, so they cannot form a
    cycle, and 100,000 of them would otherwise be rescanned by every full
    collection for the life of the daemon.
    """


class Backoff(_Model, frozen=True):
    """Delay between a failed attempt and the next one (SPEC 1, step `backoff`)."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 300.0
    jitter: float = 0.0

    def delay(self, n: int, rand: float) -> float:
        """Seconds to wait before retry `n` (1, 2, ...); `rand` is uniform in [0, 1).

        `min(max, initial * factor**(n-1))`, scaled into
        `[1 - jitter, 1 + jitter]` by `rand`. The caller draws `rand`, so this
        stays deterministic and testable.
        """
        base = self.initial
        if n > 1 and self.factor > 1.0:
            try:
                base = self.initial * self.factor ** (n - 1)
            except OverflowError:  # a huge n or factor: far beyond any max
                base = math.inf
        base = min(self.max, base)
        return base * (1.0 - self.jitter + 2.0 * self.jitter * rand)


_DEFAULT_BACKOFF = Backoff()


class SlurmOptions(_Model, frozen=True):
    """What a Slurm step asks of `sbatch`; None leaves Slurm's (or the site's) default."""

    partition: str | None = None
    time: str | None = None  # Slurm's time format; None: from the step's timeout
    cpus: int | None = None  # --cpus-per-task
    mem: str | None = None  # --mem: megabytes, or with a K, M, G or T suffix
    extra: tuple[str, ...] = ()  # further sbatch options, each one "--name[=value]"


class Step(_Model, frozen=True, gc=False):
    """One step, with the workflow's `defaults` already merged in."""

    id: str
    command: str | tuple[str, ...]  # str: run by /bin/sh -c; tuple: exec'd directly
    depends_on: tuple[str, ...] = ()
    retries: int = 0
    backoff: Backoff = _DEFAULT_BACKOFF
    timeout: float | None = None
    kill_grace: float = 5.0
    # An attempt lost with its keeper (a reboot): run it again, or fail the step.
    on_lost: str = "rerun"
    env: dict[str, str] = {}  # defaults.env merged under the step's own env
    cwd: str | None = None  # as written; None is the workflow's directory
    # Where its attempts run: "local" (the keeper) or "slurm" (a batch job, docs/slurm.md).
    executor: str = "local"
    slurm: SlurmOptions | None = None  # defaults.slurm merged field by field under the step's
    pool: str | None = None  # the daemon's shared limit it counts against, if any
    # When it may run, given its dependencies' outcomes: "succeeded" (all SUCCEEDED),
    # "done" (all finished, whatever their state: cleanup), "failed" (all finished and
    # at least one FAILED or SKIPPED because of a failure: alerts). See state.py.
    run_if: str = "succeeded"
    description: str = ""  # what the step is for, shown by `wfctl status` (issue 14)
    # An on_exit step (issue 15): the run states after which it runs; None for a step
    # proper. On_exit steps have no depends_on and come last in `Workflow.steps`.
    when: tuple[str, ...] | None = None


class Param(_Model, frozen=True):
    """A declared workflow parameter (`params`): a `wfctl run FILE NAME=VALUE` variable."""

    default: str | None = None  # its value when not given; None: not set at all
    required: bool = False  # a run must give it
    description: str = ""


class Workflow(_Model, frozen=True, gc=False):
    """A validated workflow; `index`, `deps` and `dependents` are derived from `steps`.

    Build one with `parse_workflow` (from a file) or `build_workflow` (from
    Steps already known to be valid), never by hand, so the derived fields
    agree with `steps`.
    """

    name: str
    max_parallel: int | None
    env: dict[str, str]
    steps: tuple[Step, ...]
    index: dict[str, int]  # step id -> position in file order
    dependents: tuple[tuple[int, ...], ...]  # steps that depend on step i, in file order
    deps: tuple[tuple[int, ...], ...]  # step i's dependencies, in depends_on order
    # At most this many unfinished runs of this name and owner; a further submit
    # queues (on_busy "queue") or is refused ("skip"). None: no limit.
    concurrency: int | None = None
    on_busy: str = "queue"
    # Declared parameters: when there are any, `wfctl run` variables must be among them.
    params: dict[str, Param] = {}
    description: str = ""  # what the workflow is for, shown by `wfctl status` (issue 14)
    # The last `exits` of `steps` are the workflow's on_exit steps (issue 15).
    exits: int = 0
    # Seconds a run may take before the daemon cancels it (its on_exit steps still
    # run); None: no limit. Counted from when it last started running (creation,
    # leaving the queue, resume, retry: the fold's `running_since`).
    timeout: float | None = None


# ---------------------------------------------------------------------------
# Public entry points


def parse_workflow(text: str | bytes, default_name: str) -> Workflow:
    """Parse and validate a workflow file's content.

    `default_name` is the file's name without extension, used when the file
    sets no `name`. Raises `WorkflowInvalid` listing every problem, and no
    other exception, whatever the content.
    """
    with _no_gc():
        validator = _Validator(default_name)
        try:
            return validator.run(_decode(_as_bytes(text)))
        finally:
            # Free the decoded document while the collector is still paused,
            # or its first pass after resuming would scan all of it in vain.
            validator.steps = []


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a workflow is parsed.

    Decoding and walking a large file allocates hundreds of thousands of
    containers and no reference cycles; each allocation burst would trigger a
    collection that rescans everything alive, which tripled the time on a
    100,000-step file. Reference counting still frees everything at once.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_workflow(
    name: str, max_parallel: int | None, env: dict[str, str], steps: tuple[Step, ...],
    *, concurrency: int | None = None, on_busy: str = "queue",
    params: dict[str, Param] | None = None,
    on_exit: tuple[Step, ...] = (), timeout: float | None = None,
) -> Workflow:
    """A Workflow from valid, merged Steps (and on_exit steps, each with its `when`),
    with its derived fields computed."""
    steps = steps + on_exit
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        index.setdefault(step.id, i)
    deps = tuple(tuple(index[d] for d in step.depends_on) for step in steps)
    return Workflow(
        name=name,
        max_parallel=max_parallel,
        env=env,
        steps=steps,
        index=index,
        dependents=tuple(map(tuple, _reverse(deps))),
        deps=deps,
        concurrency=concurrency,
        on_busy=on_busy,
        params=params or {},
        exits=len(on_exit),
        timeout=timeout,
    )


def check_cycles(
    deps: Sequence[Sequence[int]],
    dependents: Sequence[Sequence[int]],
    name: Callable[[int], str],
) -> list[str]:
    """One `cycle: a -> b -> a` message per strongly connected component with a cycle.

    `deps[i]` are the indexes step i depends on (no self-edges), `dependents`
    the reverse edges, `name(i)` step i's id. Messages are ordered by their
    first step in file order. Linear and iterative.
    """
    left = _kahn_leftover(deps, dependents)
    if not left:
        return []
    messages = []
    for comp in _components(deps, left):
        if len(comp) > 1:
            cycle = _cycle_through(min(comp), deps, set(comp))
            messages.append((cycle[0], "cycle: " + " -> ".join(name(i) for i in cycle)))
    messages.sort()
    return [m for _, m in messages]


# ---------------------------------------------------------------------------
# Decoding


class _BigNumber:
    """A number literal outside what a double or an int can hold (`1e400`).

    Only seen after the stdlib fallback decode; shown as written.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _as_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates: text read with surrogateescape gives back the
            # file's own bytes, and the bad one is then reported by offset.
            return text.encode("utf-8", "surrogatepass")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"workflow text must be str or bytes, not {type(text).__name__}")


def _decode(data: bytes) -> object:
    skip = len(_BOM) if data.startswith(_BOM) else 0
    body = data[skip:] if skip else data
    try:
        return msgspec.json.decode(body)
    except msgspec.ValidationError:
        # Syntax is fine but a number is out of range: let the walk report it.
        return _decode_stdlib(body, skip)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise WorkflowInvalid([_syntax_problem(body, skip, e)]) from None


class _NonFinite(Exception):
    """The stdlib decoder met NaN or Infinity, which JSON (and msgspec) reject."""


def _decode_stdlib(body: bytes, skip: int) -> object:
    """The slow decode, only for a document with an out-of-range number in it.

    msgspec stopped at that number, so the rest of the syntax is checked
    here; big numbers become `_BigNumber`s for the walk to report.
    """
    try:
        doc = json.loads(
            body.decode("utf-8"),
            parse_float=_parse_float,
            parse_int=_parse_int,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise WorkflowInvalid([f"invalid JSON at {where}: {e.msg}"]) from None
    except _NonFinite:
        offset = _first_outside_strings(_CONSTANT, body)
        where, char = _line_col(body, offset), json.dumps(chr(body[offset]))
        raise WorkflowInvalid([f"invalid JSON at {where}: invalid character {char}"]) from None
    except (RecursionError, UnicodeDecodeError, ValueError) as e:
        raise WorkflowInvalid([_syntax_problem(body, skip, e)]) from None
    # The stdlib decoder, unlike msgspec, lets "\ud800" through as a lone
    # surrogate, which could then never be encoded again.
    lone = _lone_surrogate(body)
    if lone is not None:
        where = _line_col(body, lone)
        raise WorkflowInvalid([f"invalid JSON at {where}: invalid utf-16 surrogate pair"])
    return doc


_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)")


def _lone_surrogate(body: bytes) -> int | None:
    """Offset of the first `\\uXXXX` escape that is half a surrogate pair, if any.

    Only called on a document the stdlib accepted, so every backslash is in
    a string and scanning escapes left to right pairs them correctly.
    """
    high_at = -1  # offset of a high surrogate waiting for its low half
    after_high = -1
    for m in _ESCAPE.finditer(body):
        unit = int(m.group(1), 16) if m.group(1) else -1
        if high_at >= 0:
            if m.start() != after_high or not 0xDC00 <= unit <= 0xDFFF:
                return high_at
            high_at = -1
        elif 0xD800 <= unit <= 0xDBFF:
            high_at, after_high = m.start(), m.end()
        elif 0xDC00 <= unit <= 0xDFFF:
            return m.start()
    return high_at if high_at >= 0 else None


def _reject_constant(name: str) -> object:
    raise _NonFinite(name)


def _parse_float(s: str) -> float | _BigNumber:
    f = float(s)
    return f if math.isfinite(f) else _BigNumber(s)


def _parse_int(s: str) -> int | _BigNumber:
    return int(s) if len(s) <= 4000 else _BigNumber(s)


_AT_BYTE = re.compile(r"^(?:JSON is malformed: )?(.*?)(?: \(byte (\d+)\))?$")


def _syntax_problem(body: bytes, skip: int, err: BaseException) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as u:
        return f"invalid UTF-8 at byte {u.start + skip}"
    if isinstance(err, RecursionError):
        return f"invalid JSON at {_line_col(body, _deepest(body))}: nested too deeply"
    if not body.strip():
        return "invalid JSON at line 1, column 1: the file is empty"
    m = _AT_BYTE.match(str(err))
    if m is None or m.group(2) is None:  # "Input data was truncated" has no offset
        reason = "unexpected end of input" if "truncated" in str(err) else str(err)
        return f"invalid JSON at {_line_col(body, len(body))}: {reason}"
    reason, offset = m.group(1), int(m.group(2))
    if reason == "trailing characters":
        offset = _trailing_start(body, offset)
    if reason == "invalid character":
        char = body[offset : offset + 4].decode("utf-8", "ignore")[:1]
        reason += " " + json.dumps(char)
    return f"invalid JSON at {_line_col(body, offset)}: {reason}"


def _line_col(body: bytes, offset: int) -> str:
    line = body.count(b"\n", 0, offset) + 1
    start = body.rfind(b"\n", 0, offset) + 1
    column = len(body[start:offset].decode("utf-8", "replace")) + 1
    return f"line {line}, column {column}"


def _trailing_start(body: bytes, reported: int) -> int:
    """Where the text after the document's value starts.

    msgspec reports one byte past it, so find it again: the end of the first
    value, then any whitespace.
    """
    text = body.decode("utf-8")
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return max(reported - 1, 0)
    while end < len(text) and text[end] in " \t\r\n":
        end += 1
    return len(text[:end].encode("utf-8"))


_BRACKET_OR_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_CONSTANT = re.compile(rb'"(?:[^"\\]|\\.)*"|NaN|Infinity')


def _first_outside_strings(pattern: re.Pattern[bytes], body: bytes) -> int:
    for m in pattern.finditer(body):
        if body[m.start()] != ord('"'):
            return m.start()
    return 0


def _deepest(body: bytes) -> int:
    """Offset of the first bracket at the greatest nesting depth (strings skipped)."""
    depth = best = where = 0
    for m in _BRACKET_OR_STRING.finditer(body):
        tok = body[m.start()]
        if tok in b"[{":
            depth += 1
            if depth > best:
                best, where = depth, m.start()
        elif tok in b"]}":
            depth -= 1
    return where


# ---------------------------------------------------------------------------
# Messages and paths


def _show(value: object) -> str:
    """A bad value as compact JSON, cut to about 40 characters."""
    if isinstance(value, _BigNumber):
        text = value.text
    else:
        try:
            text = msgspec.json.encode(value, enc_hook=_enc_big).decode()
        except (RecursionError, ValueError, TypeError, OverflowError):
            text = type(value).__name__
    # JSON escapes C0 controls but not C1 (U+0080-U+009F): a message is printed.
    return printable(text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "...")


def _enc_big(value: object) -> msgspec.Raw:
    if isinstance(value, _BigNumber):
        return msgspec.Raw(value.text.encode())
    raise TypeError


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def unknown_field(key: str, known: Iterable[str]) -> str:
    """`unknown field; did you mean 'command'?` when a known field is near (a typo);
    a long key is not compared, so a huge key costs nothing."""
    import difflib

    near = difflib.get_close_matches(key, list(known), n=1) if len(key) <= 64 else []
    return f"unknown field; did you mean {near[0]!r}?" if near else "unknown field"


def _key(key: str) -> str:
    """The path suffix for an object key: `.retries`, or `["odd key"]`."""
    if _PLAIN_KEY.fullmatch(key):
        return "." + key
    return "[" + _show(key) + "]"


class _Bad(Exception):
    """A value failed its check; `items` are (path suffix, reason) pairs."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__(items)
        self.items = items


def _bad(reason: str, value: object = None, show: bool = True) -> _Bad:
    return _Bad([("", f"{reason}, got {_show(value)}" if show else reason)])


# ---------------------------------------------------------------------------
# Field checks: each returns the normalized value or raises _Bad.


def _is_number(v: object) -> bool:
    # bool is not a number here, though Python says it is an int.
    return type(v) is int or type(v) is float


def _seconds(v: object, low: float, strict: bool) -> float:
    if _is_number(v) and (v > low if strict else v >= low) and v <= MAX_SECONDS:  # type: ignore[operator]
        return float(v)  # type: ignore[arg-type]
    op = ">" if strict else ">="
    raise _bad(f"expected a number of seconds {op} {low:g} (at most 1e9)", v)


def _check_timeout(v: object) -> float | None:
    if v is None:
        return None
    try:
        return _seconds(v, 0, strict=True)
    except _Bad:
        raise _bad("expected a number of seconds > 0 (at most 1e9) or null", v) from None


def _check_kill_grace(v: object) -> float:
    return _seconds(v, 0, strict=False)


ON_LOST = ("rerun", "fail")


def _check_on_lost(v: object) -> str:
    if v in ON_LOST and type(v) is str:
        return v  # type: ignore[return-value]
    raise _bad('expected "rerun" or "fail"', v)


EXECUTORS = ("local", "slurm")


def _check_executor(v: object) -> str:
    if v in EXECUTORS and type(v) is str:
        return v  # type: ignore[return-value]
    raise _bad('expected "local" or "slurm"', v)


# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (sbatch(1)).
_SLURM_TIME_RE = re.compile(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})")
_SLURM_MEM_RE = re.compile(r"[1-9]\d{0,15}[KMGT]?")
_SLURM_WORD_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,200}")


def _check_slurm_word(v: object) -> str:
    if type(v) is str and _SLURM_WORD_RE.fullmatch(v):
        return v
    raise _bad("expected a name of letters, digits and _.:+- (at most 200)", v)


def _check_slurm_time(v: object) -> str:
    if type(v) is int and 1 <= v <= MAX_SECONDS:
        return str(v)  # minutes, as sbatch reads a bare number
    if type(v) is str and _SLURM_TIME_RE.fullmatch(v) and len(v) <= 32:
        return v
    raise _bad('expected minutes (an integer >= 1) or Slurm\'s "D-HH:MM:SS" forms', v)


def _check_slurm_cpus(v: object) -> int:
    if type(v) is int and 1 <= v <= 1_000_000:
        return v
    raise _bad("expected an integer from 1 to 1000000", v)


def _check_slurm_mem(v: object) -> str:
    if type(v) is int and 1 <= v <= 2**53:
        return str(v)  # megabytes
    if type(v) is str and _SLURM_MEM_RE.fullmatch(v):
        return v
    raise _bad('expected megabytes (an integer >= 1) or a size like "512M", "4G"', v)


def _check_slurm_extra(v: object) -> tuple[str, ...]:
    if type(v) is not list:
        raise _bad("expected a list of sbatch options", v)
    items: list[tuple[str, str]] = []
    for j, arg in enumerate(v):
        # Long options only: a bare word would be taken as the job script's path.
        if type(arg) is not str or not arg.startswith("--") or len(arg) < 3 \
                or CONTROL_RE.search(arg) or len(arg) > 4096:
            items.append((f"[{j}]", f'expected an sbatch option "--name[=value]", '
                                    f"got {_show(arg)}"))
    if items:
        raise _Bad(items)
    return tuple(v)


_SLURM_CHECKS: dict[str, Callable[[object], object]] = {
    "partition": _check_slurm_word,
    "time": _check_slurm_time,
    "cpus": _check_slurm_cpus,
    "mem": _check_slurm_mem,
    "extra": _check_slurm_extra,
}


def _check_fields(v: object, checks: dict[str, Callable[[object], Any]]) -> dict[str, Any]:
    """An object of optional fields, each checked by its own function; every problem
    reported with its path. What is given is merged field by field later."""
    if type(v) is not dict:
        raise _bad("expected an object", v)
    out: dict[str, Any] = {}
    items: list[tuple[str, str]] = []
    for key, value in v.items():
        check = checks.get(key)
        if check is None:
            items.append((_key(key), unknown_field(key, checks)))
            continue
        try:
            out[key] = check(value)
        except _Bad as e:
            items.extend((_key(key) + sub, why) for sub, why in e.items)
    if items:
        raise _Bad(items)
    return out


def _check_slurm(v: object) -> dict[str, object]:
    return _check_fields(v, _SLURM_CHECKS)


def _check_initial(v: object) -> float:
    return _seconds(v, 0, strict=True)


def _check_max(v: object) -> float:
    return _seconds(v, 0, strict=False)


def _check_factor(v: object) -> float:
    if _is_number(v) and 1 <= v <= 1.7976931348623157e308:  # type: ignore[operator]
        return float(v)  # type: ignore[arg-type]
    raise _bad("expected a number >= 1", v)


def _check_jitter(v: object) -> float:
    if _is_number(v) and 0 <= v <= 1:  # type: ignore[operator]
        return float(v)  # type: ignore[arg-type]
    raise _bad("expected a number from 0 to 1", v)


def _check_retries(v: object) -> int:
    if type(v) is int and 0 <= v <= MAX_RETRIES:
        return v
    raise _bad(f"expected an integer from 0 to {MAX_RETRIES}", v)


def _check_max_parallel(v: object) -> int | None:
    if v is None or (type(v) is int and 1 <= v <= MAX_PARALLEL):
        return v
    raise _bad(f"expected an integer from 1 to {MAX_PARALLEL} or null", v)


def _check_pool(v: object) -> str | None:
    if v is None or (type(v) is str and POOL_RE.fullmatch(v)):
        return v
    raise _bad(f"expected a pool name (matching {POOL_RE.pattern}) or null", v)


def _check_on_busy(v: object) -> str:
    if v in ON_BUSY and type(v) is str:
        return v  # type: ignore[return-value]
    raise _bad('expected "queue" or "skip"', v)


PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _check_params(v: object) -> dict[str, Param]:
    if type(v) is not dict:
        raise _bad("expected an object of parameters", v)
    out: dict[str, Param] = {}
    items: list[tuple[str, str]] = []
    for name, decl in v.items():
        if not PARAM_NAME_RE.fullmatch(name) or name.startswith("WFD_"):
            items.append((_key(name), f"invalid parameter name {_show(name)} (must match "
                                      f"{PARAM_NAME_RE.pattern}, not WFD_*)"))
            continue
        try:
            out[name] = _check_param(decl)
        except _Bad as e:
            items.extend((_key(name) + sub, why) for sub, why in e.items)
    if items:
        raise _Bad(items)
    return out


def _check_param(v: object) -> Param:
    if type(v) is not dict:
        raise _bad('expected an object ({"default", "required", "description"})', v)
    items: list[tuple[str, str]] = []
    for key, value in v.items():
        if key not in ("default", "required", "description"):
            items.append((_key(key), unknown_field(key, ("default", "required",
                                                         "description"))))
        elif key == "required" and type(value) is not bool:
            items.append((_key(key), f"expected true or false, got {_show(value)}"))
        elif key != "required" and type(value) is not str:
            items.append((_key(key), f"expected a string, got {_show(value)}"))
        elif key == "default" and "\0" in value:
            items.append((_key(key), "must not contain a NUL character"))
    if not items and v.get("required") and "default" in v:
        items.append(("", "a required parameter cannot have a default"))
    if items:
        raise _Bad(items)
    return Param(**v)


def _check_name(v: object) -> str:
    if type(v) is str and v and not CONTROL_RE.search(v):
        return v
    raise _bad("expected a non-empty string without control characters", v)


def _check_cwd(v: object) -> str | None:
    if v is None:
        return None
    if type(v) is not str:
        raise _bad("expected a string or null", v)
    if not v:
        raise _bad("must not be empty", show=False)
    if "\0" in v:
        raise _bad("must not contain a NUL character", show=False)
    if CONTROL_RE.search(v):
        raise _bad("must not contain control characters", v)
    return v


def _check_command(v: object) -> str | tuple[str, ...]:
    if type(v) is str:
        if not v.strip():
            raise _bad("must not be empty" if not v else "must not be only whitespace", show=False)
        if "\0" in v:
            raise _bad("must not contain a NUL character", show=False)
        return v
    if type(v) is not list:
        raise _bad("expected a non-empty string or a non-empty list of strings", v)
    if not v:
        raise _bad("must not be empty", show=False)
    try:  # fast path: joining fails on a non-string, and shows any NUL as an extra one
        if "\0".join(v).count("\0") == len(v) - 1 and v[0]:  # type: ignore[arg-type]
            return tuple(v)  # type: ignore[arg-type]
    except TypeError:
        pass
    items = [(f"[{j}]", why) for j, arg in enumerate(v) if (why := _arg_problem(arg, j))]
    if items:
        raise _Bad(items)
    return tuple(v)


def _arg_problem(arg: object, j: int) -> str | None:
    if type(arg) is not str:
        return f"expected a string, got {_show(arg)}"
    if "\0" in arg:
        return "must not contain a NUL character"
    if j == 0 and not arg:
        return "must not be empty (it is the program to run)"
    return None


_BAD_ENV_NAME = 'invalid variable name (must be non-empty, without "=" or NUL)'
_CONTROL_ENV_NAME = "invalid variable name (must not contain control characters)"


def env_problems(env: Mapping[str, object]) -> list[tuple[str, str]]:
    """Each bad entry of an environment as (path suffix, reason), e.g.
    `('["A=B"]', 'invalid variable name ...')`, in key order.

    The one rule for environments: a workflow's `env` fields, and the daemon's
    check of the environment a client submits (which no workflow check sees)."""
    items = []
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            items.append((_key(name), _BAD_ENV_NAME))
        elif CONTROL_RE.search(name):
            items.append((_key(name), _CONTROL_ENV_NAME))
        elif type(value) is not str:
            items.append((_key(name), f"expected a string, got {_show(value)}"))
        elif "\0" in value:
            items.append((_key(name), "must not contain a NUL character"))
    return items


def _check_env(v: object) -> dict[str, str]:
    if type(v) is not dict:
        raise _bad("expected an object of strings", v)
    items = env_problems(v)
    if items:
        raise _Bad(items)
    return v


_BACKOFF_CHECKS: dict[str, Callable[[object], float]] = {
    "initial": _check_initial,
    "factor": _check_factor,
    "max": _check_max,
    "jitter": _check_jitter,
}


def _check_backoff(v: object) -> dict[str, float]:
    return _check_fields(v, _BACKOFF_CHECKS)


# Fields `defaults` may set; a step may set these too.
_SHARED_CHECKS: dict[str, Callable[[object], object]] = {
    "retries": _check_retries,
    "backoff": _check_backoff,
    "timeout": _check_timeout,
    "kill_grace": _check_kill_grace,
    "on_lost": _check_on_lost,
    "cwd": _check_cwd,
    "env": _check_env,
    "executor": _check_executor,
    "slurm": _check_slurm,
    "pool": _check_pool,
}

RUN_IF = ("succeeded", "done", "failed")


def _check_run_if(v: object) -> str:
    if v in RUN_IF and type(v) is str:
        return v  # type: ignore[return-value]
    raise _bad('expected "succeeded", "done" or "failed"', v)


def _check_description(v: object) -> str:
    if type(v) is str:
        return v
    raise _bad("expected a string", v)


_STEP_CHECKS: dict[str, Callable[[object], object]] = {
    "command": _check_command,
    "run_if": _check_run_if,
    "description": _check_description,
    **_SHARED_CHECKS,
}


# ---------------------------------------------------------------------------
# The walk


_TOP_CHECKS: dict[str, Callable[[object], object]] = {
    "name": _check_name,
    "max_parallel": _check_max_parallel,
    "env": _check_env,
    "concurrency": _check_max_parallel,
    "on_busy": _check_on_busy,
    "params": _check_params,
    "description": _check_description,
    "timeout": _check_timeout,
}

RUN_ENDS = ("SUCCEEDED", "FAILED", "CANCELLED")


def _check_when(v: object) -> tuple[str, ...]:
    if type(v) is list and v and all(type(x) is str and x in RUN_ENDS for x in v) \
            and len(set(v)) == len(v):
        return tuple(v)  # type: ignore[arg-type]
    raise _bad('expected a non-empty list of distinct run states out of "SUCCEEDED", '
               '"FAILED" and "CANCELLED"', v)


# An on_exit step's fields: a step's, but `when` for `depends_on` and `run_if`.
_EXIT_CHECKS: dict[str, Callable[[object], object]] = {
    "command": _check_command,
    "when": _check_when,
    "description": _check_description,
    **_SHARED_CHECKS,
}

_ID_MATCH = STEP_ID_RE.fullmatch


class _Validator:
    """One validation: walks the document once, collecting problems in order."""

    def __init__(self, default_name: str) -> None:
        self.default_name = default_name
        self.problems: list[str] = []
        self.top: dict[str, object] = {}
        self.defaults: dict[str, object] = {}
        self.steps: list[dict[str, object]] = []
        self.first: dict[str, int] = {}  # step id -> index of its first step
        self.deps: list[list[int]] = []
        self.exits: list[dict[str, object]] = []  # the on_exit steps, once valid

    def run(self, doc: object) -> Workflow:
        if type(doc) is not dict:
            raise WorkflowInvalid([f"$: expected an object, got {_show(doc)}"])
        if "steps" not in doc:
            self.problems.append('$: missing required field "steps"')
        for key, value in doc.items():
            self._top_field(key, value)
        if "on_exit" in doc:  # after the steps, whose ids it must not repeat
            self._walk_exits(doc["on_exit"])
        dependents = _reverse(self.deps)
        self.problems.extend(check_cycles(self.deps, dependents, self._name))
        if self.problems:
            raise WorkflowInvalid(self.problems)
        return self._build(dependents)

    def _name(self, i: int) -> str:
        return str(self.steps[i]["id"])

    def _top_field(self, key: str, value: object) -> None:
        if key == "steps":
            self._walk_steps(value)
        elif key == "on_exit":
            pass  # walked after every field: `run`
        elif key == "defaults":
            self.defaults = self._object(value, "$.defaults", _SHARED_CHECKS)
        elif key in _TOP_CHECKS:
            self._field(self.top, key, value, "$", _TOP_CHECKS[key])
        else:
            known = ("steps", "defaults", *_TOP_CHECKS)
            self.problems.append(f"${_key(key)}: {unknown_field(key, known)}")

    def _field(
        self, out: dict[str, object], key: str, value: object, path: str, check: Callable
    ) -> None:
        try:
            out[key] = check(value)
        except _Bad as e:
            self._report(path + _key(key), e)

    def _report(self, base: str, bad: _Bad) -> None:
        self.problems.extend(f"{base}{sub}: {why}" for sub, why in bad.items)

    def _object(
        self, value: object, path: str, checks: dict[str, Callable[[object], object]]
    ) -> dict[str, object]:
        if type(value) is not dict:
            self.problems.append(f"{path}: expected an object, got {_show(value)}")
            return {}
        out: dict[str, object] = {}
        for key, v in value.items():
            check = checks.get(key)
            if check is None:
                self.problems.append(f"{path}{_key(key)}: {unknown_field(key, checks)}")
            else:
                self._field(out, key, v, path, check)
        return out

    def _walk_steps(self, steps: object) -> None:
        if type(steps) is not list:
            self.problems.append(f"$.steps: expected a non-empty list of steps, got {_show(steps)}")
            return
        if not steps:
            self.problems.append("$.steps: must not be empty")
            return
        self.steps = steps
        # Every id first, so a dependency may name a step further down.
        ids = [step.get("id") if type(step) is dict else None for step in steps]
        first = self.first
        for i, sid in enumerate(ids):
            if type(sid) is str and sid not in first:
                first[sid] = i
        ids_ok = _all_ids_valid(ids)
        walk = self._walk_step
        self.deps = [walk(i, step, ids_ok) for i, step in enumerate(steps)]

    def _walk_step(self, i: int, step: object, ids_ok: bool) -> list[int]:
        """Step i's dependency edges, reporting each of its problems in key order.
        `ids_ok`: every step's id is known to be a string matching STEP_ID_RE."""
        if type(step) is not dict:
            self.problems.append(f"$.steps[{i}]: expected an object, got {_show(step)}")
            return []
        if "id" not in step or "command" not in step:
            for req in ("id", "command"):
                if req not in step:
                    self.problems.append(f'$.steps[{i}]: missing required field "{req}"')
        deps: list[int] = []
        first = self.first
        for key, value in step.items():
            if key == "id":
                if not ids_ok or first[value] != i:  # else nothing to check: skip the call
                    self._check_id(i, value, ids_ok)
            elif key == "depends_on":
                deps = self._walk_deps(i, step.get("id"), value)
            else:
                check = _STEP_CHECKS.get(key)
                if check is None:
                    known = ("id", "depends_on", *_STEP_CHECKS)
                    self.problems.append(f"$.steps[{i}]{_key(key)}: "
                                         f"{unknown_field(key, known)}")
                else:  # checked here, converted by _Merger once all is well
                    try:
                        check(value)
                    except _Bad as e:  # the path is only built for a problem
                        self._report(f"$.steps[{i}]{_key(key)}", e)
        if step.get("run_if") == "failed" and not step.get("depends_on"):
            self.problems.append(f'$.steps[{i}].run_if: "failed" needs depends_on '
                                 "(with no dependency that could fail, it would never run)")
        return deps

    def _check_id(self, i: int, sid: object, ids_ok: bool) -> None:
        if not ids_ok:
            if type(sid) is not str:
                self.problems.append(f"$.steps[{i}].id: expected a string, got {_show(sid)}")
                return
            if not _ID_MATCH(sid):
                self.problems.append(
                    f"$.steps[{i}].id: invalid id {_show(sid)} (must match {STEP_ID_RE.pattern})"
                )
                return
        first = self.first[sid]  # type: ignore[index]
        if first != i:
            self.problems.append(
                f"$.steps[{i}].id: duplicate id {_show(sid)} (first at $.steps[{first}])"
            )

    def _walk_deps(self, i: int, own: object, value: object) -> list[int]:
        """Step i's dependency edges; self, unknown and repeated entries are problems."""
        if type(value) is not list:
            self.problems.append(
                f"$.steps[{i}].depends_on: expected a list of step ids, got {_show(value)}"
            )
            return []
        first = self.first
        deps: list[int] = []
        seen: dict[str, int] = {}
        for j, dep in enumerate(value):
            if type(dep) is not str:
                why = f"expected a step id (string), got {_show(dep)}"
            elif dep in seen:
                where = f"$.steps[{i}].depends_on[{seen[dep]}]"
                why = f"duplicate dependency {_show(dep)} (first at {where})"
            else:
                seen[dep] = j
                if dep == own:
                    why = f"step {_show(dep)} depends on itself"
                elif dep not in first:
                    why = f"unknown step {_show(dep)}"
                else:
                    deps.append(first[dep])
                    continue
            self.problems.append(f"$.steps[{i}].depends_on[{j}]: {why}")
        return deps

    def _walk_exits(self, exits: object) -> None:
        """The on_exit steps: a step's fields but `when` for `depends_on` and `run_if`;
        their ids share one space with the steps'."""
        if type(exits) is not list:
            self.problems.append(f"$.on_exit: expected a list of steps, got {_show(exits)}")
            return
        where = {sid: f"$.steps[{i}]" for sid, i in self.first.items()}
        for j, step in enumerate(exits):
            path = f"$.on_exit[{j}]"
            if type(step) is not dict:
                self.problems.append(f"{path}: expected an object, got {_show(step)}")
                continue
            for req in ("id", "command"):
                if req not in step:
                    self.problems.append(f'{path}: missing required field "{req}"')
            for key, value in step.items():
                if key == "id":
                    self._check_exit_id(path, value, where)
                elif key in ("depends_on", "run_if"):
                    self.problems.append(f"{path}{_key(key)}: an on_exit step has no "
                                         f"{key} (it runs once the run has ended)")
                elif key not in _EXIT_CHECKS:
                    self.problems.append(f"{path}{_key(key)}: "
                                         f"{unknown_field(key, ['id', *_EXIT_CHECKS])}")
                else:
                    self._field({}, key, value, path, _EXIT_CHECKS[key])
        self.exits = exits

    def _check_exit_id(self, path: str, sid: object, where: dict[str, str]) -> None:
        if type(sid) is not str:
            self.problems.append(f"{path}.id: expected a string, got {_show(sid)}")
        elif not _ID_MATCH(sid):
            self.problems.append(
                f"{path}.id: invalid id {_show(sid)} (must match {STEP_ID_RE.pattern})")
        elif sid in where:
            self.problems.append(f"{path}.id: duplicate id {_show(sid)} (first at {where[sid]})")
        else:
            where[sid] = f"{path}"

    def _build(self, dependents: list[list[int]]) -> Workflow:
        top = self.top
        merger = _Merger(self.defaults)
        exits = tuple(merger.step(raw, when=RUN_ENDS) for raw in self.exits)
        index = self.first  # ids are unique by now
        for j, step in enumerate(exits):
            index[step.id] = len(self.steps) + j
        return Workflow(
            name=top.get("name", self.default_name),  # type: ignore[arg-type]
            max_parallel=top.get("max_parallel"),  # type: ignore[arg-type]
            env=top.get("env", {}),  # type: ignore[arg-type]
            steps=merger.steps(self.steps) + exits,
            index=index,
            dependents=tuple(map(tuple, dependents)) + ((),) * len(exits),
            deps=tuple(map(tuple, self.deps)) + ((),) * len(exits),
            concurrency=top.get("concurrency"),  # type: ignore[arg-type]
            on_busy=top.get("on_busy", "queue"),  # type: ignore[arg-type]
            params=top.get("params", {}),  # type: ignore[arg-type]
            description=top.get("description", ""),  # type: ignore[arg-type]
            exits=len(exits),
            timeout=top.get("timeout"),  # type: ignore[arg-type]
        )


# STEP_ID_RE for many ids at once: each id followed by a newline.
_IDS_RE = re.compile(f"(?:{_STEP_ID}\n)*")


def _all_ids_valid(ids: list[object]) -> bool:
    """Whether every id is a string matching STEP_ID_RE, in one regex call instead of
    one per step (the same pattern: only the loop moves into the regex engine)."""
    try:
        joined = "\n".join(ids) + "\n"  # type: ignore[arg-type]
    except TypeError:  # an id is missing or not a string
        return False
    # An id holding a newline would pass as two: count them.
    return joined.count("\n") == len(ids) and _IDS_RE.fullmatch(joined) is not None


class _Merger:
    """Builds Steps from valid raw step objects, with `defaults` merged in."""

    def __init__(self, defaults: dict[str, object]) -> None:
        self.retries = defaults.get("retries", 0)
        self.dbackoff: dict[str, float] = defaults.get("backoff", {})  # type: ignore[assignment]
        self.backoff = Backoff(**self.dbackoff)
        self.timeout = defaults.get("timeout")
        self.kill_grace = defaults.get("kill_grace", 5.0)
        self.on_lost = defaults.get("on_lost", "rerun")
        self.cwd = defaults.get("cwd")
        self.pool = defaults.get("pool")
        self.env: dict[str, str] = defaults.get("env", {})  # type: ignore[assignment]
        self.executor = defaults.get("executor", "local")
        self.dslurm: dict[str, object] = defaults.get("slurm", {})  # type: ignore[assignment]
        self.slurm = SlurmOptions(**self.dslurm) if self.dslurm else None  # type: ignore[arg-type]

    def steps(self, raws: list[dict[str, object]]) -> tuple[Step, ...]:
        # Raw values passed validation: only lists become tuples, ints floats.
        out = []
        bare = {"id", "command", "depends_on"}
        backoff, timeout, kill_grace = self.backoff, self.timeout, self.kill_grace
        on_lost, pool = self.on_lost, self.pool
        retries, cwd, env = self.retries, self.cwd, self.env
        for raw in raws:
            if raw.keys() <= bare:  # nothing to merge: the common case, kept fast
                command = raw["command"]
                out.append(
                    Step(
                        id=raw["id"],  # type: ignore[arg-type]
                        command=command if type(command) is str else tuple(command),  # type: ignore[arg-type]
                        depends_on=tuple(raw.get("depends_on", ())),  # type: ignore[arg-type]
                        retries=retries,  # type: ignore[arg-type]
                        backoff=backoff,
                        timeout=timeout,  # type: ignore[arg-type]
                        kill_grace=kill_grace,  # type: ignore[arg-type]
                        on_lost=on_lost,  # type: ignore[arg-type]
                        env=dict(env),  # no two steps share a mutable dict
                        cwd=cwd,  # type: ignore[arg-type]
                        executor=self.executor,  # type: ignore[arg-type]
                        slurm=self.slurm,
                        pool=pool,  # type: ignore[arg-type]
                    )
                )
            else:
                out.append(self.step(raw))
        return tuple(out)

    def step(self, raw: dict[str, object], when: tuple[str, ...] | None = None) -> Step:
        command = raw["command"]
        get = raw.get
        timeout = get("timeout", self.timeout)
        backoff = self.backoff
        if "backoff" in raw:
            backoff = Backoff(**{**self.dbackoff, **_floats(raw["backoff"])})  # type: ignore[arg-type]
        return Step(
            id=raw["id"],  # type: ignore[arg-type]
            command=command if type(command) is str else tuple(command),  # type: ignore[arg-type]
            depends_on=tuple(get("depends_on", ())),  # type: ignore[arg-type]
            retries=get("retries", self.retries),  # type: ignore[arg-type]
            backoff=backoff,
            timeout=None if timeout is None else float(timeout),  # type: ignore[arg-type]
            kill_grace=float(get("kill_grace", self.kill_grace)),  # type: ignore[arg-type]
            on_lost=get("on_lost", self.on_lost),  # type: ignore[arg-type]
            env={**self.env, **get("env", {})},  # type: ignore[dict-item]
            cwd=get("cwd", self.cwd),  # type: ignore[arg-type]
            executor=get("executor", self.executor),  # type: ignore[arg-type]
            slurm=self._slurm(get("slurm")),  # type: ignore[arg-type]
            pool=get("pool", self.pool),  # type: ignore[arg-type]
            run_if=get("run_if", "succeeded"),  # type: ignore[arg-type]
            description=get("description", ""),  # type: ignore[arg-type]
            when=tuple(get("when", when)) if when is not None else None,  # type: ignore[arg-type]
        )

    def _slurm(self, own: dict[str, object] | None) -> SlurmOptions | None:
        if not own:
            return self.slurm
        own = {key: _SLURM_CHECKS[key](value) for key, value in own.items()}  # normalized
        return SlurmOptions(**{**self.dslurm, **own})  # type: ignore[arg-type]


def _floats(fields: dict[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in fields.items()}  # type: ignore[arg-type]


def _reverse(deps: Sequence[Sequence[int]]) -> list[list[int]]:
    """For each step, the steps that depend on it, in file order."""
    out: list[list[int]] = [[] for _ in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            out[d].append(i)  # i ascends, so each list is in file order
    return out


# ---------------------------------------------------------------------------
# Cycles


def _kahn_leftover(deps: Sequence[Sequence[int]], dependents: Sequence[Sequence[int]]) -> list[int]:
    """Steps Kahn's algorithm cannot order: on a cycle or downstream of one."""
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if not w]
    while ready:
        for j in dependents[ready.pop()]:
            waiting[j] -= 1
            if not waiting[j]:
                ready.append(j)
    return [i for i, w in enumerate(waiting) if w]


def _components(deps: Sequence[Sequence[int]], nodes: list[int]) -> list[list[int]]:
    """Strongly connected components among `nodes` (iterative Tarjan)."""
    inside = set(nodes)
    order: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    comps: list[list[int]] = []
    for root in nodes:
        if root in order:
            continue
        work = [(root, 0)]
        while work:
            v, k = work.pop()
            if k == 0:
                order[v] = low[v] = len(order)
                stack.append(v)
                on_stack.add(v)
            ds = deps[v]
            while k < len(ds) and (ds[k] not in inside or ds[k] in order):
                w = ds[k]
                if w in on_stack:
                    low[v] = min(low[v], order[w])
                k += 1
            if k < len(ds):  # descend into ds[k]; come back to v at k + 1
                work.append((v, k + 1))
                work.append((ds[k], 0))
                continue
            if low[v] == order[v]:
                comps.append(_pop_component(v, stack, on_stack))
            if work:  # v is done: its parent, on top of `work`, learns its low
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return comps


def _pop_component(v: int, stack: list[int], on_stack: set[int]) -> list[int]:
    comp = []
    while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
            return comp


def _cycle_through(start: int, deps: Sequence[Sequence[int]], comp: set[int]) -> list[int]:
    """A shortest cycle from `start` back to itself inside one component (BFS)."""
    parent = {start: start}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in deps[v]:
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in comp and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError("a strongly connected component of 2+ steps has a cycle")
